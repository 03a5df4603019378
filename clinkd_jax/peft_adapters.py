"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), which `peft` loads onto
transformers' model of the family (`PeftModel.from_pretrained`).

PEFT's LoRA on a Linear y = x W^T is y + (x A^T) B^T * alpha / r, with lora_A (r, in) and lora_B (out, r); ours
(`clinkd_jax.models.lora`) is y + (x A) B * alpha / r on the kernel flattened to (in, out), so lora_A = A^T and
lora_B = B^T when the kernel's Hugging Face layout is that flattening transposed: `hf_checkpoint.rules_for`'s
transform is checked to say so on each adapted weight. Keys name the modules as transformers 5 builds every
family (`model.language_model.layers.N...`, `model.visual.blocks.N...`), whatever its published checkpoints call
them.
"""

from __future__ import annotations

import json
import os
import re

import flax
import jax
import numpy as np

from clinkd_jax import files, hf_checkpoint
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models.config import ConfigError, Qwen2VLConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULES = (("model.", "model.language_model."), ("visual.", "model.visual."))  # rule keys -> transformers 5


def module_name(rule_key: str) -> str:
    """transformers' module path of a rule's weight key ("model.layers.0.self_attn.q_proj.weight" ->
    "model.language_model.layers.0.self_attn.q_proj")."""
    name = rule_key.removesuffix(".weight")
    for ours, theirs in MODULES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def adapter_tensors(cfg: Qwen2VLConfig, adapters) -> dict[str, np.ndarray]:
    """{PEFT key: host array} of `adapters` (`lora.split`'s second part) on a model of geometry `cfg`."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(adapters))
    out = {}
    for rule in hf_checkpoint.rules_for(cfg):
        if rule.path[-1] != "kernel" or (*rule.path[:-1], "kernel_lora_a") not in flat:
            continue
        a, b = (flat[(*rule.path[:-1], f"kernel_lora_{x}")] for x in "ab")
        for i in range(rule.stacked) if rule.stacked else (None,):
            a_i, b_i = (hf_checkpoint._host(x, np.float32, layer=i) for x in (a, b))
            weight = rule.to_hf(a_i @ b_i)  # the update as the Hugging Face weight lays it out
            if weight.shape != (b_i.shape[1], a_i.shape[0]) or not np.allclose(weight, b_i.T @ a_i.T, atol=1e-6):
                raise ConfigError(f"lora.targets: the adapter on {'/'.join(rule.path[:-1])} has no PEFT Linear form "
                                  "(its Hugging Face weight is not the kernel flattened and transposed)")
            name = module_name(rule.hf.format(i=i) if rule.stacked else rule.hf)
            out[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            out[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    return out


def save_peft(path: str, cfg: Qwen2VLConfig, adapters, lora, base: str) -> list[str]:
    """`path`/adapter_config.json and adapter_model.safetensors (float32) for `adapters` trained with `lora`
    (`models.lora.LoraConfig`) on the model `base` names; returns the adapted module names. Every process calls
    it (sharded adapters are gathered)."""
    tensors = adapter_tensors(cfg, adapters)  # every process gathers; process 0 writes
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    if not tensors:
        raise ConfigError("lora: no adapter to export")
    if jax.process_index() != 0:
        return modules
    os.makedirs(path, exist_ok=True)
    hf_checkpoint.write_safetensors(os.path.join(path, WEIGHTS), tensors, {"format": "pt"})
    files.write_json(os.path.join(path, CONFIG), {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}}, indent=1)
    return modules


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"lora.adapter_dir={path!r}: no readable {CONFIG} ({e})") from None


def load_peft(path: str, cfg: Qwen2VLConfig):
    """(LoraConfig, adapters) of the PEFT LoRA adapter in `path` (made here or by `peft`) for a model of geometry
    `cfg`: lora_A^T and lora_B^T as our A and B, stacked over the layers (a layer the adapter leaves out gets
    zeros: no update). What this reading cannot represent is refused by name."""
    from safetensors.numpy import load_file

    conf = read_config(path)
    for key, ok in (("peft_type", conf.get("peft_type") == "LORA"), ("use_rslora", not conf.get("use_rslora")),
                    ("use_dora", not conf.get("use_dora")), ("rank_pattern", not conf.get("rank_pattern")),
                    ("alpha_pattern", not conf.get("alpha_pattern"))):
        if not ok:
            raise ConfigError(f"lora.adapter_dir={path!r}: {CONFIG} has {key}={conf.get(key)!r}; only plain LoRA "
                              "adapters (one rank and alpha, no rsLoRA or DoRA) are read")
    import ml_dtypes  # noqa: F401  (numpy reads bfloat16 tensors through it)

    try:
        raw = load_file(os.path.join(path, WEIGHTS))
    except Exception as e:  # missing, cut short, not safetensors
        raise ConfigError(f"lora.adapter_dir={path!r}: {WEIGHTS} cannot be read ({e})") from None
    left = {k.removeprefix("base_model.model.").replace(".default.", "."): v.astype(np.float32)
            for k, v in raw.items()}
    r = int(conf["r"])
    adapters, targets = {}, []
    for rule in hf_checkpoint.rules_for(cfg):
        if rule.path[-1] != "kernel":
            continue
        layers = range(rule.stacked) if rule.stacked else (None,)
        pairs = []
        for i in layers:
            key = rule.hf.format(i=i) if rule.stacked else rule.hf
            # transformers 5's module name, else the published key's (adapters made on transformers 4, where
            # Qwen2-VL's modules were `model.layers...` / `visual...`)
            names = module_name(key), hf_checkpoint.published_key(cfg, key).removesuffix(".weight")
            name = next((n for n in names if f"{n}.lora_A.weight" in left), None)
            pairs.append(None if name is None else (left.pop(f"{name}.lora_A.weight").T,
                                                     left.pop(f"{name}.lora_B.weight").T))
        if not any(pairs):
            continue
        a_shape, b_shape = next(p for p in pairs if p)[0].shape, next(p for p in pairs if p)[1].shape
        pairs = [p or (np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)) for p in pairs]
        for a, b in pairs:
            if a.shape[1] != r or rule.to_hf(a @ b).shape != (b.shape[1], a.shape[0]):
                raise ConfigError(f"lora.adapter_dir={path!r}: the adapter on {'/'.join(rule.path[:-1])} does not "
                                  "fit this model's layer (another model, or not a Linear of rank r)")
        a, b = (np.stack(x) if rule.stacked else x[0] for x in zip(*pairs))
        node = adapters
        for part in rule.path[:-1]:
            node = node.setdefault(part, {})
        node["kernel_lora_a"], node["kernel_lora_b"] = a, b
        targets.append(re.escape("/".join(rule.path[:-1])))
    if left:
        raise ConfigError(f"lora.adapter_dir={path!r}: adapters on modules this model has no Linear for: "
                          f"{sorted({k.rsplit('.lora_', 1)[0] for k in left})[:5]}")
    if not targets:
        raise ConfigError(f"lora.adapter_dir={path!r}: {WEIGHTS} holds no LoRA weights")
    return lora_lib.LoraConfig(r, float(conf["lora_alpha"]), tuple(targets)), adapters
