"""The errors a user can fix: a setting, a data file or item, a checkpoint directory. Each names what is at fault,
and the command lines end with it as one line (`config error: ...`, `data error: ...`, exit status 2) rather than
a traceback (`clinkd_jax.cli`). Everything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Base of the errors a user fixes; `kind` is the word the one-line message starts with."""

    kind = "config"


def one_line(e: UserError) -> str:
    """`<kind> error: <message>`, the message's lines joined (a log line stays one line)."""
    return f"{e.kind} error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip())
