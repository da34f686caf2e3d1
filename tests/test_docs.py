"""The docs against the code they describe: the configuration reference lists every config key
with its real default (a key added without a row, or a default changed without its row, fails)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from noiseclr.discovery.config import DiscoveryConfig

ROOT = Path(__file__).resolve().parents[1]


def documented_keys() -> dict[str, object]:
    """key -> default as docs/configuration.md's table writes it (a row may hold several keys,
    their defaults in the same order)."""
    found: dict[str, object] = {}
    for line in (ROOT / "docs/configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_]+)`", cells[1])
        values = [cells[2]] if len(keys) == 1 else cells[2].split(", ")
        assert len(values) == len(keys), f"row {keys}: {len(values)} defaults for {len(keys)} keys"
        for key, value in zip(keys, values, strict=True):
            assert key not in found, f"{key} has two rows"
            found[key] = yaml.safe_load(value.replace("`", ""))
    return found


def same_default(written: object, real: object) -> bool:
    if isinstance(real, float | int) and not isinstance(real, bool):
        return isinstance(written, str | int | float) and float(written) == float(real)
    if isinstance(real, list) and isinstance(written, list):
        return len(real) == len(written) and all(map(same_default, written, real))
    return written == real


def test_the_configuration_page_lists_every_key_with_its_default():
    written = documented_keys()
    fields = DiscoveryConfig.model_fields
    assert sorted(set(fields) - set(written)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(written) - set(fields)) == [], "docs/configuration.md names keys the config lacks"
    wrong = {
        key: (written[key], field.get_default(call_default_factory=True))
        for key, field in fields.items()
        if not same_default(written[key], field.get_default(call_default_factory=True))
    }
    assert wrong == {}, "documented default != real default"
