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


def test_config_migrate_writes_a_flat_job_in_sections_and_keeps_the_old_one(tmp_path):
    old = tmp_path / "job.yaml"
    old.write_text(
        "# my job\nname: mine\nk: 8\nnegatives: 3\nsteps: 40\ngallery_prompt: a shape\nworkers: 2\n"
    )
    done = runner.invoke(app, ["config", "migrate", str(old), "--write"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "job.yaml.flat").read_text().startswith("# my job")
    text = old.read_text()
    assert text.startswith("kind: discover\nname: mine\n") and "method:\n  k: 8\n" in text
    assert "distributed:\n  workers: 2\n" in text and "gallery:\n  prompt: a shape\n" in text
    (tmp_path / "two.yaml").write_text("k: 8\nnegatives: 3\n")
    (tmp_path / "two.yaml.flat").write_text("kept")
    refused = runner.invoke(app, ["config", "migrate", str(tmp_path / "two.yaml"), "--write"])
    assert refused.exit_code == 2 and "two.yaml.flat exists" in refused.stderr
    assert (tmp_path / "two.yaml.flat").read_text() == "kept" and "kind" not in (
        tmp_path / "two.yaml"
    ).read_text()
    again = runner.invoke(app, ["config", "migrate", str(old)])
    assert again.exit_code == 2 and "already declares kind: discover" in again.stderr
