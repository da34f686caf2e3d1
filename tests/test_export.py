"""`noiseclr export`: every format read back the way its tool reads it.

diffusers is read by its own `load_textual_inversion`. AUTOMATIC1111, ComfyUI and kohya cannot
run here, so each has a small reader below that applies the rules of the tool's own loader, cited
by file; a format that drifts from what the tool accepts fails its reader.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank
from noiseclr.cli import app
from noiseclr.errors import BankError, ConfigError
from noiseclr.export import FORMATS, INDEX_FILE, check_width, export_bank, load_exported, read_index
from records import scores

runner = CliRunner()
SHIPPED = Path(__file__).parents[1] / "platform/noiseclr/pretrained/banks/shapes"
TENSOR_GLOBALS = {"torch._utils _rebuild_tensor_v2", "torch FloatStorage", "collections OrderedDict"}


def make_bank(width: int, k: int = 3) -> DirectionBank:
    tokens = [f"<t-{i}>" for i in range(k)]
    return DirectionBank(
        torch.randn(k, width, generator=torch.Generator().manual_seed(0)),
        {"source": "tiny", "fingerprint": "f00", "hidden_size": width},
        name="t",
        tokens=tokens,
        labels={tokens[1]: {"auto": "-:hue+, +:hue->green", "human": "greener"}},
        edit_defaults={
            "window": [600, 0],
            "windows": [[600, 0], [800, 200], [600, 100]][:k],
            "scales": [[-2.0, 4.0], [-1.0, 1.5], [-8.0, 8.0]][:k],
        },
        scores=scores(
            [
                {"score": 0.2, "interval": [0.1, 0.3]},
                {"score": 0.1, "interval": [0.0, 0.2], "duplicate_of": 0},
                {"dead": True},
            ][:k]
        ),
    )


def fresh_pipe(model):
    """The model's pipeline with its own copy of the tokenizer and text encoder (loading adds tokens)."""
    from diffusers import StableDiffusionPipeline

    parts = dict(model.pipe.components)
    parts.update(
        tokenizer=copy.deepcopy(parts["tokenizer"]), text_encoder=copy.deepcopy(parts["text_encoder"])
    )
    return StableDiffusionPipeline(**parts)


def width(model) -> int:
    return model.pipe.text_encoder.get_input_embeddings().weight.shape[1]


# --- the tools' loading rules -------------------------------------------------------------------

# AUTOMATIC1111/stable-diffusion-webui modules/safe.py (check_pt, check_zip_filenames and
# RestrictedUnpickler), restated. A1111 replaces torch.load with a check that runs before the real
# load unless --disable-safe-unpickle is given: every entry of the zip must be named <dir>/version,
# <dir>/data.pkl or <dir>/data/<digits> (v1.8.0); v1.10 ("update pickle safe filenames" in its
# 1.10.0 changelog) also accepts <dir>/byteorder and <dir>/.data/serialization_id, and neither
# accepts .format_version or .storage_alignment. Exactly one data.pkl; that pickle is read by an
# unpickler that resolves only the globals below (the same list in both), and whose persistent ids
# must start with "storage". Anything else: "The file may be malicious, so the program is not
# going to read it", and the embedding is not loaded.
A1111_ZIP_ENTRIES = {
    "v1.8.0": {"version", "data.pkl"},
    "v1.10": {"version", "data.pkl", "byteorder", ".data/serialization_id"},
}
A1111_GLOBALS = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {
        "FloatStorage",
        "HalfStorage",
        "IntStorage",
        "LongStorage",
        "DoubleStorage",
        "ByteStorage",
        "float32",
        "BFloat16Storage",
    },
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "_codecs": {"encode"},
    "__builtin__": {"set"},
    # (and two pytorch_lightning.callbacks names, for old checkpoints)
}


class A1111Unpickler(pickle.Unpickler):
    """RestrictedUnpickler's rules: a global outside A1111_GLOBALS is refused; a storage is an
    empty TypedStorage (A1111 checks the pickle, the real load reads the data afterwards)."""

    def find_class(self, module: str, name: str):
        if name not in A1111_GLOBALS.get(module, set()):
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        assert pid[0] == "storage", pid
        return torch.storage.TypedStorage(_internal=True)


def a1111_safe_check(path: Path, tag: str) -> None:
    """modules/safe.py check_pt for a zip file, as `tag` has it: raises where A1111 refuses."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        for name in names:
            head, sep, rest = name.partition("/")
            ok = bool(head and sep) and (rest in A1111_ZIP_ENTRIES[tag] or re.fullmatch(r"data/\d+", rest))
            assert ok, f"A1111 {tag}: bad file inside {path.name}: {name}"
        pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
        assert len(pickles) == 1, f"A1111 {tag}: {len(pickles)} data.pkl in {path.name}"
        with z.open(pickles[0]) as f:
            A1111Unpickler(f).load()


def a1111_load(folder: Path, expected_width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """AUTOMATIC1111/stable-diffusion-webui modules/textual_inversion/textual_inversion.py,
    EmbeddingDatabase.load_from_dir / load_from_file: walk the folder; the name is the file stem;
    .pt/.bin through torch.load after modules/safe.py's check (a1111_safe_check, both tags),
    .safetensors through safetensors' load_file; "string_to_param" with one entry, else a dict of
    exactly one tensor ("diffuser concepts", 1-D unsqueezed); other extensions are passed over;
    a width other than the model's is skipped. Returns (registered, skipped)."""
    registered, skipped = {}, {}
    for root, _, names in os.walk(folder):
        for filename in names:
            name, ext = os.path.splitext(filename)
            path = Path(root) / filename
            if ext.upper() in (".BIN", ".PT"):
                for tag in A1111_ZIP_ENTRIES:
                    a1111_safe_check(path, tag)
                data = torch.load(path, map_location="cpu", weights_only=True)
            elif ext.upper() == ".SAFETENSORS":
                data = load_file(path, device="cpu")
            else:
                continue
            if "string_to_param" in data:
                params = data["string_to_param"]
                assert len(params) == 1, "embedding file has multiple terms in it"
                vec = next(iter(params.values()))
            elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
                raise AssertionError(f"{filename}: read as an SDXL embedding")
            elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
                assert len(data) == 1, "embedding file has multiple terms in it"
                vec = next(iter(data.values()))
                vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
            else:
                raise AssertionError(f"Couldn't identify {filename} as textual inversion embedding")
            vec = vec.detach().float()
            (registered if vec.shape[-1] == expected_width else skipped)[name] = vec
    return registered, skipped


def a1111_user_metadata(embedding_file: Path) -> dict:
    """modules/extra_networks.py get_user_metadata: splitext(filename)[0] + '.json'."""
    path = Path(os.path.splitext(embedding_file)[0] + ".json")
    return json.loads(path.read_text()) if path.exists() else {}


def comfyui_embedding(word: str, embedding_dir: Path, embedding_size: int, embed_key: str = "clip_l"):
    """comfyanonymous/ComfyUI comfy/sd1_clip.py: SDTokenizer.tokenize_with_weights takes a word
    starting "embedding:", load_embed finds NAME or NAME + .safetensors/.pt/.bin in the embeddings
    folder and its subfolders, reads .safetensors with load_file and anything else with
    torch.load(weights_only=True) (on failure it guesses 768/1024-wide floats from the zip, which
    a file of another width does not survive), then takes "string_to_param" first, else
    embed[embed_key], else the first value; SDClipModel.set_up_textual_embeddings keeps each row
    whose width is the encoder's (others: a warning, ignored). Returns the rows used."""
    assert word.startswith("embedding:"), word
    name = word[len("embedding:") :].strip(",")
    found = None
    for folder in [embedding_dir, *(p for p in embedding_dir.rglob("*") if p.is_dir())]:
        path = folder / name
        if path.is_file():
            found = path
        else:
            found = next(
                (
                    folder / (name + x)
                    for x in (".safetensors", ".pt", ".bin")
                    if (folder / (name + x)).is_file()
                ),
                None,
            )
        if found is not None:
            break
    assert found is not None, f"warning, embedding:{name} does not exist, ignoring"
    if str(found).lower().endswith(".safetensors"):
        embed = load_file(found, device="cpu")
    else:
        embed = torch.load(found, weights_only=True, map_location="cpu")
    if "string_to_param" in embed:
        out = next(iter(embed["string_to_param"].values()))
    elif embed_key in embed:
        out = embed[embed_key]
    else:
        out = next(iter(embed.values()))
    rows = [out] if out.ndim == 1 else [out[x] for x in range(out.shape[0])]
    return [r for r in rows if r.shape[0] == embedding_size]


def kohya_load(path: Path) -> tuple[list[str], torch.Tensor]:
    """kohya-ss/sd-scripts gen_img_diffusers.py (--textual_inversion_embeddings) and
    train_textual_inversion.py load_weights: load_file or torch.load; "string_to_param" if present;
    the first value must be a Tensor; num_vectors_per_token = its size()[0]; the token string is
    the file stem, then stem1, stem2... for further vectors. Returns (token strings, (n, D))."""
    data = (
        load_file(path)
        if path.suffix == ".safetensors"
        else torch.load(path, map_location="cpu", weights_only=True)
    )
    assert isinstance(data, dict), f"weight file is not dict: {path}"
    if "string_to_param" in data:
        data = data["string_to_param"]
    embeds = next(iter(data.values()))
    assert isinstance(embeds, torch.Tensor), f"weight file does not contains Tensor: {path}"
    n = embeds.size()[0]
    stem = os.path.splitext(os.path.basename(path))[0]
    return [stem] + [f"{stem}{i + 1}" for i in range(n - 1)], embeds


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pt", [False, True], ids=["safetensors", "pt"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_by_its_tools_rules(tiny_model, tmp_path, fmt, pt):
    bank = make_bank(width(tiny_model))
    out = tmp_path / fmt
    paths = export_bank(bank, out, fmt, pt=pt)
    suffix = ".pt" if pt else ".safetensors"
    assert [p.name for p in paths] == [f"t-{i}{suffix}" for i in range(3)]
    index = read_index(out)
    assert [e["file"] for e in index["directions"]] == [p.name for p in paths]
    if fmt == "diffusers":  # the real loader, from the folder by weight_name; the token is in the file
        pipe = fresh_pipe(tiny_model)
        for p in paths:
            pipe.load_textual_inversion(str(out), weight_name=p.name)
        ids = pipe.tokenizer.convert_tokens_to_ids(bank.tokens)
        torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], bank.directions)
        assert ids[1] in pipe.tokenizer("a <t-1>", add_special_tokens=False).input_ids
    elif fmt == "a1111":
        registered, skipped = a1111_load(out, width(tiny_model))
        assert sorted(registered) == ["t-0", "t-1", "t-2"] and not skipped
        for i, name in enumerate(["t-0", "t-1", "t-2"]):
            assert registered[name].shape == (1, bank.directions.shape[1])
            torch.testing.assert_close(registered[name][0], bank.directions[i])
        meta = a1111_user_metadata(paths[1])
        assert "hue->green" in meta["description"] and "greener" in meta["description"]
        other = a1111_load(out, 768)  # another model's width: every file skipped
        assert other[0] == {} and sorted(other[1]) == sorted(registered)
        if pt:  # A1111's own dict, as Embedding.save writes it
            data = torch.load(paths[0], weights_only=True)
            assert set(data) == {
                "string_to_token",
                "string_to_param",
                "name",
                "step",
                "sd_checkpoint",
                "sd_checkpoint_name",
            }
            assert data["string_to_token"] == {"*": 265} and data["name"] == "t-0"
    elif fmt == "comfyui":
        for i in range(3):
            rows = comfyui_embedding(f"embedding:t-{i},", out, width(tiny_model))
            assert len(rows) == 1
            torch.testing.assert_close(rows[0], bank.directions[i])
        assert comfyui_embedding("embedding:t-0", out, 768) == []  # another width: ignored
    else:
        for i, p in enumerate(paths):
            tokens, embeds = kohya_load(p)
            assert tokens == [f"t-{i}"] and embeds.shape == (1, bank.directions.shape[1])
            torch.testing.assert_close(embeds[0], bank.directions[i])
            assert set(load_file(p) if not pt else torch.load(p, weights_only=True)) == {"emb_params"}
    # Whatever the format, diffusers loads the export under the bank's tokens.
    pipe = fresh_pipe(tiny_model)
    assert load_exported(pipe, out) == bank.tokens
    ids = pipe.tokenizer.convert_tokens_to_ids(bank.tokens)
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], bank.directions)


def test_the_a1111_dict_also_loads_in_diffusers_under_its_name(tiny_model, tmp_path):
    bank = make_bank(width(tiny_model))
    paths = export_bank(bank, tmp_path, "a1111", pt=True)
    pipe = fresh_pipe(tiny_model)
    pipe.load_textual_inversion([str(p) for p in paths])  # diffusers' A1111 branch: token = "name"
    ids = pipe.tokenizer.convert_tokens_to_ids(["t-0", "t-1", "t-2"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], bank.directions)


def test_pt_files_hold_tensors_and_plain_values_only(tiny_model, tmp_path):
    bank = make_bank(width(tiny_model))
    for fmt in FORMATS:
        for path in export_bank(bank, tmp_path / fmt, fmt, pt=True):
            torch.load(path, weights_only=True)  # refuses any class outside the tensor allowlist
            with zipfile.ZipFile(path) as z:
                pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
                storages = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data/\d+", n)]
                # One (1, D) row each, not the bank's whole (K, D) storage behind a view.
                assert [z.getinfo(n).file_size for n in storages] == [4 * bank.directions.shape[1]]
            # What the pickle names: torch's tensor rebuilding only (no class of ours, nothing else).
            named = {
                arg for op, arg, _ in pickletools.genops(pickle) if op.name in ("GLOBAL", "STACK_GLOBAL")
            }
            assert named <= TENSOR_GLOBALS, named


def test_pt_files_pass_a1111s_safe_unpickler(tiny_model, tmp_path):
    """Every .pt noiseclr writes (A1111 reads any format's file from embeddings/) passes A1111's
    default check in v1.8.0 and v1.10, and still loads with torch.load(weights_only=True)."""
    bank = make_bank(width(tiny_model))
    for fmt in FORMATS:
        for i, path in enumerate(export_bank(bank, tmp_path / fmt, fmt, pt=True)):
            for tag in A1111_ZIP_ENTRIES:
                a1111_safe_check(path, tag)
            assert path.read_bytes() == export_bank(bank, tmp_path / "again", fmt, pt=True)[i].read_bytes()
            for mmap in (False, True):  # diffusers loads a zip .pt with mmap=True
                data = torch.load(path, weights_only=True, mmap=mmap)
                vec = data["string_to_param"]["*"] if "string_to_param" in data else next(iter(data.values()))
                torch.testing.assert_close(vec[0], bank.directions[i])
    # The check is not vacuous: what torch.save writes today is refused by v1.8.0 (.format_version,
    # byteorder, ...), and a pickle naming a class outside A1111's list is refused by both tags.
    torch.save({"string_to_param": {"*": bank.directions[:1].clone()}}, tmp_path / "plain.pt")
    with pytest.raises(AssertionError, match="bad file inside"):
        a1111_safe_check(tmp_path / "plain.pt", "v1.8.0")
    torch.save({"shape": torch.Size([1, 2])}, tmp_path / "size.pt")
    with zipfile.ZipFile(tmp_path / "size.pt") as z, pytest.raises(pickle.UnpicklingError, match="forbidden"):
        A1111Unpickler(z.open(next(n for n in z.namelist() if n.endswith("/data.pkl")))).load()


def test_sidecars_carry_labels_scores_and_scales(tiny_model, tmp_path):
    bank = make_bank(width(tiny_model))
    export_bank(bank, tmp_path, "comfyui")
    side = json.loads((tmp_path / "t-1.json").read_text())
    info = side["noiseclr"]
    assert info["labels"] == {"auto": "-:hue+, +:hue->green", "human": "greener"}
    assert (
        info["prompt"] == "embedding:t-1" and info["token"] == "<t-1>" and info["file"] == "t-1.safetensors"
    )
    assert info["edit_scales"] == [-1.0, 1.5] and info["edit_window"] == [800, 200]
    assert info["score"] == 0.1 and info["duplicate_of"] == "<t-0>" and info["dead"] is False
    assert "duplicate of t-0" in side["description"]
    assert "dead" in json.loads((tmp_path / "t-2.json").read_text())["description"]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["format"] == "comfyui" and index["width"] == bank.directions.shape[1]
    assert index["directions"][1] == {k: v for k, v in info.items() if k not in ("bank", "base_model")}


def test_a_bank_of_another_width_is_refused_in_one_line(tiny_model, tmp_path, monkeypatch):
    wide = make_bank(width(tiny_model) * 2)
    with pytest.raises(BankError) as err:
        check_width(wide, tiny_model.pipe.text_encoder)
    message = str(err.value)
    assert (
        "\n" not in message
        and f"{width(tiny_model) * 2}-dim" in message
        and f"{width(tiny_model)}-dim" in message
    )
    with pytest.raises(BankError, match="-dim directions"):
        export_bank(wide, tmp_path / "x", "a1111", text_encoder=tiny_model.pipe.text_encoder)
    assert not (tmp_path / "x").exists(), "a refused export wrote files"
    export_bank(wide, tmp_path / "wide", "diffusers")  # no encoder given: exported, refused on load
    with pytest.raises(BankError) as err:
        load_exported(fresh_pipe(tiny_model), tmp_path / "wide")
    assert "\n" not in str(err.value) and f"{width(tiny_model) * 2}-dim directions" in str(err.value)
    # The command line: --model loads the model (here: the tiny one) and refuses, one line, exit 2.
    wide.save(tmp_path / "bank")
    import noiseclr.models.base as base

    monkeypatch.setattr(base, "load_model", lambda *a, **k: tiny_model)
    result = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "bank"),
            "--format",
            "kohya",
            "--out",
            str(tmp_path / "k"),
            "--model",
            "tiny",
        ],
    )
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"error: bank 't' has {width(tiny_model) * 2}-dim")
    )
    assert not (tmp_path / "k").exists()


def test_cli_exports_the_shipped_bank_and_its_labels_are_findable(tmp_path):
    result = runner.invoke(app, ["export", str(SHIPPED), "--format", "a1111", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "wrote 12 a1111 files" in result.output
    bank = DirectionBank.load(SHIPPED)
    labels = [bank.labels[t]["auto"] for t in bank.tokens]
    k = next(i for i, lab in enumerate(labels) if labels.count(lab) == 1 and "none" not in lab)
    stem = bank.tokens[k].strip("<>")  # a label only direction k has: its sidecar finds it
    found = [
        p.stem for p in sorted(tmp_path.glob("shapes-*.json")) if json.dumps(labels[k])[1:-1] in p.read_text()
    ]
    assert found == [stem]
    assert labels[k] in a1111_user_metadata(tmp_path / f"{stem}.safetensors")["description"]
    registered, _ = a1111_load(tmp_path, bank.directions.shape[1])
    torch.testing.assert_close(registered[stem][0], bank.directions[k])
    card = (tmp_path / "README.md").read_text()  # the bank card, for this format
    assert "# shapes: 12 NoiseCLR directions for AUTOMATIC1111" in card and "`shapes-6.safetensors`" in card


def test_cli_refuses_an_unknown_format_and_export_ti_still_writes_diffusers_files(tmp_path):
    result = runner.invoke(
        app, ["export", str(SHIPPED), "--format", "invokeai", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: --format 'invokeai' is unknown: use one of diffusers, a1111, comfyui, kohya"
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="unknown"):
        export_bank(DirectionBank.load(SHIPPED), tmp_path / "y", "A1111")
    result = runner.invoke(app, ["export-ti", str(SHIPPED), "--out", str(tmp_path / "ti")])
    assert result.exit_code == 0, result.output
    assert set(load_file(tmp_path / "ti" / "shapes-3.safetensors")) == {"<shapes-3>"}
    assert read_index(tmp_path / "ti")["format"] == "diffusers"


def test_export_refuses_a_bank_folder_and_a_pullback_bank(tmp_path):
    bank = make_bank(8)
    bank.save(tmp_path / "bank")
    with pytest.raises(BankError, match="holds a direction bank"):
        export_bank(bank, tmp_path / "bank", "diffusers")
    pullback = DirectionBank(torch.randn(2, 8), {}, name="pb", config={"method": "pullback"})
    with pytest.raises(BankError, match="no textual-inversion form"):
        export_bank(pullback, tmp_path / "pb", "kohya")


def test_strict_json_and_an_index_pointing_outside_is_refused(tiny_model, tmp_path):
    bank = make_bank(width(tiny_model))
    bank.scores.directions[0].score = float("nan")  # as a bank.json written with NaN reads back
    export_bank(bank, tmp_path, "diffusers")
    assert json.loads((tmp_path / "t-0.json").read_text())["noiseclr"]["score"] is None
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["directions"][0]["file"] = "../elsewhere.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(BankError, match="not a file name of this folder"):
        load_exported(fresh_pipe(tiny_model), tmp_path)
