"""The model-FLOPs formula (clinkd_jax.models.flops, for MFU) against the matmuls the model really runs:
every dot_general in the traced forward pass and in the traced gradient, counted from the jaxpr."""

import math

import jax
import jax.numpy as jnp
import pytest

from clinkd_jax.models import Qwen2VL, flops
from clinkd_jax.models.config import Qwen2VLConfig, TextConfig, VisionConfig
from clinkd_jax.models.qwen2vl import dummy_inputs, init_params

CFG = Qwen2VLConfig(
    vision=VisionConfig(depth=2, embed_dim=32, num_heads=2),
    text=TextConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=(2, 3, 3)),
    image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
)
ROWS, LENGTH, PATCHES = 2, 24, 16  # one 4 x 4-patch image per row, filling its patch slots


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general, into scans (x their length) and nested jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * dot_flops(inner)
    return total


def inputs():  # values do not matter to the count, shapes do
    return dummy_inputs(CFG, ROWS, LENGTH, PATCHES)


@pytest.fixture(scope="module")
def model_and_params():
    # model FLOPs, as MFU counts them: the batched attention, differentiated by JAX (the per-head loop's own
    # backward recomputes the scores, one (T, H) x (H, S) matmul more: hardware work, not model work)
    model = Qwen2VL(CFG, attention_loop="batched")
    return model, init_params(model, jax.random.key(0))


def test_forward_flops_equal_the_traced_matmuls(model_and_params):
    """The dense-mask implementation computes every (query, key) pair: causal=False must match exactly."""
    model, params = model_and_params
    traced = dot_flops(jax.make_jaxpr(lambda p: model.apply({"params": p}, **inputs())["logits"])(params).jaxpr)
    f = flops.forward_flops(CFG, LENGTH, [PATCHES], causal=False)
    assert traced == ROWS * (f["llm"] + f["vision"])
    # the causal count is the one MFU uses: (L + 1) / 2L of the LLM's attention
    assert flops.forward_flops(CFG, LENGTH, [PATCHES])["llm"] < f["llm"]


def test_train_step_flops_equal_the_traced_gradient(model_and_params):
    """Forward + backward of a loss over full logits with the vision tower frozen (stop_gradient, as the train
    step does): the LLM costs 3x its forward, the frozen tower 1x."""
    model, params = model_and_params

    def loss(p):
        p = {**p, "visual": jax.lax.stop_gradient(p["visual"])}
        return jnp.sum(model.apply({"params": p}, **inputs())["logits"] ** 2)

    traced = dot_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    assert traced == flops.train_step_flops(CFG, ROWS, LENGTH, [PATCHES], causal=False)
    with_teacher = flops.train_step_flops(CFG, ROWS, LENGTH, [PATCHES], causal=False, teacher=CFG)
    assert with_teacher == traced + dot_flops(jax.make_jaxpr(
        lambda p: model.apply({"params": p}, **inputs())["logits"])(params).jaxpr)
