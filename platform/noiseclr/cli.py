"""The `noiseclr` command line: thin, it parses and calls `workflows`, `editing`, `evaluation`.

A mistake of the user's (`errors.UserError`, an invalid option, a file that cannot be read or
written) is one line on stderr and exit code 2; `noiseclr --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

# transformers' import-time notices (e.g. "requires torchvision") are noise on a user's stderr.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click as typer._click: its exceptions are the ones raised
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from noiseclr.editing.defaults import INVERSION_STEPS, SEED_STEPS
from noiseclr.errors import ConfigError, Preempted, UserError

DEBUG = {"on": False}
PREEMPTED_EXIT = 143  # 128 + SIGTERM: stopped on notice, checkpointed, resumable


def user_message(err: BaseException) -> str | None:
    """One line for an error the user can fix, None for a bug (which keeps its traceback)."""
    from pydantic import ValidationError

    if isinstance(err, UserError):
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValidationError):
        from noiseclr.utils.configfile import validation_message

        return validation_message(err)
    if isinstance(err, OSError) and err.filename:  # a path we could not read or write
        return f"{err.filename}: {err.strerror or err}"
    if type(err).__name__ == "MlflowException":  # the tracking server refused or is unreachable
        return f"MLflow: {str(err).splitlines()[0]}"
    return None


class Commands(TyperGroup):
    """Typer's group, printing user errors as one line (exit 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click_errors.UsageError as err:  # a bad option or argument: one line too, not the usage text
            if DEBUG["on"] or isinstance(err, getattr(click_errors, "NoArgsIsHelpError", ())):
                raise
            where = err.ctx.command_path if err.ctx else "noiseclr"
            typer.echo(f"error: {err.format_message()} (see `{where} --help`)", err=True)
            ctx.exit(2)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except Exception as err:
            message = user_message(err)
            if message is None or DEBUG["on"]:
                raise
            typer.echo(f"error: {message}", err=True)
            ctx.exit(PREEMPTED_EXIT if isinstance(err, Preempted) else 2)


app = typer.Typer(
    cls=Commands,
    help="NoiseCLR: unsupervised discovery of interpretable directions in diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="The procedural shapes world.", no_args_is_help=True)
base_app = typer.Typer(help="The embedded base model: train it, measure it.", no_args_is_help=True)
mlflow_app = typer.Typer(help="A local MLflow tracking server.", no_args_is_help=True)
banks_app = typer.Typer(help="Direction banks in the MLflow model registry.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(base_app, name="base")
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(banks_app, name="banks")
config_app = typer.Typer(help="Job files: convert the flat layout to sections.", no_args_is_help=True)
app.add_typer(config_app, name="config")
job_app = typer.Typer(
    help="Jobs on a Ray cluster (Ray's Jobs API): status, logs, stop.", no_args_is_help=True
)
app.add_typer(job_app, name="job")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for every error.")) -> None:
    """NoiseCLR: unsupervised discovery of interpretable directions in diffusion models."""
    DEBUG["on"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")


def _parse_fixed(items: list[str]) -> dict[str, str]:
    fixed: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--fix takes factor=word, got {item!r}")
        k, v = (part.strip() for part in item.split("=", 1))
        if k in fixed:
            raise ConfigError(f"--fix {k} is given twice ({fixed[k]!r} and {v!r}); give each factor once")
        fixed[k] = v
    return fixed


@app.command()
def generate(
    prompt: str = typer.Option(..., help="Text prompt (the shapes model accepts only its world's words)."),
    model: str = typer.Option("shapes", help="'shapes', a diffusers folder, or a hub id."),
    n: int = typer.Option(8, min=1, help="Number of images."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same images."),
    steps: int = typer.Option(25, min=1, help="Sampling steps (the model folder's scheduler)."),
    guidance: float | None = typer.Option(None, help="CFG scale (default: the model's)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    out: Path = typer.Option(Path("grid.png"), help="Where to write the PNG grid."),
) -> None:
    """Generate images from a prompt and write them as a PNG grid."""
    from noiseclr.models.base import load_model
    from noiseclr.models.generate import generate as run
    from noiseclr.utils.images import image_format, make_grid, save_image

    image_format(out)  # refuse a bad --out before any work
    base = load_model(model, device=device)
    t0 = time.perf_counter()
    images = run(base, prompt, n=n, seed=seed, steps=steps, guidance_scale=guidance)
    seconds = time.perf_counter() - t0
    save_image(make_grid(images, scale=2 if base.resolution < 128 else 1), out)
    typer.echo(f"wrote {out} ({n} images, {seconds / n:.3f} s/image on {base.device})")


@world_app.command("make")
def world_make(
    out: str = typer.Option(..., help="Destination URI: a folder, file://, memory://, s3://..."),
    n: int = typer.Option(100, min=1),
    seed: int = typer.Option(0),
    resolution: int = typer.Option(64, min=16),
    fix: list[str] = typer.Option([], help="Hold a factor constant, e.g. --fix pattern=plain."),
) -> None:
    """Write n images of the shapes world plus a Parquet table of their factors."""
    from noiseclr.domains.dataset import write_world

    table = write_world(out, n=n, seed=seed, resolution=resolution, fixed=_parse_fixed(fix))
    typer.echo(f"wrote {table.num_rows} images and factors.parquet to {out}")


@base_app.command("train")
def base_train(
    config: Path = typer.Option(Path("jobs/base/base_shapes.yaml"), exists=True, help="Recipe YAML."),
    out: Path = typer.Option(Path("out/shapes-model"), help="Output folder (diffusers layout)."),
    steps: int | None = typer.Option(None, help="Override the diffusion steps."),
    vae_steps: int | None = typer.Option(None, help="Override the VAE steps."),
) -> None:
    """Train the embedded shapes model by the project's recipe."""
    from noiseclr.models.shapes.recipe import RecipeConfig, train_base_model

    metrics = train_base_model(RecipeConfig.from_yaml(config, steps=steps, vae_steps=vae_steps), out)
    typer.echo(
        json.dumps({"out": str(out), "quality": metrics["quality"], "meets_bar": metrics["meets_bar"]})
    )


@base_app.command("quality")
def base_quality(
    model: str = typer.Option("shapes"),
    n: int = typer.Option(256, min=1),
    seed: int = typer.Option(12345),
    steps: int = typer.Option(25, min=1),
    device: str = typer.Option("auto"),
) -> None:
    """Score generations from held-out captions with the oracle."""
    from noiseclr.models.base import load_model
    from noiseclr.models.generate import default_guidance
    from noiseclr.models.shapes.quality import QUALITY_BAR, evaluate_quality, meets_bar, vae_roundtrip_quality

    base = load_model(model, device=device)
    scores = evaluate_quality(base.pipe, n=n, seed=seed, guidance_scale=default_guidance(base), steps=steps)
    for k, v in scores.items():
        bar = f"(bar {QUALITY_BAR[k]:.2f})" if k in QUALITY_BAR else ""
        typer.echo(f"{k:<11} {v:.3f} {bar}")
    typer.echo(f"meets bar: {meets_bar(scores)}")
    ceiling = vae_roundtrip_quality(base.pipe, n=n, seed=seed)
    typer.echo("VAE round trip (ceiling): " + ", ".join(f"{k} {ceiling[k]:.3f}" for k in QUALITY_BAR))


@config_app.command("migrate")
def config_migrate(
    path: Path = typer.Argument(..., help="A discovery job file in the flat layout (no `kind`)."),
    write: bool = typer.Option(False, "--write", help="Rewrite PATH (the flat one kept as PATH.flat)."),
) -> None:
    """Print a flat discovery job file in sections (`kind: discover`, data, method, optim...),
    the same settings validated; comments are not carried over."""
    from noiseclr.discovery.config import migrate

    text = migrate(path)
    if write:
        kept = path.with_name(path.name + ".flat")
        if kept.exists():
            raise ConfigError(f"{kept} exists: move it away first (the flat file is kept there)")
        kept.write_text(path.read_text())
        path.write_text(text)
        typer.echo(f"wrote {path} (the flat file: {path.name}.flat)")
    else:
        typer.echo(text, nl=False)


@app.command()
def discover(
    config: Path = typer.Option(Path("jobs/shapes.yaml"), help="Discovery job YAML."),
    out: Path = typer.Option(Path("out/discovery"), help="Output folder: bank/, gallery/, checkpoints/."),
    data: str | None = typer.Option(None, help="Image folder URI (overrides the config's `data.uri`)."),
    steps: int | None = typer.Option(None, help="Override the config's steps."),
    k: int | None = typer.Option(None, help="Override the number of directions."),
    device: str | None = typer.Option(None, help="Override the device."),
    fresh: bool = typer.Option(False, help="Delete OUT/checkpoints and start over."),
    workers: int | None = typer.Option(
        None, help="Ray Train workers (DeepSpeed); 0: single process. Default: the config's."
    ),
    address: str | None = typer.Option(None, help="Ray cluster to join (ray://host:10001); default local."),
    zero_stage: int | None = typer.Option(None, help="Override the DeepSpeed ZeRO stage."),
    storage_path: str | None = typer.Option(None, help="Ray Train checkpoint storage (local or s3://)."),
) -> None:
    """Discover K directions on a domain of images and write the bank, its measurement and gallery.

    One process by default; with --workers N, Ray Train runs N DeepSpeed workers fed by Ray Data:
    the same config keys, micro-step, checkpoints and outputs. Rerunning resumes from the latest
    checkpoint in OUT; a changed training config is refused unless --fresh.
    """
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.workflows.discover import run_discovery

    cfg = DiscoveryConfig.from_yaml(
        config,
        data=data,
        steps=steps,
        k=k,
        device=device,
        zero_stage=zero_stage,
        workers=workers,
        storage_path=storage_path,
    )
    result = run_discovery(cfg, out, fresh=fresh, address=address)
    where = f"{result.workers} Ray Train workers" if result.workers else "one process"
    if result.resumed_from:
        typer.echo(f"resumed: {result.resumed_from}")
    if result.corrupt_images:
        typer.echo(f"skipped {result.corrupt_images} corrupt image(s)")
    typer.echo(f"bank:    {result.bank}")
    if result.card:
        typer.echo(f"card:    {result.card}")
    if result.evaluation:
        typer.echo(f"measured: {result.evaluation}")
    if result.score is not None:
        typer.echo(f"scores:  {result.score:.3f} (oracle-free), {result.live} live directions; in bank.json")
    if result.gallery:
        typer.echo(f"gallery: {result.gallery}")
        typer.echo(f"page:    {result.html}")
    typer.echo(f"done: {result.steps} steps on {result.images} images, {where}, {result.seconds} s")


@app.command()
def gallery(
    bank: list[str] = typer.Argument(..., help="Bank folder(s) or models:/NAME@ALIAS, models:/NAME/VERSION."),
    model: str = typer.Option("shapes"),
    out: Path | None = typer.Option(None, help="Default: BANK/../gallery."),
    scale: float | None = typer.Option(
        None,
        min=0.0,
        help="Columns go from -scale to +scale. Default: 2 (units of the measured strength) for a "
        "measured bank, else 6.",
    ),
    columns: int = typer.Option(5, min=2),
    seeds: int = typer.Option(3, min=1),
    prompt: str | None = typer.Option(
        None, help='Default: the bank\'s gallery prompt (its domain); "" for unconditional samples.'
    ),
    steps: int = typer.Option(25, min=1),
    device: str = typer.Option("auto"),
) -> None:
    """Write a PNG grid (directions x scales, over seeds) and an HTML page for each bank."""
    from noiseclr.models.base import load_model
    from noiseclr.workflows.edit import draw_gallery

    base = load_model(model, device=device)
    for ref in bank:
        pages = draw_gallery(base, ref, out, scale, columns, seeds, prompt, steps)
        typer.echo(f"{ref}: {pages['grid']} {pages['html']}")


@app.command()
def edit(
    edits: list[str] = typer.Argument(
        ..., help="[bank:]direction=scale[@t_high-t_low], e.g. 3=4 or bg:2=-3@800-200"
    ),
    bank: list[str] = typer.Option(
        ..., help="Bank folder(s) or models:/ references; its name in bank.json addresses it."
    ),
    model: str = typer.Option("shapes"),
    image: Path | None = typer.Option(None, help="A real image to edit (DDIM inversion); else a seed."),
    seed: int = typer.Option(0),
    prompt: str | None = typer.Option(
        None, help='Prompt for a generated image. Default: the bank\'s gallery prompt; "" for none.'
    ),
    sweep: str | None = typer.Option(
        None, help="Interpolate the first edit over scales (its units), e.g. -2,-1,0,1,2."
    ),
    steps: int | None = typer.Option(
        None,
        min=1,
        help=f"Sampling steps with the model folder's scheduler (default {SEED_STEPS}); DDIM inversion "
        f"and editing of --image ({INVERSION_STEPS}).",
    ),
    device: str = typer.Option("auto"),
    out: Path = typer.Option(Path("edit.png")),
) -> None:
    """Edit a generated image (a seed) or a real image with one or more directions."""
    from noiseclr.models.base import load_model
    from noiseclr.utils.images import image_format, make_grid, save_image
    from noiseclr.workflows.edit import edit_image, open_banks, parse_sweep

    image_format(out)  # refuse a bad --out before any work
    base = load_model(model, device=device)
    banks = open_banks(bank, base)
    done = edit_image(base, banks, edits, image, seed, prompt, parse_sweep(sweep) if sweep else None, steps)
    if done.inversion_error is not None:
        typer.echo(f"inversion reconstruction error (mean abs, 0..1): {done.inversion_error:.4f}")
    save_image(make_grid(done.images, cols=len(done.images), scale=2 if base.resolution < 128 else 1), out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{e.label} x{e.scale:g}" for e in done.edits))


def _int_list(option: str, text: str) -> tuple[int, ...]:
    """ "400,600" -> (400, 600); a clear error for anything else."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} takes integers separated by commas, got {text!r}") from None


@app.command()
def evaluate(
    bank: str = typer.Argument(..., help="Bank folder, or models:/NAME@ALIAS or models:/NAME/VERSION."),
    model: str = typer.Option("shapes"),
    n: int = typer.Option(16, min=2, help="Generated and real images per direction."),
    steps: int = typer.Option(20, min=2, help="DDIM steps of generated images."),
    window: int = typer.Option(600, min=1, max=1000, help="Edits act for t <= this."),
    windows: str = typer.Option(
        "", help="Window tops to try per direction, e.g. 400,600,800: each keeps its best (not --window)."
    ),
    target: float = typer.Option(0.5, min=0.01, help="Bins of effect each signed edit is scaled to."),
    fix: list[str] = typer.Option(
        None, help="Domain factor=word (repeatable). Default: the world the bank was trained on."
    ),
    real: bool = typer.Option(True, help="Also edit real (DDIM-inverted) world images."),
    inversion_steps: int = typer.Option(
        50, min=2, help="DDIM steps of the real images' inversion and edits (a quick look: fewer)."
    ),
    out: Path | None = typer.Option(None, help="Default: BANK/../evaluation."),
    label: bool = typer.Option(True, help="Write labels and the measured edit defaults into bank.json."),
    device: str = typer.Option("auto"),
) -> None:
    """Measure what every direction does to every factor of the shapes world, at calibrated
    strength, against the noise floor; intervals by bootstrap over images. Shapes-world models
    only (the oracle reads their factors); on any other model use `noiseclr measure`."""
    from noiseclr.evaluation.report import markdown_table
    from noiseclr.models.base import load_model
    from noiseclr.workflows.measure import evaluate as run

    done = run(
        load_model(model, device=device),
        bank,
        out,
        label=label,
        fixed=_parse_fixed(fix) if fix else None,
        n_images=n,
        steps=steps,
        inversion_steps=inversion_steps,
        real=real,
        window=(window, 0),
        windows=_int_list("--windows", windows),
        target_effect=target,
    )
    if label and done.saved is None:
        typer.echo("a registered bank is not rewritten: its labels are in the report (log a new version)")
    typer.echo(markdown_table(done.result))
    typer.echo(f"report: {done.report}")


@app.command()
def measure(
    bank: str = typer.Argument(..., help="Bank folder, or models:/NAME@ALIAS or models:/NAME/VERSION."),
    model: str = typer.Option("shapes", help="The bank's base model: shapes, a diffusers folder, a hub id."),
    data: str | None = typer.Option(
        None, help="Real images to edit (fsspec URI), DDIM-inverted. Default: the bank's training data."
    ),
    prompt: str | None = typer.Option(
        None, help="Generated images' prompt. Default: the bank's gallery prompt (or unconditional)."
    ),
    generated: bool = typer.Option(True, help="Also edit generated images."),
    n: int = typer.Option(8, min=2, help="Scored images per source (generated, real)."),
    steps: int = typer.Option(20, min=2, help="DDIM steps of generated images (real ones: 1.25x)."),
    target: float = typer.Option(0.02, min=0.001, max=0.5, help="Mean |pixel change| scale 1 means."),
    window: int | None = typer.Option(
        None, min=1, max=1000, help="Edits act for t <= this. Default: the bank's."
    ),
    device: str = typer.Option("auto"),
) -> None:
    """Measure every direction without an oracle, on any model and images: strength, calibrated
    scale, consistency, distinctness, area, drift; one score each, dead and duplicate directions
    flagged. Written into bank.json (a registered bank is not rewritten: its table is printed)."""
    from noiseclr.evaluation.blind import scores_table
    from noiseclr.models.base import load_model
    from noiseclr.tracking.registry import is_registered
    from noiseclr.workflows.measure import measure as measure_bank

    base = load_model(model, device=device)
    setup = dict(data=data, prompt=prompt, generated=generated, n=n, steps=steps, target=target)
    measured = measure_bank(base, bank, window=window, **setup)
    if is_registered(bank):
        typer.echo("a registered bank is not rewritten: log a new version to keep these scores")
    typer.echo(scores_table(measured))


@app.command()
def merge(
    banks: list[str] = typer.Argument(
        ..., help="Two or more bank folders or models:/ references learnt on one base model."
    ),
    out: Path = typer.Option(..., help="New folder for the merged bank."),
    name: str = typer.Option("merged", help="The merged bank's name; its tokens are <name-i>."),
    keep_all: bool = typer.Option(False, help="Keep dead and duplicate directions (measure only)."),
    model: str = typer.Option("shapes", help="The banks' base model: shapes, a diffusers folder, a hub id."),
    data: str | None = typer.Option(
        None, help="Real images to measure on (fsspec URI). Default: the first bank's training data."
    ),
    n: int = typer.Option(8, min=2, help="Scored images per source (generated, real)."),
    steps: int = typer.Option(20, min=2, help="DDIM steps of generated images (real ones: 1.25x)."),
    device: str = typer.Option("auto"),
) -> None:
    """Put several banks' directions into one (seeds, sweep trials, domains of one model),
    measure it without an oracle, and keep the live directions, one per duplicate group (its
    best): more distinct edits than any one run found, with no labels involved. Each kept
    direction's label, window, scales and origin (bank, token) come with it."""
    from noiseclr.evaluation.blind import scores_table
    from noiseclr.models.base import load_model
    from noiseclr.workflows.measure import merge as merge_banks
    from noiseclr.workflows.measure import refuse_a_bank_in

    refuse_a_bank_in(out)  # before minutes of loading a model
    base = load_model(model, device=device)
    done = merge_banks(base, banks, out, name, keep_all, data, n, steps)
    typer.echo(
        f"merged {done.merged} directions of {len(banks)} banks; kept {len(done.kept)} "
        f"(dropped {done.merged - len(done.kept)} dead or duplicate)"
    )
    typer.echo(scores_table(done.bank))
    typer.echo(f"bank: {out}")


@app.command()
def pullback(
    model: str = typer.Option("shapes"),
    k: int = typer.Option(8, min=1),
    n_images: int = typer.Option(16, min=1),
    t_edit: int = typer.Option(700, min=1, max=999),
    iters: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    data: str | None = typer.Option(None, help="Image folder URI; default: images of the shapes world."),
    out: Path = typer.Option(Path("out/pullback/bank")),
    device: str = typer.Option("auto"),
) -> None:
    """Discover global x_t directions with the pullback method (seed 004) and save them as a bank."""
    from noiseclr.card import save_bank
    from noiseclr.data.images import encode_latents, load_latents
    from noiseclr.discovery.pullback import discover_pullback
    from noiseclr.domains import shapes
    from noiseclr.models.base import load_model

    base = load_model(model, device=device)
    if data:
        latents = load_latents(data, base.resolution, base.pixel_vae, limit=n_images).latents
    else:
        pixels = shapes.render(shapes.sample_scenes(n_images, seed=seed), base.resolution) * 2 - 1
        latents = encode_latents(base.pixel_vae, pixels)
    bank = discover_pullback(base, latents, k, t_edit, iters, seed)
    typer.echo(f"bank: {save_bank(bank, out)}")


@app.command()
def compare(
    config: Path = typer.Option(Path("jobs/shapes.yaml"), help="NoiseCLR job YAML."),
    out: Path = typer.Option(Path("out/compare")),
    bank: list[str] = typer.Option(
        None,
        help="NAME=FOLDER of a bank to add (repeatable); 'noiseclr' or 'pullback' replace the bank the "
        "command would otherwise make on the config's domain.",
    ),
    n: int = typer.Option(16, min=2, help="Generated and real images per direction."),
    steps: int = typer.Option(20, min=2, help="DDIM steps of generated images."),
    full_world: bool = typer.Option(True, help="Also evaluate every row on the full world."),
    device: str = typer.Option("auto"),
) -> None:
    """The comparison: perfect edits (ceiling), known words, NoiseCLR, pullback and random
    directions (floor), one protocol, on the config's domain and on the full world."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.models.base import load_model
    from noiseclr.workflows.compare import run_comparison

    cfg = DiscoveryConfig.from_yaml(config, device=device)
    folders = {}
    for item in bank or []:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--bank takes NAME=FOLDER, got {item!r}")
        folders[name] = folder
    base = load_model(cfg.model, device=device)
    table = run_comparison(cfg, base, out, folders, full_world=full_world, n_images=n, steps=steps)
    typer.echo(table.read_text())
    typer.echo(f"wrote {table} and compare.json")


@app.command("export")
def export(
    bank: str = typer.Argument(..., help="Bank folder or models:/ reference."),
    out: Path = typer.Option(..., help="Folder for the embedding files, their .json sidecars and index."),
    fmt: str = typer.Option(
        "diffusers", "--format", help="diffusers, a1111 (AUTOMATIC1111), comfyui or kohya."
    ),
    pt: bool = typer.Option(False, "--pt", help="Write .pt (tensors only) instead of .safetensors."),
    model: str | None = typer.Option(
        None, help="Refuse the bank unless its width is this model's text encoder's ('shapes', a folder...)."
    ),
) -> None:
    """Export a bank as textual-inversion files that diffusers, AUTOMATIC1111, ComfyUI or kohya
    load: one file per direction named for its prompt token, labels and scales in sidecar JSON."""
    from noiseclr.workflows.publish import export as run

    done = run(bank, out, fmt, pt=pt, model=model)
    if done.note:
        typer.echo(done.note, err=True)
    paths, index = done.paths, done.index
    first = index["directions"][0]
    typer.echo(f"wrote {len(paths)} {fmt} files, their .json sidecars and bank-export.json to {out}")
    typer.echo(f"load: {index['load']} (first: {first['file']}, prompt {first['prompt']!r})")


@app.command("export-ti")
def export_ti(
    bank: str = typer.Argument(..., help="Bank folder or models:/ reference."),
    out: Path = typer.Option(..., help="Folder for the textual-inversion files."),
) -> None:
    """Export a bank as textual-inversion files for diffusers (`noiseclr export --format diffusers`)."""
    from noiseclr.workflows.publish import export as run

    paths = run(bank, out, "diffusers").paths
    typer.echo(f"wrote {len(paths)} files to {out}; load them into a diffusers pipeline with:")
    typer.echo(f'  pipe.load_textual_inversion(sorted(glob.glob("{out}/*.safetensors")))')


@app.command()
def sweep(
    config: Path = typer.Option(Path("jobs/sweep-shapes.yaml"), help="Sweep YAML (space, milestones, job)."),
    out: Path = typer.Option(Path("out/sweep"), help="Output folder; rerunning resumes the sweep there."),
) -> None:
    """Ray Tune sweep (ASHA + Optuna) over K, timestep range, tau...; objective: the oracle's
    alignment on the shapes world, the oracle-free bank objective on any other data.

    The leading trials are measured again on more images and the best by that figure is
    chosen; with a tracking URI, trials are MLflow child runs of one sweep run and the chosen
    bank is registered with the sweep's alias (default champion)."""
    from noiseclr.workflows.sweep import SweepConfig, run_sweep

    spec, job = SweepConfig.from_yaml(config)
    summary = run_sweep(spec, job, out)
    typer.echo(Path(summary["table"]).read_text())
    typer.echo(f"best: {json.dumps(summary['best'], default=str)}")
    typer.echo(f"bank: {summary['bank']}")
    if summary.get("registered"):
        typer.echo(f"registered: {summary['registered']} (alias {spec.register_alias})")
    typer.echo(f"figure: {summary['figure']}")


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, so a server command's cleanup runs (a
    background job may have inherited SIGINT as ignored)."""
    import signal

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)


@app.command()
def serve(
    config: Path = typer.Option(Path("jobs/serve-shapes.yaml"), help="Serve YAML (banks, limits, replicas)."),
    host: str | None = typer.Option(None, help="Bind address (default: the config's, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP port (default: the config's, 8000)."),
    address: str | None = typer.Option(None, help="A running Ray cluster (default: start a local one)."),
) -> None:
    """Serve the edit endpoint and its web page with Ray Serve until Ctrl-C or SIGTERM.

    API keys: comma-separated in $NOISECLR_API_KEYS (the config's api_keys_env) when set."""
    import time as _time

    from noiseclr.serving.app import start
    from noiseclr.serving.config import ServeConfig

    cfg = ServeConfig.from_yaml(config, host=host, port=port)

    url = start(cfg, address)
    _stop_on_signals()  # after ray.init, which installs its own SIGTERM handler (exit, no shutdown)
    typer.echo(
        f"edit endpoint at {url}/v1/edits; page {url}/; API docs {url}/docs; banks {sorted(cfg.banks)}"
    )
    try:
        while True:
            _time.sleep(1)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


ADDRESS = typer.Option(
    None, "--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)."
)


@app.command()
def submit(
    config: Path = typer.Argument(
        ..., help="Job YAML: discovery, sweep (has `space`) or serve (has `banks`)."
    ),
    address: str | None = ADDRESS,
    working_dir: Path = typer.Option(Path("."), help="Folder sent with the job; CONFIG must be inside."),
    out: str | None = typer.Option(None, help="OUT of discover/sweep on the cluster (default out/NAME)."),
    env: list[str] = typer.Option([], help="KEY=VALUE, or KEY to pass this shell's value (repeatable)."),
    ship_code: bool = typer.Option(False, help="Run this checkout's noiseclr package, not the image's."),
    cpus: float | None = typer.Option(None, help="CPUs reserved for the entry point (driver)."),
    gpus: float | None = typer.Option(None, help="GPUs for the driver: 1 for single-process GPU discovery."),
    submission_id: str | None = typer.Option(None, help="Job id (default noiseclr-KIND-NAME-TIME)."),
    follow: bool = typer.Option(True, help="Stream the logs until the job ends (Ctrl-C detaches)."),
) -> None:
    """Submit a job YAML to a Ray cluster (validated here first); exit 1 unless it succeeds."""
    from noiseclr import submit as jobs

    job = jobs.make_job(config, working_dir, out, jobs.parse_env(env), ship_code, submission_id)
    if job.driver_gpu_advised and not gpus:
        typer.echo(
            "warning: the driver gets no GPU (--gpus 1): on a cluster that adds GPU nodes only on "
            "demand, the workers would find none and train on CPUs",
            err=True,
        )
    job_id = jobs.submit(job, address, cpus, gpus)
    typer.echo(f"submitted {job_id}: {job.entrypoint}", err=True)
    if follow:
        _follow(address, job_id)


def _follow(address: str | None, job_id: str) -> None:
    from noiseclr import submit as jobs

    try:
        status = jobs.follow(address, job_id, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"\ndetached; the job goes on (noiseclr job stop {job_id} to stop it)", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"{job_id}: {status}", err=True)
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@job_app.command("status")
def job_status(job_id: str = typer.Argument(...), address: str | None = ADDRESS) -> None:
    """Status, entry point and, for a failed job, why."""
    from noiseclr import submit as jobs

    info = jobs.call(jobs.client(address), "get_job_info", job_id)
    typer.echo(f"{job_id}: {info.status.value}")
    typer.echo(f"  entrypoint: {info.entrypoint}")
    if info.message:
        typer.echo(f"  message: {info.message}")


@job_app.command("logs")
def job_logs(
    job_id: str = typer.Argument(...),
    address: str | None = ADDRESS,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
) -> None:
    """The job's driver logs."""
    from noiseclr import submit as jobs

    if follow:
        _follow(address, job_id)
    typer.echo(jobs.call(jobs.client(address), "get_job_logs", job_id), nl=False)


@job_app.command("stop")
def job_stop(
    job_id: str = typer.Argument(...),
    address: str | None = ADDRESS,
    wait: int = typer.Option(60, help="Seconds to wait for the job to end (0: do not wait)."),
) -> None:
    """Ask the cluster to stop a job (SIGTERM to its driver, then SIGKILL)."""
    from noiseclr import submit as jobs

    cluster = jobs.client(address)  # one client: each one checks the server's version first
    jobs.call(cluster, "stop_job", job_id)
    status = "STOPPING"
    for _ in range(wait):
        status = jobs.call(cluster, "get_job_status", job_id).value
        if status in jobs.TERMINAL:
            break
        time.sleep(1)
    typer.echo(f"{job_id}: {status}")


@job_app.command("list")
def job_list(address: str | None = ADDRESS) -> None:
    """Jobs the cluster knows: id, status, entry point."""
    from noiseclr import submit as jobs

    for info in sorted(jobs.client(address).list_jobs(), key=lambda i: i.start_time or 0):
        typer.echo(f"{info.submission_id or info.job_id}  {info.status.value:<9}  {info.entrypoint}")


@mlflow_app.command("up")
def mlflow_up(
    root: Path = typer.Option(Path("out/mlflow"), help="Folder for mlflow.db (SQLite) and artifacts/."),
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
    artifacts_destination: str | None = typer.Option(
        None, help="Artifact store URI (default ROOT/artifacts), e.g. s3://bucket/mlflow."
    ),
) -> None:
    """Run an MLflow tracking server on 127.0.0.1 (SQLite store) until Ctrl-C or SIGTERM."""
    import time as _time

    from noiseclr.tracking.server import MlflowServer

    _stop_on_signals()

    with MlflowServer(root, port, artifacts_destination) as server:
        typer.echo(
            f"MLflow at {server.uri} (store {root / 'mlflow.db'}); export MLFLOW_TRACKING_URI={server.uri}"
        )
        try:
            while server.proc is not None and server.proc.poll() is None:
                _time.sleep(1)
        except KeyboardInterrupt:
            pass


@banks_app.command("list")
def banks_list() -> None:
    """Registered banks: name, versions, aliases."""
    from noiseclr.tracking.registry import registered_banks

    for name, versions, aliases in registered_banks():
        pointed = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items()))
        typer.echo(f"{name}: {versions} version(s){'; ' + pointed if pointed else ''}")


@banks_app.command("show")
def banks_show(ref: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION")) -> None:
    """One version: its run, tags and checksums, and its directions ranked by the oracle-free score."""
    from noiseclr.bank import DirectionBank
    from noiseclr.evaluation.blind import scores_table
    from noiseclr.tracking.registry import download_bank, require_tracking_uri, resolve_version

    require_tracking_uri()
    v = resolve_version(ref)
    typer.echo(f"{v.name} version {v.version} (run {v.run_id}), aliases: {', '.join(v.aliases) or '-'}")
    for key, value in sorted(v.tags.items()):
        typer.echo(f"  {key}: {value}")
    try:
        table = scores_table(DirectionBank.load(download_bank(f"models:/{v.name}/{v.version}")))
    except UserError as err:  # an old or damaged version: its tags above still say what it is
        table = f"directions not shown: {err}"
    typer.echo(table or "not measured (noiseclr measure BANK)")


@banks_app.command("promote")
def banks_promote(
    ref: str = typer.Argument(..., help="models:/NAME/VERSION (or @ALIAS) to point the alias at"),
    alias: str = typer.Option("champion", help="The alias to set."),
) -> None:
    """Point an alias (default champion) at a version."""
    from noiseclr.tracking.registry import promote

    v = promote(ref, alias)
    typer.echo(f"models:/{v.name}@{alias} -> version {v.version}")


@banks_app.command("download")
def banks_download(
    ref: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    out: Path = typer.Option(
        ..., help="Folder to write the bank into: new, empty or a bank (nothing else there is touched)."
    ),
) -> None:
    """Download a registered bank into a folder, verified against its logged checksums."""
    from noiseclr.tracking.registry import download_bank, require_tracking_uri

    require_tracking_uri()
    typer.echo(f"bank: {download_bank(ref, out)}")


if __name__ == "__main__":
    app()
