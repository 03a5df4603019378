"""configs/clinkd_2b_from_7b.py with on-policy distillation (GKD, Agarwal et al. 2024) in its kd stage: on half of
the steps the 2B student answers the training questions itself (sampled at temperature 1, up to 80 tokens) and the
7B teacher scores every token of those answers in the same step; the loss there is GKD's generalised Jensen-Shannon
divergence (beta 0.5) alone. The other half are ClinKD's distillation steps on the data's answers, with the same
divergence in place of the forward KL (and the cross-entropy term as ClinKD has it). What each setting does:
docs/recipe.md, "On-policy distillation". The sft, rct and eval stages are the paper's."""

from configs import clinkd_2b_from_7b


def get_config():
    c = clinkd_2b_from_7b.get_config()
    c.stage_settings.kd.kd = {"on_policy_fraction": 0.5, "divergence": "jsd", "jsd_beta": 0.5,
                              "sample_temperature": 1.0, "sample_top_p": 1.0, "max_new_tokens": 80}
    return c
