"""The GPU check (benchmarks/gpu_check.py) rehearsed on the CPU at a tiny geometry, so that the one call a
lent GPU gets does not fail on a typo: every step runs and the result file holds what the issue asks for."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gpu_check

    yield gpu_check
    sys.modules.pop("gpu_check", None)


def test_gpu_check_runs_on_the_cpu_at_a_tiny_geometry(gpu_check, tmp_path):
    out = tmp_path / "gc.json"
    assert gpu_check.main(["--geometry", "tiny", "--device", "cpu", "--no-compile", "--limit", "4",
                           "--batches", "1,2", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
                           "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    prune = r["prune"]
    assert set(prune["stage_seconds"]) >= {"load", "calibration", "slice_and_save"}
    assert prune["calibration"]["passes"] == 1 and prune["params_after"] < prune["params_before"]
    assert prune["achieved_ratio"] == pytest.approx(0.5, abs=0.05)
    dense, pruned = r["decode"]["dense"], r["decode"]["pruned"]
    assert [x["batch"] for x in dense["runs"]] == [1, 2] == [x["batch"] for x in pruned["runs"]]
    assert all(x["decode_tokens_per_s"] > 0 for x in dense["runs"] + pruned["runs"])
    for row in r["decode_ratio"]:  # the bytes limit is the ratio of the weight bytes of the two models
        assert row["bytes_limit"] == round(dense["weight_bytes"] / pruned["weight_bytes"], 3) > 1
    assert not (tmp_path / "work").exists()  # the checkpoint and the pruned folder are deleted
