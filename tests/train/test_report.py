"""The run's TensorBoard events, written by `train.report.EventFile` (a record at a time, through files.Lines),
read back as TensorBoard reads them and against what tensorboardX's own SummaryWriter writes."""

import event_files
import pytest
from tensorboardX import SummaryWriter

from clinkd_jax.train import report


def scalars(folder) -> list[tuple[int, str, float]]:
    return sorted((e.step, v.tag, v.simple_value) for path in sorted(folder.iterdir())
                  for e in event_files.events(path) for v in e.summary.value)


def test_the_events_are_tensorboardx_s_and_a_resumed_run_purges_the_steps_past_its_checkpoint(tmp_path):
    """The same scalars into our event file and into tensorboardX's SummaryWriter read back the same (steps, tags,
    float32 values; a non-number is left out). A second file started as a run resumed at step 2 would start it
    (purge from step 3) carries tensorboardX's purge marker, and TensorBoard shows its steps 3-4, not the first
    run's."""
    logged = {1: {"loss": 2.5, "learning_rate": 1e-3}, 2: {"loss": 2.25, "learning_rate": 2e-3},
              3: {"loss": 2.0, "learning_rate": 3e-3, "note": "not a number"}}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    out = report.EventFile.start(str(ours))
    tb = SummaryWriter(str(theirs))
    for step, values in logged.items():
        out.scalars(step, {f"train/{k}": v for k, v in values.items()})
        for k, v in values.items():
            if isinstance(v, float):
                tb.add_scalar(f"train/{k}", v, step)
    out.close()
    tb.close()
    assert scalars(ours) == scalars(theirs) and len(scalars(ours)) == 6
    assert event_files.events(next(ours.iterdir()))[0].file_version == "brain.Event:2"

    resumed = report.EventFile.start(str(ours), purge_from=2)  # here the same file (same pid and second): appended
    resumed.scalars(2, {"train/loss": 12.0})  # resumed from step 1, stopped again after step 2
    resumed.close()
    purge = SummaryWriter(str(tmp_path / "purge"), purge_step=2)
    purge.add_scalar("x", 0.0, 2)
    purge.close()
    marker = [e for e in event_files.events(next((tmp_path / "purge").iterdir())) if e.HasField("session_log")]
    mine = [e for path in ours.iterdir() for e in event_files.events(path) if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in mine] == [(e.step, e.session_log.status) for e in marker]
    assert event_files.shown(ours, "train/loss") == [(1, 2.5), (2, 12.0)]  # not the first run's step 3
    assert event_files.shown(ours, "train/learning_rate") == [(1, pytest.approx(1e-3))]
