"""What each tool calls a direction: the file stem, the prompt syntax, how the files load.

Shared by `noiseclr.export` (which writes the files) and `noiseclr.card` (which describes them),
so neither has to import the other for it.
"""

from __future__ import annotations

FORMATS = ("diffusers", "a1111", "comfyui", "kohya")


def trigger(token: str) -> str:
    """The word a user types in A1111 and kohya (the file stem): the token without brackets.
    Safe as a file name: DirectionBank only admits tokens <[A-Za-z0-9_.-]+>."""
    return token.strip("<>")


def prompt_syntax(fmt: str, token: str) -> str:
    """How the direction is written in the tool's prompt."""
    return {"diffusers": token, "comfyui": f"embedding:{trigger(token)}"}.get(fmt, trigger(token))


# How each tool loads the files; {token} and {stem} are an example direction's (`load_hint`).
LOAD_HINTS = {
    "diffusers": "pipe.load_textual_inversion(FOLDER, weight_name=FILE) per file, or "
    "noiseclr.export.load_exported(pipe, FOLDER); prompt with the token, e.g. '{token}'",
    "a1111": "copy the files (and their .json) into stable-diffusion-webui/embeddings/; prompt with "
    "the file stem, e.g. '{stem}'",
    "comfyui": "copy the files into ComfyUI/models/embeddings/; prompt with 'embedding:STEM', e.g. "
    "'embedding:{stem}'",
    "kohya": "pass the files to sd-scripts' --textual_inversion_embeddings (token: the file stem) or "
    "one to train_textual_inversion.py --weights",
}


# diffusers loads an SDXL file's two halves one call each (the other tools read clip_l/clip_g).
SDXL_DIFFUSERS_HINT = (
    "noiseclr.export.load_exported(pipe, FOLDER), or per file: state = safetensors.torch.load_file(FILE); "
    "pipe.load_textual_inversion(state['clip_l'], token='{token}', text_encoder=pipe.text_encoder, "
    "tokenizer=pipe.tokenizer) and state['clip_g'] with text_encoder_2 and tokenizer_2; prompt with the "
    "token, e.g. '{token}'"
)


def load_hint(fmt: str, token: str, sdxl: bool = False) -> str:
    """How `fmt` loads the exported files, with `token` (a direction of the bank) as the example;
    `sdxl`: the files hold SDXL pairs (clip_l, clip_g)."""
    hint = SDXL_DIFFUSERS_HINT if sdxl and fmt == "diffusers" else LOAD_HINTS[fmt]
    return hint.format(token=token, stem=trigger(token))
