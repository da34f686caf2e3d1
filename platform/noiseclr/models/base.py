"""One loader for every base diffusion model the platform works on.

`load_model("shapes")` gives the embedded model shipped in this package; a folder path gives
any Stable Diffusion 1.x/2.x or SDXL pipeline saved in diffusers layout (which of the two, its
model_index.json says); anything else is taken as a hub id (e.g.
"stable-diffusion-v1-5/stable-diffusion-v1-5") and needs network or a warm Hugging Face cache.
Every consumer downstream (discovery, editing, serving) takes the `DiffusionModel` this returns,
so none of them knows which one it got.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from noiseclr.domains.shapes import parse_caption
from noiseclr.errors import ModelLoadError

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
# The shapes world in SD's architecture, and in SDXL's (grown from it: models/shapes/xl.py).
EMBEDDED = {"shapes": PRETRAINED_DIR / "shapes", "shapes-xl": PRETRAINED_DIR / "shapes-xl"}


Family = Literal["sd", "sdxl"]
# What `load_model` loads: SD 1.x / 2.x (and the embedded models) or SDXL.
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline


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


@dataclass
class DiffusionModel:
    """A loaded base model: the diffusers pipeline plus what identifies it."""

    pipe: Pipeline
    source: str  # what the user asked for: "shapes", a folder, or a hub id
    fingerprint: str  # `fingerprints`: configs, a few weights as stored, the noise schedule
    world: dict | None = field(default=None)  # world.json of an embedded model
    # The fingerprint of banks and checkpoints written before it covered the noise schedule
    # (`fingerprints`); they still load on the model they were learnt on.
    legacy_fingerprint: str | None = field(default=None)

    @property
    def family(self) -> Family:
        """ "sdxl" for an SDXL pipeline (two text encoders, "text_time" added embeddings), else
        "sd" (SD 1.x / 2.x and the embedded models: one text encoder)."""
        return family_of(self.pipe)

    @property
    def token_widths(self) -> tuple[int, ...]:
        """Each text encoder's token-embedding width: a direction is their sum wide (SDXL's pair)."""
        encoders = (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None))
        return tuple(int(e.get_input_embeddings().embedding_dim) for e in encoders if e is not None)

    def bank_record(self) -> dict:
        """What a bank of token directions records of the model it was learnt on (its
        `base_model`): the source, the fingerprint, the direction width, the family, and for an
        SDXL pair each encoder's part of it."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "hidden_size": sum(self.token_widths),
            "family": self.family,
            **({"widths": list(self.token_widths)} if self.family == "sdxl" else {}),
        }

    @property
    def resolution(self) -> int:
        """The side in pixels the model was trained at (SD 1.5: 512, SDXL: 1024)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def pixel_vae(self):
        """The VAE that turns pixels into latents and back here: the pipeline's own, or for an
        SDXL model in fp16 an fp32 copy of it. SDXL's VAE overflows in fp16 (black or NaN
        images); diffusers' own call upcasts `pipe.vae` in place around its decode, which
        concurrent calls on one pipeline (a replica's threads) would race on, so the sampler,
        inversion and latent encoding read this copy and never change `pipe.vae`."""
        vae = self.pipe.vae
        if not needs_fp32_vae(self.pipe):
            return vae
        cached = self.pipe.__dict__.get("_noiseclr_vae32")  # made once per pipeline and VAE
        if cached is None or cached[0] is not vae or cached[1].device != vae.device:
            cached = (vae, copy.deepcopy(vae).to(dtype=torch.float32))
            self.pipe.__dict__["_noiseclr_vae32"] = cached
        return cached[1]

    @property
    def has_oracle(self) -> bool:
        """Whether the shapes world's oracle can read what an edit changed: only on a model of
        that world (its images are the world's scenes); any other model has no factors to read."""
        return self.world is not None and self.world.get("world") == "shapes"

    def identifies(self, recorded: str | None) -> bool:
        """Whether a fingerprint recorded in a bank or checkpoint names this model."""
        return recorded is not None and recorded in (self.fingerprint, self.legacy_fingerprint)

    def check_prompt(self, prompt: str) -> str:
        """Reject prompts the embedded world has no words for (SD takes any prompt)."""
        if self.has_oracle:
            parse_caption(prompt)
        return prompt


def scheduler_like(cls: type[SchedulerMixin], config: dict) -> SchedulerMixin:
    """`cls` on another scheduler's noise schedule, given only the keys `cls` takes.

    - diffusers' `from_config` carries keys of the source class along (SD 1.x's PNDM config holds
      `skip_prk_steps`) and DDIMInverseScheduler then warns that it does not expect them.
    - `clip_sample` is off unless the config sets it: DDIM's default is on, so a PNDM folder
      without the key would clip every x0 prediction to [-1, 1] (SD's latents are not), while
      `StableDiffusionPipeline` itself turns clipping off on load. Two folders that differ only
      there edit alike."""
    wanted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    # `_use_default_values` names keys that were defaults, not settings: keep it with the keys.
    values = {k: v for k, v in dict(config).items() if k in wanted or k == "_use_default_values"}
    if "clip_sample" in wanted:
        unset = values.get("_use_default_values") or []
        if "clip_sample" not in values or "clip_sample" in unset:
            values["clip_sample"] = False
        values["_use_default_values"] = [k for k in unset if k != "clip_sample"]
    return cls.from_config(values)


def family_of(pipe: DiffusionPipeline) -> Family:
    """ "sdxl" when the pipeline is SDXL's or has SDXL's second text encoder, else "sd"."""
    if isinstance(pipe, StableDiffusionXLPipeline) or getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd"


def _arch(cfg) -> dict:
    # private keys (_name_or_path, _diffusers_version...) and versions say where it came from,
    # not what it is
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_") and not k.endswith("_version")}


def _sdxl_identity(pipe: StableDiffusionXLPipeline) -> tuple[dict, list[torch.Tensor]]:
    """What SDXL adds to the identity: text_encoder_2's config, its token embeddings and the
    projection that makes the pooled text embedding the UNet's added embedding takes; and two
    settings of the pipeline that change every image drawn with guidance: the tokenizers' padding
    tokens (SDXL's tokenizer_2 pads with "!", and the padded positions are cross-attended) and
    `force_zeros_for_empty_prompt` (the unconditional embeddings: zeros or the empty prompt's)."""
    encoder = pipe.text_encoder_2
    settings = {
        "text_encoder_2": _arch(encoder.config.to_dict()),
        "force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt"),
        "pad_token_ids": [getattr(t, "pad_token_id", None) for t in (pipe.tokenizer, pipe.tokenizer_2)],
    }
    weights = [
        encoder.get_input_embeddings().weight[: encoder.config.vocab_size],
        encoder.text_projection.weight,
    ]
    return settings, weights


def fingerprints(pipe: Pipeline) -> tuple[str, str]:
    """(fingerprint, legacy fingerprint) of a base model, in one pass over its weights.

    The identity, cheap to compute: the UNet, text encoder and VAE configs, the UNet's first and
    last convolutions and the text encoder's token embeddings (before any added tokens) in
    float32, then the noise schedule the editing sampler uses (the pipeline's scheduler config
    read as DDIM's: betas, prediction type, clip_sample, spacing...). The legacy one stops before
    the schedule: what banks and checkpoints written until 2026-12 recorded
    (`DiffusionModel.identifies` accepts it).

    SDXL's identity adds what only SDXL has (`_sdxl_identity`: text_encoder_2...), hashed after
    the SD part, so that every SD fingerprint is what it was before SDXL was supported. No bank of
    an SDXL model predates the schedule in the fingerprint: its legacy fingerprint is the full one.

    Computed on the weights as stored: `load_model` fingerprints before it casts to fp16 / bf16,
    so a bank learnt in fp32 serves at any precision."""
    sdxl = _sdxl_identity(pipe) if family_of(pipe) == "sdxl" else None
    h = hashlib.sha256()
    for cfg in (pipe.unet.config, pipe.text_encoder.config.to_dict(), pipe.vae.config):
        h.update(json.dumps(_arch(cfg), sort_keys=True, default=str).encode())
    n_vocab = pipe.text_encoder.config.vocab_size
    for t in (
        pipe.unet.conv_in.weight,
        pipe.unet.conv_out.weight,
        pipe.text_encoder.get_input_embeddings().weight[:n_vocab],
    ):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    if sdxl is not None:
        settings, weights = sdxl
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for t in weights:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    legacy = h.hexdigest()[:16]
    schedule = _arch(scheduler_like(DDIMScheduler, pipe.scheduler.config).config)
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    stamp = h.hexdigest()[:16]
    return stamp, stamp if sdxl is not None else legacy


def fingerprint(pipe: Pipeline) -> str:
    """A base model's identity (`fingerprints`)."""
    return fingerprints(pipe)[0]


def cast(pipe, dtype: torch.dtype | dict) -> None:
    """Cast a loaded pipeline's models to `dtype` (or {component: dtype, "default": dtype}), each
    keeping the submodules its class keeps in float32, as `from_pretrained(torch_dtype=...)` does.
    (diffusers' `ModelMixin.to(dtype)` warns on every model, even with none to keep.)"""
    for name, component in pipe.components.items():
        wanted = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
        if wanted is None or not isinstance(component, torch.nn.Module):
            continue
        torch.nn.Module.to(component, dtype=wanted)
        keep = getattr(component, "_keep_in_fp32_modules", None) or []
        for path, sub in component.named_modules():
            if any(k in path.split(".") for k in keep):
                torch.nn.Module.to(sub, dtype=torch.float32)


def needs_fp32_vae(pipe) -> bool:
    """An SDXL pipeline whose VAE is in fp16 and says it must run in fp32 (`force_upcast`, which
    StableDiffusionXLPipeline honours; SD's pipeline never reads it, and every VAE config has
    it, diffusers' default)."""
    vae = getattr(pipe, "vae", None)
    return (
        family_of(pipe) == "sdxl"
        and vae is not None
        and vae.dtype == torch.float16
        and bool(vae.config.get("force_upcast", False))
    )


def pipeline_class(source: str, **hub) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """The class to load `source` (a folder or hub id) with, read from its model_index.json's
    `_class_name`: any SDXL pipeline's name (StableDiffusionXL...) -> `StableDiffusionXLPipeline`,
    anything else -> `StableDiffusionPipeline`, as every folder loaded before SDXL was supported."""
    index = Path(source) / "model_index.json"
    # a hub id: its model_index.json only (network or the Hugging Face cache)
    # (`hub`: from_pretrained's token, revision, cache_dir, local_files_only... for a hub id)
    config = (
        json.loads(index.read_text()) if index.is_file() else DiffusionPipeline.load_config(source, **hub)
    )
    name = str(config.get("_class_name") or "")
    return StableDiffusionXLPipeline if name.startswith("StableDiffusionXL") else StableDiffusionPipeline


def read_pipeline(source: str) -> Pipeline:
    """The pipeline in `source` (a folder or hub id) as stored, of the class its model_index.json
    names (`pipeline_class`), weights from safetensors only (no pickle), no safety checker."""
    if pipeline_class(source) is StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline.from_pretrained(source, use_safetensors=True)
    return StableDiffusionPipeline.from_pretrained(
        source, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )


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
    """Load a base model as a StableDiffusionPipeline (or StableDiffusionXLPipeline, when its
    model_index.json names an SDXL pipeline) with the folder's own scheduler (what generation and
    editing sample with, as diffusers and `NoiseCLRPipeline` do; training draws noise with DDPM
    and inversion and the measurements step with DDIM, on the same schedule).

    The weights load as stored (fp32 for SD's main files), are fingerprinted, and only then cast
    to `dtype`: a bank records the model it was learnt on, not the precision it ran at."""
    source, world = _resolve(name_or_path)
    try:
        pipe = read_pipeline(source)
    except Exception as err:  # hub unreachable, missing files, wrong layout: one clear error
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {err}. A hub id needs network access or the model "
            "in the local Hugging Face cache; a folder needs the full diffusers layout."
        ) from err
    if family_of(pipe) == "sdxl" and (pipe.text_encoder is None or pipe.tokenizer is None):
        raise ModelLoadError(
            f"{name_or_path!r} is an SDXL pipeline without the first text encoder (SDXL's refiner?): "
            "only a base SDXL model, with text_encoder and text_encoder_2, can be loaded"
        )
    pipe.set_progress_bar_config(disable=True)
    stamp, legacy = fingerprints(pipe)
    cast(pipe, dtype)
    pipe.to(resolve_device(device))
    return DiffusionModel(
        pipe=pipe, source=name_or_path, fingerprint=stamp, world=world, legacy_fingerprint=legacy
    )
