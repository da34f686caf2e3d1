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
    from noiseclr.models.quality import QUALITY_BAR, evaluate_quality, meets_bar

    base = load_model(model, device=_device(device))
    scores = evaluate_quality(base.pipe, n=n, seed=seed, guidance_scale=default_guidance(base), steps=steps)
    for k, v in scores.items():
        bar = f"(bar {QUALITY_BAR[k]:.2f})" if k in QUALITY_BAR else ""
        typer.echo(f"{k:<11} {v:.3f} {bar}")
    typer.echo(f"meets bar: {meets_bar(scores)}")


if __name__ == "__main__":
    app()
