"""Direction banks, batched noise evaluation and the single-process trainer."""

import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from noiseclr.bank import DirectionBank, merge_banks, subset
from noiseclr.conditioning import direction_deltas, direction_deltas_sequential, encode_directions
from noiseclr.data import images as images_mod
from noiseclr.data.images import encode_latents, load_images, load_latents
from noiseclr.discovery import checkpoint
from noiseclr.discovery import step as step_mod
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.discovery.trainer import DiscoveryTrainer, start_state
from noiseclr.domains import shapes
from noiseclr.errors import BankError, CheckpointError, ConfigError, TrainingDiverged
from noiseclr.utils import parallel
from noiseclr.workflows.discover import bank_from_state
from records import scores


def small_cfg(**kw) -> DiscoveryConfig:
    base = dict(k=6, negatives=3, batch=3, steps=6, checkpoint_every=2, n_images=8, warmup=2)
    return DiscoveryConfig.of(**{**base, **kw})


def trainer(cfg: DiscoveryConfig, model, latents, out) -> DiscoveryTrainer:
    """A trainer from OUT's latest checkpoint (or step 0), as the workflow builds it."""
    state, _ = start_state(cfg, model, out)
    return DiscoveryTrainer(cfg, model, latents, state)


def train(cfg: DiscoveryConfig, model, latents, out) -> DirectionBank:
    return bank_from_state(cfg, model, trainer(cfg, model, latents, out).fit(out), {})


@pytest.fixture(scope="module")
def latents(tiny_model):
    from noiseclr.data.images import encode_latents

    return encode_latents(tiny_model.pipe.vae, shapes.render(shapes.sample_scenes(8, seed=0)) * 2 - 1)


def frozen_state(model) -> dict[str, torch.Tensor]:
    pipe = model.pipe
    return {
        f"{name}.{k}": v.clone()
        for name in ("unet", "text_encoder", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def test_batched_deltas_equal_the_one_call_per_direction_loop(tiny_model):
    pipe = tiny_model.pipe
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(5, pipe.text_encoder.config.hidden_size, generator=g)
    x_t, t = torch.randn(3, 4, 16, 16, generator=g), torch.full((3,), 400)
    batched = direction_deltas(pipe.unet, pipe.text_encoder, pipe.tokenizer, dirs, x_t, t)
    chunked = direction_deltas(pipe.unet, pipe.text_encoder, pipe.tokenizer, dirs, x_t, t, max_rows=4)
    loop = direction_deltas_sequential(pipe.unet, pipe.text_encoder, pipe.tokenizer, dirs, x_t, t)
    assert batched.shape == (3, 5, 4, 16, 16)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, loop, atol=1e-5, rtol=1e-4)


def test_one_text_encoder_call_and_one_unet_call_per_step(tiny_model, latents, tmp_path):
    seen: list[str] = []  # list.append is atomic: the UNet may run on several threads
    pipe = tiny_model.pipe
    h1 = pipe.unet.register_forward_hook(lambda *a: seen.append("unet"))
    h2 = pipe.text_encoder.register_forward_hook(lambda *a: seen.append("text"))
    try:
        train(small_cfg(steps=3), tiny_model, latents, tmp_path)
    finally:
        h1.remove()
        h2.remove()
    # one UNet call per stream (a CPU's cores split the images: core.AdamWEngine), one text call
    calls = {name: seen.count(name) for name in ("unet", "text")}
    assert calls == {"unet": 3 * parallel.streams("cpu", small_cfg().method.batch), "text": 3}


def test_only_the_directions_train(tiny_model, latents, tmp_path):
    before = frozen_state(tiny_model)
    tr = trainer(small_cfg(), tiny_model, latents, tmp_path)
    init = tr.directions.detach().clone()
    bank = bank_from_state(small_cfg(), tiny_model, tr.fit(tmp_path), {})
    after = frozen_state(tiny_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not torch.equal(init, bank.directions)
    assert [p for p in tr.opt.param_groups[0]["params"]] == [tr.directions]


def test_exact_resume(tiny_model, latents, tmp_path):
    straight = train(small_cfg(), tiny_model, latents, tmp_path / "a")
    first = trainer(small_cfg(), tiny_model, latents, tmp_path / "b")
    first.fit(tmp_path / "b", stop_after=3)  # "interrupted" after step 3
    assert first.step == 3
    del first
    resumed = trainer(small_cfg(), tiny_model, latents, tmp_path / "b")
    assert resumed.step == 2 and resumed.micro == 2  # the last checkpoint (every 2 steps)
    state = resumed.fit(tmp_path / "b")
    assert resumed.step == 6
    assert torch.equal(state.directions, straight.directions)
    # the rate: this process's steps 4..6 (its first, 3, holds the warm-up), over their own seconds
    cfg = small_cfg()
    pairs = cfg.method.batch * cfg.method.directions_per_step * cfg.optim.grad_accum
    mine = [h["seconds"] for h in resumed.history[2:]]  # it resumed at step 2
    assert len(resumed.history) == 6 and resumed.pairs_per_s == pytest.approx(pairs * 3 / sum(mine[1:]))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_and_loses_nothing(
    tiny_model, latents, tmp_path, caplog
):
    """Fault table: the newest checkpoint's tensors flipped in place (still parseable: only the
    checksum catches it) -> resume from the previous one, say so, and end on the same bank."""
    straight = train(small_cfg(), tiny_model, latents, tmp_path / "a")
    first = trainer(small_cfg(), tiny_model, latents, tmp_path / "b")
    first.fit(tmp_path / "b", stop_after=4)  # checkpoints at steps 2 and 4
    newest = checkpoint.latest(tmp_path / "b")
    assert newest.name == "step-0000004"
    data = bytearray((newest / checkpoint.STATE_TENSORS).read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last values flipped: the file still loads
    (newest / checkpoint.STATE_TENSORS).write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="noiseclr.discovery.checkpoint"):
        resumed = trainer(small_cfg(), tiny_model, latents, tmp_path / "b")
    assert resumed.step == 2
    assert "does not match its checksum" in caplog.text and "falling back to the previous" in caplog.text
    assert "instead of the corrupt step-0000004" in caplog.text
    assert torch.equal(resumed.fit(tmp_path / "b").directions, straight.directions)
    for path in checkpoint.candidates(tmp_path / "b"):
        (path / checkpoint.STATE_META).write_text("{")  # truncated: every one corrupt
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is corrupt .*use --fresh"):
        trainer(small_cfg(), tiny_model, latents, tmp_path / "b")


def test_sigterm_checkpoints_at_once_and_the_rerun_loses_no_step(tiny_model, latents, tmp_path):
    """Fault table: a preemption notice (SIGTERM) mid-run -> the step under way finishes, a
    checkpoint is written though none was due, Preempted says where; the same job resumes
    there and ends on the bank of an uninterrupted run."""
    import os
    import signal

    from noiseclr.errors import Preempted

    job = small_cfg(checkpoint_every=5)  # due at 5 and 6 only
    straight = train(job, tiny_model, latents, tmp_path / "a")
    first = trainer(job, tiny_model, latents, tmp_path / "b")
    first.on_step = lambda record: os.kill(os.getpid(), signal.SIGTERM) if record["step"] == 3 else None
    with pytest.raises(Preempted, match=r"SIGTERM after step 3 of 6: checkpoint .*step-0000003 written"):
        first.fit(tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    resumed = trainer(job, tiny_model, latents, tmp_path / "b")
    assert resumed.step == 3
    assert torch.equal(resumed.fit(tmp_path / "b").directions, straight.directions)
    last = trainer(small_cfg(checkpoint_every=5, steps=7), tiny_model, latents, tmp_path / "c")
    last.on_step = lambda record: os.kill(os.getpid(), signal.SIGTERM) if record["step"] == 7 else None
    with pytest.raises(Preempted, match="after step 7 of 7"):  # not swallowed at the last step
        last.fit(tmp_path / "c")


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tiny_model, tmp_path, monkeypatch):
    """Fault table: the disk fills up half way through a checkpoint -> one error naming where it
    was writing and the checkpoint kept; nothing half-written is taken by a resume."""
    from noiseclr.discovery.trainer import initial_state

    cfg = small_cfg()
    state = initial_state(cfg, tiny_model)
    previous = checkpoint.write(tmp_path, state, keep=2)
    real = checkpoint.save_file

    def half_then_full(tensors, path, *args, **kw):
        real(tensors, path, *args, **kw)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    state.step = 2
    with pytest.raises(
        CheckpointError,
        match=r"step-0000002 failed \(.*No space left.*\); the previous checkpoint .*step-0000000 is intact",
    ):
        checkpoint.write(tmp_path, state, keep=2)
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == [previous.name]
    assert checkpoint.newest_readable(tmp_path)[1] == previous


@pytest.mark.parametrize(
    "change, named",
    [
        ({"tau": 0.3}, "method.tau: 0.5 -> 0.3"),
        ({"lr": 0.01}, "optim.lr: 0.001 -> 0.01"),
        ({"k": 7}, "method.k: 6 -> 7"),
        ({"n_images": 6}, "data.n_images: 8 -> 6"),
        ({"precision": "bf16"}, "optim.precision: 'fp32' -> 'bf16'"),
    ],
)
def test_resume_with_a_changed_config_is_refused_naming_the_keys(
    tiny_model, latents, tmp_path, change, named
):
    trainer(small_cfg(), tiny_model, latents, tmp_path).fit(tmp_path, stop_after=2)
    with pytest.raises(ConfigError, match=f"another config \\({named}\\).*--fresh"):
        trainer(small_cfg(**change), tiny_model, latents, tmp_path)
    # sections that do not define what is learnt may change, and more steps under a constant lr
    other = dict(gallery_seeds=1, evaluate_windows=[600, 800], checkpoint_every=3, storage_options={"a": 1})
    more = trainer(small_cfg(steps=8, **other), tiny_model, latents, tmp_path)
    assert more.step == 2
    with pytest.raises(ConfigError, match=r"optim\.steps: 6 -> 8"):  # a cosine schedule ends at its steps
        trainer(small_cfg(steps=8, schedule="cosine"), tiny_model, latents, tmp_path)


def test_a_checkpoint_written_before_the_sections_resumes_through_the_flat_names(
    tiny_model, latents, tmp_path
):
    trainer(small_cfg(), tiny_model, latents, tmp_path).fit(tmp_path, stop_after=2)
    meta = next((tmp_path / "checkpoints").glob("step-*")) / checkpoint.STATE_META
    saved = json.loads(meta.read_text())
    saved["config"] = small_cfg().record()  # the flat layout every checkpoint had before
    assert "kind" not in saved["config"] and saved["config"]["tau"] == 0.5
    meta.write_text(json.dumps(saved))
    assert trainer(small_cfg(gallery_seeds=1), tiny_model, latents, tmp_path).step == 2
    with pytest.raises(ConfigError, match=r"another config \(method.tau: 0.5 -> 0.3\)"):
        trainer(small_cfg(tau=0.3), tiny_model, latents, tmp_path)


def test_a_checkpoint_that_predates_a_key_resumes_at_its_default(tiny_model, latents, tmp_path):
    trainer(small_cfg(), tiny_model, latents, tmp_path).fit(tmp_path, stop_after=2)
    meta = next((tmp_path / "checkpoints").glob("step-*")) / checkpoint.STATE_META
    saved = json.loads(meta.read_text())
    del saved["config"]["method"]["direction_norm"]  # as written before the key existed
    meta.write_text(json.dumps(saved))
    assert trainer(small_cfg(), tiny_model, latents, tmp_path).step == 2
    with pytest.raises(ConfigError, match=r"method\.direction_norm: 'free' -> 'vocab'"):
        trainer(small_cfg(direction_norm="vocab"), tiny_model, latents, tmp_path)


def test_init_vocab_copies_distinct_non_special_token_rows(tiny_model):
    from noiseclr.discovery.initial import init_directions

    pipe = tiny_model.pipe
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    rows = init_directions(
        pipe.text_encoder, 6, torch.Generator().manual_seed(3), pipe.tokenizer, from_vocab=True
    )
    ids = [int((table - r).abs().sum(1).argmin()) for r in rows]
    assert all(torch.equal(rows[n], table[i]) for n, i in enumerate(ids))  # exact copies
    assert len(set(ids)) == 6 and not set(ids) & set(pipe.tokenizer.all_special_ids)
    again = init_directions(
        pipe.text_encoder, 6, torch.Generator().manual_seed(3), pipe.tokenizer, from_vocab=True
    )
    assert torch.equal(rows, again)  # drawn from the run's generator


def test_direction_norm_vocab_trains_directions_at_the_token_tables_norm(tiny_model, latents, tmp_path):
    pipe = tiny_model.pipe
    norm = pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=1).mean()
    cfg = small_cfg(direction_norm="vocab", lr=0.05)
    tr = trainer(cfg, tiny_model, latents, tmp_path / "v")
    # what the loss sees: the raw parameter rescaled, against a plain computation
    g = torch.Generator().manual_seed(1)
    x_t, t, dirs = torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), 300), torch.tensor([0, 2])
    with torch.no_grad():
        tr.directions.mul_(torch.tensor([[3.0], [1.0], [0.5], [1.0], [1.0], [1.0]]))  # off the norm
        raw = tr.directions[dirs]
        plain = direction_deltas(
            pipe.unet, pipe.text_encoder, pipe.tokenizer, raw / raw.norm(dim=1, keepdim=True) * norm, x_t, t
        )
        torch.testing.assert_close(tr.deltas(x_t, t, dirs), plain)
    bank = bank_from_state(cfg, tiny_model, tr.fit(tmp_path / "v"), {})
    torch.testing.assert_close(bank.directions.norm(dim=1), norm.expand(6))
    free = train(small_cfg(lr=0.05), tiny_model, latents, tmp_path / "f")
    assert (free.directions.norm(dim=1) - norm).abs().max() > 1e-2  # free directions leave it


@pytest.mark.parametrize("loss", ["paper", "symmetric"])
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(
    tiny_model, latents, tmp_path, monkeypatch, loss
):
    name = "noiseclr_loss" if loss == "paper" else "symmetric_noiseclr_loss"
    real = getattr(step_mod, name)
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(step_mod, name, flaky)
    tr = trainer(small_cfg(loss=loss), tiny_model, latents, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"step 4.*Last good checkpoint.*step-0000004"):
        tr.fit(tmp_path)
    assert torch.isfinite(tr.directions).all()
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step-0000004"
    assert json.loads((latest / "state.json").read_text())["step"] == 4


def test_bank_round_trip_and_checks(tiny_model, shapes_model, tmp_path):
    bank = train(small_cfg(steps=2), tiny_model, torch.randn(8, 4, 16, 16), tmp_path)
    bank.labels = {bank.tokens[1]: {"auto": "hue+", "human": "redder"}}
    bank.save(tmp_path / "bank")
    names = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert names == ["bank.json", "directions.safetensors"]  # the card is its readers' (card.save_bank)
    again = DirectionBank.load(tmp_path / "bank", tiny_model)
    assert torch.equal(again.directions, bank.directions)
    assert again.config["k"] == 6 and again.index("redder") == 1 and again.index("hue+") == 1
    with pytest.raises(BankError, match="direction 'sideways' does not exist"):
        again.index("sideways")
    with pytest.raises(BankError, match="direction 9 does not exist"):
        again.index(9)
    with pytest.raises(BankError, match="32-dim directions but the model's token embeddings are 128-dim"):
        DirectionBank.load(tmp_path / "bank", shapes_model)
    other = DirectionBank(torch.randn(3, 32), {"source": "other", "fingerprint": "abc"}, name="o")
    with pytest.raises(BankError, match="learnt on base model 'other'"):
        other.check_model(tiny_model)
    with pytest.raises(BankError, match="is not a direction bank"):
        DirectionBank.load(tmp_path)


def _bank(name, rows, fingerprint="f1", **kw):
    return DirectionBank(rows, {"source": "m", "fingerprint": fingerprint, "hidden_size": 4}, name=name, **kw)


def test_merged_banks_keep_each_directions_label_window_scales_and_origin(tmp_path):
    oracle = {"window": [600, 0], "target_effect": 0.5, "calibration": "oracle"}
    a = _bank("a", torch.eye(4)[:2], config={"gallery_prompt": "p", "k": 2, "seed": 0})
    a.labels = {"<a-1>": {"auto": "hue+"}}
    a.edit_defaults = {**oracle, "scales": [[-1.0, 2.0], [-4.0, 4.0]]}
    b = _bank("b", torch.eye(4)[2:] * 3, config={"gallery_prompt": "p", "k": 2, "seed": 1})
    b.labels = {"<b-0>": {"auto": "size-", "human": "smaller"}}
    b.edit_defaults = {**oracle, "scales": [[-8.0, 8.0], [-2.0, 1.0]]}
    m = merge_banks([a, b], "both", refs=["runs/a", "runs/b"])
    assert torch.equal(m.directions, torch.cat([a.directions, b.directions]))
    assert m.tokens == ["<both-0>", "<both-1>", "<both-2>", "<both-3>"]
    assert m.labels == {"<both-1>": {"auto": "hue+"}, "<both-2>": {"auto": "size-", "human": "smaller"}}
    assert m.edit_defaults.dump() == {
        **oracle,
        "scales": [[-1.0, 2.0], [-4.0, 4.0], [-8.0, 8.0], [-2.0, 1.0]],
    }
    assert [(o["ref"], o["token"]) for o in m.config["origin"]] == [
        ("runs/a", "<a-0>"),
        ("runs/a", "<a-1>"),
        ("runs/b", "<b-0>"),
        ("runs/b", "<b-1>"),
    ]
    assert m.config["gallery_prompt"] == "p" and "seed" not in m.config  # seeds differ: the sources' own
    assert [src["config"]["seed"] for src in m.config["sources"]] == [0, 1]
    # a subset carries its directions' figures; the origin survives a second merge
    s = subset(m, [3, 1])
    assert torch.equal(s.directions, m.directions[[3, 1]]) and s.tokens == ["<both-0>", "<both-1>"]
    assert s.labels == {"<both-1>": {"auto": "hue+"}} and s.edit_defaults.dump()["scales"] == [
        [-2.0, 1.0],
        [-4.0, 4.0],
    ]
    assert [o["token"] for o in s.config["origin"]] == ["<b-1>", "<a-1>"]
    again = DirectionBank.load(s.save(tmp_path / "s"))
    assert again.labels == s.labels and again.config["origin"] == s.config["origin"]
    assert merge_banks([again, a], "x").config["origin"][0] == {
        "bank": "b",
        "token": "<b-1>",
        "ref": "runs/b",
    }
    with pytest.raises(BankError, match="distinct indices"):
        subset(m, [1, 1])


def test_the_shipped_merged_bank_holds_the_shipped_main_banks_directions():
    """pretrained/banks/shapes-merged is `noiseclr merge` of the main job's shipped bank and the
    both-forms job's bank: re-shipping the main job's bank without merging again fails here."""
    banks = Path(__file__).parents[1] / "platform/noiseclr/pretrained/banks"
    merged, main = DirectionBank.load(banks / "shapes-merged"), DirectionBank.load(banks / "shapes")
    origin = merged.config["origin"]
    mine = [i for i, o in enumerate(origin) if o["ref"] == "platform/noiseclr/pretrained/banks/shapes"]
    assert [origin[i]["token"] for i in mine] == main.tokens
    assert torch.equal(merged.directions[mine], main.directions)
    assert len(merged) > len(main) and merged.edit_defaults.dump()["calibration"] == "oracle"


def test_merging_refuses_other_models_and_drops_scales_calibrated_differently():
    a = _bank("a", torch.eye(4)[:2])
    a.edit_defaults = {"window": [600, 0], "scales": [[-1.0, 1.0]] * 2, "calibration": "oracle"}
    b = _bank("b", torch.eye(4)[2:])
    b.edit_defaults = {"window": [800, 0], "scales": [[-2.0, 2.0]] * 2, "calibration": "blind"}
    m = merge_banks([a, b], "m")
    assert not m.measured  # the next measurement calibrates them all alike
    assert m.edit_defaults.dump()["windows"] == [[600, 0], [600, 0], [800, 0], [800, 0]]
    with pytest.raises(BankError, match="learnt on base model"):
        merge_banks([a, _bank("c", torch.eye(4), fingerprint="f2")], "m")
    with pytest.raises(BankError, match="3-dim directions"):
        merge_banks([a, _bank("c", torch.eye(3))], "m")
    with pytest.raises(BankError, match="at least two banks"):
        merge_banks([a], "m")


def test_textual_inversion_export_loads_with_diffusers(shapes_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from noiseclr.export import export_bank
    from noiseclr.models.base import EMBEDDED

    hidden = shapes_model.pipe.text_encoder.config.hidden_size
    bank = DirectionBank(torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)), {}, name="ti")
    paths = export_bank(bank, tmp_path / "ti", "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED["shapes"], safety_checker=None)
    pipe.load_textual_inversion([str(p) for p in paths])
    ids = pipe.tokenizer.convert_tokens_to_ids(bank.tokens)
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], bank.directions)
    # The prompt "<ti-1>" through diffusers' tokenizer equals our direct direction encoding.
    prompt_ids = pipe.tokenizer(
        bank.tokens[1], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        via_tokens = pipe.text_encoder(prompt_ids)[0]
        ours = encode_directions(
            shapes_model.pipe.text_encoder, shapes_model.pipe.tokenizer, bank.directions
        )[1:2]
    torch.testing.assert_close(via_tokens, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"k": 1}, "method.k: Input should be greater than or equal to 2"),
        ({"k": 4, "negatives": 4}, "method: negatives \\(4\\) must be < k \\(4\\)"),
        ({"batch": 1}, "method.batch"),
        ({"t_min": 800, "t_max": 200}, "method: t_min \\(800\\) must be <= t_max \\(200\\)"),
        ({"tau": 0}, "method.tau"),
        ({"stepz": 3}, "unknown key 'stepz' \\(did you mean 'steps'\\?\\)"),
        ({"loss": "triplet"}, "method.loss"),
        ({"gallery_scales": []}, "gallery.scales: List should have at least 1 item"),
        ({"edit_window": 0}, "evaluation.edit_window"),
        ({"workers": 4}, "method.batch \\(6\\) must be divisible by distributed.workers \\(4\\)"),
        ({"storage_options": {"secret": "x"}}, "storage.options.secret looks like a credential"),
    ],
)
def test_bad_config_is_rejected_in_one_line_naming_the_section_and_key(kw, message):
    with pytest.raises(ConfigError, match=message) as err:
        DiscoveryConfig.of(**kw)
    assert "\n" not in str(err.value)


def test_config_from_yaml_rejects_unknown_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("kind: discover\nmethod: {k: 8, negativs: 3}\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: unknown key 'method.negativs' \(did you mean 'negatives'\?\)"
    ):
        DiscoveryConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "f.yaml").write_text("k: 8\ntemprature: 0.3\n")  # the flat layout: the same check
    with pytest.raises(ConfigError, match=r"f\.yaml: unknown key 'temprature'"):
        DiscoveryConfig.from_yaml(tmp_path / "f.yaml")
    (tmp_path / "m.yaml").write_text("kind: discover\nworkers: 2\ndata: s3://b/x\ngallery: false\n")
    placed = r"workers -> distributed\.workers, data -> data\.uri, gallery -> gallery\.enabled"
    with pytest.raises(
        ConfigError, match=r"m\.yaml: keys of a file with `kind` belong in their sections: " + placed
    ):
        DiscoveryConfig.from_yaml(tmp_path / "m.yaml")
    (tmp_path / "n.yaml").write_text("method: {k: 8}\n")  # sections without a declared kind
    with pytest.raises(ConfigError, match=r"n\.yaml has sections \(method\) but declares no kind"):
        DiscoveryConfig.from_yaml(tmp_path / "n.yaml")
    assert DiscoveryConfig.from_yaml("jobs/shapes.yaml").name == "shapes"


def test_every_field_has_one_flat_name_and_the_record_round_trips():
    from noiseclr.discovery.config import FLAT, SECTIONS

    fields = {(s, f) for s, schema in SECTIONS.items() for f in schema.model_fields} | {("name",), ("model",)}
    assert set(FLAT.values()) == fields and len(FLAT) == len(fields)
    cfg = DiscoveryConfig.from_yaml("jobs/sd15-faces-6gpu.yaml")
    record = cfg.record()  # what bank.json and MLflow params keep, under the names banks always had
    assert record["k"] == 100 and record["storage_path"] == "s3://noiseclr-runs/sd15-faces"
    assert DiscoveryConfig.from_saved(record) == cfg and DiscoveryConfig.from_saved(cfg.model_dump()) == cfg


def test_an_old_flat_job_file_reads_the_same_with_a_notice_and_migrates(tmp_path, caplog):
    from noiseclr.discovery.config import migrate

    flat = DiscoveryConfig.from_yaml("jobs/shapes.yaml").record()  # the layout job files had
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(flat))
    with caplog.at_level("WARNING"):
        old = DiscoveryConfig.from_yaml(tmp_path / "old.yaml")
    assert old == DiscoveryConfig.from_yaml("jobs/shapes.yaml")
    notice = [r.getMessage() for r in caplog.records if "flat layout" in r.getMessage()]
    assert len(notice) == 1 and "noiseclr config migrate" in notice[0] and "\n" not in notice[0]
    (tmp_path / "new.yaml").write_text(migrate(tmp_path / "old.yaml"))
    assert yaml.safe_load((tmp_path / "new.yaml").read_text())["kind"] == "discover"
    assert DiscoveryConfig.from_yaml(tmp_path / "new.yaml") == old
    with pytest.raises(ConfigError, match="already declares kind: discover"):
        migrate(tmp_path / "new.yaml")
    # overrides, sweeps and tests name keys by the same flat names; what was not set stays unset
    assert old.replace(steps=9, gallery=False).optim.steps == 9
    job = DiscoveryConfig.from_yaml("jobs/shapes.yaml")
    assert job.replace(evaluate=False).unused_distributed() == []
    assert job.replace(zero_stage=3).unused_distributed() == ["distributed.zero_stage"]
    assert DiscoveryConfig.from_saved(job.model_dump(exclude_unset=True)) == job  # a sweep's saved job
    assert DiscoveryConfig.from_yaml("jobs/shapes.yaml", steps=9, workers=2).distributed.workers == 2


def test_every_config_suggests_its_own_keys_for_a_misspelt_one(tmp_path):
    from noiseclr.serving.config import ServeConfig
    from noiseclr.workflows.sweep import SweepConfig

    (tmp_path / "s.yaml").write_text("banks: {a: x}\nhide_ded: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'hide_ded' \(did you mean 'hide_dead'\?\)"):
        ServeConfig.from_yaml(tmp_path / "s.yaml")  # a serve key, not the closest discovery key
    (tmp_path / "w.yaml").write_text("job: j.yaml\nnum_sample: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'num_sample' \(did you mean 'num_samples'\?\)"):
        SweepConfig.from_yaml(tmp_path / "w.yaml")


SHAPES_JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("shapes*.yaml"))


@pytest.mark.parametrize("job", SHAPES_JOBS, ids=lambda p: p.name)
def test_every_shapes_job_file_is_a_valid_config(job):
    """The job files the docs tell users to run: a renamed key or a delta_energy list of the
    wrong length would otherwise fail only when someone runs them."""
    assert DiscoveryConfig.from_yaml(job).model == ("shapes-xl" if job.stem == "shapes-xl" else "shapes")


def test_image_folder_with_corrupt_files(tmp_path):
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(3, seed=0), 80))):
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        (tmp_path / f"{i}.png").write_bytes(buf.getvalue())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "0.png").read_bytes()[:100])
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(str(tmp_path), 64, progress=False)
    assert images.pixels.shape == (3, 3, 64, 64)
    assert len(images.bad_files) == 2
    assert images.pixels.min() >= -1 and images.pixels.max() <= 1


def test_latents_stream_a_batch_at_a_time_and_equal_encoding_every_image_at_once(
    tiny_model, tmp_path, monkeypatch
):
    """The single process's domain: each batch is encoded as soon as it is decoded, so a process
    holds one batch of pixels (3 MiB an image at 512 px), not the domain's; the latents are the
    same as decoding everything and encoding that, batch for batch."""
    for i, px in enumerate(shapes.to_uint8(shapes.render(shapes.sample_scenes(5, seed=1), 64))):
        Image.fromarray(px).save(tmp_path / f"{i}.png")
    (tmp_path / "2-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    vae = tiny_model.pipe.vae
    pixels = load_images(str(tmp_path), 64, progress=False).pixels
    reference = encode_latents(vae, pixels, batch=2)  # conv numerics vary with the batch's size
    at_once = encode_latents(vae, pixels)
    decoded, seen = [0], []
    real_decode, real_encode = images_mod.decode_image, vae.encode

    def counting_decode(*args, **kw):
        decoded[0] += 1
        return real_decode(*args, **kw)

    def recording_encode(x):
        seen.append((decoded[0], len(x)))  # files decoded so far, images in this call
        return real_encode(x)

    monkeypatch.setattr(images_mod, "decode_image", counting_decode)
    monkeypatch.setattr(vae, "encode", recording_encode)
    got = load_latents(str(tmp_path), 64, vae, progress=False, batch=2)
    torch.testing.assert_close(got.latents, reference, atol=0, rtol=0)
    torch.testing.assert_close(got.latents, at_once, atol=1e-3, rtol=0)
    assert len(got.files) == 5 and [Path(f).name for f in got.bad_files] == ["2-broken.png"]
    assert seen == [(2, 2), (5, 2), (6, 1)]  # the broken file is decoded (and dropped) in batch 2
    assert len(load_latents(str(tmp_path), 64, vae, limit=3, progress=False, batch=2).latents) == 3


def test_empty_or_unreadable_image_folders(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_images(str(tmp_path), 64)
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"none of the images .* could be read \(1 corrupt\)"):
        load_images(str(tmp_path), 64)
    with pytest.raises(ValueError, match="does not exist"):
        load_images(str(tmp_path / "missing"), 64)


def test_batch_larger_than_the_data(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="batch \\(6\\) is larger than the number of images \\(4\\)"):
        trainer(small_cfg(batch=6), tiny_model, torch.randn(4, 4, 16, 16), tmp_path)


def test_direction_conditioning_is_reentrant_across_threads(tiny_model):
    """Two threads encode different direction tables on one text encoder at once (as an edit batch
    and a thumbnail render do on one replica): each gets its own table's states, every time.
    Swapping the encoder's embedding module per call gave the other thread's rows or an IndexError."""
    import sys
    import threading

    pipe = tiny_model.pipe
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    tables = [torch.randn(n, width, generator=torch.Generator().manual_seed(n)) for n in (2, 7)]
    with torch.no_grad():
        alone = [encode_directions(pipe.text_encoder, pipe.tokenizer, d) for d in tables]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def encode(i: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for _ in range(150):
                    got = encode_directions(pipe.text_encoder, pipe.tokenizer, tables[i])
                    torch.testing.assert_close(got, alone[i], atol=1e-6, rtol=0)
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=encode, args=(i,)) for i in (0, 1)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[0]
    # Outside any `directions_in` the encoder is its plain self: ordinary ids encode as before and
    # a direction id is a clear error, not another call's row.
    state = pipe.text_encoder.state_dict()
    assert "text_model.embeddings.token_embedding.weight" in state or any(
        k.endswith("token_embedding.weight") for k in state
    )
    vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
    with pytest.raises(IndexError, match="direction id 0 of a 0-row table"):
        pipe.text_encoder(torch.tensor([[0, vocab, 1]]))


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("tokens", ["<../../x>", "<b>"], "token '<../../x>'"),
        ("tokens", ["<a/b>", "<b>"], "token '<a/b>'"),
        ("tokens", ["plain", "<b>"], "token 'plain'"),
        ("tokens", ["<a>", "<a>"], "share one token"),
        ("name", "../up", "bank name '../up'"),
    ],
)
def test_a_bank_whose_names_would_be_paths_is_refused_on_load(tmp_path, field, value, says):
    """Tokens become export-ti file names: a registry bank with "<../../x>" would write outside."""
    bank = DirectionBank(torch.randn(2, 8), {"source": "x", "fingerprint": "f", "hidden_size": 8}, name="ok")
    bank.save(tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    (tmp_path / "bank" / "bank.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(BankError, match=re.escape(says)):
        DirectionBank.load(tmp_path / "bank")
    assert not (tmp_path.parent / "x.safetensors").exists()


def test_the_bank_owns_its_window_label_and_state_rules():
    """What `noiseclr edit`, the card, the gallery, the export and the endpoint show of a
    direction comes from one place: the bank."""
    bank = _bank("r", torch.randn(3, 4))
    assert bank.window() == bank.window(1) == (1000, 0)  # nothing recorded: the whole schedule
    assert bank.label(0) is None and bank.state(0) == "unmeasured" and bank.duplicate_of(0) is None
    bank.edit_defaults = {"window": [600, 0], "windows": [[800, 0], [600, 200], [400, 0]]}
    assert bank.window() == (600, 0) and bank.window(1) == (600, 200)
    bank.labels = {"<r-0>": {"auto": "hue+"}, "<r-1>": {"auto": "hue-", "human": "redder"}}
    assert (bank.label(0), bank.label(1), bank.label(2)) == ("hue+", "redder", None)
    bank.scores = scores([{}, {"dead": True}, {"duplicate_of": 0}])
    assert [bank.state(i) for i in range(3)] == ["live", "dead", "duplicate"] and bank.duplicate_of(2) == 0
    bank.scores.directions[2].duplicate_of = 7  # a damaged record names no direction: not a duplicate of one
    assert bank.state(2) == "live" and bank.duplicate_of(2) is None
