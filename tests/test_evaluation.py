"""Evaluation metrics on hand-made edits with known effects, the pullback method, reports."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noiseclr.cli import app
from noiseclr.discovery.bank import DirectionBank
from noiseclr.discovery.pullback import discover_pullback, local_directions
from noiseclr.domains import shapes
from noiseclr.domains.oracle import measure
from noiseclr.evaluation.metrics import direction_effects, score_bank

SCENES = shapes.sample_scenes(24, seed=3, fixed={"x": "center", "y": "middle", "size": "medium"})


def effects_of(edit_pos, edit_neg):
    """Measure a hand-made edit: scenes rendered before, and after edit_neg / edit_pos."""

    def m(scenes):
        return [measure(img) for img in shapes.to_uint8(shapes.render(scenes))]

    return direction_effects(
        m(SCENES), [m([edit_neg(s) for s in SCENES]), m([edit_pos(s) for s in SCENES])], 64
    )


def shift(**delta):
    return lambda s: dataclasses.replace(s, **{k: getattr(s, k) + v for k, v in delta.items()})


def test_pure_hue_shift_is_pure_consistent_and_labelled():
    eff = effects_of(shift(hue=30.0), shift(hue=-30.0))
    scores = score_bank([eff], [-1.0, 1.0])
    assert scores.purity[0] > 0.97
    assert scores.consistency[0] == 1.0
    assert scores.labels == ["hue+"]
    assert scores.coverage == ["hue"]
    assert scores.effect[0, 1] == pytest.approx(30.0, abs=1.0)  # degrees


def test_position_shift_reads_in_pixels_and_sign():
    eff = effects_of(shift(x=-10 / 64), shift(x=10 / 64))  # + scale moves left
    scores = score_bank([eff], [-1.0, 1.0])
    assert scores.labels == ["x-"] and scores.purity[0] > 0.95
    assert scores.effect[0, 3] == pytest.approx(10.0, abs=1.0)


def test_mixed_edit_is_not_pure():
    eff = effects_of(shift(hue=40.0, size=2 / 64), shift(hue=-40.0, size=-2 / 64))
    scores = score_bank([eff], [-1.0, 1.0])
    assert scores.purity[0] < 0.7 and scores.coverage == []


def test_an_edit_that_does_nothing_covers_nothing():
    eff = effects_of(lambda s: s, lambda s: s)
    scores = score_bank([eff], [-1.0, 1.0])
    assert scores.labels == ["none"] and scores.coverage == [] and scores.alignment == 0.0


def test_inconsistent_direction_is_not_covered():
    signs = np.random.default_rng(0).choice([-1.0, 1.0], len(SCENES))
    lookup = {id(s): sign for s, sign in zip(SCENES, signs, strict=True)}
    eff = effects_of(
        lambda s: shift(hue=30.0 * lookup[id(s)])(s), lambda s: shift(hue=-30.0 * lookup[id(s)])(s)
    )
    scores = score_bank([eff], [-1.0, 1.0])
    assert scores.consistency[0] < 0.8 and scores.coverage == []


def test_shape_change_and_the_alignment_score():
    to_circle = effects_of(lambda s: dataclasses.replace(s, shape="circle"), lambda s: s)
    hue = effects_of(shift(hue=30.0), shift(hue=-30.0))
    scores = score_bank([to_circle, hue], [-1.0, 1.0])
    assert scores.labels[0] == "shape->circle"
    assert scores.coverage == ["shape", "hue"]
    assert scores.alignment == pytest.approx(
        (scores.purity[0] * scores.consistency[0] + scores.purity[1]) / 7
    )


def test_pullback_finds_the_top_singular_directions(tiny_model):
    x_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    v, sigma = local_directions(
        tiny_model, x_t, 500, k=3, iters=6, generator=torch.Generator().manual_seed(1)
    )
    assert v.shape == (3, 4 * 16 * 16)
    torch.testing.assert_close(v @ v.T, torch.eye(3), atol=1e-4, rtol=0)
    assert bool((sigma[:-1] >= sigma[1:]).all())
    # A random unit direction moves h less than the top singular direction does.
    from noiseclr.discovery.pullback import h_space

    unet = tiny_model.pipe.unet
    ctx = torch.zeros(1, 16, tiny_model.pipe.text_encoder.config.hidden_size)
    r = torch.randn(4 * 16 * 16, generator=torch.Generator().manual_seed(2))
    r = r / r.norm()
    with h_space(unet), torch.no_grad():

        def h(x):
            return unet(x, torch.tensor([500]), ctx).sample.flatten()

        eps = 1e-3
        jr = (h(x_t + eps * r.view_as(x_t)) - h(x_t - eps * r.view_as(x_t))) / (2 * eps)
    assert sigma[0] > jr.norm()
    assert len(unet.up_blocks) > 0  # h_space restored the UNet


def test_pullback_bank_saves_loads_and_edits(shapes_model, tmp_path):
    from noiseclr.editing.sampler import seed_latents, sweep_direction

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    bank = discover_pullback(shapes_model, latents, k=2, t_edit=600, iters=2, progress=False)
    bank.save(tmp_path / "pb")
    again = DirectionBank.load(tmp_path / "pb", shapes_model)
    assert again.method == "pullback" and again.directions.shape == (2, 1024)
    imgs = sweep_direction(shapes_model, again, 0, seed_latents(shapes_model, [0]), [0.0, 20.0], steps=6)
    assert imgs.shape == (1, 2, 64, 64, 3) and np.abs(imgs[0, 1] - imgs[0, 0]).max() > 0.01


def test_evaluate_cli_writes_reports_and_labels(shapes_model, tmp_path):
    hidden = shapes_model.pipe.text_encoder.config.hidden_size
    table = shapes_model.pipe.text_encoder.get_input_embeddings().weight.detach()
    vectors = (
        torch.randn(2, hidden, generator=torch.Generator().manual_seed(0)) * table.norm(dim=1).mean() / 11
    )
    bank = DirectionBank(vectors, {"source": "shapes", "fingerprint": shapes_model.fingerprint}, name="e")
    bank.save(tmp_path / "bank")
    result = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "bank"), "--n", "2", "--steps", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert len(report["normalised"]) == 2 and len(report["normalised"][0]) == 7
    assert report["fidelity"] is not None and 0 <= report["alignment"] <= 1
    for name in ("heatmap.png", "evaluation.html", "evaluation.md"):
        assert (tmp_path / "evaluation" / name).exists()
    labels = json.loads((tmp_path / "bank" / "bank.json").read_text())["labels"]
    assert set(labels) == set(bank.tokens) and all("auto" in v for v in labels.values())
