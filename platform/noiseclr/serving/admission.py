"""Shedding by expected wait: a replica admits an edit only if it expects to answer it within
`replicas.latency_bound_s`; otherwise the request gets 503 with Retry-After at once.

A request's cost is counted in UNet rows over its steps (`EditEngine.units`); the replica measures the
seconds a unit takes on its own batches (an exponential average, so it follows the machine and
the batch sizes load brings). A request is expected to finish when everything admitted before it
and the request itself are done: (pending units + its units) x seconds per unit. A count of
requests alone cannot bound that: a 100-step upload with 16 directions costs fifty times a
10-step edit with one.

Until the first batch is measured a replica admits one batch's worth of requests
(`unmeasured`); whenever nothing is pending a request is admitted: a replica that refused a
request costing more than the bound on its own would never serve it.
"""

from __future__ import annotations

import math
import threading


class Admission:
    def __init__(self, bound_s: float, unmeasured: int = 8, smoothing: float = 0.3) -> None:
        self.bound_s, self.unmeasured, self.smoothing = bound_s, unmeasured, smoothing
        self.seconds_per_unit: float | None = None
        self.pending, self.requests = 0.0, 0
        self._lock = threading.Lock()

    def expected_s(self, units: float) -> float | None:
        """Seconds until a request of `units` admitted now would be answered (None: not measured yet)."""
        if self.seconds_per_unit is None:
            return None
        return (self.pending + units) * self.seconds_per_unit

    def admit(self, units: float) -> int | None:
        """None when admitted (its units now count as pending; call `done` when it ends), else the
        Retry-After in whole seconds: when enough of the backlog should be gone for it to fit."""
        with self._lock:
            expected = self.expected_s(units)
            if expected is None and self.requests >= self.unmeasured:
                return 1  # the first batch has not been timed yet
            if expected is not None and expected > self.bound_s and self.pending > 0:
                return max(1, math.ceil(expected - self.bound_s))
            self.pending += units
            self.requests += 1
            return None

    def full(self, floor: float) -> bool:
        """Whether the backlog leaves no room for a request of `floor` units (the server's
        default request): any ordinary request would be refused now."""
        with self._lock:
            spu = self.seconds_per_unit
            return spu is not None and (self.pending + floor) * spu > self.bound_s

    def done(self, units: float) -> None:
        with self._lock:
            self.pending = max(0.0, self.pending - units)
            self.requests = max(0, self.requests - 1)

    def observe(self, units: float, seconds: float) -> None:
        """A batch of `units` took `seconds` of model time."""
        if units <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        rate = seconds / units
        with self._lock:
            old = self.seconds_per_unit
            self.seconds_per_unit = rate if old is None else old + self.smoothing * (rate - old)
