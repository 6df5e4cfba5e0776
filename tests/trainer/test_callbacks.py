"""Throughput: the rates the trainer logs, exports and writes into summary.json."""

from __future__ import annotations

import pytest


def test_steady_rate_leaves_out_the_first_interval_and_checkpoint_writes():
    from kubesloth.trainer.callbacks import Throughput

    now = [100.0]
    throughput = Throughput(start_step=0, start_tokens=0, clock=lambda: now[0])
    assert throughput.steady_tokens_per_second() is None
    now[0] += 30.0  # the first step compiles: 1000 tokens in 30 s
    throughput.update(1, 1000, 10)
    assert throughput.steady_tokens_per_second() is None
    for step in (2, 3):  # then 1000 tokens a second
        now[0] += 1.0
        throughput.update(step, step * 1000, 10)
    now[0] += 20.0  # a checkpoint write
    throughput.restart_interval()
    now[0] += 1.0
    throughput.update(4, 4000, 10)
    assert throughput.steady_tokens_per_second() == pytest.approx(1000.0)
    assert throughput.average_tokens_per_second() == pytest.approx(4000 / 53)
