"""A CLIP-style BPE tokenizer built offline from a word list.

Stable Diffusion's tokenizer is CLIP's 49k-token BPE, which needs a download. The embedded
model instead gets a CLIPTokenizer whose vocabulary is its world's words: every word is one
token (a BPE trained on the word list), and single letters stay in the vocabulary so an
unknown word still tokenizes (the shapes loader rejects such prompts before they get here).
"""

from __future__ import annotations

import json
import string

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    """CLIPTokenizer with one token per word of `words`, padded to `max_length`."""
    bad = [w for w in words if not w or not set(w) <= set(string.ascii_lowercase)]
    if bad:
        raise ValueError(f"tokenizer words must be lowercase ascii letters; got {bad}")
    # Train a BPE on the word list until every word is one token: merges learned this way
    # are consistent by construction (hand-written per-word merge chains collide, e.g. the
    # "t r" of "triangle" splits the "s t" of "striped").
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=list(string.ascii_lowercase),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(sorted(set(words)), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    for ch in string.ascii_lowercase:  # every letter also ends a word: unknown words still encode
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
