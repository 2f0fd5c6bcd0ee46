"""Compile one jitted function on abstract arguments and read what the compiler says: per-device memory and facts
about the optimized HLO (conditionals inside loops, custom-call kernels). Used by `scripts/fit_check.py`,
`benchmarks/cp_memory.py` and the HLO-fact tests; nothing here allocates device memory."""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class FunctionReport:
    """XLA's per-device memory analysis of one compiled function (bytes), its compile time and its HLO."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_s: float
    resident_bytes: int  # resident run state (params, optimizer/decode state) among its arguments or outputs
    hlo_text: str = dataclasses.field(default="", repr=False)

    @property
    def total_bytes(self) -> int:
        """What the function holds on a device while it runs: arguments + outputs - donated aliases + temps."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def transient_bytes(self) -> int:
        """Bytes the function needs beyond the resident state it reads or allocates (inputs built for it, other
        outputs, temporaries): what it adds to the resident total while it runs."""
        return self.total_bytes - self.resident_bytes


class CompileError(RuntimeError):
    """A function did not compile for the target (e.g. it does not fit a TPU's HBM); names the function."""


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of (sharded) arrays or ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_function(name: str, jitted, args: tuple, kwargs: dict | None = None, *, resident=(),
                     keep_hlo: bool = False) -> FunctionReport:
    """Compile `jitted(*args, **kwargs)` (abstract args; kwargs are its static arguments) and measure it.

    `resident`: trees of resident run state among its arguments (or, for an allocation, its outputs), subtracted
    for `transient_bytes`.
    """
    start = time.perf_counter()
    try:
        compiled = jitted.trace(*args, **(kwargs or {})).lower().compile()
    except Exception as e:  # the compiler's own message (RESOURCE_EXHAUSTED on TPU names the sizes)
        raise CompileError(f"{name}: compile failed: {type(e).__name__}: {str(e)[:2000]}") from e
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return FunctionReport(
        name=name, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), compile_s=seconds,
        resident_bytes=sum(tree_bytes_per_device(r) for r in resident),
        hlo_text=compiled.as_text() if keep_hlo else "")


# ----------------------------------------------------------------------------- HLO facts

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_CALLED_ONE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:calls|branch_computations)=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"(?<![%\w.\-])while\(.*?\bbody=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"(?<![%\w.\-])while\(.*?\bcondition=%?([\w.\-]+)")
_CONDITIONAL = re.compile(r"(?<![%\w.\-])conditional\(")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def computations(hlo_text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
                match = _HEADER.match(line)
                if match:
                    current = match.group(1)
                    out[current] = []
        elif line.startswith("}"):
            current = None
        else:
            out[current].append(line)
    return out


def _called(line: str) -> list[str]:
    names = _CALLED_ONE.findall(line)
    for group in _CALLED_LIST.findall(line):
        names.extend(n.strip().lstrip("%") for n in group.split(",") if n.strip())
    return names


def _reachable(comps: dict[str, list[str]], roots) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            stack.extend(_called(line))
    return seen


def conditionals_inside_loops(hlo_text: str) -> list[str]:
    """Computations reachable from a while loop's body or condition that contain a `conditional` instruction
    (each one a branch the device takes per loop iteration: on GPU a host-synchronising predicate copy, on every
    target a barrier to fusion and scheduling). Empty when there is none."""
    comps = computations(hlo_text)
    roots = []
    for lines in comps.values():
        for line in lines:
            roots.extend(_WHILE_BODY.findall(line))
            roots.extend(_WHILE_CONDITION.findall(line))
    inside = _reachable(comps, roots)
    return sorted(name for name in inside if any(_CONDITIONAL.search(line) for line in comps[name]))


def count_while_loops(hlo_text: str) -> int:
    return sum(len(_WHILE_BODY.findall(line)) for lines in computations(hlo_text).values() for line in lines)


def custom_call_targets(hlo_text: str) -> collections.Counter:
    """How often each custom-call target (cuDNN / cuBLAS kernels, Mosaic `tpu_custom_call`, ...) appears."""
    return collections.Counter(_CUSTOM_CALL_TARGET.findall(hlo_text))


FUSED_ATTENTION_TARGETS = ("__cudnn$fmha", "__gpu$xla.gpu.triton", "tpu_custom_call")


def fused_attention_calls(hlo_text: str) -> dict[str, int]:
    """The custom calls that are fused attention kernels (cuDNN fMHA, Triton, Mosaic TPU), by target."""
    return {t: n for t, n in custom_call_targets(hlo_text).items() if t.startswith(FUSED_ATTENTION_TARGETS)}


def attention_kernel_calls(hlo_text: str, platform: str) -> int:
    """Custom calls of a fused attention kernel: cuDNN's flash attention (`__cudnn$fmha...`) on GPU, Mosaic
    kernels (`tpu_custom_call`, what Pallas splash attention compiles to) on TPU."""
    targets = custom_call_targets(hlo_text)
    if platform == "cuda":
        return sum(n for t, n in targets.items() if t.startswith("__cudnn$fmha"))
    if platform == "tpu":
        return targets.get("tpu_custom_call", 0)
    raise ValueError(f"no fused attention kernel is known for platform {platform!r}")
