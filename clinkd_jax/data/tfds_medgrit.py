"""TFDS builder for Med-GRIT-270k (manual download: the QA files are form-gated, the images come from
SA-Med2D-20M), written as ArrayRecord so it works without TensorFlow and reads through
`tfds.data_source` straight into the Grain pipeline.

Manual directory layout (what the BiRD authors send plus the SA-Med2D PNGs, or your own DICOM studies):
    <manual_dir>/images/<id>.png   (or .dcm, .jpg, ...: the first of `image_ext` that exists)
    <manual_dir>/train.json                       training conversations ({"from", "value"} turns)
    <manual_dir>/Test_VG.json, Test_RO.json, Test_GC.json, Test_MII.json   test items ([question, answer])
Any file that is absent is simply not a split. Splits: train, test_vg, test_ro, test_gc, test_mii.
Images are stored as decoded RGB (DICOM windowed to 8 bits as `clinkd_jax.data.image.load_dicom` does);
boxes on the model's 0-1000 scale (0-1 float files converted, `clinkd_jax.data.markup`).

    from clinkd_jax.data import tfds_medgrit
    tfds_medgrit.build(data_dir="~/tensorflow_datasets", manual_dir="/data/medgrit")   # once
    records = tfds_medgrit.records(data_dir="~/tensorflow_datasets", split="train")     # lazy
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from clinkd_jax.data import image as image_lib
from clinkd_jax.data.records import IMAGE_EXTS, Record, SkipLog, Turn, read_medgrit

SPLIT_FILES = {"train": "train.json", "test_vg": "Test_VG.json", "test_ro": "Test_RO.json",
               "test_gc": "Test_GC.json", "test_mii": "Test_MII.json"}


class MedGrit(tfds.core.GeneratorBasedBuilder):
    """Med-GRIT-270k (BiRD): grounded medical conversations over SA-Med2D-20M images."""

    name = "med_grit"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Request the Med-GRIT-270k QA files from the BiRD authors (Google form linked from "
        "github.com/ShawnHuang497/BiRD) and download the SA-Med2D-20M images. Put the images under "
        "<manual_dir>/images/ and the JSON files as train.json, Test_VG.json, Test_RO.json, Test_GC.json, "
        "Test_MII.json in <manual_dir>."
    )

    def __init__(self, *, image_ext=IMAGE_EXTS, **kwargs):
        super().__init__(**kwargs)
        self.image_ext = tuple(image_ext)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "modality": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 3)),
                "roles": tfds.features.Sequence(tfds.features.Text()),
                "texts": tfds.features.Sequence(tfds.features.Text()),
            }),
            homepage="https://github.com/ShawnHuang497/BiRD",
        )

    def _split_generators(self, dl_manager):
        manual = dl_manager.manual_dir
        splits = {s: f for s, f in SPLIT_FILES.items() if os.path.isfile(os.path.join(manual, f))}
        if not splits:
            raise FileNotFoundError(f"{manual}: none of {', '.join(SPLIT_FILES.values())} found. "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        images = os.path.join(manual, "images")
        return {s: self._generate_examples(os.path.join(manual, f), images) for s, f in splits.items()}

    def _generate_examples(self, path, image_dir):
        log = SkipLog()
        for r in read_medgrit(path, image_dir, log=log, image_ext=self.image_ext):
            try:
                rgb = image_lib.to_rgb(image_lib.load_image(r.images[0]))
            except image_lib.ImageError as e:  # a corrupt file is skipped and counted, not fatal
                log.skip("unreadable image", r.source, str(e))
                continue
            yield r.source, {"id": r.id, "modality": r.modality, "image": rgb,
                             "roles": [t.role for t in r.turns], "texts": [t.text for t in r.turns]}
        if log.total:
            print(f"med_grit {os.path.basename(path)}: {log.report()}")


def build(data_dir: str, manual_dir: str, image_ext=IMAGE_EXTS) -> tfds.core.DatasetBuilder:
    builder = MedGrit(data_dir=os.path.expanduser(data_dir), file_format="array_record", image_ext=image_ext)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


class TfdsRecords:
    """A lazy, random-access sequence of `Record`s over a built split (images decoded on access)."""

    def __init__(self, source, split: str):
        self._source, self._split = source, split

    def __len__(self):
        return len(self._source)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i) -> Record:
        ex = self._source[i]
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
        turns = tuple(Turn(text(r), text(t)) for r, t in zip(ex["roles"], ex["texts"]))
        return Record(text(ex["id"]), (np.asarray(ex["image"]),), turns, text(ex["modality"]),
                      f"med_grit/{self._split}[{i}]", i)


def records(data_dir: str, split: str = "train") -> TfdsRecords:
    source = tfds.data_source("med_grit", data_dir=os.path.expanduser(data_dir), split=split,
                              builder_kwargs={"file_format": "array_record"})
    return TfdsRecords(source, split)
