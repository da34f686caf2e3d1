"""Stable Diffusion 1.5 and SDXL stand-ins: their folders, classes and configs, tiny random weights.

No machine here can download SD 1.5, yet most of what goes wrong for a user's own model comes
from what the embedded shapes model does not have: CLIP's byte-level BPE tokenizer with 77
tokens and its special tokens, a `PNDMScheduler` saved with SD's `scheduler_config.json`, an 8x
VAE with scaling factor 0.18215, a four-level UNet, the text encoder's config quirks
(`eos_token_id: 2`), a safety checker and feature extractor in `model_index.json`. This module
writes a folder with all of that, as `StableDiffusionPipeline.save_pretrained` would for SD 1.5,
but with weights small enough to run every command in seconds on a CPU:

    python -m noiseclr.models.standin out/sd15-standin          # then --model out/sd15-standin

What differs from SD 1.5, and only in size: widths and depths (text encoder 32 wide and 2
layers, UNet channels 32..64 with one layer per block, VAE 16..32), the BPE vocabulary (about
800 tokens trained here on a word list, not CLIP's 49,408, so prompts split into more pieces)
and a 64 px resolution (8 x 8 latents; SD: 512 px, 64 x 64). The weights are random: images are
noise-like and discovered directions carry no meaning; what it proves is that every path runs on
SD's structure and configs.

The SDXL stand-in (`write_sdxl`, `--sdxl`) is SDXL base 1.0's folder the same way: two text
encoders (`text_encoder`, a CLIPTextModel, and `text_encoder_2`, a CLIPTextModelWithProjection
whose projected pooled output feeds the UNet), two tokenizers (the second pads with "!", the first
with its end token, as SDXL's do), a UNet conditioned on both encoders' penultimate layers side
by side and on "text_time" added embeddings (pooled text + six size / crop numbers), an 8x VAE
with scaling factor 0.13025 and `force_upcast`, SDXL's `EulerDiscreteScheduler` config and
`force_zeros_for_empty_prompt` in `model_index.json`:

    python -m noiseclr.models.standin --sdxl out/sdxl-standin

What differs from SDXL base 1.0, again only in size: text encoders 32 and 48 wide (SDXL: 768 and
1280) with 2 layers each (12 and 32), so the UNet's cross-attention is 80 wide (SDXL: 2048) and
its added embedding 48 + 6 x 8 = 96 (SDXL: 1280 + 6 x 256 = 2816); UNet channels 32, 64, 64
(320, 640, 1280) with one layer per block (2) and transformer depths 1, 1, 2 (1, 2, 10); VAE
16..32 (128..512); the same ~800-token BPE vocabulary as above (49,408); 64 px (8 x 8 latents;
SDXL: 1024 px, 128 x 128). The two encoders are of different widths on purpose: code that
mixes them up fails here as it would on SDXL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77  # SD 1.x: CLIP's context length

# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json, key for key.
SD15_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, key for key.
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_PAD = "!"  # SDXL's tokenizer_2 (OpenCLIP's) pads with "!" (id 0 in CLIP's vocabulary and here)

# Words the tokenizer's merges are trained on: the SD jobs' prompts and their neighbours.
WORDS = """\
a an the of and with in on photo picture painting portrait face person man woman child
smiling smile young old glasses hair beard cat cats dog car cars red blue green yellow black white
grey gray brown dark light bright sky road street city forest field house style oil canvas
landscape sunset night day close up high quality detailed realistic cartoon drawing sketch art
artist famous museum front side view wearing hat shirt eyes nose mouth ear background blurry
sharp camera lens studio lighting color colour colorful vintage modern classic sports vehicle
kitten fur tabby sitting looking at
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def bpe_files(words: str = WORDS, vocab_size: int = 1200) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in CLIP's layout: the 256 byte symbols, the same with "</w>", the merged
    symbols in merge order, then <|startoftext|> and <|endoftext|> (the last two ids, as CLIP's
    49406 and 49407). Merges are trained on `words` with CLIP's normaliser and pre-tokeniser."""
    from tokenizers import Tokenizer, models, trainers

    probe = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])  # CLIP's normaliser + pre-tokeniser
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = probe.backend_tokenizer.normalizer
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words.split())] * 3, trainer=trainer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = alphabet + [c + "</w>" for c in alphabet]
    for merge in merges:
        joined = merge.replace(" ", "")
        if joined not in symbols:
            symbols.append(joined)
    symbols += [BOS, EOS]
    return {s: i for i, s in enumerate(symbols)}, merges


def write_tokenizer(folder: Path, pad: str = EOS) -> CLIPTokenizer:
    """SD 1.5's tokenizer/ folder: vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json (no tokenizer.json, as SD ships it); returns it loaded back.
    `pad`: the padding token, CLIP's end token as SD's and SDXL's first tokenizer have it, or
    `SDXL_PAD` for SDXL's tokenizer_2."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_files()
    if pad not in vocab:
        raise ValueError(f"pad token {pad!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_TOKENS,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return CLIPTokenizer.from_pretrained(folder)


def _vae(scaling_factor: float) -> AutoencoderKL:
    """An 8x VAE of four levels, as SD's and SDXL's (128, 256, 512, 512), 16..32 channels wide;
    the two differ only in their latents' scaling factor (force_upcast is diffusers' default)."""
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def build(seed: int = 0) -> StableDiffusionPipeline:
    """The stand-in pipeline in memory (its tokenizer read back from SD's file layout)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer")
    torch.manual_seed(seed)
    width = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # SD 1.5's text_encoder/config.json, narrower and shallower
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=width,
            bos_token_id=0,  # SD 1.5's config says 0 / 2 / 1 whatever the vocabulary: kept
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(  # SD 1.5's unet/config.json, narrower and one layer per block
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=width,
        norm_num_groups=8,
    )
    vae = _vae(scaling_factor=0.18215)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": len(tokenizer), "bos_token_id": 0,
                         "eos_token_id": 2, "pad_token_id": 1},
            vision_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
            projection_dim=width,
        )
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
        requires_safety_checker=True,
    )


def write(folder: str | Path, seed: int = 0, **scheduler: object) -> Path:
    """Write the stand-in to `folder` in SD 1.5's layout; `scheduler` overrides keys of its
    scheduler_config.json (e.g. clip_sample=True, to make a second folder that differs only there)."""
    folder = Path(folder)
    pipe = build(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    for stale in ("tokenizer.json", "chat_template.jinja"):  # SD ships the slow tokenizer's files
        (folder / "tokenizer" / stale).unlink(missing_ok=True)
    write_tokenizer(folder / "tokenizer")
    # SD 1.5's own scheduler_config.json and model_index.json, not what this diffusers writes
    # (it adds keys SD's files lack, and names the feature extractor's transformers-5 class).
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER, **scheduler}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("image_encoder", None)
    index.update(_diffusers_version="0.6.0", feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _text_encoder_config(vocab_size: int, width: int, heads: int, act: str) -> CLIPTextConfig:
    """SDXL's text encoder configs (both keep CLIP's 0 / 2 / 1 special ids), narrower and with 2
    layers; projection_dim is the width, as in both of SDXL's (768 and 1280)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def build_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """The SDXL stand-in pipeline in memory (its tokenizers read back from SDXL's file layout)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_2 = write_tokenizer(Path(tmp) / "tokenizer_2", pad=SDXL_PAD)
    torch.manual_seed(seed)
    width, width_2 = 32, 48  # SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP ViT-bigG)
    time_dim = 8  # SDXL: 256, for each of the six add_time_ids
    # SDXL's text_encoder/config.json (quick_gelu) and text_encoder_2/config.json (gelu)
    text_encoder = CLIPTextModel(_text_encoder_config(len(tokenizer), width, 2, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(len(tokenizer_2), width_2, 3, "gelu"))
    unet = UNet2DConditionModel(  # SDXL base 1.0's unet/config.json, narrower and shallower
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # as SDXL's (5, 10, 20): heads of 16 channels (SDXL: 64)
        use_linear_projection=True,
        cross_attention_dim=width + width_2,  # both encoders' hidden states, side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width_2 + 6 * time_dim,  # pooled text_embeds + time ids
        norm_num_groups=8,
    )
    vae = _vae(scaling_factor=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )


def write_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write the SDXL stand-in to `folder` in SDXL base 1.0's layout."""
    folder = Path(folder)
    pipe = build_sdxl(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in (("tokenizer", EOS), ("tokenizer_2", SDXL_PAD)):
        for stale in ("tokenizer.json", "chat_template.jinja"):  # SDXL ships the slow tokenizer's files
            (folder / name / stale).unlink(missing_ok=True)
        write_tokenizer(folder / name, pad=pad)
    # SDXL base 1.0's own scheduler_config.json and model_index.json: no image_encoder or
    # feature_extractor entries (this diffusers writes them as [null, null]).
    config = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", **SDXL_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    for absent in ("image_encoder", "feature_extractor"):
        index.pop(absent, None)
    index.update(_diffusers_version="0.19.0.dev0", force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m noiseclr.models.standin",
        description="Write a stand-in model folder: SD 1.5's (or SDXL's) layout, tiny random weights.",
    )
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--sdxl", action="store_true", help="SDXL base 1.0's layout instead of SD 1.5's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print((write_sdxl if args.sdxl else write)(args.out, seed=args.seed))
