"""A minutes-long CPU run on the bundled demo data: a tiny model (real Qwen2 tokenizer and vocabulary)
trained from scratch. `--config.stage=kd --config.teacher.orbax_dir=...` distils instead."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny_qwen"
    c.model.dtype = "float32"
    c.data.format = "demo"
    c.data.batch_size = 4
    c.data.text_buckets = (192, 320)
    c.data.patch_buckets = (64, 256)
    c.data.max_pixels = 224 * 224
    c.data.num_epochs = 2
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 3
    c.optim.grad_accum = 1
    c.train.loss_chunk = 64
    c.train.log_every = 1
    c.checkpoint.save_every = 10
    c.mesh.shape = (1, 1, 1)
    return c
