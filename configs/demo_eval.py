"""Evaluate on the bundled demo test files (Test_VG/RO/GC/MII.json, generated into the workdir) with the
BiRD/ClinKD protocol. Default model: a random tiny one; point at a trained one with
`--config.model.preset= --config.model.orbax_dir=<workdir of a demo_train run>/params`."""

from configs import base


def demo_eval_settings(c):
    """The evaluation fields for the demo data (also used by configs/demo.py)."""
    c.eval.batch_size = 8
    c.eval.text_buckets = (192, 320)
    c.eval.patch_buckets = (256,)  # demo images are <= 224 px a side
    c.eval.min_pixels = 64 * 64  # scaled-down budget: the demo images are small
    c.eval.max_pixels = 224 * 224
    c.eval.gallery_per_modality = 2
    return c


def get_config():
    c = base.get_config()
    c.stage = "eval"
    c.model.preset = "tiny_qwen"
    c.model.dtype = "float32"
    c.data.format = "demo"
    c.mesh.shape = (1, 1, 1)
    return demo_eval_settings(c)
