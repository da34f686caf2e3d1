"""`noiseclr edit` as a diffusers pipeline: `StableDiffusionPipeline` (or, for SDXL,
`StableDiffusionXLPipeline`) with `edits=`.

    pipe = NoiseCLRPipeline.from_pretrained("shapes")     # or any SD 1.x / 2.x / SDXL folder / hub id
    pipe.load_bank("out/discovery/bank")
    image = pipe(edits={"3": 1.0}, seed=0).images[0]      # a generated image, as `noiseclr edit 3=1 --seed 0`
    image = pipe(edits=["3=1"], image=photo).images[0]    # a real image, DDIM-inverted as `--image`

The class is a `StableDiffusionPipeline` (the official code's `EditingPipeline` extends it too),
so `from_pretrained`, `from_pipe`, `.to(device)`, `save_pretrained`, offload, IP-Adapter loading
and the components behave as diffusers users expect. A generated image runs SD's own
`__call__` (every argument, `pipe.scheduler` whatever it is) with the edits' rows joined to its
UNet calls by `denoiser.EditingHook`; a real image is inverted and edited by `sampler`, as the
CLI does. The edit term is `denoiser.DirectionTerms` on both paths, and `editing.request`
resolves seeds, prompts and real images as for the CLI and the endpoint.

On an SDXL folder `NoiseCLRPipeline.from_pretrained` returns a `NoiseCLRXLPipeline`, the same
contract on `StableDiffusionXLPipeline` (its whole `__call__`: `prompt_2`, pooled embeddings,
size and crop conditioning, `denoising_end`...): a direction is a pair of token embeddings, one
per text encoder, and an edit row takes its pair's pooled embedding and its image's size ids.

`sega_arguments` hands the same directions to diffusers' `SemanticStableDiffusionPipeline`
(SEGA, SD only), for users who want its thresholding and momentum instead of the plain sum.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo
from PIL import Image

from noiseclr.bank import SAFE_NAME, DirectionBank
from noiseclr.conditioning import direction_table, encode_directions, encode_prompts, text_encoders, unpack
from noiseclr.data.images import read_image_file, square_image
from noiseclr.editing import request, sampler
from noiseclr.editing.defaults import INVERSION_STEPS, SEED_STEPS
from noiseclr.editing.denoiser import DirectionTerms, EditingHook
from noiseclr.errors import BankError, EditError, ImageError
from noiseclr.models.base import EMBEDDED, DiffusionModel, cast, fingerprints, pipeline_class
from noiseclr.models.generate import default_guidance, latent_shape

log = logging.getLogger(__name__)

# What `edits=` takes: {"3": 1.0, "shapes:hue+": "-1@800-200"}, ["3=1", "shapes:5=-1"], one "3=1",
# or parsed `sampler.Edit`s.
EditSpec = Mapping[str | int, float | str] | Sequence[str | sampler.Edit] | str | None
# What `image=` takes, one or a list: a path, a PIL image, an (H, W[, 3|4]) array (uint8, or
# float in [0, 1]), or a prepared (N, 3, R, R) tensor in [-1, 1] at the model's resolution R.
ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# from_pretrained's options that say where model_index.json is read from (a hub id's)
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class _BankEditing:
    """What NoiseCLR adds to a diffusers text-to-image pipeline (`_base`): banks and `edits=`."""

    _base: ClassVar[type[DiffusionPipeline]]
    _output: ClassVar[type]
    _second_positional: ClassVar[tuple[type, ...]]  # what the base's 2nd positional argument takes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        """diffusers' `from_pretrained` (safetensors preferred, `.bin` and variants read as there),
        plus the names of embedded models ("shapes")."""
        name = str(pretrained_model_name_or_path)
        if name in EMBEDDED:  # ships without a safety checker: nothing to warn about
            name = str(EMBEDDED[name])
            if "requires_safety_checker" in inspect.signature(cls._base.__init__).parameters:
                kwargs.setdefault("requires_safety_checker", False)
        # A bank records the weights as stored: fingerprint them before a cast to fp16 / bf16
        # (which `load_bank` could not see through), then cast as asked.
        dtype = kwargs.pop("torch_dtype", None)
        pipe = super().from_pretrained(name, **kwargs)
        pipe.__dict__["_noiseclr_fingerprints"] = fingerprints(pipe)
        if dtype is not None:  # one dtype, or per component as diffusers takes it
            cast(pipe, dtype)
        return pipe

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' sequential offload, with the text encoders' direction tables installed
        first: offload hooks every leaf module as it is then, and a table swapped in later would
        keep its weight on the meta device."""
        for encoder in text_encoders(self).encoders:
            direction_table(encoder)
        super().enable_sequential_cpu_offload(*args, **kwargs)

    def save_pretrained(
        self, save_directory: str | Path, *args: Any, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """diffusers' `save_pretrained`, plus the embedded model's world.json (its guidance scale
        and prompt words), so that the saved folder edits as the one it came from. The folder
        names diffusers' own class (`StableDiffusionPipeline` / `StableDiffusionXLPipeline`), not
        this one: it is a plain model folder that diffusers, `noiseclr` and other tools load as
        what it is (banks are not saved in it). With `push_to_hub` (diffusers' options:
        `repo_id`, `token`, `private`, `commit_message`, `create_pr`) the folder is uploaded
        after those two changes, as diffusers uploads it."""
        hub = {
            k: kwargs.pop(k)
            for k in ("repo_id", "token", "private", "commit_message", "create_pr")
            if k in kwargs
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = self._base.__name__
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        world = self._model().world
        if world is not None:
            (Path(save_directory) / "world.json").write_text(json.dumps(world, indent=1))
        if push_to_hub:
            token = hub.get("token")
            repo_id = create_repo(
                hub.get("repo_id", Path(save_directory).name),
                exist_ok=True,
                private=hub.get("private"),
                token=token,
            ).repo_id
            card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
            card.save(str(Path(save_directory) / "README.md"))
            self._upload_folder(
                str(save_directory), repo_id, token=token, commit_message=hub.get("commit_message"),
                create_pr=hub.get("create_pr", False),
            )  # fmt: skip

    # -- banks ---------------------------------------------------------------------------------

    @property
    def banks(self) -> dict[str, DirectionBank]:
        """Loaded banks by the name edits address them with (`name:direction=scale`)."""
        # Not set in __init__: diffusers reads a pipeline's components off __init__'s signature.
        return self.__dict__.setdefault("_noiseclr_banks", {})

    def load_bank(
        self, bank: DirectionBank | str | Path, name: str | None = None, strict: bool = True
    ) -> DirectionBank:
        """Load a bank (a folder or a `DirectionBank`) for `edits=`, under `name` (default: the
        bank's own name, as `noiseclr edit` addresses it).

        The bank's width must match the text encoder's token embeddings. With `strict` (the
        CLI's behaviour) it must also have been learnt on these very weights (the base model's
        fingerprint, taken before `from_pretrained`'s `torch_dtype` cast, so the same model in
        fp16 or bf16 passes); `strict=False` only warns, e.g. for a fine-tune of the bank's model.
        """
        if not isinstance(bank, DirectionBank):
            bank = DirectionBank.load(bank)
        key = bank.name if name is None else name
        if not isinstance(key, str) or not SAFE_NAME.match(key):
            raise BankError(f"bank name {key!r}: letters, digits, '_', '-', '.' (not first) only")
        if key in self.banks:
            raise BankError(f"a bank named {key!r} is already loaded; pass another name= to load_bank")
        bank.require_tokens("the pipeline applies token directions only; view them with `noiseclr gallery`")
        model = self._model(with_fingerprint=True)
        if bank.family != model.family:
            bank.check_model(model)  # the family's one-line refusal, before any width is compared
        width = sum(model.token_widths)
        if bank.directions.shape[1] != width:
            raise BankError(
                f"bank {key!r} has {bank.directions.shape[1]}-dim directions but this pipeline's text "
                f"encoder{'s take' if len(model.token_widths) > 1 else ' takes'} {width}-dim token "
                "embeddings: it was learnt on another model"
            )
        try:
            bank.check_model(model)
        except BankError as err:
            if strict:
                raise
            log.warning("%s; loading it anyway (strict=False)", err)
        self.banks[key] = bank
        return bank

    # -- editing -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *args: Any,
        edits: EditSpec = None,
        image: ImageInput | list[ImageInput] | None = None,
        seed: int | list[int] | None = None,
        inversion_steps: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """The diffusers pipeline's `__call__` (`StableDiffusionPipeline`'s, or for SDXL
        `StableDiffusionXLPipeline`'s), every argument as there, plus `edits`, on a generated
        image or a real `image`.

        Args:
            prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds, output_type,
                return_dict, cross_attention_kwargs, guidance_rescale, clip_skip,
                callback_on_step_end, callback_on_step_end_tensor_inputs (and SDXL's prompt_2,
                negative_prompt_2, pooled and negative pooled embeddings, original_size,
                crops_coords_top_left, target_size, their negative_ forms and denoising_end): as
                in diffusers, with the pipeline's own scheduler; edits follow every image
                (`num_images_per_prompt`, generator lists) and callbacks see the edited latents.
                Three defaults differ: no prompt (and no `prompt_embeds`) is the loaded banks'
                domain prompt (their gallery prompt; `""` for an unconditional image; on SDXL
                no prompt is its empty prompt's zeros, as in the CLI, where `""` is ""'s states
                as in diffusers), `guidance_scale` is the model's (world.json's, else diffusers'
                default) with a prompt and 1 without, and `num_inference_steps` is 25 (100 for a
                real image), the CLI's.
            edits: `noiseclr edit`'s syntax, `[bank:]direction=scale[@t_high-t_low]`: a dict
                `{"3": 1.0}`, a list `["shapes:3=1"]`, one string, or `sampler.Edit`s. On a
                measured bank scale 1 is the direction's measured clean edit and the window its
                measured one; windows are in timesteps whatever the scheduler.
            image: a real image (or a list): DDIM-inverted under the empty prompt and edited along
                that DDIM trajectory without a prompt (the paper's real-image form), whatever
                `pipe.scheduler` is; the generation arguments do not apply to it.
            seed: `noiseclr edit --seed`: image i of a call with seed s is drawn as image i of
                `noiseclr generate --seed s` (a list: one seed per image). Used when neither
                `generator` nor `latents` is given (default 0).
            inversion_steps: DDIM inversion steps (default: `num_inference_steps`, as the CLI).
        """
        if args and not (args[0] is None or isinstance(args[0], self._second_positional)):
            raise TypeError(
                f"{type(self).__name__} takes {self._base.__name__}'s positional arguments (prompt, "
                "...): pass edits by name, pipe(prompt, edits=...)"
            )
        call = inspect.signature(self._base.__call__).bind(self, prompt, *args, **kwargs)
        given = dict(call.arguments)
        given.pop("self")
        given.update(given.pop("kwargs", {}))
        for what in ("num_inference_steps", "inversion_steps"):
            value = inversion_steps if what == "inversion_steps" else given.get(what)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
        output_type = given.get("output_type", "pil")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {list(OUTPUT_TYPES)}")
        parsed = self._edits(edits)
        if image is not None:
            return self._edit_real(image, parsed, given, inversion_steps)
        return self._generate(parsed, given, seed)

    def _generate(
        self, parsed: list[sampler.Edit], given: dict[str, Any], seed: int | list[int] | None
    ) -> Any:
        """The diffusers pipeline's own loop, the edits' rows added to its UNet calls (`EditingHook`)."""
        model = self._model()
        prompt, embeds = given.get("prompt"), given.get("prompt_embeds")
        if prompt is None and embeds is None:  # the domain of the bank being edited
            prompt = request.domain_prompt(self._banks_of(parsed)) or ""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompts is not None:
            for text in prompts:
                if text:
                    model.check_prompt(text)
        batch = len(prompts) if prompts is not None else embeds.shape[0]
        latents = given.get("latents")
        if "num_images_per_prompt" not in given:  # one prompt, several seeds or latents: an image each
            many = len(seed) if isinstance(seed, list | tuple) else None
            many = latents.shape[0] if latents is not None and latents.ndim == 4 else many
            if many and many % batch == 0:
                given["num_images_per_prompt"] = many // batch
        per_prompt = given.get("num_images_per_prompt") or 1
        total = batch * per_prompt
        if "guidance_scale" not in given:
            prompted = embeds is not None or any(prompts)
            given["guidance_scale"] = default_guidance(model) if prompted else 1.0
        if not {"num_inference_steps", "timesteps", "sigmas"} & set(given):
            given["num_inference_steps"] = SEED_STEPS
        if latents is not None:
            self._check_latents(model, latents, given, total)
        if given.get("generator") is None and latents is None:
            given["generator"] = request.image_generators(seed, total)
        enc = text_encoders(self)
        # No prompt given and none in the banks: the CLI's unconditional image, whose context is
        # the model's empty prompt. On SDXL that is zeros (force_zeros_for_empty_prompt), which
        # diffusers gives the unconditional rows only, so it is passed as the prompt's embeddings.
        zeroed = prompt == "" and given.get("prompt") is None and embeds is None and enc.zeros_for_empty
        if zeroed:
            states, added = unpack(self.unet, encode_prompts(enc, [""], self._execution_device))
            given["prompt_embeds"], given["pooled_prompt_embeds"] = states, added["text_embeds"]
            prompt = None
        given["prompt"] = prompt
        if not parsed:
            return self._base.__call__(self, **given)
        # Where the edit term's eps(empty) already is: the unconditional rows unless a negative
        # prompt replaces them; the text rows only for the empty prompt (decided per step by the
        # hook). SDXL's unconditional rows without a negative prompt are "" or zeros, as its empty
        # prompt is here; its text rows for a prompt "" are ""'s states, which are not zeros.
        given_negative = ("negative_prompt", "negative_prompt_embeds", "negative_prompt_2")
        uncond_empty = all(given.get(k) is None for k in given_negative)
        second = given.get("prompt_2")
        text_empty = zeroed or (
            embeds is None
            and given.get("clip_skip") is None
            and not any(prompts or [])
            and not any([second] if isinstance(second, str) else second or [])
            and not enc.zeros_for_empty
        )
        scales = torch.tensor([[e.scale for e in parsed]] * total, dtype=torch.float32)
        terms = DirectionTerms.encode(enc, None, parsed, scales, self._execution_device)
        # SDXL with negative size ids (diffusers uses them when both sizes are given): the
        # unconditional rows are conditioned on other sizes, so the edit rows copy the text
        # rows', whose sizes are the image's (the CLI's).
        from_text = (
            given.get("negative_original_size") is not None and given.get("negative_target_size") is not None
        )
        EditingHook.install(self.unet)
        end = EditingHook.editing(self.unet, terms, total, uncond_empty, text_empty, from_text)
        try:
            return self._base.__call__(self, **given)
        finally:
            end()

    def _edit_real(
        self, image: ImageInput | list[ImageInput], parsed: list[sampler.Edit], given: dict[str, Any],
        inversion_steps: int | None,
    ) -> Any:  # fmt: skip
        """Invert the real image(s) with DDIM and edit along that trajectory, as `noiseclr edit --image`."""
        if given.get("prompt") is not None or given.get("prompt_embeds") is not None:
            raise EditError(
                "prompt= is for generated images: a real image is inverted and edited without a "
                "prompt (as `noiseclr edit --image`)"
            )
        if given.get("latents") is not None or given.get("generator") is not None:
            raise EditError("give image= or latents= / generator=, not both: a real image sets x_T")
        allowed = {"prompt", "num_inference_steps", "output_type", "return_dict"}
        unused = sorted(k for k, v in given.items() if v is not None and k not in allowed)
        if unused:
            raise EditError(
                f"{', '.join(unused)}: not used with image= (a real image is DDIM-inverted and edited)"
            )
        model = self._model()
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        steps = given.get("num_inference_steps") or INVERSION_STEPS
        output_type = given.get("output_type", "pil")
        # SDXL's VAE in fp16 overflows: the encode and the decode use `model.pixel_vae`, an fp32
        # copy (diffusers upcasts `pipe.vae` in place instead, which concurrent calls race on).
        start = request.from_pixels(self._pixels(image, model.resolution), inversion_steps or steps)
        request.invert(model, [start], progress=progress)
        x0 = sampler.sample(model, start.x_T, parsed, steps=steps, start_t=start.start_t, progress=progress)
        images = x0 if output_type == "latent" else sampler.decode(model, x0)  # (N, H, W, 3) in [0, 1]
        nsfw = None
        if output_type != "latent":
            if getattr(self, "safety_checker", None) is not None:  # an SD checkpoint with its checker
                images, nsfw = self.run_safety_checker(images, model.device, self.text_encoder.dtype)
            if getattr(self, "watermark", None) is not None:  # SDXL with its invisible watermark
                marked = self.watermark.apply_watermark(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
                images = ((marked + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
            elif output_type == "pt":
                images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return self._output_of(images, nsfw, given.get("return_dict", True))

    def _output_of(self, images: Any, nsfw: Any, return_dict: bool) -> Any:
        if self._output is StableDiffusionXLPipelineOutput:  # SDXL's output has no safety field
            return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)

    # -- adapters to the sampler's inputs ------------------------------------------------------

    def _model(self, with_fingerprint: bool = False) -> DiffusionModel:
        """This pipeline as the `DiffusionModel` the sampler takes (no copy of any weight)."""
        source = str(self.name_or_path or "pipeline")
        if "_noiseclr_world" not in self.__dict__:  # the embedded model's world: guidance, prompt words
            world_file = Path(source) / "world.json" if self.name_or_path else None
            world = json.loads(world_file.read_text()) if world_file and world_file.is_file() else None
            self.__dict__["_noiseclr_world"] = world
        # The fingerprint hashes a few weights: computed for bank checks, not on every call;
        # `from_pretrained` recorded it before any cast (a pipeline built otherwise: as it is now).
        stamp, legacy = "", None
        if with_fingerprint:
            known = self.__dict__.get("_noiseclr_fingerprints")
            stamp, legacy = known or fingerprints(self)
        return DiffusionModel(
            pipe=self,
            source=source,
            fingerprint=stamp,
            world=self.__dict__["_noiseclr_world"],
            legacy_fingerprint=legacy,
        )

    def _edits(self, edits: EditSpec) -> list[sampler.Edit]:
        if edits is None:
            return []
        if isinstance(edits, str):
            items: list[str | sampler.Edit] = [edits]
        elif isinstance(edits, Mapping):
            items = []
            for key, value in edits.items():
                if isinstance(value, bool) or not isinstance(value, int | float | str):
                    raise EditError(
                        f"edits[{key!r}]: a scale (number) or 'scale@t_high-t_low', got {value!r}"
                    )
                items.append(f"{key}={float(value)!r}" if not isinstance(value, str) else f"{key}={value}")
        else:
            items = list(edits)
        texts = [e for e in items if not isinstance(e, sampler.Edit)]
        if texts and not self.banks:
            raise EditError("no bank is loaded: call pipe.load_bank(folder) before passing edits")
        out = []
        for e in items:
            if isinstance(e, sampler.Edit):
                out.append(e)
            elif isinstance(e, str):
                out.append(sampler.parse_edit(e, self.banks))
            else:
                raise EditError(f"an edit is a string like '3=1' or a dict {{'3': 1.0}}, got {e!r}")
        return out

    def _banks_of(self, parsed: list[sampler.Edit]) -> list[DirectionBank]:
        """Where a call without a prompt takes its domain prompt from (`request.prompt_banks`)."""
        return request.prompt_banks(parsed, self.banks)

    @staticmethod
    def _check_latents(
        model: DiffusionModel, latents: torch.Tensor, given: dict[str, Any], total: int
    ) -> None:
        shape = latent_shape(model, given.get("height"), given.get("width"))
        if latents.ndim != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] != total:
            raise ValueError(
                f"latents must be ({total}, {', '.join(map(str, shape))}) for {total} images, "
                f"got {tuple(latents.shape)}"
            )

    @staticmethod
    def _pixels(image: ImageInput | list[ImageInput], resolution: int) -> torch.Tensor:
        """Real image(s) -> (N, 3, R, R) in [-1, 1], prepared exactly as `noiseclr edit --image`
        prepares a file (upright, RGB, centre square, bicubic resize)."""
        items = image if isinstance(image, list) else [image]
        if not items:
            raise ImageError("image= is an empty list")
        out = []
        for item in items:
            if isinstance(item, str | Path):
                out.append(read_image_file(item, resolution))
                continue
            if isinstance(item, torch.Tensor):
                x = item[None] if item.ndim == 3 else item
                if x.ndim != 4 or tuple(x.shape[1:]) != (3, resolution, resolution):
                    raise ImageError(
                        f"a tensor image is (N, 3, {resolution}, {resolution}) in [-1, 1], "
                        f"got {tuple(item.shape)}"
                    )
                out.append(x.float().cpu())
                continue
            if isinstance(item, np.ndarray):
                item = _array_image(item)
            if not isinstance(item, Image.Image):
                raise ImageError(
                    f"image= takes a path, PIL image, array or tensor, got {type(item).__name__}"
                )
            pixels = square_image(item, resolution)
            out.append(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1)
        return torch.cat(out)


class NoiseCLRPipeline(_BankEditing, StableDiffusionPipeline):
    """Stable Diffusion with NoiseCLR direction banks: `pipe(prompt, edits=...)` gives the
    image `noiseclr edit` gives for the same seed or real image and the same edits."""

    _base = StableDiffusionPipeline
    _output = StableDiffusionPipelineOutput
    _second_positional = (int,)  # height

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        """As `_BankEditing.from_pretrained`; an SDXL folder or hub id (its model_index.json
        names an SDXL pipeline) gives a `NoiseCLRXLPipeline`, so one line loads either family."""
        name = str(pretrained_model_name_or_path)
        source = str(EMBEDDED[name]) if name in EMBEDDED else name
        hub = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}  # a private, pinned or offline repo
        try:
            sdxl = cls is NoiseCLRPipeline and pipeline_class(source, **hub) is StableDiffusionXLPipeline
        except (OSError, ValueError):  # no model_index.json to read: diffusers' own load says why
            sdxl = False
        if sdxl:
            return NoiseCLRXLPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def sega_arguments(self, edits: EditSpec, num_inference_steps: int) -> dict[str, Any]:
        """Keyword arguments that hand `edits` to diffusers' `SemanticStableDiffusionPipeline`.

        `editing_prompt_embeddings` is each direction's one-token prompt `<d_k>` through the text
        encoder (what the sampler's eps(x_t, d_k) sees), `edit_guidance_scale` / `reverse_editing_
        direction` the raw scale's size and sign, and `edit_warmup_steps` / `edit_cooldown_steps`
        the window in steps of this pipeline's scheduler at `num_inference_steps`. SEGA applies
        edits only under CFG (`guidance_scale > 1`; `prompt=""` for an unconditional image) and
        by default keeps the top 10% of each edit (`edit_threshold=0.9`) with momentum: with
        `edit_threshold=0.0, edit_momentum_scale=0.0` and one edit (or edits sharing a window)
        it gives the sampler's image.
        """
        parsed = self._edits(edits)
        if not parsed:
            raise EditError("sega_arguments needs at least one edit")
        vectors = torch.stack([e.vector for e in parsed]).to(self.device)
        with torch.no_grad():
            embeddings = encode_directions(self.text_encoder, self.tokenizer, vectors)[:-1]  # (E, L, H)
        schedule = type(self.scheduler).from_config(self.scheduler.config)  # SEGA steps with this one
        schedule.set_timesteps(num_inference_steps)
        timesteps = [int(t) for t in schedule.timesteps]
        return {
            "editing_prompt_embeddings": embeddings.to(self.unet.dtype),
            "reverse_editing_direction": [e.scale < 0 for e in parsed],
            "edit_guidance_scale": [abs(e.scale) for e in parsed],
            "edit_warmup_steps": [sum(t > e.t_high for t in timesteps) for e in parsed],
            "edit_cooldown_steps": [sum(t >= e.t_low for t in timesteps) for e in parsed],
        }


class NoiseCLRXLPipeline(_BankEditing, StableDiffusionXLPipeline):
    """SDXL with NoiseCLR direction banks (pairs of token embeddings, one per text encoder): the
    contract of `NoiseCLRPipeline` on `StableDiffusionXLPipeline`'s whole `__call__`."""

    _base = StableDiffusionXLPipeline
    _output = StableDiffusionXLPipelineOutput
    _second_positional = (str, list)  # prompt_2


def _array_image(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) uint8, or floats in [0, 1] (diffusers' "np" images) -> PIL."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"an array image is (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageError(f"an array image is uint8 or floats in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)
