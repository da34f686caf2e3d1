"""The bank as a typed record: every layout written since the format began still loads, reads
the same through the accessors, edits the same, and is written back in today's form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from noiseclr.bank import DirectionBank, EditDefaults, Scores
from noiseclr.editing import sampler
from noiseclr.errors import BankError
from records import scores

OLD = Path(__file__).parent / "data" / "old-banks"
# 2026-11-26: the first shipped bank, oracle scales without `calibration`, never scored;
# 2026-12-01: scored, before the per-sign null_similarity existed.
LAYOUTS = sorted(p.name for p in OLD.iterdir())


@pytest.fixture(params=LAYOUTS)
def old_bank(request, tmp_path) -> Path:
    return Path(shutil.copytree(OLD / request.param, tmp_path / request.param))


def test_every_old_layout_loads_reads_through_the_accessors_and_saves_in_todays_form(old_bank, shapes_model):
    meta = json.loads((old_bank / "bank.json").read_text())
    bank = DirectionBank.load(old_bank, shapes_model)  # its model, by the legacy fingerprint
    assert bank.base_model["fingerprint"] == shapes_model.fingerprint
    assert bank.measured and bank.calibration == "oracle"  # told by its target, not a field
    assert [list(bank.scales(i)) for i in range(len(bank))] == meta["edit_defaults"]["scales"]
    assert bank.window(3) == tuple(meta["edit_defaults"]["window"])
    rows = (meta.get("scores") or {}).get("directions")
    assert [bank.state(i) for i in range(len(bank))] == [
        "unmeasured"
        if not rows
        else "dead"
        if r["dead"]
        else "duplicate"
        if r["duplicate_of"] is not None
        else "live"
        for r in rows or [None] * len(bank)
    ]
    bank.save(old_bank)
    again = json.loads((old_bank / "bank.json").read_text())
    assert again["edit_defaults"] == meta["edit_defaults"] | {"calibration": "oracle"}
    assert again["scores"] == (meta.get("scores") or {})  # nothing lost, nothing invented
    assert again["labels"] == meta["labels"] and again["config"] == meta["config"]
    assert torch.equal(DirectionBank.load(old_bank).directions, bank.directions)


def test_an_old_layout_edits_exactly_as_the_same_bank_saved_today(old_bank, shapes_model, tmp_path):
    old = DirectionBank.load(old_bank, shapes_model)
    today = DirectionBank.load(old.save(tmp_path / "today"), shapes_model)
    meta = json.loads((old_bank / "bank.json").read_text())
    edit = sampler.parse_edit("2=1", {"b": old})
    assert edit.scale == meta["edit_defaults"]["scales"][2][1] and (edit.t_high, edit.t_low) == (600, 0)
    latents = sampler.seed_latents(shapes_model, [0])
    images = [
        sampler.sample(
            shapes_model, latents, [sampler.parse_edit("2=1", {"b": b})], torch.ones(1, 1), steps=4
        )
        for b in (old, today)
    ]
    assert torch.equal(images[0], images[1])


def test_the_first_layout_without_any_measured_part_loads_unmeasured(tmp_path):
    DirectionBank(torch.eye(3), {"source": "m", "fingerprint": "f"}, name="bare").save(tmp_path)
    meta = json.loads((tmp_path / "bank.json").read_text())
    for key in ("edit_defaults", "scores", "labels", "metrics", "config"):
        del meta[key]
    (tmp_path / "bank.json").write_text(json.dumps(meta))
    bank = DirectionBank.load(tmp_path)
    assert not bank.measured and bank.calibration is None and bank.scores is None
    assert bank.window(0) == (1000, 0) and bank.state(0) == "unmeasured" and bank.ranked() == [0, 1, 2]
    assert bank.raw_scales(0, [2.0, -1.0]) == [2.0, -1.0]  # unmeasured: raw scales


def test_a_blind_measurement_calibrates_unless_the_oracle_did():
    bank = DirectionBank(torch.eye(2), {"source": "m"}, name="b")
    record = scores(
        [{"signs": {"-": {}, "+": {}}}, {"dead": True}], protocol={"window": [700, 0], "target": 0.03}
    )
    record["directions"][0]["signs"] = {
        "-": {"scale": -2.0, "change": 0.03, "consistency": 0.4, "live": True, "score": 0.2},
        "+": {"scale": 4.0, "change": 0.03, "consistency": 0.5, "live": True, "score": 0.3},
    }
    bank.store_scores(record)
    assert isinstance(bank.scores, Scores) and bank.calibration == "blind"
    assert bank.window() == (700, 0) and bank.raw_scales(0, [1.0, -0.5]) == [4.0, -1.0]
    assert bank.edit_defaults.target_change == 0.03
    bank.store_oracle_calibration((600, 0), [(-8.0, 8.0), (-1.0, 1.0)], target_effect=0.5)
    bank.store_scores(record)  # measured again without the oracle: the oracle's scales stay
    assert bank.calibration == "oracle" and bank.scales(0) == (-8.0, 8.0) and bank.window() == (600, 0)


def test_blind_scales_keep_the_windows_they_were_calibrated_in():
    """A bank with its own windows measured in one window (`noiseclr measure --window 500`): its
    scales hold in that window, so the old per-direction windows go; measured in each
    direction's own, those stay."""
    bank = DirectionBank(torch.eye(2), {"source": "m"}, name="b")
    bank.edit_defaults = {"window": [600, 0], "windows": [[800, 0], [600, 200]]}
    one = {"window": [500, 0], "windows": [[500, 0], [500, 0]], "target": 0.02}
    bank.store_scores(scores([{}, {}], protocol=one))
    assert bank.window(0) == bank.window(1) == (500, 0) and not bank.has_own_windows
    own = {"window": [600, 0], "windows": [[800, 0], [600, 200]], "target": 0.02}
    bank.store_scores(scores([{}, {}], protocol=own))
    assert bank.window(0) == (800, 0) and bank.window(1) == (600, 200)


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"scales": [[-1.0, 1.0]]}, "scales: one per direction"),
        ({"scales": [[-1.0, float("nan")]] * 2}, "finite"),
        ({"windows": [[600, 0], [0, 600]]}, "t_low < t_high"),
        ({"window": [600]}, "edit_defaults.window"),
        ({"calibration": "guess"}, "edit_defaults.calibration"),
        ([600, 0], r"^edit_defaults: Input should be a valid dictionary"),
    ],
)
def test_a_damaged_record_is_refused_with_the_key_that_is_wrong(defaults, message, tmp_path):
    bank = DirectionBank(torch.eye(2), {"source": "m"}, name="b")
    with pytest.raises(BankError, match=message):
        bank.edit_defaults = defaults
    folder = bank.save(tmp_path)
    meta = json.loads((folder / "bank.json").read_text())
    (folder / "bank.json").write_text(json.dumps(meta | {"edit_defaults": defaults}))
    with pytest.raises(BankError, match=message):
        DirectionBank.load(folder)
    meta["scores"] = {"directions": []}  # a partial measurement: named, not half-read
    (folder / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(BankError, match=r"scores\.score"):
        DirectionBank.load(folder)


def test_the_typed_record_keeps_keys_a_newer_version_wrote():
    defaults = EditDefaults.model_validate({"window": [600, 0], "guidance": 7.5})
    assert defaults.dump() == {"window": [600, 0], "guidance": 7.5}


def test_the_bank_says_how_its_directions_are_applied():
    """Token banks (NoiseCLR) are scaled inside an edit window; x_t banks (pullback) are added
    once at their own t_edit, and everything that needs token embeddings refuses them in one line."""
    meta = {"source": "m", "fingerprint": "f", "hidden_size": 4}
    tokens = DirectionBank(torch.eye(4)[:2], meta, name="t")
    latent = DirectionBank(torch.eye(4)[:2], meta, name="p", config={"method": "pullback", "t_edit": 700})
    assert tokens.shift_at is None and latent.shift_at == 700
    tokens.require_tokens("unused")
    with pytest.raises(
        BankError, match=r"bank 'p' holds pullback directions \(x_t vectors added once at t = 700\)"
    ):
        latent.require_tokens("export has no form for them")
    latent.store_oracle_calibration((600, 0), [(-1.0, 1.0)] * 2, 0.5)  # not scaled per sign: kept out
    assert latent.calibration is None and latent.edit_defaults.scales is None
