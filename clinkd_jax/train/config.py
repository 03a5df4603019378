"""A training stage's sections (optim, train, kd, rct, checkpoint), declared with their defaults and what each
field accepts (`clinkd_jax.settings`), and the stage's checks: every inconsistency is reported before anything is
compiled, naming the field."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Literal

import jax
import numpy as np

from clinkd_jax import settings
from clinkd_jax.models.config import ConfigError
from clinkd_jax.settings import DTYPE, AtLeast, IsDType, Within
from clinkd_jax.train import losses
from clinkd_jax.train import state as state_lib

log = logging.getLogger("clinkd_jax.train")


@dataclasses.dataclass(frozen=True)
class Optim:
    """The optimizer (ClinKD SFT: AdamW, lr 5e-5 cosine, no warmup, clip 1.0, wd 0, accumulation 8)."""

    learning_rate: float = 5e-5
    schedule: Literal[state_lib.SCHEDULES] = "cosine"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: Annotated[int, AtLeast(1)] = 8
    # AdamW first moment's dtype: "" = float32 like the master weights | "bfloat16" (-2 B/param)
    mu_dtype: Annotated[str, IsDType(empty_ok=True)] = ""
    frozen: tuple = ("visual/.*",)  # vision tower + merger frozen (clinkd-spec §1.4)


@dataclasses.dataclass(frozen=True)
class Train:
    """The loop."""

    steps: int = -1  # micro-steps; -1 = until the data's epochs are done
    total_steps_hint: int = 10000  # schedule length when steps = -1 (optimizer updates)
    loss_chunk: Annotated[int, AtLeast(1, "must be > 0")] = 256  # sequence positions per LM-head chunk (losses)
    # "fused": the loss's gradient is computed chunk by chunk in its forward pass (no logits kept or recomputed)
    # | "autodiff": JAX differentiates the chunk loop, keeping each scored chunk's logits (a reference)
    loss_backward: Literal[losses.LOSS_BACKWARDS] = "fused"
    log_every: int = 10
    progress: bool = True
    # Weights & Biases (clinkd_jax.tracking; pip install 'clinkd_jax[wandb]'): a project name logs every stage there
    wandb_project: str = ""
    wandb_entity: str = ""  # the team or user; "" = the logged-in account's default
    wandb_run_name: str = ""  # the W&B group of this run's stages; "" = the workdir's name and a random suffix
    wandb_tags: tuple = ()


@dataclasses.dataclass(frozen=True)
class KD:
    """The distillation loss (clinkd-spec §2.2 / §6); defaults reproduce the released code."""

    alpha: float = 0.5
    temperature: float = 0.5
    # released (unshifted labels: no KL on the prediction of an answer's first token) | aligned. At demo scale
    # the released mask cost KD students first-token decisions (task, object name); docs/recipe.md, the demo ablation
    mask: Literal[losses.KD_MASKS] = "released"
    reduction: Literal[losses.KD_REDUCTIONS] = "sum"  # sum: released
    # forward_kl: KL(teacher||student), ClinKD's | reverse_kl: KL(student||teacher) | jsd: GKD's generalised
    # Jensen-Shannon divergence with jsd_beta (losses.divergence); "forward" and "reverse", the earlier names, still
    # read. On a pseudo-label store the reverse KL and the JSD also weigh the mass outside the top k (one bucket)
    divergence: Literal[losses.KD_DIVERGENCES + tuple(losses.LEGACY_DIVERGENCES)] = "forward_kl"
    jsd_beta: Annotated[float, Within(0, 1)] = 0.5  # the teacher's weight: 0 = forward KL, 1 = reverse KL (TRL's)
    use_ce: bool = True  # False: L = L_KD only
    # rows whose loss is computed together: the released per-device micro-batch (2; DDP averaged the devices'
    # losses), so the loss does not change with the data-parallel width; 0 = one sum over the whole global batch
    sum_rows: int = 2
    # per-token KD weights w_t (clinkd-spec §2.4): "" = 1 (released) | "module:function" computing them from the
    # teacher's and student's log-probabilities in each loss chunk, e.g. clinkd_jax.train.losses:confidence_margin
    token_weights: str = ""
    pseudo_labels: str = ""  # a pseudo-label store (python -m clinkd_jax.train.pseudo_labels): no teacher forward
    top_k: int = 64  # entries per token when writing pseudo-labels
    # On-policy distillation (GKD, clinkd_jax.train.on_policy): on this fraction of the steps, drawn from the seed and
    # the step, the student answers each row's question itself and the loss is kd.divergence alone on its answer,
    # scored by the teacher in the same step. 0 = ClinKD's KD on the data's answers only
    on_policy_fraction: Annotated[float, Within(0, 1)] = 0.0
    seq_kd: bool = False  # the other steps train on the teacher's sampled answers instead of the data's
    sample_temperature: Annotated[float, AtLeast(0)] = 1.0  # of those answers (GKD's; 0 = greedy)
    sample_top_p: Annotated[float, Within(0.01, 1)] = 1.0
    max_new_tokens: Annotated[int, AtLeast(1)] = 80  # answer length cap (ClinKD's evaluation's)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    save_every: int = 1000
    keep: int = 3
    async_save: bool = True
    export_hf: bool = False  # also write the final student in the Hugging Face layout (<workdir>/export_hf)
    export_dtype: DTYPE = "bfloat16"  # stored dtype of that export (published Qwen2-VL checkpoints are bf16)
    # True: a checkpoint step is final when it holds commit_success.txt instead of after a directory rename
    # (set it for a workdir on a gcsfuse mount, where renaming a directory copies it; launch/tpu.sh does)
    commit_files: bool = False
    save_params: bool = True  # also write the final params alone (<workdir>/params): a teacher.orbax_dir


@dataclasses.dataclass(frozen=True)
class RCT:
    """Reflective Correction Training (clinkd_jax.train.rct): rounds inside SFT (every_steps) or a stage "rct";
    corrector = teacher.* (else the model itself). Every constant here is ours: the paper gives none."""

    num_items: int = 256  # training exchanges the model answers per round (0 = all)
    threshold: float = 0.5  # text answers less similar than this to the reference are flagged
    similarity: str = "overlap"  # SASG similarity: overlap | rouge_l | box_iou | "module:function"
    samples: int = 4  # corrector candidates per flagged item (SASG picks the closest to the reference)
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 80
    batch_size: int = 8  # prompts per generate call
    hint: str = "\nReference answer: {reference}\nGive the answer in your own words, consistent with the reference."
    seed: int = 0
    every_steps: int = 0  # > 0: rounds inside an SFT run, after every this many steps (needs train.steps)
    rounds: int = 1  # with every_steps: how many rounds at most


SECTIONS = {"optim": Optim, "train": Train, "kd": KD, "checkpoint": Checkpoint, "rct": RCT}


def kd_config(c) -> losses.KDConfig:
    fields = {k: v for k, v in c.kd.to_dict().items() if k in losses.KDConfig.__dataclass_fields__}
    divergence = losses.LEGACY_DIVERGENCES.get(c.kd.divergence, c.kd.divergence)
    return losses.KDConfig(**{**fields, "divergence": divergence,
                              "token_weights": losses.resolve_token_weights(c.kd.token_weights)})


def pseudo_label_switches(c) -> None:
    """What a pseudo-label store cannot represent (it holds the teacher's top-k under the student's
    position ids), refused for the writer and for a run reading one."""
    if c.teacher.positions != "shared":
        raise ConfigError(f"teacher.positions={c.teacher.positions!r}: pseudo-labels are computed with the "
                          "student's position ids (teacher.positions=shared)")
    if c.kd.top_k < 1:
        raise ConfigError(f"kd.top_k={c.kd.top_k} must be >= 1")


def validate(c) -> None:
    """A training stage's config: the mesh on this host's devices, its settings (`check_settings`), then the files
    and checkpoints it names (`settings.check_files`)."""
    check_devices(c, jax.device_count())
    check_settings(c)
    settings.check_files(c, teacher="teacher", training=True)


def check_settings(c) -> None:
    """Every setting on its own and against the others; reads no file (`clinkd_jax.aot` checks with this)."""
    if c.stage not in ("sft", "kd", "rct"):
        raise ConfigError(f"stage={c.stage!r} is not one of ('sft', 'kd', 'rct', 'eval')")
    if c.stage == "kd":
        try:
            kd_config(c)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if c.kd.divergence in losses.LEGACY_DIVERGENCES:
            log.warning("kd.divergence=%r is read as %r, its name now", c.kd.divergence,
                        losses.LEGACY_DIVERGENCES[c.kd.divergence])
    _rct_in_run(c)
    _data_shapes(c)
    if len(c.mesh.shape) != 3:
        raise ConfigError(f"mesh.shape={tuple(c.mesh.shape)} must have 3 axes (data, fsdp, tensor)")
    cached = c.stage == "kd" and bool(c.kd.pseudo_labels)
    if cached:
        pseudo_label_switches(c)
    _sampled_answers(c)
    _quantised(c)
    settings.check(c, SECTIONS, teacher_required=c.stage == "kd" and not cached)


def _quantised(c) -> None:
    """A quantised model is a frozen one the train step reads: a LoRA base, the online teacher."""
    if c.lora.base_quant and not (c.lora.rank or c.lora.adapter_dir):
        raise ConfigError(f"lora.base_quant={c.lora.base_quant!r}: only a LoRA run's frozen base is quantised "
                          "(set lora.rank or lora.adapter_dir; full fine-tuning trains every weight)")
    if c.teacher.quant and (c.stage != "kd" or c.kd.pseudo_labels):
        raise ConfigError(f"teacher.quant={c.teacher.quant!r}: only stage 'kd''s online teacher is quantised "
                          f"(stage={c.stage!r}, kd.pseudo_labels={c.kd.pseudo_labels!r})")


def sampled_answers(c) -> bool:
    """Whether a stage trains on answers sampled in the step (on-policy, or the teacher's with kd.seq_kd)."""
    return c.stage == "kd" and (c.kd.on_policy_fraction > 0 or c.kd.seq_kd)


def _sampled_answers(c) -> None:
    """What sampling answers in the step cannot work with."""
    if not sampled_answers(c):
        return
    what = f"kd.on_policy_fraction={c.kd.on_policy_fraction}" if c.kd.on_policy_fraction else "kd.seq_kd=True"
    if c.kd.pseudo_labels:
        raise ConfigError(f"{what}: the teacher must score answers written in the step; kd.pseudo_labels holds "
                          "scores of the data's answers only (unset it to run the teacher online)")
    if c.data.pack:
        raise ConfigError(f"{what}: a sampled answer replaces a row's answer, and a packed row holds several "
                          "conversations (set data.pack=False)")
    if c.lora.rank or c.lora.adapter_dir:
        raise ConfigError(f"{what}: sampling answers in the step does not run a LoRA student yet (lora.rank="
                          f"{c.lora.rank}); distil off-policy (kd.on_policy_fraction=0, kd.seq_kd=False) or fully")


def _rct_in_run(c) -> None:
    if c.rct.every_steps > 0:
        if c.stage != "sft":
            raise ConfigError(f"rct.every_steps={c.rct.every_steps}: RCT rounds run inside SFT (stage 'sft'), "
                              f"not {c.stage!r}")
        if c.train.steps <= 0:
            raise ConfigError("rct.every_steps needs train.steps > 0 (rounds change the pool, so epochs do not say "
                              "when to stop)")
        if c.rct.rounds < 1:
            raise ConfigError(f"rct.rounds={c.rct.rounds} must be >= 1")


def _data_shapes(c) -> None:
    d = c.data
    for key in ("text_buckets", "patch_buckets"):
        b = list(d[key])
        if not b or b != sorted(set(b)) or b[0] <= 0:
            raise ConfigError(f"data.{key}={tuple(b)} must be increasing positive lengths")
    if any(n % 4 for n in d.patch_buckets):
        raise ConfigError(f"data.patch_buckets={tuple(d.patch_buckets)} must be multiples of 4 (2x2 merge)")
    if c.stage == "kd" and c.kd.sum_rows and d.batch_size % c.kd.sum_rows:
        raise ConfigError(f"kd.sum_rows={c.kd.sum_rows} must divide data.batch_size={d.batch_size} (loss groups of "
                          "whole rows: the released per-device micro-batch)")
    if len(d.mrope_gaps) != 2 or min(d.mrope_gaps) < 1:
        raise ConfigError(f"data.mrope_gaps={tuple(d.mrope_gaps)} must be two gaps >= 1")


def check_devices(c, n: int) -> None:
    """config.mesh.shape fits `n` devices."""
    shape = list(c.mesh.shape)
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known > n) or (shape.count(-1) == 1 and n % known):
        raise ConfigError(f"mesh.shape={tuple(shape)} does not fit the {n} available devices")
