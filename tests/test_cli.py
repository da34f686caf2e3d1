from PIL import Image
from typer.testing import CliRunner

from noiseclr.cli import app
from noiseclr.domains.dataset import read_table

runner = CliRunner()


def test_generate_writes_a_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "a blue square",
            "--n",
            "4",
            "--steps",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.size[0] > 128 and img.mode == "RGB"
    assert "s/image" in result.output


def test_generate_rejects_unknown_words(tmp_path):
    result = runner.invoke(
        app, ["generate", "--prompt", "a blue dog", "--n", "1", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2
    assert "does not know" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_world_make_with_fixed_factor(tmp_path):
    result = runner.invoke(
        app, ["world", "make", "--out", str(tmp_path / "w"), "--n", "6", "--fix", "pattern=striped"]
    )
    assert result.exit_code == 0, result.output
    table = read_table(str(tmp_path / "w"))
    assert set(table.column("pattern_word").to_pylist()) == {"striped"}


def test_world_make_rejects_a_bad_fix(tmp_path):
    result = runner.invoke(app, ["world", "make", "--out", str(tmp_path / "w"), "--fix", "pattern"])
    assert result.exit_code != 0
    assert "factor=word" in result.output
