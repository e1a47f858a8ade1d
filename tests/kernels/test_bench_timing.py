"""The benchmarks' graph timing on the CPU: how many calls a timed graph holds and what is divided."""

from __future__ import annotations

from polar_sparsity.kernels.bench import _harness

LAUNCH_US = 12.0  # a replay's host launch latency, counted once per graph
CALL_US = 10.0


def test_a_timed_graph_repeats_the_rotations_to_at_least_min_calls(monkeypatch):
    graphs = []

    def fake_replay(fns, reps):
        graphs.append(list(fns))
        return LAUNCH_US + CALL_US * len(fns)

    monkeypatch.setattr(_harness, "graph_replay_us", fake_replay)
    for rotations in (1, 3, 16, 20):
        fns = [lambda i=i: i for i in range(rotations)]
        us = _harness.time_graph(fns)
        calls = graphs[-1]
        assert len(calls) >= _harness.MIN_CALLS and len(calls) % rotations == 0
        assert [calls.count(f) for f in fns] == [len(calls) // rotations] * rotations  # each rotation alike
        assert CALL_US < us <= CALL_US + LAUNCH_US / _harness.MIN_CALLS  # the launch, spread over the calls
