"""A Stable Diffusion 1.5 stand-in: SD 1.5's folder, classes and configs, tiny random weights.

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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """SD 1.5's tokenizer/ folder: vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json (no tokenizer.json, as SD ships it); returns it loaded back."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
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
    vae = AutoencoderKL(  # 8x: four levels, as SD's (128, 256, 512, 512)
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
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


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m noiseclr.models.standin OUT_FOLDER")
    print(write(sys.argv[1]))
