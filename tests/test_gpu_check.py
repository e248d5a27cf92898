"""`benchmarks/gpu_check.sh` runs end to end here on its tiny CPU shape, so that the one device call
a GPU session gets is spent on the GPU paths, not on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_on_a_tiny_model(tmp_path):
    env = {**os.environ, "GPU_CHECK_SIZE": "tiny", "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {r["step"]: r for r in map(json.loads, (
        line.removeprefix("RESULT ") for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()))}
    assert results["build"]["vocab"] == 128256
    assert results["sample"]["ok"] and results["sample"]["stop_token_ids"] == [128001, 128008, 128009]
    assert results["fit-fsdp"]["skipped"] == "FSDP1 needs a GPU"
    fsdp2 = results["fit-fsdp2"]
    assert fsdp2["ok"] and fsdp2["reloaded_export_bpb"] == pytest.approx(fsdp2["retained_bpb"][-1], rel=1e-2)
    assert not list(tmp_path.glob("cfs-gpu-check.*"))  # its scratch folder is removed
