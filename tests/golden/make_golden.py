"""Golden reference files from transformers' PyTorch Qwen2-VL / Qwen2.5-VL / Qwen3-VL (needs torch; Python 3.11).

    python tests/golden/make_golden.py                   # rewrites tests/golden/<config>/ and inputs.npz
    python tests/golden/make_golden.py q25_win56_gqa2    # only the named configs (inputs.npz is kept)

For each tiny random config in `reference.CONFIGS` it writes the checkpoint directory exactly as
`save_pretrained` does (config.json + model.safetensors, published key layout) and `outputs.npz`:
logits of the full model, the vision tower and merger outputs, and `get_rope_index` results for the
shared batch in `inputs.npz`; `generate.npz`: greedy `generate` tokens for `reference.generation_prompts()`.
The Python 3.12 run (no torch) checks our model against these files; the Python 3.11 run also
recomputes them live and checks they are still what transformers gives.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for `reference`

import reference  # noqa: E402


def main(names: list[str]):
    batch = reference.make_batch()
    if not names:
        np.savez_compressed(os.path.join(HERE, "inputs.npz"), **batch)
    for name in names or reference.CONFIGS:
        out_dir = os.path.join(HERE, name)
        model = reference.build_hf_model(name, seed=0)
        model.save_pretrained(out_dir, safe_serialization=True)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(out_dir, extra)):
                os.remove(os.path.join(out_dir, extra))
        own = reference.patch_size(name) != 14  # another patch width: its own inputs, beside its outputs
        if own:
            np.savez_compressed(os.path.join(out_dir, "inputs.npz"), **reference.make_batch(patch=16))
        outputs = reference.hf_outputs(model, reference.make_batch(patch=16) if own else batch)
        np.savez_compressed(os.path.join(out_dir, "outputs.npz"), **outputs)
        np.savez_compressed(os.path.join(out_dir, "generate.npz"), **reference.hf_generation_reference(model))
        size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
        print(f"{name}: {size / 1e6:.2f} MB, logits {outputs['logits'].shape}")


if __name__ == "__main__":
    main(sys.argv[1:])
