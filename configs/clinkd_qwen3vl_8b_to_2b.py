"""ClinKD on Qwen3-VL: a Qwen3-VL-8B teacher distilled into Qwen3-VL-2B-Instruct, the paper's recipe otherwise
(`clinkd_qwen2vl_7b`: MCG-RoPE gaps 2/2, α = 0.5, T = 0.5, cutoff 2048, KD -> SFT -> RCT -> SFT -> eval).

The family comes from each checkpoint's config.json (model_type "qwen3_vl"): 16 px patches normalised to [-1, 1]
(so the pixel budget covers 4/3 as many pixels per merged token as Qwen2-VL's 14 px patches), the learned
position table, DeepStack, the Qwen3 LLM. Both sizes share the 151936-row vocabulary. The teacher must be a
Qwen3-VL as well: a Qwen2-VL or Qwen2.5-VL teacher reads other patches and is refused by name.

Paths are placeholders: set them on the command line (see `clinkd_qwen2vl_7b`), e.g.
    --config.model.hf_dir=/ckpt/Qwen3-VL-2B-Instruct --config.teacher.hf_dir=/ckpt/Qwen3-VL-8B-Instruct
Boxes are trained and scored as Med-GRIT writes them (0-1000 integers between box tokens) by default;
`--config.data.box_markup=json` uses Qwen3-VL's own grounding format (the same 0-1000 corners as
{"bbox_2d": [...], "label": ...}), which the base model already writes. The chat template is Qwen3-VL's (no default
system turn).
"""

from configs import clinkd_qwen2vl_7b


def get_config():
    c = clinkd_qwen2vl_7b.get_config()
    c.model.hf_dir = "/ckpt/Qwen3-VL-2B-Instruct"
    c.teacher.hf_dir = "/ckpt/Qwen3-VL-8B-Instruct"  # ideally fine-tuned on Med-GRIT first
    c.model.family = "qwen3_vl"  # checked against both checkpoints' config.json before anything is loaded
    c.data.chat_template = "qwen3vl"
    # remat none as in clinkd_2b_from_7b: on a v5p-8 the KD step with the 8B teacher fits 8 rows per chip without it
    # (`python -m clinkd_jax.aot` for other slices)
    c.model.remat = "none"
    return c
