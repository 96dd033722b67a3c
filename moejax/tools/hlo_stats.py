"""Collective traffic of a compiled program, counted from its HLO text.

`collective_traffic(compiled.as_text())` walks the entry computation and everything it calls,
multiplying a while loop's body by its known trip count (a `lax.scan` over layers runs its
collectives once per layer), and sums, per collective kind, how many times it runs and the bytes
one device sends per step. Conditional branches count as their most expensive branch.

Bytes sent per device follow the ring algorithms, with R the op's result bytes on one device and
n its group size: all-gather R (n-1)/n, reduce-scatter R (n-1), all-reduce 2 R (n-1)/n,
all-to-all R (n-1)/n, collective-permute R. Async pairs are counted once, at their `-done`.
"""

from __future__ import annotations

import math
import re

from moejax.model import cpu_kernels

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")

# bits per element; sub-byte types are packed
_DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")  # unindented header line
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
# mesh form (large device counts): replica_groups=mesh['axis_0'=8,'axis_1'=64](, device_ids=(..))?
# {'axis_1'}: one group per combination of the other axes, of the named axes' size product
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([\w]+)'=(\d+)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. 'f32[8,8]{1,0}' or a tuple of such."""
    total_bits = 0
    for dtype, dims in _ARRAY_SHAPE.findall(shape):
        bits = 8 if dtype.startswith("f8") else _DTYPE_BITS.get(dtype, 0)
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total_bits += bits * elements
    return total_bits // 8


def _group_size(attributes: str) -> int:
    explicit = _EXPLICIT_GROUPS.search(attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    iota = _IOTA_GROUPS.search(attributes)
    if iota:
        return int(iota.group(2))
    mesh = _MESH_GROUPS.search(attributes)
    if mesh:
        sizes = {name: int(size) for name, size in _MESH_AXIS.findall(mesh.group(1))}
        return math.prod(sizes[name.strip().strip("'")] for name in mesh.group(2).split(","))
    return 1


def _bytes_sent(kind: str, result_bytes: int, group: int) -> float:
    if kind == "collective-permute":
        return float(result_bytes)
    if kind == "reduce-scatter":
        return float(result_bytes * (group - 1))
    share = result_bytes * (group - 1) / group
    return 2 * share if kind == "all-reduce" else share


def _collective_kind(opcode: str) -> str | None:
    """The kind an instruction counts as, or None (async starts are counted at their done)."""
    base = opcode.removesuffix("-done")
    if base in KINDS and not opcode.endswith("-start"):
        return base
    return None


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text: pass compiled.as_text()")
    return computations, entry


def _empty() -> dict[str, dict[str, float]]:
    return {kind: {"count": 0, "bytes_sent": 0.0} for kind in KINDS}


def _add(total, part, times: int = 1) -> None:
    for kind in KINDS:
        total[kind]["count"] += part[kind]["count"] * times
        total[kind]["bytes_sent"] += part[kind]["bytes_sent"] * times


def _traffic_of(name, computations, memo):
    if name in memo:
        return memo[name]
    total = _empty()
    for line in computations.get(name, []):
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        shape, opcode, rest = instruction.groups()
        kind = _collective_kind(opcode)
        if kind:
            size = shape_bytes(shape)
            total[kind]["count"] += 1
            total[kind]["bytes_sent"] += _bytes_sent(kind, size, _group_size(rest))
        if opcode in ("async-done", "async-update"):
            continue  # the async-start names the same computation
        trip = _TRIP_COUNT.search(rest)
        for callee in _CALLEE.findall(rest):
            _add(total, _traffic_of(callee, computations, memo), int(trip.group(1)) if trip else 1)
        branches = _BRANCHES.search(rest)
        if branches:
            options = [_traffic_of(b.strip().lstrip("%"), computations, memo)
                       for b in branches.group(1).split(",")]
            _add(total, max(options, key=lambda t: sum(v["bytes_sent"] for v in t.values())))
    memo[name] = total
    return total


def collective_traffic(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": executions per step, "bytes_sent": bytes one device sends per step}}.

    A while loop without a known trip count is counted once (XLA records the count for scans)."""
    computations, entry = _split_computations(hlo_text)
    return _traffic_of(entry, computations, {})


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ")
_REFERENCE = re.compile(r"%([\w.\-]+)")
_COMPUTE_OPCODES = ("dot", "convolution")
# moejax's CPU kernels (cpu_kernels.py): custom calls whose work is GEMMs
_GEMM_CALL = re.compile(r'custom_call_target="(?:' + "|".join(cpu_kernels.TARGETS) + ')"')


def _is_gemm(line: str, opcode: str) -> bool:
    return opcode in _COMPUTE_OPCODES or (opcode == "custom-call" and bool(_GEMM_CALL.search(line)))


def _computes(name, computations, memo) -> bool:
    """Whether a computation (a fusion's body, say) contains a dot, a convolution or one of
    moejax's CPU GEMM kernels."""
    if name not in memo:
        memo[name] = False
        for line in computations.get(name, []):
            instruction = _INSTRUCTION.match(line)
            if instruction and (_is_gemm(line, instruction.group(2)) or any(
                    _computes(c, computations, memo) for c in _CALLEE.findall(line))):
                memo[name] = True
                break
    return memo[name]


def collective_overlap(hlo_text: str, kind: str = "all-to-all") -> list[dict]:
    """For each `kind` collective of a compiled (scheduled) program, in program order: how many
    GEMM-carrying instructions (dots, moejax's CPU GEMM kernels, or fusions/calls containing
    one) of its computation are
    independent of it (neither feed it nor read its result, directly or not), so that a
    scheduler may run them while it is in flight, and how many of those the schedule placed
    before and after it. {"computation", "position", "independent", "before", "after"}."""
    computations, _ = _split_computations(hlo_text)
    memo: dict = {}
    report = []
    for comp, lines in computations.items():
        order, operands, opcodes, compute = [], {}, {}, set()
        for line in lines:
            named, instruction = _NAME.match(line), _INSTRUCTION.match(line)
            if not (named and instruction):
                continue
            name = named.group(1)
            order.append(name)
            opcodes[name] = instruction.group(2)
            operands[name] = set(_REFERENCE.findall(instruction.group(3)))
            if _is_gemm(line, instruction.group(2)) or any(
                    _computes(c, computations, memo) for c in _CALLEE.findall(line)):
                compute.add(name)
        collectives = [n for n in order if _collective_kind(opcodes[n]) == kind
                       or opcodes[n] == f"{kind}-start"]
        if not collectives:
            continue
        position = {n: i for i, n in enumerate(order)}
        readers: dict[str, set] = {n: set() for n in order}
        for n, refs in operands.items():
            for r in refs & readers.keys():
                readers[r].add(n)
        for c in collectives:
            related = _closure(c, operands) | _closure(c, readers)
            free = [n for n in compute if n not in related]
            report.append({"computation": comp, "position": position[c], "independent": len(free),
                           "before": sum(position[n] < position[c] for n in free),
                           "after": sum(position[n] > position[c] for n in free)})
    return report


def _closure(start: str, edges: dict[str, set]) -> set:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


# Lowered StableHLO with debug locations (`lowered.as_text(debug_info=True)`): which named
# scopes each dot (or ragged dot) was traced under, and its operand element types.
_LOC_DEFINITION = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_LOC_OF_OP = re.compile(r"loc\((#loc\d*)\)\s*$")
_LOC_REFERENCE = re.compile(r"#loc\d*\b")
_SCOPE_NAME = re.compile(r'"([^"]*)"(?!:\d)')  # quoted names, not "file.py":line
_DOT_OPERANDS = re.compile(
    r"(?:stablehlo\.dot_general|chlo\.ragged_dot\").*:\s*\(tensor<[^>]*x(\w+)>, "
    r"tensor<[^>]*x(\w+)>")


_FUNCTION = re.compile(r"^\s*func\.func (?:public |private )?@([\w.\-]+)\(")
_CALL = re.compile(r"\bcall @([\w.\-]+)\(")


def dots_with_scopes(lowered_text: str) -> list[dict]:
    """Every `stablehlo.dot_general` and `chlo.ragged_dot` composite of a lowered module printed
    with debug info: {"lhs", "rhs": element types (e.g. f8E4M3FN), "scopes": the name-stack
    strings of its location and of the call sites of the function holding it (jax lowers
    loop bodies and custom-vjp rules as functions whose locations are relative)}. The dots
    inside a composite's decomposition are skipped (the composite counts once)."""
    definitions = {}
    for line in lowered_text.splitlines():
        match = _LOC_DEFINITION.match(line)
        if match:
            definitions[match.group(1)] = match.group(2)
    memo: dict[str, tuple] = {}

    def names(loc: str) -> tuple:
        if loc not in memo:
            memo[loc] = ()  # guards against a cycle in malformed text
            body = definitions.get(loc, "")
            found = tuple(_SCOPE_NAME.findall(body))
            for ref in _LOC_REFERENCE.findall(body):
                found += names(ref)
            memo[loc] = found
        return memo[loc]

    def loc_names(line: str) -> tuple:
        loc = _LOC_OF_OP.search(line)
        return names(loc.group(1)) if loc else ()

    callers: dict[str, list] = {}  # callee -> [(calling function, call-site names)]
    dots, function = [], ""
    for line in lowered_text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            function = header.group(1)
            continue
        for callee in _CALL.findall(line):
            callers.setdefault(callee, []).append((function, loc_names(line)))
        operands = _DOT_OPERANDS.search(line)
        if operands and not (function.startswith("chlo.") and function.endswith(".impl")):
            dots.append((function, operands.group(1), operands.group(2), loc_names(line)))
    inherited: dict[str, tuple] = {}

    def scopes_of(function: str) -> tuple:
        if function not in inherited:
            inherited[function] = ()
            found = ()
            for caller, site in callers.get(function, ()):
                found += site + scopes_of(caller)
            inherited[function] = found
        return inherited[function]

    return [{"lhs": lhs, "rhs": rhs, "scopes": own + scopes_of(function)}
            for function, lhs, rhs, own in dots]
