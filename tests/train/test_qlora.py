"""QLoRA's frozen base and a quantised teacher (clinkd_jax.models.quant, through qwix): each family's quantised model
computes what its dequantised weights compute, stays within a stated distance of the unquantised model, holds a
fraction of its bytes, runs sharded, and a QLoRA step trains the adapters alone on the quantised base."""

import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
from test_loop import SMALL
from test_lora import FAMILIES, feed, hidden, lora_config

from clinkd_jax import checkpoint, sharding
from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.model_source import ModelSource
from clinkd_jax.models import Qwen2VL, quant
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import abstract_params, init_params
from clinkd_jax.stage import StageContext
from clinkd_jax.train import loop, steps
from clinkd_jax.train import state as state_lib

# the distance of the quantised model's last hidden states to the unquantised model's, as a fraction of their
# largest magnitude (tiny random models, float32; measured over the families 0.9e-2-1.1e-2 for int8, 0.17-0.20 for
# int4, 0.13-0.14 for nf4: per-channel absmax keeps 8 or 4 bits of each weight, and nf4's levels follow a normal
# distribution as these weights do); the bounds leave 2-3x room
GOLDEN = ("gqa2_untied", "gqa4_tied", "mha_head32", "q25_win28_tied", "q25_win56_gqa2", "q3_ds1_tied", "q3_ds2_gqa2")
BOUNDS = {"int8": 3e-2, "int4": 0.4, "nf4": 0.3}
# of float32: a byte per value (jax counts int4 and nf4's uint4 a byte each on CPU; TPU packs them two to a byte)
BYTES = {"int8": 0.27, "int4": 0.27, "nf4": 0.27}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_a_quantised_model_computes_its_dequantised_weights_close_to_the_plain_model(family, qtype,
                                                                                     batches_of_family):
    tiny, batches = batches_of_family(family)
    model = Qwen2VL(tiny)
    params = init_params(model, jax.random.key(0))
    q = quant.plan(model, qtype)
    llm = {f"model/layers/{p}" for p in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                         "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    quantised = {"/".join(path[:-1]) for path, *_ in q.layers}
    assert llm <= quantised and "visual/blocks/attn/qkv" in quantised and "visual/merger/mlp_0" in quantised
    assert not {"lm_head", "model/embed_tokens", "visual/patch_embed/proj"} & quantised
    qparams = jax.jit(q.quantize)(params)
    assert nbytes(qparams) < 1.1 * nbytes(params) - (1 - BYTES[qtype]) * sum(
        x.nbytes for path, x in flax.traverse_util.flatten_dict(params).items() if path in {p for p, *_ in q.layers})

    plain = hidden(model, params, batches[0])
    scale = float(jnp.abs(plain).max())
    out = hidden(quant.quantized(model, qtype), qparams, batches[0])
    # the quantised model is the plain model on the dequantised weights (float32: the order of sums only)
    np.testing.assert_allclose(out, hidden(model, q.dequantize(qparams), batches[0]), rtol=0, atol=1e-5 * scale)
    distance = float(jnp.abs(out - plain).max()) / scale
    assert 0 < distance < BOUNDS[qtype], distance


@pytest.mark.parametrize("name", GOLDEN)
def test_int8_keeps_the_parity_fixtures_logits(name):
    """transformers-made checkpoints (tests/golden: every family, tied and untied, GQA and MHA) read in int8: logits
    within 6 % of their largest magnitude and the same top-1 token at >= 90 % of positions (measured 1.8-2.9 % and
    96-100 %; 4-bit formats move these random checkpoints' logits by 28-48 %, docs/training.md)."""
    cfg, params = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    inputs, _ = R.load_golden(name)
    x, _ = R.jax_inputs(inputs)
    model = Qwen2VL(cfg)
    plain = np.asarray(jax.jit(model.apply)({"params": params}, **x)["logits"])
    q = quant.plan(model, "int8")
    out = np.asarray(jax.jit(quant.quantized(model, "int8").apply)({"params": jax.jit(q.quantize)(params)},
                                                                     **x)["logits"])
    valid = inputs["attention_mask"].astype(bool)
    assert 0 < np.abs(out[valid] - plain[valid]).max() < 6e-2 * np.abs(plain[valid]).max()
    assert (out[valid].argmax(-1) == plain[valid].argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_adapts_the_quantised_base_and_folds_into_its_dequantised_weights(family, batches_of_family):
    tiny, batches = batches_of_family(family)
    model = Qwen2VL(tiny)
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=(lora_lib.LLM, lora_lib.VISION, lora_lib.MERGER),
                               base_quant="int8")
    base = init_params(model, jax.random.key(0))
    q = quant.plan(model, "int8", lora_lib.quantised_layers(lora))
    qbase = jax.jit(q.quantize)(base)
    adapters = lora_lib.init_adapters(lora_lib.adapted(model, lora), jax.random.key(1), None)
    step_model = lora_lib.adapted(model, lora, training=True)  # the step's module reads the quantised base
    quantised_plain = hidden(quant.quantized(model, "int8"), qbase, batches[0])
    scale = float(jnp.abs(quantised_plain).max())
    np.testing.assert_allclose(hidden(step_model, lora_lib.merge(qbase, adapters), batches[0]), quantised_plain,
                               rtol=0, atol=1e-5 * scale)  # B = 0: the quantised base's output
    rng = iter(jax.random.split(jax.random.key(2), 1000))
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(rng), x.shape, x.dtype) if p[-1].key.endswith("_lora_b") else x,
        adapters)
    out = hidden(step_model, lora_lib.merge(qbase, trained), batches[0])
    assert float(jnp.abs(out - quantised_plain).max()) > 1e-2 * scale
    folded = lora_lib.fold(lora_lib.merge(q.dequantize(qbase), trained), lora)  # what params/ holds
    np.testing.assert_allclose(hidden(model, folded, batches[0]), out, rtol=0, atol=1e-5 * scale)


def test_a_qlora_step_trains_the_adapters_alone_on_a_sharded_quantised_base(tiny_and_batches):
    """4 devices (data 2 x tensor 2): the quantised base on its shardings (a merged axis split as its first axis),
    the step's loss falls, the base is never changed and the state holds the adapters alone."""
    tiny, batches = tiny_and_batches
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, base_quant="int8")
    plain = Qwen2VL(tiny)
    model = lora_lib.adapted(plain, lora)
    mesh = sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    q = quant.plan(plain, "int8", lora_lib.quantised_layers(lora))
    base_boxed, trained = lora_lib.split(abstract_params(model))
    base_sh = q.shardings(sharding.tree_shardings(base_boxed, mesh))
    q_proj = base_sh["model"]["layers"]["self_attn"]["q_proj"]["kernel"].array
    assert tuple(q_proj.qvalue.spec)[-1] == "tensor" and tuple(q_proj.scale.spec)[-2:] == (None, "tensor")
    opt = state_lib.OptimConfig(learning_rate=1e-2, total_steps=20, frozen=())
    tx = state_lib.optimizer(opt)
    st_sh = state_lib.state_shardings(trained, tx, mesh)
    with sharding.use_mesh(mesh):
        base = jax.jit(q.quantize, out_shardings=base_sh)(init_params(plain, jax.random.key(0), mesh))
        before = jax.tree.map(np.asarray, base)
        state = jax.jit(functools.partial(state_lib.create, tx=tx), out_shardings=st_sh)(
            lora_lib.init_adapters(model, jax.random.key(1), st_sh.params))
        step = steps.jit_train_step(st_sh, None, None, base_sh, model=lora_lib.adapted(plain, lora, training=True),
                                    tx=tx, loss=steps.LossSettings(chunk=64))
        losses = []
        for _ in range(6):
            state, metrics = step(state, None, feed(batches[0]), base)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
    assert all(p.endswith(lora_lib.SUFFIXES) for p in flax.traverse_util.flatten_dict(state.params, sep="/"))


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reads left in flight
def test_a_qlora_run_resumes_exactly_and_writes_the_adapters_folded_into_the_dequantised_base(tmp_path):
    changes = {"lora.base_quant": "nf4", "lora.dropout": 0.1}
    straight = loop.run(lora_config(**{"train.steps": 6, "checkpoint.export_hf": True, **changes}),
                        str(tmp_path / "a"))
    loop.run(lora_config(**{"train.steps": 3, **changes}), str(tmp_path / "b"))
    resumed = loop.run(lora_config(**{"train.steps": 6, **changes}), str(tmp_path / "b"))
    losses = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))} for d in "ab"]
    assert resumed["start_step"] == 3 and losses[0] == losses[1]
    jax.tree.map(np.testing.assert_array_equal, straight["state"].params, resumed["state"].params)
    # the run trained against the quantised base: its first loss is not the unquantised LoRA run's
    loop.run(lora_config(**{"train.steps": 1, "lora.dropout": 0.1}), str(tmp_path / "p"))
    first = json.loads(open(tmp_path / "p" / "metrics.jsonl").readline())["loss"]
    assert first != losses[0][1] and abs(first - losses[0][1]) < 0.05 * first

    c = lora_config(**changes)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, base = ModelSource.of(c, "model").load(mesh, sharding.DEFAULT_RULES, c.seed)
    _, written = checkpoint.load_params(str(tmp_path / "a" / "params"))
    lora = lora_lib.config(c.lora)
    model = Qwen2VL(checkpoint.load_config(str(tmp_path / "a" / "params")))
    q = quant.plan(model, "nf4", lora_lib.quantised_layers(lora))
    expect = lora_lib.fold(lora_lib.merge(q.dequantize(q.quantize(base)), straight["state"].params), lora)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), written, expect)
    # its adapters read back for an evaluation, with lora.base_quant, fold into the same dequantised base
    c.stage, c.lora.rank, c.lora.adapter_dir = "eval", 0, str(tmp_path / "a" / "export_peft")
    _, loaded = StageContext.of(c, str(tmp_path / "e")).load_model(c.model.param_dtype)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), loaded, written)


@pytest.mark.e2e
def test_distillation_from_a_quantised_teacher_into_a_qlora_student(tmp_path):
    def kd(quantised: str, where: str) -> list[float]:
        c = lora_config(**{"stage": "kd", "teacher.preset": "tiny_qwen", "teacher.dtype": "float32",
                           "teacher.text_overrides": {**SMALL, "intermediate_size": 96}, "train.steps": 2,
                           "teacher.quant": quantised, "lora.base_quant": "int8"})
        loop.run(c, str(tmp_path / where))
        return [json.loads(r)["loss_kd"] for r in open(tmp_path / where / "metrics.jsonl")]

    quantised, plain = kd("int4", "q"), kd("", "p")
    # a tiny random teacher's distribution is nearly flat, so its int4 weights move the first step's KD loss by
    # little (measured 2.5e-6 relative; int8's by less than float32 resolves): the step reads the quantised teacher,
    # and it is still the same teacher (the quantised model's own distance is bounded above, BOUNDS)
    assert quantised[0] != plain[0] and abs(quantised[0] - plain[0]) < 0.05 * plain[0], (quantised, plain)


@pytest.mark.e2e
@pytest.mark.parametrize("changes, message", [
    ({"lora.rank": 0, "lora.base_quant": "int8"}, "lora.base_quant='int8': only a LoRA run's frozen base"),
    ({"teacher.quant": "int8"}, "teacher.quant='int8': only stage 'kd''s online teacher"),
    ({"lora.base_quant": "fp3"}, "lora.base_quant"),
])
def test_what_quantisation_cannot_take_is_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ConfigError) as e:
        loop.run(lora_config(**{"train.steps": 1, **changes}), str(tmp_path))
    assert message in str(e.value)


@pytest.mark.e2e
def test_pseudo_labels_of_a_quantised_teacher_teach_a_lora_student(tmp_path):
    """The pseudo-label writer reads the teacher as teacher.quant says (its top-k log-probs move, the positions do
    not), and a LoRA student on a quantised base trains from the store."""
    from clinkd_jax.data import pseudo_labels as store
    from clinkd_jax.train import pseudo_labels

    teacher = {"teacher.preset": "tiny_qwen", "teacher.dtype": "float32", "kd.top_k": 4,
               "teacher.text_overrides": {**SMALL, "intermediate_size": 96}}
    for quantised in ("int4", ""):
        pseudo_labels.write_store(lora_config("kd", **teacher, **{"teacher.quant": quantised}),
                                  str(tmp_path / f"w{quantised}"))
    q, plain = (store.PseudoLabelReader(str(tmp_path / w / "pseudo_labels")) for w in ("wint4", "w"))
    assert q.meta["entries"] == plain.meta["entries"] > 0
    np.testing.assert_array_equal(q.get(0)["positions"], plain.get(0)["positions"])
    assert not np.array_equal(q.get(0)["logp"], plain.get(0)["logp"])
    out = loop.run(lora_config("kd", **{"kd.pseudo_labels": str(tmp_path / "wint4" / "pseudo_labels"), "kd.top_k": 4,
                                        "train.steps": 3, "lora.base_quant": "int8"}), str(tmp_path / "s"))
    assert np.isfinite(out["final"]["loss"]) and out["final"]["loss_kd"] > 0
    assert all(k.endswith(lora_lib.SUFFIXES) for k in flax.traverse_util.flatten_dict(out["state"].params, sep="/"))
