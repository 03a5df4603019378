"""Sharding by logical axis names.

Every parameter is created with logical names (`nn.with_logical_partitioning`) and the main
activations are constrained with `constrain(x, names)`. One rules table maps logical names onto the
mesh axes `(data, fsdp, tensor)`; it lives in the run config so a new layout is a command-line change.

A logical axis whose length is not divisible by the mesh axes it maps to is replicated instead (for
example Qwen2-VL-2B's 2 KV heads on a tensor axis of 4), so one rules table serves every model size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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


def logical_names(boxed_tree):
    """The logical names of each boxed leaf (a tuple per leaf), for converters and checkpoint code."""
    return jax.tree.map(
        lambda l: tuple(l.names) if isinstance(l, nn.LogicallyPartitioned) else None,
        boxed_tree,
        is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned),
    )
