"""Sharding by logical axis names.

Every parameter is created with logical names (`nn.with_logical_partitioning`) and the main
activations are constrained with `constrain(x, names)`. One rules table maps logical names onto the
mesh axes `(data, fsdp, tensor)`; it lives in the run config so a new layout is a command-line change.

A logical axis whose length is not divisible by the mesh axes it maps to is replicated instead (for
example Qwen2-VL-2B's 2 KV heads on a tensor axis of 4), so one rules table serves every model size.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). Order matters only for duplicate names: first wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("patches", None),
    # LLM parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # vision tower and merger parameters
    ("vit_patch", None),
    ("vit_pos", None),  # rows of Qwen3-VL's learned position table
    ("vit_embed", "fsdp"),
    ("vit_qkv", "tensor"),
    ("vit_mlp", "tensor"),
    ("merger_in", "fsdp"),
    ("merger_mlp", "tensor"),
    # KV cache
    ("cache_length", None),
)

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, devices=None) -> jax.sharding.Mesh:
    """A mesh with Auto axes (Flax logical constraints need Auto, not the new Explicit default).

    A `-1` in `shape` takes all remaining devices.
    """
    devices = jax.devices() if devices is None else devices
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} are available")
    return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """Activate `mesh` and `rules` for model creation, jitting and the constraints inside the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int], rules: Rules) -> P:
    """Map logical names to a PartitionSpec, replicating axes whose length the mesh does not divide.

    A mesh axis is used at most once per array (the first logical axis that claims it wins).
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a in mesh_shape and a not in used)
        # drop trailing mesh axes until the product divides the dimension
        while axes and dim % int(np.prod([mesh_shape[a] for a in axes])):
            axes = axes[:-1]
        axes = tuple(a for a in axes if mesh_shape[a] > 1) or ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def current_rules() -> Rules:
    """The rules active in `use_mesh` (or the defaults)."""
    return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), current_rules())
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(logical_tree, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. `jax.eval_shape(model.init, ...)`).

    Leaves that are not boxed are replicated.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_spec(leaf.names, leaf.value.shape, dict(mesh.shape), rules)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, logical_tree, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))


# ----------------------------------------------------------------------------- input placement
# Batch fields whose batch axis is not the first (M-RoPE ids are (3, B, L)).
BATCH_AXIS = {"position_ids": 1, "teacher_position_ids": 1}


def batch_spec(key: str, ndim: int, global_batch: int, mesh: jax.sharding.Mesh, rules: Rules) -> P:
    """The PartitionSpec of one input field: its batch axis split by the rules' "batch" mapping."""
    axes = logical_to_spec(("batch",), (global_batch,), dict(mesh.shape), rules)[0]
    spec = [None] * ndim
    spec[BATCH_AXIS.get(key, 0)] = axes
    return P(*spec)


def process_rows(global_batch: int, mesh: jax.sharding.Mesh, rules: Rules) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process's devices hold (all rows where the batch
    is replicated). The input pipeline loads exactly these rows."""
    frozen = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    return _process_rows(global_batch, mesh, frozen)


@functools.lru_cache(maxsize=64)  # asked at every step (place_batch); fixed for a run
def _process_rows(global_batch: int, mesh: jax.sharding.Mesh, rules: Rules) -> tuple[int, int]:
    sharding = NamedSharding(mesh, batch_spec("input_ids", 1, global_batch, mesh, rules))
    spans = {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map((global_batch,)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(global_batch, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's devices hold non-contiguous rows {sorted(spans)} of the global batch; "
                         "order the mesh devices by process")
    return start, stop


def place_batch(batch: dict, mesh: jax.sharding.Mesh, rules: Rules, global_batch: int | None = None) -> dict:
    """Host NumPy batch -> global jax.Arrays sharded over the batch axes by `rules` (training, generation,
    pseudo-labels).

    `global_batch=None`: every process passes the whole global batch (generation) and gives its rows;
    otherwise `batch` holds this process's rows `process_rows(global_batch, ...)`, as the training
    pipeline loads them.
    """
    whole = global_batch is None
    if whole:
        key = next(iter(batch))
        global_batch = np.shape(batch[key])[BATCH_AXIS.get(key, 0)]
    start, stop = process_rows(global_batch, mesh, rules)
    out = {}
    for key, value in batch.items():
        value, axis = np.asarray(value), BATCH_AXIS.get(key, 0)
        local = np.take(value, np.arange(start, stop), axis=axis) if whole else value
        if local.shape[axis] != stop - start:
            raise ValueError(f"{key}: {local.shape[axis]} rows given, this process holds rows {start}:{stop} "
                             f"of a global batch of {global_batch}")
        shape = list(local.shape)
        shape[axis] = global_batch
        sharding = NamedSharding(mesh, batch_spec(key, value.ndim, global_batch, mesh, rules))
        out[key] = jax.make_array_from_process_local_data(sharding, local, tuple(shape))
    return out


def abstract_batch(batch: dict, mesh: jax.sharding.Mesh, rules: Rules) -> dict:
    """A whole global batch (NumPy) -> ShapeDtypeStructs on the shardings `place_batch` gives its fields: the
    inputs a jitted step is lowered for without data (`clinkd_jax.aot`)."""
    out = {}
    for key, value in batch.items():
        shape = np.shape(value)
        spec = batch_spec(key, len(shape), shape[BATCH_AXIS.get(key, 0)], mesh, rules)
        out[key] = jax.ShapeDtypeStruct(shape, np.asarray(value).dtype, sharding=NamedSharding(mesh, spec))
    return out


def local_rows(x: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a global array split (only) along axis 0, from this process's own shards:
    the inverse of `place_batch` for outputs computed per row (e.g. the teacher's top-k per token)."""
    out = np.empty((stop - start, *x.shape[1:]), x.dtype)
    seen = np.zeros(stop - start, bool)
    for shard in x.addressable_shards:
        a, b, _ = shard.index[0].indices(x.shape[0])
        if start <= a and b <= stop:
            out[a - start:b - start], seen[a - start:b - start] = np.asarray(shard.data), True
    if not seen.all():
        raise ValueError(f"rows {start}:{stop} are not all held by this process's devices")
    return out


def logical_names(boxed_tree):
    """The logical names of each boxed leaf (a tuple per leaf), for converters and checkpoint code."""
    return jax.tree.map(
        lambda l: tuple(l.names) if isinstance(l, nn.LogicallyPartitioned) else None,
        boxed_tree,
        is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned),
    )


def run_mesh(c, devices=None):
    """(mesh, logical rules) from config.mesh over `devices` (default: all; a TPU slice's described devices for
    `clinkd_jax.aot`); a smaller explicit mesh uses the first devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(c.mesh.shape)
    n_mesh = int(np.prod(shape)) if -1 not in shape else len(devices)
    mesh = make_mesh(shape, devices=devices[:n_mesh])
    rules = tuple(tuple(r) for r in c.mesh.rules) if c.mesh.rules else DEFAULT_RULES
    return mesh, rules
