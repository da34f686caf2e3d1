"""Is there a space where a shape edit and a size edit can be told apart without labels?

    python jobs/research/feature_spaces.py [--model shapes] [--n 24] [--t 0,150,300]

NoiseCLR groups edits by how alike their effects are across images. For a discovered direction to
be a pure shape (or size) edit, the same ground-truth edit must look alike on different images
(consistency) and unlike another factor's edit of the same image (cross). This renders N domain
scenes and, per scene, its one-factor edits (the world's own renderer, `shapes.with_word`), and
measures both, as mean cosines, in the spaces an unsupervised objective could compare:

- latent: the VAE latent difference (what the signed noise difference follows);
- latent map: its change map (per latent pixel the L2 norm over channels, centred), as
  `delta_energy` compares;
- mid / down1 / down2 / up0 @ t: UNet block outputs (h-space and its neighbours) for the
  re-noised latents at t (shared noise, empty prompt), signed and as change maps.

Prints one markdown table: cell = consistency / cross and the edit it is nearest, where cross is
the largest mean cosine with an edit of another factor on the same images. An edit is separable
in a space when its consistency is high and its cross low.
Ground truth is used only to analyse; nothing here trains.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def change_map(v: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) difference -> (N, H*W) centred change map, exactly as `delta_energy` builds it."""
    from noiseclr.discovery.loss import delta_features

    return delta_features(v[:, None], energy=1.0)[:, 0]


def main() -> None:
    from noiseclr.data.images import encode_latents
    from noiseclr.domains import shapes
    from noiseclr.domains.shapes import render, sample_scenes, with_word
    from noiseclr.models.base import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--t", default="0,150,300", help="timesteps of the UNet feature spaces")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    pipe = load_model(a.model, device="cpu").pipe
    unet = pipe.unet
    hues, sizes, light = list(shapes.HUES), list(shapes.SIZES), ["light", "gray", "dark"]

    def nxt(words: list[str], w: str, d: int, wrap: bool = False) -> str | None:
        i = words.index(w) + d
        return words[i % len(words)] if wrap else (words[i] if 0 <= i < len(words) else None)

    edits = {  # name -> (factor, scene -> target word or None)
        "->circle": ("shape", lambda s: "circle"),
        "->square": ("shape", lambda s: "square"),
        "->triangle": ("shape", lambda s: "triangle"),
        "size+": ("size", lambda s: nxt(sizes, s.size_word, 1)),
        "size-": ("size", lambda s: nxt(sizes, s.size_word, -1)),
        "hue+": ("hue", lambda s: nxt(hues, s.hue_word, 1, wrap=True)),
        "darker": ("lightness", lambda s: nxt(light, s.lightness_word, 1)),
        "lighter": ("lightness", lambda s: nxt(light, s.lightness_word, -1)),
        "striped": ("pattern", lambda s: "striped"),
    }
    scenes = sample_scenes(a.n, seed=a.seed, fixed={"x": "center", "y": "middle"})
    pairs: dict[str, tuple[list[int], list]] = {}
    for name, (factor, target) in edits.items():
        kept = [(i, target(s)) for i, s in enumerate(scenes)]
        kept = [(i, w) for i, w in kept if w is not None and w != scenes[i].words[factor]]
        pairs[name] = ([i for i, _ in kept], [with_word(scenes[i], factor, w) for i, w in kept])

    grabbed: dict[str, torch.Tensor] = {}
    blocks = {
        "mid": unet.mid_block,
        "down1": unet.down_blocks[1],
        "down2": unet.down_blocks[2],
        "up0": unet.up_blocks[0],
    }
    for key, block in blocks.items():
        block.register_forward_hook(
            lambda m, i, o, key=key: grabbed.__setitem__(key, o[0] if isinstance(o, tuple) else o)
        )
    ids = pipe.tokenizer(
        [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0]
        base = encode_latents(pipe.vae, render(scenes) * 2 - 1)
        noise = torch.randn(base.shape)
        edited = {e: encode_latents(pipe.vae, render(ss) * 2 - 1) for e, (_, ss) in pairs.items()}

        def features(z: torch.Tensor, t: int, eps: torch.Tensor) -> dict[str, torch.Tensor]:
            ts = torch.full((len(z),), t)
            unet(pipe.scheduler.add_noise(z, eps, ts) if t > 0 else z, ts, empty.expand(len(z), -1, -1))
            return {k: v.clone() for k, v in grabbed.items()}

        spaces: dict[str, dict[str, torch.Tensor]] = {"latent": {}, "latent map": {}}
        for e, (idx, _) in pairs.items():
            spaces["latent"][e] = (edited[e] - base[idx]).flatten(1)
            spaces["latent map"][e] = change_map(edited[e] - base[idx])
        for t in (int(x) for x in a.t.split(",")):
            fb = features(base, t, noise)
            for e, (idx, _) in pairs.items():
                fe = features(edited[e], t, noise[idx])
                for k in blocks:
                    spaces.setdefault(f"{k} @ {t}", {})[e] = (fe[k] - fb[k][idx]).flatten(1)
                    spaces.setdefault(f"{k} map @ {t}", {})[e] = change_map(fe[k] - fb[k][idx])

    def cell(space: dict[str, torch.Tensor], e: str) -> str:
        u = F.normalize(space[e].float(), dim=-1)
        n = len(u)
        consistency = ((u @ u.T).sum() - n) / (n * (n - 1))
        cross, near = -1.0, ""
        for e2, (idx2, _) in pairs.items():
            if edits[e2][0] == edits[e][0]:
                continue
            idx = pairs[e][0]
            common = [i for i in idx if i in idx2]
            if len(common) >= 2:
                v2 = F.normalize(space[e2][[idx2.index(i) for i in common]].float(), dim=-1)
                c = (u[[idx.index(i) for i in common]] * v2).sum(-1).mean().item()
                cross, near = max((cross, near), (c, e2))
        return f"{consistency.item():.2f} / {cross:.2f} {near}"

    print("| space | " + " | ".join(edits) + " |")
    print("|---|" + "---|" * len(edits))
    for name, space in spaces.items():
        print(f"| {name} | " + " | ".join(cell(space, e) for e in edits) + " |")


if __name__ == "__main__":
    main()
