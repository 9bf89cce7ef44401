"""The engine's decode-step timing (what shows whether an adapter upload stalls decoding)."""
from __future__ import annotations

import itertools

from service.inference import engine as engine_module
from service.inference.engine import StepTimes


def test_intervals_are_labelled_by_the_work_beside_them(monkeypatch):
    clock = itertools.count(0.0, 0.001)  # 1 ms per call: every interval is exactly one tick
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: next(clock))
    times = StepTimes()
    # iteration: (completed a step, launched another, uploaded an adapter, ran a prefill)
    plan = [(False, True, False, False),   # first launch: nothing to time yet
            (True, True, False, False),    # the first completion starts the clock
            (True, True, True, False),     # upload here ...
            (True, True, False, False),    # ... and its copies delay the next step too
            (True, True, False, False),    # plain
            (True, True, False, True),     # prefill
            (True, False, False, False),   # after a prefill; decoding stops here
            (True, True, False, False)]    # nothing in flight before: not an interval
    for completed, continuing, uploaded, prefilled in plan:
        times.mark(completed=completed, continuing=continuing, uploaded=uploaded, prefilled=prefilled)
    summary = times.summary()
    assert {k: v["n"] for k, v in summary.items()} == {"plain": 1, "upload": 2, "prefill": 2}
    assert summary["plain"]["p50"] == summary["plain"]["max"] == 1.0
    times.reset()
    assert times.summary() == {}
