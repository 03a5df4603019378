"""The evaluation run (`stage = "eval"`): checkpoint + test files -> predictions -> metrics, tables, charts,
gallery, all in the workdir.

    <workdir>/predictions/Test_<task>.jsonl   BiRD/ClinKD prediction lines (id, image, question, annotation, response)
    <workdir>/metrics.json                    every task: per-modality values, 8-modality means, counts, skips
    <workdir>/tables/<task>.md, results.md    one row per modality plus the mean
    <workdir>/charts/<task>.png               per-modality bars
    <workdir>/gallery/<task>.html             images with ground-truth and predicted boxes

Protocol: every item of a test file that has a reference answer is scored. An item that cannot be
generated for (missing or unreadable image, prompt too long) gets a prediction line with an empty
response and the reason in "unevaluated": it counts as a miss, as the released scripts would score an
item they got no answer for, and never shrinks the denominator; results.md says how many.

Resumes: items already in a prediction file are not generated again (a torn last line is dropped; items
marked unevaluated are tried again), if the same model and settings made it: each file has a record of what
made it (`Test_<task>.made_by.json`: model source and a stamp of its checkpoint files, prompt and decoding
settings, the test file); a file made otherwise moves to predictions/stale/ and is generated afresh.
Score-only: `eval.predictions` lists existing JSONL files (ours or another system's); no model is loaded.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os

import jax

from clinkd_jax import distributed, files, tracking
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import records as records_lib
from clinkd_jax.data.dataset import eval_image_dir, eval_records, task_of, test_files
from clinkd_jax.eval import answers, captions, metrics, report, sasg
from clinkd_jax.eval import config as eval_config
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts as prompts_lib
from clinkd_jax.model_source import ModelSource
from clinkd_jax.stage import StageContext

log = logging.getLogger("clinkd_jax.eval")


def sampling_for(c, task: str, stop_ids: tuple[int, ...], pad_id: int) -> gen_lib.SamplingConfig:
    e = c.eval
    sampled = e.sasg_samples > 1
    return gen_lib.SamplingConfig(
        max_new_tokens=e.max_new_tokens_mii if task == "MII" else e.max_new_tokens,
        temperature=e.sasg_temperature if sampled else e.temperature, top_p=e.sasg_top_p if sampled else e.top_p,
        stop_token_ids=stop_ids, pad_token_id=pad_id,
    )


def read_done(path: str) -> set[int]:
    """Ids already predicted; a torn last line (killed mid-write) and the lines of unevaluated items (tried
    again) are dropped from the file. Call on the writing process only (`done_ids`)."""
    if not os.path.isfile(path):
        return set()
    good, done = [], set()
    with open(path) as f:
        for line in f:
            try:
                item = json.loads(line)
                if "unevaluated" in item:
                    continue
                done.add(int(item["id"]))
                good.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s: dropping an unreadable line (interrupted write?)", path)
    files.write_text(path, "".join(good))
    return done


def done_ids(path: str) -> set[int]:
    """The ids in a prediction file, as process 0 (its only writer) reads it, on every host: the hosts'
    to-do lists are identical, also when only process 0 sees the file (host-local workdirs)."""
    done = sorted(read_done(path)) if jax.process_index() == 0 else None
    return set(distributed.broadcast_json(done, f"ids already in {os.path.basename(path)}"))


def predict(c, task: str, recs, generator, encoder, out_path: str, skips: records_lib.SkipLog) -> int:
    """Generate for every record not yet in out_path; returns how many were generated now."""
    from tqdm.auto import tqdm

    e = c.eval
    done = done_ids(out_path)
    todo = [r for r in recs if r.index not in done]
    log.info("eval %s: %d of %d items to generate", task, len(todo), len(recs))
    sampling = sampling_for(c, task, encoder.stop_ids, encoder.pad_id)
    n = max(1, e.sasg_samples)
    pcfg = prompt_config(c, generator.model.cfg, encoder, e.batch_size * n)
    writer = jax.process_index() == 0
    bar = tqdm(total=len(recs), initial=len(recs) - len(todo), unit="item", desc=f"eval {task}",
               disable=not (writer and c.train.progress))
    made = 0
    with files.Lines(out_path if writer else os.devnull) as f:

        def miss(r, reason):  # scored as an empty answer
            f.write_json({**prediction_line(r), "response": "", "unevaluated": reason})
            bar.update(1)

        batches = prompts_lib.prompt_batches(todo, encoder, pcfg, skips, repeat=n, on_skip=miss)
        for k, (batch_recs, batch) in enumerate(batches):
            tokens = generator(batch, sampling, rng=jax.random.fold_in(jax.random.key(c.seed), k))
            texts = responses(tokens, batch_recs, encoder, pcfg, n)
            for i, r in enumerate(batch_recs):
                line = prediction_line(r)
                if n > 1:
                    cands = texts[i * n:(i + 1) * n]
                    best, scores = sasg.select(cands, similarity=e.sasg_similarity)
                    line.update(response=cands[best], candidates=cands, sasg_scores=scores)
                else:
                    line["response"] = texts[i]
                f.write_json(line)
            made += len(batch_recs)
            bar.update(len(batch_recs))
    bar.close()
    return made


def prompt_config(c, model_cfg, encoder, batch_size: int) -> prompts_lib.PromptConfig:
    """How a test question becomes a prompt batch (the evaluation protocol's settings, `c.eval` and the
    MCG-RoPE gaps of `c.data`); `clinkd_jax.predict` asks through the same one."""
    e = c.eval
    return prompts_lib.PromptConfig(
        batch_size=batch_size, text_buckets=tuple(e.text_buckets), patch_buckets=tuple(e.patch_buckets),
        image=image_lib.for_model(model_cfg, e.min_pixels, e.max_pixels), mrope_gaps=tuple(c.data.mrope_gaps),
        image_token_id=model_cfg.image_token_id, pad_token_id=encoder.pad_id, threads=e.threads,
    )


def responses(tokens, recs, encoder, pcfg: prompts_lib.PromptConfig, n: int = 1) -> list[str]:
    """The generated rows as prediction-file responses (special tokens kept, spec §3.5), `n` rows per record,
    their boxes on the files' 0-1000 scale whatever markup the model writes."""
    texts = [encoder.tok.decode(row, skip_special_tokens=False) for row in gen_lib.trim(tokens, encoder.stop_ids)]
    if encoder.box_markup != "0-1000":
        for i, r in enumerate(recs):
            sizes = [image_lib.seen_size(p, pcfg.image) for p in r.images]
            texts[i * n:(i + 1) * n] = [encoder.boxes_out(t, sizes) for t in texts[i * n:(i + 1) * n]]
    return texts


def prediction_line(r) -> dict:
    """The BiRD/ClinKD prediction fields of a test record, without the response."""
    return {"id": r.index, "image": os.path.basename(r.images[0]), "question": r.question, "annotation": r.answer}


def score(task: str, predictions: list[dict], scorer_box: dict, spice: bool) -> dict:
    """The task's metrics; "unevaluated" counts, by reason, the items scored as misses (empty answers)."""
    if task == "VG":
        result = {**metrics.vg_recall(predictions), "answer_boxes": answers.tally(p["response"] for p in predictions)}
    elif task == "RO":
        result = metrics.roc_accuracy(predictions)
    else:
        if "scorer" not in scorer_box:
            scorer_box["scorer"] = captions.CaptionScorer(spice=spice)
        result = captions.caption_metrics(predictions, task, scorer_box["scorer"])
    unevaluated: dict[str, int] = {}
    for p in predictions:
        if "unevaluated" in p:
            unevaluated[p["unevaluated"]] = unevaluated.get(p["unevaluated"], 0) + 1
    return {**result, "unevaluated": unevaluated}


def write_reports(c, workdir: str, results: dict, preds: dict, images: str, left_out: dict[str, int]) -> None:
    for sub in ("tables", "charts", "gallery"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    tables = []
    for task, result in results.items():
        table = report.markdown_table(task, result)
        tables.append(table)
        files.write_text(os.path.join(workdir, "tables", f"{task}.md"), table)
        report.bar_chart(task, result, os.path.join(workdir, "charts", f"{task}.png"))
        if images and os.path.isdir(images) and c.eval.gallery_per_modality > 0:
            report.gallery(task, preds[task], images, os.path.join(workdir, "gallery"), c.eval.gallery_per_modality,
                           seed=c.seed)
    if left_out:
        tables.append("Test items left out (no usable reference answer, not scorable): "
                      + ", ".join(f"{k} {v}" for k, v in left_out.items()) + "\n")
    files.write_text(os.path.join(workdir, "results.md"), "\n".join(tables))


def run(c, workdir: str) -> dict:
    """Predict (unless score-only) and score; returns {task: result} plus skips and paths."""
    os.makedirs(workdir, exist_ok=True)
    eval_config.validate(c, workdir)
    skips = records_lib.SkipLog(strict=c.data.strict)  # items not generated for: scored as misses
    read_skips = records_lib.SkipLog(strict=c.data.strict)  # items of the test files that cannot be scored
    if c.eval.predictions:
        pred_files, generated = {task_of(p): p for p in c.eval.predictions}, {}
    else:
        stage = StageContext.of(c, workdir)
        cfg, params = stage.load_model(c.model.param_dtype)
        generator = gen_lib.Generator(stage.module(cfg), params, stage.mesh, stage.rules)
        pred_files, generated = predict_all(c, workdir, generator, stage.encoder, read_skips, skips, stamped=True)
        log.info("generation compiled %d time(s)", generator.compiled)
    return scored(c, workdir, pred_files, generated, read_skips, skips)


# eval fields that change which items run or how they are shown, never an item's answer
NOT_IN_STAMP = ("tasks", "files", "data_dir", "image_dir", "predictions", "limit", "every_steps", "batch_size",
                "threads", "spice", "gallery_per_modality")


def files_stamp(path: str) -> str:
    """A digest of the name, size and modification time of every file under `path` (or of the file): it changes
    when a checkpoint or test file is rewritten, without reading their bytes."""
    h = hashlib.sha1()
    found = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in found:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest() if found else f"nothing at {path}"


def made_by(c, test_file: str) -> dict:
    """What decides the answers in a prediction file: the model (its source, and a stamp of its checkpoint
    files), tokenizer and prompt settings, decoding settings and the test file."""
    m, source = c.model, ModelSource.of(c, "model").checkpoint
    stamp = {
        "model": {k: str(m[k]) for k in ("hf_dir", "orbax_dir", "preset", "text_overrides", "vision_overrides",
                                          "compact_vocab", "dtype", "param_dtype")},
        "checkpoint": files_stamp(source) if source else f"random initialisation, seed {c.seed}",
        "text": {"tokenizer": c.data.tokenizer, "chat_template": c.data.chat_template,
                 "mrope_gaps": list(c.data.mrope_gaps)},
        "decoding": {"seed": c.seed, **{k: v for k, v in c.eval.to_dict().items() if k not in NOT_IN_STAMP}},
        "test_file": files_stamp(test_file),
    }
    return json.loads(json.dumps(stamp))  # as it reads back from disk (tuples become lists)


def set_aside_if_stale(pred_path: str, stamp: dict) -> None:
    """Resuming is only right for predictions of the same model and settings: a prediction file made by other
    ones (or with no record of what made it) moves to predictions/stale/ and is generated afresh. Process 0."""
    meta = pred_path[: -len(".jsonl")] + ".made_by.json"
    old = files.read_json(meta)  # a torn or empty stamp is named, set aside, and counts as no record
    if os.path.isfile(pred_path) and old != stamp:
        stale = os.path.join(os.path.dirname(pred_path), "stale")
        os.makedirs(stale, exist_ok=True)
        name = os.path.basename(pred_path)[: -len(".jsonl")]
        k = sum(f.startswith(name + ".") and f.endswith(".jsonl") for f in os.listdir(stale))
        dest = os.path.join(stale, f"{name}.{k}.jsonl")
        os.replace(pred_path, dest)
        if old is not None:
            os.replace(meta, dest[: -len(".jsonl")] + ".made_by.json")
        changed = "no record of what made it" if old is None else \
            "other " + ", ".join(k for k in stamp if stamp[k] != old.get(k))
        log.warning("%s: made by another model or settings (%s); moved to %s, generating again", pred_path,
                    changed, dest)
    files.write_json(meta, stamp, indent=1)


def predict_all(c, workdir: str, generator, encoder, read_skips, skips, out_dir: str = "",
                stamped: bool = False) -> tuple[dict, dict]:
    """Predictions for every test file into <out_dir or workdir>/predictions/Test_<task>.jsonl: ({task: path},
    {task: items generated now}). `stamped`: the model comes from c.model, and existing predictions are resumed
    only if the same model and settings made them (`set_aside_if_stale`)."""
    pred_dir = os.path.join(out_dir or workdir, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    pred_files, generated = {}, {}
    for task, path in test_files(c, workdir).items():
        recs = eval_records(c, path, workdir, read_skips)
        if c.eval.limit > 0:
            recs = recs[: c.eval.limit]
        pred_files[task] = os.path.join(pred_dir, f"Test_{task}.jsonl")
        if stamped and jax.process_index() == 0:  # the only writer; predict() broadcasts what is done
            set_aside_if_stale(pred_files[task], made_by(c, path))
        generated[task] = predict(c, task, recs, generator, encoder, pred_files[task], skips)
    return pred_files, generated


def scored(c, workdir: str, pred_files: dict, generated: dict, read_skips, skips, reports: bool = True) -> dict:
    """Scores the prediction files (process 0 writes metrics.json and, with `reports`, the tables, charts and
    gallery); returns the evaluation's summary."""
    skipped = dict(collections.Counter(read_skips.counts) + collections.Counter(skips.counts))
    results, preds, box = {}, {}, {}
    if jax.process_index() == 0:
        for task, path in pred_files.items():
            preds[task] = sorted(metrics.read_predictions(path), key=lambda p: int(p["id"]))
            results[task] = score(task, preds[task], box, c.eval.spice)
        if "scorer" in box:
            box["scorer"].close()
        files.write_json(os.path.join(workdir, "metrics.json"), {"tasks": results, "skipped": skipped,
                                                                 "generated": generated, "predictions": pred_files})
        if reports:
            images = eval_image_dir(c, workdir)
            write_reports(c, workdir, results, preds, images, read_skips.counts)
            if tracking.active().enabled:  # the gallery's images are read again only for W&B
                values, summary = report.tracked(results, preds, images, c.eval.gallery_per_modality, c.seed)
                tracking.active().log_result(values)
                tracking.active().summarize(summary)
    for what, log_ in (("not scorable", read_skips), ("scored as misses", skips)):
        if log_.total:
            log.warning("%s: %s", what, log_.report())
    return {"stage": "eval", "tasks": results, "skipped": skipped, "generated": generated,
            "workdir": workdir, "means": {t: r["mean"] for t, r in results.items()}}
