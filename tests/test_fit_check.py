"""scripts/fit_check.py for accelerator targets: every function a run executes compiles for 8 H200s, the colocated
peak is resident state + the largest transient, and bad input (GPU spec, a preset over the limit, a program over a
TPU's HBM) exits non-zero naming the file or the function and its bytes."""

import os
import re
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import fit_check  # noqa: E402

# A 2-layer bf16 model, FSDP over 8 devices, KL on (reference params resident), short rows.
TINY = ["--config=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.vocab_size=512",
        "--config.model.dtype=bfloat16", "--config.model.remat=full", "--config.algo.kl_coef=0.1",
        "--config.train.max_seq_len=512", "--config.train.micro_batch_size=8",
        "--config.rollout.max_context_tokens=512", "--config.rollout.max_response_tokens=256",
        "--config.rollout.max_prefill_length=256", "--config.rollout.prefill_tokens_per_call=256",
        "--config.rollout.max_concurrent_decodes=8"]
EVERY_FUNCTION = ["grad_first", "grad_accumulate", "optimizer_update", "logprob_pass", "decode_state",
                  "extend_1x256", "extend_2x128", "decode_loop"]
GIB = 2**30


def _table(out: str) -> dict[str, list[float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 7 and parts[0] in EVERY_FUNCTION:
            rows[parts[0]] = [float(x) for x in parts[1:]]
    return rows


@pytest.mark.slow
def test_every_function_compiles_for_h200_and_the_peak_adds_up(capsys):
    assert fit_check.main(TINY + ["--target=h200"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "NVIDIA H200" in out and "x 8" in out
    table = _table(out)
    assert list(table) == EVERY_FUNCTION
    resident = {m.group(1): int(m.group(2).replace(",", ""))
                for m in re.finditer(r"resident (\w+):\s+[\d.]+ GiB\s+\(([\d,]+)\)", out)}
    assert set(resident) == {"params", "optimizer_state", "reference_params", "decode_state"}
    assert resident["reference_params"] == resident["params"]
    # Adam's two moments in f32 over f32 params, plus its step count.
    assert 2 * resident["params"] <= resident["optimizer_state"] <= 2 * resident["params"] + 64
    for name, (args, out_, alias, temp, transient, _) in table.items():
        assert transient <= args + out_ - alias + temp + 0.02, name  # printed rounded to 0.01 GiB
    peak = int(lines[-1].split("peak_per_device_bytes=")[1])
    assert lines[-1] == f"peak_per_device_bytes={peak}"
    largest = max(t[4] for t in table.values())
    assert abs(peak / GIB - (sum(resident.values()) / GIB + largest)) < 0.01


@pytest.mark.slow
def test_over_the_limit_exits_nonzero_naming_the_function_and_its_bytes(capsys):
    assert fit_check.main(TINY + ["--target=h200", "--only=grad_first", "--limit_gb=0.000001"]) == 1
    captured = capsys.readouterr()
    assert re.search(r"tiny does not fit h200: peak [\d,]+ bytes per device > limit 1,000 \(resident [\d,]+ \+ "
                     r"grad_first transient [\d,]+\)", captured.err)
    assert captured.out.strip().splitlines()[-1].startswith("peak_per_device_bytes=")


@pytest.mark.slow
def test_a_program_over_a_tpu_chip_is_refused_naming_the_function(capsys):
    # 2^23 decode slots of 512 tokens (264 bytes of K/V, positions and segment ids a token): 132 GiB a chip.
    many_slots = [a for a in TINY if "max_concurrent_decodes" not in a] + [
        "--config.rollout.max_concurrent_decodes=8388608"]
    assert fit_check.main(many_slots + ["--target=v5p", "--only=decode_state"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"decode_state: compile failed: .*RESOURCE_EXHAUSTED.*exceeds available HBM \(95\.74G\)", err)


def test_bad_gpu_spec_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.txtpb"
    bad.write_text("gpu_device_info { threads_per_block_limit: many }\n")
    assert fit_check.main(TINY + ["--target=h200", f"--gpu_spec={bad}"]) == 2
    assert re.search(r"GPU target spec .*broken\.txtpb failed", capsys.readouterr().err)
    assert fit_check.main(TINY + ["--target=h200", f"--gpu_spec={tmp_path / 'absent.txtpb'}"]) == 2
    assert "cannot read GPU target spec" in capsys.readouterr().err


def test_unknown_target_exits_2(capsys):
    assert fit_check.main(TINY + ["--target=a100"]) == 2
    assert "unknown target 'a100'" in capsys.readouterr().err


@pytest.mark.parametrize("budget,max_prefill", [(8192, 8192), (4096, 8192), (256, 256), (128, 128), (8192, 2048)])
def test_extend_shapes_are_the_largest_calls_the_prefill_budget_allows(budget, max_prefill):
    from t3rl_jax.rollout import extend_batch
    from t3rl_jax.rollout.extend_batch import largest_calls

    def cost(rows, tokens, outputs):
        requests = [extend_batch.ExtendRequest(i, [i % rows + 1] * tokens, reset=True) for i in range(outputs)]
        return extend_batch.prefill_cost(requests, max_prefill)

    shapes = largest_calls(budget, max_prefill, 16)
    one, longest, fanned = shapes[0]
    assert (one, longest) == (1, max_prefill)  # a request over the budget is sent alone, so the longest always
    assert fanned == (16 if cost(1, max_prefill, 16) <= budget else 1)
    # Distinct rows: as many as the budget holds at the smallest bucket (a power of two, at most 16).
    smallest = extend_batch.prefill_bucket(1, max_prefill)
    most = next(r for r in (16, 8, 4, 2, 1) if r == 1 or r * smallest <= budget)
    if most == 1:
        assert len(shapes) == 1
        return
    rows, tokens, outputs = shapes[1]
    assert rows == outputs == most and cost(rows, tokens, outputs) <= budget
    longer = extend_batch.prefill_bucket(tokens + 1, max_prefill)
    assert longer == tokens or cost(rows, longer, outputs) > budget  # no longer bucket of that many rows fits
