"""The calibration search both measurements share (evaluation/harness.py), against the rule it
implements, on every monotone ladder of six steps."""

from __future__ import annotations

import itertools

from noiseclr.evaluation.harness import search_ladder


def ladders(n: int):
    """Every verdict sequence an edit that grows with its scale can give: weak, then reached,
    then broken (each part possibly empty)."""
    for weak, reached in itertools.product(range(n + 1), repeat=2):
        if weak + reached <= n:
            yield ["weak"] * weak + ["reached"] * reached + ["broken"] * (n - weak - reached)


def allowed(verdicts: list[str]) -> set[int]:
    """The first step that reaches the target; with none, the boundary the probes met: the last
    weak step or the first breaking one."""
    if "reached" in verdicts:
        return {verdicts.index("reached")}
    weak = verdicts.count("weak")
    return {i for i in (weak - 1, weak) if 0 <= i < len(verdicts)}


def test_the_search_finds_the_first_reached_step_for_both_signs_at_once_in_few_probes():
    for minus, plus in itertools.product(list(ladders(6)), repeat=2):
        truth = {-1: minus, 1: plus}
        calls: list[dict[int, int]] = []

        def judge(probes: dict[int, int], truth=truth, calls=calls) -> dict[int, str]:
            calls.append(probes)
            return {s: truth[s][i] for s, i in probes.items()}

        found, seen = search_ladder(6, judge)
        assert all(found[s] in allowed(truth[s]) for s in (-1, 1)), (minus, plus, found)
        assert len(calls) <= 3  # log2(6) rounds, both signs in each
        assert all(verdict == truth[s][i] for (s, i), verdict in seen.items())
