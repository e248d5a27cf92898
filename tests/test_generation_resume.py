"""Generation survives kills: journaled shards, exact resume, refusal of a directory that does not
match its manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from cfs_lightning.io import LockedError
from cfs_lightning.sampling import Budget, SamplingConfig
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.shards import load_shards, read_manifest
from cfs_lightning.shards import ReplayIntegrityError, provenance
from cfs_lightning.shards import write_shards

REPO = Path(__file__).resolve().parents[1]


def rows(replay_dir: Path) -> list[list[int]]:
    return [list(map(int, r)) for r in load_shards(replay_dir)["input_ids"]]


def partial_rows(partial: Path) -> list[list[int]]:
    journal = json.loads((partial / "progress.json").read_text())
    return [r for s in journal["shards"] for r in Dataset.from_file(str(partial / s["file"]))["input_ids"]]


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after the raise runs."""


def dying(stream, after: int):
    """`stream` (resumable) that dies once `after` records have been handed out."""
    def resumable(written):
        n = 0
        for batch in stream(written):
            if n + len(batch) > after:
                raise Killed
            n += len(batch)
            yield batch
    return resumable


@pytest.mark.parametrize("budget", [Budget(sequences=23), Budget(tokens=300)], ids=["sequences", "tokens"])
def test_resume_after_each_crash_window_equals_an_uninterrupted_run(tmp_path, tiny_model, tiny_tokenizer,
                                                                    budget, monkeypatch):
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4, seed=3)
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "whole", cfg, budget, shard_size=3)
    whole = rows(tmp_path / "whole")

    from cfs_lightning.shards import writer

    real = writer.write_shards
    out, partial = tmp_path / "r", tmp_path / "r.partial"
    # 1. killed while the third batch is sampled: 8 records handed out, two shards of 3 recorded
    monkeypatch.setattr("cfs_lightning.replay.context_free.write_shards",
                        lambda d, stream, *a: real(d, dying(stream, 10), *a))
    with pytest.raises(Killed):
        generate_replay(tiny_model, tiny_tokenizer, out, cfg, budget, shard_size=3)
    assert not out.exists() and partial_rows(partial) == whole[:6]
    # 2. as if also killed between a shard's rename and its journal entry, and mid-write of another
    shutil.copy(partial / "shard-00000.arrow", partial / "shard-00002.arrow")
    (partial / ".shard-00003.arrow.tmp").write_bytes(b"torn")
    with pytest.raises(Killed):
        generate_replay(tiny_model, tiny_tokenizer, out, cfg, budget, shard_size=3)
    assert partial_rows(partial) == whole[:15]  # resumed at record 6; 10 more handed out, 9 recorded
    monkeypatch.setattr("cfs_lightning.replay.context_free.write_shards", real)
    generate_replay(tiny_model, tiny_tokenizer, out, cfg, budget, shard_size=3)
    assert rows(out) == whole and not partial.exists()  # no duplicate, no gap, same order
    assert read_manifest(out)["num_generated_tokens"] == read_manifest(tmp_path / "whole")["num_generated_tokens"]
    if budget.tokens:
        assert read_manifest(out)["num_generated_tokens"] == 300


def test_rerun_of_a_finished_run_does_nothing_and_says_so(tmp_path, tiny_model, tiny_tokenizer, capsys):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=4)
    first = generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=5))
    stamp = (tmp_path / "r" / "manifest.json").stat().st_mtime_ns
    again = generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=5))
    assert "already complete (5 sequences): nothing to do" in capsys.readouterr().out
    assert again == first and (tmp_path / "r" / "manifest.json").stat().st_mtime_ns == stamp


def test_other_settings_never_touch_existing_work(tmp_path, tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=4)
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=3))
    before = read_manifest(tmp_path / "r")
    with pytest.raises(FileExistsError, match="other settings.*overwrite=true"):
        generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=5))
    assert read_manifest(tmp_path / "r") == before

    base = provenance(tiny_tokenizer)

    def broken(*_):
        yield [{"input_ids": [1, 2, 3]}] * 4
        raise RuntimeError("sampler died")

    with pytest.raises(RuntimeError, match="sampler died"):
        write_shards(tmp_path / "r", broken(), {**base, "source": "test"}, shard_size=2, overwrite=True)
    assert read_manifest(tmp_path / "r") == before  # the old set survives a failed overwrite
    assert len(partial_rows(tmp_path / "r.partial")) == 4  # and the new run's shards wait for a rerun
    with pytest.raises(RuntimeError, match="sampler died"):
        write_shards(tmp_path / "s", broken(), {**base, "source": "test"}, shard_size=2)
    with pytest.raises(FileExistsError, match=r"interrupted run with other settings \(source: 'test' -> 'x'\)"):
        write_shards(tmp_path / "s", iter([[{"input_ids": [4, 5]}]]), {**base, "source": "x"}, shard_size=2)
    assert len(partial_rows(tmp_path / "s.partial")) == 4
    write_shards(tmp_path / "s", iter([[{"input_ids": [4, 5]}]]), {**base, "source": "x"}, shard_size=2,
                 overwrite=True)
    assert rows(tmp_path / "s") == [[4, 5]] and not (tmp_path / "s.partial").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a replay directory"):
        write_shards(tmp_path / "other", iter([]), {}, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "shard-00001.arrow").unlink(), r"shard-00001.arrow is listed in .*manifest.json but missing"),
    (lambda d: (d / "shard-00002.arrow").write_bytes((d / "shard-00002.arrow").read_bytes()[:-7]),
     r"shard-00002.arrow does not match its sha256"),
    (lambda d: shutil.copy(d / "shard-00000.arrow", d / "shard-00009.arrow"), r"shard-00009.arrow is not listed"),
    (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(num_sequences=7)),
     r"shard-00000.arrow holds 3 sequences, .*manifest.json says 7"),
    (lambda d: _edit_manifest(d, lambda m: m.update(num_sequences=99)), r"num_sequences=99 but its shards hold 8"),
    (lambda d: _edit_manifest(d, lambda m: m.update(format="cfs_lightning.replay/1")), r"format 'cfs_lightning.replay/1'"),
    (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest.json is not valid JSON"),
], ids=["missing", "checksum", "unlisted", "shard-count", "total-count", "format", "json"])
def test_directory_that_does_not_match_its_manifest_is_refused(tmp_path, tiny_model, tiny_tokenizer, damage,
                                                               message):
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", SamplingConfig(max_new_tokens=4, batch_size=4),
                    Budget(sequences=8), shard_size=3)
    load_shards(tmp_path / "r")  # intact: loads
    damage(tmp_path / "r")
    with pytest.raises(ReplayIntegrityError, match=message):
        load_shards(tmp_path / "r")


def _generate_config(tmp_path: Path, model_dir: Path, out: Path, budget: dict) -> Path:
    config = {"base": {"model": str(model_dir), "device": "cpu"}, "output": {"dir": str(out), "shard_size": 2},
              "budget": budget,
              "sampling": {"max_new_tokens": 48, "stop_at_eos": False, "batch_size": 2, "seed": 5}}
    path = tmp_path / f"generate-{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cfs_generate(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cfs_lightning.cli", "generate", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recorded(partial: Path) -> int:
    try:
        return len(json.loads((partial / "progress.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("budget, kill_after", [
    pytest.param({"sequences": 96}, 1, id="sequences-after-1-shard"),
    pytest.param({"tokens": 4000}, 3, id="tokens-after-3-shards", marks=pytest.mark.slow),  # same path, other budget
])
def test_sigkill_during_cfs_generate_then_rerun_completes_the_exact_budget(tmp_path, tiny_model_dir, tiny_model,
                                                                           tiny_tokenizer, budget, kill_after):
    out = tmp_path / "killed"
    config = _generate_config(tmp_path, tiny_model_dir, out, budget)
    proc = _cfs_generate(config)
    deadline = time.monotonic() + 120
    while _recorded(out.with_name("killed.partial")) < kill_after:
        assert proc.poll() is None, f"cfs generate ended before it was killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no shard recorded within 120 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a replay directory readers could open"
    recorded = _recorded(out.with_name("killed.partial"))

    rerun = _cfs_generate(config)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "resuming the interrupted run" in stdout

    whole = tmp_path / "whole"
    sampling = SamplingConfig(max_new_tokens=48, stop_at_eos=False, batch_size=2, seed=5)
    generate_replay(tiny_model, tiny_tokenizer, whole, sampling, Budget(**budget), shard_size=2)
    assert rows(out) == rows(whole)
    resumed = read_manifest(out)
    assert resumed["num_sequences"] == read_manifest(whole)["num_sequences"]
    assert resumed["num_generated_tokens"] == read_manifest(whole)["num_generated_tokens"]
    assert len(resumed["shards"]) > recorded >= kill_after  # the rerun wrote the rest, kept the rest
    again = _cfs_generate(config)
    stdout, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "nothing to do" in stdout


def test_a_directory_of_another_format_is_replaced_only_with_overwrite(tmp_path, tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=4)
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=2))
    _edit_manifest(tmp_path / "r", lambda m: m.update(format="cfs_lightning.replay/1"))
    with pytest.raises(FileExistsError, match="other settings.*overwrite=true"):
        generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=2))
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(sequences=2), overwrite=True)
    assert len(rows(tmp_path / "r")) == 2


def test_a_second_writer_of_the_same_directory_is_refused_at_once(tmp_path, tiny_tokenizer, caplog):
    """A job started twice on one output.dir: the second is refused, naming the first, and the
    first's set is whole; a lock left by a process that is gone is taken over with a warning."""
    base = {**provenance(tiny_tokenizer), "source": "test"}
    out, refusals = tmp_path / "r", []

    def first_job(*_):
        for b in range(4):
            if b == 2:  # the same command again, in another terminal
                with pytest.raises(LockedError) as refused:
                    write_shards(out, iter([[{"input_ids": [9, 9]}]]), base, shard_size=2)
                refusals.append(str(refused.value))
            yield [{"input_ids": [b, b + 1, b + 2]}] * 3

    manifest = write_shards(out, first_job(), base, shard_size=2)
    assert len(refusals) == 1
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in refusals[0] and str(out) in refusals[0]
    assert manifest["num_sequences"] == 12 and len(manifest["shards"]) == 6
    assert rows(out) == [[b, b + 1, b + 2] for b in range(4) for _ in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no lock or partial left behind

    stale = tmp_path / "s.lock"
    stale.write_text(json.dumps({"pid": 999_999_999, "host": "gone-host", "since": "yesterday"}))
    with caplog.at_level("WARNING"):
        write_shards(tmp_path / "s", iter([[{"input_ids": [4, 5]}]]), base, shard_size=2)
    assert "taking over the lock of pid 999999999 on host gone-host" in caplog.text
    assert rows(tmp_path / "s") == [[4, 5]] and not stale.exists()
