import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t3rl_jax import flops
from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import attention_mask
from t3rl_jax.models.model_config import QWEN3_4B_INSTRUCT_2507, Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3

# Matmul-dominated so the uncounted elementwise work stays small; small vocab keeps compiles fast.
CFG = Qwen3Config(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  intermediate_size=512)
# Norms, RoPE, softmax and activations are counted by XLA but not by us: measured 1-2% at this size.
TOLERANCE = 0.03


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _model():
    # XLA's cost analysis counts a while-loop body once, so layers must be unrolled to be counted.
    model = Qwen3(CFG, rngs=nnx.Rngs(0), scan_layers=False)
    return nnx.split(model, nnx.Param, ...)


def test_forward_and_train_flops_match_xla_cost_analysis():
    graphdef, params, rest = _model()
    b, t = 2, 64
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = jnp.ones((b, t), jnp.int32)

    def forward(p):
        return nnx.merge(graphdef, p, rest)(tokens, positions, segments)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p), tokens).mean()

    # The reference attention computes every (query, key) score and masks afterwards: all t*t pairs cost FLOPs.
    dense_pairs = b * t * t
    want_fwd = flops.forward_flops(CFG, tokens=b * t, visible_keys=dense_pairs)
    want_train = flops.train_flops(CFG, tokens=b * t, visible_keys=dense_pairs)
    assert _xla_flops(forward, params) == pytest.approx(want_fwd, rel=TOLERANCE)
    assert _xla_flops(jax.grad(loss), params) == pytest.approx(want_train, rel=TOLERANCE)


def test_decode_step_flops_match_xla_cost_analysis():
    graphdef, params, rest = _model()
    batch, cache_len = 2, 128
    cache = kvc.KVCache.for_config(CFG, batch=batch, max_len=cache_len)
    tokens = jnp.ones((batch, 1), jnp.int32)
    positions = jnp.zeros((batch, 1), jnp.int32)

    def step(p, cache):
        return nnx.merge(graphdef, p, rest)(tokens, positions, jnp.ones((batch, 1), jnp.int32), kv_cache=cache)[0]

    # Scores are computed against every cache slot (filled or not), so the cache length is what costs.
    want = batch * flops.decode_flops_per_token(CFG, cache_len)
    assert _xla_flops(step, params, cache) == pytest.approx(want, rel=TOLERANCE)


def test_packed_causal_pairs_equal_mask_count():
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3], [0, 0, 4, 4, 5, 5, 5]], np.int32)
    pos = np.zeros_like(seg)
    for r, row in enumerate(seg):
        for s in set(row.tolist()) - {0}:
            pos[r, row == s] = np.arange((row == s).sum())
    visible = int(np.asarray(attention_mask(pos, pos, seg, seg)).sum())
    lengths = flops.segment_lengths(seg)
    assert sorted(lengths.tolist()) == [2, 2, 3, 3, 7]
    assert flops.causal_keys(lengths) == visible
    assert flops.packed_train_flops(CFG, seg) == pytest.approx(
        3 * (lengths.sum() * flops.matmul_flops_per_token(CFG) + visible * flops.attention_flops_per_key(CFG)))


def test_qwen3_4b_matmul_flops_are_twice_the_matmul_parameters():
    c = QWEN3_4B_INSTRUCT_2507
    norm_params = c.num_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
    # Tied embeddings: the embedding matrix is used once, as the LM head matmul (the lookup is free).
    assert flops.matmul_flops_per_token(c) == 2 * (c.num_params - norm_params)
    per_token = flops.train_flops_per_token(c, 8192)
    # 6N, plus attention: 3 passes x 4 FLOPs x layers x heads x head_dim x (8192 + 1) / 2 keys on average.
    attention = 3 * 4 * c.num_layers * c.num_heads * c.head_dim * (8192 + 1) / 2
    assert per_token == pytest.approx(6 * (c.num_params - norm_params) + attention)
    assert 7.2e9 < attention < 7.3e9  # at 8k, attention adds ~30% to 6N (24.1 GFLOP per token)


def test_peaks_and_mfu():
    assert flops.peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_for_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_for_device("cpu", override=1e12) == 1e12
    with pytest.raises(ValueError, match="cpu"):
        flops.peak_flops_for_device("cpu")
    assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        flops.mfu(1.0, 0.0)
    with pytest.raises(ValueError, match="context_length"):
        flops.decode_flops_per_token(CFG, 0)
    with pytest.raises(ValueError, match="segment_ids"):
        flops.segment_lengths(np.ones(4))
