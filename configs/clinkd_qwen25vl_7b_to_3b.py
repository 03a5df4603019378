"""ClinKD on Qwen2.5-VL: a Qwen2.5-VL-7B teacher distilled into Qwen2.5-VL-3B-Instruct, the paper's recipe
otherwise (`clinkd_qwen2vl_7b`: MCG-RoPE gaps 2/2, α = 0.5, T = 0.5, cutoff 2048, KD -> SFT -> RCT -> SFT -> eval).

The family comes from each checkpoint's config.json (model_type "qwen2_5_vl"): window attention in the vision
tower, RMSNorm and gated MLPs there; the LLM, positions, image processor and chat template are Qwen2-VL's. The
7B vocabulary (152064 rows) is wider than the 3B one (151936): the teacher's logits are cut to the student's,
as in the released code. A Qwen2-VL teacher works too (same tokenizer): set teacher.hf_dir to it.

Paths are placeholders: set them on the command line (see `clinkd_qwen2vl_7b`), e.g.
    --config.model.hf_dir=/ckpt/Qwen2.5-VL-3B-Instruct --config.teacher.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct
Boxes are trained and scored as Med-GRIT writes them (0-1000 integers between box tokens), not in Qwen2.5-VL's
own absolute-pixel grounding format: the base model learns the Med-GRIT markup during KD and SFT.
"""

from configs import clinkd_qwen2vl_7b


def get_config():
    c = clinkd_qwen2vl_7b.get_config()
    c.model.hf_dir = "/ckpt/Qwen2.5-VL-3B-Instruct"
    c.teacher.hf_dir = "/ckpt/Qwen2.5-VL-7B-Instruct"  # ideally fine-tuned on Med-GRIT first
    c.model.family = "qwen2_5_vl"  # checked against both checkpoints' config.json before anything is loaded
    # full remat: the KD step then fits 16 rows per chip on a v5p-8 with room to spare; remat none was not compiled.
    # `python -m clinkd_jax.aot` says what fits elsewhere
    c.model.remat = "full"
    return c
