"""The oracle-free measurement: its figures against plain reference computations on hand-made
changes, and through the embedded model a dead direction flagged below a known word."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank, merge_banks
from noiseclr.cli import app
from noiseclr.errors import DataError
from noiseclr.evaluation import blind
from noiseclr.evaluation.blind import SignedEdit, score_edits
from noiseclr.evaluation.compose import _fidelity, additivity

R = 16
RNG = np.random.default_rng(0)
PATTERN = np.zeros((R, R, 3), np.float32)
PATTERN[4:9, 4:9, 1] = 0.5  # "the object turns green"
OTHER = np.zeros((R, R, 3), np.float32)
OTHER[:, :, 2] = 0.2  # "the background gets bluer"


def edit(pattern, n=8, noise=0.02, reached=True, drift=0.0, scale=2.0):
    deltas = np.stack([pattern + RNG.normal(0, noise, pattern.shape) for _ in range(n)]).astype(np.float32)
    return SignedEdit(scale, reached, deltas, drift)


def noise_edit(n=8):
    return SignedEdit(32.0, True, RNG.normal(0, 0.1, (n, R, R, 3)).astype(np.float32), 0.0)


def cos(a, b):
    a, b = a.ravel().astype(float), b.ravel().astype(float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_scores_follow_their_definitions_on_hand_made_changes():
    edits = [
        [edit(-PATTERN), edit(PATTERN)],  # 0: a clean, consistent edit both ways
        [noise_edit(), noise_edit()],  # 1: changes unrelated from image to image
        [edit(-PATTERN, reached=False), edit(PATTERN, drift=blind.MAX_DRIFT + 1)],  # 2: weak / breaks
        [edit(-OTHER), edit(OTHER)],  # 3: another clean edit
        [edit(PATTERN), edit(-PATTERN)],  # 4: direction 0 again, signs swapped
    ]
    out = score_edits(edits, n_boot=50)
    d = out["directions"]
    assert [x["dead"] for x in d] == [False, True, True, False, False]
    # consistency: the mean cosine over pairs of different images (a plain double loop) of the
    # changes or of their centred magnitude maps, whichever is higher
    e = edits[0][1]
    place = np.abs(e.deltas).sum(axis=3)
    place = place - place.mean(axis=(1, 2), keepdims=True)
    pairs = [(a, b) for a in range(8) for b in range(8) if a != b]
    loop = max(
        np.mean([cos(e.deltas[a], e.deltas[b]) for a, b in pairs]),
        np.mean([cos(place[a], place[b]) for a, b in pairs]),
    )
    assert d[0]["signs"]["+"]["consistency"] == pytest.approx(loop, abs=1e-3)
    # a change in the same place that differs by image (a hue rotation: red -> green, blue -> red)
    red, blue = np.zeros((R, R, 3), np.float32), np.zeros((R, R, 3), np.float32)
    red[4:9, 4:9] = [-0.5, 0.5, 0.0]
    blue[4:9, 4:9] = [0.5, 0.0, -0.5]
    greener = SignedEdit(1.0, True, np.stack([red, blue] * 4), 0.0)
    assert greener.consistency() > 0.9 and mean_signed(greener) < 0.2
    assert d[1]["signs"]["+"]["consistency"] < blind.MIN_CONSISTENCY
    # distinctness: 1 - the largest same-image cosine with a live signed change of a direction
    # outside its duplicate group (0 and 4 are one group: they do not rank each other down)
    near = max(np.mean([cos(edits[0][1].deltas[i], edits[3][t].deltas[i]) for i in range(8)]) for t in (0, 1))
    assert d[0]["signs"]["+"]["distinctness"] == pytest.approx(1 - max(0.0, near), abs=1e-3)
    assert d[3]["signs"]["+"]["distinctness"] > 0.9  # orthogonal to everything else
    same = np.mean([cos(edits[0][1].deltas[i], edits[4][0].deltas[i]) for i in range(8)])
    assert same > blind.DUPLICATE_COS
    assert out["groups"] == [[0, 4]]
    head, dup = (4, 0) if d[0]["duplicate_of"] == 4 else (0, 4)  # the better one represents
    assert d[dup]["duplicate_of"] == head and d[head]["duplicate_of"] is None
    assert d[head]["score"] > 0.5  # a group's best edit keeps its rank
    assert out["live"] == 3 and out["distinct_live"] == 2
    # display order: best first, a duplicate right after its head, dead ones last
    bank = DirectionBank(torch.zeros(5, 4), {}, name="b", scores=out)
    shown = bank.ranked()
    assert shown[shown.index(head) + 1] == dup and set(shown[-2:]) == {1, 2}
    # area: the share of pixels moved by more than the threshold
    assert d[0]["signs"]["+"]["area"] == pytest.approx(25 / 256, abs=0.02)
    assert d[3]["signs"]["+"]["area"] == pytest.approx(1.0)
    assert d[0]["signs"]["+"]["strength"] == pytest.approx(np.abs(edits[0][1].deltas).mean() / 2, rel=1e-3)
    # score: consistency x distinctness x (1 - area / 2); dead ones score 0; ranks follow the score
    s = d[3]["signs"]["+"]
    assert s["score"] == pytest.approx(s["consistency"] * s["distinctness"] * (1 - s["area"] / 2), abs=1e-3)
    assert d[1]["score"] == d[2]["score"] == 0
    ranked = [d[i]["score"] for i in out["order"]]
    assert ranked == sorted(ranked, reverse=True) and d[out["order"][0]]["rank"] == 1
    assert set(out["order"][-2:]) == {1, 2}  # the dead ones last
    for x in d:
        assert (x["interval"][0] <= x["score"] + 1e-9 and x["score"] <= x["interval"][1] + 1e-9) or x["dead"]
    # the bank's score: the mean direction score, a duplicate group counted once
    assert out["score"] == pytest.approx(
        np.mean([x["score"] * (x["duplicate_of"] is None) for x in d]), abs=1e-3
    )


def test_a_weaker_edit_scores_less_by_its_calibrated_scale():
    """The strength term: the same change reached at scale 8 instead of 2 (two ladder steps up)
    scores a third."""
    out = score_edits(
        [[edit(-PATTERN), edit(PATTERN)], [edit(-OTHER, scale=8.0), edit(OTHER, scale=8.0)]], 20, 0, 2.0
    )
    s = out["directions"][1]["signs"]["+"]
    assert s["score"] == pytest.approx(
        s["consistency"] * s["distinctness"] * (1 - s["area"] / 2) / 3, abs=1e-3
    )


def mean_signed(e):
    return np.mean(
        [cos(e.deltas[a], e.deltas[b]) for a in range(len(e.deltas)) for b in range(len(e.deltas)) if a != b]
    )


def test_drift_sees_images_turned_to_noise_or_flattened():
    images = np.clip(RNG.normal(0.5, 0.05, (4, 32, 32, 3)), 0, 1).astype(np.float32)
    smooth = np.repeat(np.repeat(images[:, ::8, ::8], 8, 1), 8, 2)
    assert blind.drift(smooth, smooth) == 0
    assert blind.drift(smooth, images) > blind.MAX_DRIFT  # high-frequency noise appears
    assert blind.drift(smooth, np.full_like(smooth, 0.5)) > blind.MAX_DRIFT  # everything flattened
    assert blind.downsize(np.ones((2, 128, 128, 3)), 64).shape == (2, 64, 64, 3)


def test_composition_figures_against_their_definitions():
    before = np.zeros((3, R, R, 3))
    a, b = before + PATTERN, before + OTHER
    assert additivity(before, [a, b], before + PATTERN + OTHER) == pytest.approx(1.0)
    assert additivity(before, [a, b], before + PATTERN).mean() < 0.5  # B's change lost
    alone = [np.array([0, 1.0, 0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 0, 0, 0.8])]
    fid, kept, leak = _fidelity(alone, np.array([0, 0.5, 0, 0, 0, 0.5, 0.8]), [1, 6])
    assert (
        kept == [0.5, 1.0]
        and leak == pytest.approx(0.5 / 1.8)
        and fid == pytest.approx(0.5 * (1 - 0.5 / 1.8))
    )


def test_a_dead_direction_is_flagged_and_a_known_word_ranked_above_it(shapes_model, tmp_path):
    """Without the oracle: a random direction of tiny norm edits nothing (dead, calibrated to the
    ladder's top), the word 'striped' is live and ranked first; the measurement is stored in
    bank.json with its settings, and its calibration becomes the edit scales."""
    from noiseclr.evaluation.evaluate import word_bank

    words = word_bank(shapes_model, ("striped",))
    tiny = torch.randn(1, words.directions.shape[1], generator=torch.Generator().manual_seed(0))
    vectors = torch.cat([tiny / tiny.norm() * 1e-3, words.directions])
    bank = DirectionBank(vectors, dict(words.base_model), name="probe", config={"method": "noiseclr"})
    bank.edit_defaults = {"window": [600, 0]}
    folder = bank.save(tmp_path / "bank")
    done = CliRunner().invoke(
        app, ["measure", str(folder), "--n", "3", "--steps", "8", "--prompt", "a shape at middle center"]
    )
    assert done.exit_code == 0, done.output
    saved = DirectionBank.load(folder, shapes_model)
    s = saved.scores.dump()
    assert [d["dead"] for d in s["directions"]] == [True, False]
    assert s["order"] == [1, 0] and s["directions"][1]["score"] > s["directions"][0]["score"] == 0
    assert s["directions"][0]["signs"]["+"]["scale"] == 32.0  # never reached the target
    assert s["protocol"]["window"] == [600, 0] and s["protocol"]["images"]["generated"] == 3
    assert saved.edit_defaults.dump()["calibration"] == "blind"
    assert saved.edit_defaults.dump()["scales"][1] == [
        d["signs"][k]["scale"] for d in s["directions"][1:] for k in "-+"
    ]
    assert "| 1 | 1 | `<probe-1>`" in done.output and "dead" in done.output
    assert json.loads((folder / "bank.json").read_text())["scores"]["live"] == 1
    card = (folder / "README.md").read_text()  # the card follows the measurement
    assert "| 1 | `<probe-1>` |" in card and "**dead**" in card and "without an oracle" in card


def test_measure_refuses_bad_settings_in_one_line(shapes_model, tmp_path):
    from noiseclr.evaluation.evaluate import word_bank

    folder = word_bank(shapes_model, ("red",)).save(tmp_path / "bank")
    done = CliRunner().invoke(app, ["measure", str(folder), "--no-generated"])
    assert done.exit_code == 2 and "--no-generated needs real images" in done.output
    with pytest.raises(ValueError, match="ladder must be increasing"):
        blind.BlindProtocol(ladder=(4.0, 2.0))


def test_a_shapes_world_bank_away_from_its_run_folder_is_measured_on_its_own_training_scenes(
    shapes_model, tmp_path, caplog
):
    """The shipped bank names a data folder of the machine that trained it: on any other machine
    its real images are its training scenes drawn again (same seed, count, fixed factors), the
    very images the run wrote; a bank trained on the user's data keeps the warning instead."""
    from noiseclr.data.images import load_images
    from noiseclr.domains.dataset import write_world
    from noiseclr.evaluation.evaluate import word_bank
    from noiseclr.workflows.measure import blind_setup

    fixed = {"x": "center", "y": "middle"}
    bank = word_bank(shapes_model, ("red",))
    bank.config.update(model="shapes", data=None, n_images=10, seed=3, world_fixed=fixed)
    bank.metrics["data"] = str(tmp_path / "gone" / "data")
    protocol, real = blind_setup(shapes_model, bank, generated=False, n=3, steps=8)
    write_world(str(tmp_path / "data"), n=10, seed=3, resolution=shapes_model.resolution, fixed=fixed)
    run = load_images(str(tmp_path / "data"), shapes_model.resolution, limit=len(real.files))
    assert len(real.files) == protocol.n_images + protocol.calibration_images
    assert torch.equal(real.pixels, run.pixels)
    assert "drawn again from its world" in caplog.text
    other = word_bank(shapes_model, ("striped",))
    other.config.update(model="shapes", data=None, n_images=10, seed=4, world_fixed=fixed)
    merged = merge_banks([bank, other], "m")  # seeds differ: the first bank's scenes, as metrics.data
    assert torch.equal(blind_setup(shapes_model, merged, generated=False, n=3, steps=8)[1].pixels, run.pixels)

    bank.config["data"] = str(tmp_path / "gone" / "data")  # the user's images: not ours to redraw
    assert blind_setup(shapes_model, bank, generated=True, n=3, steps=8)[1] is None
    assert "generated only" in caplog.text
    with pytest.raises(DataError):
        blind_setup(shapes_model, bank, generated=False, n=3, steps=8)


def test_merge_keeps_one_direction_per_duplicate_group_and_drops_the_dead(shapes_model, tmp_path):
    """Two banks that share the word 'striped', one with a dead direction: the merged bank keeps
    'striped' once and 'red', drops the dead one, and its scores are those of what it kept."""
    from noiseclr.evaluation.evaluate import word_bank

    words = word_bank(shapes_model, ("striped", "red"))
    words.edit_defaults = {"window": [600, 0]}
    words.config["gallery_prompt"] = "a shape at middle center"  # the merged bank measures on it
    tiny = torch.randn(1, words.directions.shape[1], generator=torch.Generator().manual_seed(0))
    other = DirectionBank(
        torch.cat([tiny / tiny.norm() * 1e-3, words.directions[:1]]),
        dict(words.base_model),
        name="other",
        config={"gallery_prompt": "a shape at middle center"},
        edit_defaults={"window": [600, 0]},
    )
    a, b = words.save(tmp_path / "words"), other.save(tmp_path / "other")
    args = ["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--n", "3", "--steps", "8"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "merged 4 directions of 2 banks; kept 2 (dropped 2 dead or duplicate)" in done.output
    m = DirectionBank.load(tmp_path / "m", shapes_model)
    assert m.config["origin"] == [{"bank": "words", "token": t, "ref": str(a)} for t in words.tokens]
    assert torch.equal(m.directions, words.directions)
    assert len(m.scores.directions) == 2 and m.scores.live == 2 and m.scores.groups == []
    assert m.scales(1) is not None and m.calibration == "blind"
    again = CliRunner().invoke(app, args)  # never over a bank
    assert again.exit_code != 0 and "already holds a bank" in again.output


def test_bank_aggregates_count_different_edits_once_and_recompute_without_the_model():
    """The bank-level candidates (sweep objectives) on hand-made banks: two different edits
    against one edit twice; a dead direction adds nothing; packed edits give the same figures."""
    two = [[edit(-PATTERN), edit(PATTERN)], [edit(-OTHER), edit(OTHER)]]
    dup = [[edit(-PATTERN), edit(PATTERN)], [edit(-PATTERN), edit(PATTERN)]]
    a2, ad = score_edits(two, 20)["aggregates"], score_edits(dup, 20)["aggregates"]
    value = {k: v["value"] for k, v in a2.items()}
    assert set(value) == set(blind.AGGREGATES)
    assert value["distinct_live"] == 2 and ad["distinct_live"]["value"] == 1
    assert value["diversity"] > 1.5 and ad["diversity"]["value"] == pytest.approx(1, abs=0.01)
    with_dead = score_edits([*two, [noise_edit(), noise_edit()]], 20)["aggregates"]
    assert with_dead["sum_score"]["value"] == pytest.approx(value["sum_score"], abs=1e-4)
    assert with_dead["mean_score"]["value"] == pytest.approx(value["sum_score"] / 3, abs=1e-4)
    assert value["top3"] == pytest.approx(value["sum_score"] / 3, abs=1e-4)  # two live of three slots
    for name in ("mean_score", blind.OBJECTIVE):  # resampled images move it; centred on the value
        low, high = a2[name]["interval"]
        assert low < high and low <= value[name] <= high
    assert score_edits(two, 20)["interval"] == a2["mean_score"]["interval"]  # the score's, one definition
    again = score_edits(blind.unpack_edits(blind.pack_edits(two)), 20)["aggregates"]
    assert {k: v["value"] for k, v in again.items()} == pytest.approx(value, abs=2e-3)


def test_rank_correlation_and_its_interval_over_banks():
    from noiseclr.evaluation.stats import bootstrap_interval, partial_spearman, spearman

    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert spearman(a, a * 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.ones(5)))  # a constant side has no ranking
    assert bootstrap_interval(spearman, a, a**2) == [1.0, 1.0]  # every resample keeps the order
    low, high = bootstrap_interval(spearman, a, np.array([0.3, 0.1, 0.5, 0.2, 0.4]))
    assert -1 <= low < high <= 1
    # two figures that both follow k and otherwise disagree: high rho, negative once k is held out
    k = np.array([8, 8, 12, 12, 16, 16], dtype=float)
    x, y = k + np.array([0.1, 0.2] * 3), k + np.array([0.2, 0.1] * 3)
    assert spearman(x, y) > 0.7 and partial_spearman(x, y, k) == pytest.approx(-1.0)
    assert np.isnan(partial_spearman(x, k * 2, k))  # a figure that is k alone: nothing left


def test_real_images_skip_the_first_measurement_s_files_where_the_folder_has_others(tmp_path, caplog):
    """A re-measurement's real images: the files after those the first measurement read, or,
    where too few are left, the first ones again, said in the log and in `skipped`."""
    from types import SimpleNamespace

    from PIL import Image

    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
    model, protocol = SimpleNamespace(resolution=16), blind.BlindProtocol(n_images=2, calibration_images=1)
    first = blind.real_images(str(tmp_path), model, protocol)
    assert [f.rsplit("/", 1)[1] for f in first.files] == ["0.png", "1.png", "2.png"] and first.skipped == 0
    later = blind.real_images(str(tmp_path), model, protocol, skip=3)
    assert [f.rsplit("/", 1)[1] for f in later.files] == ["3.png", "4.png", "5.png"] and later.skipped == 3
    assert later.pixels.shape == (3, 3, 16, 16) and not torch.equal(later.pixels, first.pixels)
    again = blind.real_images(str(tmp_path), model, protocol, skip=6)  # 2 left: fewer than 3
    assert again.files == first.files and again.skipped == 0 and "too few images" in caplog.text
