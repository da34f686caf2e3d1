"""SDXL base models, first piece: the SDXL stand-in (`noiseclr.models.standin.write_sdxl`: SDXL
base 1.0's folder, classes and configs, tiny random weights) is what diffusers takes for SDXL,
and `load_model` loads it as SDXL (the family read from its model_index.json), with its own
scheduler and a fingerprint that covers what only SDXL has, while every SD model keeps the
fingerprint it had before SDXL was supported.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from noiseclr.errors import ModelLoadError
from noiseclr.models.base import _arch, fingerprints, load_model, scheduler_like
from noiseclr.models.standin import EOS, SDXL_PAD, SDXL_SCHEDULER, write_sdxl


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    return write_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def sdxl_model(sdxl_folder):
    return load_model(str(sdxl_folder), device="cpu")


def test_the_standin_is_laid_out_and_configured_as_sdxl_base(sdxl_folder):
    index = json.loads((sdxl_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert "image_encoder" not in index and "feature_extractor" not in index
    scheduler = json.loads((sdxl_folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.pop("_class_name") == "EulerDiscreteScheduler"
    assert {k: v for k, v in scheduler.items() if k != "_diffusers_version"} == SDXL_SCHEDULER
    for name in ("tokenizer", "tokenizer_2"):  # the slow tokenizer's files, as SDXL ships them
        files = sorted(p.name for p in (sdxl_folder / name).iterdir())
        assert files == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer.pad_token == EOS and pipe.tokenizer_2.pad_token == SDXL_PAD == "!"
    width, width_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert width != width_2 and pipe.text_encoder_2.config.projection_dim == width_2
    unet = pipe.unet.config
    assert unet.cross_attention_dim == width + width_2 and unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == width_2 + 6 * unet.addition_time_embed_dim
    assert len(set(unet.transformer_layers_per_block)) > 1  # a depth per block, as SDXL's 1, 2, 10
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast is True
    assert pipe.vae_scale_factor == 8 and unet.sample_size * pipe.vae_scale_factor == 64


# diffusers' EulerDiscreteScheduler calls np.array on a tensor with numpy 2 (its line, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")
def test_diffusers_generates_from_it_with_a_prompt(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    out = pipe(
        "a photo of a cat wearing a red hat",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1


def test_load_model_loads_it_as_sdxl_with_its_own_scheduler(sdxl_model, sdxl_folder):
    assert isinstance(sdxl_model.pipe, StableDiffusionXLPipeline) and sdxl_model.family == "sdxl"
    assert sdxl_model.resolution == 64
    assert isinstance(sdxl_model.pipe.scheduler, EulerDiscreteScheduler)
    saved = json.loads((sdxl_folder / "scheduler" / "scheduler_config.json").read_text())
    loaded = sdxl_model.pipe.scheduler.config
    assert {k: loaded[k] for k in SDXL_SCHEDULER} == {k: saved[k] for k in SDXL_SCHEDULER}
    assert sdxl_model.pipe.config.force_zeros_for_empty_prompt is True
    assert sdxl_model.identifies(sdxl_model.fingerprint)
    # No SDXL bank predates the schedule in the fingerprint: only the full one names it.
    assert sdxl_model.legacy_fingerprint == sdxl_model.fingerprint


def test_the_fingerprint_is_stable_across_loads_and_differs_between_seeds(sdxl_model, sdxl_folder, tmp_path):
    assert load_model(str(sdxl_folder), device="cpu").fingerprint == sdxl_model.fingerprint
    other = load_model(str(write_sdxl(tmp_path / "seed1", seed=1)), device="cpu")
    assert other.family == "sdxl" and other.fingerprint != sdxl_model.fingerprint


def test_the_fingerprint_covers_text_encoder_2_and_the_padding(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    before = fingerprints(pipe)
    with torch.no_grad():
        pipe.text_encoder_2.text_projection.weight.mul_(2)  # the pooled text_embeds the UNet takes
    assert fingerprints(pipe)[0] != before[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    pipe.tokenizer_2.pad_token = EOS  # padded positions are cross-attended: other images
    assert fingerprints(pipe)[0] != before[0]


def test_cast_keeps_the_fingerprint_of_the_weights_as_stored(sdxl_model, sdxl_folder):
    half = load_model(str(sdxl_folder), device="cpu", dtype=torch.bfloat16)
    assert half.fingerprint == sdxl_model.fingerprint
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(half.pipe, name).dtype == torch.bfloat16


def test_an_sdxl_folder_without_its_first_text_encoder_is_refused(sdxl_folder, tmp_path):
    refiner = Path(shutil.copytree(sdxl_folder, tmp_path / "refiner"))  # as SDXL's refiner is laid out
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    for name in ("text_encoder", "tokenizer"):
        shutil.rmtree(refiner / name)
    with pytest.raises(ModelLoadError, match="without the first text encoder"):
        load_model(str(refiner), device="cpu")


def _fingerprints_before_sdxl(pipe) -> tuple[str, str]:
    """`fingerprints` as it was before SDXL was supported, line for line: what the banks of every
    SD model recorded."""
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
    legacy = h.hexdigest()[:16]
    schedule = _arch(scheduler_like(DDIMScheduler, pipe.scheduler.config).config)
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16], legacy


def test_sd_models_are_family_sd_with_the_fingerprints_of_before(sd15_model, shapes_model):
    for model in (sd15_model, shapes_model):
        assert model.family == "sd" and not isinstance(model.pipe, StableDiffusionXLPipeline)
        assert (model.fingerprint, model.legacy_fingerprint) == _fingerprints_before_sdxl(model.pipe)
