"""Base diffusion models: `load_model` gives a `DiffusionModel` (a diffusers pipeline plus its
identity) for the embedded shapes model, a diffusers folder, or a hub id. The embedded model's
own architecture, tokenizer, training recipe and quality bar are in `noiseclr.models.shapes`."""

from noiseclr.errors import ModelLoadError
from noiseclr.models.base import DiffusionModel, fingerprint, load_model, resolve_device
from noiseclr.utils.precision import resolve_dtype

__all__ = ["DiffusionModel", "ModelLoadError", "fingerprint", "load_model", "resolve_device", "resolve_dtype"]
