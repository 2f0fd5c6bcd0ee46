"""Facts about attention kernels read from optimized HLO text (`compiled.as_text()`).

Two questions the platform kernels must answer with "no" and "yes": does a `conditional` sit inside a while
loop (on a GPU each one copies its predicate to the host, per iteration), and which fused-attention custom calls
(`__cudnn$fmha*`, Triton, Mosaic `tpu_custom_call`) the program holds.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_COND_WHILE = re.compile(r"\bwhile\(.*?\bcondition=%?([\w.\-]+)")
_CONDITIONAL = re.compile(r"\bconditional\(")
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
FUSED_ATTENTION_TARGETS = ("__cudnn$fmha", "__gpu$xla.gpu.triton", "tpu_custom_call")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line.strip()) if not line.startswith(" ") else None
        if header:
            current = header.group(1)
            comps[current] = []
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


def _callees(lines: list[str]) -> set[str]:
    found = set()
    for line in lines:
        found.update(_CALLEES.findall(line))
        for group in _BRANCHES.findall(line):
            found.update(name.strip().lstrip("%") for name in group.split(","))
    return found


def _reachable(comps: dict[str, list[str]], roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo.extend(_callees(comps[name]))
    return seen


def conditionals_in_loops(hlo_text: str) -> list[str]:
    """Lines of `conditional` instructions inside (anything called from) a while loop's body or condition."""
    comps = computations(hlo_text)
    roots = set()
    for lines in comps.values():
        for line in lines:
            roots.update(_WHILE.findall(line))
            roots.update(_COND_WHILE.findall(line))
    return [line.strip() for name in sorted(_reachable(comps, roots)) for line in comps[name]
            if _CONDITIONAL.search(line)]


def custom_call_targets(hlo_text: str) -> dict[str, int]:
    """custom_call_target -> number of calls."""
    counts: dict[str, int] = {}
    for target in _CUSTOM_TARGET.findall(hlo_text):
        counts[target] = counts.get(target, 0) + 1
    return counts


def fused_attention_calls(hlo_text: str) -> dict[str, int]:
    """The custom calls that are fused attention kernels (cuDNN fMHA, Triton, Mosaic TPU)."""
    return {t: n for t, n in custom_call_targets(hlo_text).items() if t.startswith(FUSED_ATTENTION_TARGETS)}
