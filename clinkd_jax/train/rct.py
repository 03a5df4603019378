"""Reflective Correction Training (RCT, clinkd-spec §2.5), one round as a stage (`stage = "rct"`).

    1. the current model answers `rct.num_items` sampled training exchanges (greedy);
    2. flagged: grounding items with a missing box or a reference box no prediction hits at IoU > 0.5,
       text items whose similarity to the reference is below `rct.threshold`;
    3. for each flagged item the corrector (`teacher.*`, default: the model itself) samples
       `rct.samples` answers with the reference shown as a hint, SASG keeps the one most similar to the
       reference, and for grounding items its boxes are replaced by the reference boxes ("paired with
       the true boxes");
    4. the corrected exchanges are written to `<workdir>/corrected.json` (ShareGPT layout, absolute image
       paths); a later SFT stage takes them with `rct_from` (appended to, or replacing, their records).

Rounds: alternate `sft` and `rct` stages in `config.stages`. Every constant here is ours (the paper gives
none): item count, N, sampling, threshold, hint wording, similarity (`clinkd_jax.infer.sasg`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np

from clinkd_jax.data import markup
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.data.records import Record, SkipLog, Turn
from clinkd_jax.eval.metrics import extract_information, vg_item_hits
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts as prompts_lib
from clinkd_jax.infer import sasg

log = logging.getLogger("clinkd_jax.rct")


def exchanges(records: list[Record]) -> list[Record]:
    """Every (question, answer) pair of every record as a one-exchange record on the same images."""
    out = []
    for r in records:
        turns = [t for t in r.turns if t.role in ("user", "assistant")]
        for k in range(len(turns) - 1):
            if turns[k].role == "user" and turns[k + 1].role == "assistant":
                out.append(Record(r.id, r.images, (turns[k], turns[k + 1]), r.modality, f"{r.source} turn {k}", r.index))
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
        texts = [markup.to_bird(extract_information(tok.decode(t, skip_special_tokens=False)))
                 for t in gen_lib.trim(tokens, sampling.stop_token_ids)]
        for i, r in enumerate(recs):
            out[order[id(r)]] = texts[i * repeat:(i + 1) * repeat]
    return out


def run(c, workdir: str) -> dict:
    """One RCT round; returns a summary with the counts (also in <workdir>/rct_summary.json)."""
    from clinkd_jax.models.qwen2vl import Qwen2VL
    from clinkd_jax.train.loop import build_data, load_model, make_run_mesh

    os.makedirs(workdir, exist_ok=True)
    r = c.rct
    sim = sasg.resolve(r.similarity)
    mesh, rules = make_run_mesh(c)
    recs, encoder, _, skips = build_data(c, workdir, c.model.hf_dir)
    items = exchanges(recs)
    rng = np.random.default_rng(r.seed)
    if 0 < r.num_items < len(items):
        items = [items[i] for i in sorted(rng.choice(len(items), r.num_items, replace=False))]
    n_arrays = sum(not all(isinstance(p, str) for p in it.images) for it in items)
    if n_arrays:  # decoded TFDS images cannot be referenced from the corrected JSON file
        log.warning("RCT: %d items hold decoded images instead of files and are left out", n_arrays)
        items = [it for it in items if all(isinstance(p, str) for p in it.images)]
    tok = encoder.tok
    stops = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    pad = tok.convert_tokens_to_ids("<|endoftext|>")

    def generator_for(src):
        cfg, params = load_model(src, mesh, c.seed)
        return gen_lib.Generator(Qwen2VL(cfg, dtype=c.model.dtype, attention_impl=c.model.attention), params, mesh, rules)

    student = generator_for(c.model)
    pcfg = prompts_lib.PromptConfig(
        batch_size=r.batch_size, text_buckets=tuple(c.data.text_buckets), patch_buckets=tuple(c.data.patch_buckets),
        image=ImageConfig(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
        mrope_gaps=tuple(c.data.mrope_gaps), image_token_id=student.model.cfg.image_token_id, pad_token_id=pad,
    )
    greedy = gen_lib.SamplingConfig(max_new_tokens=r.max_new_tokens, stop_token_ids=stops, pad_token_id=pad)
    answers = _answers(student, items, encoder, pcfg, greedy, c.seed)
    flagged = {}
    for i, (ans,) in answers.items():
        reason = flag(items[i].answer, ans, r.threshold, sim)
        if reason:
            flagged[i] = reason
    corrector = student
    if any(c.teacher.get(k) for k in ("hf_dir", "orbax_dir", "preset")):
        del student
        corrector = generator_for(c.teacher)
    hinted = [Record(items[i].id, items[i].images,
                     (Turn("user", items[i].question + r.hint.format(reference=items[i].answer)), items[i].turns[1]),
                     items[i].modality, items[i].source, items[i].index) for i in flagged]
    sampled = gen_lib.SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     stop_token_ids=stops, pad_token_id=pad)
    cands = _answers(corrector, hinted, encoder, dataclasses.replace(pcfg, batch_size=r.batch_size * r.samples),
                     sampled, c.seed + 1, repeat=r.samples)
    corrected = []
    for j, i in enumerate(flagged):
        if j not in cands:
            continue
        item = items[i]
        best, scores = sasg.select(cands[j], reference=item.answer, similarity=sim)
        answer = force_boxes(cands[j][best], item.answer)
        corrected.append({"id": item.id, "images": [os.path.abspath(p) for p in item.images],
                          "messages": [{"role": "user", "content": item.question},
                                       {"role": "assistant", "content": answer}],
                          "rct": {"reason": flagged[i], "model_answer": answers[i][0], "sasg_score": scores[best],
                                  "source": item.source}})
    path = os.path.join(workdir, "corrected.json")
    main_host = jax.process_index() == 0  # every host computed the same corrections; one writes them
    if main_host:
        with open(path, "w") as f:
            json.dump(corrected, f, indent=1, ensure_ascii=False)
    counts = {"items": len(items), "answered": len(answers), "flagged": len(flagged),
              "flagged_grounding": sum(v == "grounding" for v in flagged.values()),
              "flagged_similarity": sum(v == "similarity" for v in flagged.values()),
              "corrected": len(corrected)}
    log.info("RCT round: %s -> %s", counts, path)
    summary = {"stage": "rct", "final": counts, "corrected_file": path, "skipped": dict(skips.counts),
               "workdir": workdir}
    if main_host:
        with open(os.path.join(workdir, "rct_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def read_corrected(path: str, log_: SkipLog) -> list[Record]:
    from clinkd_jax.data.records import read_sharegpt

    return read_sharegpt(path, "", log=log_)

