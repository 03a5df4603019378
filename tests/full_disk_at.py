"""Run a clinkd_jax command on a disk that fills at a chosen write, or list the writes it makes:

    python tests/full_disk_at.py ROOT PATTERN N module args...     the disk under ROOT fills at the Nth write to a
                                                                    file matching PATTERN
    python tests/full_disk_at.py ROOT --list OUT.jsonl module args...   every write under ROOT, in order, to OUT.jsonl

A write is an open of a file for writing (`open`, `os.open`, `tempfile.mkstemp`: Python's "open" audit event) or
an `os.write` to it (how `files.Lines` adds lines). The temporary file of an atomic write (`.NAME.XXXXXXXX.tmp`)
counts as a write to NAME. PATTERN is an fnmatch pattern on the path relative to ROOT. From the chosen write on,
every write under ROOT fails with ENOSPC, as on a full disk (the command's own clean-up writes meet it too).

What this cannot reach: writes from native code (TensorStore, under Orbax's checkpoints), which the tmpfs tests
(tests/test_faults.py, tests/test_disk_full.py) fill for real.
"""

import errno
import fnmatch
import json
import os
import re
import runpy
import sys

_TMP = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}\.tmp$")  # files.atomic's temporary file: .NAME.XXXXXXXX.tmp
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _target(path: str, root: str) -> str | None:
    """`path` relative to root, as the file it is written for; None outside root."""
    path = os.path.abspath(path)
    if os.path.commonpath([path, root]) != root:
        return None
    found = _TMP.match(os.path.basename(path))
    return os.path.relpath(os.path.join(os.path.dirname(path), found.group(1)) if found else path, root)


class Disk:
    def __init__(self, root: str, pattern: str | None = None, nth: int = 1, listing: str | None = None):
        self.root, self.pattern, self.nth, self.seen, self.full = os.path.abspath(root), pattern, nth, 0, False
        self.listing = open(listing, "w", buffering=1) if listing else None  # noqa: SIM115 (the process's life)

    def write(self, path: str, how: str) -> None:
        """A write to `path` is about to happen: note it, or fail it as a full disk would."""
        name = _target(path, self.root)
        if name is None:
            return
        if self.listing:
            self.listing.write(json.dumps({"file": name, "how": how}) + "\n")
            return
        if not self.full and fnmatch.fnmatch(name, self.pattern):
            self.seen += 1
            self.full = self.seen >= self.nth
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def audit(self, event: str, args) -> None:
        if event == "open" and isinstance(args[0], str):
            path, mode, flags = args
            if (mode is not None and any(m in mode for m in "wax+")) or (mode is None and flags & _WRITING):
                self.write(path, "open")

    def os_write(self, real):
        def write(fd, data):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = None
            if path and path.startswith("/"):
                self.write(path, "append")
            return real(fd, data)

        return write


if __name__ == "__main__":
    root, args = sys.argv[1], sys.argv[2:]
    if args[0] == "--list":
        disk, args = Disk(root, listing=args[1]), args[2:]
    else:
        disk, args = Disk(root, args[0], int(args[1])), args[2:]
    sys.addaudithook(disk.audit)
    os.write = disk.os_write(os.write)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module, sys.argv = args[0], [args[0], *args[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
