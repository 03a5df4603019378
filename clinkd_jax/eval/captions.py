"""Region-caption (GC) and image-description (MII) metrics: the COCO caption pipeline of BiRD/ClinKD,
run per modality (clinkd-spec §3.7).

For each modality: one reference per item, PTB tokenisation (Java: lower-cases, drops punctuation),
BLEU-1..4, METEOR 1.5 (Java), ROUGE-L, CIDEr-D (IDF from that modality's references only) and SPICE
(Java + Stanford CoreNLP 3.6.0 jars), each rounded to 6 decimals, then every metric averaged
unweighted over the 8 modalities (a modality without items counts 0). MII additionally reports
mBMR = mean(BLEU-1..4, METEOR, ROUGE-L) and, like ClinKD's script, leaves SPICE out.

The scorers are pycocoevalcap's own. What cannot run is never reported as 0: without Java, METEOR and
SPICE are listed under "skipped" with the reason and BLEU/ROUGE-L/CIDEr use a Python tokenizer that
approximates PTB (declared in "tokenizer"); without the CoreNLP jars (SPICE downloads them on first
use, which needs network), SPICE is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable

from clinkd_jax.data.records import MODALITIES, modality_of
from clinkd_jax.eval.metrics import extract_information, per_modality_mean

BMR = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L")
METRICS = (*BMR, "CIDEr", "SPICE")
# pycocoevalcap's removed tokens. PTB writes brackets as -LRB- etc. and, lower-casing, as -lrb-, which
# pycocoevalcap's upper-case list then fails to remove: they stay, and so they do here.
_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-"}
_WORD = re.compile(r"\w+(?:[-.]\w+)*|'\w+|\.\.\.|--|[^\w\s]")
log = logging.getLogger("clinkd_jax.eval")


@contextlib.contextmanager
def child_stderr_to_log():
    """The PTB tokenizer (a Java child) prints a line per call on the inherited stderr; send it to the debug log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("java: %s", text)


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def spice_jars_missing() -> list[str]:
    import importlib.util

    lib = os.path.join(os.path.dirname(importlib.util.find_spec("pycocoevalcap.spice.spice").origin), "lib")
    jars = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    return [os.path.join(lib, j) for j in jars if not os.path.isfile(os.path.join(lib, j))]


def python_tokenize(text: str) -> str:
    """Lower-cased words with PTB's punctuation removed: an approximation, used only without Java."""
    tokens = (_BRACKETS.get(w, w) for w in _WORD.findall(text.replace("\n", " ").lower()))
    return " ".join(w for w in tokens if w not in _PUNCT)


class CaptionScorer:
    """pycocoevalcap's scorers, created once (METEOR keeps one Java process) and reused per modality."""

    def __init__(self, spice: bool = True, java: bool | None = None):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        self.java = java_available() if java is None else java
        self.skipped: dict[str, str] = {}
        self.scorers = [(Bleu(4), list(BMR[:4])), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
        if self.java:
            from pycocoevalcap.meteor.meteor import Meteor

            self.scorers.insert(1, (Meteor(), ["METEOR"]))
            self.tokenizer = "PTB (Stanford CoreNLP 3.4.1, Java)"
        else:
            self.skipped["METEOR"] = "needs Java (install a JRE, e.g. `apt-get install default-jre-headless`)"
            self.tokenizer = "python approximation of PTB (Java missing): BLEU/ROUGE-L/CIDEr are not paper-comparable"
        if not spice:
            self.skipped["SPICE"] = "turned off (eval.spice=False)"
        elif not self.java:
            self.skipped["SPICE"] = "needs Java and the Stanford CoreNLP 3.6.0 jars"
        elif spice_jars_missing():
            self.skipped["SPICE"] = ("Stanford CoreNLP 3.6.0 jars not found (" + ", ".join(spice_jars_missing())
                                     + "); pycocoevalcap downloads them on first use, which needs network")
        else:
            from pycocoevalcap.spice.spice import Spice

            self.scorers.append((Spice(), ["SPICE"]))

    def tokenize(self, captions: dict) -> dict:
        """{key: [caption, ...]} -> tokenised, like COCOEvalCap."""
        if self.java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            with child_stderr_to_log():
                return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}

    def score(self, references: dict, candidates: dict) -> dict[str, float]:
        gts, res = self.tokenize(references), self.tokenize(candidates)
        out = {}
        for scorer, names in self.scorers:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its counts
                    value, _ = scorer.compute_score(gts, res)
            except Exception as e:  # a Java part failing at run time (SPICE on a new JRE, say): reported
                for n in names:
                    self.skipped[n] = f"failed: {type(e).__name__}: {e}"
                continue
            for n, v in zip(names, value if isinstance(value, list) else [value]):
                out[n] = float(v)
        return out

    def close(self):
        for scorer, _ in self.scorers:
            if hasattr(scorer, "meteor_p"):
                try:
                    scorer.close()
                except Exception:
                    pass


def caption_metrics(predictions: Iterable[dict], task: str, scorer: CaptionScorer) -> dict:
    """Per-modality COCO caption metrics for GC or MII predictions and their 8-modality means."""
    by_modality: dict[str, tuple[dict, dict]] = {}
    for k, p in enumerate(predictions):
        refs, cands = by_modality.setdefault(modality_of(p["image"]), ({}, {}))
        refs[k] = [p["annotation"]]
        cands[k] = [extract_information(p["response"])]
    per: dict[str, dict[str, float]] = {}
    for m, (refs, cands) in sorted(by_modality.items()):
        per[m] = {name: round(v, 6) for name, v in scorer.score(refs, cands).items()}
    names = [n for n in METRICS if n not in scorer.skipped and not (task == "MII" and n == "SPICE")]
    means = {n: per_modality_mean({m: v[n] for m, v in per.items() if n in v}) for n in names}
    if task == "MII" and all(n in means for n in BMR):
        means["mBMR"] = sum(means[n] for n in BMR) / len(BMR)
    skipped = dict(scorer.skipped)
    if task == "MII":
        skipped.pop("SPICE", None)  # not part of ClinKD's MII report either way
    return {"metric": "COCO caption", "per_modality": per, "count": {m: len(r) for m, (r, _) in by_modality.items()},
            "mean": means, "skipped": skipped, "tokenizer": scorer.tokenizer, "modalities": list(MODALITIES)}
