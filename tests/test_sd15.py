"""A user's own Stable Diffusion model: the guide's Stable Diffusion section walked command by
command on an SD 1.5-structured stand-in (`noiseclr.models.standin`: SD's files, classes and
configs, tiny random weights), and what a model that is not the shapes world must get right:
its fingerprint (precision, noise schedule, banks of before), the oracle refused, the export's
own tokens, inversion without warnings.

Serving the stand-in (fp32 here in-process and through Ray Serve in tests/test_serving.py) and
submitting its job and `jobs/serve-sd15.yaml` to a Ray cluster (tests/test_cluster.py) are
where the servers are.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from noiseclr.bank import DirectionBank
from noiseclr.cli import app
from noiseclr.discovery.config import merge, nest
from noiseclr.domains import shapes
from noiseclr.errors import BankError, ConfigError
from noiseclr.models.base import load_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# The guide's job at the paper's size is hours on a GPU; here only its sizes shrink (and the
# device: this machine has no GPU). Every other key is the guide's, and so is every command,
# with options of size appended (typer takes the last of a repeated option).
SMALL = dict(
    n_images=8, k=4, negatives=2, batch=4, steps=3, checkpoint_every=3, evaluate_images=2,
    evaluate_steps=2, gallery_seeds=1, gallery_steps=2, device="cpu",
)  # fmt: skip
SIZES = {
    "generate": ["--steps", "4"],
    "measure": ["--n", "2", "--steps", "4"],
    "merge": ["--n", "2", "--steps", "4"],
    "edit": ["--steps", "4"],
    "gallery": ["--steps", "4", "--seeds", "1"],
}


def guide_section() -> tuple[list[str], str]:
    """The bash lines and the YAML job of docs/guide.md's Stable Diffusion section."""
    text = (ROOT / "docs/guide.md").read_text()
    section = text.split("\n## Stable Diffusion\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    lines = [ln for lang, body in blocks if lang == "bash" for ln in body.splitlines() if ln.strip()]
    (job,) = [body for lang, body in blocks if lang == "yaml"]
    return lines, job


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = shapes.to_uint8(shapes.render(shapes.sample_scenes(n, seed=seed), 96))  # not 64: resized
    paths = [folder / f"face-{i:02d}.png" for i in range(n)]
    for path, px in zip(paths, pixels, strict=True):
        Image.fromarray(px).save(path)
    return paths


@pytest.fixture(scope="module")
def walk(sd15_folder, mlflow_server, tmp_path_factory):
    """Every command of the guide's section, typed as written, in a fresh folder; the placeholders
    (/data/sd15, /data/faces, the tracking URI) replaced by the stand-in, images, test server."""
    import os

    home = tmp_path_factory.mktemp("walk")
    data = home / "faces-data"
    write_images(data, 8, seed=5)
    write_images(home / "photo", 1, seed=9)[0].rename(home / "photo.png")
    places = {"/data/sd15": str(sd15_folder), "/data/faces": str(data)}
    places["http://127.0.0.1:5000"] = mlflow_server.uri

    def placed(text: str) -> str:
        for a, b in places.items():
            text = text.replace(a, b)
        return text

    from mlflow import MlflowClient

    # Other modules may have registered noiseclr-faces in the session's server already.
    registered = len(MlflowClient(mlflow_server.uri).search_model_versions("name='noiseclr-faces'"))
    lines, job = guide_section()
    # the guide's job in sections, these keys made small (by their flat names)
    (home / "faces.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load(placed(job)), nest(SMALL))))
    before = os.getcwd()
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(home)
    results = []
    try:
        for line in lines:
            words = [placed(w) for w in shlex.split(line, comments=True)]
            if words[0] == "export":
                key, _, value = words[1].partition("=")
                os.environ[key] = value
                continue
            assert words[0] == "noiseclr", line
            result = runner.invoke(app, words[1:] + SIZES.get(words[1], []))
            assert result.exit_code == 0, f"{line}\n{result.output}\n{result.stderr}"
            results.append((words[1], line, result))
    finally:
        import ray

        ray.shutdown()  # the local Ray `discover --workers 2` started in this process
        os.chdir(before)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
    return {"home": home, "results": results, "data": data, "registered_before": registered}


def outputs(walk, command: str) -> list[str]:
    return [r.output for name, _, r in walk["results"] if name == command]


def test_the_guide_runs_on_an_sd15_folder(walk, sd15_model):
    home = walk["home"]
    assert {name for name, _, _ in walk["results"]} >= {
        "generate", "discover", "measure", "edit", "gallery", "merge", "export", "banks",
    }  # fmt: skip
    bank = DirectionBank.load(home / "out/faces/bank", sd15_model)  # learnt on this very model
    assert bank.base_model["fingerprint"] == sd15_model.fingerprint and bank.tokens[0] == "<faces-0>"
    assert bank.scores is not None and bank.calibration == "blind"
    assert (home / "out/faces/gallery/gallery.png").exists() and (home / "out/faces/bank/README.md").exists()
    for name in ("edit.png", "real.png", "registered.png", "faces.png"):
        assert Image.open(home / name).size[1] >= 64, name  # a grid of the stand-in's 64 px images
    (workers,) = [r.output for name, line, r in walk["results"] if "--workers" in line]
    assert "2 Ray Train workers" in workers and "Failed to query Ray Train Controller" not in workers
    assert DirectionBank.load(home / "out/faces-k8/bank", sd15_model).metrics["world"] == 2
    merged = DirectionBank.load(home / "out/faces-merged", sd15_model)
    assert merged.name == "faces-merged" and 1 <= len(merged) <= 4 + 8
    both = walk["registered_before"] + 2  # each discovery registered a version; the alias follows
    assert f"noiseclr-faces: {both} version(s); champion->{both}" in outputs(walk, "banks")[0]


def test_the_export_names_the_banks_own_tokens_and_loads_into_diffusers(walk, sd15_folder):
    from diffusers import StableDiffusionPipeline

    from noiseclr.export import load_exported, read_index

    (printed,) = outputs(walk, "export")
    index = read_index(walk["home"] / "out/faces-ti")
    assert "'<faces-0>'" in printed and "shapes" not in printed and "shapes" not in index["load"]
    pipe = StableDiffusionPipeline.from_pretrained(sd15_folder, safety_checker=None)
    load_exported(pipe, walk["home"] / "out/faces-ti")  # diffusers' own load_textual_inversion
    bank = DirectionBank.load(walk["home"] / "out/faces/bank")
    ids = pipe.tokenizer.convert_tokens_to_ids(bank.tokens)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(table[ids], bank.directions)
    assert pipe.tokenizer("<faces-2> a photo").input_ids[1] == ids[2]  # a token of its own in prompts


def test_evaluate_refuses_a_model_without_an_oracle_and_writes_nothing(walk, sd15_folder, sd15_model):
    folder = walk["home"] / "out/faces/bank"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = runner.invoke(app, ["evaluate", str(folder), "--model", str(sd15_folder), "--n", "2"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "noiseclr measure" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (walk["home"] / "out/faces/evaluation").exists()
    from noiseclr.evaluation.evaluate import Protocol, measure_bank

    with pytest.raises(ConfigError, match="oracle measures edits of the shapes world's models only"):
        measure_bank(sd15_model, DirectionBank.load(folder), Protocol(n_images=2), walk["home"] / "x")


def test_a_bank_made_in_fp32_loads_in_fp16_and_bf16(walk, sd15_folder, sd15_model):
    from noiseclr.editing.pipeline import NoiseCLRPipeline

    folder = walk["home"] / "out/faces/bank"
    for dtype in (torch.float16, torch.bfloat16):
        half = load_model(str(sd15_folder), device="cpu", dtype=dtype)
        assert half.pipe.unet.dtype == dtype and half.fingerprint == sd15_model.fingerprint
        DirectionBank.load(folder, half)
    pipe = NoiseCLRPipeline.from_pretrained(sd15_folder, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_bank(folder)  # strict: the fingerprint of the weights as stored
    image = pipe(edits={"0": 1.0}, seed=3, num_inference_steps=3, output_type="np").images
    assert pipe.unet.dtype == torch.bfloat16 and image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def schedule_variant(folder: Path, to: Path, **change) -> Path:
    """A copy of `folder` whose scheduler_config.json differs in `change` (None: key removed)."""
    shutil.copytree(folder, to)
    config_file = to / "scheduler/scheduler_config.json"
    config = {**json.loads(config_file.read_text()), **change}
    config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return to


def test_the_fingerprint_covers_the_noise_schedule_and_only_what_changes_an_edit(
    walk, sd15_folder, sd15_model, tmp_path
):
    """A folder whose schedule differs (trailing timesteps) edits differently: another model. A
    folder without `clip_sample` (DDIM's default would clip) edits as SD's pipelines do: the
    same model, the same edit."""
    from noiseclr.editing import sampler

    bank = DirectionBank.load(walk["home"] / "out/faces/bank")
    edit = sampler.parse_edit("0=1", {bank.name: bank})

    def edited(model) -> torch.Tensor:
        x_T = sampler.seed_latents(model, [3])
        return sampler.sample(model, x_T, [edit], prompt="a photo of a face", guidance_scale=7.5, steps=4)

    reference = edited(sd15_model)
    unset = load_model(str(schedule_variant(sd15_folder, tmp_path / "unset", clip_sample=None)), device="cpu")
    assert unset.fingerprint == sd15_model.fingerprint
    torch.testing.assert_close(edited(unset), reference)
    trailing = load_model(
        str(schedule_variant(sd15_folder, tmp_path / "trailing", timestep_spacing="trailing")), device="cpu"
    )
    assert trailing.fingerprint != sd15_model.fingerprint
    assert (edited(trailing) - reference).abs().max() > 0.1
    assert trailing.legacy_fingerprint == sd15_model.legacy_fingerprint  # what banks of before saw
    with pytest.raises(BankError, match="was learnt on base model"):
        DirectionBank.load(walk["home"] / "out/faces/bank", trailing)


def test_a_bank_of_before_the_schedule_was_fingerprinted_still_loads(walk, sd15_model, tmp_path):
    old = DirectionBank.load(walk["home"] / "out/faces/bank")
    old.base_model["fingerprint"] = sd15_model.legacy_fingerprint
    old.save(tmp_path / "old")
    loaded = DirectionBank.load(tmp_path / "old", sd15_model)
    assert loaded.base_model["fingerprint"] == sd15_model.fingerprint  # today's form once saved
    old.base_model["fingerprint"] = "0123456789abcdef"
    old.save(tmp_path / "alien")
    with pytest.raises(BankError, match="fingerprint 0123456789abcdef"):
        DirectionBank.load(tmp_path / "alien", sd15_model)


def test_inversion_on_an_sd15_folder_prints_no_warning(sd15_model):
    """SD 1.x folders hold a PNDM config (skip_prk_steps...): the DDIM and inverse schedulers
    are built from the keys they take, so diffusers has nothing to warn about."""
    from noiseclr.editing import sampler

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        x_t, t = sampler.invert(sd15_model, sampler.encode(sd15_model, pixels), steps=3)
        sampler.sample(sd15_model, x_t, [], steps=3, start_t=t)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert x_t.shape == (1, 4, 8, 8) and seen == []


def test_the_pipeline_edits_an_sd15_folder_as_the_cli_with_its_pndm_scheduler(walk, sd15_folder, sd15_model):
    """SD 1.5's folder keeps its PNDM scheduler everywhere: `noiseclr edit`'s workflow and
    NoiseCLRPipeline give the same edited image (the bank's domain prompt, CFG, 4 steps)."""
    from diffusers import PNDMScheduler

    from noiseclr.editing.pipeline import NoiseCLRPipeline
    from noiseclr.workflows.edit import edit_image

    bank = DirectionBank.load(walk["home"] / "out/faces/bank")
    assert isinstance(sd15_model.pipe.scheduler, PNDMScheduler)
    cli = edit_image(sd15_model, {bank.name: bank}, ["0=1"], seed=3, steps=4).images[1]
    pipe = NoiseCLRPipeline.from_pretrained(sd15_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_bank(bank)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    ours = pipe(edits="0=1", seed=3, num_inference_steps=4, output_type="np").images[0]
    assert np.abs(ours - cli).max() <= 2 / 255
