"""Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL safetensors <-> our parameter tree, without torch.

Import streams tensor by tensor straight onto the target shards: a host holds at most one Hugging Face
tensor plus the shards of the one stacked parameter it is assembling, never two copies of the model.
Both on-disk layouts are read: `model.layers.*`, `visual.*`, `lm_head.weight` (Qwen2-VL and Qwen2.5-VL as
published) and `model.language_model.*`, `model.visual.*` (Qwen3-VL as published, and what some transformers
releases wrote for fine-tuned models of the older families). Export writes the family's published layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from clinkd_jax import distributed, files
from clinkd_jax import sharding as sharding_lib
from clinkd_jax.data import processor
from clinkd_jax.errors import UserError
from clinkd_jax.models.config import HF_NAMES, ConfigError, Qwen2VLConfig
from clinkd_jax.models.qwen2vl import Qwen2VL, abstract_params

INDEX_FILE = "model.safetensors.index.json"
# Files that travel with the weights (tokenizer, chat template, processors, generation defaults).
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "generation_config.json",
)
# Keys some checkpoints carry that hold no parameters.
IGNORED_KEYS = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")
# Fine-tuned checkpoints saved by some transformers 4.x releases nest the modules one level deeper.
LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class CheckpointError(UserError):
    """A checkpoint directory that does not hold the Qwen2-VL the config describes."""


# ---------------------------------------------------------------------------------- name table
@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: where it lives in our tree, its Hugging Face name, and how the layouts differ."""

    path: tuple[str, ...]  # our tree path
    hf: str  # Hugging Face key; "{i}" for stacked layers
    to_ours: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> one (per-layer) leaf
    to_hf: Callable[[np.ndarray], np.ndarray]  # the inverse
    stacked: int = 0  # number of layers stacked on axis 0 (0 = not stacked)


def _same(x):
    return x


def _t(x):
    return np.ascontiguousarray(x.T)


def rules_for(cfg: Qwen2VLConfig) -> list[Rule]:
    t, v = cfg.text, cfg.vision
    n, k, hd, d = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size
    L, V = t.num_hidden_layers, v.depth
    patch_shape = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

    def heads_in(h):  # (h*hd, d) -> (d, h, hd)
        return lambda x: np.ascontiguousarray(x.T.reshape(d, h, hd))

    def heads_in_back(h):
        return lambda x: np.ascontiguousarray(x.reshape(d, h * hd).T)

    rules = [
        Rule(("visual", "patch_embed", "proj", "kernel"), "visual.patch_embed.proj.weight",
             lambda x: np.ascontiguousarray(x.reshape(v.embed_dim, -1).T),
             lambda x: np.ascontiguousarray(x.T.reshape(patch_shape))),
        Rule(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", _same, _same),
        Rule(("model", "norm", "scale"), "model.norm.weight", _same, _same),
    ]
    names = HF_NAMES[cfg.family]
    hf_norm, hf_fc1, hf_fc2 = names["merger"]
    mergers = [(("visual", "merger"), "visual.merger")] + [
        (("visual", f"deepstack_mergers_{k}"), f"visual.deepstack_merger_list.{k}")
        for k in range(len(v.deepstack_visual_indexes))]
    for ours, hf in mergers:
        rules += [Rule((*ours, "ln_q", "scale"), f"{hf}.{hf_norm}.weight", _same, _same),
                  Rule((*ours, "mlp_0", "kernel"), f"{hf}.{hf_fc1}.weight", _t, _t),
                  Rule((*ours, "mlp_0", "bias"), f"{hf}.{hf_fc1}.bias", _same, _same),
                  Rule((*ours, "mlp_2", "kernel"), f"{hf}.{hf_fc2}.weight", _t, _t),
                  Rule((*ours, "mlp_2", "bias"), f"{hf}.{hf_fc2}.bias", _same, _same)]
        if v.norm == "layer_norm":  # RMSNorm (Qwen2.5-VL) has no bias
            rules.append(Rule((*ours, "ln_q", "bias"), f"{hf}.{hf_norm}.bias", _same, _same))
    if v.patch_bias:
        rules.append(Rule(("visual", "patch_embed", "proj", "bias"), "visual.patch_embed.proj.bias", _same, _same))
    if v.num_position_embeddings:
        rules.append(Rule(("visual", "pos_embed", "embedding"), "visual.pos_embed.weight", _same, _same))
    for norm in ("norm1", "norm2"):
        rules.append(Rule(("visual", "blocks", norm, "scale"), f"visual.blocks.{{i}}.{norm}.weight", _same, _same, V))
        if v.norm == "layer_norm":
            rules.append(Rule(("visual", "blocks", norm, "bias"), f"visual.blocks.{{i}}.{norm}.bias", _same, _same, V))
    mlp = ("gate_proj", "up_proj", "down_proj") if v.mlp == "gated" else ("fc1", "fc2")
    for mod, name in (("attn", "qkv"), ("attn", "proj")) + tuple(("mlp", name) for name in mlp):
        hf = names["vision_mlp"] + name if mod == "mlp" else name
        rules += [
            Rule(("visual", "blocks", mod, name, "kernel"), f"visual.blocks.{{i}}.{mod}.{hf}.weight", _t, _t, V),
            Rule(("visual", "blocks", mod, name, "bias"), f"visual.blocks.{{i}}.{mod}.{hf}.bias", _same, _same, V),
        ]
    attn = ("model", "layers", "self_attn")
    for proj, h in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        hf = f"model.layers.{{i}}.self_attn.{proj}"
        rules.append(Rule((*attn, proj, "kernel"), f"{hf}.weight", heads_in(h), heads_in_back(h), L))
        if t.attention_bias:
            rules.append(Rule((*attn, proj, "bias"), f"{hf}.bias", lambda x, h=h: x.reshape(h, hd),
                              lambda x, h=h: x.reshape(h * hd), L))
    if t.qk_norm:
        for norm in ("q_norm", "k_norm"):
            rules.append(Rule(("model", "layers", "self_attn", norm, "scale"),
                              f"model.layers.{{i}}.self_attn.{norm}.weight", _same, _same, L))
    rules.append(Rule(("model", "layers", "self_attn", "o_proj", "kernel"), "model.layers.{i}.self_attn.o_proj.weight",
                      lambda x: np.ascontiguousarray(x.T.reshape(n, hd, d)),
                      lambda x: np.ascontiguousarray(x.reshape(n * hd, d).T), L))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(("model", "layers", "mlp", proj, "kernel"), f"model.layers.{{i}}.mlp.{proj}.weight",
                          _t, _t, L))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(("model", "layers", norm, "scale"), f"model.layers.{{i}}.{norm}.weight", _same, _same, L))
    if not t.tie_word_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", _t, _t))
    return rules


def _hf_keys(rule: Rule) -> list[str]:
    return [rule.hf.format(i=i) for i in range(rule.stacked)] if rule.stacked else [rule.hf]


# ------------------------------------------------------------------------------------- reading
class SafetensorsDir:
    """Lazy access to every tensor of a checkpoint directory (header reads only until a tensor is asked for)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{index} names shard file(s) that are missing from {path}: {', '.join(missing)}")
        else:
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
        self._handles = {}
        self.where: dict[str, str] = {}  # normalised key -> file
        self.raw_key: dict[str, str] = {}  # normalised key -> key as stored
        for fname in files:
            try:
                handle = safe_open(os.path.join(path, fname), framework="np")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{os.path.join(path, fname)}: not a readable safetensors file ({e})") from None
            self._handles[fname] = handle
            for key in handle.keys():
                norm = normalise_key(key)
                if norm in self.where:
                    raise CheckpointError(f"{path}: tensor {norm!r} is stored twice ({self.where[norm]} and {fname})")
                self.where[norm], self.raw_key[norm] = fname, key

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[key]].get_slice(self.raw_key[key]).get_shape())

    def dtype(self, key: str) -> np.dtype:
        return _np_dtype(self._handles[self.where[key]].get_slice(self.raw_key[key]).get_dtype())

    def read(self, key: str) -> np.ndarray:
        return self._handles[self.where[key]].get_tensor(self.raw_key[key])


def normalise_key(key: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _np_dtype(st_dtype: str) -> np.dtype:
    table = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
    if st_dtype not in table:
        raise CheckpointError(f"unsupported tensor dtype {st_dtype}")
    return np.dtype(table[st_dtype])


def _check(cfg: Qwen2VLConfig, store: SafetensorsDir, rules: list[Rule], expected_leaf: dict) -> None:
    """Every expected tensor present with the right shape, nothing unexpected: or one clear error."""
    expected = {key: rule for rule in rules for key in _hf_keys(rule)}
    present = {k for k in store.where if not IGNORED_KEYS.match(k)}
    if cfg.text.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tools save the tied head anyway; the embedding is used
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
    for key in sorted(set(expected) & present):
        rule = expected[key]
        want = expected_leaf[rule.path][1:] if rule.stacked else expected_leaf[rule.path]
        dummy = np.zeros(store.shape(key), np.int8)
        try:
            got = rule.to_ours(dummy).shape
        except ValueError:
            got = None
        if got != tuple(want):
            want_hf = rule.to_hf(np.zeros(want, np.int8)).shape
            problems.append(f"{key} in {store.where[key]} has shape {store.shape(key)}, expected {want_hf}")
    if problems:
        raise CheckpointError(f"{store.path} does not match its config.json:\n  " + "\n  ".join(problems))


def _few(keys, n=5):
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _assemble(shape, dtype, sharding, read_layer: Callable[[int], np.ndarray], stacked: int) -> jax.Array:
    """Build one sharded array from per-layer host tensors, one layer at a time."""
    index_map = sharding.addressable_devices_indices_map(shape)
    norm = lambda idx: tuple((s.start or 0, s.stop if s.stop is not None else dim) for s, dim in zip(idx, shape))
    buffers: dict[tuple, np.ndarray] = {}
    for idx in index_map.values():
        key = norm(idx)
        if key not in buffers:
            buffers[key] = np.empty([b - a for a, b in key], dtype)
    for layer in range(max(stacked, 1)):
        full = read_layer(layer).astype(dtype, copy=False)
        for key, buf in buffers.items():
            if stacked:
                (l0, l1), rest = key[0], key[1:]
                if l0 <= layer < l1:
                    buf[layer - l0] = full[tuple(slice(a, b) for a, b in rest)]
            else:
                buf[...] = full[tuple(slice(a, b) for a, b in key)]
        del full
    arrays = [jax.device_put(buffers[norm(idx)], dev) for dev, idx in index_map.items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_hf_checkpoint(
    path: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    dtype=None,
    config: Qwen2VLConfig | None = None,
) -> tuple[Qwen2VLConfig, dict]:
    """Read a Hugging Face Qwen2-VL directory into (config, params sharded on `mesh`).

    `dtype`: None keeps each tensor's stored dtype; otherwise every parameter is cast to it.
    """
    cfg = config or processor.read(path, Qwen2VLConfig.from_hf_dir(path))
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = rules or sharding_lib.DEFAULT_RULES
    store = SafetensorsDir(path)
    table = rules_for(cfg)
    boxed = abstract_params(Qwen2VL(cfg))
    shapes = {r.path: _get(boxed, r.path).value.shape for r in table}
    _check(cfg, store, table, shapes)
    shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
    params: dict = {}
    for rule in table:
        keys = _hf_keys(rule)
        leaf_dtype = np.dtype(dtype) if dtype is not None else store.dtype(keys[0])
        array = _assemble(
            shapes[rule.path], leaf_dtype, _get(shardings, rule.path),
            lambda layer, keys=keys, rule=rule: rule.to_ours(store.read(keys[layer])), rule.stacked,
        )
        _set(params, rule.path, array)
    return cfg, params


# ------------------------------------------------------------------------------------- writing
@functools.partial(jax.jit, static_argnames="dtype")
def _layer(x, i, dtype=None):
    """Layer `i` of a stacked parameter, on the device (one compile per leaf shape, not per layer)."""
    y = jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
    return y if dtype is None else y.astype(dtype)


def _host(x, dtype=None, layer: int | None = None) -> np.ndarray:
    """One parameter, or one layer of a stacked one, on the host, cast first (on the device) to `dtype`."""
    if not isinstance(x, jax.Array):  # already on the host
        x = np.asarray(x if layer is None else x[layer])
        return x if dtype is None else x.astype(dtype)
    x = _layer(x, layer, dtype=dtype) if layer is not None else x if dtype is None else x.astype(dtype)
    return distributed.allgather_array(x, "parameters for export")


def iter_hf_tensors(cfg: Qwen2VLConfig, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face key, host tensor) pairs; the host holds one Hugging Face tensor at a time (stacked
    layers are gathered layer by layer). Every process must iterate (sharded leaves are gathered)."""
    dtype = None if dtype is None else np.dtype(dtype)
    for rule in rules_for(cfg):
        leaf = _get(params, rule.path)
        if rule.stacked:
            for i in range(rule.stacked):
                yield published_key(cfg, rule.hf.format(i=i)), rule.to_hf(_host(leaf, dtype, layer=i))
        else:
            yield published_key(cfg, rule.hf), rule.to_hf(_host(leaf, dtype))


def published_key(cfg: Qwen2VLConfig, key: str) -> str:
    """A rule's key (`visual.*`, `model.*`, `lm_head.*`) as the family's published checkpoints write it."""
    names = HF_NAMES[cfg.family]
    for ours, theirs in (("visual.", names["visual"]), ("model.", names["llm"])):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class _ShardWriter:
    """One safetensors file written tensor by tensor: data goes to a side file as it comes, the header
    (which must come first and needs every offset) is written at the end, then the data is appended to it."""

    def __init__(self, path: str):
        self.path, self.entries, self.size = path, {}, 0
        self._data = open(path + ".data", "wb")

    def add(self, key: str, tensor: np.ndarray) -> None:
        tensor = np.ascontiguousarray(tensor)
        self.entries[key] = {"dtype": _ST_DTYPES[str(tensor.dtype)], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + tensor.nbytes]}
        try:
            self._data.write(tensor.tobytes())  # little-endian hosts (x86, ARM), as safetensors stores
        except OSError as e:
            self.discard()
            raise files.disk_full(self.path + ".data", tensor.nbytes) if files.is_disk_full(e) else e
        self.size += tensor.nbytes

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._data.close()
        with contextlib.suppress(OSError):
            os.remove(self.path + ".data")

    def finish(self, final: str, metadata: dict) -> None:
        try:
            self._data.close()
        except OSError as e:
            self.discard()
            raise files.disk_full(self.path + ".data") if files.is_disk_full(e) else e
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        try:  # the shard appears whole or not at all
            with files.atomic(final, self.size + len(header) + 8) as out, open(self.path + ".data", "rb") as data:
                out.write(len(header).to_bytes(8, "little") + header)
                shutil.copyfileobj(data, out, 64 * 1024 * 1024)
        finally:
            with contextlib.suppress(OSError):
                os.remove(self.path + ".data")


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """One safetensors file of `tensors`, whole or not at all (a full disk is one error)."""
    shard = _ShardWriter(os.path.join(os.path.dirname(path), "." + os.path.basename(path)))
    try:
        for key, tensor in tensors.items():
            shard.add(key, tensor)
        shard.finish(path, metadata)
    finally:
        shard.discard()


def save_hf_checkpoint(
    params: dict,
    cfg: Qwen2VLConfig,
    path: str,
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 1024**3,
    assets_from: str | None = None,
    chat_template: str | None = None,
    side_files: dict | None = None,
) -> list[str]:
    """Write the published layout: config.json, model.safetensors or model-0000k-of-0000n + index.

    `dtype`: the stored dtype (None keeps the parameters' own; published Qwen2-VL checkpoints are
    bfloat16). Streams tensor by tensor: the host never holds more than one tensor. Only process 0 writes
    (every process takes part in gathering sharded leaves). Tokenizer, chat template and processor files
    are copied from `assets_from` when given (`chat_template` overrides the template); returns their names.
    `side_files`: {name: JSON value} written beside the weights. config.json is written last.
    """
    if cfg.vocab_ids is not None:
        raise ConfigError(f"{path}: the model has a compact vocabulary ({len(cfg.vocab_ids)} of the tokenizer's ids); "
                          "a Hugging Face Qwen2-VL checkpoint holds the full vocabulary, so it cannot be exported")
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    shards: list[_ShardWriter] = []
    stored = None
    try:
        for key, tensor in iter_hf_tensors(cfg, params, dtype):
            stored = stored or tensor.dtype
            if not writer:
                continue
            if not shards or (shards[-1].size and shards[-1].size + tensor.nbytes > max_shard_bytes):
                shards.append(_ShardWriter(os.path.join(path, f".shard{len(shards)}")))
            shards[-1].add(key, tensor)
        if not writer:
            return []
        meta = {"format": "pt"}
        if len(shards) == 1:
            shards[0].finish(os.path.join(path, "model.safetensors"), meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                shard.finish(os.path.join(path, name), meta)
                weight_map.update({k: name for k in shard.entries})
            files.write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": sum(s.size for s in shards)},
                                                              "weight_map": weight_map})
    except files.DiskFull:  # said for the whole export: where, what is free there, what it takes
        raise files.disk_full(path, sum(x.size * np.dtype(dtype or x.dtype).itemsize
                                        for x in jax.tree.leaves(params))) from None
    finally:  # a failed export leaves no side files (what was finished is whole, and rewritten by a rerun)
        for shard in shards:
            shard.discard()
    copied = copy_assets(assets_from, path, chat_template) if assets_from or chat_template else []
    if processor.write(path, cfg) and processor.FILE not in copied:  # how its pixels are made travels with it
        copied.append(processor.FILE)
    write_side_files(path, side_files)
    hf_config = cfg.to_hf_dict()
    hf_config["torch_dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(stored), "float32")
    files.write_json(os.path.join(path, "config.json"), hf_config)  # last: a directory without it is no model
    return copied


def write_side_files(path: str, side_files: dict | None) -> None:
    for name, value in (side_files or {}).items():
        files.write_json(os.path.join(path, name), value, indent=1)


def copy_assets(src: str | None, dst: str, chat_template: str | None = None) -> list[str]:
    """Copy tokenizer / chat template / processor files from `src`; `chat_template` (the template a run
    used) is written as chat_template.jinja, which transformers prefers over tokenizer_config.json's.
    Returns the names written."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    same = src and os.path.abspath(src) == os.path.abspath(dst)
    for name in ASSET_FILES if src and not same else ():
        if os.path.isfile(os.path.join(src, name)):
            files.copy_file(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    if chat_template:
        files.write_text(os.path.join(dst, "chat_template.jinja"), chat_template)
        copied.append("chat_template.jinja")
    return copied


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
