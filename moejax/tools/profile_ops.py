"""Where a compiled step's time goes, op by op: run it under jax.profiler and add up the
XLA:CPU thunks of the trace by name (fusions, dots, the grouped GEMM's while loop), per step.
For finding what to make faster (issue 25's fine-grained experts); times on the shared
machine are provisional, the shares between ops less so.

- `op_times`: the thunks of a step by name, per step (nested spans each counted on their own).
- `trace_events`: the raw trace of a few steps, for the functions below.
- `parse_hlo`: the compiled module's text (`compiled.as_text()`) -> its instructions (opcode,
  metadata op_name and stack frame, operands, called computations) and its stack-frame table
  (the Python call stack each instruction was traced from: file, function, line).
- `op_intervals`, `attribute_busy_time`: the wall time during which the step's ops ran, split
  among them without double counting: ops that overlap in time (XLA:CPU runs independent
  thunks on several threads) share it, and a while loop only gets the time none of its body's
  ops account for.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable

import jax

# the executor's own spans and the Python calls around the steps, not ops of the program
_NOT_OPS = ("ThunkExecutor", "$")
# opcodes whose thunk runs other thunks (a loop or a branch), spanning its body's ops
CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})


def trace_events(run: Callable, steps: int = 5) -> list[dict]:
    """`run()` (one step, already compiled and warmed up) `steps` times under the profiler ->
    the trace's events (chrome trace format: "X" events carry "ts" and "dur" in microseconds,
    and the XLA:CPU thunks args {"hlo_module", "hlo_op"})."""
    with tempfile.TemporaryDirectory(prefix="moejax-profile-") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        path = max(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
        with gzip.open(path) as trace:
            return json.load(trace)["traceEvents"]


def op_times(run: Callable, steps: int = 5) -> list[dict]:
    """`run()` (one step, already compiled and warmed up) `steps` times under the profiler ->
    [{"name", "ms_per_step", "calls_per_step"}], the most time first. Nested spans (a while
    loop and the ops of its body) each count on their own, so the times do not add up to
    the step."""
    return summarise_trace(trace_events(run, steps), steps)


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


# ---------------------------------------------------------------------------------------------
# The compiled module's text: instructions, their metadata and the stack-frame table


@dataclasses.dataclass(frozen=True)
class Frame:
    """One Python frame an instruction was traced from."""

    file: str
    function: str  # qualified: "_Layers.attention", "moe_ffn.<locals>.routed"
    line: int


@dataclasses.dataclass
class HloOp:
    name: str  # the instruction's name, as the trace's hlo_op calls it
    opcode: str  # fusion, dot, while, copy, ...
    computation: str  # the computation it is in (the entry, a loop body, a fused computation)
    op_name: str  # metadata op_name: jax transforms and named scopes ("" without metadata)
    frame: int  # metadata stack_frame_id (0: none)
    operands: tuple[str, ...]
    calls: tuple[str, ...]  # computations it runs: fused computation, loop body and condition


@dataclasses.dataclass
class HloModuleText:
    name: str  # HloModule name: the trace's hlo_module
    ops: dict[str, HloOp]
    computations: dict[str, list[str]]  # computation -> its instructions' names, in order
    frames: dict[int, tuple[Frame, ...]]  # stack_frame_id -> its call stack, innermost first

    def stack(self, op: HloOp) -> tuple[Frame, ...]:
        return self.frames.get(op.frame, ())

    def users(self) -> dict[str, list[str]]:
        """Instruction name -> the names of the instructions that read it."""
        users = collections.defaultdict(list)
        for op in self.ops.values():
            for operand in op.operands:
                users[operand].append(op.name)
        return users


_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*.*?\s"
                          r"(?P<opcode>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations|"
                     r"true_computation|false_computation)=\{?([^,}\s]+(?:,\s*%[^,}\s]+)*)")
_FIELDS = re.compile(r"(\w+)=(\d+)")


def parse_hlo(text: str) -> HloModuleText:
    """The text of a compiled module (`compiled.as_text()`) -> HloModuleText."""
    lines = text.splitlines()
    header = re.match(r"HloModule\s+([^\s,]+)", lines[0]) if lines else None
    tables = {name: [] for name in _SECTIONS}
    ops, computations = {}, {}
    section, computation = None, None
    for line in lines[1:]:
        if line in _SECTIONS:
            section = line
        elif not line.strip():
            section = None
        elif section:
            tables[section].append(line)
        elif (match := _COMPUTATION.match(line)) and not line.startswith(" "):
            computation = match["name"]
            computations[computation] = []
        elif line.startswith("}"):
            computation = None
        elif computation and (op := _instruction(line, computation)):
            ops[op.name] = op
            computations[computation].append(op.name)
    return HloModuleText(header[1] if header else "", ops, computations, _stack_frames(tables))


def _instruction(line: str, computation: str) -> HloOp | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = match["rest"]
    operands, attributes = _split_operands(rest)
    metadata = re.search(r"metadata=\{([^}]*)\}", attributes)
    op_name = frame = None
    if metadata:
        op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', metadata[1])
        frame = re.search(r"stack_frame_id=(\d+)", metadata[1])
    calls = tuple(name.strip().lstrip("%") for group in _CALLED.findall(attributes)
                  for name in group.split(","))
    return HloOp(match["name"], match["opcode"], computation, op_name[1] if op_name else "",
                 int(frame[1]) if frame else 0,
                 tuple(re.findall(r"%([^\s,()]+)", operands)), calls)


def _split_operands(rest: str) -> tuple[str, str]:
    """'a, b), attr=...' (after the opcode's open parenthesis) -> ('a, b', 'attr=...')."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def _stack_frames(tables: dict[str, list[str]]) -> dict[int, tuple[Frame, ...]]:
    """The module's stack-frame table -> {frame id: call stack, innermost first}.

    Each StackFrames row is `id {file_location_id=L parent_frame_id=P}`. The text this jax
    prints writes P one above the parent's id (a root frame shows its own id: P - 1 = 0, no
    parent); a row whose P equals its own id can only mean that, so such a table is read
    with P - 1, any other as printed."""
    def numbered(rows):
        return {int(row.split(None, 1)[0]): row.split(None, 1)[1] for row in rows}

    files = {i: v.strip('"') for i, v in numbered(tables["FileNames"]).items()}
    functions = {i: v.strip('"') for i, v in numbered(tables["FunctionNames"]).items()}
    locations = {i: dict(_FIELDS.findall(v)) for i, v in numbered(tables["FileLocations"]).items()}
    rows = {i: dict(_FIELDS.findall(v)) for i, v in numbered(tables["StackFrames"]).items()}
    offset = int(any(int(row["parent_frame_id"]) == i for i, row in rows.items()))

    def frame(i: int) -> Frame:
        loc = locations[int(rows[i]["file_location_id"])]
        return Frame(files.get(int(loc["file_name_id"]), "?"),
                     functions.get(int(loc["function_name_id"]), "?"), int(loc.get("line", 0)))

    stacks = {}
    for i in rows:
        chain, seen, current = [], set(), i
        while current in rows and current not in seen:
            seen.add(current)
            chain.append(frame(current))
            current = int(rows[current]["parent_frame_id"]) - offset
        stacks[i] = tuple(chain)
    return stacks


# ---------------------------------------------------------------------------------------------
# Busy time of the step's ops, without double counting


@dataclasses.dataclass(frozen=True)
class OpInterval:
    start: float  # microseconds, trace clock
    end: float
    name: str  # hlo_op
    thread: int


def op_intervals(events: list[dict], module: str) -> list[OpInterval]:
    """The thunks of HLO module `module` in a trace (every step, every thread)."""
    out = []
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            out.append(OpInterval(event["ts"], event["ts"] + event["dur"], args["hlo_op"],
                                  event.get("tid", 0)))
    return out


def attribute_busy_time(intervals: list[OpInterval], containers: set[str]) -> dict[str, float]:
    """Split the time during which any op ran among the ops: each moment goes to the leaf ops
    running then, in equal shares (ops on other threads overlap), or, when none is, to the
    containers (while loops: their own bookkeeping between body ops) running then. The values
    (microseconds) add up to the union of the intervals: the ops' busy time."""
    points = []
    for index, interval in enumerate(intervals):
        points.append((interval.start, 1, index))
        points.append((interval.end, -1, index))
    points.sort(key=lambda p: (p[0], p[1]))  # at equal times, ends before starts
    shares = collections.Counter()
    leaves, loops = set(), set()
    previous = None
    for time, kind, index in points:
        running = leaves or loops
        if previous is not None and running and time > previous:
            for i in running:
                shares[intervals[i].name] += (time - previous) / len(running)
        active = loops if intervals[index].name in containers else leaves
        if kind == 1:
            active.add(index)
        else:
            active.discard(index)
        previous = time
    return dict(shares)
