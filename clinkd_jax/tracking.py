"""Experiment tracking in Weights & Biases, beside the workdir's own records (metrics.jsonl, TensorBoard events, the
evaluation's tables and gallery), which stay the source of truth.

With `train.wandb_project` set, each stage is one W&B run: named `<group>/<stage>`, its job type the stage's kind,
its config the stage's resolved config. The stages of one recipe run share a W&B group (`train.wandb_run_name`, else
the workdir's name and a random suffix kept in `<workdir>/wandb_group.json`), and the recipe's summary is a run of
its own in the group (`<group>/recipe`). What the stages log comes from where it is made: the training metrics per
step (`MetricsWriter`), evaluations during training, an evaluation's tables and gallery (`eval.run`).

Only process 0 talks to W&B. A stage's W&B run id and the last step it logged are kept in
`<stage dir>/wandb_run.json`: a resumed stage continues the same W&B run, and the steps a killed run had logged past
its last checkpoint (computed again, identically, after the resume) are not logged twice. W&B's own files go to
`<stage dir>/wandb/` (or `$WANDB_DIR`); `WANDB_MODE=offline` keeps the runs there for `wandb sync`.
`wandb` is an optional extra: pip install 'clinkd_jax[wandb]'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets

import jax

from clinkd_jax import distributed, files
from clinkd_jax.models.config import ConfigError

log = logging.getLogger("clinkd_jax.tracking")
RUN_FILE = "wandb_run.json"
GROUP_FILE = "wandb_group.json"
FIELDS = ("wandb_entity", "wandb_run_name", "wandb_tags")  # besides wandb_project


@dataclasses.dataclass(frozen=True)
class Table:
    """A table to log: column names and rows of cells (numbers, text)."""

    columns: list
    rows: list


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image to log with box overlays: {group name (e.g. "ground_truth"): [(x1, y1, x2, y2) as fractions of the
    image]}, and a caption."""

    image: object  # PIL image
    boxes: dict
    caption: str = ""


def check(c) -> None:
    """The W&B fields agree with each other, and the package is there when they ask for it (a `config error:` line
    before anything runs, never a traceback after the first stage)."""
    t = c.train
    if not t.wandb_project:
        for name in FIELDS:
            if t[name]:
                raise ConfigError(f"train.{name}={t[name]!r} is set but train.wandb_project is empty: nothing would "
                                  "be logged to Weights & Biases")
        return
    if not isinstance(t.wandb_tags, (tuple, list)) or not all(isinstance(x, str) and 0 < len(x) <= 64
                                                               for x in t.wandb_tags):
        raise ConfigError(f"train.wandb_tags={t.wandb_tags!r}: a tuple of tags of 1 to 64 characters (W&B's limit)")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.wandb_project={t.wandb_project!r}: the wandb package is not installed "
                          "(pip install 'clinkd_jax[wandb]'), or leave train.wandb_project empty") from None


class Run:
    """Where a stage's reports go besides its files: nowhere (no project set, or a process other than 0)."""

    enabled = False  # whether what is handed to it goes anywhere (skip making what only W&B would show)

    def log(self, step: int, values: dict) -> None:
        """Scalars of training step `step`."""

    def log_result(self, values: dict) -> None:
        """What a stage logs once (numbers, `Table`s, lists of `Picture`s), as the run's next entry."""

    def summarize(self, values: dict) -> None:
        """Numbers that sum the run up (W&B's runs table shows them side by side)."""


class WandbRun(Run):
    """A W&B run kept across resumes: its id and the last step logged live in `state_path`."""

    enabled = True

    def __init__(self, run, state_path: str, state: dict):
        self.run, self.state_path, self.state = run, state_path, state
        self.floor = state.get("last_step", -1)  # what an earlier process of this stage logged
        self.finished = False

    @classmethod
    def open(cls, c, stage_dir: str, name: str, group: str, kind: str, extra: dict) -> WandbRun:
        import wandb

        path = os.path.join(stage_dir, RUN_FILE)
        state = files.read_json(path)  # a torn one is set aside: a new W&B run, the old one keeps what it had
        state = state if isinstance(state, dict) and "id" in state else {"id": secrets.token_hex(4)}
        files.write_json(path, state)
        t = c.train
        config = {k: v for k, v in c.to_dict().items() if k not in ("stages", "stage_settings")}
        try:
            run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None, group=group,
                             name=f"{group}/{name}", job_type=kind, tags=list(t.wandb_tags), id=state["id"],
                             resume="allow", config={**config, **extra},
                             dir=None if os.environ.get("WANDB_DIR") else stage_dir)
        except wandb.errors.Error as e:  # not logged in, no network: before the stage runs, in one line
            raise ConfigError(f"train.wandb_project={t.wandb_project!r}: Weights & Biases did not start the run "
                              f"({str(e).strip().splitlines()[0]}); `wandb login`, or WANDB_MODE=offline to log to "
                              "disk and `wandb sync` later") from None
        log.info("Weights & Biases: run %s (%s) in group %s", run.id, run.name, group)
        return cls(run, path, state)

    def _logged(self, step: int) -> None:
        self.state["last_step"] = step
        files.write_json(self.state_path, self.state)

    def log(self, step: int, values: dict) -> None:
        if step <= self.floor:  # logged by the killed process this one resumed
            return
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        self._logged(step)

    def log_result(self, values: dict) -> None:
        step = max(self.floor, self.state.get("last_step", -1)) + 1
        self.run.log({k: _wandb_value(v) for k, v in values.items()}, step=step)
        self._logged(step)

    def summarize(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool) -> None:
        if not self.finished:  # once: a collective timeout may have finished it from its watchdog
            self.finished = True
            self.run.finish(exit_code=1 if failed else 0)


def _wandb_value(v):
    import wandb

    if isinstance(v, Table):
        return wandb.Table(columns=list(v.columns), data=[list(r) for r in v.rows])
    if isinstance(v, list) and v and isinstance(v[0], Picture):
        return [_image(p) for p in v]
    return v


def _image(p: Picture):
    import wandb

    labels = {i: group for i, group in enumerate(p.boxes)}
    boxes = {group: {"box_data": [{"position": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]},
                                   "class_id": i, "box_caption": group} for b in bs],
                     "class_labels": labels}
             for i, (group, bs) in enumerate(p.boxes.items())}
    return wandb.Image(p.image, boxes=boxes, caption=p.caption)


def group_name(c, group_dir: str) -> str:
    """The W&B group of a recipe run: train.wandb_run_name, else the workdir's name with a suffix made once."""
    if c.train.wandb_run_name:
        return c.train.wandb_run_name
    path = os.path.join(group_dir, GROUP_FILE)
    kept = files.read_json(path)
    if isinstance(kept, dict) and isinstance(kept.get("group"), str):
        return kept["group"]
    group = f"{os.path.basename(os.path.abspath(group_dir))}-{secrets.token_hex(3)}"
    files.write_json(path, {"group": group})
    return group


_active: Run = Run()


def active() -> Run:
    """The running stage's W&B run (a `Run` that logs nothing when there is none)."""
    return _active


@contextlib.contextmanager
def stage_run(c, stage_dir: str, name: str, group_dir: str, extra: dict | None = None, kind: str = ""):
    """The W&B run of one stage (`name`, of `kind`: c.stage by default) of the run in `group_dir`, with `extra` in
    its config, active while the stage runs; finished as failed if the stage raises."""
    global _active
    check(c)
    if not c.train.wandb_project or jax.process_index() != 0:
        yield _active
        return
    os.makedirs(stage_dir, exist_ok=True)
    run = WandbRun.open(c, stage_dir, name, group_name(c, group_dir), kind or c.stage,
                        {"stage_name": name, **(extra or {})})
    _active, failed = run, True
    try:
        with distributed.last_words(lambda: run.finish(failed=True)):
            yield run
        failed = False
    finally:
        _active = Run()
        run.finish(failed)
