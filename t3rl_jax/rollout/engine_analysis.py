"""The rollout backend's jitted functions on abstract arguments, as the fit check (`step_analysis.run_functions`)
measures them: the backend's own `compile_targets()` (per slot class: the decode-state allocation, the largest and
the longest prefill call the driver can send, over the whole cache, and the decode loop), each with the resident
state it reads or allocates. Nothing is allocated."""

from __future__ import annotations

from t3rl_jax.rollout.protocol import RolloutLimits
from t3rl_jax.rollout.scheduler import MAX_PREFILL_ROWS


def compile_targets(engine, params, *, prefill_tokens_per_call: int) -> dict:
    """{name: (jitted, abstract args, static kwargs, resident trees among its inputs or outputs)}.

    `engine`: a `Qwen3Engine` (names as its `compile_targets`) or a `SlotClassBackend` (the same per class, named
    `<function>@<slots>x<cache length>`). `params`: abstract parameters (ShapeDtypeStructs with shardings). The
    functions read the parameters and their class's decode state, which stay resident for the whole run; an
    allocation's output is that decode state.
    """
    targets = engine.compile_targets(params, prefill_tokens_per_call=prefill_tokens_per_call,
                                     max_prefill_rows=MAX_PREFILL_ROWS,
                                     decode_steps=RolloutLimits().decode_steps_per_call)
    out = {}
    for name, (jitted, args, kwargs) in targets.items():
        if name.startswith("decode_state"):
            state = targets["decode_loop" + name[len("decode_state"):]][1][1]
            out[name] = (jitted, args, kwargs, (state,))
        else:
            out[name] = (jitted, args, kwargs, tuple(args[:2]))
    return out


def decode_states(targets: dict) -> dict:
    """{"decode_state<class suffix>": abstract decode state} of every class in `compile_targets`' result."""
    return {"decode_state" + name[len("decode_loop"):]: args[1] for name, (_, args, *_) in targets.items()
            if name.startswith("decode_loop")}
