"""Writing files so that nothing already on disk is lost: the one way the project writes.

Every file (or folder) is written under a temporary name in the same folder and renamed over
its destination with `os.replace` only once complete. A crash, Ctrl-C or a full disk while
writing leaves the previous file as it was and no temporary behind; a full disk is reported
as a `DiskFullError` naming the path, whatever the writer raised (torch.save says only
"unexpected pos", PIL and trimesh say other things).

    with atomic_path("mesh.obj") as temporary:   # any writer that takes a path
        mesh.export(temporary)                   # the temporary keeps the suffix
    write_text("config.json", text)
    with atomic_folder("adapter") as folder:     # a folder of files, replaced as a whole
        ...
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import DiskFullError, UserInputError, is_disk_full

# At most this much space left after a failed write means the disk filled up, whatever the
# writer raised: writers that buffer (torch.save, zip files) lose the errno on the way.
NEARLY_FULL_BYTES = 1 << 20


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _disk_full_instead(error: Exception, path: Path) -> DiskFullError | None:
    """The DiskFullError to raise for `error`, or None when the disk is not the cause.
    Call while the failed temporary still takes its space."""
    if isinstance(error, DiskFullError):
        return error
    try:
        nearly_full = _free_bytes(path.parent) < NEARLY_FULL_BYTES
    except OSError:
        nearly_full = False
    return DiskFullError(path) if is_disk_full(error) or nearly_full else None


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique sibling of `path` that keeps its suffix. Not tempfile.mkstemp: its
    private permissions (0600) would stay on the final file; these get the umask's."""
    return path.with_name(f".{path.stem}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _replacing(path: Path, temporary: Path) -> Iterator[Path]:
    """Yield `temporary`; afterwards put it in place of `path`, or remove it on any failure."""
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():  # a folder cannot be renamed onto a folder
            stale = _temporary_name(path, "old")
            os.replace(path, stale)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.replace(stale, path)  # the old folder back, never neither
                raise
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except Exception as error:
        disk_full = _disk_full_instead(error, path)
        _remove(temporary)
        if disk_full is not None:
            raise disk_full from error
        if isinstance(error, PermissionError | IsADirectoryError):
            raise UserInputError(
                f"cannot write there ({error.strerror})", path,
                "choose a folder you can write to, or change its permissions",
            ) from error  # fmt: skip
        raise
    except BaseException:  # Ctrl-C: no leftovers either, and no message of ours
        _remove(temporary)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = True) -> Iterator[Path]:
    """A temporary path next to `path` (same suffix, so writers pick the same format) that
    replaces `path` when the block ends without an error. `sync`: flush it to the disk
    first, so a power cut cannot leave an empty file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path, _temporary_name(path)) as temporary:
        yield temporary
        if sync:
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to `path` that replaces the folder `path` (if any) as a whole
    when the block ends without an error: readers see the old folder or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    temporary.mkdir()
    with _replacing(path, temporary) as folder:
        yield folder


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """torch.save, atomically. Through a file object: given a path, torch names the archive's
    records after the file, here a random temporary name, so equal objects gave unequal files."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        torch.save(obj, file)
    return Path(path)


def copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temporary:
        shutil.copyfile(source, temporary)
    return Path(path)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log file: the text lands whole or not at all (a failed append is cut off
    again, so earlier lines stay readable). Rewriting a growing log at every line would cost
    the square of its length."""
    path = Path(path)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(handle).st_size
        data = memoryview(text.encode("utf-8"))
        try:
            while data:  # os.write may write part of it
                data = data[os.write(handle, data) :]
        except Exception as error:
            os.ftruncate(handle, size)
            disk_full = _disk_full_instead(error, path)
            if disk_full is not None:
                raise disk_full from error
            raise
    finally:
        os.close(handle)
