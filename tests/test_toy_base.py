"""The shipped toy base (`data/toy-base`) is what its configs build."""

import json
from pathlib import Path

import pytest

from cfs_lightning.experiments.toy_base import BUILD, SHIPPED, TOLERANCE, build_base, compare_bases
from cfs_lightning.io import sha256_file

from .conftest import REPO


def test_the_shipped_base_is_the_one_its_record_describes():
    """Every shipped file, config and text file still has the sha256 of the build: a config edited
    without rebuilding the shipped base fails here."""
    shipped = REPO / SHIPPED
    record = json.loads((shipped / BUILD).read_text())
    for name, digest in record["files"].items():
        assert sha256_file(shipped / name) == digest, f"{SHIPPED}/{name} changed since it was built"
    for path, digest in {**record["configs"], **record["text_files"]}.items():
        assert sha256_file(REPO / path) == digest, (
            f"{path} changed since {SHIPPED} was built from it: rebuild it (scripts/demo.sh --rebuild, "
            f"then copy runs/toy/base to {SHIPPED})")
    assert record["heldout_loss"] < 5.0  # pretrained, not the random init (ln 2048 = 7.6)


@pytest.mark.slow
def test_rebuilding_the_base_from_its_configs_reproduces_it(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    built = build_base(tmp_path / "base", pretrain_args=["--trainer.enable_progress_bar=false"])
    diff = compare_bases(built, REPO / SHIPPED)
    print(diff)
    assert diff["same_tokenizer"]
    assert diff["heldout_loss_rel_diff"] <= TOLERANCE["heldout_loss_rel_diff"]
