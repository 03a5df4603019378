"""Caption metrics: our per-modality pipeline against pycocoevalcap's own COCOEvalCap, and the report of
what could not be computed.

Tolerance: our values are rounded to 6 decimals as the released script does, so they agree with
COCOEvalCap's unrounded values within 5e-7.
"""

import pytest

from clinkd_jax.eval import captions as C

PREDS = [
    ("ct_1.png", "The liver shows a bright oval lesion in the right lobe.",
     "a bright oval lesion in the liver.<|im_end|>"),
    ("ct_2.png", "A dark round cyst in the left kidney.", "dark round cyst in the kidney<|im_end|>"),
    ("ct_3.png", "Axial CT of the abdomen with contrast.", "axial ct of the abdomen.<|im_end|>"),
    ("ct_4.png", "No abnormality is seen.", "the image shows no abnormality."),
    ("mr_1.png", "Brain MRI, axial slice, T2 weighted.", "an axial brain MRI slice\nT2 weighted brain MRI\n"),
    ("mr_2.png", "A bright oval lesion near the ventricle.", "bright lesion near the ventricle.<|im_end|>"),
    ("mr_3.png", "Sagittal view of the knee.", ""),
]


def predictions():
    return [{"id": i, "image": im, "question": "q", "annotation": a, "response": r}
            for i, (im, a, r) in enumerate(PREDS)]


needs_java = pytest.mark.skipif(not C.java_available(), reason="no Java runtime: PTB tokenizer and METEOR cannot run")


class _Coco:
    """The two attributes COCOEvalCap reads from a pycocotools COCO object."""

    def __init__(self, anns):
        self.imgToAnns = anns

    def getImgIds(self):
        return list(self.imgToAnns)


@needs_java
def test_agrees_with_coco_eval_cap(monkeypatch):
    import pycocoevalcap.eval as coco_eval

    from clinkd_jax.eval.metrics import extract_information

    class NoSpice:  # SPICE needs CoreNLP jars that cannot be downloaded here
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    scorer = C.CaptionScorer(spice=False)
    try:
        ours = C.caption_metrics(predictions(), "GC", scorer)
    finally:
        scorer.close()
    for modality in ("ct", "mr"):
        items = [p for p in predictions() if p["image"].startswith(modality)]
        gts = _Coco({p["id"]: [{"image_id": p["id"], "caption": p["annotation"]}] for p in items})
        res = _Coco({p["id"]: [{"image_id": p["id"], "caption": extract_information(p["response"])}] for p in items})
        ev = coco_eval.COCOEvalCap(gts, res)
        ev.evaluate()
        for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
            assert ours["per_modality"][modality][name] == pytest.approx(ev.eval[name], abs=5e-7), (modality, name)
    assert ours["mean"]["CIDEr"] == pytest.approx(
        (ours["per_modality"]["ct"]["CIDEr"] + ours["per_modality"]["mr"]["CIDEr"]) / 8)  # 6 empty modalities = 0
    assert ours["skipped"] == {"SPICE": "turned off (eval.spice=False)"}
    assert "PTB" in ours["tokenizer"] and "approximation" not in ours["tokenizer"]


def test_without_java_says_what_it_could_not_compute():
    scorer = C.CaptionScorer(java=False)
    r = C.caption_metrics(predictions(), "MII", scorer)
    assert "METEOR" in r["skipped"] and "Java" in r["skipped"]["METEOR"]
    assert "METEOR" not in r["mean"] and "mBMR" not in r["mean"]  # mBMR needs METEOR: not faked
    assert "SPICE" not in r["mean"]
    assert "approximation" in r["tokenizer"]
    assert r["mean"]["Bleu_1"] > 0.1 and r["mean"]["CIDEr"] > 0  # the rest is computed
    g = C.caption_metrics(predictions(), "GC", scorer)
    assert "SPICE" in g["skipped"]  # GC reports SPICE; here as skipped, never as 0


@needs_java
def test_mii_mbmr_and_no_spice():
    scorer = C.CaptionScorer()
    try:
        r = C.caption_metrics(predictions(), "MII", scorer)
    finally:
        scorer.close()
    bmr = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L")
    assert r["mean"]["mBMR"] == pytest.approx(sum(r["mean"][k] for k in bmr) / 6)
    assert "SPICE" not in r["mean"] and "SPICE" not in r["skipped"]


def test_spice_reported_when_jars_are_missing(monkeypatch):
    monkeypatch.setattr(C, "spice_jars_missing", lambda: ["/x/stanford-corenlp-3.6.0.jar"])
    scorer = C.CaptionScorer(java=True)
    try:
        assert "stanford-corenlp-3.6.0.jar" in scorer.skipped["SPICE"]
        assert "SPICE" not in [n for _, names in scorer.scorers for n in names]
    finally:
        scorer.close()


def test_python_tokenizer_follows_ptb_output():
    text = "The Liver, (enlarged) -- see: it's 3.5 cm!"
    expected = "the liver -lrb- enlarged -rrb- see it 's 3.5 cm"  # lower-cased bracket tokens survive, as in PTB
    assert C.python_tokenize(text) == expected
    if C.java_available():
        scorer = C.CaptionScorer(spice=False)
        try:
            assert scorer.tokenize({0: [text]}) == {0: [expected]}
        finally:
            scorer.close()
