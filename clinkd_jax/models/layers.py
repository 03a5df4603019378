"""Small building blocks shared by the vision tower and the LLM: logically-named dense and norm layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clinkd_jax.sharding import constrain

Dtype = Any
INIT_STD = 0.02  # transformers' initializer_range for Qwen2-VL


class NamedParam(nn.LogicallyPartitioned):
    """A logically-named parameter box whose in-mesh constraint replicates axes the mesh does not divide."""

    def unbox(self, apply_constraint=True):
        if not apply_constraint:
            return self.value
        return constrain(self.value, self.names)


def named(init, names: Sequence[str | None]):
    names = tuple(names)

    def wrapped(*args, **kw):
        return NamedParam(init(*args, **kw), names)

    return wrapped


def contract(x: jax.Array, kernel, n: int, features: tuple[int, ...]) -> jax.Array:
    """x (..., K1..Kn) . kernel (K1..Kn, F...) -> (..., F...) as one 2-D GEMM: (M, K) . (K, F).

    The same matmul as a dot_general over the trailing axes, but its gradient differs in layout: autodiff of
    the N-D form writes the weight gradient as a contraction over the batch *and* length axes, and XLA:CPU
    then copies an operand into a transposed layout first (the SwiGLU backward wrote its (tokens, mlp)
    gradient transposed: 17 ms a layer at the bench's medium size, 1 ms untransposed). Flat, it is a plain
    (M, K)^T (M, F) GEMM. Merging leading axes is a free reshape on every backend."""
    lead, k = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n:])
    y = jnp.dot(x.reshape(math.prod(lead), k), kernel.reshape(k, math.prod(features)))
    return y.reshape(*lead, *features)


class Dense(nn.Module):
    """y = x . kernel (+ bias) contracting `axis` of x; kernel shape = contracted dims + features.

    The kernel carries `names` (contracted axes then output axes); the bias gets the output names.
    """

    features: int | tuple[int, ...]
    names: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        shape = tuple(x.shape[a] for a in axis) + features
        kernel = self.param("kernel", named(nn.initializers.normal(INIT_STD), self.names), shape, self.param_dtype)
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
        if isinstance(kernel, jax.Array | np.ndarray):
            kernel = kernel.astype(self.dtype)
        else:  # a quantised weight (models/quant.py), which qwix's matmul reads as it is: gathered here, still in its
            # integers (else XLA dequantises every layer's shard at once, before the scan, and gathers the floats)
            kernel = jax.tree.map(lambda a: constrain(a, (None,) * a.ndim), kernel)
        y = contract(x.astype(self.dtype), kernel, len(axis), features)
        if self.use_bias:
            bias = self.param("bias", named(nn.initializers.zeros_init(), self.names[-len(features):]), features,
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.astype(self.dtype)  # a LoRA adapter's float32 update (qwix) stays out of the compute dtype


def dense(
    features,
    names: Sequence[str | None],
    *,
    axis=-1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Dense:
    return Dense(features, tuple(names), axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=named(nn.initializers.ones_init(), ("norm",)),
        bias_init=named(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (transformers' order of operations)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", named(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


def gated_activation(name: str):
    """(gate, up) -> act(gate) * up, the gated MLP's product, keeping only its two inputs for the backward
    pass and recomputing the activation there. Differentiated as written, JAX kept act(gate), its derivative
    terms and the product too: six (tokens, intermediate) stacks per layer in the layer scan instead of three
    (with the down projection's input)."""
    act = activation(name)

    @jax.custom_vjp
    def gated(gate, up):
        return act(gate) * up

    def fwd(gate, up):
        return gated(gate, up), (gate, up)

    def bwd(res, ct):
        return jax.vjp(lambda g, u: act(g) * u, *res)[1](ct)

    gated.defvjp(fwd, bwd)
    return gated


def activation(name: str):
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


REMAT_POLICIES = ("none", "minimal", "minimal_with_context", "dots_saveable", "full")


def maybe_remat(module_cls, policy: str):
    """Wrap a layer class in `nn.remat` with a named checkpoint policy, least recompute first:
    "none" keeps every activation; "minimal" keeps the projections' outputs (dots without batch
    dimensions) and recomputes attention and elementwise work; "minimal_with_context" also keeps the
    attention output ("context", tagged in the attention layer), so only scores/softmax are recomputed;
    "dots_saveable" keeps every matmul output, attention's included; "full" keeps only the layer input."""
    if policy == "none":
        return module_cls
    cp = jax.checkpoint_policies
    policies = {
        "minimal": cp.dots_with_no_batch_dims_saveable,
        "minimal_with_context": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                           cp.save_only_these_names("context")),
        "dots_saveable": cp.checkpoint_dots,
        "full": None,  # recompute everything
    }
    if policy not in policies:
        raise ValueError(f"remat policy {policy!r} is not one of {REMAT_POLICIES}")
    return nn.remat(module_cls, policy=policies[policy], prevent_cse=False)
