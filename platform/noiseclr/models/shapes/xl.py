"""The shapes world's SDXL-architecture model, grown from the embedded SD model.

SDXL differs from SD in its text side and its added conditioning: two CLIP encoders whose
penultimate hidden states are concatenated, the second encoder's pooled (projected) output and
six size ids going into the UNet's time embedding (`addition_embed_type: "text_time"`).
`to_sdxl` builds a `StableDiffusionXLPipeline` of those classes from the trained SD pipeline,
so that what SDXL adds starts from nothing and only the part SDXL cannot express exactly is
off:

- text_encoder: the SD encoder with one more layer, an identity at first (its attention and
  MLP outputs zeroed), so SDXL's penultimate states are the SD encoder's last layer's output.
  They lack the encoder's final layer norm, which the SD UNet was trained on: the one thing the
  fine-tune (`recipe`, with `sdxl` set) must learn to bridge.
- text_encoder_2: a small fresh CLIPTextModelWithProjection (`XLArch`).
- unet: the SD UNet's weights; its cross-attention keys and values read the second encoder's
  columns through zeros, and the added-embedding MLP's last layer is zero, so neither the
  second encoder nor the size ids change its output until training moves them.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# The UNet's added-conditioning inputs: SDXL's pooled text embedding and 6 size ids
# (original H, W, crop top, left, target H, W), each id embedded in `time_dim` sinusoids.
SIZE_IDS = 6


class XLArch(BaseModel):
    """What SDXL adds to the shapes model: the second text encoder and the size-id embedding."""

    model_config = ConfigDict(extra="forbid")

    width_2: int = Field(64, ge=8)  # the second encoder's width (SDXL: 1280, and its projection)
    layers_2: int = Field(2, ge=2)  # SDXL reads the penultimate layer: at least 2
    heads_2: int = Field(4, ge=1)
    time_dim: int = Field(16, ge=2)  # sinusoids per size id (SDXL: 256)


def to_sdxl(pipe: StableDiffusionPipeline, arch: XLArch, seed: int = 0) -> StableDiffusionXLPipeline:
    """The SDXL-architecture pipeline grown from a trained SD pipeline (module docstring)."""
    torch.manual_seed(seed)
    first = _deeper_by_identity(pipe.text_encoder)
    c1 = pipe.text_encoder.config
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=c1.vocab_size,
            hidden_size=arch.width_2,
            intermediate_size=2 * arch.width_2,
            num_hidden_layers=arch.layers_2,
            num_attention_heads=arch.heads_2,
            max_position_embeddings=c1.max_position_embeddings,
            projection_dim=arch.width_2,
            hidden_act="gelu",  # SDXL's second encoder (OpenCLIP bigG)
            bos_token_id=c1.bos_token_id,
            eos_token_id=c1.eos_token_id,
            pad_token_id=c1.pad_token_id,
        )
    )
    unet = _unet_with_added_conditioning(pipe.unet, arch)
    xl = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        # The SD model learnt its unconditional image from the empty prompt's states; zeros
        # (SDXL base's setting) would be a second thing to relearn.
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return xl


def _deeper_by_identity(encoder: CLIPTextModel) -> CLIPTextModel:
    """`encoder` with one more layer that passes its input through (outputs zeroed)."""
    config = CLIPTextConfig(
        **{**encoder.config.to_dict(), "num_hidden_layers": encoder.config.num_hidden_layers + 1}
    )
    deeper = CLIPTextModel(config)
    missing, unexpected = deeper.load_state_dict(encoder.state_dict(), strict=False)
    new = f"encoder.layers.{encoder.config.num_hidden_layers}."
    if unexpected or any(new not in k for k in missing):
        raise ValueError(f"text encoder layout not as expected: missing {missing}, unexpected {unexpected}")
    # transformers 4 nests the layers under text_model, 5 does not
    layer = next(m for n, m in deeper.named_modules() if n.endswith("encoder.layers"))[-1]
    with torch.no_grad():
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    return deeper


def _unet_with_added_conditioning(unet: UNet2DConditionModel, arch: XLArch) -> UNet2DConditionModel:
    """The SD UNet taking SDXL's conditioning, computing what it computed before."""
    width_1 = unet.config.cross_attention_dim
    config = {
        **{k: v for k, v in unet.config.items() if not k.startswith("_")},
        "cross_attention_dim": width_1 + arch.width_2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": arch.time_dim,
        "projection_class_embeddings_input_dim": arch.width_2 + SIZE_IDS * arch.time_dim,
    }
    grown = UNet2DConditionModel(**config)
    state = grown.state_dict()
    for name, value in unet.state_dict().items():
        if state[name].shape == value.shape:
            state[name] = value
        elif name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):  # (out, width_1 + width_2)
            state[name] = torch.cat([value, value.new_zeros(value.shape[0], arch.width_2)], dim=1)
        else:
            raise ValueError(f"{name}: {tuple(value.shape)} does not fit {tuple(state[name].shape)}")
    state["add_embedding.linear_2.weight"].zero_()
    state["add_embedding.linear_2.bias"].zero_()
    grown.load_state_dict(state)
    return grown


class XLText:
    """SDXL's text side as the recipe trains it: captions -> (context states, added conditioning),
    through diffusers' own `encode_prompt` and size ids, the encoders in the graph."""

    def __init__(self, pipe: StableDiffusionXLPipeline, device: torch.device):
        self.pipe, self.device = pipe, device
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.time_ids = pipe._get_add_time_ids(
            (side, side), (0, 0), (side, side), dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(device)  # fmt: skip

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        states, _, pooled, _ = self.pipe.encode_prompt(
            captions, device=self.device, do_classifier_free_guidance=False
        )
        return states, {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(captions), -1)}
