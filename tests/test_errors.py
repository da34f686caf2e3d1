"""Bad input, as a user gives it on the command line: one line on stderr naming the file or key,
exit code 2, no traceback, and nothing written or lost. `--debug` shows the traceback."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank
from noiseclr.cli import app
from noiseclr.discovery.checkpoint import TrainState
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.domains import shapes

runner = CliRunner()


def bomb_png() -> bytes:
    """A valid PNG header declaring 10000 x 10000 pixels (under PIL's own refusal, over ours),
    with next to no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.fixture(scope="module")
def files(tmp_path_factory, shapes_model) -> dict[str, Path]:
    """A valid bank, a pullback bank, a damaged bank, images good and bad, configs good and bad."""
    root = tmp_path_factory.mktemp("bad-input")
    dim = shapes_model.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    base = {"source": "shapes", "fingerprint": shapes_model.fingerprint, "hidden_size": dim}
    DirectionBank(torch.randn(3, dim), base, name="b").save(root / "bank")
    side = shapes_model.resolution // shapes_model.pipe.vae_scale_factor
    DirectionBank(torch.randn(2, 4 * side * side), base, name="pb", config={"method": "pullback"}).save(
        root / "pullback"
    )
    damaged = root / "damaged"
    DirectionBank(torch.randn(3, dim), base, name="d").save(damaged)
    data = (damaged / "directions.safetensors").read_bytes()
    (damaged / "directions.safetensors").write_bytes(data[: len(data) // 2])
    Image.fromarray(shapes.to_uint8(shapes.render(shapes.sample_scenes(1, seed=0)))[0]).save(root / "ok.png")
    (root / "text.png").write_text("this is not an image")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "a-folder").mkdir()
    for name, text in {
        "typo.yaml": "k: 8\ntemprature: 0.3\n",
        "inf-tau.yaml": "tau: .inf\n",
        "zero-tau.yaml": "tau: 0\n",
        "range.yaml": "t_min: 700\nt_max: 300\n",
        "outside.yaml": "t_min: 1500\nt_max: 2000\n",
        "negatives.yaml": "k: 4\nnegatives: 4\n",
        "scales.yaml": "gallery_scales: []\n",
        "workers.yaml": "batch: 6\nworkers: 4\n",
        "syntax.yaml": "k: [8\n",
        "list.yaml": "- k\n- 8\n",
    }.items():
        (root / name).write_text(text)
    # A run in progress (step 1) trained with tau 0.5; the job below asks for tau 0.3.
    cfg = DiscoveryConfig.of(tau=0.5)
    TrainState(
        1, 1, torch.zeros(16, dim), torch.Generator().get_state(), cfg.model_dump(), shapes_model.fingerprint
    ).save(root / "run" / "checkpoints" / "step-0000001")
    (root / "tau.yaml").write_text("tau: 0.3\n")
    return root


# (name, argv: {r} the fixture folder, {b} a good bank and output, {o} an output; what the line must name)
CASES = [
    ("missing argument", "evaluate", "Missing argument 'bank'"),
    ("not an integer", "edit 0=1 {b} --seed abc", "Invalid value for '--seed'"),
    ("unknown command", "discovr", "No such command 'discovr'"),
    ("unknown config key", "discover --config {r}/typo.yaml --out {r}/o", "unknown key 'temprature'"),
    ("missing config", "discover --config {r}/nope.yaml --out {r}/o", "nope.yaml does not exist"),
    ("config is a folder", "discover --config {r}/a-folder --out {r}/o", "is a folder"),
    ("YAML syntax", "discover --config {r}/syntax.yaml --out {r}/o", "not valid YAML"),
    ("YAML not a mapping", "discover --config {r}/list.yaml --out {r}/o", "expected a mapping"),
    ("infinite tau", "discover --config {r}/inf-tau.yaml --out {r}/o", "tau: Input should be a finite"),
    (
        "zero tau",
        "discover --config {r}/zero-tau.yaml --out {r}/o",
        "tau: Input should be greater than 0",
    ),
    (
        "t_min > t_max",
        "discover --config {r}/range.yaml --out {r}/o",
        "t_min (700) must be <= t_max (300)",
    ),
    (
        "t outside the schedule",
        "discover --config {r}/outside.yaml --out {r}/o",
        "t_max (2000) is outside",
    ),
    ("negatives >= k", "discover --config {r}/negatives.yaml --out {r}/o", "k must be at least 5"),
    (
        "no gallery scales",
        "discover --config {r}/scales.yaml --out {r}/o",
        "gallery.scales: List should have at least 1 item",
    ),
    (
        "batch vs workers",
        "discover --config {r}/workers.yaml --out {r}/o",
        "divisible by distributed.workers (4)",
    ),
    ("changed config on resume", "discover --config {r}/tau.yaml --out {r}/run", "tau: 0.5 -> 0.3"),
    ("negative option", "discover --config {r}/tau.yaml --out {r}/o --workers -1", "workers"),
    ("missing bank", "edit 0=1 --bank {r}/nobank {o}", "is not a direction bank"),
    (
        "truncated bank",
        "edit 0=1 --bank {r}/damaged {o}",
        "directions.safetensors is unreadable",
    ),
    ("unknown direction", "edit 7=1 {b}", "direction 7 does not exist"),
    (
        "unknown label",
        "edit bluer=1 {b}",
        "direction 'bluer' does not exist",
    ),
    ("NaN scale", "edit 0=nan {b}", "scale must be a finite number"),
    ("not a number", "edit 0=big {b}", "scale 'big' is not a number"),
    ("malformed edit", "edit 0 {b}", "expected [bank:]direction=scale"),
    ("bad window", "edit 0=1@200-800 {b}", "t_low <= t_high"),
    ("bad sweep", "edit 0=1 --sweep 1,two {b}", "--sweep takes"),
    ("pullback in edit", "edit 0=1 --bank {r}/pullback {o}", "pullback directions"),
    ("unknown image type", "edit 0=1 --bank {r}/bank --out {r}/e.gif", "unknown image type '.gif'"),
    ("--out is a folder", "edit 0=1 --bank {r}/bank --out {r}/a-folder.png", "is a folder"),
    (
        "missing image",
        "edit 0=1 --bank {r}/bank --image {r}/no.png {o}",
        "no.png: no such file",
    ),
    (
        "image is a folder",
        "edit 0=1 --bank {r}/bank --image {r}/a-folder {o}",
        "is a folder",
    ),
    (
        "not an image",
        "edit 0=1 --bank {r}/bank --image {r}/text.png {o}",
        "text.png: not a readable",
    ),
    (
        "truncated image",
        "edit 0=1 --bank {r}/bank --image {r}/truncated.png {o}",
        "truncated.png",
    ),
    (
        "decompression bomb",
        "edit 0=1 --bank {r}/bank --image {r}/bomb.png {o}",
        "more than the 64 MP",
    ),
    ("export-ti of pullback", "export-ti {r}/pullback --out {r}/ti", "no textual-inversion form"),
    (
        "repeated --fix",
        "evaluate {r}/bank --fix x=left --fix x=right --out {r}/ev",
        "--fix x is given twice",
    ),
    ("unknown --fix word", "evaluate {r}/bank --fix x=upstairs --out {r}/ev", "fixed x='upstairs'"),
    ("prompt outside the world", "generate --prompt 'a blue dog' --n 1 --out {r}/g.png", "does not know"),
    (
        "unknown model",
        "generate --prompt 'a red circle' --model nomodel --out {r}/g.png",
        "unknown model 'nomodel'",
    ),
]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name, argv, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written_or_lost(files, name, argv, named):
    import shlex

    (files / "a-folder.png").mkdir(exist_ok=True)
    before = snapshot(files)
    b, o = f"--bank {files}/bank --out {files}/e.png", f"--out {files}/e.png"
    result = runner.invoke(app, shlex.split(argv.format(r=files, b=b, o=o)))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(files) == before, "a refused command wrote or changed files"


def test_debug_shows_the_traceback(files):
    result = runner.invoke(app, ["--debug", "edit", "0=nan", "--bank", str(files / "bank"), "--out", "x.png"])
    assert result.exit_code != 0 and result.exit_code != 2
    assert type(result.exception).__name__ == "EditError"


def test_a_bug_keeps_its_traceback(monkeypatch, files):
    from noiseclr.bank import record as bank_mod

    def broken(*a, **k):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(bank_mod.DirectionBank, "load", broken)
    result = runner.invoke(app, ["export-ti", str(files / "bank"), "--out", str(files / "ti")])
    assert isinstance(result.exception, KeyError)


def test_the_registry_commands_say_what_they_need_in_one_line(monkeypatch):
    """`noiseclr banks ...` without a tracking server, or without mlflow installed (an optional
    extra): one line saying what to do, never a traceback."""
    import sys

    from noiseclr.errors import StorageError
    from noiseclr.tracking.registry import require_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(StorageError, match="set MLFLOW_TRACKING_URI"):
        require_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as when the track extra is not installed
    with pytest.raises(StorageError, match=r"pip install 'noiseclr\[track\]'"):
        require_tracking_uri()
