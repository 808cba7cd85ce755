"""The error convention of every command: a user error is one line naming the bad value and what to do,
and exit status 2; a traceback means a bug in d2f.

    if __name__ == "__main__":
        sys.exit(run_main(main))

`UserError` is the base class of every error that a user's input causes (configs, paths, values, data
files, devices, checkpoints); `ConfigError`, `CheckpointError`, `DecodeConfigError`, ... derive from it.
Operating-system errors that come from what the user pointed us at (a missing file, a read-only or full
output location, a permission) count as user errors too. Everything else propagates with its traceback.
`D2F_DEBUG=1` shows the traceback of user errors as well.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and says what to do. A ValueError, so
    code that catches bad values (and the tests) keeps working."""


# OSErrors about a path the user gave (or an output location they chose), not about our code
USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def describe_os_error(e: OSError) -> str:
    """'<path>: <what happened>; <what to do>' for an OSError about a user path."""
    what = {errno.ENOSPC: "no space left on the device; free some space or choose another output location",
            errno.EDQUOT: "disk quota exceeded; free some space or choose another output location",
            errno.EROFS: "read-only file system; choose a writable output location",
            errno.EACCES: "permission denied; choose a location you can read/write",
            errno.EPERM: "operation not permitted; choose a location you can read/write",
            errno.ENOENT: "no such file or directory; check the path",
            errno.ENOTDIR: "a part of the path is not a directory; check the path",
            errno.EISDIR: "is a directory, expected a file; check the path"}.get(e.errno, e.strerror or str(e))
    where = e.filename if e.filename is not None else ""
    return f"{where}: {what}" if where else what


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_main(main: Callable, argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`; user errors become one line on stderr and exit status 2."""
    try:
        rc = main(argv)
        return rc if isinstance(rc, int) else 0
    except UserError as e:
        if os.environ.get("D2F_DEBUG"):
            raise
        message = str(e)
    except OSError as e:
        ours = e.errno is None and isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                  PermissionError))  # raised by d2f with its own message
        if os.environ.get("D2F_DEBUG") or not (ours or e.errno in USER_ERRNOS):
            raise
        message = str(e) if ours else describe_os_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def check_output_location(path, name: str, error: type[UserError] = UserError) -> None:
    """Before any work: the directories above an output `path` that does not exist yet can be created there
    (the nearest existing one is a writable directory, not a file). `name` is how the user set the path
    ('--output-dir', 'output_dir', ...)."""
    from pathlib import Path
    p = Path(path).expanduser().absolute()
    above = next((a for a in p.parents if a.exists()), None)
    if above is None:
        return
    if not above.is_dir():
        raise error(f"{name} {str(path)!r}: {str(above)!r} is a file, so no directory can be created under it; "
                    "choose another location")
    if not os.access(above, os.W_OK | os.X_OK):
        raise error(f"{name} {str(path)!r}: the directory {str(above)!r} is not writable; choose another location")


def check_output_dir(path, name: str, error: type[UserError] = UserError) -> None:
    """Before any work: an output directory is an existing directory or a path that does not exist yet
    (whose parents can be created); `name` is how the user set it ('--output-dir', 'output_dir', ...)."""
    from pathlib import Path
    p = Path(path).expanduser()
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise error(f"{name} {str(path)!r} is not writable; choose another directory")
        return
    if p.exists():
        raise error(f"{str(path)!r} is a file; {name} must be a directory (or a path that does not exist yet)")
    check_output_location(p, name, error)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse turns the error into one usage line and exit status 2)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
