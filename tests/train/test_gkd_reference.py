"""kd.divergence against TRL's GKD loss, live in PyTorch (`trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`,
installed with torch in the Python 3.11 environment): the value and the gradients, in the student's LM head and
hidden states, of the chunked training loss (`losses.chunked_loss`, fused backward) against autograd through TRL's
loss on the same random logits, in float64. TRL's convention is the one documented: beta = 0 is the forward KL,
beta = 1 the reverse KL.

Tolerance: ours runs in float32 against TRL in float64: the value within rtol 1e-5; each gradient within 1e-4 of
its largest entry (float32's rounding through log-softmax at T = 0.5 on peaked logits: TRL's own float32 gradient
is off by 0.4e-4 of it, ours by up to 1e-4, summed in another order and chunk by chunk)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinkd_jax.train import losses as L

pytestmark = pytest.mark.torch
B, T, D, V = 2, 9, 8, 37


def trl_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("divergence, beta", [("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0),
                                              ("forward_kl", 0.0), ("reverse_kl", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_value_and_gradients_equal_trl(divergence, beta, temperature):
    import torch

    rng = np.random.default_rng(int(100 * beta) + int(10 * temperature))
    hs, ht = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(2))
    ws, wt = (2 * rng.standard_normal((D, V)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, V, (B, T))
    labels[:, :3] = -100  # a prompt
    labels[1, 7:] = -100  # padding

    kd = L.KDConfig(divergence=divergence, jsd_beta=beta, temperature=temperature, use_ce=False, reduction="mean",
                    sum_rows=0)  # L = sum_t M_t D_t / sum_t M_t over the batch: TRL's "batchmean" with labels

    def ours(ws_, hs_):
        return L.chunked_loss(hs_, lambda h: h @ ws_, jnp.asarray(labels), kd=kd, chunk=4,
                              teacher=L.OnlineTeacher(jnp.asarray(ht), lambda h: h @ jnp.asarray(wt)))["loss"]

    value, (g_w, g_h) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(ws), jnp.asarray(hs))

    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    ws_t, hs_t = f64(ws).requires_grad_(), f64(hs).requires_grad_()
    ref = trl_loss()(hs_t @ ws_t, f64(ht) @ f64(wt), labels=torch.tensor(labels), beta=beta, temperature=temperature,
                     reduction="batchmean")
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    for got, want in ((g_w, ws_t.grad.numpy()), (g_h, hs_t.grad.numpy())):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert ref.item() > 1e-3  # the logits disagree: a loss of 0 would compare nothing
