"""Where a compiled step's time goes, op by op: run it under jax.profiler and add up the
XLA:CPU thunks of the trace by name (fusions, dots, the grouped GEMM's while loop), per step.
For finding what to make faster (issue 25's fine-grained experts); times on the shared
machine are provisional, the shares between ops less so."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import tempfile
from collections.abc import Callable

import jax

# the executor's own spans and the Python calls around the steps, not ops of the program
_NOT_OPS = ("ThunkExecutor", "$")


def op_times(run: Callable, steps: int = 5) -> list[dict]:
    """`run()` (one step, already compiled and warmed up) `steps` times under the profiler ->
    [{"name", "ms_per_step", "calls_per_step"}], the most time first. Nested spans (a while
    loop and the ops of its body) each count on their own, so the times do not add up to
    the step."""
    with tempfile.TemporaryDirectory(prefix="moejax-profile-") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        path = max(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
        with gzip.open(path) as trace:
            events = json.load(trace)["traceEvents"]
    return summarise_trace(events, steps)


def summarise_trace(events: list[dict], steps: int) -> list[dict]:
    """Complete ("X") trace events -> per-name time and calls per step, the most time first."""
    total, calls = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and not name.startswith(_NOT_OPS):
            total[name] += event["dur"]  # microseconds
            calls[name] += 1
    return [{"name": name, "ms_per_step": micros / steps / 1e3,
             "calls_per_step": calls[name] / steps} for name, micros in total.most_common()]
