"""Files and directories that appear whole or not at all, readable by others as the umask allows.

Every file and folder cfs_lightning writes goes through here: a temporary sibling is written,
flushed to disk and renamed over the target in one step, so a reader (or a rerun after a kill)
never meets a half-written one, and an existing one is only ever replaced by a finished one.
`tempfile` creates its files 0600 and folders 0700; they are given the mode a plain `open` or
`mkdir` would have (0666 / 0777 less the umask), so a colleague on a shared machine can read
exported models, shards and results.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def _readable(folder: Path) -> None:
    """Give what was written into `folder` a plain open's / mkdir's mode where a writer made it
    private (safetensors writes its files 0600, whatever the umask)."""
    mask = _umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = os.stat(path).st_mode
        wanted = (0o777 if path.is_dir() or mode & 0o100 else 0o666) & ~mask
        if mode & wanted != wanted:
            os.chmod(path, (mode | wanted) & 0o7777)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; on success it replaces `out`.

    On any error the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
