"""LoRA (Hu et al., 2021): low-rank adapters beside a frozen model's matmuls, through qwix.

A targeted layer y = x W becomes y = x W + (x A) B * alpha / rank, with A (inputs, rank) and B (rank, outputs)
per layer (qwix's `LoraProvider` intercepts the layer's matmul; B starts at zero, so an adapted model starts as its
base). The adapters are params named `<weight>_lora_a` / `<weight>_lora_b` beside the weight they adapt; a training
step holds them alone as its trainable params and takes the base as a frozen input (`split`, `merge`), so optimizer
state, gradients and checkpoints are the adapters' only. `fold` writes W + A B * alpha / rank: the plain model that
evaluation, generation and the Hugging Face export read.

Targets are regexes over module paths as the model names them, which follow Hugging Face's
("model/layers/self_attn/q_proj", "visual/blocks/attn/qkv", "visual/merger/mlp_0").
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import qwix

from clinkd_jax.models import quant
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import Qwen2VL, dummy_inputs

SUFFIXES = ("_lora_a", "_lora_b")
# the LLM's attention and MLP projections (every family); the vision tower and merger are a choice
LLM = r"model/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"
VISION = r"visual/blocks/.*"
MERGER = r"visual/(merger|deepstack_mergers_\d+)/.*"
ADAPTABLE = r"(model/layers|visual)/.*"  # not the embeddings or the LM head (read outside the adapted call)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = (LLM,)
    dropout: float = 0.0
    base_quant: str = ""  # QLoRA: the frozen base's weights quantised (clinkd_jax.models.quant.QTYPES) in the step

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def config(section) -> LoraConfig | None:
    """The run config's `lora` section as a LoraConfig (None: rank 0, full fine-tuning)."""
    if not section.rank:
        return None
    return LoraConfig(int(section.rank), float(section.alpha), tuple(section.targets), float(section.dropout),
                      section.base_quant)


def quantised_layers(lora: LoraConfig) -> tuple[str, ...]:
    """The layers whose weights QLoRA quantises: the adapted ones and every other matmul of both towers."""
    return (*lora.targets, quant.LAYERS)


def adapted(model: Qwen2VL, lora: LoraConfig, training: bool = False) -> Qwen2VL:
    """`model` with adapters on the `lora.targets` layers. `training`: the train step's module, with dropout on the
    adapters' inputs (the step passes a "dropout" rng) and, with `lora.base_quant`, reading the base quantised
    (`quant.plan(model, lora.base_quant, quantised_layers(lora)).quantize`'s params). Initialise with the other."""
    rate, qtype = (lora.dropout, lora.base_quant) if training else (0.0, "")
    rules = [qwix.LoraRule(module_path=t, rank=lora.rank, alpha=lora.alpha, dropout=rate, weight_qtype=qtype or None)
             for t in lora.targets]
    return qwix.apply_lora_to_model(model, qwix.LoraProvider(rules + quant.rules(qtype, (quant.LAYERS,))))


def split(params) -> tuple[dict, dict]:
    """(base, adapters): the same nested dicts, each with its own leaves only."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    base = {k: v for k, v in flat.items() if not k[-1].endswith(SUFFIXES)}
    adapters = {k: v for k, v in flat.items() if k[-1].endswith(SUFFIXES)}
    return flax.traverse_util.unflatten_dict(base), flax.traverse_util.unflatten_dict(adapters)


def merge(base, adapters) -> dict:
    """One parameter tree for the adapted model."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base))
    flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(adapters)))
    return flax.traverse_util.unflatten_dict(flat)


def check(adapters, lora: LoraConfig, frozen: tuple[str, ...] = ()) -> None:
    """`adapters` (an adapted model's, from `split`) cover every target, only layers an adapter can be on, and
    `frozen` (optim.frozen's regexes over parameter paths) leaves some of them to train."""
    paths = list(flax.traverse_util.flatten_dict(flax.core.unfreeze(adapters), sep="/"))
    layers = {p.rsplit("/", 1)[0] for p in paths}
    for i, target in enumerate(lora.targets):
        if not any(re.fullmatch(target, p) for p in layers):
            raise ConfigError(f"lora.targets[{i}]={target!r} matches no layer of the model (layers are named as "
                              "Hugging Face names them: 'model/layers/self_attn/q_proj', 'visual/blocks/attn/qkv')")
    outside = sorted(p for p in layers if not re.fullmatch(ADAPTABLE, p))
    if outside:
        raise ConfigError(f"lora.targets: adapters on {outside}: only the decoder's and the vision tower's layers "
                          "take adapters (the embeddings and the LM head are read outside the adapted call)")
    if all(any(re.fullmatch(f, p) for f in frozen) for p in paths):
        raise ConfigError(f"optim.frozen={tuple(frozen)} freezes every adapter of lora.targets={lora.targets}")


def init_adapters(model: Qwen2VL, rng: jax.Array, shardings, start=None):
    """A LoRA run's first adapters on their shards: `start` (read from lora.adapter_dir) if given, else fresh ones
    of an adapted `model` (A random, B zero; the base weights the same init would make are never computed: only
    the adapters leave the jitted function)."""
    if start is not None:
        return jax.device_put(start, shardings)
    init = lambda r: split(flax.linen.unbox(model.init(r, **dummy_inputs(model.cfg))["params"]))[1]
    return jax.jit(init, out_shardings=shardings)(rng)


def fold(params, lora: LoraConfig) -> dict:
    """The plain model's params: each adapted weight W + A B * alpha / rank (in W's dtype), the adapters dropped.
    A is (..., inputs, rank) and B (..., rank, outputs) over the weight's leading (stacked-layer) axes; the layer
    contracts its kernel's leading axes, so A B reshapes to the kernel's shape."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {k: v for k, v in flat.items() if not k[-1].endswith(SUFFIXES)}
    for k, w in out.items():
        a, b = flat.get((*k[:-1], k[-1] + "_lora_a")), flat.get((*k[:-1], k[-1] + "_lora_b"))
        if a is not None:
            delta = jnp.einsum("...kr,...rf->...kf", a.astype(jnp.float32), b.astype(jnp.float32))
            out[k] = (w.astype(jnp.float32) + delta.reshape(w.shape) * lora.scale).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(out)


def folder(lora: LoraConfig, shardings, base_quant: quant.Quantization | None = None):
    """jitted (base, adapters) -> the plain model's params (`fold` of `merge`) on `shardings`; a base quantised as
    `base_quant` says is dequantised first (what the adapters trained against). Build it once and call it as often
    as needed (each new jit of it would compile again)."""
    plain = (lambda base: base) if base_quant is None else base_quant.dequantize
    return jax.jit(lambda base, adapters: fold(merge(plain(base), adapters), lora), out_shardings=shardings)


def base_digest(base) -> list[float]:
    """A LoRA base's fingerprint, kept beside its adapters' checkpoints: each weight's sum (float32), in tree order.
    Another base (another checkpoint, seed or size) changes it; the same base on another mesh sums in another
    order, so compare with `same_base`."""
    sums = jax.jit(lambda p: [jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)])(base)
    return [float(x) for x in sums]


def same_base(a: list[float], b: list[float]) -> bool:
    """Two `base_digest`s of one base (any mesh: the float32 sums' order only differs)."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-4 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))

