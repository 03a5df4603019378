"""Logical-axis sharding: the rules table, and a 2x2x2 (data, fsdp, tensor) forward on 8 fake CPU devices.

Tolerance for sharded vs single-device logits: 1e-5 max abs (float32). Sharding changes only the
order of partial sums in the contracted dimensions; anything wrong (a mis-sharded head, a missing
all-reduce) shows up as an O(1) difference.
"""

import jax
import numpy as np
import pytest
import reference as R
from jax.sharding import PartitionSpec as P

from clinkd_jax import checkpoint, sharding
from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models.qwen2vl import init_params

RULES = sharding.DEFAULT_RULES


def test_eight_fake_devices():
    assert jax.device_count() == 8, "conftest must set --xla_force_host_platform_device_count=8 before jax loads"


@pytest.mark.parametrize(
    "names, shape, mesh, expected",
    [
        (("embed", "mlp"), (64, 128), {"data": 2, "fsdp": 2, "tensor": 2}, P("fsdp", "tensor")),
        (("embed", "kv_heads", "head_dim"), (64, 1, 16), {"data": 2, "fsdp": 2, "tensor": 2}, P("fsdp", None, None)),
        (("batch", "length"), (4, 24), {"data": 2, "fsdp": 2, "tensor": 2}, P(("data", "fsdp"), None)),
        (("batch", "length"), (2, 24), {"data": 2, "fsdp": 2, "tensor": 2}, P("data", None)),  # 2 rows: fsdp dropped
        (("layers", "embed", "mlp"), (2, 64, 128), {"data": 1, "fsdp": 4, "tensor": 1}, P(None, "fsdp", None)),
    ],
)
def test_logical_to_spec(names, shape, mesh, expected):
    assert sharding.logical_to_spec(names, shape, mesh, RULES) == expected


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"mesh shape \(2, 2, 3\) needs 12 devices, 8 are available"):
        sharding.make_mesh((2, 2, 3))
    assert sharding.make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}


def _batch_of_four():
    """The reference batch plus a copy of its first sample, so the batch divides data x fsdp = 4."""
    inputs, _ = R.load_golden("gqa2_untied")
    x, _ = R.jax_inputs(inputs)
    return {k: np.concatenate([v, v[:, :1]] if k == "position_ids" else [v, v[:1]],
                              axis=1 if k == "position_ids" else 0)
            for k, v in x.items()}


@pytest.fixture(scope="module")
def single_and_sharded():
    src = f"{R.GOLDEN}/gqa2_untied"
    x = _batch_of_four()
    cfg, params = load_hf_checkpoint(src)
    model = Qwen2VL(cfg)
    single = np.asarray(jax.jit(model.apply)({"params": params}, **x)["logits"])
    mesh = sharding.make_mesh((2, 2, 2))
    _, sharded_params = load_hf_checkpoint(src, mesh=mesh)
    return model, x, single, mesh, sharded_params


def test_sharded_forward_equals_single_device(single_and_sharded):
    model, x, single, mesh, params = single_and_sharded
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    batch_axis = {k: 1 if k == "position_ids" else 0 for k in x}
    x_sharded = {
        k: jax.device_put(v, jax.NamedSharding(mesh, P(*([None] * batch_axis[k]), ("data", "fsdp"))))
        for k, v in x.items()
    }
    with sharding.use_mesh(mesh, RULES):
        logits = jax.jit(model.apply)({"params": params}, **x_sharded)["logits"]
    assert logits.sharding.spec[0] == ("data", "fsdp")
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], single[valid], atol=1e-5, rtol=0)


def test_init_params_directly_sharded():
    mesh = sharding.make_mesh((1, 4, 2))
    params = init_params(Qwen2VL(R_tiny()), jax.random.key(0), mesh)
    emb = params["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.addressable_shards[0].data.shape == (128, 16)


def R_tiny():
    from clinkd_jax.models.presets import tiny

    return tiny()


def test_restore_onto_another_mesh(tmp_path, single_and_sharded):
    """Save from the 2x2x2 mesh, restore onto (1, 8, 1) and onto one device: same values."""
    model, x, single, mesh, params = single_and_sharded
    checkpoint.save_params(str(tmp_path / "p"), params, model.cfg)
    other = sharding.make_mesh((1, 8, 1))
    _, restored = checkpoint.load_params(str(tmp_path / "p"), mesh=other)
    up = restored["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.mesh.shape == other.shape and up.sharding.spec == P(None, "fsdp", None)
    _, one = checkpoint.load_params(str(tmp_path / "p"))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(one)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logits = np.asarray(jax.jit(model.apply)({"params": one}, **x)["logits"])
    np.testing.assert_array_equal(logits, single)


def test_input_placement_follows_the_rules():
    """The run's rules place the batch too (training and generation use the same function): a batch axis
    mapped to `data` only is split 2 ways and replicated over fsdp and tensor; the default rules split it
    over data x fsdp. M-RoPE ids are split along their batch axis (axis 1)."""
    mesh = sharding.make_mesh((2, 2, 2))
    batch = {"input_ids": np.arange(8 * 5).reshape(8, 5), "position_ids": np.zeros((3, 8, 5), np.int32)}
    rules = (("batch", "data"),) + tuple(r for r in sharding.DEFAULT_RULES if r[0] != "batch")
    data_only = sharding.place_batch(batch, mesh, rules)
    assert data_only["input_ids"].sharding.spec == P("data", None)
    assert data_only["position_ids"].sharding.spec == P(None, "data", None)
    assert data_only["input_ids"].sharding.shard_shape((8, 5)) == (4, 5)
    default = sharding.place_batch(batch, mesh, sharding.DEFAULT_RULES)
    assert default["input_ids"].sharding.shard_shape((8, 5)) == (2, 5)
    np.testing.assert_array_equal(np.asarray(default["input_ids"]), batch["input_ids"])
    assert sharding.process_rows(8, mesh, rules) == (0, 8)  # one process holds every row
    with pytest.raises(ValueError, match="3 rows given, this process holds rows 0:8"):
        sharding.place_batch({"input_ids": batch["input_ids"][:3]}, mesh, rules, global_batch=8)
    back = sharding.local_rows(default["input_ids"], 0, 8)
    np.testing.assert_array_equal(back, batch["input_ids"])
