"""Every file a command writes goes through here, so that nothing is lost at any write:

* a whole file is written atomically: into a temporary file beside it, flushed and fsynced, then renamed over it;
  a reader sees the old file or the new one, never half of one;
* a growing file (predictions, metrics lines, an evaluation curve) takes whole lines (`Lines`): a crash or a full
  disk leaves at most a torn last line, which `read_lines` drops (the caller redoes what it held);
* a full disk (ENOSPC, or a quota) is one `DiskFull` naming the file, the space free there and, where known, the
  space the write needed; the command lines end with it as one `disk error:` line (`clinkd_jax.cli`);
* a file of our own that reads back torn, empty or unreadable (`read_json`) is named in the log, set aside as
  `<name>.unreadable[.k]` and reported as missing, so the caller makes it again: never a `JSONDecodeError`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import tempfile

from clinkd_jax.errors import UserError

log = logging.getLogger("clinkd_jax.files")
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(_UMASK)
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write that found no room: the path, the space free there, the space it needed where known."""

    kind = "disk"


def free_bytes(path: str) -> int | None:
    """Bytes free to an unprivileged writer on the file system holding `path` (or its nearest existing parent)."""
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def size_text(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception's chain (TensorStore and Orbax report it as text)."""
    chain = []
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return any(isinstance(x, OSError) and x.errno in _FULL for x in chain) or any(
        t in str(x) for x in chain for t in ("No space left on device", "Disk quota exceeded"))


def disk_full(path: str, needed: int | None = None) -> DiskFull:
    """The one-line error for a full disk at `path`."""
    need = f", needed {size_text(needed)}" if needed else ""
    return DiskFull(f"{path}: no space left on the device ({size_text(free_bytes(path))} free{need}); make room "
                    "and run the same command again")


@contextlib.contextmanager
def _reported(path: str, needed: int | None = None):
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, needed) from e
        raise


@contextlib.contextmanager
def atomic(path: str, needed: int | None = None):
    """A binary file object whose bytes become `path` when the block ends without an error (temporary file beside
    it, fsync, rename); on any error `path` is as it was and the temporary file is gone. For files too large to
    hold in memory (model shards); `write_bytes` for the rest."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    with _reported(path, needed):
        os.makedirs(folder, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            # the mode a plain open() would give (mkstemp's is owner-only), or the replaced file's
            os.fchmod(fd, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)


def write_bytes(path: str, data: bytes) -> str:
    """`data` as the whole of `path`, atomically; returns `path`."""
    with atomic(path, len(data)) as f:
        f.write(data)
    return path


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, indent: int | None = 2, default=None) -> str:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n")


def save_image(path: str, img, **kwargs) -> str:
    """A PIL image, encoded in memory (format from the extension) and written atomically."""
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        os.path.splitext(path)[1].lower(), os.path.splitext(path)[1][1:].upper() or "PNG")
    img.save(buf, format=fmt, **kwargs)
    return write_bytes(path, buf.getvalue())


def copy_file(src: str, dst: str) -> str:
    """`src`'s bytes to `dst`, atomically (metadata too, as shutil.copy2 keeps it)."""
    with open(src, "rb") as f:
        write_bytes(dst, f.read())
    shutil.copystat(src, dst)
    return dst


class Lines:
    """A file that grows by whole lines (JSON lines, logs) or whole records (`append`), written unbuffered: each
    `write` puts out one or more complete lines; `sync()` fsyncs. A full disk cuts the file back to its last whole
    line and raises DiskFull."""

    def __init__(self, path: str, mode: str = "a"):
        self.path = path
        with _reported(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if mode == "w" else 0),
                               0o644)

    def write(self, *lines: str) -> None:
        self.append("".join(x if x.endswith("\n") else x + "\n" for x in lines).encode("utf-8"))

    def append(self, data: bytes) -> None:
        """`data` at the end, all of it or (on a full disk) none of it: for records that are not text lines."""
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            if not is_disk_full(e):
                raise
            with contextlib.suppress(OSError):  # whole lines only: drop what part of these got out
                os.ftruncate(self._fd, start)
            raise disk_full(self.path, len(data)) from e

    def write_json(self, obj) -> None:
        self.write(json.dumps(obj, ensure_ascii=False))

    def sync(self) -> None:
        with _reported(self.path):
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def set_aside(path: str, why: str = "") -> str:
    """Move a file or folder of ours that cannot be used to `<path>.unreadable` (`-2`, `-3`, ... if taken), kept for a
    look; with `why`, say so in the log. Returns the new path."""
    dest, k = f"{path}.unreadable", 1
    while os.path.exists(dest):
        k += 1
        dest = f"{path}.unreadable-{k}"
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another host of the run set it aside first (a shared workdir)
        return dest
    if why:
        log.warning("%s: %s; set aside as %s, made again", path, why, os.path.basename(dest))
    return dest


def read_json(path: str, default=None):
    """A JSON file of ours: its value; `default` when it does not exist; a torn, empty or unreadable one is set
    aside (named in the log) and `default` returned, so the caller makes it again."""
    if not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError("empty")
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        set_aside(path, f"unreadable ({'empty' if str(e) == 'empty' else type(e).__name__})")
        return default


def read_lines(path: str, parse=json.loads, rewrite: bool = True) -> list:
    """The parsed lines of a file of ours; a line that does not parse (a torn last line, left by a crash or a full
    disk) is dropped, named in the log, and (with `rewrite`) the file is rewritten, atomically, without it."""
    if not os.path.isfile(path):
        return []
    good, kept, dropped = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                good.append(parse(line))
                kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                dropped += 1
    if dropped:
        log.warning("%s: dropped %d unreadable line(s) (an interrupted write); what they held is made again",
                    path, dropped)
        if rewrite:
            write_text(path, "".join(kept))
    return good
