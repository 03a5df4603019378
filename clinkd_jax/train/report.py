"""Run reporting: a progress bar (loss, learning rate, tokens/s), metrics.jsonl, TensorBoard events and
a loss-curve PNG, all in the workdir (written by process 0 only)."""

from __future__ import annotations

import json
import os

import jax
from PIL import Image, ImageDraw

from clinkd_jax import files


class MetricsWriter:
    def __init__(self, workdir: str, *, resume_from: int = 0, progress: bool = True, total: int | None = None):
        self.workdir = workdir
        self.main = jax.process_index() == 0
        self.history: list[tuple[int, dict]] = []
        self._jsonl = self._tb = self._bar = None
        if not self.main:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.isfile(path):  # a killed run may have logged steps past its last checkpoint: drop them
            with open(path, encoding="utf-8", errors="replace") as f:
                kept = [line.rstrip("\n") + "\n" for line in f if _step(line) <= resume_from]
            files.write_text(path, "".join(kept))
        self._jsonl = files.Lines(path)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional: metrics.jsonl has everything
            self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=resume_from, unit="step", dynamic_ncols=True)
        self._last = resume_from

    def write(self, step: int, metrics: dict) -> None:
        self.history.append((step, metrics))
        if not self.main:
            return
        self._jsonl.write_json({"step": step, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.update(step - self._last)
            shown = {k: metrics[k] for k in ("loss", "loss_ce", "loss_kd") if k in metrics}
            shown["lr"] = metrics.get("learning_rate", 0.0)
            shown = {k: f"{v:.4g}" for k, v in shown.items()}
            self._bar.set_postfix(shown | {"tok/s": f"{metrics.get('tokens_per_s', 0):.0f}"})
        self._last = step

    def close(self) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        if self.history:
            plot_losses(self.history, os.path.join(self.workdir, "loss.png"))


def _step(line: str) -> float:
    """The step of a metrics line; a torn or empty line counts as past every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_losses(history, path: str, size=(640, 360)) -> None:
    """A plain line chart of the loss terms against the step (PIL; no plotting library needed)."""
    w, h, pad = size[0], size[1], 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    keys = [k for k in ("loss", "loss_ce", "loss_kd") if all(k in m for _, m in history)]
    steps = [s for s, _ in history]
    values = [m[k] for _, m in history for k in keys]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    xy = lambda s, v: (pad + (s - s0) / (s1 - s0) * (w - 2 * pad), h - pad - (v - lo) / (hi - lo) * (h - 2 * pad))
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    colours = {"loss": "black", "loss_ce": "royalblue", "loss_kd": "darkorange"}
    for i, k in enumerate(keys):
        pts = [xy(s, m[k]) for s, m in history]
        if len(pts) > 1:
            d.line(pts, fill=colours[k], width=2)
        d.text((pad + 5 + 90 * i, 8), k, fill=colours[k])
    d.text((pad, h - pad + 8), f"step {s0}", fill="black")
    d.text((w - pad - 60, h - pad + 8), f"step {s1}", fill="black")
    d.text((2, pad), f"{hi:.3g}", fill="black")
    d.text((2, h - pad - 10), f"{lo:.3g}", fill="black")
    files.save_image(path, img)
