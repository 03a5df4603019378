"""Run reporting: a progress bar (loss, learning rate, tokens/s), metrics.jsonl, TensorBoard events and
a loss-curve PNG, all in the workdir (written by process 0 only), and the stage's W&B run where there is one
(`clinkd_jax.tracking`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time

import jax
from PIL import Image, ImageDraw

from clinkd_jax import files, tracking

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str, *, resume_from: int = 0, progress: bool = True, total: int | None = None):
        self.workdir = workdir
        self.main = jax.process_index() == 0
        self.history: list[tuple[int, dict]] = []
        self.resumed: dict = {}  # the metrics logged at the step a run resumes at (its final ones if it was done)
        self._jsonl = self._tb = self._bar = None
        if not self.main:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.isfile(path):  # a killed run may have logged steps past its last checkpoint: drop them
            with open(path, encoding="utf-8", errors="replace") as f:
                kept = [line.rstrip("\n") + "\n" for line in f if _step(line) <= resume_from]
            files.write_text(path, "".join(kept))
            if kept and _step(kept[-1]) == resume_from:
                self.resumed = {k: v for k, v in json.loads(kept[-1]).items() if k != "step"}
        self._jsonl = files.Lines(path)
        self._tb = EventFile.start(os.path.join(workdir, "tensorboard"), purge_from=resume_from + 1 if resume_from
                                   else None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=resume_from, unit="step", dynamic_ncols=True)
        self._last = resume_from

    def write(self, step: int, metrics: dict) -> None:
        self.history.append((step, metrics))
        if not self.main:
            return
        tracking.active().log(step, {f"train/{k}": v for k, v in metrics.items()})
        self._jsonl.write_json({"step": step, **metrics})
        if self._tb is not None:
            self._tb.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
        if self._bar is not None:
            self._bar.update(step - self._last)
            shown = {k: metrics[k] for k in ("loss", "loss_ce", "loss_kd") if k in metrics}
            shown["lr"] = metrics.get("learning_rate", 0.0)
            shown = {k: f"{v:.4g}" for k, v in shown.items()}
            self._bar.set_postfix(shown | {"tok/s": f"{metrics.get('tokens_per_s', 0):.0f}"})
        self._last = step

    def close(self, failing: bool = False) -> None:
        """`failing`: the run is ending on an error, which the chart must not hide (on a full disk it fails too)."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        if self.history:
            try:
                plot_losses(self.history, os.path.join(self.workdir, "loss.png"))
            except Exception as e:
                if not failing:
                    raise
                log.warning("loss.png not drawn: %s", e)


class EventFile:
    """A TensorBoard event file (TFRecord-framed `Event` protos), written in the step that logs, a whole record at a
    time (`files.Lines.append`): a full disk is one DiskFull there, never a traceback from a writer thread or events
    lost unseen. A resumed run starts a new file that tells TensorBoard to hide the old file's steps from
    `purge_from` on (they were logged past the checkpoint it resumed from)."""

    def __init__(self, path: str, purge_from: int | None = None):
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c

        self._event, self._summary, self._crc = event_pb2, summary_pb2.Summary, masked_crc32c
        self._out = files.Lines(path)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_from is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(wall_time=time.time(), step=purge_from, session_log=start))

    @classmethod
    def start(cls, folder: str, purge_from: int | None = None) -> EventFile | None:
        """A new event file in `folder` (named as TensorBoard looks for them, with the pid: a rerun within the same
        second gets its own); None without tensorboardX (optional: metrics.jsonl has everything)."""
        path = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
        try:
            return cls(path, purge_from)
        except ImportError:
            return None

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._out.append(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def scalars(self, step: int, values: dict) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v))
                                       for k, v in values.items() if isinstance(v, (int, float))])
        self._write(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._out.close()


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
