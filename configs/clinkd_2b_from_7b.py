"""ClinKD with a Qwen2-VL-7B teacher and a Qwen2-VL-2B student (the paper's recipe otherwise). The 7B
vocabulary (152064) is wider than the 2B one (151936): teacher logits are cut to the student's width, as
in the released code (clinkd-spec §2.2)."""

from configs import clinkd_qwen2vl_7b


def get_config():
    c = clinkd_qwen2vl_7b.get_config()
    c.model.hf_dir = "/ckpt/Qwen2-VL-2B-Instruct"
    c.teacher.hf_dir = "/ckpt/Qwen2-VL-7B-Instruct"  # ideally fine-tuned on Med-GRIT first
    # No remat: on a v5p-8 the KD step fits 16 rows per chip without it, and full remat was not estimated faster
    # (bench/README.md, TPU table). Splash from the 7B config. On 16-32 GiB chips (v4, v5e, v6e) set
    # model.remat=full: without it only 2-4 rows per chip fit, with it 16 (bench/history.md).
    c.model.remat = "none"
    return c
