"""The training step a run compiles, built from the run config in one place: the student (and teacher) modules,
the optimizer, the shardings of the train state and of the teacher's params, and the jitted step.

`train.loop` runs what `build` returns; `clinkd_jax.aot` compiles the same thing from abstract shapes for a
described TPU slice, so what aot reports is the program the run would compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from clinkd_jax import peft_adapters, settings, sharding
from clinkd_jax.checkpoint import abstract_with_shardings
from clinkd_jax.infer.generate import SamplingConfig
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models import quant
from clinkd_jax.models.config import ConfigError, Qwen2VLConfig
from clinkd_jax.models.qwen2vl import Qwen2VL, abstract_params
from clinkd_jax.train import on_policy, steps
from clinkd_jax.train import state as state_lib
from clinkd_jax.train.config import kd_config, sampled_answers


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    model: Qwen2VL
    teacher: Qwen2VL | None  # the online teacher (stage kd without pseudo-labels)
    opt: state_lib.OptimConfig
    tx: Any
    state_shardings: state_lib.TrainState
    teacher_shardings: Any  # None without an online teacher
    step: Any  # jitted (state, teacher params, batch) -> (state, metrics); the state is donated
    on_policy_step: Any = None  # the same on the student's own answers (kd.on_policy_fraction > 0), else None
    draws: tuple[int, float] = (0, 0.0)  # (seed, kd.on_policy_fraction): which steps are on-policy
    samples: bool = False  # its steps sample answers (on-policy or kd.seq_kd): batches carry record_index
    trained: Any = None  # the trained params' boxed abstract tree (the whole model's, or its LoRA adapters)
    lora: lora_lib.LoraConfig | None = None  # adapters only are trained; the base is the step's 4th argument
    base_shardings: Any = None  # the frozen base's shardings as the step takes it (with lora; quantised or not)
    start_adapters: Any = None  # the adapters a run starts from (lora.adapter_dir; host arrays), else fresh ones
    base_quant: quant.Quantization | None = None  # QLoRA: how the base is quantised for the step
    plain_shardings: Any = None  # the base's shardings unquantised (the folded model's)
    teacher_quant: quant.Quantization | None = None  # teacher.quant: how the online teacher is quantised

    def step_for(self, step: int):
        """The jitted step that micro-step `step` (the state's step before it) runs."""
        seed, fraction = self.draws
        on = self.on_policy_step is not None and on_policy.drawn(seed, step, fraction)
        return self.on_policy_step if on else self.step

    def abstract_state(self) -> state_lib.TrainState:
        """The train state as ShapeDtypeStructs on their shardings (nothing allocated)."""
        return abstract_with_shardings(state_lib.abstract_state(self.trained, self.tx), self.state_shardings)

    def abstract_base(self) -> tuple:
        """(the frozen LoRA base's params as ShapeDtypeStructs on their shardings,): the step's last argument; ()
        without LoRA."""
        if self.lora is None:
            return ()
        base = state_lib.unboxed(lora_lib.split(abstract_params(self.model))[0])
        return (abstract_with_shardings(base if self.base_quant is None else self.base_quant.abstract(base),
                                        self.base_shardings),)

    def abstract_teacher(self, dtype) -> Any:
        """The teacher's params as ShapeDtypeStructs of `dtype` on their shardings (None without a teacher)."""
        if self.teacher is None:
            return None
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), state_lib.param_shapes(self.teacher))
        shapes = shapes if self.teacher_quant is None else self.teacher_quant.abstract(shapes)
        return abstract_with_shardings(shapes, self.teacher_shardings)


def optim_config(c, total_updates: int) -> state_lib.OptimConfig:
    o = c.optim
    return state_lib.OptimConfig(
        learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=total_updates,
        end_lr_ratio=o.end_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
        grad_accum=o.grad_accum, frozen=tuple(o.frozen), mu_dtype=o.mu_dtype,
    )


def build(c, cfg: Qwen2VLConfig, mesh, rules, *, teacher_cfg: Qwen2VLConfig | None = None, total_updates: int = 1,
          loss_unrolled: bool = False, tokens: tuple[tuple[int, ...], int] | None = None) -> TrainProgram:
    """The step of stage `c.stage` ("sft" or "kd") for student geometry `cfg` (and the online teacher's
    `teacher_cfg`) on `mesh`. `loss_unrolled`: the loss's chunk loop as straight-line code (aot's cost twins).
    `tokens`: (stop ids, pad id) of the stage's tokenizer, for the steps that sample answers (`on_policy`)."""
    opt = optim_config(c, total_updates)
    sched, tx = state_lib.schedule(opt), state_lib.optimizer(opt)
    loss = steps.LossSettings(kd=kd_config(c) if c.stage == "kd" else None, chunk=c.train.loss_chunk,
                              backward=c.train.loss_backward, unrolled=loss_unrolled)
    training = dict(param_dtype=c.model.param_dtype, remat=c.model.remat)
    plain = settings.model_module(c, cfg, **training)
    teacher = None if teacher_cfg is None else settings.model_module(c, teacher_cfg, c.teacher.dtype)
    if c.lora.adapter_dir:  # training on from a PEFT adapter: its rank, alpha and layers
        lora, start = peft_adapters.load_peft(c.lora.adapter_dir, cfg)
        if c.lora.rank not in (0, lora.rank):
            raise ConfigError(f"lora.rank={c.lora.rank} but lora.adapter_dir={c.lora.adapter_dir!r} has rank "
                              f"{lora.rank} (leave lora.rank at 0 to take the adapter's)")
        lora = dataclasses.replace(lora, dropout=float(c.lora.dropout), base_quant=c.lora.base_quant)
    else:
        lora, start = lora_lib.config(c.lora), None
    model = plain if lora is None else lora_lib.adapted(plain, lora)
    train = dict(model=model, frozen=opt.frozen)
    if lora is not None and (lora.dropout or lora.base_quant):  # the step's own module; dropout draws from (seed, step)
        train |= dict(model=lora_lib.adapted(plain, lora, training=True), dropout_seed=c.seed)
    t_quant = None if teacher is None else quant.plan(teacher, c.teacher.quant)
    source = None
    if c.stage == "kd":
        source = steps.TeacherSource("cached") if teacher is None else steps.TeacherSource(
            "online", quant.quantized(teacher, c.teacher.quant), c.teacher.positions)
    trained, base, base_quant = abstract_params(model), None, None
    if lora is not None:  # the adapters are the trained params; the base is a frozen input of the step
        base, trained = lora_lib.split(trained)
        lora_lib.check(trained, lora, opt.frozen)
        base_quant = quant.plan(plain, lora.base_quant, lora_lib.quantised_layers(lora))
    st_sh = state_lib.state_shardings(trained, tx, mesh, rules)
    t_boxed = None if teacher is None else abstract_params(teacher)
    plain_sh, t_sh = (None if x is None else sharding.tree_shardings(x, mesh, rules) for x in (base, t_boxed))
    # the frozen models as the step reads them: quantised (lora.base_quant, teacher.quant) or not
    base_sh, t_sh = (sh if q is None else q.shardings(sh) for sh, q in ((plain_sh, base_quant), (t_sh, t_quant)))
    train |= dict(tx=tx, lr_schedule=lambda s: sched(s // opt.grad_accum))
    parts = dict(trained=trained, lora=lora, base_shardings=base_sh, start_adapters=start, base_quant=base_quant,
                 plain_shardings=plain_sh, teacher_quant=t_quant)
    if not sampled_answers(c):
        return TrainProgram(model, teacher, opt, tx, st_sh, t_sh, steps.jit_train_step(
            st_sh, t_sh, None, base_sh, loss=loss, teacher=source, **train), **parts)
    if tokens is None:
        raise ValueError("a step that samples answers needs the tokenizer's stop and pad ids (tokens=)")
    k = c.kd
    sampling = SamplingConfig(max_new_tokens=k.max_new_tokens, temperature=k.sample_temperature,
                              top_p=k.sample_top_p, stop_token_ids=tuple(tokens[0]), pad_token_id=tokens[1])
    sampled = lambda by, lo: on_policy.jit_sampled_step(st_sh, t_sh, sampler=on_policy.Sampler(by, sampling, c.seed),
                                                        teacher=source, loss=lo, **train)
    step = (sampled("teacher", loss) if k.seq_kd
            else steps.jit_train_step(st_sh, t_sh, None, loss=loss, teacher=source, **train))
    gkd = dataclasses.replace(loss, kd=dataclasses.replace(loss.kd, use_ce=False, mask="aligned"))
    student = sampled("student", gkd) if k.on_policy_fraction > 0 else None
    return TrainProgram(model, teacher, opt, tx, st_sh, t_sh, step, student, (c.seed, k.on_policy_fraction), True,
                        **parts)
