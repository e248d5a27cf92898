"""Writing a replay directory so that no kill loses work or leaves a torn set.

While it is written, a replay directory `out` lives in its sibling `out.partial/`:

- each shard is written under a temporary name, fsynced, and renamed into place; only then is it
  recorded (file, rows, generated tokens, sha256) in the journal `progress.json`
  (`progress-r<rank>.json` per process in a distributed run), itself replaced atomically;
- when the stream ends, `manifest.json` is written from the journals and `out.partial` is renamed
  to `out` (replacing an old set only with `overwrite`, and only now that the new one is complete).

A rerun with the same settings resumes: unrecorded files (a shard killed mid-write, or renamed
but not yet journaled) are deleted, and the stream is asked only for the records after those on
disk. A rerun of a finished directory with the same settings does nothing and says so. Readers
only ever open `out`, which holds a manifest that matches its shards (`shards.verify_shards`).

One writer at a time: the writer (rank 0 of a distributed one) holds the lock file `out.lock`
from before it looks at `out` until the set is in place. A second writer of the same `out` (a
job submitted twice) is refused at once, naming the first's pid and host; a lock left by a
process that is gone is taken over with a warning (`io.exclusive_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch.distributed as dist
from datasets import Dataset, Features
from datasets.arrow_writer import ArrowWriter

from ..io import atomic_file, exclusive_lock, replace_dir, restore_dir, sha256_file, write_text
from .manifest import COLUMNS, FORMAT, MANIFEST, ReplayIntegrityError, read_manifest

log = logging.getLogger(__name__)

@dataclass
class ShardOutput:
    """Where a data command writes its shard directory, and how (`output:` in its YAML)."""

    dir: str
    """Directory to write. An interrupted run resumes from `<dir>.partial`; a finished one with
    the same settings is left as it is."""
    shard_size: int = 10_000
    """Sequences per Arrow shard."""
    overwrite: bool = False
    """Replace a directory written with other settings (only once the new one is complete),
    discarding an interrupted run with other settings."""


Records = Iterable[list[dict]]
Stream = Records | Callable[[list[int]], Records]
"""Batches of records; or a resumable stream: a function that, given the generated-token count of
each record this process already wrote (in order), yields the records after them."""


def write_shards(
    output_dir: str | Path,
    batches: Stream,
    manifest: dict,
    shard_size: int = 10_000,
    overwrite: bool = False,
    distributed: bool = False,
) -> dict:
    """Write records as Arrow shards plus `manifest.json` (counts and shard list added); return
    the manifest.

    `manifest` holds the run's settings: a rerun with equal settings resumes an interrupted run or,
    if the directory is complete, returns its manifest untouched. A plain iterable is consumed from
    the start on resume, its first records (those already on disk) dropped; a resumable stream
    (see `Stream`) starts where the disk ends.

    With `distributed`, every rank of the initialised process group calls this with its own
    records; each writes `shard-r<rank>-<n>.arrow` and its own journal, and rank 0 merges them.
    """
    out = Path(output_dir)
    partial = out.with_name(out.name + ".partial")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    request = _request(manifest, shard_size, world if distributed else None)
    with contextlib.ExitStack() as held:  # rank 0's lock on `out`, until the set is in place

        def prepare() -> dict | None:
            held.enter_context(exclusive_lock(out.with_name(out.name + ".lock"), f"the shard directory {out}"))
            return _prepare(out, partial, request, overwrite)

        finished = _on_rank0(prepare, distributed)
        if finished is not None:
            if rank == 0:
                print(f"{out} is already complete ({finished['num_sequences']} sequences): nothing to do")
            return finished
        prefix = f"shard-r{rank:03d}-" if distributed else "shard-"
        journal = Journal(partial / (f"progress-r{rank:03d}.json" if distributed else "progress.json"), request)
        journal.load_or_start(prefix)
        try:
            _write(partial, batches, journal, shard_size, prefix)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.rmdir()  # only if nothing was recorded: work on disk waits for a rerun
            raise
        if distributed:
            dist.barrier()  # every rank's journal is final
        return _on_rank0(lambda: _finish(out, partial, manifest, request, world if distributed else None),
                         distributed)


def _on_rank0(fn: Callable[[], object], distributed: bool):
    """fn() on rank 0, its result (or failure) shared with every rank."""
    if not distributed:
        return fn()
    shared: list = [None]
    if dist.get_rank() == 0:
        try:
            shared[0] = ("ok", fn())
        except Exception as err:
            shared[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(shared, src=0)
            raise
    dist.broadcast_object_list(shared, src=0)
    status, value = shared[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed writing the replay directory: {value}")
    return value


def _request(manifest: dict, shard_size: int, world: int | None) -> dict:
    """What must be equal for a rerun to continue a run: its settings, not its timestamp."""
    settings = {k: v for k, v in manifest.items() if k != "created"}
    return json.loads(json.dumps({**settings, "shard_size": shard_size, "world_size": world}, default=str))


def _prepare(out: Path, partial: Path, request: dict, overwrite: bool) -> dict | None:
    """Decide what this call does; return the finished manifest when there is nothing to do."""
    restore_dir(out)  # killed while swapping in a new set: put the old back
    if (partial / MANIFEST).is_file():  # finished but killed before it was moved into place
        if _settings_of(partial) == request:
            return _move_into_place(out, partial)
        shutil.rmtree(partial)
    if (out / MANIFEST).is_file():
        if _settings_of(out) == request and not overwrite:
            return read_manifest(out)
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a shard set written with other settings; choose another "
                "output.dir or pass output.overwrite=true (the old set is replaced only once the new one "
                "is complete)"
            )
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} holds files but no {MANIFEST}: it is not a replay directory, so it will not "
            "be written into or replaced; choose another output.dir"
        )
    journals = sorted(partial.glob("progress*.json")) if partial.is_dir() else []
    stale = [j for j in journals if json.loads(j.read_text())["request"] != request]
    if stale:
        if not overwrite:
            differ = _differences(json.loads(stale[0].read_text())["request"], request)
            raise FileExistsError(
                f"{partial} holds an interrupted run with other settings ({differ}); rerun with "
                "the settings it was started with to finish it, or pass output.overwrite=true to discard it"
            )
        log.warning("discarding the interrupted run in %s (other settings)", partial)
        shutil.rmtree(partial)
    elif journals:
        print(f"resuming the interrupted run in {partial}")
    partial.mkdir(parents=True, exist_ok=True)
    return None


def _settings_of(folder: Path) -> dict | None:
    """The settings a finished directory was written with; None if its manifest is unreadable or
    of another format (it can then only be replaced, with `overwrite`)."""
    try:
        return read_manifest(folder).get("request")
    except ReplayIntegrityError:
        return None


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


class Journal:
    """One process's record of its finished shards, replaced atomically after each one."""

    def __init__(self, path: Path, request: dict) -> None:
        self.path, self.request = path, request
        self.shards: list[dict] = []

    def load_or_start(self, prefix: str) -> None:
        """Read the journal, if any, and delete this process's files it does not list."""
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.shards = saved["shards"]
        listed = {s["file"] for s in self.shards}
        for f in self.path.parent.iterdir():
            mine = f.name.startswith(prefix) or f.name.startswith("." + prefix)
            if mine and f.name not in listed:
                f.unlink()  # killed mid-write, or written but never recorded
        for s in self.shards:
            if sha256_file(self.path.parent / s["file"]) != s["sha256"]:
                raise ReplayIntegrityError(
                    f"{self.path.parent / s['file']} does not match its sha256 in {self.path}; "
                    "the interrupted run was altered: delete the folder and start over"
                )

    def written_lengths(self) -> list[int]:
        """Generated tokens of each record already written, in order."""
        lengths: list[int] = []
        for s in self.shards:
            ids = Dataset.from_file(str(self.path.parent / s["file"])).data.column("input_ids")
            lengths += [n - 1 for n in pc.list_value_length(ids).to_pylist()]
        return lengths

    def add(self, entry: dict) -> None:
        self.shards.append(entry)
        write_text(self.path, json.dumps({"request": self.request, "shards": self.shards}, indent=1))


def _write(folder: Path, batches: Stream, journal: Journal, shard_size: int, prefix: str) -> None:
    done = sum(s["num_sequences"] for s in journal.shards)
    if callable(batches):
        records = (rec for batch in batches(journal.written_lengths() if done else []) for rec in batch)
    else:
        records = (rec for batch in batches for rec in batch)
        for _ in range(done):  # already on disk from the interrupted run
            if next(records, None) is None:
                raise ReplayIntegrityError(
                    f"{journal.path} lists {done} records, more than this run produces; the "
                    "interrupted run was made differently: delete the folder and start over"
                )
    shard: list[dict] = []
    for rec in records:
        shard.append(rec)
        if len(shard) == shard_size:
            journal.add(_write_shard(folder, f"{prefix}{len(journal.shards):05d}.arrow", shard))
            shard = []
    if shard:
        journal.add(_write_shard(folder, f"{prefix}{len(journal.shards):05d}.arrow", shard))


def _write_shard(folder: Path, name: str, records: list[dict]) -> dict:
    """Write one shard under a temporary name, fsync it, rename it into place; return its entry."""
    features = Features({k: COLUMNS[k] for k in COLUMNS if k in records[0]})
    with atomic_file(folder / name) as tmp:
        writer = ArrowWriter(features=features, path=str(tmp))
        for rec in records:
            writer.write(rec)
        writer.finalize()
        writer.close()
    return {"file": name, "num_sequences": len(records),
            "num_generated_tokens": sum(len(r["input_ids"]) - 1 for r in records),
            "sha256": sha256_file(folder / name)}


def _finish(out: Path, partial: Path, manifest: dict, request: dict, world: int | None) -> dict:
    """Merge the journals into the manifest and move the finished directory into place."""
    journals = sorted(partial.glob("progress*.json"))
    entries = [s for j in journals for s in json.loads(j.read_text())["shards"]]
    manifest = {
        **manifest, "format": FORMAT, **({"world_size": world} if world else {}),
        "shards": entries,
        "num_sequences": sum(s["num_sequences"] for s in entries),
        "num_generated_tokens": sum(s["num_generated_tokens"] for s in entries),
        "request": request,
    }
    write_text(partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for j in journals:
        j.unlink()
    for stray in partial.glob(".*.tmp-*"):  # a journal write cut short by a kill
        stray.unlink()
    return _move_into_place(out, partial)


def _move_into_place(out: Path, partial: Path) -> dict:
    """Publish the finished `partial` as `out` (`io.replace_dir`: an old set is deleted only once
    the new one is in place); return its manifest."""
    replace_dir(partial, out)
    return read_manifest(out)
