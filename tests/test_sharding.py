import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t3rl_jax import sharding as sh


def mesh_of(data=1, fsdp=1, tensor=1, sequence=1):
    return sh.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence))


def test_mesh_shape_fills_the_minus_one_axis():
    assert sh.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 4}, 8) == (1, 2, 1, 4)
    assert sh.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1, 1)
    mesh = mesh_of(2, 2, 2, 1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert mesh.devices.size == 8


def test_mesh_that_does_not_divide_devices_names_both_numbers():
    with pytest.raises(ValueError, match=r"has 6 devices but 8 are available"):
        sh.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match=r"product 3 .* do not divide the 8 devices"):
        sh.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1"):
        sh.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match=r"'tensor' must be a positive int"):
        sh.mesh_shape({"tensor": 0}, 8)


def test_validate_names_both_numbers():
    mesh = mesh_of(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"sequence length 100 is not divisible by 2\*context parallelism = 8"):
        sh.validate(mesh, seq_len=100)
    with pytest.raises(ValueError, match=r"query heads 5 are not divisible by the tensor axis size 2"):
        sh.validate(mesh, num_heads=5)
    with pytest.raises(ValueError, match=r"kv heads 3 are not divisible by the tensor axis size 2"):
        sh.validate(mesh, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"batch size 3 is not divisible .* 2"):
        sh.validate(mesh_of(2, 1, 1, 4), batch_size=3)
    sh.validate(mesh, seq_len=64, num_heads=32, num_kv_heads=8, batch_size=1)


def test_logical_to_spec_weights_and_activations():
    mesh = mesh_of(1, 2, 2, 2)
    assert sh.logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor", None)
    assert sh.logical_to_spec(("layers", "mlp", "embed"), mesh=mesh) == P(None, "tensor", "fsdp")
    assert sh.logical_to_spec(("vocab", "embed"), mesh=mesh) == P("tensor", "fsdp")
    # batch takes fsdp first, so the activation's embed dimension stays whole.
    assert sh.logical_to_spec(("batch", "length", "embed"), mesh=mesh) == P("fsdp", "sequence", None)
    assert sh.logical_to_spec(("batch", "length", "vocab"), mesh=mesh) == P("fsdp", "sequence", "tensor")
    both = mesh_of(2, 2, 2, 1)
    assert sh.logical_to_spec(("batch", "length"), mesh=both) == P(("data", "fsdp"), None)
    rules = sh.logical_axis_rules(fsdp_over_data=True)
    assert sh.logical_to_spec(("embed", "mlp"), rules, mesh=both) == P(("data", "fsdp"), "tensor")


def test_logical_to_spec_errors_name_the_array():
    mesh = mesh_of(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"w: logical axis 'hidden' has no sharding rule"):
        sh.logical_to_spec(("hidden",), mesh=mesh, what="w")
    with pytest.raises(ValueError, match=r"w: dimension 1 \('mlp'\) of size 5 is not divisible by mesh axes "
                                         r"\('tensor',\) of size 2"):
        sh.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(4, 5), what="w")


class _Block(nnx.Module):
    def __init__(self):
        self.up = nnx.Param(jnp.ones((8, 16)), out_sharding=("embed", "mlp"))
        self.scale = nnx.Param(jnp.ones((8,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((4,)))


def test_state_shardings_for_params_and_nnx_optimizer():
    mesh = mesh_of(1, 2, 2, 2)
    with nnx.use_eager_sharding(False):
        model = _Block()
    params = sh.state_shardings(nnx.state(model, nnx.Param), mesh)
    assert params["up"].get_value().spec == P("fsdp", "tensor")
    assert params["scale"].get_value().spec == P(None)
    assert params["bias"].get_value().spec == P()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    opt = sh.state_shardings(nnx.state(optimizer), mesh)
    for moment in ("mu", "nu"):
        assert opt["opt_state"][0][moment]["up"].get_value().spec == P("fsdp", "tensor")
    assert opt["opt_state"][0]["count"].get_value().spec == P()
    # Placing the state with these shardings shards the arrays accordingly.
    placed = jax.device_put(nnx.state(model, nnx.Param), params)
    assert placed["up"].get_value().sharding.spec == P("fsdp", "tensor")
    assert placed["up"].get_value().addressable_shards[0].data.shape == (4, 8)


def test_optax_state_shardings_follow_params_by_path():
    mesh = mesh_of(1, 2, 2, 2)
    params = {"layer": {"w": jnp.ones((8, 16)), "b": jnp.ones((16,))}}
    param_sh = {"layer": {"w": sh.NamedSharding(mesh, P("fsdp", "tensor")), "b": sh.NamedSharding(mesh, P())}}
    state = optax.adam(1e-3).init(params)
    out = sh.optax_state_shardings(state, params, param_sh, mesh)
    assert out[0].mu["layer"]["w"].spec == P("fsdp", "tensor")
    assert out[0].nu["layer"]["w"].spec == P("fsdp", "tensor")
    assert out[0].count.spec == P()


def test_batch_shardings_and_errors():
    mesh = mesh_of(2, 2, 1, 2)
    batch = {"tokens": np.zeros((4, 16), np.int32), "advantages": np.zeros((4,), np.float32),
             "step": np.zeros((), np.int32)}
    out = sh.batch_shardings(batch, mesh)
    assert out["tokens"].spec == P(("data", "fsdp"), "sequence")
    assert out["advantages"].spec == P(("data", "fsdp"))
    assert out["step"].spec == P()
    with pytest.raises(ValueError, match=r"batch\['tokens'\]: dimension 0 \('batch'\) of size 2"):
        sh.batch_shardings({"tokens": np.zeros((2, 16))}, mesh)


def test_activation_constraint_shards_inside_jit():
    mesh = mesh_of(1, 2, 2, 2)
    constrain = sh.make_activation_constraint(mesh)

    @jax.jit
    def f(x):
        return constrain(x * 2.0, ("batch", "length", "mlp"))

    y = f(jnp.ones((2, 8, 4)))
    assert y.sharding.spec == P("fsdp", "sequence", "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0)
    with pytest.raises(ValueError, match=r"activation of shape \(2, 8, 4\) given 2 logical names"):
        constrain(jnp.ones((2, 8, 4)), ("batch", "length"))


def test_flax_axis_rules_shard_at_model_creation():
    mesh = mesh_of(1, 2, 2, 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sh.flax_axis_rules()):
        model = _Block()
    assert model.up.get_value().sharding.spec == P("fsdp", "tensor")


def test_weights_can_also_shard_over_the_sequence_axis():
    mesh = mesh_of(1, 2, 1, 4)
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)
    assert sh.logical_to_spec(("layers", "embed", "mlp"), rules, mesh=mesh) == P(None, ("fsdp", "sequence"), None)
    # Activations keep `sequence` for their length; embed then has no free axis left.
    assert sh.logical_to_spec(("batch", "length", "embed"), rules, mesh=mesh) == P("fsdp", "sequence", None)
