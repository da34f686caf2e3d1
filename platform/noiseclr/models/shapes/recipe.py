"""The embedded model's training recipe: a plain torch loop in two stages.

1. VAE: AutoencoderKL on rendered images (L1 + L2 + a small KL), then the latent scaling
   factor that makes latents unit-variance, as Stable Diffusion's 0.18215 does.
2. Diffusion: UNet2DConditionModel and CLIPTextModel trained together, by default on
   v-prediction with SD 1.x's betas rescaled to zero terminal SNR (see
   `architecture.noise_schedule` for why; epsilon prediction on SD's own schedule is an
   option). Captions name the world's factors; each factor's words
   are dropped at random (so partial prompts work) and the whole caption is dropped at
   random (so classifier-free guidance works). EMA weights are the ones saved.

Images are rendered on the fly (the world is infinite) except word combinations held out
for measuring quality. Every `eval_every` steps the oracle scores generations from held-out
captions and a short table is printed, so a run that is not learning a factor shows it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from noiseclr.domains import shapes
from noiseclr.errors import ConfigError
from noiseclr.models.base import read_pipeline, resolve_device
from noiseclr.models.shapes.architecture import (
    ArchitectureConfig,
    build_pipeline,
    build_text_encoder,
    build_unet,
    noise_schedule,
    training_scheduler,
)
from noiseclr.models.shapes.quality import QUALITY_BAR, evaluate_quality, meets_bar, vae_roundtrip_quality
from noiseclr.models.shapes.xl import XLArch, XLText, to_sdxl
from noiseclr.utils.configfile import read_mapping, validation_message


class RecipeConfig(BaseModel):
    """Everything that decides the trained weights (with the seed and the hardware)."""

    model_config = ConfigDict(extra="forbid")

    arch: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    # Continue from a trained pipeline folder: its VAE is kept (stage 1 skipped) and the
    # diffusion stage starts from its UNet and text encoder.
    init_from: str | None = None
    # With init_from: parts rebuilt from `arch` with fresh weights instead of loaded (the VAE
    # is always kept), e.g. to change the UNet's architecture without retraining the VAE, or
    # to drop a text encoder that learned to ignore some words.
    fresh: list[Literal["unet", "text_encoder"]] = Field(default_factory=list)
    # With init_from an SD model: grow it into SDXL's architecture first (models/shapes/xl.py:
    # a second text encoder and the size-id conditioning, which start contributing nothing),
    # then train as below. An init_from that is already SDXL continues as SDXL.
    sdxl: XLArch | None = None
    # The noise schedule the UNet learns (saved in the pipeline's scheduler config). Changing
    # it with init_from fine-tunes the old weights to the new schedule, as Lin et al. did.
    prediction_type: str = Field("v_prediction", pattern="^(epsilon|v_prediction)$")
    zero_terminal_snr: bool = True
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = Field("no", pattern="^(no|bf16)$")
    vae_steps: int = Field(3000, ge=0)
    vae_batch: int = Field(64, ge=1)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # > 0: fine-tune the VAE decoder alone this many steps (after stage 1, or on the kept VAE
    # of init_from). The encoder is frozen, so the latent space, and any UNet trained on it,
    # stays valid. Its L1 loss weighs object pixels `decoder_object_weight` times more: the
    # plain loss is dominated by the background and leaves small objects' corners blurred,
    # which turns small triangles into circles.
    decoder_steps: int = Field(0, ge=0)
    decoder_lr: float = 2e-4
    decoder_object_weight: float = Field(10.0, ge=0)
    steps: int = Field(8000, ge=0)
    # > 0: render and VAE-encode this many scenes once and draw training batches from them
    # (fresh noise, timesteps and caption dropout each step). On a CPU the VAE encoder is a
    # quarter of a step; 0 renders a new batch every step.
    latent_pool: int = Field(0, ge=0)
    # If set, the diffusion stage re-measures its speed every 100 steps and shortens `steps`
    # (and the LR schedule with it) to end within this many seconds (likewise the VAE stage).
    time_budget_s: float | None = Field(None, gt=0)
    vae_time_budget_s: float | None = Field(None, gt=0)
    batch: int = Field(256, ge=2)
    lr: float = 5e-4
    warmup: int = 500
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    # Share of each batch whose timesteps are drawn from [high_noise_from, T) instead of
    # [0, T). Position is readable from x_t until high noise, so only those steps teach the
    # model to place objects from the caption; this raises their share of the gradient.
    high_noise_share: float = Field(0.0, ge=0, lt=1)
    high_noise_from: int = Field(800, ge=0, lt=1000)
    # > 0: the diffusion MSE weighs latent pixels under the object (its chroma mask, max-pooled
    # to latent size) 1 + this many times. A small object covers ~4 of 256 latent pixels, so
    # the plain loss is mostly grey background and barely asks the UNet to get the object's
    # corners right (it draws small squares and triangles as round blobs).
    diffusion_object_weight: float = Field(0.0, ge=0)
    # > 0: this share of each batch is trained as an edit (the caption-swap stage). The
    # model sees x_t of a scene at a timestep in `swap_t`, the caption of the same scene with
    # one of `swap_factors` changed, and is asked for the changed scene: the target is the
    # v (or epsilon) whose x0 prediction is the changed scene's latent. Plain training never
    # shows a caption that disagrees with x_t, so below the layout the model follows x_t and
    # a word (or a discovered direction) cannot change what x_t already shows.
    swap_share: float = Field(0.0, ge=0, le=1)
    swap_factors: list[str] = Field(default_factory=lambda: ["shape", "size"])
    swap_t: tuple[int, int] = (200, 700)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    word_dropout: float = Field(0.15, ge=0, le=1)
    eval_every: int = 1000
    eval_images: int = 64
    final_eval_images: int = 256
    guidance_scale: float = 4.0

    @model_validator(mode="after")
    def _sdxl_grows_a_trained_model(self) -> RecipeConfig:
        if self.sdxl is not None and not self.init_from:
            raise ValueError("sdxl: grows a trained SD model into SDXL's architecture; set init_from")
        return self

    @field_validator("swap_factors")
    @classmethod
    def _known_factors(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in shapes.FACTOR_WORDS]
        if unknown or not v:
            raise ValueError(f"swap_factors {unknown or v} not among {list(shapes.FACTORS)}")
        return v

    @field_validator("swap_t")
    @classmethod
    def _swap_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] < v[1] <= 1000:
            raise ValueError(f"swap_t {v}: needs 1 <= low < high <= 1000 (t = 0 has no noise to edit)")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> RecipeConfig:
        """A recipe file (`overrides`, None: not given, replace its keys); errors in one line
        naming the file and the key, as for every config of the platform."""
        values = read_mapping(path, "recipe")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(f"recipe {path}: {validation_message(err, cls)}") from None


def _lr_lambda(warmup: int, total: int | list[int]):
    """Linear warm-up then cosine to 10%; `total` may be a one-item list changed mid-run."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        end = total[0] if isinstance(total, list) else total
        progress = (step - warmup) / max(1, end - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def random_caption(
    scene: shapes.Scene, rng: np.random.Generator, cfg: RecipeConfig, keep: str | None = None
) -> str:
    """A caption with each factor's word dropped at random, or "" for the CFG null prompt.

    keep: a factor whose word is always said, and the caption never dropped (a swap's edit).
    """
    if keep is None and rng.random() < cfg.caption_dropout:
        return ""
    words: dict[str, str | None] = {
        f: (None if f != keep and rng.random() < cfg.word_dropout else w) for f, w in scene.words.items()
    }
    return shapes.caption(words)


def swap_scenes(
    scenes: list[shapes.Scene], factors: list[str], rng: np.random.Generator
) -> tuple[list[shapes.Scene], list[str]]:
    """Each scene with one factor (drawn from `factors`) moved to another of its words."""
    out, changed = [], []
    for scene in scenes:
        factor = factors[rng.integers(len(factors))]
        words = [w for w in shapes.FACTOR_WORDS[factor] if w != scene.words[factor]]
        out.append(shapes.with_word(scene, factor, words[rng.integers(len(words))]))
        changed.append(factor)
    return out, changed


def sample_timesteps(n: int, steps: int, cfg: RecipeConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Uniform training timesteps, a `high_noise_share` of them from [high_noise_from, steps)."""
    t = torch.randint(0, steps, (n,), generator=gen, device=device)
    high = torch.rand(n, generator=gen, device=device) < cfg.high_noise_share
    late = torch.randint(min(cfg.high_noise_from, steps - 1), steps, (n,), generator=gen, device=device)
    return torch.where(high, late, t)


def diffusion_loss(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | XLText,
    noise_sched,
    latents: torch.Tensor,  # (B, 4, h, w), already scaled
    input_ids: torch.Tensor | list[str],  # (B, L); SDXL (an XLText): the captions
    noise: torch.Tensor,  # (B, 4, h, w)
    t: torch.Tensor,  # (B,)
    weight: torch.Tensor | None = None,  # (B, 1, h, w) per-pixel loss weight
    x0_target: torch.Tensor | None = None,  # (B, 4, h, w) the latents to predict, if not `latents`
) -> torch.Tensor:
    """SD's training MSE (epsilon or v target, from the scheduler), text encoder in the graph.

    With `weight`, a weighted mean over pixels (equal weights give the plain MSE). With
    `x0_target`, x_t is still made from `latents`, but the target is the prediction whose x0
    estimate (x0 = a x_t - s v for v, (x_t - s eps) / a for epsilon) is `x0_target`: the
    caption-swap edit. Equal to the plain target when x0_target is latents.
    """
    noisy = noise_sched.add_noise(latents, noise, t)
    if isinstance(text_encoder, XLText):
        cond, added = text_encoder(input_ids)
    else:
        cond, added = text_encoder(input_ids)[0], None
    pred = unet(noisy, t, cond, added_cond_kwargs=added).sample
    if x0_target is not None:
        abar = noise_sched.alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        if noise_sched.config.prediction_type == "v_prediction":
            target = (a * noisy.float() - x0_target.float()) / s
        else:
            target = (noisy.float() - a * x0_target.float()) / s
    elif noise_sched.config.prediction_type == "v_prediction":
        target = noise_sched.get_velocity(latents, noise, t)
    else:
        target = noise
    return weighted_mean((pred.float() - target.float()).pow(2), weight)


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of err (B, C, h, w) with per-pixel weights (B, 1, h, w) shared by the channels."""
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[1])


def train_vae(pipe: StableDiffusionPipeline, cfg: RecipeConfig, device: torch.device, log) -> int:
    """Stage 1: trains the VAE and sets its latent scaling factor. Returns the steps run."""
    vae = pipe.vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(min(200, cfg.vae_steps // 10 + 1), cfg.vae_steps)
    )
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    t0 = time.time()
    steps_run = cfg.vae_steps
    for step in bar:
        if cfg.vae_time_budget_s and time.time() - t0 > cfg.vae_time_budget_s:
            log({"stage": "vae", "note": "time budget reached", "steps": step})
            steps_run = step
            break
        scenes = shapes.sample_scenes(cfg.vae_batch, seed=cfg.seed * 1_000_003 + step)
        x = shapes.render(scenes, cfg.arch.resolution, device) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        scenes = shapes.sample_scenes(512, seed=cfg.seed + 777)
        x = shapes.render(scenes, cfg.arch.resolution, device) * 2 - 1
        latents = vae.encode(x).latent_dist.sample()
        recon = vae.decode(latents).sample
        scaling = float(1.0 / latents.std())
        err = float((recon - x).abs().mean() / 2)
    vae.register_to_config(scaling_factor=scaling)
    log({"stage": "vae", "scaling_factor": scaling, "recon_mae": err, "steps_run": steps_run})
    return steps_run


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 on and around the coloured object of images in [-1, 1], else 0.

    The world's background is grey and its object saturated, so chroma finds the object; a
    3x3 dilation takes in the anti-aliased rim, where the shape is decided.
    """
    chroma = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    return F.max_pool2d((chroma > 0.1).float(), 3, stride=1, padding=1)


def finetune_decoder(pipe: StableDiffusionPipeline, cfg: RecipeConfig, device: torch.device, log) -> float:
    """Stage 1b: sharpen the VAE decoder with the encoder frozen. Returns the last loss."""
    vae = pipe.vae.to(device)
    vae.requires_grad_(False).eval()
    decoder = [vae.decoder, vae.post_quant_conv] if vae.post_quant_conv is not None else [vae.decoder]
    params = [p for m in decoder for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    warmup = min(100, cfg.decoder_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, cfg.decoder_steps))
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(cfg.decoder_steps), desc="decoder")
    for step in bar:
        scenes = shapes.sample_scenes(cfg.vae_batch, seed=cfg.seed * 1_000_003 + 500_000 + step)
        x = shapes.render(scenes, cfg.arch.resolution, device) * 2 - 1
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()  # samples, as the UNet is trained on
        recon = vae.decode(latents).sample
        weight = 1 + cfg.decoder_object_weight * object_mask(x)
        loss = weighted_mean((recon - x).abs(), weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False)
    log({"stage": "decoder", "steps": cfg.decoder_steps, "loss": loss.item()})
    return loss.item()


@torch.no_grad()
def posterior(vae, scenes: list[shapes.Scene], resolution: int):
    """Render scenes and encode them: the VAE's latent distribution (unscaled) and the
    object mask at latent size (B, 1, h, w), see `object_mask`."""
    x = shapes.render(scenes, resolution, vae.device) * 2 - 1
    dist = vae.encode(x).latent_dist
    return dist, F.adaptive_max_pool2d(object_mask(x), dist.mean.shape[-2:])


def train_diffusion(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, cfg: RecipeConfig, device: torch.device, log
):
    """Stage 2 (SD, or SDXL's UNet with both text encoders). Returns (EMA weights of the
    trained components by name, steps run)."""
    vae, tokenizer = pipe.vae, pipe.tokenizer
    trained = {
        n: getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, n, None)
    }
    for module in trained.values():
        module.to(device).train()
    unet, text_encoder = pipe.unet, pipe.text_encoder
    sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    text = XLText(pipe, device) if sdxl else text_encoder
    vae.to(device)
    noise_sched = training_scheduler(pipe)
    params = [p for module in trained.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = [cfg.steps]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, total))
    ema = {n: copy.deepcopy(m).requires_grad_(False).eval() for n, m in trained.items()}
    ema_params = [p for module in ema.values() for p in module.parameters()]
    held_out = shapes.held_out_combinations()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    eval_pipe = with_parts(pipe, ema)

    pool = None
    if cfg.latent_pool:
        scenes = shapes.sample_scenes(cfg.latent_pool, seed=cfg.seed * 1_000_003 + 10**6, exclude=held_out)
        moments = []
        with torch.no_grad():
            for i in tqdm(range(0, len(scenes), 256), desc="latent pool"):
                dist, mask = posterior(vae, scenes[i : i + 256], cfg.arch.resolution)
                moments.append((dist.mean, dist.std, mask))
        pool = (scenes, *(torch.cat(parts) for parts in zip(*moments, strict=True)))

    bar = tqdm(total=cfg.steps, desc="diffusion")
    t0 = time.time()
    last = (t0, 0)
    step = 0
    while step < total[0]:
        if cfg.time_budget_s and step and step % 100 == 0:  # re-fit the plan to the time left
            # From the speed of the last 100 steps, so that a passing slowdown (another job
            # on the machine) shortens the run only while it lasts.
            now = time.time()
            speed, last = (now - last[0]) / (step - last[1]), (now, step)
            fit = step + int((cfg.time_budget_s - (now - t0)) / speed)
            total[0] = min(cfg.steps, max(step + 1, fit))
            bar.total = total[0]
        if pool is None:
            scenes = shapes.sample_scenes(
                cfg.batch, seed=cfg.seed * 1_000_003 + 10**6 + step, exclude=held_out
            )
            dist, mask = posterior(vae, scenes, cfg.arch.resolution)
            latents = dist.sample(gen) * vae.config.scaling_factor
        else:
            pick = torch.randint(0, len(pool[0]), (cfg.batch,), generator=gen, device=device)
            scenes = [pool[0][i] for i in pick.tolist()]
            mean, std, mask = pool[1][pick], pool[2][pick], pool[3][pick]
            latents = mean + std * torch.randn(mean.shape, generator=gen, device=device)
            latents = latents * vae.config.scaling_factor
        captions = [random_caption(s, rng, cfg) for s in scenes]
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = sample_timesteps(len(scenes), noise_sched.config.num_train_timesteps, cfg, gen, device)
        x0_target = None
        n_swap = round(cfg.swap_share * len(scenes))
        if n_swap:  # the first n_swap samples become edits (see RecipeConfig.swap_share)
            edited, changed = swap_scenes(scenes[:n_swap], cfg.swap_factors, rng)
            dist_b, mask_b = posterior(vae, edited, cfg.arch.resolution)
            eps_b = torch.randn(dist_b.mean.shape, generator=gen, device=device)
            target_b = (dist_b.mean + dist_b.std * eps_b) * vae.config.scaling_factor
            x0_target = torch.cat([target_b, latents[n_swap:]])
            mask = torch.cat([torch.maximum(mask[:n_swap], mask_b), mask[n_swap:]])
            pairs = zip(edited, changed, strict=True)
            captions[:n_swap] = [random_caption(e, rng, cfg, keep=f) for e, f in pairs]
            lo, hi = cfg.swap_t
            t[:n_swap] = torch.randint(lo, hi, (n_swap,), generator=gen, device=device)
        ids = (
            captions
            if sdxl
            else tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
        )
        with autocast:
            weight = 1 + cfg.diffusion_object_weight * mask if cfg.diffusion_object_weight else None
            loss = diffusion_loss(unet, text, noise_sched, latents, ids, noise, t, weight, x0_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total[0]:
            scores = evaluate_quality(
                eval_pipe, cfg.eval_images, seed=1, guidance_scale=cfg.guidance_scale, progress=False
            )
            log({"stage": "diffusion", "step": step, "loss": loss.item(), "sec": time.time() - t0, **scores})
    bar.close()
    return ema, step


def with_parts(pipe, parts: dict[str, torch.nn.Module]):
    """A pipeline of `pipe`'s class and components, `parts` replaced (SDXL's settings kept)."""
    extra = {}
    if isinstance(pipe, StableDiffusionXLPipeline):
        extra = {
            "force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt,
            "add_watermarker": False,
        }
    out = type(pipe)(**{**pipe.components, **parts}, **extra)
    out.set_progress_bar_config(disable=True)
    return out


def train_base_model(cfg: RecipeConfig, out: str | Path) -> dict:
    """Run both stages, save the pipeline to `out` with a model card, return the metrics."""
    out = Path(out)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    history: list[dict] = []

    def log(row: dict) -> None:
        history.append(row)
        tqdm.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    started = time.time()
    vae_steps = 0
    schedule = noise_schedule(cfg.prediction_type, cfg.zero_terminal_snr)
    if cfg.init_from:
        pipe = read_pipeline(cfg.init_from)  # SD, or an SDXL stage continued
        pipe.vae.to(device).requires_grad_(False)
        pipe.scheduler = DDIMScheduler(**schedule)
        rebuild(cfg.arch, pipe, cfg.fresh)
        if cfg.sdxl is not None and not isinstance(pipe, StableDiffusionXLPipeline):
            pipe = to_sdxl(pipe, cfg.sdxl, cfg.seed)
        log({"stage": "init", "from": cfg.init_from, "fresh": ",".join(cfg.fresh) or "none",
             "family": "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd"})  # fmt: skip
    else:
        pipe = build_pipeline(cfg.arch, shapes.vocabulary(), schedule)
        vae_steps = train_vae(pipe, cfg, device, log)
    if cfg.decoder_steps:
        finetune_decoder(pipe, cfg, device, log)
    ema, steps_done = train_diffusion(pipe, cfg, device, log)
    final = with_parts(pipe, ema)
    scores = evaluate_quality(final, cfg.final_eval_images, seed=12345, guidance_scale=cfg.guidance_scale)
    metrics = {
        "quality": scores,
        "meets_bar": meets_bar(scores),
        "vae_roundtrip": vae_roundtrip_quality(final, cfg.final_eval_images, seed=12345),
        "train_seconds": time.time() - started,
        "diffusion_steps": steps_done,
        "vae_steps": vae_steps,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "history": history,
    }
    log({"stage": "final", **scores})
    save_pipeline(final, cfg, metrics, out)
    return metrics


def rebuild(arch: ArchitectureConfig, pipe: StableDiffusionPipeline, parts: list[str]) -> None:
    """Replace `parts` of a loaded pipeline by fresh ones built from `arch`.

    Checked to fit the kept parts before anything is replaced.
    """
    if not parts:
        return
    if isinstance(pipe, StableDiffusionXLPipeline):
        raise ValueError("fresh parts are for SD models; an SDXL stage continues its own weights")
    text_hidden = arch.text_hidden if "text_encoder" in parts else pipe.text_encoder.config.hidden_size
    if "unet" in parts:
        fits = {
            "text_hidden": (arch.text_hidden, text_hidden),
            "latent_channels": (arch.latent_channels, pipe.vae.config.latent_channels),
            "vae levels": (len(arch.vae_channels), len(pipe.vae.config.block_out_channels)),
            "resolution": (arch.resolution, pipe.vae.config.sample_size),
        }
    else:
        fits = {"text_hidden": (text_hidden, pipe.unet.config.cross_attention_dim)}
    wrong = {k: v for k, v in fits.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(
            f"fresh {parts}: arch does not fit the kept parts (arch, kept): "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items())
        )
    if "text_encoder" in parts:
        pipe.text_encoder = build_text_encoder(arch, pipe.tokenizer)
    if "unet" in parts:
        pipe.unet = build_unet(arch)


def save_pipeline(pipe: StableDiffusionPipeline, cfg: RecipeConfig, metrics: dict, out: Path) -> None:
    """Write the diffusers layout + world.json + recipe.json + README.md, atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
    world = {
        "world": "shapes",
        "vocabulary": shapes.vocabulary(),
        "factors": shapes.FACTOR_WORDS,
        "resolution": cfg.arch.resolution,
        "guidance_scale": cfg.guidance_scale,
    }
    (tmp / "world.json").write_text(json.dumps(world, indent=2))
    (tmp / "recipe.json").write_text(json.dumps({"config": cfg.model_dump(), "metrics": metrics}, indent=2))
    parent = Path(cfg.init_from) / "recipe.json" if cfg.init_from else None
    lineage: list[dict] = []
    if parent is not None and parent.exists():  # keep the earlier stages' records, newest first
        earlier = Path(cfg.init_from) / "lineage.json"
        older = Path(cfg.init_from) / "parent_recipe.json"
        if earlier.exists():
            lineage = json.loads(earlier.read_text())
        elif older.exists():  # written by the recipe before lineage.json existed
            lineage = [json.loads(older.read_text())]
        lineage = [json.loads(parent.read_text()), *lineage]
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2))
    (tmp / "README.md").write_text(model_card(cfg, metrics, lineage))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _stage_text(record: dict) -> str:
    """One earlier stage, from its recipe.json record, as a model-card table row."""
    c, m = record["config"], record["metrics"]
    if not c.get("init_from"):
        what = f"from scratch: VAE {m.get('vae_steps', '?')} steps, UNet + text encoder"
    elif c.get("fresh"):
        what = f"new {' + '.join(c['fresh'])}, the rest from `{c['init_from']}`"
    else:
        what = f"UNet + text encoder continued from `{c['init_from']}`"
    if c.get("decoder_steps"):
        what += f", VAE decoder fine-tuned {c['decoder_steps']} steps"
    unet = tuple(c["arch"]["unet_channels"]) if "arch" in c else "?"
    q = ", ".join(f"{k} {v:.3f}" for k, v in m["quality"].items())
    return (
        f"| {what} | {unet} | {m['diffusion_steps']} | {c.get('prediction_type', 'epsilon')}"
        f"{', zero terminal SNR' if c.get('zero_terminal_snr') else ''} | "
        f"{m['train_seconds']:.0f} s on {m['device']} | {q} |"
    )


def model_card(cfg: RecipeConfig, metrics: dict, lineage: list[dict] | None = None) -> str:
    """The README of a saved pipeline; lineage: records of the stages before this one, newest first."""
    q = metrics["quality"]
    vae_text = f"VAE {metrics['vae_steps']} steps (batch {cfg.vae_batch})"
    continued = ""
    if cfg.init_from:
        vae_text = "VAE kept from the earlier stage"
        new = " and ".join(f"a new {p.replace('_', ' ')}" for p in cfg.fresh)
        continued = f" (starting from {cfg.init_from}: its VAE kept{', ' + new if new else ''})"
    if cfg.decoder_steps:
        weight = 1 + cfg.decoder_object_weight
        vae_text += (
            f", its decoder then fine-tuned alone {cfg.decoder_steps} steps (batch {cfg.vae_batch},"
            f" lr {cfg.decoder_lr}, object pixels weighted x{weight:g}; encoder frozen)"
        )
    below = ", ".join(f"{k} {q[k]:.3f} < {v:.2f}" for k, v in QUALITY_BAR.items() if k in q and q[k] < v)
    below = f" Below it: {below}." if below else ""
    timesteps = ""
    if cfg.high_noise_share:
        timesteps = f"\n{cfg.high_noise_share:.0%} of each batch at timesteps >= {cfg.high_noise_from},"
    swaps = ""
    if cfg.swap_share:
        swaps = (
            f"\n{cfg.swap_share:.0%} of each batch trained as caption-swap edits"
            f" ({', '.join(cfg.swap_factors)} changed, t in [{cfg.swap_t[0]}, {cfg.swap_t[1]}):"
            " x_t of a scene, the caption and x0 of the edited one),"
        )
    diffusion_text = (
        f"UNet + text encoder\n{metrics['diffusion_steps']} steps\n(batch {cfg.batch}, AdamW lr {cfg.lr},"
        f" warm-up {cfg.warmup}, cosine, EMA {cfg.ema_decay},\ncaption dropout {cfg.caption_dropout},"
        f" per-factor word dropout {cfg.word_dropout},{timesteps}{swaps}\nprecision {cfg.mixed_precision})"
    )
    if cfg.init_from and not metrics["diffusion_steps"]:
        diffusion_text = "UNet and text encoder kept as they were (no diffusion steps)"
    earlier = ""
    if lineage:
        earlier = (
            "\nEarlier stages (their full records: `lineage.json`), newest first:\n\n"
            "| stage | UNet channels | diffusion steps | schedule | time | quality |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(_stage_text(r) for r in lineage) + "\n"
        )
    roundtrip = ""
    if metrics.get("vae_roundtrip"):  # the VAE's own ceiling on the same scenes
        r = metrics["vae_roundtrip"]
        roundtrip = (
            "\nThe VAE alone (held-out renders encoded and decoded, same scorer), the ceiling for"
            f" generation: {', '.join(f'{k} {r[k]:.3f}' for k in QUALITY_BAR if k in r)}.\n"
        )
    rows = "\n".join(
        f"| {k} | {v:.3f} | {QUALITY_BAR.get(k, float('nan')):.2f} |"
        if k in QUALITY_BAR
        else f"| {k} | {v:.3f} | - |"
        for k, v in q.items()
    )
    if cfg.sdxl is not None:
        x = cfg.sdxl
        title, layout = (
            "shapes-xl: the embedded SDXL-architecture model",
            (
                "SDXL's layout (StableDiffusionXLPipeline: AutoencoderKL, UNet2DConditionModel with\n"
                '"text_time" added conditioning, CLIPTextModel and CLIPTextModelWithProjection, CLIP-style\n'
                f"tokenizers; the second encoder {x.width_2} wide with {x.layers_2} layers, {x.time_dim}"
                " sinusoids per size id),\ngrown from the SD model (`noiseclr/models/shapes/xl.py`),"
                " DDIM scheduler"
            ),
        )
        load = "StableDiffusionXLPipeline.from_pretrained(this_folder)"
        diffusion_text = diffusion_text.replace("UNet + text encoder", "UNet + both text encoders")
    else:
        title, layout = (
            "shapes: the embedded base model",
            (
                "Stable Diffusion's layout (AutoencoderKL,\nUNet2DConditionModel, CLIPTextModel, CLIP-style"
                " tokenizer, DDIM scheduler"
            ),
        )
        load = "StableDiffusionPipeline.from_pretrained(this_folder)"
    name = "shapes-xl" if cfg.sdxl is not None else "shapes"
    return f"""# {title} of the NoiseCLR platform

A small text-to-image latent diffusion model in {layout} with SD 1.x's
betas{", rescaled to zero terminal SNR" if cfg.zero_terminal_snr else ""}, {cfg.prediction_type} prediction),
trained on the procedural *shapes world* (`noiseclr.domains.shapes`).
Load it with `{load}` or `noiseclr.models.load_model("{name}")`.

## How it was trained

`noiseclr base train` (recipe: `noiseclr/models/shapes/recipe.py`; full config in `recipe.json`):
{vae_text}, then {diffusion_text}, seed {cfg.seed}, on {metrics["device"]} in
{metrics["train_seconds"]:.0f} s{continued}.
{len(shapes.held_out_combinations())} of
{len(shapes.all_combinations())} word combinations were held out of training.
{earlier}
## Measured quality

{cfg.final_eval_images} images from held-out captions (scene sample seed 12345), DDIM 25 steps, guidance
{cfg.guidance_scale}, scored by the oracle (`noiseclr.domains.oracle`). Hue within 20 degrees
of the named hue; x, y and position (Euclidean) within 6 px of the named bin centre; size and
lightness: nearest bin; one_object: exactly one object found.

| check | share passing | bar |
|---|---|---|
{rows}

Meets the bar: {metrics["meets_bar"]}.{below}
{roundtrip}"""
