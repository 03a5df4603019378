"""Layer helpers: the gated MLP product's hand-written backward pass."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from clinkd_jax.models.layers import activation, gated_activation


def test_gated_silu_value_and_gradients_against_the_derivative_by_hand():
    """silu(g) * u and its gradients against float64 NumPy: d/dg = u s (1 + g (1 - s)) with s = sigmoid(g),
    d/du = silu(g). Tolerance: rtol 1e-5 / atol 1e-6 (float32 against float64, |g| <= ~4)."""
    rng = np.random.default_rng(0)
    g, u, ct = (rng.standard_normal((3, 5, 7)) for _ in range(3))
    s = 1 / (1 + np.exp(-g))
    out, vjp = jax.vjp(gated_activation("silu"), jnp.float32(g), jnp.float32(u))
    dg, du = vjp(jnp.float32(ct))
    np.testing.assert_allclose(out, g * s * u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dg, ct * u * s * (1 + g * (1 - s)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(du, ct * g * s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu"])
def test_gated_activation_equals_the_plain_product_and_keeps_only_its_inputs(name):
    """Every activation a checkpoint can name: same value and gradients as act(g) * u differentiated by JAX
    (rtol 1e-6: the same float32 operations), and the backward pass keeps the two inputs and nothing else
    (jax.ad_checkpoint.print_saved_residuals), where the plain product keeps more."""
    rng = np.random.default_rng(1)
    g, u = (jnp.float32(rng.standard_normal((4, 6))) for _ in range(2))
    plain = lambda g_, u_: activation(name)(g_) * u_
    for a, b in zip(jax.value_and_grad(lambda *x: jnp.sum(gated_activation(name)(*x) ** 2), (0, 1))(g, u),
                    jax.value_and_grad(lambda *x: jnp.sum(plain(*x) ** 2), (0, 1))(g, u)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    def saved(f):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda g_, u_: jnp.sum(f(g_, u_)), g, u)
        return len(re.findall(r"^f32\[4,6\]", out.getvalue(), re.M))

    assert saved(gated_activation(name)) == 2 < saved(plain)
