"""The replica's admission rule (serving/admission.py): shed by expected wait, not by count."""

from __future__ import annotations

import pytest

from noiseclr.serving.admission import Admission


def test_a_request_is_admitted_only_if_the_backlog_and_it_fit_the_bound_at_the_measured_speed():
    a = Admission(bound_s=2.0)
    assert a.admit(10_000) is None  # nothing measured yet: admitted
    a.done(10_000)
    a.observe(units=100, seconds=1.0)  # 0.01 s per unit
    assert a.admit(50) is None and a.admit(100) is None  # 0.5 s, then 1.5 s expected
    assert a.admit(100) == 1  # 2.5 s expected: refused, retry when 0.5 s of it is gone
    assert a.admit(400) == 4  # the cost counts, not how many requests wait: 5.5 s -> 4 s
    assert a.admit(40) is None  # a small one still fits (1.9 s)
    a.done(190)
    assert a.admit(1000) is None  # alone (nothing pending) it is served, though it takes 10 s
    a.done(1000)
    a.observe(units=100, seconds=3.0)  # the machine got slower: the estimate follows
    assert a.seconds_per_unit == pytest.approx(0.016)  # 0.01 + 0.3 x (0.03 - 0.01)
    assert a.admit(100) is None and a.admit(30) == 1  # 2.08 s: refused at the new speed


def test_before_its_first_batch_is_timed_a_replica_admits_one_batch_and_full_says_when_all_wait():
    a = Admission(bound_s=2.0, unmeasured=2)
    assert a.admit(10) is None and a.admit(10) is None and a.admit(10) == 1
    a.done(10)
    assert a.admit(10) is None  # one left: room for another
    a.observe(units=20, seconds=1.0)  # 0.05 s per unit; 20 pending = 1 s
    assert not a.full(10) and a.admit(30) == 1  # 2.5 s: refused, but one of 10 units fits: not full
    assert a.full(30)  # no room for one of 30
    a.done(10)
    a.done(10)
    assert a.admit(50) is None and a.full(1)  # alone, 2.5 s: now any request would wait past 2 s


def test_measurements_that_say_nothing_are_ignored():
    a = Admission(bound_s=1.0)
    for units, seconds in ((0, 1.0), (10, 0.0), (10, float("nan")), (10, float("inf"))):
        a.observe(units, seconds)
    assert a.seconds_per_unit is None


def test_the_proxy_repeats_a_replicas_refusal_for_a_moment_and_then_asks_it_again():
    """serving/proxy.py's BusyGate, on a stand-in ASGI app: a shed 503 (with its header) closes
    the route in the proxy for min(Retry-After, hold_s); Serve's own 503s and other routes do not."""
    import asyncio
    import time

    from noiseclr.serving.proxy import SHED_HEADER, BusyGate

    calls: list[str] = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        headers = [(b"retry-after", b"5")]
        headers += [(SHED_HEADER.encode(), b"replica")] if scope["path"] == "/shed" else []
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = BusyGate(app, hold_s=0.3)

    async def post(path: str, method: str = "POST") -> tuple[int, dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        await gate({"type": "http", "method": method, "path": path}, None, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario() -> None:
        assert (await post("/shed"))[0] == 503 and calls == ["/shed"]  # the replica refused
        status, headers = await post("/shed")  # the proxy answers, the replica is not asked
        # the replica's Retry-After (5 s), counted down, though the proxy holds for 0.3 s only
        assert status == 503 and headers[b"retry-after"] == b"5" and headers[SHED_HEADER.encode()] == b"proxy"
        await post("/shed", method="GET")
        await post("/other")  # Serve's own 503 (no shed header): nothing closes
        await post("/other")
        assert calls == ["/shed", "/shed", "/other", "/other"]
        time.sleep(0.35)  # past hold_s (not Retry-After's 5 s): the replica is asked again
        await post("/shed")
        assert calls[-1] == "/shed" and len(calls) == 5

    asyncio.run(scenario())
