"""Directions measured concurrently on a CPU's cores give what measuring them in turn gives."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from noiseclr.errors import ConfigError
from noiseclr.evaluation import blind
from noiseclr.evaluation.evaluate import Harness, Protocol, word_bank
from noiseclr.utils import parallel


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_map_ordered_keeps_order_splits_threads_and_raises(two_threads, monkeypatch):
    def work(i: int) -> tuple[int, int, str]:
        time.sleep(0.02 * (6 - i))  # later items finish first
        return i * i, torch.get_num_threads(), threading.current_thread().name

    out = parallel.map_ordered(work, range(6), "cpu", progress=False)
    assert [o[0] for o in out] == [i * i for i in range(6)]
    assert {o[1] for o in out} == {1}  # each of the 2 streams runs on 1 of the 2 torch threads
    assert {o[2].rsplit("_", 1)[0] for o in out} == {parallel.PREFIX}
    assert torch.get_num_threads() == 2  # the caller's count is untouched
    assert parallel.streams("cuda", 6) == 1 and parallel.streams("cpu", 1) == 1
    seq = parallel.map_ordered(work, range(3), "cpu", progress=False, most=1)
    assert [o[1:] for o in seq] == [(2, threading.current_thread().name)] * 3  # in turn, here
    inner = parallel.map_ordered(lambda i: parallel.streams("cpu", 6), range(2), "cpu", progress=False)
    assert inner == [1, 1]  # a stream's work does not fan out again (no pool waits on itself)
    monkeypatch.setenv("NOISECLR_STREAMS", "1")  # several jobs sharing a machine
    assert parallel.streams("cpu", 6) == 1
    monkeypatch.setenv("NOISECLR_STREAMS", "two")
    with pytest.raises(ConfigError, match="NOISECLR_STREAMS must be a whole number"):
        parallel.streams("cpu", 6)
    monkeypatch.delenv("NOISECLR_STREAMS")

    def fails(i: int) -> int:
        if i == 2:
            raise ValueError("direction 2 is broken")
        return i

    with pytest.raises(ValueError, match="direction 2 is broken"):
        parallel.map_ordered(fails, range(5), "cpu", progress=False)


def _one_thread_then_two(run):
    """run(streams) in turn on one torch thread, then concurrently on two (one each): the
    per-direction work runs at one torch thread in both."""
    torch.set_num_threads(1)
    alone = run(1)
    torch.set_num_threads(2)
    return alone, run(2)


def test_the_oracle_measurement_is_the_same_measured_concurrently(shapes_model, two_threads):
    bank = word_bank(shapes_model, ("striped", "red", "large"))
    protocol = Protocol(
        fixed={"x": "center", "y": "middle"},
        n_images=2,
        steps=4,
        real=False,
        calibration_images=1,
        ladder=(1.0, 4.0, 16.0),
        n_boot=10,
    )
    alone, together = _one_thread_then_two(
        lambda n: Harness(shapes_model, protocol, progress=False, streams=n).evaluate(bank)
    )
    assert together["scales"] == alone["scales"] and together["windows"] == alone["windows"]
    assert json.dumps(together, default=str) == json.dumps(alone, default=str)  # every score, as is


def test_the_oracle_free_measurement_is_the_same_measured_concurrently(shapes_model, two_threads):
    bank = word_bank(shapes_model, ("striped", "red", "large"))
    bank.edit_defaults = {"window": [600, 0]}
    protocol = blind.BlindProtocol(
        n_images=2, calibration_images=1, steps=4, prompt="a shape at middle center"
    )

    def run(n: int) -> list[list[blind.SignedEdit]]:
        return blind.BlindHarness(shapes_model, protocol, progress=False, streams=n).signed_edits(bank)

    alone, together = _one_thread_then_two(run)
    for a, b in zip(alone, together, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x.scale, x.reached) == (y.scale, y.reached)
            # pixels agree to float rounding (sums split over 1 or 2 torch threads)
            np.testing.assert_allclose(x.deltas, y.deltas, rtol=0, atol=1e-4)
            assert x.drift == pytest.approx(y.drift, abs=1e-4)


def test_a_training_step_on_two_streams_matches_one_call(tiny_model, two_threads):
    """The single process splits a micro-step's images over two threads (forward and backward);
    its deltas and its gradient are the one-call ones, to float rounding."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.trainer import DiscoveryTrainer, initial_state

    cfg = DiscoveryConfig.of(k=5, negatives=3, batch=4, n_images=4, steps=2, warmup=0, strength_weight=1.0)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x_t, t, dirs = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([100, 300, 500, 700]), torch.arange(4)
    found = {}
    for n in (1, 2):
        engine = DiscoveryTrainer(cfg, tiny_model, latents, initial_state(cfg, tiny_model)).engine
        engine.streams = n
        deltas = engine.deltas(x_t, t, dirs)
        assert (engine._pending is not None) == (n == 2)  # two streams really ran
        engine.backward((deltas**2).mean() + deltas[:, 0].abs().mean())
        found[n] = deltas.detach(), engine.directions.grad.clone()
    torch.testing.assert_close(found[2][0], found[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(found[2][1], found[1][1], rtol=1e-4, atol=1e-7)
    assert found[1][1][:4].abs().sum() > 0 and found[1][1][4].abs().sum() == 0  # only the drawn ones
