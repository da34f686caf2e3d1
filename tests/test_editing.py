"""The editing sampler, inversion, composition of banks, galleries, and the discover CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank
from noiseclr.cli import app
from noiseclr.domains import shapes
from noiseclr.editing import sampler
from noiseclr.editing.gallery import write_gallery
from noiseclr.errors import BankError
from noiseclr.models.generate import generate
from records import scores


def make_bank(model, name: str, k: int = 3, seed: int = 0) -> DirectionBank:
    hidden = model.pipe.text_encoder.config.hidden_size
    table = model.pipe.text_encoder.get_input_embeddings().weight.detach()
    vectors = (
        torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed)) * table.norm(dim=1).mean() / 11
    )
    return DirectionBank(vectors, {"source": model.source, "fingerprint": model.fingerprint}, name=name)


def test_no_edit_reproduces_the_diffusers_pipeline(shapes_model):
    prompt = "a small green square at bottom right on a light plain background"
    expected = generate(shapes_model, prompt, n=1, seed=4, steps=10, progress=False)
    ours = sampler.edit_generated(shapes_model, prompt, [4], [], steps=10)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_one_batched_unet_call_per_denoising_step(shapes_model):
    a, b = make_bank(shapes_model, "a"), make_bank(shapes_model, "b", seed=1)
    edits = [sampler.parse_edit("a:0=2", {"a": a, "b": b}), sampler.parse_edit("b:2=-2", {"a": a, "b": b})]
    calls = []
    hook = shapes_model.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        sampler.sample(
            shapes_model,
            sampler.seed_latents(shapes_model, [0, 1]),
            edits,
            prompt="a shape",
            guidance_scale=4.0,
            steps=6,
        )
    finally:
        hook.remove()
    assert len(calls) == 6
    assert calls == [2 * 4] * 6  # 2 images x (empty + 2 directions + prompt): shared unconditional pass


def test_composing_two_banks_equals_one_merged_bank(shapes_model):
    a, b = make_bank(shapes_model, "a"), make_bank(shapes_model, "b", seed=1)
    banks = {"a": a, "b": b}
    merged = DirectionBank(torch.cat([a.directions, b.directions]), a.base_model, name="m")
    x_T = sampler.seed_latents(shapes_model, [3])
    two = sampler.sample(
        shapes_model, x_T, [sampler.parse_edit(e, banks) for e in ("a:1=3", "b:0=-2")], steps=8
    )
    one = sampler.sample(
        shapes_model, x_T, [sampler.parse_edit(e, {"m": merged}) for e in ("1=3", "3=-2")], steps=8
    )
    only_a = sampler.sample(shapes_model, x_T, [sampler.parse_edit("a:1=3", banks)], steps=8)
    torch.testing.assert_close(two, one)
    assert (two - only_a).abs().max() > 1e-3  # the second bank's edit does something


def test_window_outside_the_trajectory_is_no_edit(shapes_model):
    bank = make_bank(shapes_model, "a")
    x_T = sampler.seed_latents(shapes_model, [1])
    plain = sampler.sample(shapes_model, x_T, [], steps=5)
    # 5 DDIM steps visit t = 801, 601, 401, 201, 1: a window of [0, 0] is never active.
    never = sampler.sample(shapes_model, x_T, [sampler.parse_edit("0=5@0-0", {"a": bank})], steps=5)
    always = sampler.sample(shapes_model, x_T, [sampler.parse_edit("0=5", {"a": bank})], steps=5)
    torch.testing.assert_close(plain, never)
    assert (plain - always).abs().max() > 1e-3


def test_inversion_round_trip_reconstructs_real_images(shapes_model):
    # 100 DDIM steps, the CLI's default for real images: at 25, and even at 50, the inversion's
    # own discretisation error swings from one set of 4 images (or one set of weights) to the
    # next (at 50: 0.052 on these 4 with the stage-6 weights, 0.088 with stage 8's; at 100:
    # 0.020 and 0.033).
    pixels = shapes.render(shapes.sample_scenes(4, seed=21)) * 2 - 1
    edited, error = sampler.edit_real(shapes_model, pixels, [], steps=100)
    assert edited.shape == (4, 64, 64, 3)
    assert error < 0.06, error
    others = ((pixels.roll(1, dims=0) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert error < float(np.abs(edited - others).mean()) / 3  # far closer to its own image


def test_edit_cli_inverts_a_real_image_faithfully_by_default(shapes_model, tmp_path):

    make_bank(shapes_model, "r").save(tmp_path / "bank")
    pixels = shapes.render(shapes.sample_scenes(1, seed=21))[0].permute(1, 2, 0).numpy()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(tmp_path / "real.png")
    out = tmp_path / "edit.png"
    args = ["edit", "0=3", "--bank", str(tmp_path / "bank"), "--image", str(tmp_path / "real.png")]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    error = float(result.output.split("inversion reconstruction error (mean abs, 0..1):")[1].split()[0])
    assert error < 0.06, result.output
    w, h = Image.open(out).size
    assert h >= 128 and w > 1.9 * h  # before | after, upscaled x2


@pytest.mark.parametrize("zero_snr", [False, True])
def test_inversion_stops_short_of_snr_zero(tiny_model, zero_snr):
    """On a zero-terminal-SNR schedule a step into t = 999 would replace the image by noise:
    inversion ends one step below it and sampling resumes from there."""
    from dataclasses import replace

    from diffusers import DDIMScheduler

    from noiseclr.models.shapes.architecture import noise_schedule

    schedule = noise_schedule("v_prediction" if zero_snr else "epsilon", zero_snr)
    pipe = type(tiny_model.pipe)(**{**tiny_model.pipe.components, "scheduler": DDIMScheduler(**schedule)})
    model = replace(tiny_model, pipe=pipe)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x_t, t = sampler.invert(model, latents, steps=4)
    assert t == (749 if zero_snr else 751)  # trailing: 999 749 499 249; leading: 751 501 251 1
    assert pipe.scheduler.alphas_cumprod[t] > 0.01
    out = sampler.sample(model, x_t, [], steps=4, start_t=t)
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_scale_sweep_is_monotone_in_effect(shapes_model):
    bank = make_bank(shapes_model, "a")
    x_T = sampler.seed_latents(shapes_model, [0])
    sweep = sampler.scale_sweep(
        shapes_model, x_T, sampler.parse_edit("2=1", {"a": bank}), [0, 2, 6], steps=8
    )[0]
    d_small, d_large = np.abs(sweep[1] - sweep[0]).mean(), np.abs(sweep[2] - sweep[0]).mean()
    assert sweep.shape == (3, 64, 64, 3)
    assert 0 < d_small < d_large


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("a:7=1", BankError, "direction 7 does not exist"),
        ("a:up=1", BankError, "direction 'up' does not exist"),
        ("c:1=1", BankError, "no bank named 'c'"),
        ("a:1=nan", ValueError, "scale must be a finite number"),
        ("a:1=inf", ValueError, "scale must be a finite number"),
        ("a:1=big", ValueError, "is not a number"),
        ("a:1", ValueError, "expected"),
        ("a:1=2@100-900", ValueError, "window must satisfy"),
        ("1=2", BankError, "name the bank"),
    ],
)
def test_bad_edit_requests(shapes_model, text, error, message):
    banks = {"a": make_bank(shapes_model, "a"), "b": make_bank(shapes_model, "b")}
    with pytest.raises(error, match=message):
        sampler.parse_edit(text, banks)


def test_measured_edit_defaults_set_the_unit_and_the_window(shapes_model):
    bank = make_bank(shapes_model, "a")
    raw = sampler.parse_edit("1=2", {"a": bank})
    assert (raw.scale, raw.t_high, raw.t_low) == (2.0, 1000, 0)  # nothing measured: raw scale
    bank.edit_defaults = {"window": [600, 0], "scales": [[-4.0, 8.0]] * len(bank)}
    plus, minus = sampler.parse_edit("1=1", {"a": bank}), sampler.parse_edit("1=-0.5", {"a": bank})
    assert (plus.scale, plus.t_high, minus.scale) == (8.0, 600, -2.0)
    explicit = sampler.parse_edit("1=1@900-100", {"a": bank})
    assert (explicit.t_high, explicit.t_low) == (900, 100)
    with pytest.raises(ValueError, match="finite"):
        sampler.parse_edit("1=nan", {"a": bank})


def test_nan_scales_in_a_matrix_are_rejected(shapes_model):
    bank = make_bank(shapes_model, "a")
    edit = sampler.parse_edit("0=1", {"a": bank})
    with pytest.raises(ValueError, match="finite"):
        sampler.sample(
            shapes_model, sampler.seed_latents(shapes_model, [0]), [edit], torch.tensor([[float("nan")]])
        )


def test_gallery_writes_grid_and_page(shapes_model, tmp_path):
    bank = make_bank(shapes_model, "g", k=2)
    bank.labels = {bank.tokens[0]: {"auto": "hue+"}}
    pages = write_gallery(shapes_model, bank, tmp_path, [-3.0, 0.0, 3.0], [0, 1], steps=4)
    html = pages["html"].read_text()
    assert pages["grid"].stat().st_size > 0 and (tmp_path / "directions" / "001.png").exists()
    assert "hue+" in html and "&lt;g-1&gt;" in html and html.count("<tr>") == 3
    # The PNG carries the labels: text in a margin above the columns and left of the rows.
    grid = np.asarray(Image.open(pages["grid"]).convert("L"))
    strip = np.asarray(Image.open(tmp_path / "directions" / "000.png").convert("L"))
    assert grid.shape[0] > 2 * strip.shape[0] and grid.shape[1] > strip.shape[1]
    left = grid[:, : grid.shape[1] - strip.shape[1]]
    top = grid[: grid.shape[0] - 2 * strip.shape[0]]
    assert (left < 128).sum() > 20 and (top < 128).sum() > 20  # dark text on white
    for path in (pages["grid"], pages["html"], tmp_path / "directions" / "000.png"):
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by others"
    # a measured bank: rows best first, the dead direction greyed and marked
    bank.scores = scores([{"dead": True}, {"score": 0.4}], score=0.2)
    html = write_gallery(shapes_model, bank, tmp_path / "m", [0.0, 3.0], [0], steps=2)["html"].read_text()
    assert html.index("&lt;g-1&gt;") < html.index("&lt;g-0&gt;") and html.count('<tr class="dead">') == 1


def test_discover_on_the_world_measures_labels_and_calibrates_the_bank(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "k: 3\nnegatives: 1\nbatch: 2\nsteps: 2\nn_images: 4\ngallery_seeds: 1\ngallery_steps: 3\n"
        "gallery_scales: [-1, 0, 1]\nevaluate_images: 2\nevaluate_steps: 6\ninversion_steps: 7\nname: w\n"
        "edit_window: 500\n"
        "world_fixed: {x: center, y: middle}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["discover", "--config", str(cfg), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "bank" / "bank.json").read_text())
    assert meta["edit_defaults"]["window"] == [500, 0]
    scales = meta["edit_defaults"]["scales"]
    assert len(scales) == 3 and all(lo < 0 < hi for lo, hi in scales)
    assert set(meta["labels"]) == set(meta["tokens"])
    evaluation = meta["metrics"]["evaluation"]
    assert evaluation["protocol"]["fixed"] == {"x": "center", "y": "middle"}
    assert evaluation["protocol"]["factors"] == ["shape", "hue", "size", "lightness", "pattern"]
    # both measurements' real images at the job's evaluation.inversion_steps (not 50 and 8)
    assert evaluation["protocol"]["inversion_steps"] == meta["scores"]["protocol"]["inversion_steps"] == 7
    lo, hi = evaluation["interval"]
    assert 0 <= lo <= evaluation["alignment"] <= hi <= 1
    assert (out / "evaluation" / "evaluation.html").exists()
    assert "measured strength" in (out / "gallery" / "index.html").read_text()
    # the oracle-free measurement too; the oracle's calibration sets the edit scales here
    assert meta["edit_defaults"]["calibration"] == "oracle" and len(meta["scores"]["directions"]) == 3
    assert meta["scores"]["protocol"]["window"] == [500, 0]
    assert meta["scores"]["protocol"]["images"]["real_files"][0].endswith(".png")
    assert "oracle-free score" in (out / "gallery" / "index.html").read_text()


def test_discover_cli_end_to_end_with_a_corrupt_file(tmp_path):
    from noiseclr.domains.dataset import write_world

    data = tmp_path / "data"
    write_world(str(data), n=8, seed=1, progress=False)
    (data / "images" / "zz-corrupt.png").write_bytes(b"not a png")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "k: 4\nnegatives: 2\nbatch: 3\nsteps: 3\nn_images: 9\ngallery_seeds: 1\ngallery_steps: 3\n"
        "gallery_scales: [-2, 0, 2]\ncheckpoint_every: 2\nname: tiny\nevaluate_images: 2\nevaluate_steps: 4\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["discover", "--config", str(cfg), "--data", str(data), "--out", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 corrupt image" in result.output
    bank = DirectionBank.load(out / "bank")
    assert len(bank) == 4 and bank.metrics["corrupt_images"] == 1 and bank.metrics["steps"] == 3
    # a plain folder, no oracle: the oracle-free measurement ranks the bank and calibrates it
    assert len(bank.scores.directions) == 4 and bank.calibration == "blind"
    assert "scores:" in result.output
    shown = [bank.direction_score(i) for i in bank.ranked()]  # dead ones last, live best first
    live = [d.score for d in shown if not d.dead]
    assert [d.dead for d in shown] == sorted(d.dead for d in shown) and live == sorted(live, reverse=True)
    assert (out / "gallery" / "gallery.png").exists() and (out / "gallery" / "index.html").exists()
    # `noiseclr edit` on the new bank, with a bad direction first: clear error, nothing written.
    bad = CliRunner().invoke(
        app, ["edit", "9=2", "--bank", str(out / "bank"), "--out", str(tmp_path / "e.png")]
    )
    assert bad.exit_code == 2 and "direction 9 does not exist" in bad.stderr
    assert not (tmp_path / "e.png").exists()
    ok = CliRunner().invoke(
        app, ["edit", "1=2", "--bank", str(out / "bank"), "--steps", "3", "--out", str(tmp_path / "e.png")]
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "e.png").exists()
