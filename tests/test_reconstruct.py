"""Reconstruction (DESIGN 2.8): the refit is the least-squares optimum, and every path applies it alike."""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import TEXTS, make_loaded, plan_for, tiny_folder

from seap import Plan, Runtime, prune
from seap.calibration.gram import GramAccumulator
from seap.config import PruneConfig
from seap.core.reconstruct import obs_select, output_error, refit
from seap.errors import ConfigError
from seap.model.checkpoint import Checkpoint
from seap.pruning.refit_pass import reconstruct_plan, refit_experts
from seap.pruning.surgery import masked, slice_model

IDS = torch.randint(2, 128, (3, 17), generator=torch.Generator().manual_seed(1))


def _data(tokens=400, channels=24, out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g, dtype=torch.float64)
    z = torch.randn(tokens, channels, generator=g, dtype=torch.float64) @ mix + 0.7  # correlated, off-centre
    w = torch.randn(out, channels, generator=g, dtype=torch.float64)
    kept = torch.sort(torch.randperm(channels, generator=g)[: channels // 2]).values
    return z, w, kept


def _moments(z, chunks=(150, 0, 250)):
    acc = GramAccumulator(z.shape[1], torch.device("cpu"))
    for part in torch.split(z, list(chunks)):
        acc.add(part, None)
    return acc.result()


@pytest.mark.parametrize("centered", [True, False])
def test_refit_is_the_independent_least_squares_optimum(centered):
    z, w, kept = _data()
    m = _moments(z)
    fit = refit(w, kept, m, ridge=0.0, centered=centered)
    y = z @ w.T
    design = torch.cat([z[:, kept], torch.ones(len(z), 1, dtype=z.dtype)], 1) if centered else z[:, kept]
    sol = torch.linalg.lstsq(design, y).solution  # [|K| (+1), d]
    best = float(((design @ sol - y) ** 2).sum())
    torch.testing.assert_close(fit.weight, sol[: len(kept)].T, rtol=1e-4, atol=1e-5)
    err = output_error(w, kept, m, fit.weight, fit.bias_delta)
    assert err == pytest.approx(best, rel=1e-4)
    # what the refit explains, from its own solve, closes the gap from the (mean-compensated) cut
    removed_ = torch.tensor([c for c in range(z.shape[1]) if c not in set(kept.tolist())])
    cut = output_error(w, kept, m, None, w[:, removed_] @ m.mean[removed_] if centered else None)
    assert cut - fit.explained == pytest.approx(err, rel=1e-6)
    with_ridge = refit(w, kept, m, ridge=0.3, centered=centered)
    assert cut - with_ridge.explained == pytest.approx(
        output_error(w, kept, m, with_ridge.weight, with_ridge.bias_delta), rel=1e-6)
    if centered:
        torch.testing.assert_close(fit.bias_delta, sol[-1], rtol=1e-4, atol=1e-5)
    # ...and no worse than FLAP's bias compensation or the plain cut
    removed = torch.tensor([c for c in range(z.shape[1]) if c not in set(kept.tolist())])
    flap = w[:, removed] @ m.mean[removed]
    assert err <= output_error(w, kept, m, None, flap) <= output_error(w, kept, m)


@pytest.mark.parametrize("centered", [True, False])
def test_obs_choice_is_the_greedy_least_squares_choice(centered):
    """One channel per round: each step drops the channel whose removal, with the rest refitted, costs least
    (checked by refitting every candidate), and the result beats the score's own set here."""
    z, w, kept = _data(tokens=300, channels=12, out=6, seed=11)
    m = _moments(z, chunks=(100, 200))

    def cost(cols):
        fit = refit(w, torch.tensor(cols), m, ridge=0.0, centered=centered)
        return output_error(w, torch.tensor(cols), m, fit.weight, fit.bias_delta)

    for n_keep in (3, 6, 11):
        alive = list(range(12))
        while len(alive) > n_keep:
            alive.remove(min(alive, key=lambda j: cost([a for a in alive if a != j])))
        got = obs_select(w, m, n_keep, ridge=0.0, centered=centered, rounds=12, dtype=torch.float64)
        assert got.tolist() == alive
        # float32 updates (the default) only rank the channels: the same choice on this problem
        assert obs_select(w, m, n_keep, ridge=0.0, centered=centered, rounds=12).tolist() == alive
    blocked = obs_select(w, m, 6, ridge=0.0, centered=centered)  # default rounds: blocks of channels
    assert len(blocked) == 6 and cost(blocked.tolist()) <= cost(kept.tolist())


def test_a_bounded_obs_search_removes_only_the_scores_lowest_channels():
    """With `obs_pool`, OBS's greedy picks among the score's lowest pool x (removals) channels (checked by
    refitting every candidate); pool 1 is the score's own choice, a pool over every channel plain OBS."""
    from seap.core.scores import top_k
    from seap.pruning.refit_pass import obs_removable

    z, w, _ = _data(tokens=300, channels=12, out=6, seed=7)
    m = _moments(z, chunks=(120, 180))
    score = torch.rand(12, generator=torch.Generator().manual_seed(2))

    def cost(cols):
        fit = refit(w, torch.tensor(cols), m, ridge=0.0, centered=True)
        return output_error(w, torch.tensor(cols), m, fit.weight, fit.bias_delta)

    n_keep = 7
    removable = obs_removable(score, n_keep, 2.0)
    assert sorted(removable.tolist()) == sorted(torch.argsort(score)[:10].tolist())  # ceil(2 x 5) lowest
    alive = list(range(12))
    while len(alive) > n_keep:
        alive.remove(min((j for j in alive if j in set(removable.tolist())),
                         key=lambda j: cost([a for a in alive if a != j])))
    assert obs_select(w, m, n_keep, ridge=0.0, rounds=12, dtype=torch.float64, removable=removable).tolist() == alive
    assert obs_select(w, m, n_keep, ridge=0.0, removable=obs_removable(score, n_keep, 1.0)).tolist() == \
        top_k(score, n_keep).tolist()
    assert torch.equal(obs_select(w, m, n_keep, ridge=0.0, removable=obs_removable(score, n_keep, 3.0)),
                       obs_select(w, m, n_keep, ridge=0.0))
    assert obs_removable(score, n_keep, None) is None
    with pytest.raises(ConfigError, match="one-pass"):
        obs_removable(None, n_keep, 2.0)
    with pytest.raises(ConfigError, match="obs_pool"):
        PruneConfig.from_method("seap", obs_pool=0.5)


def test_errors_from_the_moments_equal_the_direct_sums():
    z, w, kept = _data(seed=3)
    m = _moments(z)
    w_new = torch.randn(w.shape[0], len(kept), dtype=torch.float64)
    delta = torch.randn(w.shape[0], dtype=torch.float64)
    direct = float(((z @ w.T - z[:, kept] @ w_new.T - delta) ** 2).sum())
    assert output_error(w, kept, m, w_new, delta) == pytest.approx(direct, rel=1e-6)  # float32 per batch
    assert output_error(w, kept, m) == pytest.approx(float(((z @ w.T - z[:, kept] @ w[:, kept].T) ** 2).sum()),
                                                     rel=1e-6)


def test_blocked_triangular_maths_equal_one_block(monkeypatch):
    """The lower-triangle Gram sums, OBS updates and error quadratics, run in blocks smaller than the
    matrix (as at 8B), give what one block gives: the same moments, channels, refit and errors."""
    import seap.core.reconstruct as rec

    z, w, kept = _data(tokens=300, channels=23, out=7, seed=5)

    def everything(m):
        chosen = obs_select(w, m, 9, ridge=1e-2, rounds=7)
        fit = refit(w, chosen, m, ridge=1e-2)
        errs = (output_error(w, kept, m), output_error(w, chosen, m, fit.weight, fit.bias_delta))
        return chosen, fit, errs

    m1 = _moments(z, chunks=(100, 200))
    c1, f1, e1 = everything(m1)
    monkeypatch.setattr(rec, "TRI_BLOCK", 4)
    monkeypatch.setattr(rec, "ROW_BLOCK", 5)
    m2 = _moments(z, chunks=(100, 200))
    torch.testing.assert_close(m2.gram, m1.gram, rtol=1e-5, atol=1e-6)  # float32 partial sums in another order
    assert torch.equal(m2.gram, m2.gram.T)  # the upper triangle mirrored from the lower
    c2, f2, e2 = everything(m1)
    assert c2.tolist() == c1.tolist()
    torch.testing.assert_close(f2.weight, f1.weight, rtol=1e-5, atol=1e-7)  # its right-hand side is float32
    assert e2 == pytest.approx(e1, rel=1e-6)
    direct = float(((z @ w.T - z[:, kept] @ w[:, kept].T) ** 2).sum())
    assert e2[0] == pytest.approx(direct, rel=1e-6)


def test_ridge_shrinks_towards_the_plain_cut_and_keep_all_is_the_identity():
    z, w, kept = _data(seed=5)
    m = _moments(z)
    gaps = [float((refit(w, kept, m, ridge=r).weight - w[:, kept]).norm()) for r in (0.0, 0.1, 10.0, 1e6)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3 * gaps[0]
    full = refit(w, torch.arange(w.shape[1]), m)
    assert torch.equal(full.weight, w)
    assert float(full.bias_delta.abs().max()) < 1e-9 * float(w.abs().max() * m.mean.abs().max() * w.shape[1])


def test_padding_is_excluded_from_the_moments():
    z, _, _ = _data(tokens=30, seed=7)
    keep = torch.rand(30, generator=torch.Generator().manual_seed(0)) > 0.3
    acc = GramAccumulator(z.shape[1], torch.device("cpu"))
    acc.add(torch.where(keep[:, None], z, torch.nan), keep)  # NaN padding must not leak
    m = acc.result()
    kz = z[keep].float().double()
    assert m.count == int(keep.sum())
    torch.testing.assert_close(m.gram, kz.T @ kz, rtol=1e-5, atol=1e-4)


def _reconstructed(family, mode="refit", method="seap", **kw):
    lm = make_loaded(family)
    cfg = PruneConfig.from_method(method, ratio=0.5, protect_first=0, protect_last=0, reconstruct=mode, **kw)
    plan, _ = plan_for(lm, cfg)
    plan = reconstruct_plan(lm, plan, {"t": TEXTS}, cfg.refit.resolved(lm.adapter, lm.model.config), batch_size=4,
                            progress=False)
    return lm, plan


@pytest.mark.parametrize("mode,choice", [("refit", "score"), ("sequential", "score"), ("sequential", "obs")])
def test_sliced_equals_masked_with_reconstruction(family, mode, choice):
    lm, plan = _reconstructed(family, mode, refit_choice=choice)
    ex = plan.experts["t"]
    assert ex.ffn_out is not None and (ex.heads is None) == (ex.attn_out is None)
    with masked(lm.model, lm.adapter, plan, "t"):
        want = lm.model(IDS).logits
    dense = lm.model(IDS).logits
    got = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want, dense, atol=1e-3)


def test_a_layers_refit_error_is_the_least_squares_optimum_on_its_calibration_tokens(family):
    lm, plan = _reconstructed(family, ridge=0.0, refit_bias=True)
    ex = plan.experts["t"]
    target = 2
    rec = ex.stats["reconstruction"]["ffn_error"]
    # Layer `target`'s FFN inputs on the calibration tokens of the dense model (refit mode: dense stream)
    zs = []
    lin = lm.adapter.ffn_out(lm.adapter.layers(lm.model)[target])
    h = lin.register_forward_pre_hook(lambda m, a: zs.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    for t in TEXTS:
        lm.model(torch.tensor([lm.tokenizer.encode(t)]))
    h.remove()
    z = torch.cat(zs).double()
    w = lin.weight.detach().double()
    k = ex.ffn[target]
    design = torch.cat([z[:, k], torch.ones(len(z), 1, dtype=z.dtype)], 1)
    y = z @ w.T
    best = float(((design @ torch.linalg.lstsq(design, y).solution - y) ** 2).sum())
    assert rec["refit"][target] == pytest.approx(best, rel=1e-3, abs=1e-6)
    assert all(r <= b * (1 + 1e-9) <= n * (1 + 1e-9) for r, b, n in zip(rec["refit"], rec["bias"], rec["none"]))


@torch.no_grad()
def test_reconstruction_brings_the_model_closer_to_dense_on_its_calibration_text(family):
    lm, plan = _reconstructed(family, "sequential")
    ids = torch.tensor([lm.tokenizer.encode(TEXTS[3])])
    dense = lm.model(ids).logits
    rec = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")(ids).logits
    plain_plan = copy.deepcopy(plan)
    ex = plain_plan.experts["t"]
    ex.ffn_out = ex.ffn_bias = ex.attn_out = ex.attn_bias = None
    plain = slice_model(copy.deepcopy(lm.model), lm.adapter, plain_plan, "t")(ids).logits
    assert float((rec - dense).pow(2).mean()) < float((plain - dense).pow(2).mean())


@pytest.mark.parametrize("choice", ["score", "obs"])
def test_experts_share_one_pass_with_the_same_result_as_one_pass_each(family, choice, monkeypatch):
    """Task experts and the generic expert refitted from per-corpus moments in one pass (the default
    in the refit mode) equal one pass per expert over its own texts."""
    from seap.calibration.layerwise import collect_stats
    from seap.model.fingerprints import fingerprint
    from seap.pruning.plan import GENERIC, build_plan

    import seap.pruning.refit_pass as rec

    real = refit_experts
    lm = make_loaded(family)
    texts = {"a": TEXTS[:8], "b": TEXTS[8:] + ["Another text about pruning channels."]}
    stats = {t: collect_stats(lm.model, lm.tokenizer, lm.adapter, x, heads=family == "opt", meta={"corpus": t},
                              progress=False) for t, x in texts.items()}
    cfg = PruneConfig.from_method("seap", ratio=0.5, protect_first=0, protect_last=0, refit_choice=choice)
    members = {"a": ("a",), "b": ("b",), GENERIC: ("a", "b")}
    plans = []
    for shared in (True, False):
        plan = build_plan(lm.model, lm.adapter, cfg, stats, base_model="tiny", revision=None,
                          fingerprint=fingerprint(lm.model, lm.adapter))
        calls = []
        monkeypatch.setattr(rec, "available_memory", lambda d: (1 << 40) if shared else 0, raising=False)
        monkeypatch.setattr(rec, "refit_experts", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        plan = rec.reconstruct_plan(lm, plan, texts, cfg.refit.resolved(lm.adapter, lm.model.config),
                                    members=members, batch_size=3, progress=False)
        assert len(calls) == (1 if shared else 3)
        plans.append(plan)
    for name in members:
        one, each = plans[0].experts[name], plans[1].experts[name]
        assert one.stats["reconstruction"]["tokens"] == each.stats["reconstruction"]["tokens"]
        for i in range(len(one.ffn)):
            assert torch.equal(one.ffn[i], each.ffn[i])
            torch.testing.assert_close(one.ffn_out[i], each.ffn_out[i], rtol=1e-4, atol=1e-5)


def test_a_saved_plan_keeps_its_refitted_weights(tmp_path):
    lm, plan = _reconstructed("opt", method="flap")
    back = Plan.load(plan.save(tmp_path / "plan"))
    a, b = plan.experts["t"], back.experts["t"]
    assert a.digest() == b.digest()
    for kind in ("ffn_out", "attn_out", "ffn_bias"):
        for x, y in zip(getattr(a, kind), getattr(b, kind)):
            assert torch.equal(x, y)
    want = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")(IDS).logits
    assert torch.equal(slice_model(copy.deepcopy(lm.model), lm.adapter, back, "t")(IDS).logits, want)


def test_routed_experts_use_the_refitted_weights():
    from seap.inference.experts import MultiExpertModel

    lm, plan = _reconstructed("llama")
    want = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")(IDS).logits
    routed = MultiExpertModel(lm, plan, experts=["t"], materialize=False)
    with routed.use("t"):
        got = lm.model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_streamed_reconstruction_equals_the_whole_model_path(tmp_path, family):
    folder = tiny_folder(tmp_path, family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    cfg = PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1, reconstruct="sequential")
    runs = {}
    for load in ("whole", "layerwise"):
        res = prune(str(folder), cfg, [str(corpus)], tmp_path / load, progress=False,
                    runtime=Runtime(device="cpu", load=load))
        assert res.path == load and "calibration" in res.stage_seconds and res.calibration["passes"] == 1
        runs[load] = Checkpoint.open(tmp_path / load / "model")
    a, b = (r.read(r.names()) for r in runs.values())
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    plan = json.loads((tmp_path / "layerwise" / "plan" / "plan.json").read_text())
    assert plan["config"]["refit"]["mode"] == "sequential"


def test_a_pool_of_one_prunes_as_the_scores_channels_and_a_second_pass_refuses_a_pool(tmp_path):
    """Through `prune` (the one-pass calibration), OBS bounded to the score's own removals keeps the score's
    channels with the same refit; the adaptive allocation (widths from the scores: a second pass) is refused
    before any work."""
    folder = tiny_folder(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    plans = {}
    for tag, kw in {"score": {"refit_choice": "score"}, "pool1": {"obs_pool": 1}}.items():
        cfg = PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1, **kw)
        res = prune(str(folder), cfg, [str(corpus)], tmp_path / tag, progress=False)
        plans[tag] = Plan.load(tmp_path / tag / "plan")
        assert res.calibration["passes"] == 1
    a, b = (p.experts[p.meta.default_expert] for p in plans.values())
    for i in range(len(a.ffn)):
        assert torch.equal(a.ffn[i], b.ffn[i])
        torch.testing.assert_close(a.ffn_out[i], b.ffn_out[i])
    with pytest.raises(ConfigError, match="one-pass"):
        prune(str(folder), PruneConfig.from_method("seap", ratio=0.4, allocation="adaptive", obs_pool=2),
              [str(corpus)], tmp_path / "adaptive", progress=False)


def test_presets_seap_reconstructs_and_seap_paper_is_the_papers_recipe():
    for method in ("seap", "seap-gen"):
        cfg = PruneConfig.from_method(method)
        assert (cfg.refit.mode, cfg.refit.choice) == ("refit", "obs")
        assert cfg.refit.for_expert(True).choice == "obs" and cfg.refit.for_expert(False).choice == "obs"
        auto = dataclasses.replace(cfg.refit, choice="auto")  # the option that keeps the score's for the rest
        assert auto.for_expert(True).choice == "obs" and auto.for_expert(False).choice == "score"
        # turning reconstruction off drops the preset's channel choice with it (no error), and so does the
        # score's choice drop a bound on the OBS search
        assert PruneConfig.from_method(method, reconstruct="none").refit.choice == "score"
        assert PruneConfig.from_method(method, refit_choice="score").refit.obs_pool is None
        pooled = PruneConfig.from_method(method, refit_choice="auto", obs_pool=2).refit
        assert pooled.for_expert(True).obs_pool == 2 and pooled.for_expert(False).obs_pool is None
    for method in ("seap-paper", "seap-gen-paper", "flap", "wanda-sp"):
        assert PruneConfig.from_method(method).refit.mode == "none"
    paper = PruneConfig.from_method("seap-paper")
    assert (paper.score.name, paper.allocation.name, paper.generic) == ("wifn", "logistic", False)
    assert PruneConfig.from_method("seap-gen-paper").generic


def test_bad_reconstruction_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown `reconstruct` mode 'ols'"):
        PruneConfig().with_(reconstruct="ols")
    with pytest.raises(ConfigError, match="ridge"):
        PruneConfig().with_(reconstruct="refit", ridge=-1)
    with pytest.raises(ConfigError, match="needs `reconstruct`"):
        PruneConfig().with_(refit_choice="obs")
    with pytest.raises(ConfigError, match="unknown `refit_choice` 'best'"):
        PruneConfig().with_(reconstruct="refit", refit_choice="best")


def test_the_refitted_bias_goes_where_the_architecture_has_one(family):
    _, plan = _reconstructed(family)
    ex = plan.experts["t"]
    assert (ex.ffn_bias is None) == (family == "gemma3")  # Gemma 3 stays exportable to GGUF and vLLM
    _, plan = _reconstructed(family, refit_bias=True)
    assert plan.experts["t"].ffn_bias is not None


def test_prune_cli_with_reconstruction(tmp_path, capsys):
    from seap.cli import main

    folder = tiny_folder(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--task", str(corpus), "--ratio", "0.4", "--protect-first", "1",
                 "--protect-last", "1", "--reconstruct", "refit", "--ridge", "0.1", "--no-refit-bias",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "calibration" in summary["stage_seconds"] and summary["calibration"]["passes"] == 1
    plan = Plan.load(out / "plan")
    rec = plan.experts[plan.meta.default_expert].stats["reconstruction"]
    assert (rec["mode"], rec["ridge"], rec["centered"]) == ("refit", 0.1, False)
    assert sum(rec["ffn_error"]["refit"]) < sum(rec["ffn_error"]["none"])
    capsys.readouterr()
    assert main(["info", str(out / "plan")]) == 0
    shown = capsys.readouterr().out
    assert "'mode': 'refit'" in shown and "refit / cut" in shown and "'none': [" not in shown
