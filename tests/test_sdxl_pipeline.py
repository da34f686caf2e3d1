"""NoiseCLRXLPipeline: the SD pipeline's contract on StableDiffusionXLPipeline, on the tiny SDXL
stand-in. `NoiseCLRPipeline.from_pretrained` of an SDXL folder gives it; an edit gives the image
`noiseclr edit` gives (a seed with or without a prompt, a real image); inside SDXL's own loop
an edit row takes its pair's pooled embedding and its image's size ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from noiseclr.bank import DirectionBank
from noiseclr.conditioning import encode_directions, text_encoders, unpack
from noiseclr.domains import shapes
from noiseclr.editing.pipeline import NoiseCLRPipeline, NoiseCLRXLPipeline
from noiseclr.errors import BankError
from noiseclr.models.base import PRETRAINED_DIR, load_model
from noiseclr.models.generate import image_seed
from noiseclr.models.standin import write_sdxl
from records import cli_after

TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def bank_dir(folder, tmp_path_factory):
    """Random pairs of the folder's widths, recorded as learnt on it."""
    model = load_model(str(folder), device="cpu")
    pairs = 2 * torch.randn(3, sum(model.token_widths), generator=torch.Generator().manual_seed(6))
    bank = DirectionBank(pairs, model.bank_record(), name="px")
    return bank.save(tmp_path_factory.mktemp("bank") / "px")


@pytest.fixture(scope="module")
def pipe(folder, bank_dir):
    pipe = NoiseCLRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_bank(bank_dir)
    return pipe


# diffusers' EulerDiscreteScheduler calls np.array on a tensor with numpy 2 (its line, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")


def test_an_sdxl_folder_loads_as_the_sdxl_pipeline_and_edits_as_the_cli(pipe, folder, bank_dir, tmp_path):
    assert type(pipe) is NoiseCLRXLPipeline and isinstance(pipe, StableDiffusionXLPipeline)
    # a prompt, under CFG at SDXL's default guidance (diffusers' 5.0: the folder has no world.json)
    cli = cli_after(tmp_path, bank_dir, "0=1", "--model", str(folder), "--prompt", "a red cat",
                    "--seed", "3", "--steps", "3")  # fmt: skip
    ours = pipe("a red cat", edits={"0": 1.0}, seed=3, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(ours - cli).max() <= TOLERANCE
    # no prompt: the CLI's unconditional image (SDXL's empty prompt is zeros), no CFG
    cli = cli_after(tmp_path, bank_dir, "0=1", "--model", str(folder), "--seed", "3", "--steps", "3")
    bare = pipe(edits=["px:0=1"], seed=3, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(bare - cli).max() <= TOLERANCE
    # without edits the call is StableDiffusionXLPipeline's own, and the edit does something
    plain = pipe("a red cat", seed=3, num_inference_steps=3, output_type="np").images[0]
    theirs = StableDiffusionXLPipeline(**pipe.components)(
        "a red cat", num_inference_steps=3, output_type="np",
        generator=[torch.Generator().manual_seed(image_seed(3))],
    ).images[0]  # fmt: skip
    np.testing.assert_array_equal(plain, theirs)
    assert np.abs(ours - plain).max() > 0.05


def test_edit_rows_take_their_pairs_pooled_embedding_and_the_callers_size_ids(pipe):
    """Under SDXL's size conditioning with other negative sizes, the rows an edit adds to each
    UNet call carry the direction pair's pooled text embedding (SDXL's added conditioning of that
    token) and the image's own size ids (the text rows'), as does the empty row they are taken
    against; the unconditional rows keep their negative sizes."""
    seen: list[dict] = []

    def capture(module, args, kwargs):
        seen.append({k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()})

    pipe("a red cat", edits={"1": 1.0}, seed=0, num_inference_steps=1, output_type="latent")  # hook first
    handle = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe("a red cat", edits={"1": 1.0, "2": -1.0}, seed=0, num_inference_steps=2, output_type="latent",
             original_size=(48, 48), target_size=(64, 48), negative_original_size=(32, 32),
             negative_target_size=(64, 48))  # fmt: skip
    finally:
        handle.remove()
    assert len(seen) == 2
    enc = text_encoders(pipe)
    bank = pipe.banks["px"].directions
    _, own = unpack(pipe.unet, encode_directions(enc, None, bank[1:3]))  # 2 pairs, then ""
    for added in seen:
        ids, embeds = added["time_ids"], added["text_embeds"]
        assert ids.shape[0] == embeds.shape[0] == 5  # uncond, text, two direction rows, the empty row
        assert ids[0].tolist() == [32, 32, 0, 0, 64, 48] and ids[1].tolist() == [48, 48, 0, 0, 64, 48]
        assert torch.equal(ids[2:], ids[1:2].expand(3, -1))  # the image's sizes, not the negative ones
        torch.testing.assert_close(embeds[2:], own["text_embeds"])


def test_a_real_image_edits_as_the_cli(pipe, folder, bank_dir, tmp_path):
    rendered = shapes.render(shapes.sample_scenes(1, seed=21))[0].permute(1, 2, 0).numpy()
    photo = Image.fromarray((rendered * 255).round().astype(np.uint8))
    photo.save(tmp_path / "real.png")
    cli = cli_after(tmp_path, bank_dir, "0=1", "--model", str(folder), "--image", str(tmp_path / "real.png"),
                    "--steps", "3")  # fmt: skip
    ours = pipe(edits="0=1", image=photo, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(ours - cli).max() <= TOLERANCE
    out = pipe(edits="0=1", image=photo, num_inference_steps=3, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0][0].size == (64, 64)  # SDXL's tuple


def test_sdxl_arguments_pass_through_and_an_sd_bank_is_refused_in_one_line(pipe, folder, tmp_path):
    # prompt_2 by position, as StableDiffusionXLPipeline takes it; a second prompt changes the image
    a = pipe("a red cat", "a blue dog", edits={"0": 1.0}, seed=1, num_inference_steps=2, output_type="np")
    b = pipe("a red cat", edits={"0": 1.0}, seed=1, num_inference_steps=2, output_type="np")
    assert np.abs(a.images - b.images).max() > 1e-3
    with pytest.raises(TypeError, match="pass edits by name"):
        pipe("a red cat", {"0": 1.0})
    with pytest.raises(BankError, match=r"learnt on an SD model; .* is SDXL") as err:
        pipe.load_bank(PRETRAINED_DIR / "banks" / "shapes", strict=False)
    assert "\n" not in str(err.value)
    # saved and loaded again: the same class, the bank's fingerprint check passes
    pipe.save_pretrained(tmp_path / "saved")
    again = NoiseCLRPipeline.from_pretrained(tmp_path / "saved")
    assert type(again) is NoiseCLRXLPipeline
    again.load_bank(pipe.banks["px"])
    # a plain SDXL folder: diffusers' own class, which load_model reads as SDXL
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert load_model(str(tmp_path / "saved"), device="cpu").family == "sdxl"


def test_sdxl_vae_runs_in_fp32_when_the_model_is_fp16(folder, bank_dir, sd15_model):
    """SDXL's VAE overflows in fp16 (force_upcast). The sampler, inversion and latent encoding use
    an fp32 copy of it (`pixel_vae`, one per pipeline), so `pipe.vae` is never flipped in place
    under concurrent calls and diffusers' own call (which upcasts it itself) still works; SD's
    VAE, which SD's pipeline never upcasts, is used as it is."""
    from noiseclr.models.generate import generate

    model = load_model(str(folder), device="cpu", dtype=torch.float16)
    assert model.pipe.unet.dtype == model.pipe.vae.dtype == torch.float16  # diffusers' layout
    assert model.pixel_vae.dtype == torch.float32 and model.pixel_vae is model.pixel_vae
    images = generate(model, "a red cat", n=1, steps=2, progress=False)  # diffusers' call, fp16
    assert np.isfinite(images).all()
    assert sd15_model.pixel_vae is sd15_model.pipe.vae
    half = NoiseCLRPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    half.set_progress_bar_config(disable=True)
    half.load_bank(bank_dir)
    rendered = shapes.render(shapes.sample_scenes(1, seed=2))[0].permute(1, 2, 0).numpy()
    half(edits="0=1", image=rendered, num_inference_steps=2, output_type="np")
    copy = half.__dict__["_noiseclr_vae32"][1]
    seen = []
    for name in ("encoder", "decoder"):
        getattr(copy, name).register_forward_pre_hook(
            lambda m, a, n=name: seen.append((n, a[0].dtype, half.vae.dtype))
        )
    out = half(edits="0=1", image=rendered, num_inference_steps=2, output_type="np").images
    for part in ("encoder", "decoder"):  # in fp32, while the pipeline's own VAE stays fp16
        assert (part, torch.float32, torch.float16) in seen
    assert np.isfinite(out).all() and half.vae.dtype == torch.float16


def test_a_hub_id_in_a_local_cache_loads_as_sdxl_offline(folder, tmp_path):
    """A hub id read from a Hugging Face cache with local_files_only (offline, or a private repo
    fetched before): the family is read through the same options, so the SDXL repo loads as
    NoiseCLRXLPipeline, not as an SD pipeline missing its second encoder."""
    import shutil

    revision = "0" * 40
    repo = tmp_path / "cache" / "models--someone--sdxl-standin"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pipe = NoiseCLRPipeline.from_pretrained(
        "someone/sdxl-standin", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert type(pipe) is NoiseCLRXLPipeline and pipe.text_encoder_2 is not None


def test_push_to_hub_uploads_the_folder_once_it_names_diffusers_class(pipe, tmp_path, monkeypatch):
    """The hub is out of reach here: its three calls (create the repo, read its card, upload)
    are replaced by recorders. What is checked is ours: the folder uploaded already names
    StableDiffusionXLPipeline, as the local folder does."""
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    import noiseclr.editing.pipeline as module

    monkeypatch.setattr(module, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(module, "load_or_create_model_card", lambda repo_id, **kw: ModelCard("# card"))
    uploaded = {}

    def upload(folder, repo_id, **kw):
        index = json.loads((tmp_path / "hub" / "model_index.json").read_text())
        uploaded.update(folder=folder, repo=repo_id, cls=index["_class_name"], pr=kw["create_pr"])

    monkeypatch.setattr(pipe, "_upload_folder", upload)
    pipe.save_pretrained(tmp_path / "hub", push_to_hub=True, repo_id="sdxl-edits")
    want = {"folder": str(tmp_path / "hub"), "repo": "me/sdxl-edits", "pr": False}
    assert uploaded == {**want, "cls": "StableDiffusionXLPipeline"}
