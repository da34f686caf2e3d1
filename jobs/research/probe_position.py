"""Can a UNet place an object from the caption alone?

Trains a fresh UNet (and text encoder, or the committed one with --kept-text-encoder) at
t = 999 only, where the input is pure noise and the zero-SNR v-target is -x0, on captions
that differ only in position; then prints where the predicted object sits for four captions
(chroma centre of mass of the decoded mean prediction over 16 noises). A UNet that cannot
see position prints the same centre for all four.

    python jobs/research/probe_position.py --arch committed --steps 300
    python jobs/research/probe_position.py --arch deep --steps 300
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from noiseclr.domains import shapes
from noiseclr.models.base import load_model
from noiseclr.models.shapes.architecture import ArchitectureConfig, build_text_encoder, build_unet

ARCHS = {
    "committed": ArchitectureConfig(),
    "deep": ArchitectureConfig(
        unet_channels=(32, 64, 96, 96), unet_cross_attention=(False, True, True, True)
    ),
}
FIXED = {"shape": "circle", "hue": "red", "size": "large", "lightness": "gray", "pattern": "plain"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="committed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kept-text-encoder", action="store_true", help="train the committed encoder on")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_model("shapes").pipe
    vae, tok = pipe.vae, pipe.tokenizer
    arch = ARCHS[args.arch]
    unet = build_unet(arch)
    te = (
        pipe.text_encoder.train().requires_grad_(True)
        if args.kept_text_encoder
        else build_text_encoder(arch, tok)
    )
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=1e-3)
    scenes = shapes.sample_scenes(1024, 0, fixed=FIXED)

    def encode(captions: list[str]) -> torch.Tensor:
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        return te(ids.input_ids)[0]

    with torch.no_grad():
        latents = (
            torch.cat(
                [
                    vae.encode(shapes.render(scenes[i : i + 256]) * 2 - 1).latent_dist.mean
                    for i in range(0, 1024, 256)
                ]
            )
            * vae.config.scaling_factor
        )
    captions = [shapes.caption(s.words) for s in scenes]
    t999 = torch.full((args.batch,), 999)
    start = time.time()
    for step in range(args.steps):
        pick = torch.randint(0, len(scenes), (args.batch,))
        out = unet(
            torch.randn(args.batch, *latents.shape[1:]), t999, encode([captions[i] for i in pick])
        ).sample
        loss = ((out + latents[pick]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    ys, xs = np.mgrid[0:64, 0:64]
    with torch.no_grad():
        for y, x in [("top", "left"), ("bottom", "right"), ("middle", "center"), ("top", "right")]:
            cond = encode([shapes.caption({**FIXED, "y": y, "x": x})]).expand(16, -1, -1)
            x0 = -unet(torch.randn(16, *latents.shape[1:]), torch.full((16,), 999), cond).sample.mean(
                0, keepdim=True
            )
            image = (vae.decode(x0 / vae.config.scaling_factor).sample[0].clamp(-1, 1) + 1) / 2
            chroma = (image.max(0).values - image.min(0).values).numpy()
            w = chroma / chroma.sum()
            print(
                f"{y} {x}: object centre x {(w * xs).sum():.1f} y {(w * ys).sum():.1f} "
                f"(asked x {shapes.XS[x] * 64:.0f} y {shapes.YS[y] * 64:.0f})"
            )


if __name__ == "__main__":
    main()
