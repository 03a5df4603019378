"""LoRA through qwix: an adapted model starts as its base and folds into the plain model it computes (every family,
both towers); a LoRA step trains the adapters alone (the base is an input it never changes and never holds); a run
checkpoints the adapters only, resumes exactly and writes the folded model; what an adapter cannot take is refused
by name."""

import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import SMALL, small_config

from clinkd_jax import checkpoint, sharding
from clinkd_jax.model_source import ModelSource
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import abstract_params, init_params
from clinkd_jax.stage import StageContext
from clinkd_jax.train import loop, steps
from clinkd_jax.train import state as state_lib

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
BOTH_TOWERS = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=(lora_lib.LLM, lora_lib.VISION, lora_lib.MERGER))
DROP = ("index", "sample_mask", "decode_offsets", "record_index")


def feed(batch):
    return {k: v for k, v in batch.items() if k not in DROP}


def hidden(model, params, batch):
    return steps.hidden_and_head(model, params, feed(batch))[0]


def layers_of(adapters) -> set[str]:
    return {k.rsplit("/", 1)[0] for k in flax.traverse_util.flatten_dict(adapters, sep="/")}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapted_model_starts_as_its_base_and_folds_into_what_it_computes(family, batches_of_family):
    tiny, batches = batches_of_family(family)
    model = Qwen2VL(tiny)
    adapted = lora_lib.adapted(model, BOTH_TOWERS)
    base = init_params(model, jax.random.key(0))
    adapters = lora_lib.init_adapters(adapted, jax.random.key(1), None)
    llm = {f"model/layers/{p}" for p in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                         "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    vision_mlp = ("gate_proj", "up_proj", "down_proj") if family == "qwen2_5_vl" else ("fc1", "fc2")
    vision = {"visual/blocks/attn/qkv", "visual/blocks/attn/proj", *(f"visual/blocks/mlp/{m}" for m in vision_mlp)}
    mergers = ["merger"] + [f"deepstack_mergers_{i}" for i in range(len(tiny.vision.deepstack_visual_indexes))]
    assert layers_of(adapters) == llm | vision | {f"visual/{m}/mlp_{i}" for m in mergers for i in (0, 2)}

    # B starts at zero: the adapted model computes its base, to float32 rounding (XLA may fuse the adapted graph
    # differently: measured 0 for Qwen2-VL and Qwen2.5-VL, 2.4e-7 of the output's scale for Qwen3-VL)
    plain = hidden(model, base, batches[0])
    scale = float(jnp.abs(plain).max())
    np.testing.assert_allclose(hidden(adapted, lora_lib.merge(base, adapters), batches[0]), plain, rtol=0,
                               atol=1e-6 * scale)

    # trained adapters (B random): folding W + A B alpha/rank into the weights gives the plain model the same
    # output; float32, the two differ by the order of the sums only (measured 5.6e-7 to 9.6e-7 of the scale)
    rng = iter(jax.random.split(jax.random.key(2), 1000))
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(rng), x.shape, x.dtype) if p[-1].key.endswith("_lora_b") else x,
        adapters)
    merged = lora_lib.merge(base, trained)
    out = hidden(adapted, merged, batches[0])
    folded = hidden(model, lora_lib.fold(merged, BOTH_TOWERS), batches[0])
    assert float(jnp.abs(out - plain).max()) > 1e-2 * scale  # the adapters do change the output
    np.testing.assert_allclose(folded, out, rtol=0, atol=4e-6 * scale)


def test_a_lora_step_trains_the_adapters_alone(tiny_and_batches):
    tiny, batches = tiny_and_batches
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    model = lora_lib.adapted(Qwen2VL(tiny), lora)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    base_boxed, trained = lora_lib.split(abstract_params(model))
    opt = state_lib.OptimConfig(learning_rate=1e-2, total_steps=20, frozen=())
    tx = state_lib.optimizer(opt)
    st_sh = state_lib.state_shardings(trained, tx, mesh)
    base_sh = sharding.tree_shardings(base_boxed, mesh)
    with sharding.use_mesh(mesh):
        base = jax.device_put(init_params(Qwen2VL(tiny), jax.random.key(0), mesh), base_sh)
        before = jax.tree.map(np.asarray, base)
        state = jax.jit(functools.partial(state_lib.create, tx=tx), out_shardings=st_sh)(
            lora_lib.init_adapters(model, jax.random.key(1), st_sh.params))
        step = steps.jit_train_step(st_sh, None, None, base_sh, model=model, tx=tx, loss=steps.LossSettings(chunk=64))
        losses = []
        for _ in range(6):  # one batch again and again: its loss must fall
            state, metrics = step(state, None, feed(batches[0]), base)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)  # never updated
    paths = flax.traverse_util.flatten_dict(state.params, sep="/")
    assert paths and all(p.endswith(lora_lib.SUFFIXES) for p in paths)  # the state holds the adapters only
    assert all(float(jnp.abs(v).max()) > 0 for p, v in paths.items() if p.endswith("_lora_b"))  # B has moved
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_adapters = sum(x.size for x in paths.values())
    assert n_opt <= 2 * n_adapters + 8  # AdamW's two moments of the adapters (and counters), nothing of the base


def lora_config(stage="sft", **changes):
    c = small_config(**{"lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 1e-2, **changes})
    c.stage = stage
    return c


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reads left in flight
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # the adapters' dropout draws from (seed, step): a resume too
def test_a_lora_run_checkpoints_the_adapters_resumes_exactly_and_writes_the_folded_model(tmp_path, dropout):
    straight = loop.run(lora_config(**{"train.steps": 6, "lora.dropout": dropout, "checkpoint.export_hf": True}),
                        str(tmp_path / "a"))
    loop.run(lora_config(**{"train.steps": 3, "lora.dropout": dropout}), str(tmp_path / "b"))
    resumed = loop.run(lora_config(**{"train.steps": 6, "lora.dropout": dropout}), str(tmp_path / "b"))
    assert resumed["start_step"] == 3
    losses = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))} for d in "ab"]
    assert losses[0] == losses[1]
    jax.tree.map(np.testing.assert_array_equal, straight["state"].params, resumed["state"].params)
    c = lora_config()
    base_cfg, base = ModelSource.of(c, "model").load(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                                     sharding.DEFAULT_RULES, c.seed)
    state_dir = tmp_path / "a" / "checkpoints" / "6" / "state"
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state_dir) for f in fs)
    # the adapters, their two AdamW moments and Orbax's metadata: a small fraction of the base, of which no copy
    assert stored < sum(x.nbytes for x in jax.tree.leaves(base)) / 20

    cfg, written = checkpoint.load_params(str(tmp_path / "a" / "params"))
    expect = lora_lib.fold(lora_lib.merge(base, straight["state"].params), lora_lib.config(c.lora))
    assert cfg == base_cfg
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), written, expect)
    # export_hf/ is that model in Hugging Face's layout; export_peft/ the adapters alone (tests/models/test_lora_peft)
    peft = json.load(open(tmp_path / "a" / "export_peft" / "adapter_config.json"))
    assert peft["r"] == 4 and len(peft["target_modules"]) == 7 * 2  # 7 projections x tiny_qwen's 2 layers
    assert os.path.isfile(tmp_path / "a" / "export_hf" / "model.safetensors")
    # lora.adapter_dir reads export_peft/ back onto the base: the model an evaluation loads is the one written
    c.stage, c.lora.rank, c.lora.adapter_dir = "eval", 0, str(tmp_path / "a" / "export_peft")
    _, loaded = StageContext.of(c, str(tmp_path / "e")).load_model(c.model.param_dtype)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), loaded, written)
    # and a training run trains on from it: one step at learning rate 0 writes the same model again
    on = loop.run(lora_config(**{"train.steps": 1, "lora.rank": 0, "lora.adapter_dir": c.lora.adapter_dir,
                                 "optim.learning_rate": 0.0}), str(tmp_path / "on"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), on["state"].params,
                 straight["state"].params)


@pytest.mark.e2e
def test_adapters_do_not_resume_onto_another_base(tmp_path):
    loop.run(lora_config(**{"train.steps": 3}), str(tmp_path))
    with pytest.raises(ConfigError, match="its LoRA adapters were trained on another base than preset tiny_qwen"):
        other = lora_config(**{"train.steps": 6})
        other.seed += 1  # a preset's weights come from the seed: another base of the same shapes
        loop.run(other, str(tmp_path))


@pytest.mark.e2e
def test_distillation_into_a_lora_student(tmp_path):
    c = lora_config(**{"stage": "kd", "teacher.preset": "tiny_qwen", "teacher.dtype": "float32",
                       "teacher.text_overrides": {**SMALL, "intermediate_size": 96},
                       "train.steps": 3})
    out = loop.run(c, str(tmp_path))
    assert np.isfinite(out["final"]["loss"]) and out["final"]["loss_kd"] > 0
    assert all(k.endswith(lora_lib.SUFFIXES) for k in flax.traverse_util.flatten_dict(out["state"].params, sep="/"))


@pytest.mark.e2e
@pytest.mark.parametrize("changes, message", [
    ({"lora.targets": ("model/layers/self_attn/qkv_proj",)}, "lora.targets[0]='model/layers/self_attn/qkv_proj' "
                                                              "matches no layer"),
    ({"lora.targets": ("lm_head",)}, "adapters on ['lm_head']"),
    ({"lora.targets": (lora_lib.VISION,)}, "freezes every adapter"),  # optim.frozen keeps visual/.* out
    ({"stage": "kd", "teacher.preset": "tiny_qwen", "kd.on_policy_fraction": 0.5}, "does not run a LoRA student"),
    ({"lora.rank": -1}, "lora.rank=-1 must be 0"),
    ({"lora.adapter_dir": "/x"}, "lora.adapter_dir='/x': no readable adapter_config.json"),
])
def test_what_an_adapter_cannot_take_is_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ConfigError) as e:
        loop.run(lora_config(**{"train.steps": 1, **changes}), str(tmp_path))
    assert message in str(e.value)
