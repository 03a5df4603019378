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

import flax
import jax
import numpy as np

from clinkd_jax import files, hf_checkpoint
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
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)
