"""A pruned folder with per-layer widths (or pruned heads) loads with plain transformers and
`trust_remote_code=True`, without seap: its own modeling_seap.py rebuilds each layer at its recorded
size. The logits equal seap's loader's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SHARED_DATA, TEXTS, has_shared_data, tiny_folder

import seap

IDS = [[5, 9, 40, 7, 99, 3, 12]]
# Runs in a fresh interpreter where `import seap` fails: the folder must not need it.
LOAD = """
import sys
sys.modules["seap"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.tensor({ids})).logits, sys.argv[2])
print(type(model).__name__)
"""


@pytest.mark.parametrize("family,method,kw", [
    ("llama", "seap-paper", {}),
    ("llama", "seap", {}),  # reconstruction: a fitted FFN output bias too
    ("gemma3", "seap-paper", {}),
    ("opt", "seap-paper", {"heads": "heads"}),  # pruned attention heads
])
def test_per_layer_folder_loads_with_trust_remote_code_without_seap(tmp_path, family, method, kw):
    folder = tiny_folder(tmp_path, family, **({"num_hidden_layers": 4} if family == "opt" else {}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 4))
    cfg = seap.PruneConfig.from_method(method, ratio=0.5, protect_first=0, protect_last=0, **kw)
    seap.prune(str(folder), cfg, seap.CalibrationData((str(corpus),), batch_size=2), tmp_path / "out", progress=False)
    model_dir = tmp_path / "out" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    record = config["seap_pruning"]
    assert len(set(record["ffn_widths"])) > 1 or record.get("num_heads")  # the case stock classes cannot load
    arch = config["architectures"][0]
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_seap.Seap{arch}"}
    assert (model_dir / "modeling_seap.py").is_file()

    logits = tmp_path / "logits.pt"
    run = subprocess.run([sys.executable, "-c", LOAD.format(ids=IDS), str(model_dir), str(logits)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == f"Seap{arch}"
    with torch.no_grad():
        want = seap.load(model_dir).model(torch.tensor(IDS)).logits
    assert torch.equal(torch.load(logits), want)


def test_uniform_folder_needs_no_remote_code(tmp_path):
    folder = tiny_folder(tmp_path, "llama")
    cfg = seap.PruneConfig.from_method("magnitude", ratio=0.5)
    seap.prune(str(folder), cfg, out=tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "out" / "model" / "modeling_seap.py").exists()


LM_EVAL = """
import sys
sys.modules["seap"] = None  # lm-eval's own CLI, in a process where seap cannot be imported
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


@pytest.mark.skipif(not has_shared_data(), reason="needs ../shared/data (piqa validation)")
def test_lm_eval_cli_scores_a_per_layer_folder_as_seap_does(tmp_path):
    from seap.evaluation.harness import write_task_folder
    from seap.evaluation.runner import EvalConfig, evaluate_model

    folder = tiny_folder(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 4))
    cfg = seap.PruneConfig.from_method("seap-paper", ratio=0.5, protect_first=0, protect_last=0)
    seap.prune(str(folder), cfg, seap.CalibrationData((str(corpus),), batch_size=2), tmp_path / "out", progress=False)
    model_dir = tmp_path / "out" / "model"
    write_task_folder(["piqa"], SHARED_DATA, tmp_path / "tasks")
    args = ["--model", "hf", "--model_args", f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
            "--tasks", "piqa", "--include_path", str(tmp_path / "tasks"), "--limit", "12", "--batch_size", "4",
            "--output_path", str(tmp_path / "lm_eval")]
    run = subprocess.run([sys.executable, "-c", LM_EVAL, *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm_eval").rglob("results*.json")).read_text())["results"]["piqa"]
    ours = evaluate_model(seap.load(model_dir), EvalConfig(tasks=("piqa",), data_dir=str(SHARED_DATA), limit=12,
                                                           batch_size=4, token_ppl=False))
    assert results["acc,none"] == ours.scores["piqa"].metrics["acc"]
    assert results["acc_norm,none"] == ours.scores["piqa"].metrics["acc_norm"]
