"""Property tests over malformed task records and replay directories: the outcome is either our own
error or data that keeps every invariant a batch relies on; never a crash deep inside a library and
never a silently wrong row. Plus a scan of the package for unsafe loading."""

from __future__ import annotations

import ast
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.tasks import TaskDataError, TaskSource
from cfs_lightning.shards import ReplayIntegrityError, load_shards, provenance
from cfs_lightning.shards.reader import check_rows
from cfs_lightning.shards import write_shards

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PACKAGE = Path(__file__).resolve().parents[1] / "cfs_lightning"

values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False),
                   st.text(max_size=40), st.lists(st.integers(0, 9), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
records = st.lists(st.dictionaries(st.sampled_from(["question", "answer", "other"]), values, max_size=3),
                   max_size=6)


@FUZZ
@given(rows=records, max_length=st.integers(2, 40), policy=st.sampled_from(["truncate", "drop", "error"]))
def test_task_records_give_our_error_or_well_formed_rows(tiny_tokenizer, rows, max_length, policy):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = TaskSource(path="json", data_files={"train": str(path)}, prompt="Q: {question}\nA:",
                          response=" {answer}", max_length=max_length, long_sequences=policy)
        try:
            encoded = task.tokenize(task.load("train"), tiny_tokenizer)
        except TaskDataError:
            return
        assert 1 <= len(encoded) <= len(rows)
        for ids, labels in zip(encoded["input_ids"], encoded["labels"], strict=True):
            assert 2 <= len(ids) == len(labels) <= max_length
            assert all(0 <= t < len(tiny_tokenizer) for t in ids)
            assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(labels, ids))
            assert any(lab != IGNORE_INDEX for lab in labels[1:])  # something to learn


@pytest.fixture
def replay_source(tmp_path, tiny_tokenizer):
    out = tmp_path / "replay"
    rows = [{"input_ids": [0, 5 + i, 6 + i, 7]} for i in range(7)]
    write_shards(out, [rows], {**provenance(tiny_tokenizer), "source": "context_free"}, shard_size=3)
    return out


def _damage(folder: Path, data) -> None:
    kind = data.draw(st.sampled_from(["truncate", "flip", "delete", "extra", "manifest_value", "manifest_json"]))
    shards = sorted(folder.glob("*.arrow"))
    if kind == "truncate":
        target = data.draw(st.sampled_from(shards))
        blob = target.read_bytes()
        target.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
    elif kind == "flip":
        target = data.draw(st.sampled_from(shards))
        blob = bytearray(target.read_bytes())
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
        target.write_bytes(bytes(blob))
    elif kind == "delete":
        data.draw(st.sampled_from(shards)).unlink()
    elif kind == "extra":
        shutil.copy(shards[0], folder / f"shard-{data.draw(st.integers(3, 99)):05d}.arrow")
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        if kind == "manifest_value":
            key = data.draw(st.sampled_from(["shards", "num_sequences", "source", "tokenizer_fingerprint"]))
            manifest[key] = data.draw(values)
            if key == "shards" and data.draw(st.booleans()):
                manifest["shards"] = [{**manifest_entry, "file": "../manifest.json"}
                                      for manifest_entry in json.loads((folder / "manifest.json").read_text())["shards"]]
        else:
            manifest = data.draw(st.recursive(values, lambda inner: st.lists(inner, max_size=3), max_leaves=5))
        (folder / "manifest.json").write_text(json.dumps(manifest))


@FUZZ
@given(data=st.data())
def test_damaged_replay_directories_are_refused(replay_source, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "replay"
        shutil.copytree(replay_source, folder)
        _damage(folder, data)
        with pytest.raises(ReplayIntegrityError):
            load_shards(folder)


@FUZZ
@given(rows=st.lists(st.lists(st.integers(-3, 600), max_size=6), min_size=1, max_size=6),
       labelled=st.booleans(), data=st.data())
def test_replay_rows_give_our_error_or_usable_rows(tiny_tokenizer, rows, labelled, data):
    vocab = len(tiny_tokenizer)
    records = [{"input_ids": r} for r in rows]
    if labelled:
        for rec in records:
            rec["labels"] = [data.draw(st.sampled_from([IGNORE_INDEX, t])) for t in rec["input_ids"]]
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "r", [records], {**provenance(tiny_tokenizer), "source": "fuzz"}, shard_size=4)
        loaded = load_shards(Path(tmp) / "r")
        try:
            check_rows(loaded, vocab, "fuzzed shards")
        except ReplayIntegrityError:
            bad_ids = any(len(r) < 2 or not all(0 <= t < vocab for t in r) for r in rows)
            no_target = labelled and any(all(lab == IGNORE_INDEX for lab in rec["labels"][1:]) for rec in records)
            assert bad_ids or no_target
            return
        assert all(len(r) >= 2 and all(0 <= t < vocab for t in r) for r in rows)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_the_package_never_unpickles_evaluates_or_trusts_remote_code_by_itself():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for imp in ast.walk(tree):
            if isinstance(imp, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in imp.names] + ([imp.module] if isinstance(imp, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names):
                    problems.append(f"{path.name}:{imp.lineno} imports a pickle module")
        for node, owner, name in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):  # builtins, not Module.eval()
                problems.append(f"{path.name}:{node.lineno} calls {name}()")
            if owner == "torch" and name == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            flag = keywords.get("trust_remote_code")
            if isinstance(flag, ast.Constant) and flag.value is True:
                problems.append(f"{path.name}:{node.lineno} sets trust_remote_code=True")
            if name == "from_pretrained" and owner == "AutoModelForCausalLM" and path.name != "loading.py":
                problems.append(f"{path.name}:{node.lineno} loads a model outside loading.load_causal_lm")
    assert not problems, problems


def test_a_pickled_checkpoint_is_refused(tmp_path, tiny_model_dir):
    import torch

    from cfs_lightning.loading import load_causal_lm

    pickled = tmp_path / "bin"  # the same model as a pickled pytorch_model.bin
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled / "config.json")
    torch.save(load_causal_lm(str(tiny_model_dir)).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="has no safetensors weights; cfs_lightning does not unpickle"):
        load_causal_lm(str(pickled))
