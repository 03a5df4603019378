"""The embedded demo, the README's main job: the ClinKD recipe end to end on the bundled demo data, on
a laptop CPU in minutes.

    teacher        SFT of a small model (real Qwen2 tokenizer and vocabulary) from scratch; grounding and naming
                   evaluated every 500 steps (teacher/eval_curve.jsonl)
    kd             ClinKD distillation into a smaller student with MCG-RoPE (gaps 2/2), α = 0.5, T = 0.5
    sft            supervised fine-tuning of the student (from the kd stage's params) with Reflective Correction
                   Training: two rounds inside the run, the teacher correcting the student's flagged answers
    eval_untrained the student's geometry with random weights: the floor
    eval_teacher / eval_student
                   BiRD/ClinKD protocol on the demo test files (scaled-down pixel budget), tables + gallery

The demo's labels are synthetic (one drawn marker per real image); it proves the machinery, not medicine.
`--config.seed=N` changes every initialisation and the data order, not the data; docs/demo.md: figures over seeds.
"""

from ml_collections import ConfigDict

from configs import demo_eval, demo_train

TEACHER = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
           "mrope_section": (4, 6, 6)}
STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def get_config():
    c = demo_train.get_config()  # tiny_qwen, float32, demo data and buckets, 1 device
    c.model.text_overrides = STUDENT
    c.model.compact_vocab = "data"  # the LM head over the demo's few hundred token ids, not 151,936 (CPU speed)
    c.teacher.dtype = "float32"
    c.data.num_epochs = 0  # stage lengths are set in steps below
    c.data.demo_train_per_image = 40  # 320 training conversations, 32 test items per task
    c.data.demo_test_per_image = 4
    c.optim.frozen = ()  # nothing here is pretrained: the vision tower learns too (the paper freezes a pretrained one)
    c.optim.warmup_steps = 5
    c.train.log_every = 5
    c.checkpoint.save_every = 50
    demo_eval.demo_eval_settings(c)
    c.eval.max_new_tokens = c.eval.max_new_tokens_mii = 40

    c.rct.num_items = 32
    c.rct.samples = 2
    c.rct.max_new_tokens = 40
    c.stages = ("teacher", "kd", "sft", "eval_untrained", "eval_teacher", "eval_student")
    c.stage_settings = ConfigDict({
        # grounding and naming evaluated every 500 steps while it trains: the curve in teacher/eval_curve.jsonl
        "teacher": {"stage": "sft", "model": {"text_overrides": TEACHER}, "train": {"steps": 2000},
                    "eval": {"every_steps": 500, "tasks": ("VG", "RO")}},
        # fresh student
        "kd": {"stage": "kd", "teacher_from": "teacher", "model": {"preset": "tiny_qwen"}, "train": {"steps": 1200}},
        # SFT with RCT: a round after 120 and after 240 steps, the teacher correcting the student's answers
        "sft": {"stage": "sft", "teacher_from": "teacher", "train": {"steps": 360}, "optim": {"learning_rate": 1e-3},
                "rct": {"every_steps": 120, "rounds": 2}},
        "eval_untrained": {"stage": "eval", "model": {"preset": "tiny_qwen"}},
        "eval_teacher": {"stage": "eval", "model_from": "teacher"},
        "eval_student": {"stage": "eval", "model_from": "sft"},
    })
    return c
