"""The docs against the code they describe: the configuration reference lists every config key
with its real default (a key added without a row, or a default changed without its row, fails)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
        keys = re.findall(r"`([a-z_.]+)`", cells[1])
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
    fields = {}  # section.key -> default, the top-level keys by their own name
    for key, value in DiscoveryConfig().model_dump().items():
        fields.update(
            {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        )
    assert sorted(set(fields) - set(written)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(written) - set(fields)) == [], "docs/configuration.md names keys the config lacks"
    wrong = {
        key: (written[key], real) for key, real in fields.items() if not same_default(written[key], real)
    }
    assert wrong == {}, "documented default != real default"


DOC_PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("*/README.md")])


def slugs(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        base = slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 0
        while slug in found:  # a repeated heading gets -1, -2...
            n += 1
            slug = f"{base}-{n}"
        found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of a page whose file or #anchor does not exist, and repository paths named
    in backquotes (`jobs/bench/x.py`) that are not there."""
    text = page.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists() or (anchor and where.suffix == ".md" and anchor not in slugs(where)):
            bad.append(target)
    for named in re.findall(r"`((?:jobs|docs|platform|cluster|dashboards|tests)/[\w./-]+\.\w+)`", text):
        if not (ROOT / named).exists():
            bad.append(named)
    return bad


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_named_file_of_the_docs_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_moved_file_and_a_lost_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Results (2026-12-01)\n")
    page = tmp_path / "b.md"
    page.write_text("[x](a.md#results-2026-12-01) [y](a.md#gone) [z](c.md) `jobs/benchmark_gpu.py`\n")
    assert broken_links(page) == ["a.md#gone", "c.md", "jobs/benchmark_gpu.py"]
