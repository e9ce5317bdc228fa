"""The calibration engine (DESIGN 2.10): streamed == in memory, one pass == two passes, resume, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, make_loaded, one_line_error, tiny_folder

from seap import CalibrationData, PruneConfig, Runtime, prune
from seap.calibration.engine import Outcome, run_pass
from seap.calibration.observers import GramObserver, StatsObserver
from seap.calibration.layerwise import collect_stats, engine_for
import seap.calibration.resume as resume_mod
from seap.cli import main
from seap.config import RefitConfig
from seap.model.checkpoint import Checkpoint
from seap.model.fingerprints import fingerprint
from seap.model.loading import open_model
from seap.pruning.plan import GENERIC, Plan, build_plan, resolve_head_unit
import seap.pruning.refit_pass as refit_pass
from seap.pruning.refit_pass import one_pass, reconstruct_plan

CORPORA = {"a": TEXTS[:7], "b": TEXTS[7:] + ["A further calibration text about the feed-forward channels."]}


def _observed(lm, heads: bool) -> list[dict]:
    engine, _ = engine_for(lm, CORPORA, batch_size=3, max_length=64)
    seen: list[dict] = []

    def decide(i, layer, s):
        seen.append(s)
        return Outcome()

    kinds = ("ffn", "attn") if heads else ("ffn",)
    run_pass(engine, [StatsObserver(list(CORPORA), heads), GramObserver({"a": ["a"], "ab": ["a", "b"]}, kinds)],
             decide, progress=False)
    return seen


def test_streamed_engine_equals_the_whole_model_engine(tmp_path, family):
    folder = tiny_folder(tmp_path, family)
    heads = family == "opt"
    runs = {load: _observed(open_model(str(folder), Runtime(device="cpu", load=load), streamable=True), heads)
            for load in ("whole", "layerwise")}
    for whole, streamed in zip(runs["whole"], runs["layerwise"]):
        for lab in CORPORA:
            for kind, s in whole["stats"][lab].items():
                t = streamed["stats"][lab][kind]
                assert s.count == t.count
                for f in ("mean", "m2", "sumsq"):
                    torch.testing.assert_close(getattr(t, f), getattr(s, f), rtol=1e-6, atol=1e-9)
        for g in ("a", "ab"):
            for kind, m in whole["gram"][g].items():
                n = streamed["gram"][g][kind]
                assert m.count == n.count
                torch.testing.assert_close(n.gram, m.gram, rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(n.total, m.total, rtol=1e-6, atol=1e-9)
        # independent accumulators agree: diag of the Gram matrix == sum of squares; sum / N == mean
        a = whole["stats"]["a"]["ffn"]
        m = whole["gram"]["a"]["ffn"]
        torch.testing.assert_close(m.gram.diagonal(), a.sumsq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.total / m.count, a.mean, rtol=1e-5, atol=1e-6)
        merged = a.merge(whole["stats"]["b"]["ffn"])
        assert whole["gram"]["ab"]["ffn"].count == merged.count
        torch.testing.assert_close(whole["gram"]["ab"]["ffn"].gram.diagonal(), merged.sumsq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("choice", ["obs", "score"])
def test_one_pass_plan_equals_the_two_pass_plan_where_widths_are_fixed(family, choice):
    lm = make_loaded(family)
    cfg = PruneConfig.from_method("seap", ratio=0.5, protect_first=1, protect_last=1, refit_choice=choice)
    refit_cfg = cfg.refit.resolved(lm.adapter, lm.model.config)
    fp = fingerprint(lm.model, lm.adapter)
    head_unit = resolve_head_unit(cfg, lm.adapter, lm.model)
    stats = {t: collect_stats(lm.model, lm.tokenizer, lm.adapter, x, heads=head_unit is not None, batch_size=3,
                              meta={}, progress=False) for t, x in CORPORA.items()}
    two = build_plan(lm.model, lm.adapter, cfg, stats, base_model="tiny", revision=None, fingerprint=fp)
    two = reconstruct_plan(lm, two, CORPORA, refit_cfg, members={"a": ("a",), "b": ("b",), GENERIC: ("a", "b")},
                           batch_size=3, progress=False)
    one = one_pass(lm, cfg, CORPORA, refit_cfg, head_unit=head_unit, fingerprint=fp, metas={}, batch_size=3,
                   max_length=512, progress=False).plan
    assert set(one.experts) == set(two.experts) == {"a", "b", GENERIC}
    for name, ex in two.experts.items():
        got = one.experts[name]
        assert got.widths() == ex.widths()
        for i in range(len(ex.ffn)):
            assert torch.equal(got.ffn[i], ex.ffn[i]), (name, i)
            if ex.heads is not None:
                assert torch.equal(got.heads[i], ex.heads[i])
            torch.testing.assert_close(got.ffn_out[i], ex.ffn_out[i], rtol=1e-5, atol=1e-6)
            if ex.ffn_bias is not None:
                torch.testing.assert_close(got.ffn_bias[i], ex.ffn_bias[i], rtol=1e-5, atol=1e-6)
        a, b = got.stats["reconstruction"], ex.stats["reconstruction"]
        assert a["tokens"] == b["tokens"] and a["choice"] == choice
        for k in ("none", "bias", "refit"):
            assert a["ffn_error"][k] == pytest.approx(b["ffn_error"][k], rel=1e-4, abs=1e-6)


def test_auto_choice_is_obs_for_task_experts_and_the_score_for_the_rest(family):
    """The preset's choice "auto": experts of named tasks get the OBS choice and the generic expert the
    score's channels; each equals the expert a plan with that choice for every expert gives. The two-pass
    refit resolves it the same way."""
    lm = make_loaded(family)
    corpora = {"piqa": CORPORA["a"], "boolq": CORPORA["b"]}  # task names: in-domain experts
    fp = fingerprint(lm.model, lm.adapter)

    def plan(choice, two_pass=False):
        cfg = PruneConfig.from_method("seap", ratio=0.5, protect_first=1, protect_last=1, refit_choice=choice)
        refit_cfg = cfg.refit.resolved(lm.adapter, lm.model.config)
        head_unit = resolve_head_unit(cfg, lm.adapter, lm.model)
        if two_pass:
            stats = {t: collect_stats(lm.model, lm.tokenizer, lm.adapter, x, heads=head_unit is not None,
                                      batch_size=3, meta={}, progress=False) for t, x in corpora.items()}
            built = build_plan(lm.model, lm.adapter, cfg, stats, base_model="tiny", revision=None, fingerprint=fp)
            return reconstruct_plan(lm, built, corpora, refit_cfg, batch_size=3, progress=False,
                                    members={"piqa": ("piqa",), "boolq": ("boolq",), GENERIC: ("piqa", "boolq")})
        return one_pass(lm, cfg, corpora, refit_cfg, head_unit=head_unit, fingerprint=fp, metas={}, batch_size=3,
                        max_length=512, progress=False).plan

    obs, score = plan("obs"), plan("score")
    for auto in (plan("auto"), plan("auto", two_pass=True)):
        for name, want in (("piqa", obs), ("boolq", obs), (GENERIC, score)):
            got, ref = auto.experts[name], want.experts[name]
            assert got.stats["reconstruction"]["choice"] == ("score" if name == GENERIC else "obs")
            for i in range(len(ref.ffn)):
                assert torch.equal(got.ffn[i], ref.ffn[i]), (name, i)
                torch.testing.assert_close(got.ffn_out[i], ref.ffn_out[i], rtol=1e-5, atol=1e-6)
    # and the two choices differ somewhere on these texts, so the equalities above tell them apart
    assert any(not torch.equal(a, b) for a, b in zip(obs.experts[GENERIC].ffn, score.experts[GENERIC].ffn))


def _corpus(tmp_path: Path, texts=TEXTS) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(texts) + "\n")  # blank-line separated texts
    return path


def test_a_run_killed_in_reconstruction_resumes_and_ends_equal(tmp_path, capsys, monkeypatch):
    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    corpus = _corpus(tmp_path)
    cfg = PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1)
    rt = Runtime(device="cpu", load="layerwise")
    clean = prune(str(folder), cfg, [str(corpus)], tmp_path / "clean", progress=False, runtime=rt)
    monkeypatch.setattr(resume_mod, "CHECKPOINT_OVERHEAD", 1e9)  # checkpoint after every layer
    real, calls = refit_pass.refit_layer, []

    def dies_in_layer_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # layers 1, 2, 3 refitted (0 is dense), killed while refitting layer 4
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(refit_pass, "refit_layer", dies_in_layer_4)
    with pytest.raises(KeyboardInterrupt):
        prune(str(folder), cfg, [str(corpus)], tmp_path / "killed", progress=False, runtime=rt)
    assert not (tmp_path / "killed" / "model").exists() and not (tmp_path / "killed" / "plan").exists()
    monkeypatch.setattr(refit_pass, "refit_layer", real)
    capsys.readouterr()
    again = prune(str(folder), cfg, [str(corpus)], tmp_path / "killed", progress=False, runtime=rt)
    err = capsys.readouterr().err
    assert "resuming the calibration" in err and "at layer 4 of 8" in err
    assert again.calibration["resumed_from_layer"] == 4
    a, b = (Checkpoint.open(p / "model") for p in (tmp_path / "clean", tmp_path / "killed"))
    ta, tb = a.read(a.names()), b.read(b.names())
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    pa, pb = Plan.load(tmp_path / "clean" / "plan"), Plan.load(tmp_path / "killed" / "plan")
    assert pa.experts[pa.meta.default_expert].digest() == pb.experts[pb.meta.default_expert].digest()
    assert clean.calibration["resumed_from_layer"] is None
    assert not list((tmp_path / "killed" / "stats").glob(".calibration-*"))  # cleared once complete


def test_a_run_stopped_in_the_save_reuses_every_record(tmp_path, capsys, monkeypatch):
    """After the pass, the checkpoint stays until the model is saved: a run stopped in the save is resumed
    with no layer computed again, and the refitted weights are read from disk, not held."""
    from seap._io import StoredTensor, TensorList
    import seap.pruning.prune as pruning

    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=6)
    corpus = _corpus(tmp_path)
    cfg = PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1)
    rt = Runtime(device="cpu", load="layerwise")
    clean = prune(str(folder), cfg, [str(corpus)], tmp_path / "clean", progress=False, runtime=rt)
    real_save = pruning._materialise

    def stops(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning, "_materialise", stops)
    with pytest.raises(KeyboardInterrupt):
        prune(str(folder), cfg, [str(corpus)], tmp_path / "stopped", progress=False, runtime=rt)
    assert list((tmp_path / "stopped" / "stats").glob(".calibration-*"))
    monkeypatch.setattr(pruning, "_materialise", real_save)
    monkeypatch.setattr(refit_pass, "refit_layer", lambda *a, **k: pytest.fail("a layer was refitted again"))
    capsys.readouterr()
    again = prune(str(folder), cfg, [str(corpus)], tmp_path / "stopped", progress=False, runtime=rt)
    assert "an earlier run finished all 6 layers" in capsys.readouterr().err
    assert again.calibration["resumed_from_layer"] == 6
    assert not list((tmp_path / "stopped" / "stats").glob(".calibration-*"))
    a, b = (Checkpoint.open(p / "model") for p in (tmp_path / "clean", tmp_path / "stopped"))
    ta, tb = a.read(a.names()), b.read(b.names())
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    ex = again.plan.experts[again.plan.meta.default_expert]
    assert isinstance(ex.ffn_out, TensorList)  # the result's plan reads its weights from the saved plan
    saved = (tmp_path / "stopped" / "plan" / "indices.safetensors").resolve()
    assert all(isinstance(t, StoredTensor) and t.path == saved for t in ex.ffn_out.items)
    loaded = Plan.load(tmp_path / "clean" / "plan")
    assert ex.digest() == loaded.experts[loaded.meta.default_expert].digest()
    for i in range(6):
        assert torch.equal(ex.ffn_out[i], clean.plan.experts[clean.plan.meta.default_expert].ffn_out[i])


def test_a_prune_in_memory_reads_its_weights_in_before_the_checkpoint_goes(tmp_path, monkeypatch):
    """No --out but a statistics folder: the checkpoint is removed at the end, so the plan's refitted
    weights come into memory first."""
    lm = make_loaded("llama")
    cfg = PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1)
    corpus = str(_corpus(tmp_path))
    seen = []
    real_remove = resume_mod.Resume.remove

    def remove(self):
        seen.append(self.folder.is_dir())
        real_remove(self)

    monkeypatch.setattr(resume_mod.Resume, "remove", remove)
    res = prune(lm, cfg, CalibrationData(tasks=[corpus], stats_dir=tmp_path / "st"), progress=False)
    assert seen == [True] and not list((tmp_path / "st").glob(".calibration-*"))
    ex = res.plan.experts[res.plan.meta.default_expert]
    assert all(isinstance(t, torch.Tensor) for t in ex.ffn_out.items)
    ref = prune(make_loaded("llama"), cfg, [corpus], progress=False)  # no checkpoint at all
    ref_ex = ref.plan.experts[ref.plan.meta.default_expert]
    for i in range(len(ex.ffn)):
        assert torch.equal(ex.ffn[i], ref_ex.ffn[i]) and torch.equal(ex.ffn_out[i], ref_ex.ffn_out[i])


def test_a_resume_under_other_settings_is_refused(tmp_path, capsys, monkeypatch):
    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    corpus = _corpus(tmp_path)
    monkeypatch.setattr(resume_mod, "CHECKPOINT_OVERHEAD", 1e9)
    real = refit_pass.refit_layer
    calls = []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(refit_pass, "refit_layer", dies)
    argv = ["prune", "--model", str(folder), "--task", str(corpus), "--protect-first", "1", "--protect-last", "1",
            "--load", "layerwise", "--out", str(tmp_path / "o")]
    assert main([*argv, "--ratio", "0.4"]) == 130  # interrupted: "no partial output was kept"
    monkeypatch.setattr(refit_pass, "refit_layer", real)
    one_line_error([*argv, "--ratio", "0.3"], capsys, "other settings", "delete that folder")
    assert not (tmp_path / "o" / "model").exists()
    assert main([*argv, "--ratio", "0.4"]) == 0  # the same command resumes


def test_a_run_that_cannot_fit_in_memory_is_refused_up_front(tmp_path, capsys, monkeypatch):
    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    import seap.calibration.estimate as est

    monkeypatch.setattr(est, "available_memory", lambda device: 1 << 20)
    one_line_error(["prune", "--model", str(folder), "--task", str(_corpus(tmp_path)), "--protect-first", "1",
                    "--protect-last", "1", "--ratio", "0.4", "--out", str(tmp_path / "o")], capsys,
                   "needs about", "is free", "--refit-choice score")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_estimate_counts_the_refitted_weights_held_for_the_save():
    """A checkpointed pass leaves the refitted output weights (save dtype) on disk and the save reads one
    layer's at a time; a pass without checkpoints holds every layer's from the start (about 19 GB at 70B)."""
    from seap.calibration.estimate import calibration_estimate

    layers = [{"params": 1000, "d_ff": 64, "kept": 32, "dense": False}] * 100
    layers += [{"params": 1000, "d_ff": 64, "kept": 64, "dense": True}] * 2
    kw = dict(layers=layers, hidden=16, vocab=100, tokens=10, padded_tokens=12, batch_tokens=12, param_bytes=4,
              streamed=True, groups=1, obs=True, refit=True, device=torch.device("cpu"))
    held = 100 * 16 * 32 * 2 + 2 * 16 * 64 * 2  # hidden x kept (x d_ff in a dense layer) x bf16 bytes
    saving = calibration_estimate(**kw)
    # the peak is then a layer's decision: the Gram matrix, OBS's two C x C, W^T and the refit's pieces
    work = 8 * 64 * 64 + 8 * 64 * 64 + 12 * 16 * 64
    assert saving.peak == {"layer": 4000, "hidden states": 12 * 16 * 4, "Gram and OBS workspace": work,
                           "runtime": 400 << 20}
    unsaved = calibration_estimate(**kw, checkpointed=False)
    assert unsaved.peak["refitted weights"] == held and unsaved.peak_bytes > saving.peak_bytes
    assert calibration_estimate(**{**kw, "refit": False}, checkpointed=False).peak.get("refitted weights", 0) == 0


def test_a_model_loaded_whole_is_part_of_the_peak_and_of_the_memory_it_may_use(monkeypatch):
    """On the whole-model path the model is resident when the estimate is made: memory available then
    excludes it, so it counts on both sides (a 3B float32 model was refused with 10 GiB to spare)."""
    import seap.calibration.estimate as est_mod

    monkeypatch.setattr(est_mod, "available_memory", lambda device: 1000)
    layers = [{"params": 100, "d_ff": 8, "kept": 4, "dense": False}] * 3
    kw = dict(layers=layers, hidden=4, vocab=10, tokens=5, padded_tokens=6, batch_tokens=6, param_bytes=4,
              groups=1, obs=True, refit=True, device=torch.device("cpu"))
    whole = est_mod.calibration_estimate(**kw, streamed=False)
    model = (3 * 100 + 10 * 4) * 4
    assert whole.peak["model"] == model and whole.resident == model and whole.free == 1000 + model
    streamed = est_mod.calibration_estimate(**kw, streamed=True)
    assert streamed.resident == 0 and streamed.free == 1000
    assert "counting the loaded model" in whole.line() and "counting" not in streamed.line()


def _torchrun(args: list[str], n: int, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "seap", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_two_gloo_processes_give_the_plan_of_one(tmp_path):
    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    corpus = _corpus(tmp_path)
    args = ["prune", "--model", str(folder), "--task", str(corpus), "--protect-first", "1", "--protect-last", "1",
            "--ratio", "0.4", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = _torchrun([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = Plan.load(tmp_path / "one" / "plan"), Plan.load(tmp_path / "two" / "plan")
    e1, e2 = one.experts[one.meta.default_expert], two.experts[two.meta.default_expert]
    assert e1.widths() == e2.widths()
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(e1.ffn, e2.ffn))
    assert shared >= 0.995 * sum(len(a) for a in e1.ffn)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert len(s2["calibration"]["tokens_per_process"]) == 2
    assert sum(s2["calibration"]["tokens_per_process"]) == sum(s1["calibration"]["tokens_per_process"])
    rec1, rec2 = e1.stats["reconstruction"], e2.stats["reconstruction"]
    assert rec1["tokens"] == rec2["tokens"]
    for x, y in zip(e1.ffn_out, e2.ffn_out):
        if x.shape == y.shape:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_more_processes_than_calibration_texts(tmp_path):
    folder = tiny_folder(tmp_path, "llama", num_hidden_layers=8)
    run = _torchrun(["prune", "--model", str(folder), "--task", str(_corpus(tmp_path, TEXTS[:1])), "--ratio", "0.4",
                     "--protect-first", "1", "--protect-last", "1", "--device", "cpu", "--out", str(tmp_path / "o")],
                    2, tmp_path)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("seap: error:")]
    assert lines and "1 texts for 2 processes" in lines[0] and "--nproc-per-node" in lines[0]
    import seap

    assert str(Path(seap.__file__).parent) not in run.stderr  # no traceback through seap (torchrun prints its own)
    assert not (tmp_path / "o" / "model").exists()
