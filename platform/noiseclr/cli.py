"""The `noiseclr` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml

app = typer.Typer(
    help="NoiseCLR: unsupervised discovery of interpretable directions in diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="The procedural shapes world.", no_args_is_help=True)
base_app = typer.Typer(help="The embedded base model: train it, measure it.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(base_app, name="base")


SEED_STEPS = 25
# DDIM inversion's own discretisation error shrinks with steps: the committed model's mean
# round-trip error on 16 held-out renders is 0.056 at 50 steps and 0.025 at 100 (on one set of
# 4 it swung to 0.088 at 50 vs 0.033 at 100). Real images get the slower, faithful default.
INVERSION_STEPS = 100


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _parse_fixed(items: list[str]) -> dict[str, str]:
    fixed = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--fix takes factor=word, got {item!r}")
        k, v = item.split("=", 1)
        fixed[k.strip()] = v.strip()
    return fixed


@app.command()
def generate(
    prompt: str = typer.Option(..., help="Text prompt (the shapes model accepts only its world's words)."),
    model: str = typer.Option("shapes", help="'shapes', a diffusers folder, or a hub id."),
    n: int = typer.Option(8, min=1, help="Number of images."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same images."),
    steps: int = typer.Option(25, min=1, help="DDIM steps."),
    guidance: float | None = typer.Option(None, help="CFG scale (default: the model's)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    out: Path = typer.Option(Path("grid.png"), help="Where to write the PNG grid."),
) -> None:
    """Generate images from a prompt and write them as a PNG grid."""
    from noiseclr.models.generate import generate as run
    from noiseclr.models.loader import load_model
    from noiseclr.utils.images import make_grid, save_png

    base = load_model(model, device=_device(device))
    t0 = time.perf_counter()
    images = run(base, prompt, n=n, seed=seed, steps=steps, guidance_scale=guidance)
    seconds = time.perf_counter() - t0
    save_png(make_grid(images, scale=2 if base.resolution < 128 else 1), out)
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
    config: Path = typer.Option(Path("jobs/base_shapes.yaml"), exists=True, help="Recipe YAML."),
    out: Path = typer.Option(Path("out/shapes-model"), help="Output folder (diffusers layout)."),
    steps: int | None = typer.Option(None, help="Override the diffusion steps."),
    vae_steps: int | None = typer.Option(None, help="Override the VAE steps."),
) -> None:
    """Train the embedded shapes model by the project's recipe."""
    from noiseclr.models.recipe import RecipeConfig, train_base_model

    values = yaml.safe_load(config.read_text()) or {}
    if steps is not None:
        values["steps"] = steps
    if vae_steps is not None:
        values["vae_steps"] = vae_steps
    metrics = train_base_model(RecipeConfig(**values), out)
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
    from noiseclr.models.generate import default_guidance
    from noiseclr.models.loader import load_model
    from noiseclr.models.quality import QUALITY_BAR, evaluate_quality, meets_bar, vae_roundtrip_quality

    base = load_model(model, device=_device(device))
    scores = evaluate_quality(base.pipe, n=n, seed=seed, guidance_scale=default_guidance(base), steps=steps)
    for k, v in scores.items():
        bar = f"(bar {QUALITY_BAR[k]:.2f})" if k in QUALITY_BAR else ""
        typer.echo(f"{k:<11} {v:.3f} {bar}")
    typer.echo(f"meets bar: {meets_bar(scores)}")
    ceiling = vae_roundtrip_quality(base.pipe, n=n, seed=seed)
    typer.echo("VAE round trip (ceiling): " + ", ".join(f"{k} {ceiling[k]:.3f}" for k in QUALITY_BAR))


@app.command()
def discover(
    config: Path = typer.Option(Path("jobs/shapes.yaml"), exists=True, help="Discovery job YAML."),
    out: Path = typer.Option(Path("out/discovery"), help="Output folder: bank/, gallery/, checkpoints/."),
    data: str | None = typer.Option(None, help="Image folder URI (overrides the config's `data`)."),
    steps: int | None = typer.Option(None, help="Override the config's steps."),
    k: int | None = typer.Option(None, help="Override the number of directions."),
    device: str | None = typer.Option(None, help="Override the device."),
    fresh: bool = typer.Option(False, help="Ignore checkpoints in OUT and start over."),
    workers: int | None = typer.Option(
        None, min=0, help="Ray Train workers (DeepSpeed); 0: single process. Default: the config's."
    ),
    address: str | None = typer.Option(None, help="Ray cluster to join (ray://host:10001); default local."),
    zero_stage: int | None = typer.Option(None, min=0, max=3, help="Override the DeepSpeed ZeRO stage."),
    storage_path: str | None = typer.Option(None, help="Ray Train checkpoint storage (local or s3://)."),
) -> None:
    """Discover K directions on a domain of images and write the bank and its gallery.

    One process by default; with --workers N, Ray Train runs N DeepSpeed workers fed by Ray Data
    (same config schema), on a local Ray or the cluster at --address.
    """
    from noiseclr.discovery.config import DiscoveryConfig

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
    if cfg.workers:
        from noiseclr.training.distributed import run_distributed

        result = run_distributed(cfg, out, cfg.workers, address=address)
        typer.echo(
            f"bank: {result['bank']} ({result['steps']} steps on {cfg.workers} workers, "
            f"{result['corrupt_images']} corrupt image(s) skipped)"
        )
        return
    from noiseclr.discovery.run import run_discovery

    result = run_discovery(cfg, out, resume=not fresh)
    if result["corrupt_images"]:
        typer.echo(f"skipped {result['corrupt_images']} corrupt image(s)")
    typer.echo(f"bank:    {result['bank']}")
    typer.echo(f"gallery: {result['gallery']}")
    typer.echo(f"page:    {result['html']}")
    if result["evaluation"]:
        typer.echo(f"measured: {result['evaluation']}")
    typer.echo(f"done in {result['seconds']} s on {result['images']} images")


@app.command()
def gallery(
    bank: list[Path] = typer.Argument(..., help="Bank folder(s)."),
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
    prompt: str | None = typer.Option(None, help="Default: unconditional samples."),
    steps: int = typer.Option(25, min=1),
    device: str = typer.Option("auto"),
) -> None:
    """Write a PNG grid (directions x scales, over seeds) and an HTML page for each bank."""
    import numpy as np

    from noiseclr.discovery.bank import DirectionBank
    from noiseclr.editing.gallery import write_gallery
    from noiseclr.models.loader import load_model

    base = load_model(model, device=_device(device))
    for folder in bank:
        b = DirectionBank.load(folder, base)
        top = scale if scale is not None else 2.0 if b.edit_defaults.get("scales") else 6.0
        scales = [round(float(s), 4) for s in np.linspace(-top, top, columns)]
        target = out or folder.parent / "gallery"
        pages = write_gallery(base, b, target, scales, list(range(seeds)), prompt, steps)
        typer.echo(f"{folder}: {pages['grid']} {pages['html']}")


@app.command()
def edit(
    edits: list[str] = typer.Argument(
        ..., help="[bank:]direction=scale[@t_high-t_low], e.g. 3=4 or bg:2=-3@800-200"
    ),
    bank: list[Path] = typer.Option(..., help="Bank folder(s); its name in bank.json addresses it."),
    model: str = typer.Option("shapes"),
    image: Path | None = typer.Option(None, help="A real image to edit (DDIM inversion); else a seed."),
    seed: int = typer.Option(0),
    prompt: str | None = typer.Option(None, help="Prompt for a generated image (default: unconditional)."),
    sweep: str | None = typer.Option(None, help="Interpolate the first edit over scales, e.g. -6,-3,0,3,6."),
    steps: int | None = typer.Option(
        None, min=1, help=f"DDIM steps (default {SEED_STEPS}; {INVERSION_STEPS} when inverting --image)."
    ),
    device: str = typer.Option("auto"),
    out: Path = typer.Option(Path("edit.png")),
) -> None:
    """Edit a generated image (a seed) or a real image with one or more directions."""
    import numpy as np
    import torch

    from noiseclr.discovery.bank import DirectionBank
    from noiseclr.discovery.data import decode_image
    from noiseclr.editing import sampler
    from noiseclr.models.generate import default_guidance
    from noiseclr.models.loader import load_model
    from noiseclr.utils.images import make_grid, save_png

    base = load_model(model, device=_device(device))
    banks = {}
    for folder in bank:
        b = DirectionBank.load(folder, base)
        if b.name in banks:
            raise typer.BadParameter(f"two banks are named {b.name!r}")
        banks[b.name] = b
    parsed = [sampler.parse_edit(e, banks) for e in edits]
    if steps is None:
        steps = INVERSION_STEPS if image is not None else SEED_STEPS
    if image is not None:
        pixels = torch.from_numpy(decode_image(image.read_bytes(), base.resolution)).permute(2, 0, 1)[None]
        pixels = pixels.float() / 127.5 - 1
        x_T, start_t, before, err = sampler.invert_real(base, pixels, steps)
        typer.echo(f"inversion reconstruction error (mean abs, 0..1): {err:.4f}")
        prompt, guidance = None, 1.0
    else:
        x_T, start_t, before = sampler.seed_latents(base, [seed]), None, None
        guidance = default_guidance(base) if prompt else 1.0
    if sweep:
        scales = [float(s) for s in sweep.split(",")]
        images = sampler.scale_sweep(base, x_T, parsed[0], scales, prompt, guidance, steps, start_t)[0]
    else:
        if before is None:
            before = sampler.decode(
                base, sampler.sample(base, x_T, [], prompt=prompt, guidance_scale=guidance, steps=steps)
            )
        after = sampler.decode(
            base,
            sampler.sample(
                base, x_T, parsed, prompt=prompt, guidance_scale=guidance, steps=steps, start_t=start_t
            ),
        )
        images = np.concatenate([before, after])
    save_png(make_grid(images, cols=len(images), scale=2 if base.resolution < 128 else 1), out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{e.label} x{e.scale:g}" for e in parsed))


def _protocol(fix: list[str] | None, default_fixed: dict, **values):
    """The evaluation protocol from CLI values; --fix replaces the bank's or config's domain."""
    from noiseclr.evaluation.evaluate import Protocol

    fixed = _parse_fixed(fix) if fix else dict(default_fixed)
    from pydantic import ValidationError

    try:
        return Protocol(fixed=fixed, **{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise typer.BadParameter(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


@app.command()
def evaluate(
    bank: Path = typer.Argument(..., help="Bank folder."),
    model: str = typer.Option("shapes"),
    n: int = typer.Option(16, min=2, help="Generated and real images per direction."),
    steps: int = typer.Option(20, min=2, help="DDIM steps of generated images."),
    window: int = typer.Option(600, min=1, max=1000, help="Edits act for t <= this."),
    target: float = typer.Option(0.5, min=0.01, help="Bins of effect each signed edit is scaled to."),
    fix: list[str] = typer.Option(
        None, help="Domain factor=word (repeatable). Default: the world the bank was trained on."
    ),
    real: bool = typer.Option(True, help="Also edit real (DDIM-inverted) world images."),
    out: Path | None = typer.Option(None, help="Default: BANK/../evaluation."),
    label: bool = typer.Option(True, help="Write labels and the measured edit defaults into bank.json."),
    device: str = typer.Option("auto"),
) -> None:
    """Measure what every direction does to every factor of the shapes world, at calibrated
    strength, against the noise floor; intervals by bootstrap over images."""
    from noiseclr.discovery.bank import DirectionBank
    from noiseclr.evaluation.evaluate import measure_bank
    from noiseclr.evaluation.report import markdown_table
    from noiseclr.models.loader import load_model

    base = load_model(model, device=_device(device))
    b = DirectionBank.load(bank, base)
    protocol = _protocol(
        fix,
        b.config.get("world_fixed", {}),
        n_images=n,
        steps=steps,
        real=real,
        window=(window, 0),
        target_effect=target,
    )
    result, paths = measure_bank(base, b, protocol, out or bank.parent / "evaluation", label=label)
    if label:
        b.save(bank)
    typer.echo(markdown_table(result))
    typer.echo(f"report: {paths['html']}")


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
    from noiseclr.discovery.data import encode_latents, load_images
    from noiseclr.discovery.pullback import discover_pullback
    from noiseclr.domains import shapes
    from noiseclr.models.loader import load_model

    base = load_model(model, device=_device(device))
    if data:
        pixels = load_images(data, base.resolution, limit=n_images).pixels
    else:
        pixels = shapes.render(shapes.sample_scenes(n_images, seed=seed), base.resolution) * 2 - 1
    bank = discover_pullback(base, encode_latents(base.pipe.vae, pixels), k, t_edit, iters, seed)
    typer.echo(f"bank: {bank.save(out)}")


@app.command()
def compare(
    config: Path = typer.Option(Path("jobs/shapes.yaml"), exists=True, help="NoiseCLR job YAML."),
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
    from noiseclr.discovery.bank import DirectionBank
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.pullback import discover_pullback
    from noiseclr.discovery.run import run_discovery
    from noiseclr.domains import shapes
    from noiseclr.editing.sampler import encode
    from noiseclr.evaluation.compare import compare as run_compare
    from noiseclr.models.loader import load_model

    # The comparison measures every row itself; the job's own measurement would be a second one.
    cfg = DiscoveryConfig.from_yaml(config, device=device, evaluate=False)
    base = load_model(cfg.model, device=_device(device))
    banks: dict[str, DirectionBank] = {}
    for item in bank or []:
        name, sep, folder = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--bank takes NAME=FOLDER, got {item!r}")
        banks[name] = DirectionBank.load(folder, base)
    if "noiseclr" not in banks:
        banks = {"noiseclr": DirectionBank.load(run_discovery(cfg, out / "noiseclr")["bank"], base), **banks}
    if "pullback" not in banks:
        scenes = shapes.sample_scenes(16, seed=cfg.seed, fixed=cfg.world_fixed)
        pixels = shapes.render(scenes, base.resolution) * 2 - 1
        pb = discover_pullback(base, encode(base, pixels), k=min(cfg.k, 8), seed=cfg.seed)
        banks["pullback"] = DirectionBank.load(pb.save(out / "pullback" / "bank"), base)
    protocol = _protocol(None, cfg.world_fixed, n_images=n, steps=steps)
    run_compare(base, banks, protocol, out, full_world=full_world)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out / 'compare.md'} and compare.json")


@app.command("export-ti")
def export_ti(
    bank: Path = typer.Argument(..., help="Bank folder."),
    out: Path = typer.Option(..., help="Folder for the textual-inversion files."),
) -> None:
    """Export a bank as textual-inversion files for `StableDiffusionPipeline.load_textual_inversion`."""
    from noiseclr.discovery.bank import DirectionBank

    paths = DirectionBank.load(bank).export_textual_inversion(out)
    typer.echo(f"wrote {len(paths)} files to {out}")


if __name__ == "__main__":
    app()
