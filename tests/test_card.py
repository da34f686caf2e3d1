"""The bank card (README.md in Hugging Face's model-card form): pure text from a bank's record."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from noiseclr.bank import DirectionBank
from noiseclr.card import CARD_FILE, MARKER, bank_card, save_bank, write_card
from noiseclr.export import FORMATS, export_bank, prompt_syntax
from records import scores

SHIPPED = Path(__file__).parents[1] / "platform/noiseclr/pretrained/banks/shapes"


def make_bank() -> DirectionBank:
    tokens = [f"<c-{i}>" for i in range(4)]
    return DirectionBank(
        torch.randn(4, 8, generator=torch.Generator().manual_seed(0)),
        {"source": "org/sd-model", "fingerprint": "f00dcafe", "hidden_size": 8},
        name="cars",
        tokens=tokens,
        config={"model": "org/sd-model", "k": 4, "steps": 50, "lr": 0.002, "loss": "symmetric", "tau": 0.5},
        metrics={"steps": 50, "images": 12, "train_seconds": 7.5, "evaluation": {"alignment": 0.41}},
        labels={
            tokens[0]: {"auto": "-:hue+, +:hue->green"},
            tokens[1]: {"auto": "+:size+", "human": "bigger | wider"},
        },
        edit_defaults={
            "window": [600, 0],
            "windows": [[600, 0], [800, 200], [600, 100], [400, 0]],
            "scales": [[-2.0, 4.0], [-1.0, 1.5], [-8.0, 8.0], [-32.0, 32.0]],
            "calibration": "blind",
        },
        scores=scores(
            [
                {"score": 0.3, "interval": [0.2, 0.4]},
                {"score": 0.2, "interval": [0.1, 0.3]},
                {"score": 0.1, "interval": [0.0, 0.2], "duplicate_of": 0},
                {"dead": True},
            ],
            score=0.2,
            interval=[0.1, 0.3],
        ),
    )


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def cells(line: str) -> list[str]:
    """A markdown table row's cells, split as GFM splits them: a backslash escapes the next
    character (so '\\|' is text), any other '|' ends a cell."""
    out, cur, chars = [], "", iter(line.strip()[1:])
    for ch in chars:
        if ch == "\\":
            cur += ch + next(chars, "")
        elif ch == "|":
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out


def table(text: str, heading: str = "## Directions") -> list[list[str]]:
    """The body rows of the first table after `heading`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(n for n, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(cells(ln))
    return rows[2:]  # after the header and the |---| line


def test_header_is_a_model_card_and_every_direction_is_in_the_table():
    bank = make_bank()
    text = bank_card(bank)
    meta = front_matter(text)
    assert meta["base_model"] == "org/sd-model" and meta["library_name"] == "noiseclr"
    assert (
        meta["tags"][:3] == ["noiseclr", "textual_inversion", "diffusion-directions"]
        and "cars" in meta["tags"]
    )
    assert meta["noiseclr"]["base_model_fingerprint"] == "f00dcafe" and meta["noiseclr"]["directions"] == 4
    rows = table(text)
    assert [r[1] for r in rows] == [
        "0",
        "2",
        "1",
        "3",
    ]  # best first, a duplicate after its original, dead last
    by_index = {int(r[1]): r for r in rows}
    assert (
        by_index[0][2] == "`<c-0>`" and by_index[0][3] == "-:hue+, +:hue-&gt;green"
    )  # 'hue->green' as typed
    assert by_index[1][3] == "bigger \\| wider"  # the human label wins, its '|' escaped
    assert by_index[0][6] == "-2 / +4" and by_index[1][6] == "-1 / +1.5"
    assert [by_index[i][7] for i in range(4)] == ["600-0", "800-200", "600-100", "400-0"]
    assert by_index[3][5] == "**dead**" and by_index[2][5].startswith("duplicate of 0")
    assert by_index[0][5] == "live" and by_index[0][4] == "0.3 [0.2, 0.4]"
    assert len({len(r) for r in rows}) == 1  # every row has the header's cells
    assert "Alignment 0.41" in text and "| `lr` | 0.002 |" in text and "| `images` | 12 |" in text
    assert "noiseclr edit 0=1 --bank BANK --model org/sd-model" in text  # the best live direction
    assert 'NoiseCLRPipeline.from_pretrained("org/sd-model")' in text and 'pipe.load_bank("BANK")' in text
    for fmt in FORMATS:
        assert f"`{prompt_syntax(fmt, '<c-0>')}`" in text and f"`{fmt}`" in text
    assert "## Gallery" not in text  # none given


def test_user_text_in_labels_cannot_break_the_table_or_inject_markup():
    bank = make_bank()
    bank.labels[bank.tokens[2]] = {"human": "a | b || c\nnew line `x` <img src=x> *bold* [l](u) \\|"}
    text = bank_card(bank)
    rows = table(text)
    assert len(rows) == 4 and len({len(r) for r in rows}) == 1
    assert "<img" not in text and "\nnew line" not in text
    assert text.count(MARKER) == 1 and front_matter(text)["base_model"] == "org/sd-model"


def test_an_unmeasured_bank_and_a_user_readme_left_alone(tmp_path):
    bank = DirectionBank(torch.randn(2, 8), {"source": "shapes", "fingerprint": "x"}, name="u")
    text = bank_card(bank)
    rows = table(text)
    assert [r[5] for r in rows] == ["unmeasured", "unmeasured"] and [r[6] for r in rows] == ["raw", "raw"]
    assert "Not measured yet" in text and "noiseclr edit 0=4" in text
    (tmp_path / CARD_FILE).write_text("# my notes\n")
    assert write_card(tmp_path, bank) is None
    assert (tmp_path / CARD_FILE).read_text() == "# my notes\n"


def test_save_writes_the_card_beside_bank_json_with_the_gallery_beside_the_bank(tmp_path):
    bank = make_bank()
    plain = bank.save(tmp_path / "plain")  # the bank's own files only
    assert sorted(p.name for p in plain.iterdir()) == ["bank.json", "directions.safetensors"]
    folder = save_bank(bank, tmp_path / "bank")  # what every command that writes a bank calls
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bank.json", "directions.safetensors"]
    assert "## Gallery" not in (folder / CARD_FILE).read_text()
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "gallery.png").write_bytes(b"\x89PNG")
    bank.labels[bank.tokens[3]] = {"human": "renamed"}
    save_bank(bank, folder)  # `noiseclr evaluate` / `measure` save again: the card follows
    text = (folder / CARD_FILE).read_text()
    assert "![what each direction does](../gallery/gallery.png)" in text and "| renamed |" in text
    assert write_card(folder, bank, gallery=None, find_gallery=False) == folder / CARD_FILE
    assert "## Gallery" not in (folder / CARD_FILE).read_text()
    assert DirectionBank.load(folder).labels == bank.labels  # the card is not part of loading


def test_the_export_folder_gets_a_card_with_its_format_and_prompts(tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "bank")
    bank = DirectionBank.load(tmp_path / "bank")
    for fmt, library in (("comfyui", "noiseclr"), ("diffusers", "diffusers")):
        export_bank(bank, tmp_path / fmt, fmt)
        text = (tmp_path / fmt / CARD_FILE).read_text()
        meta = front_matter(text)
        assert meta["library_name"] == library and meta["noiseclr"]["export"]["format"] == fmt
        rows = {int(r[1]): r for r in table(text)}
        assert len(rows) == len(bank)
        assert rows[6][-2:] == ["`shapes-6.safetensors`", f"`{prompt_syntax(fmt, '<shapes-6>')}`"]
        assert f"Prompt syntax: `{prompt_syntax(fmt, bank.tokens[bank.ranked()[0]])}`" in text
    assert "models/embeddings" in (tmp_path / "comfyui" / CARD_FILE).read_text()
    assert 'load_textual_inversion("EXPORT", weight_name=' in (tmp_path / "diffusers" / CARD_FILE).read_text()


@pytest.mark.parametrize("folder", sorted(SHIPPED.parent.iterdir()), ids=lambda p: p.name)
def test_every_shipped_bank_carries_its_current_card(folder):
    bank = DirectionBank.load(folder)
    assert (folder / CARD_FILE).read_text() == bank_card(bank), (
        f"rewrite it: noiseclr.card.write_card({folder.name!r}, DirectionBank.load(...))"
    )


def test_huggingface_hub_reads_the_header():
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard(bank_card(make_bank()))
    assert card.data.base_model == "org/sd-model" and card.data.library_name == "noiseclr"
    assert "textual_inversion" in card.data.tags


def test_a_markdown_renderer_shows_labels_as_typed_one_row_per_direction():
    """markdown-it (CommonMark with GFM tables) renders the table: K rows, user text as text."""
    markdown_it = pytest.importorskip("markdown_it")
    bank = make_bank()
    typed = "a | b || c `x` <img src=x> *bold* [l](u) \\|"
    bank.labels[bank.tokens[2]] = {"human": typed}
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(bank_card(bank, gallery="g.png"))
    rows = html[html.index("<tbody>") : html.index("</tbody>")]
    assert rows.count("<tr>") == len(bank) and rows.count("<td>") == 8 * len(bank)
    assert "<td>a | b || c `x` &lt;img src=x&gt; *bold* [l](u) \\|</td>" in rows
    assert "<td>-:hue+, +:hue-&gt;green</td>" in rows and "<strong>dead</strong>" in rows
    assert html.count("<img") == 1 and '<img src="g.png"' in html  # the gallery only


def test_a_registered_version_stores_the_card_and_the_gallery_it_shows(tmp_path):
    """registry.stage_bank is the folder log_bank hands MLflow: the two bank files byte for byte
    (their checksums are the version's), the card, and the gallery copied in beside it."""
    from noiseclr.tracking.registry import checksums, stage_bank

    bank = make_bank()
    folder = bank.save(tmp_path / "run" / "bank")
    (tmp_path / "run" / "gallery").mkdir()
    (tmp_path / "run" / "gallery" / "gallery.png").write_bytes(b"\x89PNG picture")
    staged = stage_bank(folder, bank, tmp_path / "staged" / "bank")
    names = sorted(p.name for p in staged.iterdir())
    assert names == ["README.md", "bank.json", "directions.safetensors", "gallery.png"]
    assert checksums(staged) == checksums(folder)
    assert "![what each direction does](gallery.png)" in (staged / CARD_FILE).read_text()
    assert (staged / "gallery.png").read_bytes() == b"\x89PNG picture"
    (tmp_path / "run" / "gallery" / "gallery.png").unlink()
    bare = stage_bank(folder, bank, tmp_path / "bare" / "bank")
    assert "## Gallery" not in (bare / CARD_FILE).read_text() and not (bare / "gallery.png").exists()


def test_a_registered_version_downloads_with_its_card(tmp_path, monkeypatch):
    """log_bank on a SQLite store (no server), then download_bank: the card and gallery arrive."""
    mlflow = pytest.importorskip("mlflow")
    from noiseclr.tracking import registry

    monkeypatch.setattr(registry, "CACHE", tmp_path / "cache")
    folder = make_bank().save(tmp_path / "run" / "bank")
    (tmp_path / "run" / "gallery").mkdir()
    (tmp_path / "run" / "gallery" / "gallery.png").write_bytes(b"\x89PNG picture")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it: removed after the test
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("card", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            version = registry.log_bank(folder, "card-bank")
        got = registry.download_bank(f"models:/card-bank/{version.version}", tmp_path / "mine")
    finally:
        mlflow.set_tracking_uri(previous)
    assert sorted(p.name for p in got.iterdir()) == [
        "README.md",
        "bank.json",
        "directions.safetensors",
        "gallery.png",
    ]
    card = (got / CARD_FILE).read_text()
    assert front_matter(card)["base_model"] == "org/sd-model" and "](gallery.png)" in card


def test_discover_writes_the_card_last_with_its_gallery(tmp_path, monkeypatch):
    """The smallest discovery run (no measurement): bank/README.md links this run's gallery."""
    from typer.testing import CliRunner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # untracked: nothing but OUT is written
    from noiseclr.cli import app

    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "k: 2\nnegatives: 1\nbatch: 2\nsteps: 1\nn_images: 2\nevaluate: false\nname: c\n"
        "gallery_seeds: 1\ngallery_steps: 2\ngallery_scales: [0, 1]\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["discover", "--config", str(cfg), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    card = (out / "bank" / CARD_FILE).read_text()
    assert f"card:    {out.resolve() / 'bank' / CARD_FILE}" in result.output
    assert front_matter(card)["base_model"] == "shapes" and (out / "gallery" / "gallery.png").exists()
    assert "![what each direction does](../gallery/gallery.png)" in card
    assert [r[2] for r in table(card)] == ["`<c-0>`", "`<c-1>`"] and "| `steps` | 1 |" in card
    assert "noiseclr edit 0=4 --bank BANK --model shapes" in card and "| `c-0` |" in card


def test_noiseclr_gallery_beside_a_bank_puts_it_on_the_card(tmp_path):
    from typer.testing import CliRunner

    from noiseclr.cli import app

    shipped = DirectionBank.load(SHIPPED)  # two of its directions: a small gallery
    save_bank(DirectionBank(shipped.directions[[6, 11]], shipped.base_model, name="two"), tmp_path / "bank")
    assert "## Gallery" not in (tmp_path / "bank" / CARD_FILE).read_text()
    args = [
        "gallery",
        str(tmp_path / "bank"),
        "--seeds",
        "1",
        "--steps",
        "2",
        "--columns",
        "2",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gallery" / "gallery.png").exists()
    assert (
        "![what each direction does](../gallery/gallery.png)" in (tmp_path / "bank" / CARD_FILE).read_text()
    )
