"""Weight-only quantisation of a frozen model (QLoRA's base, a distillation teacher), through qwix.

Each quantised layer's weight is stored as qwix's QArray (integer values, one scale per output channel) at the
shape its matmul reads: (inputs, outputs), the layer's contracted axes and its output axes each merged (stacked
layers keep their leading axis). qwix's PtqProvider (which LoRA's provider extends) intercepts the layer's matmul
and reads the QArray as it is, one layer at a time inside the scan, so the full-precision weights are never held
at once. The layers are found by pattern over the model's layer paths, as LoRA's targets are.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import qwix
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from qwix._src.core import qarray
from qwix._src.providers import ptq  # WithAux: a quantised weight as the intercepted matmul reads it (qwix 0.1.8)

from clinkd_jax.models.qwen2vl import Qwen2VL, dummy_inputs

QTYPES = ("int8", "int4", "nf4")
# every matmul of both towers (attention, MLP, the merger): not the patch embedding, the embeddings or the LM head
LAYERS = r"(model/layers|visual/blocks|visual/merger|visual/deepstack_mergers_\d+)/.*"
# how one layer's (inputs, outputs) weight is quantised (kept beside it; qwix's matmul reads the QArray as it is)
_PER_LAYER = {q: qarray.HowToQuantize(qtype=q, channelwise_axes=(1,)) for q in QTYPES}


def rules(qtype: str, layers: tuple[str, ...] = (LAYERS,)) -> list[qwix.QuantizationRule]:
    """qwix rules that read `layers`' weights as `qtype` QArrays (none for qtype "")."""
    return [qwix.QuantizationRule(module_path=p, weight_qtype=qtype) for p in layers] if qtype else []


def quantized(model: Qwen2VL, qtype: str):
    """`model` reading its LAYERS' weights quantised (`Quantization.quantize`'s params); `model` itself if qtype
    is "". Initialise with the plain model: an init of this one would make the weights in full precision."""
    return qwix.quantize_model(model, qwix.PtqProvider(rules(qtype))) if qtype else model


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How one model's params are quantised: `qtype` and, per quantised weight (path tuple), its stored shape and
    the (leading stacked axes, inputs) of the matmul that reads it."""

    qtype: str
    layers: tuple  # ((path, stored shape, lead, inputs), ...)

    def quantize(self, params) -> dict:
        """`params` (a plain tree, e.g. loaded from a checkpoint) with the layers' weights as QArrays."""
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        for path, _, lead, k in self.layers:
            w = flat[path].reshape(*lead, k, -1)
            how = qarray.HowToQuantize(qtype=self.qtype, channelwise_axes=(*range(len(lead)), len(lead) + 1))
            # per layer (inside the scan) the matmul reads (inputs, outputs): scales per output channel
            flat[path] = ptq.WithAux(qarray.quantize(w, how), _PER_LAYER[self.qtype])
        return flax.traverse_util.unflatten_dict(flat)

    def dequantize(self, params) -> dict:
        """The plain tree again (each weight in its stored shape and its scale's dtype): what the quantised model
        computes with."""
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), is_leaf=lambda _, x: isinstance(
            x, ptq.WithAux))
        for path, shape, _, _ in self.layers:
            flat[path] = qwix.dequantize(flat[path].array).reshape(shape)
        return flax.traverse_util.unflatten_dict(flat)

    def shardings(self, plain):
        """The quantised tree's shardings from `plain`, the unquantised tree's NamedShardings: a merged axis is
        split as its first (major) axis is, so what divided that axis divides it; a scale's size-1 axis is whole."""
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(plain))
        for path, shape, lead, k in self.layers:
            n, one = len(lead), flat[path]
            spec = (*one.spec, *(None,) * (len(shape) - len(one.spec)))
            outputs = next(i for i in range(n + 1, len(shape) + 1) if math.prod(shape[n:i]) == k)  # first output axis
            q, s = (P(*spec[:n], spec[n], spec[outputs]), P(*spec[:n], None, spec[outputs]))
            flat[path] = ptq.WithAux(qarray.QArray(NamedSharding(one.mesh, q), NamedSharding(one.mesh, s),
                                                   qtype=self.qtype), _PER_LAYER[self.qtype])
        return flax.traverse_util.unflatten_dict(flat)

    def abstract(self, abstract_params):
        """The quantised tree of plain ShapeDtypeStructs (nothing computed)."""
        return jax.eval_shape(self.quantize, abstract_params)


def quantizer(q: Quantization | None, shardings):
    """jitted plain params -> `q`'s quantised params on `shardings` (no quantisation: the params as they are)."""
    return (lambda params: params) if q is None else jax.jit(q.quantize, out_shardings=shardings)


def plan(model: Qwen2VL, qtype: str, layers: tuple[str, ...] = (LAYERS,)) -> Quantization | None:
    """The Quantization of the weights of `model`'s (a plain module) `layers` (None for qtype ""). The shape each
    matmul reads is taken from qwix itself: a rank-1 adapter on every such layer has A of shape (..., inputs, 1)."""
    if not qtype:
        return None
    if qtype not in QTYPES:
        raise ValueError(f"quantisation {qtype!r}: one of {QTYPES}")
    probe = qwix.apply_lora_to_model(model, qwix.LoraProvider([qwix.LoraRule(module_path=p, rank=1, alpha=1.0)
                                                              for p in layers]))
    init = lambda: flax.linen.unbox(probe.init(jax.random.key(0), **dummy_inputs(model.cfg))["params"])
    shapes = jax.eval_shape(init)  # (unboxed while traced: outside, the boxes' constraints need real arrays)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    found = []
    for path, a in flat.items():
        if path[-1].endswith("_lora_a"):
            weight = (*path[:-1], path[-1].removesuffix("_lora_a"))
            found.append((weight, tuple(flat[weight].shape), tuple(a.shape[:-2]), a.shape[-2]))
    return Quantization(qtype, tuple(sorted(found)))
