"""The embedded model's architecture: Stable Diffusion's classes at a small size.

AutoencoderKL (64x64x3 <-> 16x16x4), UNet2DConditionModel with cross-attention,
CLIPTextModel, a CLIP-style tokenizer over the world's words, DDPM for training and DDIM
for sampling, with Stable Diffusion 1.x's noise schedule. Assembled as a
StableDiffusionPipeline so every tool that takes SD takes this model unchanged.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from pydantic import BaseModel, ConfigDict, model_validator
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from noiseclr.models.shapes.tokenizer import build_tokenizer

# Stable Diffusion 1.x's schedule: the same betas, so DDIM/inversion code sees the same maths.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def noise_schedule(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> dict:
    """SD 1.x's betas, optionally rescaled to zero terminal SNR (Lin et al., 2023).

    With SD's own betas, x_T still holds sqrt(0.0047) of the image: at 16x16 latents that is
    enough for a small model to read the object's position and the background's lightness
    from the noise instead of from the caption, so position words get ignored. Zero terminal
    SNR removes the leak; it needs v-prediction (epsilon is undefined at SNR 0) and
    "trailing" timesteps so that sampling starts at t = 999, the step trained on pure noise.
    """
    schedule = dict(SD_SCHEDULE, prediction_type=prediction_type)
    if zero_terminal_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return schedule


class ArchitectureConfig(BaseModel):
    """Sizes of the embedded model. Defaults fit the 25 MB budget in float32."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 64 px -> 16x16 latents
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)  # 16x16, 8x8, 4x4 latents
    # Cross-attention per level; None: every level but the last. Attention at the 16x16
    # level matters for placing objects: in a probe (trained at t = 999 on captions that vary
    # only in position) this UNet learned position in 300 steps; a 4-level one (down to 2x2)
    # without attention at 16x16, for all its border-seeing low levels, did not.
    unet_cross_attention: tuple[bool, ...] | None = None
    unet_layers_per_block: int = 1
    attention_heads: int = 8
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_tokens: int = 16

    @model_validator(mode="after")
    def _attention_per_level(self) -> ArchitectureConfig:
        if self.unet_cross_attention is None:
            self.unet_cross_attention = (True,) * (len(self.unet_channels) - 1) + (False,)
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise ValueError(
                f"unet_cross_attention has {len(self.unet_cross_attention)} entries for "
                f"{len(self.unet_channels)} UNet levels (unet_channels)"
            )
        return self


def build_vae(cfg: ArchitectureConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.resolution,
    )


def build_unet(cfg: ArchitectureConfig) -> UNet2DConditionModel:
    latent = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    attn = cfg.unet_cross_attention
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=16,
    )


def build_text_encoder(cfg: ArchitectureConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_pipeline(
    cfg: ArchitectureConfig, words: list[str], schedule: dict | None = None
) -> StableDiffusionPipeline:
    """A freshly initialised embedded pipeline (untrained weights); schedule: noise_schedule()."""
    tokenizer = build_tokenizer(words, cfg.max_tokens)
    return StableDiffusionPipeline(
        vae=build_vae(cfg),
        text_encoder=build_text_encoder(cfg, tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(cfg),
        scheduler=DDIMScheduler(**(schedule or SD_SCHEDULE)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_scheduler(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    """The DDPM scheduler that matches a pipeline's sampling scheduler (same betas)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)
