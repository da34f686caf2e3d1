"""Why do directions stay dead? Per direction of a bank, on the images it was trained on:

    python jobs/research/diagnose_directions.py                        # the shipped bank, 8 world images
    python jobs/research/diagnose_directions.py --bank out/discovery/bank --n 8
    python jobs/research/diagnose_directions.py --reference pairs [--model out/base/stage9]   # e(b) - e(a)

- norm: its embedding norm, against the text encoder's vocabulary (median, 99th pct, max);
- strength: ||eps(x_t, d) - eps(x_t, empty)|| / ||eps(x_t, empty)|| at t = 100..500 (inside the
  edit window), the size of the noise difference the loss only ever sees through its cosine;
- consistency: the mean cosine of that difference between two images (what the loss rewards);
- map consistency: the same for its change map (per latent pixel, the L2 norm over channels,
  centred): where the prediction moves, whatever it writes there (`delta_energy`);
- null cosine: the cosine of its difference with the one a zero embedding makes (a token with no
  content): near 1 means the direction has collapsed onto "any token";
- nearest: the largest cosine with another direction's difference (collapse onto each other);
- anchor / negative: how often it was drawn in a step of the job's 900 steps (the job's seed);
- dead: the bank's own oracle-free measurement.
Writes OUT/diagnosis.json and prints the table (markdown).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from noiseclr.bank import DirectionBank
    from noiseclr.conditioning import direction_deltas
    from noiseclr.data.images import encode_latents
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.loss import delta_features
    from noiseclr.discovery.step import draw
    from noiseclr.domains.shapes import render, sample_scenes
    from noiseclr.models.base import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="platform/noiseclr/pretrained/banks/shapes")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reference", choices=["words", "pairs"], help="the known words or word pairs instead")
    ap.add_argument("--model", help="base model (default: the bank's own)")
    ap.add_argument("--out", default="out/diagnosis")
    args = ap.parse_args()
    bank = DirectionBank.load(args.bank)
    cfg = DiscoveryConfig.from_saved(bank.config)
    model = load_model(args.model or bank.base_model.get("source", "shapes"), device="cpu")
    if args.reference:  # on the shipped job's images and draws (cfg), the reference's vectors
        from noiseclr.evaluation.evaluate import pair_bank, word_bank

        bank = (pair_bank if args.reference == "pairs" else word_bank)(model)
        cfg = cfg.replace(k=len(bank), negatives=min(cfg.method.negatives, len(bank) - 1))
    pipe = model.pipe
    vocab = pipe.text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1)
    scenes = sample_scenes(args.n, seed=cfg.optim.seed, fixed=cfg.data.world_fixed)
    pixels = render(scenes, model.resolution) * 2 - 1  # (n, 3, H, W) in [-1, 1]
    latents = encode_latents(pipe.vae, pixels)
    k = len(bank)
    table = torch.cat([bank.directions.float(), torch.zeros(1, bank.directions.shape[1])])  # + null
    strength, consistency, map_consistency, deltas_all = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t_val in (100, 300, 500):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.full((len(latents),), t_val)
            x_t = pipe.scheduler.add_noise(latents, noise, t)
            d = direction_deltas(pipe.unet, pipe.text_encoder, pipe.tokenizer, table, x_t, t)  # (B, K+1, ...)
            empty = pipe.unet(x_t, t, _empty(pipe, len(latents))).sample
            strength.append(d.flatten(2).norm(dim=2) / empty.flatten(1).norm(dim=1, keepdim=True))
            z = torch.nn.functional.normalize(d.flatten(2), dim=2)  # (B, K+1, F)
            off = ~torch.eye(len(latents), dtype=torch.bool)
            consistency.append(_across_images(z, off))
            maps = delta_features(d, energy=1.0)  # unit centred change maps
            map_consistency.append(_across_images(maps, off))
            deltas_all.append(z)
    strength_k = torch.stack(strength).mean(dim=(0, 1))  # (K+1,)
    consistency_k = torch.stack(consistency).mean(0)
    map_consistency_k = torch.stack(map_consistency).mean(0)
    z = torch.cat(deltas_all)  # (3B, K+1, F)
    sims = torch.einsum("akf,ajf->kj", z, z) / z.shape[0]  # mean over images of per-image cosine
    anchors, negatives = torch.zeros(k), torch.zeros(k)
    g = torch.Generator().manual_seed(cfg.optim.seed)
    for _ in range(cfg.optim.steps * cfg.optim.grad_accum):
        _, dirs = draw(cfg, g)
        anchors[dirs[0]] += 1
        negatives[dirs[1:]] += 1
    scores = {d.index: d.dump() for d in bank.scores.directions} if bank.scores else {}
    rows = []
    for i in range(k):
        others = [sims[i, j].item() for j in range(k) if j != i]
        rows.append(
            {
                "index": i,
                "dead": bool(scores.get(i, {}).get("dead")),
                "score": scores.get(i, {}).get("score"),
                "norm": round(bank.directions[i].norm().item(), 3),
                "strength": round(strength_k[i].item(), 4),
                "consistency": round(consistency_k[i].item(), 3),
                "map_consistency": round(map_consistency_k[i].item(), 3),
                "null_cos": round(sims[i, k].item(), 3),
                "nearest": round(max(others), 3),
                "anchor": int(anchors[i]),
                "negative": int(negatives[i]),
            }
        )
    vocab_stats = {
        "median": round(vocab.median().item(), 3),
        "p99": round(vocab.quantile(0.99).item(), 3),
        "max": round(vocab.max().item(), 3),
    }
    null = {"strength": round(strength_k[k].item(), 4), "consistency": round(consistency_k[k].item(), 3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(
        json.dumps({"vocab_norm": vocab_stats, "null": null, "rows": rows}, indent=1)
    )
    cols = [
        "index",
        "dead",
        "score",
        "norm",
        "strength",
        "consistency",
        "map_consistency",
        "null_cos",
        "nearest",
        "anchor",
        "negative",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in sorted(rows, key=lambda r: (r["dead"], -(r["score"] or 0))):
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"vocabulary norms {vocab_stats}; the null (zero) embedding: {null}")
    for flag in (False, True):
        group = [r for r in rows if r["dead"] == flag]
        if group:
            mean = {
                c: round(sum(r[c] for r in group) / len(group), 3)
                for c in ("norm", "strength", "consistency", "map_consistency", "null_cos", "nearest")
            }
            print(("dead" if flag else "live"), len(group), mean)


def _across_images(z: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """(B, K, F) unit vectors -> (K,) mean cosine between two different images."""
    cross = torch.einsum("akf,bkf->kab", z, z)
    return torch.stack([cross[i][off].mean() for i in range(z.shape[1])])


def _empty(pipe, n: int) -> torch.Tensor:
    ids = pipe.tokenizer(
        [""] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids)[0]


if __name__ == "__main__":
    main()
