"""`noiseclr compare`: every row of the comparison measured by one protocol, with its ceiling and
floor rows, on the discovery domain and on the full world.

Rows: `perfect` (rendered one-factor edits through the VAE: the ceiling), `words` (the input
embeddings of world words as directions: what finding the world's own concepts would give),
each discovered bank (NoiseCLR, pullback), and `random` (random token directions of the
NoiseCLR bank's norm: the floor).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from noiseclr.bank import DirectionBank
from noiseclr.evaluation.evaluate import KNOWN_WORDS, Harness, Protocol, random_bank, word_bank
from noiseclr.models.base import DiffusionModel
from noiseclr.utils.images import atomic_write_bytes, save_png


def compare(
    model: DiffusionModel,
    banks: dict[str, DirectionBank],
    protocol: Protocol,
    out: Path,
    full_world: bool = True,
    random_like: str | None = None,
    words: tuple[str, ...] = KNOWN_WORDS,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """{domain name: {row: evaluation result}}; writes compare.json and compare.md in `out`."""
    from noiseclr.evaluation.report import comparison_table

    like = banks[random_like] if random_like else next(b for b in banks.values() if b.method == "noiseclr")
    rows = {"words": word_bank(model, words), **banks, "random": random_bank(model, like, seed=0)}
    domains = {"domain": protocol}
    if full_world and protocol.fixed:
        domains["full world"] = protocol.model_copy(update={"fixed": {}})
    results: dict[str, dict[str, dict]] = {}
    for dname, p in domains.items():
        harness = Harness(model, p, progress=False)
        results[dname] = {"perfect": harness.evaluate_perfect()}
        for name, bank in tqdm(rows.items(), desc=f"compare ({dname})", disable=not progress):
            results[dname][name] = harness.evaluate(bank)
            grid = harness.best_edits_grid(bank, results[dname][name])
            save_png(grid, out / "grids" / f"{dname.replace(' ', '-')}-{name}.png")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.json", json.dumps(results, indent=1).encode())
    text = "".join(
        f"### {dname}: {describe(next(iter(r.values()))['protocol'])}\n\n{comparison_table(r)}\n"
        for dname, r in results.items()
    )
    atomic_write_bytes(out / "compare.md", text.encode())
    return results


def describe(protocol: dict) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in protocol["fixed"].items()) or "nothing fixed"
    real = f" + {protocol['n_images']} real (inverted)" if protocol["real"] else ""
    return (
        f"{fixed}; {protocol['n_images']} generated ('{protocol['prompt']}'){real} images; "
        f"edits for t <= {protocol['window'][0]}, each signed edit scaled to "
        f"{protocol['target_effect']} bins of effect; factors scored: {', '.join(protocol['factors'])}"
    )
