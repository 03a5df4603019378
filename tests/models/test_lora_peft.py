"""LoRA adapters written in PEFT's format (`clinkd_jax.peft_adapters`) load onto transformers' model of each family
with `peft` (`PeftModel.from_pretrained`) and compute what our adapted model computes: logits within 1e-4 (float32,
the parity tests' tolerance) and the same greedy tokens, with adapters on the LLM, the vision tower and the
mergers; and an adapter peft made is read and folded into our model with the same logits."""

import jax
import numpy as np
import pytest
import reference as R

from clinkd_jax import peft_adapters
from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.infer import generate as G
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models import lora as lora_lib

pytestmark = pytest.mark.torch
ATOL = 1e-4
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=(lora_lib.LLM, lora_lib.VISION, lora_lib.MERGER))


def trained_adapters(model, seed=1):
    """Adapters as training leaves them: A and B both away from their init, large enough to move the logits."""
    adapters = lora_lib.init_adapters(lora_lib.adapted(model, LORA), jax.random.key(seed), None)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


@pytest.mark.parametrize("name", ["gqa2_untied", "q25_win56_gqa2", "q3_ds2_gqa2"])  # the three families
def test_peft_loads_our_adapters_onto_transformers_and_computes_what_we_do(name, tmp_path):
    from peft import PeftModel

    cfg, base = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    adapters = trained_adapters(Qwen2VL(cfg))
    modules = peft_adapters.save_peft(str(tmp_path), cfg, adapters, LORA, f"{R.GOLDEN}/{name}")
    assert any(".visual.merger." in m for m in modules) and any(".visual.blocks." in m for m in modules)

    inputs, _ = R.load_golden(name)
    x = R.jax_inputs(inputs)[0]
    adapted = lora_lib.adapted(Qwen2VL(cfg), LORA)
    ours = np.asarray(jax.jit(adapted.apply)({"params": lora_lib.merge(base, adapters)}, **x)["logits"])
    plain = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": base}, **x)["logits"])

    model = R.hf_model_class(name).from_pretrained(f"{R.GOLDEN}/{name}", attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(model, str(tmp_path)).eval()
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == len(modules)  # every adapter loaded
    theirs = R.hf_outputs(peft_model.base_model.model, inputs)["logits"]
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(ours - plain)[valid].max() > 0.1  # the adapters change the answer: the comparison means something
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL, rtol=0)

    # the same greedy answers: transformers' generate on peft's model, ours on the folded weights (a run's export)
    prompts = R.generation_prompts(patch=R.patch_size(name))
    their_tokens = R.hf_generate(peft_model.base_model.model, prompts, R.GEN_NEW_TOKENS, eos_token_id=255)
    sampling = G.SamplingConfig(max_new_tokens=R.GEN_NEW_TOKENS, stop_token_ids=(255,), pad_token_id=0)
    folded = lora_lib.fold(lora_lib.merge(base, adapters), LORA)
    our_tokens = np.asarray(G.Generator(Qwen2VL(cfg), folded)(R.jax_generation_batch(prompts), sampling))
    np.testing.assert_array_equal(our_tokens[:, : their_tokens.shape[1]], their_tokens)
    with peft_model.disable_adapter():  # and without the adapters the answers differ
        assert (R.hf_generate(peft_model.base_model.model, prompts, R.GEN_NEW_TOKENS, eos_token_id=255)
                != their_tokens).any()


@pytest.mark.parametrize("name", ["gqa2_untied", "q25_win56_gqa2", "q3_ds2_gqa2"])
def test_an_adapter_made_by_peft_is_read_and_folded_into_our_model(name, tmp_path):
    """peft's own adapter (LoRA on some LLM projections and the vision tower's qkv; saved by save_pretrained):
    `lora.adapter_dir` reads it and our model with it folded in computes what peft's model computes."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = R.hf_model_class(name).from_pretrained(f"{R.GOLDEN}/{name}", attn_implementation="eager").eval()
    targets = r".*language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)|.*visual\.blocks\.\d+\.attn\.qkv"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B away from its zero init, so that the adapter changes the logits
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(tmp_path))
    inputs, _ = R.load_golden(name)
    theirs = R.hf_outputs(peft_model.base_model.model, inputs)["logits"]

    cfg, base = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    lora, adapters = peft_adapters.load_peft(str(tmp_path), cfg)
    assert lora.rank == 4 and lora.alpha == 8 and len(lora.targets) == 4
    x = R.jax_inputs(inputs)[0]
    ours = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": lora_lib.fold(lora_lib.merge(base, adapters), lora)},
                                                  **x)["logits"])
    plain = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": base}, **x)["logits"])
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(ours - plain)[valid].max() > 0.1
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL, rtol=0)
