"""benchmarks/bench_extract.py: the split of a run's time by teacher, and the compiled-once variant's guard."""

from __future__ import annotations

import time

import pytest
from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_extract")


class _Teacher:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def encode(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        if x is None:
            raise ValueError("bad batch")
        return [v * 2 for v in x]


def test_encode_timer_counts_the_time_inside_encode_and_passes_results_and_errors_through(bench):
    teacher = _Teacher(0.02)
    timers: dict = {}
    timer = bench.timer_of(teacher, timers)
    assert bench.timer_of(teacher, timers) is timer  # wrapped once, however often it is asked for
    assert teacher.encode([1, 2]) == [2, 4]
    with pytest.raises(ValueError, match="bad batch"):
        teacher.encode(None)
    assert teacher.calls == 2
    assert 0.035 <= timer.seconds < 1.0  # both calls counted, the failed one too
    other = bench.timer_of(_Teacher(0.0), timers)
    assert other is not timer and other.seconds == 0.0


def test_compiled_once_variant_is_refused_beside_a_cold_compiled_one(bench):
    assert bench.COMPILED_ONCE <= set(bench.VARIANTS)
    with pytest.raises(SystemExit, match="cannot run beside fp32-text-bf16-compiled"):
        bench.check_variants(["fp32-text-bf16", "fp32-text-bf16-compiled", "fp32-text-bf16-compiled-warm"])
    bench.check_variants(["issue-fp32", "fp32-text-bf16", "fp32-text-bf16-compiled-warm"])  # no cold compile: fine
    bench.check_variants(["fp32-text-bf16", "fp32-text-bf16-compiled"])  # no warm one: fine
