"""Jitted generation: one prefill over left-padded prompts, then a `lax.while_loop` of one-token decode
steps on a static KV cache (prompt bucket + max_new_tokens slots), stopping once every row has emitted
a stop token. Nothing leaves the device between tokens.

Static shapes: a (batch, prompt bucket, patch bucket) triple compiles once per sampling setting, so a
whole test set compiles a handful of times (`Generator.compiled` counts them).

Positions: a token written at cache slot c gets M-RoPE / MCG-RoPE position c + decode_offset (per row,
`clinkd_jax.data.positions`), so generation continues after the largest prompt position whatever
gaps the prompt was built with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clinkd_jax import distributed, sharding
from clinkd_jax.models.llm import KVCache
from clinkd_jax.models.qwen2vl import Qwen2VL, decode_model

VISION_KEYS = ("pixel_values", "vision_position_ids", "vision_segment_ids")
DEVICE_KEYS = ("input_ids", "attention_mask", "position_ids", "decode_offsets", *VISION_KEYS)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 80  # BiRD/ClinKD: 80, 100 for whole-image description (MII)
    temperature: float = 0.0  # 0 = greedy (the evaluation protocol)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens holding this much probability
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
    pad_token_id: int = 151643  # written after a row has stopped

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling setting temperature={self.temperature} top_p={self.top_p} "
                             f"top_k={self.top_k}")
        if not self.stop_token_ids:
            raise ValueError("stop_token_ids is empty: generation could never stop early")


def sample_token(logits_bv: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
    """Greedy when temperature is 0, else temperature / top-k / top-p sampling (HF's warper order); `rng` one key
    or one per row."""
    if s.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < s.top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    if rng.ndim == 0:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, logits).astype(jnp.int32)


def _draw(rng: jax.Array, index) -> tuple[jax.Array, jax.Array]:
    """(the key to go on with, the key(s) for token `index`). One key: split at every token (the batch's draws
    depend on the batch). A (B,) array of keys, one per row: token `index` of row b uses fold_in(key_b, index), so
    a row's sample depends on its key alone, not on the rows beside it nor on how the batch is sharded."""
    if rng.ndim == 0:
        return jax.random.split(rng)
    return rng, jax.vmap(jax.random.fold_in, (0, None))(rng, index)


def generate(params, batch: dict, rng: jax.Array, *, model: Qwen2VL, sampling: SamplingConfig, cache_dtype=None):
    """New tokens (B, max_new_tokens) int32 for left-padded prompts; rows stop at their first stop token
    (kept) and are filled with pad_token_id after it. Rows with no prompt token (batch filler) stop at once.
    `rng`: one key for the batch, or one per row (`_draw`)."""
    b, p = batch["input_ids"].shape
    n = sampling.max_new_tokens
    variables = {"params": params}
    cache = KVCache.init(model.cfg.text, b, p + n, cache_dtype or model.dtype)
    vision = {k: batch[k] for k in VISION_KEYS if k in batch}
    out = model.apply(variables, batch["input_ids"], batch["attention_mask"], batch["position_ids"], **vision,
                      cache=cache, return_hidden=True)
    stop = jnp.asarray(sampling.stop_token_ids, jnp.int32)
    offsets = batch["decode_offsets"].astype(jnp.int32)

    rng, sub = _draw(rng, 0)
    first_logits = model.apply(variables, out["hidden"][:, -1:], method=Qwen2VL.logits)[:, 0]
    first = sample_token(first_logits, sub, sampling)
    if n == 1:  # no decode step: nothing to lay out for one
        return first[:, None]
    # the first token does not wait for the decode layout (XLA may copy it while the prefill runs)
    decoder, decoder_params, last_logits = decode_model(model, params)  # hidden (B, D) -> logits (B, V)
    tokens = jnp.full((b, n), sampling.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop) | ~batch["attention_mask"].astype(bool).any(axis=1)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, done, rng = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        pos = jnp.broadcast_to((cache.index + offsets)[None, :, None], (3, b, 1))
        o = decoder.apply({"params": decoder_params}, prev, jnp.ones((b, 1), jnp.int32), pos, cache=cache,
                          return_hidden=True)
        rng, sub = _draw(rng, step)
        tok = jnp.where(done, sampling.pad_token_id, sample_token(last_logits(o["hidden"][:, -1]), sub, sampling))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
        return step + 1, o["cache"], tokens, done | jnp.isin(tok, stop), rng

    cache = out["cache"] if decoder.stacked_layers else out["cache"].per_layer()
    carry = (jnp.ones((), jnp.int32), cache, tokens, done, rng)
    _, _, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens


def trim(tokens_bn: np.ndarray, stop_token_ids) -> list[list[int]]:
    """Each row's tokens up to and including its first stop token."""
    out = []
    for row in np.asarray(tokens_bn):
        hits = np.flatnonzero(np.isin(row, stop_token_ids))
        out.append(row[: hits[0] + 1 if len(hits) else len(row)].tolist())
    return out


class Generator:
    """Generation for one model + params on a mesh; jits once per (input shapes, sampling setting).

    Batches are host NumPy dicts from `clinkd_jax.infer.prompts.collate_prompts` (or the training
    pipeline's fields, left-padded). The batch is sharded over the mesh's batch axes like training.
    """

    def __init__(self, model: Qwen2VL, params, mesh=None, rules=None, cache_dtype=None):
        self.model, self.params = model, params
        self.mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        self.rules = tuple(rules or sharding.DEFAULT_RULES)
        self.cache_dtype = cache_dtype
        self._fns: dict[SamplingConfig, Any] = {}
        self.shapes_seen: set[tuple] = set()

    @property
    def compiled(self) -> int:
        """Distinct (shapes, sampling) combinations run so far: each compiled once."""
        return len(self.shapes_seen)

    def _fn(self, sampling: SamplingConfig):
        if sampling not in self._fns:
            f = functools.partial(generate, model=self.model, sampling=sampling, cache_dtype=self.cache_dtype)
            self._fns[sampling] = jax.jit(f)
        return self._fns[sampling]

    def lower(self, batch: dict, sampling: SamplingConfig):
        """The generate program lowered for abstract inputs: `self.params` and `batch` as ShapeDtypeStructs on
        their shardings (`sharding.abstract_batch`), nothing allocated (`clinkd_jax.aot`)."""
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                                   sharding=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        with sharding.use_mesh(self.mesh, self.rules):
            return self._fn(sampling).lower(self.params, {k: batch[k] for k in DEVICE_KEYS if k in batch}, rng)

    def _place(self, batch: dict) -> dict:
        """The global batch (identical on every host) -> global arrays, each host giving its own rows."""
        return sharding.place_batch({k: batch[k] for k in DEVICE_KEYS if k in batch}, self.mesh, self.rules)

    def __call__(self, batch: dict, sampling: SamplingConfig, rng: jax.Array | int = 0) -> np.ndarray:
        """(B, max_new_tokens) new tokens for a global batch (every host passes the same batch and gets
        all rows back); pad after each row's stop token."""
        rng = jax.random.key(rng) if isinstance(rng, int) else rng
        self.shapes_seen.add((sampling, *((k, np.shape(batch[k])) for k in DEVICE_KEYS if k in batch)))
        with sharding.use_mesh(self.mesh, self.rules):
            tokens = self._fn(sampling)(self.params, self._place(batch), rng)
        return distributed.allgather_array(tokens, "generated tokens")
