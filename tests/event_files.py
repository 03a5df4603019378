"""TensorBoard event files read back as TensorBoard reads them (TFRecord framing with its checksums, `Event`
protos from tensorboardX), for tests: no tensorboard install needed."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c


def events(path) -> list:
    """The `Event`s of one file, in order; a broken frame or checksum fails."""
    data, at, out = open(path, "rb").read(), 0, []
    while at < len(data):
        head = data[at:at + 8]
        (n,) = struct.unpack("<Q", head)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(head), (path, at)
        body = data[at + 12:at + 12 + n]
        assert struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == masked_crc32c(body), (path, at)
        out.append(event_pb2.Event.FromString(body))
        at += 16 + n
    return out


def shown(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows a run folder: its event files in the order they were made, a
    SessionLog START at step s hiding every earlier event at step >= s (how a resumed run purges)."""
    made = lambda p: int(os.path.basename(p).split(".")[3])  # noqa: E731 events.out.tfevents.<time>.<host>[...]
    steps = {}
    for path in sorted(glob.glob(f"{folder}/events.out.tfevents.*"), key=made):
        for e in events(path):
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                steps = {s: v for s, v in steps.items() if s < e.step}
            for v in e.summary.value:
                if v.tag == tag:
                    steps[e.step] = v.simple_value
    return sorted(steps.items())
