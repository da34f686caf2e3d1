"""Evaluation metrics on hand-made edits with known effects, the pullback method, reports."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank
from noiseclr.cli import app
from noiseclr.discovery.pullback import discover_pullback, local_directions
from noiseclr.domains import shapes
from noiseclr.domains.oracle import measure
from noiseclr.editing import sampler
from noiseclr.evaluation.evaluate import Harness, Protocol, perfect_edit, word_bank
from noiseclr.evaluation.metrics import FACTORS, bootstrap, changes, score_bank, score_edit

SCENES = shapes.sample_scenes(24, seed=3, fixed={"x": "center", "y": "middle", "size": "medium"})
NO_FLOOR = np.zeros(len(FACTORS))


def measured(scenes):
    return [measure(img) for img in shapes.to_uint8(shapes.render(scenes))]


def edit_pair(edit_neg, edit_pos, scenes=SCENES):
    """[changes at -s, changes at +s] of a hand-made edit on rendered scenes (exact oracle)."""
    before = measured(scenes)
    return [changes(before, measured([e(s) for s in scenes]), 64) for e in (edit_neg, edit_pos)]


def shift(**delta):
    return lambda s: dataclasses.replace(s, **{k: getattr(s, k) + v for k, v in delta.items()})


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("steps", [1, 2])
def test_a_perfect_edit_of_any_factor_scores_near_one(factor, steps):
    scenes = shapes.sample_scenes(30, seed=5)
    pair = edit_pair(
        lambda s: perfect_edit(s, factor, -steps), lambda s: perfect_edit(s, factor, steps), scenes
    )
    score = score_bank([pair], NO_FLOOR, factors=(factor,))
    assert score.alignment > 0.95, [(e.label, e.purity, e.consistency) for e in score.edits[0]]
    assert score.coverage == [factor]


def test_a_noop_scores_zero():
    score = score_bank([edit_pair(lambda s: s, lambda s: s)], NO_FLOOR)
    assert score.alignment == 0.0 and score.coverage == []
    assert [e.label for e in score.edits[0]] == ["none", "none"]


def test_a_two_factor_edit_scores_low():
    pair = edit_pair(shift(hue=-60.0, size=-3 / 64), shift(hue=60.0, size=3 / 64))
    score = score_bank([pair], NO_FLOOR)
    assert all(e.purity < 0.7 for e in score.edits[0])
    assert score.coverage == [] and score.alignment < 0.1


def test_pure_hue_shift_is_labelled_and_measured_in_bins():
    score = score_bank([edit_pair(shift(hue=-30.0), shift(hue=30.0))], NO_FLOOR)
    minus, plus = score.edits[0]
    assert (minus.label, plus.label) == ("hue-", "hue+")
    assert plus.effect[FACTORS.index("hue")] == pytest.approx(0.5, abs=0.02)  # 30 degrees
    assert plus.purity > 0.97 and plus.consistency == 1.0


def test_changes_below_the_noise_floor_count_as_none():
    pair = edit_pair(shift(x=-1 / 64), shift(x=1 / 64))  # 1 px = 1/16 of an x bin
    floor = NO_FLOOR.copy()
    assert score_bank([pair], floor).edits[0][1].effect[FACTORS.index("x")] > 0.05
    floor[FACTORS.index("x")] = 0.1
    assert score_bank([pair], floor).edits[0][1].effect[FACTORS.index("x")] == 0.0


def test_inconsistent_direction_is_not_covered():
    signs = np.random.default_rng(0).choice([-1.0, 1.0], len(SCENES))
    lookup = {id(s): sign for s, sign in zip(SCENES, signs, strict=True)}
    pair = edit_pair(
        lambda s: shift(hue=-30.0 * lookup[id(s)])(s), lambda s: shift(hue=30.0 * lookup[id(s)])(s)
    )
    score = score_bank([pair], NO_FLOOR)
    assert score.edits[0][1].consistency < 0.8 and score.coverage == []


def test_shape_consistency_is_per_source_class():
    scenes = shapes.sample_scenes(30, seed=6)
    cycle = edit_pair(lambda s: perfect_edit(s, "shape", 1), lambda s: perfect_edit(s, "shape", 1), scenes)
    rng = np.random.default_rng(1)
    shuffled = {id(s): shapes.SHAPES[rng.integers(3)] for s in scenes}
    scramble = edit_pair(lambda s: s, lambda s: dataclasses.replace(s, shape=shuffled[id(s)]), scenes)
    assert score_edit(cycle[1], NO_FLOOR).consistency == 1.0
    assert score_edit(scramble[1], NO_FLOOR).consistency < 0.8


def test_a_hue_edit_towards_one_colour_is_consistent():
    scenes = shapes.sample_scenes(30, seed=7, fixed={"hue": "yellow"}) + shapes.sample_scenes(
        30, seed=8, fixed={"hue": "magenta"}
    )
    to_red = edit_pair(lambda s: s, lambda s: dataclasses.replace(s, hue=0.0), scenes)
    plus = score_edit(to_red[1], NO_FLOOR)  # yellow moves -60 degrees, magenta +60: no one sign
    assert plus.label == "hue->red" and plus.consistency == 1.0 and plus.purity > 0.95
    # a random word per image is neither one sign nor one target
    rng = np.random.default_rng(0)
    scramble = {id(s): float(rng.choice([0.0, 120.0, 180.0, 240.0])) for s in scenes}
    mixed = edit_pair(lambda s: s, lambda s: dataclasses.replace(s, hue=scramble[id(s)]), scenes)
    assert score_edit(mixed[1], NO_FLOOR).consistency < 0.75


def test_alignment_averages_the_domains_factors_and_bootstrap_brackets_it():
    to_circle = edit_pair(lambda s: s, lambda s: dataclasses.replace(s, shape="circle"))
    hue = edit_pair(shift(hue=-60.0), shift(hue=60.0))
    score = score_bank([to_circle, hue], NO_FLOOR, factors=("shape", "hue", "lightness"))
    assert score.edits[0][1].label == "shape->circle"
    assert score.coverage == ["shape", "hue"]
    assert score.alignment == pytest.approx((score.edits[0][1].quality + score.edits[1][1].quality) / 3)
    ci = bootstrap([to_circle, hue], NO_FLOOR, ("shape", "hue", "lightness"), n_boot=50)
    assert ci["alignment"][0] <= score.alignment <= ci["alignment"][1]
    assert ci["coverage"] == [2.0, 2.0]


def test_harness_ceiling_floor_and_calibration_on_the_model(shapes_model):
    """Through the model: perfect edits (VAE) score near 1, random directions far below, and
    calibration raises a weak direction's scale until it has an effect."""
    harness = Harness(
        shapes_model,
        Protocol(fixed={"x": "center", "y": "middle"}, n_images=6, steps=8, real=False, n_boot=20),
        progress=False,
    )
    assert set(harness.floor.round(6)) != {0.0}  # the VAE round trip drifts a little
    ceiling = harness.evaluate_perfect()
    assert ceiling["alignment"] > 0.9
    words = word_bank(shapes_model, ("red", "striped"))
    weak = DirectionBank(words.directions * torch.tensor([[0.25], [1.0]]), dict(words.base_model), name="w")
    result = harness.evaluate(weak)
    assert abs(result["scales"][0][1]) > abs(result["scales"][1][1])  # the weak one got more scale
    assert result["alignment"] < ceiling["alignment"]


def test_each_direction_keeps_the_window_where_its_calibrated_edits_are_best(
    shapes_model, tmp_path, monkeypatch
):
    """Protocol.windows: every direction is calibrated in each candidate top and keeps the one
    where its calibrated edits score best on the calibration images (ties: the lower top); it
    is scored in that window, and the bank then edits in it by default."""
    from noiseclr.evaluation.evaluate import label_bank

    protocol = Protocol(
        fixed={"x": "center", "y": "middle"},
        n_images=2,
        steps=4,
        real=False,
        calibration_images=1,
        ladder=(4.0, 16.0),
        n_boot=10,
        windows=(600, 300),
    )
    harness = Harness(shapes_model, protocol, progress=False)
    bank = word_bank(shapes_model, ("striped", "red", "blue"))
    quality = {(0, 300): 0.1, (0, 600): 0.5, (1, 300): 0.4, (1, 600): 0.2, (2, 300): 0.3, (2, 600): 0.3}
    monkeypatch.setattr(harness, "_cal_quality", lambda b, k, top, s: quality[k, top])
    seen, edited = [], harness._edited
    monkeypatch.setattr(
        harness,
        "_edited",
        lambda b, k, src, sc, n=None: seen.append((k, src.name, src.top)) or edited(b, k, src, sc, n),
    )
    result = harness.evaluate(bank)
    assert result["windows"] == [[600, 0], [300, 0], [300, 0]]
    assert {(k, top) for k, name, top in seen if name == "generated"} == {(0, 600), (1, 300), (2, 300)}
    assert {top for _, name, top in seen if name == "cal-generated"} == {300, 600}  # both tried
    label_bank(bank, result)
    bank.save(tmp_path / "bank")
    loaded = DirectionBank.load(tmp_path / "bank")
    assert loaded.edit_defaults.dump()["windows"] == [[600, 0], [300, 0], [300, 0]]
    assert loaded.edit_defaults.dump()["window"] == [600, 0]  # the protocol's, for banks read before
    edits = {text: sampler.parse_edit(text, {"w": loaded}) for text in ("0=1", "1=1", "1=1@800-100")}
    assert [(e.t_high, e.t_low) for e in edits.values()] == [(600, 0), (300, 0), (800, 100)]
    assert edits["1=1"].scale == loaded.edit_defaults.dump()["scales"][1][1]


def test_the_pair_reference_is_the_difference_of_the_two_words_embeddings(shapes_model):
    from noiseclr.evaluation.evaluate import pair_bank

    pairs = pair_bank(shapes_model, (("circle", "square"), ("small", "large")))
    words = word_bank(shapes_model, ("circle", "square", "small", "large")).directions
    assert pairs.tokens == ["<circle-to-square>", "<small-to-large>"]
    assert torch.equal(pairs.directions, torch.stack([words[1] - words[0], words[3] - words[2]]))


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


def test_evaluate_cli_writes_reports_labels_and_edit_defaults(shapes_model, tmp_path):
    words = word_bank(shapes_model, ("striped", "red"))
    bank = DirectionBank(words.directions, dict(words.base_model), name="e", config={"world_fixed": {}})
    bank.save(tmp_path / "bank")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "bank"),
            "--n",
            "2",
            "--steps",
            "4",
            "--inversion-steps",
            "5",
            "--fix",
            "x=center",
            "--windows",
            "400,600",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert report["protocol"]["inversion_steps"] == 5  # the real images' steps, as asked
    assert len(report["windows"]) == 2 and {w[0] for w in report["windows"]} <= {400, 600}
    pooled = report["scores"]["all"]
    assert len(pooled["edits"]) == 2 and len(pooled["edits"][0][0]["effect"]) == 7
    assert report["protocol"]["factors"] == ["shape", "hue", "size", "y", "lightness", "pattern"]
    assert report["fidelity"] is not None and 0 <= pooled["intervals"]["alignment"][0] <= pooled["alignment"]
    assert set(report["scores"]) == {"all", "generated", "real"}
    for name in ("heatmap.png", "evaluation.html", "evaluation.md"):
        assert (tmp_path / "evaluation" / name).exists()
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert set(meta["labels"]) == set(bank.tokens) and all("auto" in v for v in meta["labels"].values())
    assert meta["edit_defaults"]["scales"] == report["scales"]
    assert meta["edit_defaults"]["windows"] == report["windows"]
    assert meta["metrics"]["evaluation"]["alignment"] == report["alignment"]
    card = (tmp_path / "bank" / "README.md").read_text()  # rewritten with the labels and scales
    assert (
        f"Alignment {report['alignment']:.3g}" in card and "calibrated edit strengths by the shapes" in card
    )
    for i, token in enumerate(bank.tokens):
        window = "{}-{}".format(*report["windows"][i])
        assert f"| {i} | `{token}` |" in card and f"| {window} |" in card


def test_evaluate_cli_refuses_a_bad_domain_in_one_line(shapes_model, tmp_path):
    word_bank(shapes_model, ("red", "blue")).save(tmp_path / "bank")
    result = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "bank"), "--fix", "x=centre", "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert "fixed x='centre'" in result.output and "pydantic" not in result.output
    assert not (tmp_path / "evaluation").exists()


def test_compare_has_ceiling_and_floor_rows_and_writes_grids(shapes_model, tmp_path):
    from noiseclr.evaluation.compare import compare

    words = word_bank(shapes_model, ("striped", "blue"))
    found = DirectionBank(words.directions * 0.9, dict(words.base_model), name="found")
    protocol = Protocol(
        fixed={"x": "center", "y": "middle"},
        n_images=2,
        steps=4,
        inversion_steps=4,
        calibration_images=1,
        ladder=(4.0, 16.0),
        n_boot=10,
    )
    results = compare(
        shapes_model, {"found": found}, protocol, tmp_path, words=("striped", "blue"), progress=False
    )
    assert list(results) == ["domain", "full world"]
    assert list(results["domain"]) == ["perfect", "words", "found", "random"]
    assert results["full world"]["found"]["protocol"]["factors"] == list(FACTORS)
    table = (tmp_path / "compare.md").read_text()
    assert "| perfect |" in table and "| random |" in table and "x=center, y=middle" in table
    assert (tmp_path / "grids" / "domain-found.png").exists()
    assert (tmp_path / "grids" / "full-world-random.png").exists()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fixed": {"x": "centre"}}, "fixed x='centre'"),
        ({"fixed": {"colour": "red"}}, "fixed colour='red'"),
        ({"window": (100, 600)}, "window"),
        ({"windows": (0, 600)}, "windows must be distinct window tops"),
        ({"windows": (600, 600)}, "windows must be distinct window tops"),
        ({"window": (600, 400), "windows": (300, 800)}, "every window top must lie above t_low"),
        ({"ladder": (4.0, 2.0)}, "ladder must be increasing"),
        ({"ladder": (1.0, float("nan"))}, "ladder must be increasing"),
        ({"n_images": 1}, "n_images"),
        ({"target": 0.5}, "target"),
    ],
)
def test_bad_protocols_are_refused_with_the_field_named(kw, message):
    with pytest.raises(ValueError, match=message):
        Protocol(**kw)
