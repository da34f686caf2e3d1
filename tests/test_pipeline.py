"""NoiseCLRPipeline, `noiseclr edit` and the endpoint give one image for one request; the SEGA hand-off."""

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from noiseclr.bank import DirectionBank
from noiseclr.data.images import read_image_file
from noiseclr.domains import shapes
from noiseclr.editing import sampler
from noiseclr.editing.pipeline import NoiseCLRPipeline
from noiseclr.errors import BankError, EditError, ImageError
from noiseclr.models.base import PRETRAINED_DIR
from records import bank_pipeline, cli_after

BANK = PRETRAINED_DIR / "banks" / "shapes"
TOLERANCE = 2 / 255
EDIT = {"bank": "shapes", "direction": 3, "scale": 1}  # the endpoint's form of "3=1"


@pytest.fixture(scope="module")
def pipe():
    return bank_pipeline()


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def endpoint_image(model, tmp_path, **request) -> np.ndarray:
    """The edit endpoint's engine (what a Serve replica runs) on one request: (H, W, 3) in [0, 1]."""
    import io

    from noiseclr.serving.config import ServeConfig
    from noiseclr.serving.engine import EditEngine
    from noiseclr.serving.schema import EditRequest

    engine = EditEngine(
        ServeConfig(banks={"shapes": str(BANK)}, device="cpu", labels_dir=str(tmp_path)), model
    )
    (png,) = engine.run([engine.prepare(EditRequest(**request))])
    assert isinstance(png, bytes), png
    return as_float(Image.open(io.BytesIO(png)).convert("RGB"))


def test_seed_edit_matches_the_cli_and_the_endpoint(pipe, shapes_model, tmp_path):
    """No prompt: all three edit an image of the bank's domain (its gallery prompt)."""
    cli = cli_after(tmp_path, BANK, "3=1", "--seed", "2", "--steps", "4")
    ours = pipe(edits={"3": 1.0}, seed=2, num_inference_steps=4).images[0]  # PIL, as diffusers
    assert ours.size == (64, 64)
    assert np.abs(as_float(ours) - cli).max() <= TOLERANCE
    served = endpoint_image(shapes_model, tmp_path, seed=2, steps=4, edits=[EDIT])
    assert np.abs(served - cli).max() <= TOLERANCE
    same = pipe(edits=["shapes:3=1"], seed=2, num_inference_steps=4, output_type="np").images[0]
    np.testing.assert_array_equal(np.asarray(ours), (same * 255).round().astype(np.uint8))  # dict = list
    plain = pipe(seed=2, num_inference_steps=4, output_type="np").images[0]
    assert np.abs(same - plain).max() > 0.05  # the edit does something: the comparison is not vacuous


def test_prompted_seed_edit_matches_the_cli(pipe, tmp_path):
    """With a prompt both use CFG at the model's default guidance (world.json's for shapes)."""
    prompt = "a red circle"
    cli = cli_after(tmp_path, BANK, "3=1", "--seed", "0", "--prompt", prompt, "--steps", "4")
    ours = pipe(prompt, edits={"3": 1.0}, seed=0, num_inference_steps=4, output_type="np").images[0]
    assert np.abs(ours - cli).max() <= TOLERANCE


def test_real_image_edit_matches_the_cli_and_the_endpoint(pipe, shapes_model, tmp_path):
    rendered = shapes.render(shapes.sample_scenes(1, seed=21))[0].permute(1, 2, 0).numpy()
    photo = Image.fromarray((rendered * 255).round().astype(np.uint8))
    photo.save(tmp_path / "real.png")
    cli = cli_after(tmp_path, BANK, "3=1", "--image", str(tmp_path / "real.png"), "--steps", "6")
    ours = pipe(edits="3=1", image=photo, num_inference_steps=6, output_type="np").images[0]
    assert np.abs(ours - cli).max() <= TOLERANCE
    upload = base64.b64encode((tmp_path / "real.png").read_bytes()).decode()
    served = endpoint_image(shapes_model, tmp_path, image=upload, steps=6, edits=[EDIT])
    assert np.abs(served - cli).max() <= TOLERANCE
    from_file = read_image_file(tmp_path / "real.png", 64)  # what the CLI feeds the inversion
    for given in (photo, np.asarray(photo), rendered, str(tmp_path / "real.png")):
        torch.testing.assert_close(NoiseCLRPipeline._pixels(given, 64), from_file, atol=0, rtol=0)
    assert np.abs(ours - as_float(photo)).max() > 0.05  # edited, not just reconstructed


def test_a_saved_diffusers_folder_loads_and_edits_alike(pipe, shapes_model, tmp_path):
    """The generic SD path: a folder save_pretrained wrote (no world.json, no embedded name)."""
    shapes_model.pipe.save_pretrained(tmp_path / "sd")
    other = NoiseCLRPipeline.from_pretrained(tmp_path / "sd")
    other.set_progress_bar_config(disable=True)
    other.load_bank(BANK)  # same weights: the bank's fingerprint check passes
    # No world.json there: the guidance default is SD's 7.5, so both are given the shapes model's.
    a = other(edits={"3": 1}, seed=1, num_inference_steps=4, guidance_scale=4.0, output_type="np").images
    b = pipe(edits={"3": 1}, seed=1, num_inference_steps=4, guidance_scale=4.0, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_unknown_direction_and_no_bank_are_clear_errors(pipe):
    with pytest.raises(BankError, match="'nope' does not exist in bank 'shapes'") as err:
        pipe(edits={"nope": 1.0}, num_inference_steps=2)
    assert "\n" not in str(err.value)
    with pytest.raises(BankError, match="direction 99 does not exist"):
        pipe(edits=["99=1"], num_inference_steps=2)
    with pytest.raises(EditError, match="no bank is loaded"):
        NoiseCLRPipeline(**pipe.components)(edits={"3": 1.0})
    with pytest.raises(EditError, match="without a prompt"):
        pipe(prompt="a shape", image=np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageError, match="path, PIL image, array or tensor"):
        pipe(image=3)
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number >= 1"):
        pipe(num_inference_steps=0)


def test_a_bank_of_another_width_is_refused_in_one_line(pipe):
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    bank = DirectionBank(torch.randn(2, width // 2), {"source": "other"}, name="narrow")
    with pytest.raises(BankError, match=f"{width // 2}-dim directions .* takes {width}-dim") as err:
        pipe.load_bank(bank)
    assert "\n" not in str(err.value)
    assert "narrow" not in pipe.banks
    alien = DirectionBank(torch.randn(2, width), {"source": "other", "fingerprint": "0"}, name="alien")
    with pytest.raises(BankError, match="was learnt on base model 'other'"):
        pipe.load_bank(alien)
    with pytest.raises(BankError, match="already loaded"):
        pipe.load_bank(BANK)


def test_sega_gets_the_same_directions(pipe):
    """diffusers' SEGA pipeline runs on the hand-off; with its thresholding and momentum off it
    gives the sampler's image, so the embeddings and windows are the ones the sampler uses."""
    from diffusers import SemanticStableDiffusionPipeline

    sega = SemanticStableDiffusionPipeline.from_pipe(pipe)
    sega.set_progress_bar_config(disable=True)
    x_T = sampler.seed_latents(pipe._model(), [0])
    edits = ["3=1", "5=-1"]  # the shipped bank's measured window (t <= 600) for both
    args = pipe.sega_arguments(edits, num_inference_steps=4)
    assert args["editing_prompt_embeddings"].shape[0] == 2
    assert args["reverse_editing_direction"] == [False, True]
    plain = dict(prompt="", guidance_scale=2.0, num_inference_steps=4, output_type="np")  # CFG on ""
    out = sega(latents=x_T.clone(), edit_threshold=0.0, edit_momentum_scale=0.0, **args, **plain).images
    ours = pipe("", edits=edits, latents=x_T, num_inference_steps=4, output_type="np").images  # no CFG
    assert np.abs(out - ours).max() <= TOLERANCE
    thresholded = sega(latents=x_T.clone(), **args, **plain).images  # SEGA's own defaults run too
    assert thresholded.shape == ours.shape and np.isfinite(thresholded).all()
