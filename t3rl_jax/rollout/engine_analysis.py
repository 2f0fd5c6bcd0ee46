"""The rollout engine's jitted functions on abstract arguments, as the fit check (`step_analysis.run_functions`)
measures them: the engine's own `compile_targets()` (the decode-state allocation, the largest and the longest
prefill call the driver can send, over the whole cache, and the decode loop), each with the resident state it
reads or allocates. Nothing is allocated."""

from __future__ import annotations

from t3rl_jax.rollout.protocol import RolloutLimits
from t3rl_jax.rollout.scheduler import MAX_PREFILL_ROWS


def compile_targets(engine, params, *, prefill_tokens_per_call: int) -> dict:
    """{name: (jitted, abstract args, static kwargs, resident trees among its inputs or outputs)}.

    `params`: abstract parameters (ShapeDtypeStructs with shardings). The engine's functions read the parameters
    and the decode state, which stay resident for the whole run; the allocation's output is that decode state.
    """
    out = {}
    targets = engine.compile_targets(params, prefill_tokens_per_call=prefill_tokens_per_call,
                                     max_prefill_rows=MAX_PREFILL_ROWS,
                                     decode_steps=RolloutLimits().decode_steps_per_call)
    for name, (jitted, args, kwargs) in targets.items():
        out[name] = (jitted, args, kwargs, tuple(args[:2]))
    state = out["decode_loop"][1][1]
    out["decode_state"] = out["decode_state"][:3] + ((state,),)
    return out
