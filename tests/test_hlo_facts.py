"""Facts about the optimized accelerator HLO of a 2-layer model's train step and decode loop, compiled (not run)
for 8 H200s and a v5p slice: no `conditional` inside a while loop (a per-iteration branch: on GPU a device-to-host
predicate copy each time), and the train step's attention is a fused kernel's custom call (cuDNN flash attention
on GPU, a Mosaic `tpu_custom_call` - splash attention - on TPU). The HLO readers are checked on hand-written HLO
first."""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import pytest  # noqa: E402

from t3rl_jax.accel import compile_report as cr  # noqa: E402

LOOP_WITH_BRANCH = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%then (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(f32[4]{0} %a)
}

%else (b: f32[4]) -> f32[4] {
  ROOT %b = f32[4]{0} parameter(0)
}

%step (x: f32[4], p: pred[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %p = pred[] parameter(1)
  ROOT %conditional.3 = f32[4]{0} conditional(pred[] %p, f32[4]{0} %x, f32[4]{0} %x), true_computation=%then, false_computation=%else
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %t), index=1
  %p = pred[] constant(true)
  %c = f32[4]{0} call(f32[4]{0} %x, pred[] %p), to_apply=%step
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  ROOT %r = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %c)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(s32[] %z, f32[4]{0} %x)
  %while.1 = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body
  %y = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %while.1), index=1
  %p = pred[] constant(false)
  %top = f32[4]{0} conditional(pred[] %p, f32[4]{0} %y, f32[4]{0} %y), branch_computations={%then, %else}
  ROOT %k = f32[4]{0} custom-call(f32[4]{0} %top), custom_call_target="__cudnn$fmhaSoftmax"
}
"""


def test_hlo_readers_on_handwritten_hlo():
    comps = cr.computations(LOOP_WITH_BRANCH)
    assert set(comps) == {"then", "else", "step", "body", "cond", "main"}
    # The branch reached from the loop body through a call is found; the one after the loop is not.
    assert cr.conditionals_inside_loops(LOOP_WITH_BRANCH) == ["step"]
    assert cr.count_while_loops(LOOP_WITH_BRANCH) == 1
    without_loop = LOOP_WITH_BRANCH.replace("condition=%cond, body=%body", "condition=%cond, body=%cond")
    assert cr.conditionals_inside_loops(without_loop) == []
    assert cr.custom_call_targets(LOOP_WITH_BRANCH) == {"__cudnn$fmhaSoftmax": 1}
    assert cr.attention_kernel_calls(LOOP_WITH_BRANCH, "cuda") == 1
    assert cr.attention_kernel_calls(LOOP_WITH_BRANCH, "tpu") == 0


# A 2-layer bf16 model with head_dim 64 (what cuDNN's and splash's kernels take), FSDP over 8 devices.
TINY_ON_TARGET = ["--config=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.vocab_size=512",
                  "--config.model.dtype=bfloat16", "--config.model.head_dim=64", "--config.model.remat=full",
                  "--config.train.max_seq_len=512", "--config.train.micro_batch_size=8",
                  "--config.rollout.max_context_tokens=512", "--config.rollout.max_response_tokens=256",
                  "--config.rollout.max_prefill_length=256", "--config.rollout.prefill_tokens_per_call=256",
                  "--config.rollout.max_concurrent_decodes=8"]


def compiled_hlo(target: str) -> dict[str, str]:
    from t3rl_jax.accel import targets
    from t3rl_jax.config import config_from_argv
    from t3rl_jax.step_analysis import run_functions

    cfg, _ = config_from_argv(TINY_ON_TARGET)
    devices = targets.compile_only_devices(target, 8)
    run = run_functions(cfg, devices)
    wanted = {"grad_first", "decode_loop"}
    return {fn.name: cr.compile_function(fn.name, fn.jitted, fn.args, fn.kwargs, keep_hlo=True).hlo_text
            for fn in run.functions if fn.name in wanted}


@pytest.fixture(scope="module", params=["h200", "v5p"])
def target_hlo(request):
    from t3rl_jax.accel import targets

    return targets.target(request.param).platform, compiled_hlo(request.param)


@pytest.mark.slow
def test_train_step_has_no_branch_inside_a_loop(target_hlo):
    _, hlo = target_hlo
    assert cr.count_while_loops(hlo["grad_first"]) > 0  # the layer scan: the check looks inside real loops
    assert cr.conditionals_inside_loops(hlo["grad_first"]) == []


@pytest.mark.slow
def test_decode_loop_has_no_branch_inside_a_loop(target_hlo):
    _, hlo = target_hlo
    assert cr.count_while_loops(hlo["decode_loop"]) > 0  # the decode steps' scan
    assert cr.conditionals_inside_loops(hlo["decode_loop"]) == []


@pytest.mark.slow
def test_train_step_attention_is_a_fused_kernel(target_hlo):
    platform, hlo = target_hlo
    # Forward and backward of both layers' attention (the layers may be a scanned loop: at least fwd + bwd).
    assert cr.attention_kernel_calls(hlo["grad_first"], platform) >= 2
