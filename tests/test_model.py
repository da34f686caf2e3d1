"""The committed embedded model, the loader, and seeded generation."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from noiseclr.models.base import EMBEDDED, ModelLoadError, load_model
from noiseclr.models.generate import generate
from noiseclr.models.shapes.quality import QUALITY_BAR, evaluate_quality, vae_roundtrip_quality

FOLDER = EMBEDDED["shapes"]


def test_committed_weights_load_with_diffusers_itself():
    pipe = StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor != 1.0  # set by the recipe from the latents' spread
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    assert all(not f.name.endswith((".bin", ".pt", ".ckpt")) for f in FOLDER.rglob("*"))


def recorded_quality() -> dict[str, float]:
    return json.loads((FOLDER / "recipe.json").read_text())["metrics"]["quality"]


def test_model_card_states_the_measured_quality():
    quality = recorded_quality()
    card = (FOLDER / "README.md").read_text()
    for k in QUALITY_BAR:
        assert f"| {k} | {quality[k]:.3f} |" in card
    assert f"Meets the bar: {all(quality[k] >= v for k, v in QUALITY_BAR.items())}" in card


def test_vae_round_trip_keeps_what_the_record_says(shapes_model):
    # The decoder decides the ceiling for shape (blurred corners read as a circle); a VAE
    # swapped for another, or one decoding at the wrong scale, falls far below the record.
    metrics = json.loads((FOLDER / "recipe.json").read_text())["metrics"]
    live = vae_roundtrip_quality(shapes_model.pipe, n=64, seed=7)
    for k in ("shape", "hue", "position", "one_object"):
        assert live[k] >= metrics["vae_roundtrip"][k] - 0.1, (k, live, metrics["vae_roundtrip"])
    card = (FOLDER / "README.md").read_text()
    assert f"shape {metrics['vae_roundtrip']['shape']:.3f}" in card


def test_generations_follow_held_out_captions_as_recorded(shapes_model):
    # 48 fresh images (other seeds than the card's 256) scored live: a broken scheduler,
    # tokenizer or loader drops every figure to chance, far outside the sampling slack.
    live = evaluate_quality(shapes_model.pipe, n=48, seed=99, guidance_scale=4.0, steps=25, progress=False)
    for k, recorded in recorded_quality().items():
        assert live[k] >= recorded - 0.2, (k, live, recorded)
    assert live["hue"] > 0.5 and live["one_object"] > 0.6  # far above chance (1/6 for hue)


def test_seeded_generation_is_deterministic_and_batch_independent(shapes_model):
    prompt = "a large red circle at top left on a dark plain background"
    a = generate(shapes_model, prompt, n=3, seed=0, steps=10, progress=False)
    b = generate(shapes_model, prompt, n=3, seed=0, steps=10, batch_size=1, progress=False)
    c = generate(shapes_model, prompt, n=3, seed=1, steps=10, progress=False)
    assert a.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - c).max() > 0.05


def test_fingerprint_identifies_the_model(shapes_model):
    again = load_model("shapes")
    assert again.fingerprint == shapes_model.fingerprint
    with torch.no_grad():
        again.pipe.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    from noiseclr.models.base import fingerprint

    assert fingerprint(again.pipe) != shapes_model.fingerprint


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'shapez'"):
        load_model("shapez")


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_model(str(tmp_path))


def test_broken_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_gives_a_clear_error():
    with pytest.raises(ModelLoadError, match="network access"):
        load_model("nobody-here/no-such-model")


def test_prompt_with_unknown_words(shapes_model):
    with pytest.raises(ValueError, match=r"does not know.*'cat'"):
        generate(shapes_model, "a red cat", n=1, progress=False)


def test_a_saved_copy_loads_from_a_folder(shapes_model, tmp_path):
    shapes_model.pipe.save_pretrained(tmp_path / "copy")
    again = load_model(str(tmp_path / "copy"))
    assert again.fingerprint == shapes_model.fingerprint
    assert again.world is None  # a plain diffusers folder: no world, any prompt goes


# --- shapes-xl: the shapes world in SDXL's architecture -------------------------------------

XL = EMBEDDED["shapes-xl"]


def test_the_sdxl_model_loads_with_diffusers_itself_and_its_card_states_its_quality():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(XL)
    widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == sum(widths)
    assert sum(f.stat().st_size for f in XL.rglob("*") if f.is_file()) <= 25 * 2**20
    record = json.loads((XL / "recipe.json").read_text())
    quality, card = record["metrics"]["quality"], (XL / "README.md").read_text()
    assert record["config"]["sdxl"] and record["metrics"]["meets_bar"]
    for k in QUALITY_BAR:
        assert f"| {k} | {quality[k]:.3f} |" in card and quality[k] >= QUALITY_BAR[k]
    assert "SDXL-architecture" in card and "Meets the bar: True" in card


def test_the_sdxl_model_follows_held_out_captions_and_uses_its_second_encoder():
    from noiseclr.conditioning import encode_prompts, text_encoders, unet_eps

    model = load_model("shapes-xl", device="cpu")
    assert model.family == "sdxl" and model.world is not None
    live = evaluate_quality(model.pipe, n=48, seed=99, guidance_scale=4.0, steps=25, progress=False)
    recorded = json.loads((XL / "recipe.json").read_text())["metrics"]["quality"]
    for k, value in recorded.items():
        assert live[k] >= value - 0.2, (k, live, value)
    # what the fine-tune taught: the second encoder's states and pooled output now count
    enc = text_encoders(model.pipe)
    ctx = encode_prompts(enc, ["a large red circle at top left on a dark plain background"], model.device)
    first, pooled = enc.widths[0], model.pipe.text_encoder_2.config.projection_dim
    without = ctx.clone()
    without[:, :-1, first:] = 0  # the second encoder's columns
    without[:, -1, :pooled] = 0  # its pooled output
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    unet = model.pipe.unet
    with torch.no_grad():
        change = (unet_eps(unet, x, t, ctx) - unet_eps(unet, x, t, without)).abs().mean()
    assert change > 0.01
