"""The edge every absl command line shares (`main`, `aot`, the pseudo-label writer): a user's mistake ends the
command with one line and exit status 2, a bug with its traceback.

Caught at flag parsing: a `--config.<field>` override that names no field (with the nearest names), a value of the
wrong type, a config file that is missing or does not load, an unknown flag. Caught while running: every
`clinkd_jax.errors.UserError` (a setting, a data file or item, a checkpoint directory). `--verbose` shows the
traceback as well.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Callable

from absl import app, flags
from ml_collections import ConfigDict

from clinkd_jax import files
from clinkd_jax.errors import UserError, one_line

_VERBOSE = flags.DEFINE_bool("verbose", False, "on a config or data error, show the traceback as well")


def fail(message: str) -> None:
    """Print the one line and exit 2. The run's own cleanup has happened while the error unwound (checkpoint
    managers closed); skipping the interpreter's teardown keeps a failed Orbax read's orphaned coroutines from
    printing tracebacks after the line."""
    sys.unraisablehook = lambda _: None  # see above: the orphaned reads' errors, already said in `message`
    logging.getLogger("asyncio").disabled = True
    print(message, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ConfigDict:
    """`path[:arg]` as config_flags reads it: the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config={spec}: no such file")
    module_spec = importlib.util.spec_from_file_location("_clinkd_config", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.getcwd())  # config files import `configs.base` from the repository root
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise UserError(f"--config={spec} does not load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(os.getcwd())


def writable(path: str, flag: str, *, suffixes: tuple[str, ...] = (), folder: bool = False) -> str:
    """`path` if the command can write it there, checked before any work: a file of one of `suffixes` (when given)
    in an existing folder, or a folder (made later if need be) under one; else a UserError naming the flag."""
    ext = os.path.splitext(path)[1].lower()
    if suffixes and ext not in suffixes:
        raise UserError(f"--{flag}={path}: " + (f"{ext} is not" if ext else "no extension, so not") + " one of "
                        + ", ".join(suffixes))
    if os.path.isdir(path) != folder and os.path.exists(path):
        kinds = ("file", "folder")[::-1 if folder else 1]
        raise UserError(f"--{flag}={path}: is a {kinds[1]}, not a {kinds[0]}")
    where = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    if not folder and not os.path.isdir(where):
        raise UserError(f"--{flag}={path}: no such folder {where}")
    while not os.path.exists(where):  # a folder to be made: the nearest one that exists must take it
        where = os.path.dirname(where)
    try:  # the one reliable test (permissions, a read-only mount, root's rights): write something there
        with tempfile.NamedTemporaryFile(dir=where, prefix=".clinkd-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--{flag}={path}: cannot write in {where} ({e.strerror or e})") from None
    return path


def unknown_override(config: ConfigDict, argv: list[str], flag: str = "config") -> str | None:
    """The first `--<flag>.a.b[=v]` that names no field of `config`, said with the nearest existing names."""
    for a in argv:
        if not a.startswith((f"--{flag}.", f"--no{flag}.")):
            continue
        path = a.split("=", 1)[0].split(".", 1)[1]
        node, walked = config, []
        for key in path.split("."):
            if not isinstance(node, ConfigDict) or key not in node:
                names = list(node.keys()) if isinstance(node, ConfigDict) else []
                near = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
                where = ".".join(walked) or flag
                hint = f"; did you mean {', '.join('.'.join(walked + [n]) for n in near)}?" if near else (
                    f"; {where} has {', '.join(sorted(names))}" if names else f"; {where} is a value, not a group")
                return f"--{flag}.{path}: no field {key!r} in {where}{hint}"
            node, walked = node[key], walked + [key]
    return None


def parse_flags(argv: list[str], flag: str = "config") -> list[str]:
    """absl's flag parsing, its failures (and ml_collections' on a bad override) said in one line."""
    verbose = "--verbose" in argv
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS[flag].value if flag in flags.FLAGS else None
        if config is not None and not isinstance(config, str):  # a config_flags file (predict's is a path)
            config.get  # config_flags defers a file's load error to the first attribute read: raise it here
        return rest
    except flags.Error as e:
        if verbose:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # a config's traceback: its end
        fail("config error: " + " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines))
    except Exception:  # ml_collections: AttributeError / KeyError on an override, OSError on the file
        if verbose:
            raise
        spec = _flag_value(argv, flag)
        if spec is None:
            raise
        try:
            message = unknown_override(load_config_file(spec), argv, flag)
        except UserError as e:
            message = str(e)
        if message is None:
            raise
        fail(f"config error: {message}")


class _DiskFullTraceback(logging.Filter):
    """A library (Orbax) that meets a full disk in a thread of its own logs the traceback, then raises the error in
    ours, where it ends the command as the one `disk error:` line: the logged message is kept, its traceback (a
    repeat) only under --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and files.is_disk_full(record.exc_info[1]):
            record.exc_info = record.exc_text = None
        return True


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with the one-line errors."""

    def guarded(argv):
        if not _VERBOSE.value:
            logging.getLogger("absl").addFilter(_DiskFullTraceback())
        try:
            return main(argv)
        except UserError as e:
            if _VERBOSE.value:
                raise
            fail(one_line(e))
        except Exception as e:  # a full disk met by a writer of a library (Orbax, TensorBoard, ArrayRecord)
            if _VERBOSE.value or not files.is_disk_full(e):
                raise
            fail(one_line(files.disk_full(getattr(e, "filename", None) or "a file of the run")))

    app.run(guarded, flags_parser=parse_flags)
