"""Reflective Correction Training (RCT, clinkd-spec §2.5): rounds inside an SFT run (`rct.every_steps`,
`InRun`) or one round as a stage of its own (`stage = "rct"`, `run`). A round:

    1. the current model answers `rct.num_items` sampled training exchanges (greedy);
    2. flagged: grounding items with a missing box or a reference box no prediction hits at IoU > 0.5,
       text items whose similarity to the reference is below `rct.threshold`;
    3. for each flagged item the corrector (`teacher.*`, default: the model itself) samples
       `rct.samples` answers with the reference shown as a hint, SASG keeps the one most similar to the
       reference, and for grounding items its boxes are replaced by the reference boxes ("paired with
       the true boxes");
    4. the corrected exchanges are written to `corrected.jsonl` (ShareGPT records, absolute image paths) and
       join the training pool (appended to, or replacing, their records): from the next step in an SFT
       run, or in a later SFT stage that names the round with `rct_from`.

Every constant here is ours (the paper gives none): item count, N, sampling, threshold, hint wording,
similarity (`clinkd_jax.eval.sasg`), round spacing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np

from clinkd_jax import files, tracking
from clinkd_jax.data import dataset, markup
from clinkd_jax.data import image as image_lib
from clinkd_jax.data.records import Record, SkipLog, Turn, text_problem
from clinkd_jax.eval import sasg
from clinkd_jax.eval.metrics import extract_information, vg_item_hits
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts as prompts_lib
from clinkd_jax.stage import StageContext

log = logging.getLogger("clinkd_jax.rct")
CORRECTED = "corrected.jsonl"  # a round's corrected records (ShareGPT, one per line)


def exchanges(records: list[Record]) -> list[Record]:
    """Every (question, answer) pair of every record as a one-exchange record on the same images."""
    out = []
    for r in records:
        turns = [t for t in r.turns if t.role in ("user", "assistant")]
        for k in range(len(turns) - 1):
            if turns[k].role == "user" and turns[k + 1].role == "assistant":
                out.append(Record(r.id, r.images, (turns[k], turns[k + 1]), r.modality, f"{r.source} turn {k}",
                                  r.index))
    return out


def flag(reference: str, response: str, threshold: float, similarity) -> str | None:
    """Why an answer needs correcting ("grounding" | "similarity"), or None."""
    if markup.BIRD_BOX.search(reference):
        hits, n = vg_item_hits(reference, response)
        return "grounding" if hits < n else None
    text = markup.to_bird(extract_information(response))
    return "similarity" if similarity(text, reference) < threshold else None


def force_boxes(candidate: str, reference: str) -> str:
    """The candidate with its boxes replaced, in order, by the reference's; the reference itself when
    the counts differ (a corrected grounding answer never carries a wrong box)."""
    ref_boxes = markup.BIRD_BOX.findall(reference)
    if not ref_boxes:
        return candidate
    spans = list(markup.BIRD_BOX.finditer(candidate))
    if len(spans) != len(ref_boxes):
        return reference
    it = iter(ref_boxes)
    return markup.BIRD_BOX.sub(lambda _: f"<box>{next(it)}</box>", candidate)


def _answers(generator, items, encoder, pcfg, sampling, seed, repeat=1) -> dict[int, list[str]]:
    """{position in items: decoded answers (BiRD markup)}; skipped items are absent."""
    tok = encoder.tok
    out: dict[int, list[str]] = {}
    order = {id(r): i for i, r in enumerate(items)}
    for k, (recs, batch) in enumerate(prompts_lib.prompt_batches(items, encoder, pcfg, SkipLog(), repeat=repeat)):
        tokens = generator(batch, sampling, rng=jax.random.fold_in(jax.random.key(seed), k))
        texts = [tok.decode(t, skip_special_tokens=False) for t in gen_lib.trim(tokens, sampling.stop_token_ids)]
        for i, r in enumerate(recs):
            sizes = [image_lib.seen_size(p, pcfg.image) for p in r.images] if encoder.box_markup != "0-1000" else None
            out[order[id(r)]] = [markup.to_bird(extract_information(encoder.boxes_out(t, sizes)))
                                 for t in texts[i * repeat:(i + 1) * repeat]]
    return out


def correction_round(c, recs, encoder, student, corrector_for, seed: int) -> tuple[list[dict], dict]:
    """One round over `recs`: (corrected ShareGPT entries, counts). `student` is a Generator;
    `corrector_for()` returns the corrector's Generator (called only when something was flagged)."""
    r = c.rct
    sim = sasg.resolve(r.similarity)
    items = exchanges(recs)
    rng = np.random.default_rng(seed)
    if 0 < r.num_items < len(items):
        items = [items[i] for i in sorted(rng.choice(len(items), r.num_items, replace=False))]
    n_arrays = sum(not all(isinstance(p, str) for p in it.images) for it in items)
    if n_arrays:  # decoded TFDS images cannot be referenced from the corrected JSON file
        log.warning("RCT: %d items hold decoded images instead of files and are left out", n_arrays)
        items = [it for it in items if all(isinstance(p, str) for p in it.images)]
    stops, pad = encoder.stop_ids, encoder.pad_id
    pcfg = prompts_lib.PromptConfig(
        batch_size=r.batch_size, text_buckets=tuple(c.data.text_buckets), patch_buckets=tuple(c.data.patch_buckets),
        image=image_lib.for_model(student.model.cfg, c.data.min_pixels, c.data.max_pixels),
        mrope_gaps=tuple(c.data.mrope_gaps), image_token_id=encoder.image_pad_id, pad_token_id=pad,
    )
    greedy = gen_lib.SamplingConfig(max_new_tokens=r.max_new_tokens, stop_token_ids=stops, pad_token_id=pad)
    answers = _answers(student, items, encoder, pcfg, greedy, seed)
    del student  # the caller may free it before the corrector loads
    flagged = {}
    for i, (ans,) in answers.items():
        reason = flag(items[i].answer, ans, r.threshold, sim)
        if reason:
            flagged[i] = reason
    hinted = [Record(items[i].id, items[i].images,
                     (Turn("user", items[i].question + r.hint.format(reference=items[i].answer)), items[i].turns[1]),
                     items[i].modality, items[i].source, items[i].index) for i in flagged]
    sampled = gen_lib.SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     stop_token_ids=stops, pad_token_id=pad)
    cands = _answers(corrector_for(), hinted, encoder, dataclasses.replace(pcfg, batch_size=r.batch_size * r.samples),
                     sampled, seed + 1, repeat=r.samples) if hinted else {}
    corrected, unusable = [], 0
    for j, i in enumerate(flagged):
        if j not in cands:
            continue
        item = items[i]
        # (candidate, with the reference boxes); one that could not be trained on (a sampled <|im_start|>, a
        # broken box) takes no part
        usable = [(a, fixed) for a in cands[j] if not text_problem(fixed := force_boxes(a, item.answer))]
        if not usable:
            unusable += 1
            continue
        best, scores = sasg.select([a for a, _ in usable], reference=item.answer, similarity=sim)
        answer = usable[best][1]
        corrected.append({"id": item.id, "images": [os.path.abspath(p) for p in item.images],
                          "messages": [{"role": "user", "content": item.question},
                                       {"role": "assistant", "content": answer}],
                          "rct": {"reason": flagged[i], "model_answer": answers[i][0], "sasg_score": scores[best],
                                  "source": item.source}})
    counts = {"items": len(items), "answered": len(answers), "flagged": len(flagged),
              "flagged_grounding": sum(v == "grounding" for v in flagged.values()),
              "flagged_similarity": sum(v == "similarity" for v in flagged.values()),
              "corrected": len(corrected), "unusable": unusable}
    return corrected, counts


def write_round(workdir: str, corrected: list[dict], summary: dict) -> str:
    """corrected.jsonl (one record per line) + rct_summary.json in workdir. Every host computed the same
    corrections and writes them (atomically): later stages read them on every host, also where workdirs
    are host-local."""
    path = os.path.join(workdir, CORRECTED)
    files.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corrected))
    files.write_json(os.path.join(workdir, "rct_summary.json"), {**summary, "corrected_file": path})
    log.info("RCT round: %s -> %s", summary["final"], path)
    return path


def generator(stage: StageContext, cfg, params) -> gen_lib.Generator:
    return gen_lib.Generator(stage.module(cfg), params, stage.mesh, stage.rules)


def load_corrector(stage: StageContext, student_cfg):
    """The corrector (`teacher.*`) as a Generator, on the student's vocabulary."""
    cfg, params = stage.load_teacher(student_cfg, "the corrector (teacher.*)", seed_offset=0)
    return generator(stage, cfg, params)


def run(c, workdir: str) -> dict:
    """One RCT round as a stage; returns a summary with the counts (also in <workdir>/rct_summary.json)."""
    stage = StageContext.of(c, workdir)
    s_cfg, params = stage.load_model(c.model.param_dtype)
    skips = SkipLog(strict=c.data.strict)
    recs = dataset.with_extra(stage.training_records(skips), c.data.extra_files, c.data.extra_mode, skips)
    box = {"student": generator(stage, s_cfg, params)}
    del params

    def corrector_for():
        if stage.teacher is None:
            return box["student"]
        del box["student"]  # free the student's parameters before loading the corrector's
        return load_corrector(stage, s_cfg)

    corrected, counts = correction_round(c, recs, stage.encoder, box["student"], corrector_for, c.rct.seed)
    summary = {"stage": "rct", "final": counts, "skipped": dict(skips.counts), "workdir": workdir}
    return {**summary, "corrected_file": write_round(workdir, corrected, summary)}


class InRun:
    """RCT inside one SFT run (`rct.every_steps` > 0), as a step-end hook of the training loop: after every
    `every_steps` training steps, at most `rct.rounds` times, a round with the current parameters. Round k
    is written to `<workdir>/rct_round_<k>/` and its corrections join the training pool from then on
    (`data.extra_mode`: append | replace); the optimizer state and learning-rate schedule go on unbroken.
    Resuming at step s re-applies the rounds done by step s (a checkpoint is saved right after each)."""

    changes_pool = True

    def __init__(self, c, workdir: str):
        e, n = c.rct.every_steps, c.rct.rounds
        self.c, self.workdir = c, workdir
        self.at = [e * k for k in range(1, n + 1) if e * k < c.train.steps] if e > 0 else []
        self.generator = None
        self.rounds: list[dict] = []

    @classmethod
    def hooks(cls, c, workdir: str) -> list[InRun]:
        """The training loop's hooks for config `c`: one when it asks for in-run rounds, else none."""
        return [cls(c, workdir)] if c.stage == "sft" and c.rct.every_steps > 0 else []

    def round_dir(self, k: int) -> str:
        return os.path.join(self.workdir, f"rct_round_{k}")

    def due(self, step: int) -> bool:
        return step in self.at

    def pool_files(self, step: int) -> list[str]:
        """The corrected files of the rounds run by `step`, in order."""
        out = []
        for k, at in enumerate(self.at, 1):
            if at <= step:
                f = os.path.join(self.round_dir(k), CORRECTED)
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{f}: RCT round {k} (step {at}) is missing, but the run resumes at step "
                                            f"{step}; restore the file or delete {self.workdir}/checkpoints")
                out.append(f)
        return out

    def resume(self, step: int) -> None:
        """A run resumed at `step`: the rounds done by then, read back from their summaries."""
        self.rounds = []
        for k, at in enumerate(self.at, 1):
            if at <= step:
                summary = files.read_json(os.path.join(self.round_dir(k), "rct_summary.json"), {})
                self.rounds.append({"round": k, "step": at, **summary.get("final", {"counts": "unreadable"})})

    def summary(self) -> dict:
        return {"rct": self.rounds}

    def __call__(self, step: int, params, run) -> None:
        """Round number `at.index(step) + 1` with `params`; `run` holds the training run's stage context, model
        geometry and records."""
        k = self.at.index(step) + 1
        c = self.c
        log.info("RCT round %d at step %d: the model answers up to %d training exchanges", k, step, c.rct.num_items)
        if self.generator is None:  # compiled once, reused by every round with the current params
            self.generator = generator(run.stage, run.cfg, params)
        self.generator.params = params

        def corrector_for():  # loaded for the round and freed after it (it is frozen; memory matters more)
            return self.generator if run.stage.teacher is None else load_corrector(run.stage, run.cfg)

        corrected, counts = correction_round(c, run.records, run.stage.encoder, self.generator, corrector_for,
                                             c.rct.seed + k)
        summary = {"stage": "rct", "round": k, "step": step, "final": counts, "workdir": self.round_dir(k)}
        write_round(self.round_dir(k), corrected, summary)
        self.rounds.append({"round": k, "step": step, **counts})
        tracking.active().log(step, {f"rct/{name}": v for name, v in counts.items()})
