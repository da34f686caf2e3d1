"""One loader for every base diffusion model the platform works on.

`load_model("shapes")` gives the embedded model shipped in this package; a folder path gives
any Stable Diffusion 1.x/2.x pipeline saved in diffusers layout; anything else is taken as a
hub id (e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5") and needs network or a warm
Hugging Face cache. Every consumer downstream (discovery, editing, serving) takes the
`DiffusionModel` this returns, so none of them knows which one it got.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from noiseclr.domains.shapes import parse_caption
from noiseclr.errors import ModelLoadError

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
EMBEDDED = {"shapes": PRETRAINED_DIR / "shapes"}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda when there is a GPU, else cpu; anything else as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelLoadError(
            f"device {name!r} is not a device torch knows (use auto, cpu, cuda, cuda:N)"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but this machine has no CUDA GPU (use cpu or auto)")
    return device


def resolve_dtype(precision: str) -> torch.dtype:
    """ "fp32" | "bf16" | "fp16" -> the torch dtype."""
    if precision not in DTYPES:
        raise ModelLoadError(f"precision {precision!r} is not one of {sorted(DTYPES)}")
    return DTYPES[precision]


@dataclass
class DiffusionModel:
    """A loaded base model: the diffusers pipeline plus what identifies it."""

    pipe: StableDiffusionPipeline
    source: str  # what the user asked for: "shapes", a folder, or a hub id
    fingerprint: str  # sha256 over configs and a few weights: detects a different model
    world: dict | None = field(default=None)  # world.json of an embedded model

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def check_prompt(self, prompt: str) -> str:
        """Reject prompts the embedded world has no words for (SD takes any prompt)."""
        if self.world is not None and self.world.get("world") == "shapes":
            parse_caption(prompt)
        return prompt


def fingerprint(pipe: StableDiffusionPipeline) -> str:
    """Identity of a base model, cheap to compute: configs + the UNet's first and last
    convolutions + the text encoder's token embeddings (before any added tokens)."""
    h = hashlib.sha256()
    for cfg in (pipe.unet.config, pipe.text_encoder.config.to_dict(), pipe.vae.config):
        # private keys (_name_or_path, _diffusers_version...) and versions say where it came
        # from, not what it is
        arch = {k: v for k, v in dict(cfg).items() if not k.startswith("_") and not k.endswith("_version")}
        h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    n_vocab = pipe.text_encoder.config.vocab_size
    for t in (
        pipe.unet.conv_in.weight,
        pipe.unet.conv_out.weight,
        pipe.text_encoder.get_input_embeddings().weight[:n_vocab],
    ):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve(name_or_path: str) -> tuple[str, dict | None]:
    if name_or_path in EMBEDDED:
        folder = EMBEDDED[name_or_path]
        if not (folder / "model_index.json").exists():
            raise ModelLoadError(
                f"embedded model {name_or_path!r} is missing its weights at {folder}; "
                "reinstall the package or run `noiseclr base train`"
            )
        return str(folder), json.loads((folder / "world.json").read_text())
    path = Path(name_or_path).expanduser()
    looks_like_path = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist")
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json); "
                "save one with StableDiffusionPipeline.save_pretrained"
            )
        world_file = path / "world.json"
        return str(path), json.loads(world_file.read_text()) if world_file.exists() else None
    if "/" not in name_or_path:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: use one of {sorted(EMBEDDED)}, a diffusers folder, "
            "or a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    return name_or_path, None  # hub id


def load_model(
    name_or_path: str = "shapes",
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """Load a base model as a StableDiffusionPipeline with a DDIM scheduler."""
    source, world = _resolve(name_or_path)
    try:
        extra = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # fp32 is the default
        pipe = StableDiffusionPipeline.from_pretrained(  # weights from safetensors only, no pickle
            source, safety_checker=None, requires_safety_checker=False, use_safetensors=True, **extra
        )
    except Exception as err:  # hub unreachable, missing files, wrong layout: one clear error
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {err}. A hub id needs network access or the model "
            "in the local Hugging Face cache; a folder needs the full diffusers layout."
        ) from err
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(resolve_device(device))
    return DiffusionModel(pipe=pipe, source=name_or_path, fingerprint=fingerprint(pipe), world=world)
