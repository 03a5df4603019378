"""The demo's ablation, as a research ablation is run: one teacher, then the same student trained four ways
from the same initialisation and data order, each evaluated with the positions it was trained with, and one
table side by side.

    clinkd        ClinKD distillation with MCG-RoPE gaps 2/2 (the method)
    no_mcg        the same distillation with plain Qwen2-VL positions, gaps 1/1
    no_kd         supervised fine-tuning only (cross-entropy), gaps 2/2
    neither       supervised fine-tuning only, gaps 1/1 (plain Qwen2-VL training)

    python -m clinkd_jax.main --config=configs/demo_ablation.py --workdir=/tmp/ablation [--config.seed=1]

Reflective Correction Training is left out of every arm (it is the demo's third stage, configs/demo.py):
the table isolates the two training-side components. Demo scale: differences smaller than the spread over
seeds (docs/demo.md, docs/recipe.md) say nothing.
"""

from ml_collections import ConfigDict

from configs import demo

STUDENT_STEPS = 800  # per arm (the demo's kd stage has 1200): four arms and the teacher within ~15 min on 2 cores
ARMS = {  # name: (training stage kind, MCG-RoPE gaps)
    "clinkd": ("kd", (2, 2)),
    "no_mcg": ("kd", (1, 1)),
    "no_kd": ("sft", (2, 2)),
    "neither": ("sft", (1, 1)),
}


def get_config():
    c = demo.get_config()
    settings = {"teacher": c.stage_settings.teacher.to_dict()}
    for name, (kind, gaps) in ARMS.items():
        arm = {"stage": kind, "model": {"preset": "tiny_qwen"}, "train": {"steps": STUDENT_STEPS},
               "data": {"mrope_gaps": gaps}}
        if kind == "kd":
            arm["teacher_from"] = "teacher"
        settings[name] = arm
    for name, (_, gaps) in ARMS.items():  # evaluated with the positions the arm was trained with
        settings[f"eval_{name}"] = {"stage": "eval", "model_from": name, "data": {"mrope_gaps": gaps}}
    c.stages = ("teacher", *ARMS, *(f"eval_{name}" for name in ARMS))
    c.stage_settings = ConfigDict(settings)
    return c
