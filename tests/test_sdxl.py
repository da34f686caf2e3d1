"""SDXL's conditioning held to diffusers' own StableDiffusionXLPipeline, on the tiny SDXL stand-in
(models/standin.py: SDXL's classes and configs, two text encoders 32 and 48 wide): a direction
is a pair of token embeddings, one per encoder, encoded as diffusers encodes a textual-inversion
token loaded into both; sampling is the pipeline's own; NoiseCLR's step trains pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from noiseclr.conditioning import direction_deltas, encode_directions, encode_prompts, text_encoders, unet_eps
from noiseclr.models import standin
from noiseclr.models.base import DiffusionModel, fingerprint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl() -> DiffusionModel:
    pipe = standin.build_sdxl(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return DiffusionModel(pipe=pipe, source="sdxl-standin", fingerprint=fingerprint(pipe))


def unpack(pipe, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states, pooled, time ids) of packed SDXL context rows."""
    cfg = pipe.unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return context[:, :-1], context[:, -1, :pooled], context[:, -1, pooled : pooled + 6]


def test_a_prompt_and_the_empty_prompt_encode_as_diffusers_encode_them(sdxl):
    pipe = sdxl.pipe
    ctx = encode_prompts(text_encoders(pipe), ["a red cat", ""], torch.device("cpu"))
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    states, ours_pooled, ids = unpack(pipe, ctx)
    torch.testing.assert_close(states[:1], embeds)
    torch.testing.assert_close(ours_pooled[:1], pooled)
    # "" is zeros: force_zeros_for_empty_prompt, as SDXL's pipeline makes its negative
    assert torch.equal(states[1:], negative) and torch.equal(ours_pooled[1:], negative_pooled)
    side = sdxl.resolution
    want = pipe._get_add_time_ids(
        (side, side), (0, 0), (side, side), dtype=ids.dtype, text_encoder_projection_dim=pooled.shape[-1]
    )
    assert torch.equal(ids, want.expand(2, -1))


def test_a_direction_is_a_pair_encoded_as_diffusers_loads_it_into_both_encoders(sdxl, tmp_path):
    """The pair's halves loaded with diffusers' load_textual_inversion (clip_l into the first
    encoder, clip_g into the second, SDXL's usual way) give the same states as encode_directions;
    a direction of one encoder's width is refused."""
    pipe = standin.build_sdxl(seed=0)  # its own copy: loading tokens changes the tokenizers
    enc = text_encoders(pipe)
    widths = enc.widths
    assert widths == (32, 48)
    g = torch.Generator().manual_seed(1)
    pair = torch.randn(1, sum(widths), generator=g)
    ours = encode_directions(enc, None, pair)  # row 0: "<d0>", row 1: ""
    clip_l, clip_g = pair[:, : widths[0]], pair[:, widths[0] :]
    pipe.load_textual_inversion(
        clip_l, token="<d0>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        clip_g, token="<d0>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    embeds, _, pooled, _ = pipe.encode_prompt("<d0>", device="cpu", do_classifier_free_guidance=False)
    states, ours_pooled, _ = unpack(pipe, ours)
    torch.testing.assert_close(states[:1], embeds)
    torch.testing.assert_close(ours_pooled[:1], pooled)
    with pytest.raises(ValueError, match=r"directions 48 wide; this SDXL model.s are 80"):
        encode_directions(enc, None, clip_g)


def test_sampling_without_edits_is_diffusers_sdxl_pipeline(sdxl):
    """The sampler's loop (CFG on a prompt, the empty prompt as SDXL's zeros) on the folder's
    Euler scheduler gives the latents StableDiffusionXLPipeline gives from the same x_T."""
    from noiseclr.editing import sampler

    pipe = sdxl.pipe
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = sampler.sample(sdxl, x_T, [], prompt="a red cat", guidance_scale=5.0, steps=4)
    theirs = StableDiffusionXLPipeline(**pipe.components)(
        "a red cat", latents=x_T.clone(), guidance_scale=5.0, num_inference_steps=4, output_type="latent",
        height=sdxl.resolution, width=sdxl.resolution,
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_noiseclr_deltas_on_sdxl_are_the_unet_calls_written_out(sdxl):
    """delta_k = eps(x_t, d_k) - eps(x_t, "") in one batched call, against one UNet call per
    direction with diffusers' own added conditioning."""
    pipe = sdxl.pipe
    enc = text_encoders(pipe)
    g = torch.Generator().manual_seed(2)
    dirs = torch.randn(3, sum(enc.widths), generator=g)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 900])
    with torch.no_grad():
        deltas = direction_deltas(pipe.unet, enc, None, dirs, x_t, t)
        ctx = encode_directions(enc, None, dirs)
        empty = unet_eps(pipe.unet, x_t, t, ctx[-1:].expand(2, -1, -1))
        for k in range(3):
            eps = unet_eps(pipe.unet, x_t, t, ctx[k : k + 1].expand(2, -1, -1))
            torch.testing.assert_close(deltas[:, k], eps - empty, atol=1e-5, rtol=1e-4)
    assert deltas.abs().amax() > 0  # the pairs move the noise


def test_discovery_trains_pairs_and_an_edit_moves_the_sdxl_image(sdxl, tmp_path):
    """A few NoiseCLR steps on SDXL latents: finite losses, pairs that moved from their start,
    both halves trained; editing with a learnt pair changes the sample."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state
    from noiseclr.editing import sampler

    cfg = DiscoveryConfig.of(
        k=3, negatives=2, batch=2, n_images=4, steps=3, lr=0.05, device="cpu", evaluate=False
    )
    state = initial_state(cfg, sdxl)
    assert state.directions.shape == (3, 80)
    start = state.directions.clone()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    trainer = DiscoveryTrainer(cfg, sdxl, latents, state)
    final = trainer.fit(tmp_path)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in final.history)
    moved = (final.directions - start).abs()
    assert moved[:, :32].amax() > 0 and moved[:, 32:].amax() > 0
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = sampler.sample(sdxl, x_T, [], steps=3)
    edit = sampler.Edit(final.directions[0] * 4, 1.0, 1000, 0, label="d0")
    edited = sampler.sample(sdxl, x_T, [edit], steps=3)
    assert (edited - plain).abs().amax() > 1e-4


def sdxl_bank(model: DiffusionModel, name: str = "px"):
    from noiseclr.bank import DirectionBank

    pairs = torch.randn(3, sum(model.token_widths), generator=torch.Generator().manual_seed(6))
    return DirectionBank(pairs, model.bank_record(), name=name)


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "comfyui", "kohya"])
def test_an_sdxl_bank_exports_clip_l_and_clip_g_that_diffusers_loads_into_both_encoders(sdxl, tmp_path, fmt):
    """One file per direction holding clip_l and clip_g (SDXL's embedding layout, which every tool
    reads); loaded through diffusers' load_textual_inversion into both encoders, a direction's
    token encodes as the bank's pair does. A .pt export of an SDXL bank is refused."""
    from safetensors.torch import load_file

    from noiseclr.errors import ConfigError
    from noiseclr.export import export_bank, load_exported

    bank = sdxl_bank(sdxl)
    paths = export_bank(bank, tmp_path / fmt, fmt, text_encoder=text_encoders(sdxl.pipe))
    for path, pair in zip(paths, bank.directions, strict=True):
        halves = load_file(str(path))
        assert set(halves) == {"clip_l", "clip_g"} and halves["clip_l"].shape == (1, 32)
        torch.testing.assert_close(torch.cat([halves["clip_l"], halves["clip_g"]], dim=1)[0], pair)
    pipe = standin.build_sdxl(seed=0)  # a fresh copy: loading adds tokens
    tokens = load_exported(pipe, tmp_path / fmt)
    embeds, _, pooled, _ = pipe.encode_prompt(tokens[1], device="cpu", do_classifier_free_guidance=False)
    states, ours_pooled, _ = unpack(
        pipe, encode_directions(text_encoders(sdxl.pipe), None, bank.directions[1:2])
    )
    torch.testing.assert_close(states[:1], embeds)
    torch.testing.assert_close(ours_pooled[:1], pooled)
    with pytest.raises(ConfigError, match="SDXL embedding is one safetensors file"):
        export_bank(bank, tmp_path / "pt", fmt, pt=True)


def test_a_bank_of_one_family_refuses_a_model_of_the_other_in_one_line(sdxl, shapes_model):
    from noiseclr.errors import BankError

    with pytest.raises(BankError, match="learnt on an SDXL model; 'shapes' is SD"):
        sdxl_bank(sdxl).check_model(shapes_model)
    from noiseclr.bank import DirectionBank

    sd = DirectionBank.load(ROOT / "platform/noiseclr/pretrained/banks/shapes")
    with pytest.raises(BankError, match="learnt on an SD model; 'sdxl-standin' is SDXL"):
        sd.check_model(sdxl)


def test_the_commands_run_on_an_sdxl_folder(tmp_path):
    """discover, measure, edit (a seed with a prompt, and a real image), gallery and export, as a
    user types them, on an SDXL folder (the stand-in written in SDXL base 1.0's layout)."""
    import json

    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from noiseclr.cli import app
    from noiseclr.domains import shapes

    folder = standin.write_sdxl(tmp_path / "sdxl")
    data = tmp_path / "faces"
    data.mkdir()
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(8, seed=5), 96))):
        Image.fromarray(px).save(data / f"f{i}.png")
    job = {
        "kind": "discover", "model": str(folder), "name": "faces",
        "data": {"uri": str(data), "n_images": 8},
        "method": {"k": 4, "negatives": 2, "batch": 4}, "optim": {"steps": 3},
        "run": {"device": "cpu", "checkpoint_every": 3}, "evaluation": {"images": 2, "steps": 2},
        "gallery": {"prompt": "a photo of a face", "seeds": 1, "steps": 2},
    }  # fmt: skip
    (tmp_path / "faces.yaml").write_text(yaml.safe_dump(job))
    out, model = tmp_path / "out", str(folder)
    bank, photo = str(out / "bank"), str(data / "f0.png")
    commands = [
        ["discover", "--config", str(tmp_path / "faces.yaml"), "--out", str(out)],
        ["measure", bank, "--model", model, "--prompt", "a face", "--n", "2", "--steps", "3"],
        ["edit", "0=1", "--bank", bank, "--model", model, "--prompt", "a face", "--seed", "3",
         "--out", str(tmp_path / "edit.png"), "--steps", "3"],
        ["edit", "0=1", "2=-1", "--bank", bank, "--model", model, "--image", photo,
         "--out", str(tmp_path / "real.png"), "--steps", "3"],
        ["gallery", bank, "--model", model, "--prompt", "a face", "--steps", "3", "--seeds", "1"],
        ["export", bank, "--out", str(tmp_path / "ti"), "--format", "a1111", "--model", model],
    ]  # fmt: skip
    runner = CliRunner()
    for words in commands:
        result = runner.invoke(app, words)
        assert result.exit_code == 0, f"{words}\n{result.output}"
    # merge: the bank with a copy of itself under another name (the stand-in's random weights
    # give no live directions, so all are kept; with --keep-all none is dropped)
    other = tmp_path / "other"
    shutil.copytree(out / "bank", other)
    record = json.loads((other / "bank.json").read_text())
    (other / "bank.json").write_text(json.dumps({**record, "name": "faces2"}))
    merged = tmp_path / "merged"
    words = ["merge", bank, str(other), "--out", str(merged), "--keep-all", "--model", model,
             "--n", "2", "--steps", "2", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    from noiseclr.bank import DirectionBank

    both = DirectionBank.load(merged)
    assert both.family == "sdxl" and both.directions.shape == (8, 80) and both.scores is not None
    meta = json.loads((out / "bank" / "bank.json").read_text())
    assert meta["base_model"]["family"] == "sdxl" and meta["base_model"]["widths"] == [32, 48]
    for png in ("edit.png", "real.png"):  # before and after, 64 px each, with their labels
        assert Image.open(tmp_path / png).size[1] > 64
    assert json.loads((tmp_path / "ti" / "bank-export.json").read_text())["widths"] == [32, 48]


def test_direction_norm_vocab_holds_each_half_at_its_encoders_token_norm(sdxl, tmp_path):
    """`direction_norm: vocab` on SDXL: the first encoder's half of every pair at its table's mean
    token norm, the second's at its own, while training and in the bank."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state
    from noiseclr.workflows.discover import bank_from_state

    enc = text_encoders(sdxl.pipe)
    norms = [e.get_input_embeddings().weight.detach().norm(dim=1).mean() for e in enc.encoders]
    assert abs(float(norms[0] - norms[1])) > 1e-3  # two norms: one norm for the pair would not do
    cfg = DiscoveryConfig.of(
        k=3, negatives=2, batch=2, n_images=4, steps=3, lr=0.05, device="cpu", evaluate=False,
        direction_norm="vocab",
    )  # fmt: skip
    state = initial_state(cfg, sdxl)
    with torch.no_grad():
        state.directions.mul_(torch.tensor([[3.0], [1.0], [0.5]]))  # off the norms
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    final = DiscoveryTrainer(cfg, sdxl, latents, state).fit(tmp_path)
    bank = bank_from_state(cfg, sdxl, final, {})
    first, second = bank.directions.split(list(enc.widths), dim=1)
    torch.testing.assert_close(first.norm(dim=1), norms[0].expand(3))
    torch.testing.assert_close(second.norm(dim=1), norms[1].expand(3))


def test_the_random_floor_of_an_sdxl_bank_matches_each_halfs_norm(sdxl):
    """The random bank every measurement compares against: an SDXL pair's halves at the norms of
    the measured bank's halves (one norm for the pair would scale them as no encoder sees them)."""
    from noiseclr.evaluation.evaluate import random_bank

    bank = sdxl_bank(sdxl)
    bank.directions[:, 32:] *= 5  # halves of different norms
    floor = random_bank(sdxl, bank)
    for half in (slice(0, 32), slice(32, 80)):
        torch.testing.assert_close(
            floor.directions[:, half].norm(dim=1), bank.directions[:, half].norm(dim=1)
        )
