"""Files and directories that appear whole or not at all, readable by others as the umask allows.

Every file and folder cfs_lightning writes goes through here: a temporary sibling is written,
flushed to disk and renamed over the target in one step, so a reader (or a rerun after a kill)
never meets a half-written one, and an existing one is only ever replaced by a finished one
(a folder's old version waits aside, as `<name>.old`, until the new one is in place).
`tempfile` creates its files 0600 and folders 0700; they are given the mode a plain `open` or
`mkdir` would have (0666 / 0777 less the umask), so a colleague on a shared machine can read
exported models, shards and results. `exclusive_lock` keeps a second writer of the same
directory out.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class LockedError(RuntimeError):
    """Another process holds the lock of what this one was about to write; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(folder: Path) -> None:
    """Give what was written into `folder` a plain open's / mkdir's mode where a writer made it
    private (safetensors writes its files 0600, whatever the umask), and flush it all to disk, so
    that the rename that publishes `folder` never publishes unwritten data."""
    mask = _umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = os.stat(path).st_mode
        wanted = (0o777 if path.is_dir() or mode & 0o100 else 0o666) & ~mask
        if mode & wanted != wanted:
            os.chmod(path, (mode | wanted) & 0o7777)
        fsync(path)
    fsync(folder)


def _aside(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def restore_dir(out: str | Path) -> None:
    """Undo a `replace_dir` killed between its two renames: the old `out`, moved aside to
    `<out>.old`, goes back in place (it is still the complete old version)."""
    out = Path(out)
    if _aside(out).is_dir() and not out.exists():
        os.replace(_aside(out), out)
        fsync(out.parent)


def replace_dir(src: str | Path, out: str | Path) -> None:
    """Publish the finished folder `src` as `out`, which is at every instant either the old
    version or the new one, whole.

    `src` (a sibling of `out`) holds files already on disk with their modes set (written through
    `atomic_file`, or settled by `atomic_dir`); its entries are flushed, an old `out` is renamed
    aside to `<out>.old`, `src` renamed to `out`, and only then is the old one deleted. A kill
    between the two renames leaves `<out>.old`, which `restore_dir` (called by every writer
    before it looks at `out`) puts back.
    """
    src, out = Path(src), Path(out)
    fsync(src)
    old = _aside(out)
    if old.exists():  # from an earlier kill; `src` is about to replace that version anyway
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(src, out)
    fsync(out.parent)
    # The new version is in place and on disk: an old one that cannot be deleted now (a file
    # held open on NFS) is only clutter, deleted by the next replace_dir of `out`.
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; on success it replaces `out`
    (`replace_dir`).

    On any error the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _settle(tmp)  # what other libraries wrote there (an export) is flushed and made readable
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_dir(out)  # a failure between replace_dir's renames
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is flushed to disk and
    replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    try:
        yield Path(name)
        fsync(Path(name))
        os.replace(name, path)
        fsync(path.parent)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` for the block, or refuse at once if another process holds it.

    The lock is an advisory `flock` on `path`, which the kernel releases when its holder exits,
    however it exits; the file itself records the holder (pid, host, start time), so that a
    refused writer can name it. A lock file whose holder is gone is taken over with a warning.
    The file is removed when the block ends.

    Args:
        path: The lock file, beside what it protects.
        what: What is being written, for the messages.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise LockedError(
                f"{what} is being written by another process (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}; lock file {path}): wait for "
                "it to finish (a rerun then resumes or finds it complete), or choose another output.dir"
            ) from None
        try:  # the file we locked must still be the one at `path` (a holder unlinks it on release)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        holder = _lock_holder(fd)
        if holder:
            log.warning("%s: taking over the lock of pid %s on host %s (since %s), whose process is gone",
                        what, holder.get("pid", "?"), holder.get("host", "?"), holder.get("since", "?"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: the next writer locks a new file
        os.close(fd)


def _lock_holder(fd: int) -> dict:
    """The holder a lock file records ({} when empty or unreadable)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": f"an unreadable record {text[:40]!r}"}
    return holder if isinstance(holder, dict) else {}
