"""The demo's ablation, as a research ablation is run: one teacher, then the same student trained six ways
from the same initialisation and data order, each evaluated with the positions it was trained with, and one
table side by side.

    clinkd        ClinKD distillation with MCG-RoPE gaps 2/2 (the method)
    no_mcg        the same distillation with plain Qwen2-VL positions, gaps 1/1
    no_kd         supervised fine-tuning only (cross-entropy), gaps 2/2
    neither       supervised fine-tuning only, gaps 1/1 (plain Qwen2-VL training)
    gkd_half      on-policy distillation (GKD) on half of the steps, gaps 2/2: there the student answers the
                  questions itself and learns the teacher's judgement of every token (JSD, beta 0.5); the other
                  steps are ClinKD's KD with the same divergence
    gkd_all       on-policy on every step (the student never reads the data's answers)

    python -m clinkd_jax.main --config=configs/demo_ablation.py --workdir=/tmp/ablation [--config.seed=1]

Reflective Correction Training is left out of every arm (it is the demo's third stage, configs/demo.py):
the table isolates the two training-side components. Demo scale: differences smaller than the spread over
seeds (docs/demo.md, docs/recipe.md) say nothing.
"""

from ml_collections import ConfigDict

from configs import demo

STUDENT_STEPS = 800  # per arm (the demo's kd stage has 1200)
# on-policy arms: answers sampled at temperature 1 up to the demo evaluation's 40 tokens, GKD's JSD with beta 0.5
GKD = {"divergence": "jsd", "jsd_beta": 0.5, "max_new_tokens": 40}
ARMS = {  # name: (training stage kind, MCG-RoPE gaps, kd settings)
    "clinkd": ("kd", (2, 2), {}),
    "no_mcg": ("kd", (1, 1), {}),
    "no_kd": ("sft", (2, 2), {}),
    "neither": ("sft", (1, 1), {}),
    "gkd_half": ("kd", (2, 2), {"on_policy_fraction": 0.5, **GKD}),
    "gkd_all": ("kd", (2, 2), {"on_policy_fraction": 1.0, **GKD}),
}


def get_config():
    c = demo.get_config()
    settings = {"teacher": c.stage_settings.teacher.to_dict()}
    for name, (kind, gaps, kd) in ARMS.items():
        arm = {"stage": kind, "model": {"preset": "tiny_qwen"}, "train": {"steps": STUDENT_STEPS},
               "data": {"mrope_gaps": gaps}}
        if kind == "kd":
            arm["teacher_from"] = "teacher"
        if kd:
            arm["kd"] = kd
        settings[name] = arm
    for name, (_, gaps, _) in ARMS.items():  # evaluated with the positions the arm was trained with
        settings[f"eval_{name}"] = {"stage": "eval", "model_from": name, "data": {"mrope_gaps": gaps}}
    c.stages = ("teacher", *ARMS, *(f"eval_{name}" for name in ARMS))
    c.stage_settings = ConfigDict(settings)
    return c
