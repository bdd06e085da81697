"""Errors a user can fix, and how every command line tool reports them.

A `UserInputError` carries what is wrong, where (a file or a flag) and what to do; a CLI run
through `run_cli` prints it as one line, `error: <what> (<where>): <fix>`, and exits with 2.
The traceback is printed too only when WORKBOOK_DEBUG is set (to anything but 0), so a user
sees the message and a developer can still find the line. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import traceback
from collections.abc import Callable

import torch

DEBUG_VARIABLE = "WORKBOOK_DEBUG"  # set it to 1 to see tracebacks behind user errors
USER_ERROR_EXIT = 2  # argparse's exit status for bad arguments; ours for every user error
# OS errors about a path that the user can fix by choosing another path or freeing space
_PATH_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG)  # fmt: skip


class UserInputError(ValueError):
    """Bad input: `what` is wrong with `where` (a file, folder or flag); `fix` says what to do.

    A ValueError, so code that already guards against bad values catches it too."""

    def __init__(self, what: str, where: str | os.PathLike, fix: str):
        super().__init__(what, str(where), fix)  # args: what pickling needs (worker processes)
        self.what, self.where, self.fix = what, str(where), fix

    def __str__(self) -> str:
        return f"{self.what} ({self.where}): {self.fix}"


class DiskFullError(UserInputError, OSError):
    """Writing `path` failed because its disk (or quota) is full. An OSError too, as the
    failure it replaces; the file that was there before is left as it was."""

    def __init__(self, path: str | os.PathLike, fix: str = ""):
        fix = fix or "free space on that disk or write the output somewhere else"
        super().__init__("the disk is full", path, fix)
        self.errno, self.strerror, self.filename = errno.ENOSPC, "the disk is full", str(path)

    def __reduce__(self):
        return type(self), (self.where, self.fix)


def brief(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut short: what a third-party error says, without
    its pages of advice (torch's unpickler) in the middle of ours."""
    lines = str(error).strip().splitlines() or [""]
    text = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError) or (
            isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _os_error_as_user_error(error: OSError) -> UserInputError | None:
    """A failed open/read/write of a named path -> the same error in the user style."""
    if is_disk_full(error):
        return DiskFullError(error.filename or "the output folder")
    if error.errno not in _PATH_ERRNOS or error.filename is None:
        return None
    return UserInputError(
        error.strerror or str(error), error.filename, "check the path and its permissions"
    )


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the user-error style: `error: <what> (--flag): <fix>`, exit 2. A flag
    type's message may carry its fix after " -> " (see `flag_check`)."""

    def error(self, message: str):
        match = re.fullmatch(r"argument ([^:]+): (.+)", message, flags=re.DOTALL)
        if match:
            flag = match.group(1).split("/")[0]
            what, _, fix = match.group(2).rpartition(" -> ")
            what, fix = (what, fix) if what else (match.group(2), "")
        else:
            flag, what, fix = "command line", message, ""
        fix = fix or f"see `{self.prog} --help`"
        self.exit(USER_ERROR_EXIT, f"error: {what} ({flag}): {fix}\n")


def flag_check(parse: Callable[[str], object], test: Callable, want: str):
    """An argparse `type=` that parses, then refuses values failing `test` by saying what it
    wants: `flag_check(int, lambda v: v >= 1, "an integer >= 1")`."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"got {text!r}, need {want} -> pass {want}")
        return value

    check.__name__ = parse.__name__  # argparse names the type in its own messages
    return check


# Flag types shared by every CLI: what a count, a size, a weight or a level can be
positive_int = flag_check(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = flag_check(int, lambda v: v >= 0, "an integer >= 0")
positive_float = flag_check(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = flag_check(
    float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"
)
probability = flag_check(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
fraction = flag_check(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
grid_resolution = flag_check(int, lambda v: v >= 2, "an integer >= 2 (grid points per axis)")


def check_device(name: str, flag: str = "--device") -> str:
    """A torch device this machine has, or a UserInputError saying which it has instead."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserInputError(
            f"not a device name ({error})", flag, "use cpu, cuda or cuda:N"
        ) from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UserInputError(
                f"{name!r} is not available: this machine has {count} CUDA device(s)", flag,
                "use --device cpu" + (f" or cuda:0..{count - 1}" if count else ""),
            )  # fmt: skip
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError("MPS is not available on this machine", flag, "use --device cpu")
    return name


def run_cli(main: Callable, argv: list[str] | None = None) -> int:
    """Run a CLI's `main(argv)`: user errors (and OS errors about a named path) as one line and
    exit status 2; the traceback too under WORKBOOK_DEBUG=1. -> the exit status"""
    try:
        result = main(argv)
    except UserInputError as error:
        return _report(error, error)
    except OSError as error:
        user_error = _os_error_as_user_error(error)
        if user_error is None:
            raise
        return _report(user_error, error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130  # the shell's status for Ctrl-C
    return result if isinstance(result, int) else 0


def _report(user_error: UserInputError, raised: BaseException) -> int:
    if os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0"):
        traceback.print_exception(raised)
    print(f"error: {user_error}", file=sys.stderr)
    return USER_ERROR_EXIT
