"""Files and folders appear whole, and with the mode a plain open / mkdir would give them."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from cfs_lightning.io import atomic_dir, atomic_file, write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_folders_and_files_get_the_umasks_mode(tmp_path, umask_027):
    with atomic_dir(tmp_path / "hf_model") as tmp:
        (tmp / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors writes 0600
        (tmp / "sub").mkdir(mode=0o700)
    write_text(tmp_path / "results.md", "| a |\n")
    assert _mode(tmp_path / "hf_model") == 0o750  # tempfile alone would leave 0700
    assert _mode(tmp_path / "results.md") == 0o640  # and 0600
    assert (tmp_path / "hf_model" / "config.json").read_text() == "{}"
    assert _mode(tmp_path / "hf_model" / "model.safetensors") == 0o640
    assert _mode(tmp_path / "hf_model" / "sub") == 0o750


def test_a_failed_write_leaves_the_old_one(tmp_path):
    write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        raise RuntimeError
    assert (tmp_path / "a.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left behind


def test_a_folder_swap_killed_between_its_renames_is_undone(tmp_path):
    """`replace_dir` moves the old folder aside before renaming the new one in: a kill between the
    two leaves `<out>.old` and no `out`, and the next writer puts the old one back first."""
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    os.replace(out, tmp_path / "d.old")  # as a kill after replace_dir's first rename leaves it
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        raise RuntimeError
    assert (out / "v").read_text() == "1"  # the old version is back, whole
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing aside or temporary left
