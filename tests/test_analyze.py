"""seap analyze: the numbers behind the pictures, checked against independent computations on tiny models."""

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, TEXTS, has_shared_data, make_loaded, tiny_folder

from seap import PruneConfig, prune
from seap.analyze import (ClusterConfig, HeatmapConfig, SensitivityConfig, analyze_clusters, analyze_heatmap,
                          analyze_plans, analyze_sensitivity, fit_logistic, load_schedule)
from seap.analyze.clusters import pooled_hidden_states, silhouette, standardize
from seap.analyze.heatmap import (layer_correlations, log_profile, magnitude_profile, similarity_matrix,
                                  split_halves, within_between)
from seap.analyze.plans import chance_jaccard, jaccard, layer_jaccard
from seap.analyze.sensitivity import (dense_reference, final_hidden_nll, layer_damage, quadratic_sensitivity, replay_from, tolerance)
from seap.calibration.layerwise import collect_stats
from seap.cli import main
from seap.core.allocation import Pool, Schedule, achieved_ratio
from seap.errors import ArtifactError, ConfigError
from seap.model.fingerprints import fingerprint
from seap.model.loading import open_model
from seap.pruning.plan import Expert, Plan, allocate, build_plan
from seap.pruning.surgery import masked

SAMPLE = TEXTS[:6]
TINY = dict(texts=4, max_length=32, limit=8, protect_first=1, protect_last=1)


# -- sensitivity: the fit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k,x0,a", [(6.0, 0.35, 0.8), (-3.0, 0.6, 1.0), (15.0, 0.8, 0.5)])
def test_fit_logistic_recovers_known_parameters(k, x0, a):
    x = np.linspace(0, 1, 26)
    fit = fit_logistic(x, a / (1 + np.exp(-k * (x - x0))))
    assert fit.k == pytest.approx(k, abs=1e-2) and fit.x0 == pytest.approx(x0, abs=1e-3)
    assert fit.amplitude == pytest.approx(a, rel=1e-3) and fit.r2 == pytest.approx(1.0, abs=1e-6)


def test_flat_tolerance_fits_a_flat_curve():
    fit = fit_logistic(np.linspace(0, 1, 10), np.ones(10))
    assert fit.k == 0.0 and fit.r2 == 1.0  # k = 0: the uniform schedule over the pruned layers


def test_quadratic_sensitivity_and_equal_damage_tolerance():
    ratios = [0.25, 0.5, 0.75]
    c = [4.0, 1.0, 0.25, 0.0]
    damage = [[ci * r * r for r in ratios] for ci in c]
    assert quadratic_sensitivity(damage, ratios) == pytest.approx(c)
    tau = tolerance(c[:3])
    assert tau == pytest.approx([0.25, 0.5, 1.0], rel=5e-3)  # c^-1/2 (eps aside), max 1: 4x as sensitive, half the rate
    assert quadratic_sensitivity([[-0.1, -0.2, 0.0]], ratios) == [0.0]  # pruning that helps is not fragility


# -- sensitivity: the measurement -------------------------------------------------------------------------
def test_replaying_cached_layers_is_exact(family):
    lm = make_loaded(family)
    dense = dense_reference(lm, SAMPLE, SensitivityConfig(max_length=32))
    for layer in range(len(lm.adapter.layers(lm.model))):
        for b in dense:
            with replay_from(lm.model, lm.adapter, layer, b.outs[layer - 1] if layer else None):
                h, nll = final_hidden_nll(lm.model, b, {})
            assert torch.equal(h, b.h) and torch.equal(nll, b.nll)
    assert all("forward" not in vars(layer) for layer in lm.adapter.layers(lm.model))  # patches removed


def test_layer_whose_ffn_does_nothing_has_zero_sensitivity():
    lm = make_loaded("llama")
    with torch.no_grad():
        lm.adapter.ffn_out(lm.adapter.layers(lm.model)[2]).weight.zero_()
    dense = dense_reference(lm, SAMPLE, SensitivityConfig(max_length=32))
    keep = torch.arange(0, 64, 2)  # half of the 64 channels
    assert layer_damage(lm, dense, 2, keep) == (0.0, 0.0)
    cos_d, nll_d = layer_damage(lm, dense, 3, keep)
    assert cos_d > 1e-4 and nll_d != 0
    # Independently: the whole model run with layer 3 masked, no replay.
    ffn = [torch.arange(64) if i != 3 else keep for i in range(6)]
    enc = lm.tokenizer(SAMPLE, max_length=32)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = lm.model(**enc, output_hidden_states=True).hidden_states[-1]
        with masked(lm.model, lm.adapter, Plan.probe({"x": Expert(ffn)}), "x"):
            got = lm.model(**enc, output_hidden_states=True).hidden_states[-1]
    cos = torch.nn.functional.cosine_similarity(got[mask].double(), ref[mask].double(), dim=-1)
    assert cos_d == pytest.approx(1 - float(cos.mean()), rel=1e-4)


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """One sensitivity run on a tiny Llama, shared: (model, output folder, result)."""
    lm, out = make_loaded("llama"), tmp_path_factory.mktemp("sens")
    return lm, out, analyze_sensitivity(lm, ["default:science_qa"], config=SensitivityConfig(**TINY), out=out,
                                        progress=False)


def test_sensitivity_writes_a_schedule_that_prunes_at_the_ratio(tiny_fit):
    lm, out, res = tiny_fit
    for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png", "schedule.png"):
        assert (out / name).stat().st_size > 0
    assert len(res.data["damage"]["cosine"]) == 6 and res.data["fits"]["cosine"]["layers"] == [1, 2, 3, 4]
    sched = load_schedule(out)
    assert (sched.k, sched.x0) == (res.data["schedule"]["k"], res.data["schedule"]["x0"])
    cfg = PruneConfig(ratio=0.3).with_(schedule=sched)
    a = cfg.allocation
    assert a.name == "logistic" and (a.first, a.last) == (1, 1) and (a.k, a.x0) == (sched.k, sched.x0)
    stats = {"t": collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS, progress=False)}
    plan = build_plan(lm.model, lm.adapter, cfg, stats, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))
    ex = plan.experts["t"]
    assert ex.stats["achieved_ratio"] == pytest.approx(0.3, abs=96 / 2 / ex.stats["prunable_params"])
    assert ex.widths()[0] == ex.widths()[-1] == 64  # the layers left out of the fit stay dense
    assert plan.meta.config["allocation"]["schedule"]["k"] == sched.k and plan.meta.config["allocation"]["k"] == sched.k
    assert PruneConfig.from_dict(plan.meta.config).allocation.schedule == sched  # the record reads back as the same value


@pytest.mark.parametrize("k,x0", [(8.0, 0.2), (-5.0, 0.9), (0.0, 0.5), (20.0, 1.5), (-20.0, -0.5)])
def test_logistic_fitted_allocation_meets_the_ratio(k, x0):
    cfg = PruneConfig(ratio=0.5).with_(schedule=Schedule(k, x0, 2, 1, {"arch_hash": "x"}))
    pool = Pool((1536,) * 30, (1728,) * 30)
    kept, _ = allocate(cfg, pool, None, [], None)
    assert achieved_ratio(pool, kept) == pytest.approx(0.5, abs=1 / 1536 / 30)
    assert kept[:2] == [1536, 1536] and kept[-1] == 1536  # the layers left out of the fit stay dense
    shallow, deep = kept[2], kept[-2]
    assert (shallow >= deep) if k > 0 else (shallow <= deep)  # k < 0 prunes shallow layers more


def test_fitted_schedule_refused_on_another_model(tiny_fit):
    lm, out, _ = tiny_fit
    sched = load_schedule(out / "sensitivity.json")
    cfg = PruneConfig().with_(schedule=sched, score="magnitude")
    with pytest.raises(ArtifactError, match="another model"):
        prune(make_loaded("llama", num_hidden_layers=4), cfg, progress=False)
    other = make_loaded("llama")
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.5)
    with pytest.raises(ArtifactError, match="different weights"):
        prune(other, cfg, progress=False)
    small = make_loaded("llama", num_hidden_layers=4)  # and through build_plan without the check: arch hash differs
    with pytest.raises(ArtifactError, match="another model"):
        build_plan(small.model, small.adapter, cfg, {"t": None}, base_model="x", revision=None,
                   fingerprint=fingerprint(small.model, small.adapter))


def test_config_errors():
    with pytest.raises(ConfigError, match="with a measured `schedule`"):
        PruneConfig().with_(allocation="logistic-fitted")
    fitted = Schedule(2.0, 0.5, 2, 2)
    with pytest.raises(ConfigError, match="`k` and `x0` come from the `schedule`"):
        PruneConfig().with_(schedule=fitted, k=3.0)
    with pytest.raises(ConfigError, match="fitted with protect first = 2"):
        PruneConfig().with_(schedule=fitted, protect_first=0)
    with pytest.raises(ConfigError, match="not 'uniform'"):
        PruneConfig().with_(allocation="uniform", schedule=fitted)
    assert PruneConfig().with_(schedule=fitted, k=2.0, x0=0.5, protect_first=2).allocation.k == 2.0  # agreeing values are fine
    for bad in (dict(ratios=()), dict(ratios=(0.5, 1.5)), dict(metric="kl"), dict(texts=0), dict(max_length=1)):
        with pytest.raises(ConfigError):
            SensitivityConfig(**bad)
    with pytest.raises(ConfigError, match="pooling"):
        ClusterConfig(pool="max")
    with pytest.raises(ConfigError, match="at least 2"):
        HeatmapConfig(limit=1)
    with pytest.raises(ConfigError, match="at least 3 pruned layers"):
        fit_logistic([0, 1], [0, 1])


def test_load_schedule_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_schedule(tmp_path / "nope.json")
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_schedule(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"format": "seap-plan"}))
    with pytest.raises(ArtifactError, match="not a seap sensitivity file"):
        load_schedule(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"format": "seap-sensitivity", "version": 1, "schedule": {}}))
    with pytest.raises(ArtifactError, match="incomplete"):
        load_schedule(tmp_path / "s.json")


# -- heatmap ----------------------------------------------------------------------------------------------
def test_identical_halves_give_identical_heatmaps_and_similarity_one():
    lm = make_loaded("gemma3")
    stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS, progress=False)
    a, b = log_profile(magnitude_profile(stats)), log_profile(magnitude_profile(stats))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert layer_correlations(a, b) == pytest.approx([1.0] * 6)
    other = log_profile(magnitude_profile(collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS[2:5],
                                                        progress=False)))
    got = layer_correlations(a, other)
    assert got == pytest.approx([np.corrcoef(x.numpy(), y.numpy())[0, 1] for x, y in zip(a, other)])
    per_layer = {("t/A", "t/B"): layer_correlations(a, b), ("t/A", "u/A"): got, ("t/A", "u/B"): got,
                 ("t/B", "u/A"): got, ("t/B", "u/B"): got, ("u/A", "u/B"): layer_correlations(other, other)}
    within, between = within_between(per_layer, ["t", "u"])
    assert within == pytest.approx([1.0] * 6) and between == pytest.approx(got)
    sim = similarity_matrix([a, b, other])
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(sum(got) / 6)


def test_rms_profile_is_the_root_mean_square_of_the_activations():
    lm = make_loaded("llama")
    z = {}
    hook = lm.adapter.ffn_out(lm.adapter.layers(lm.model)[1]).register_forward_pre_hook(
        lambda _m, args: z.__setitem__("z", args[0]))
    enc = lm.tokenizer(TEXTS[:1])
    with torch.no_grad():
        lm.model(**enc)
    hook.remove()
    prof = magnitude_profile(collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS[:1], progress=False))
    assert prof[1] == pytest.approx(z["z"][0].double().pow(2).mean(0).sqrt(), rel=1e-5)


def test_split_halves_are_disjoint_and_seeded():
    texts = [f"t{i}" for i in range(11)]
    a, b = split_halves(texts, seed=3)
    assert sorted(a + b) == sorted(texts) and not set(a) & set(b) and len(a) == 5
    assert split_halves(texts, seed=3) == (a, b)


def test_heatmap_end_to_end(tmp_path):
    res = analyze_heatmap(make_loaded("opt"), ["default:science_qa", "default:math_word"],
                          config=HeatmapConfig(limit=8, max_length=32, dims=16), out=tmp_path, progress=False)
    assert -1 <= res.data["between_task"] <= 1 and -1 <= res.data["within_task"] <= 1
    assert len(res.data["similarity"]["names"]) == 4
    assert {"heatmap.png", "heatmap_similarity.png", "heatmap_layers.png"} <= {p.name for p in tmp_path.iterdir()}


# -- clusters ---------------------------------------------------------------------------------------------
def test_silhouette_of_separated_clusters_is_near_one_and_of_random_labels_near_zero():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, size=(30, 8)) for c in (0.0, 10.0, -10.0)])
    labels = np.repeat(["a", "b", "c"], 30)
    assert silhouette(x, labels) > 0.95
    assert abs(silhouette(x, rng.permutation(labels))) < 0.1
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        silhouette(x, ["a"] * 90)


def test_pooled_hidden_states_match_the_models_own_hidden_states():
    lm = make_loaded("llama")
    texts = TEXTS[:5]
    mean = pooled_hidden_states(lm, texts, pool="mean", max_length=128, batch_size=2, progress=False)
    last = pooled_hidden_states(lm, texts, pool="last", max_length=128, batch_size=2, progress=False)
    for i, t in enumerate(texts):
        with torch.no_grad():
            hs = lm.model(**lm.tokenizer([t]), output_hidden_states=True).hidden_states
        for layer in (0, 3):
            assert mean[layer, i] == pytest.approx(hs[layer + 1][0].mean(0), abs=1e-5)
            assert last[layer, i] == pytest.approx(hs[layer + 1][0, -1], abs=1e-5)
    z = standardize(mean[3].numpy())
    assert np.allclose(z.mean(0), 0) and np.allclose(z.std(0), 1)


def test_pooled_hidden_states_streamed_equal_the_model_in_memory(tmp_path, family):
    """The probe is a pass of the calibration engine: layer by layer from the checkpoint's shards, it
    gives what the whole model in memory gives."""
    from seap import Runtime

    folder = tiny_folder(tmp_path, family)
    texts = TEXTS[:5]
    whole = open_model(str(folder), Runtime(device="cpu", dtype="float32"))
    lazy = open_model(str(folder), Runtime(device="cpu", dtype="float32", load="layerwise"), streamable=True)
    assert type(lazy).__name__ == "LazyModel"
    for pool in ("mean", "last"):
        want = pooled_hidden_states(whole, texts, pool=pool, max_length=64, batch_size=2, progress=False)
        got = pooled_hidden_states(lazy, texts, pool=pool, max_length=64, batch_size=2, progress=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="empty"):
        pooled_hidden_states(whole, ["a text", "   "], progress=False)


def test_clusters_end_to_end(tmp_path):
    res = analyze_clusters(make_loaded("gemma3"), ["default:science_qa", "default:math_word", "default:general_text"],
                           config=ClusterConfig(limit=10, max_length=48, layers=(1, 5)), out=tmp_path, progress=False)
    assert res.data["layers_shown"] == [1, 5] and len(res.data["silhouette"]) == 6
    assert all(-1 <= s <= 1 for s in res.data["silhouette"])
    assert len(res.data["points"]["pca"]["5"]) == 30
    pts, labels = np.array(res.data["points"]["pca"]["5"]), res.data["labels"]
    assert res.data["silhouette_2d"]["pca"]["5"] == pytest.approx(silhouette(pts, labels), abs=1e-3)
    for name in ("clusters_pca.png", "clusters_tsne.png", "clusters_silhouette.png", "clusters.json", "clusters.md"):
        assert (tmp_path / name).is_file()
    with pytest.raises(ConfigError, match="layer 9 does not exist"):
        analyze_clusters(make_loaded("gemma3"), ["default:science_qa", "default:math_word"],
                         config=ClusterConfig(limit=4, layers=(9,)), progress=False)


@pytest.mark.skipif(not has_shared_data(), reason="needs ../shared/data")
def test_clusters_on_shared_data_tasks():
    res = analyze_clusters(make_loaded("llama"), ["piqa", "arc_easy"], data_dir=SHARED_DATA,
                           config=ClusterConfig(limit=8, max_length=64, methods=("pca",)), progress=False)
    assert res.data["tasks"] == {"piqa": 8, "arc_easy": 8}


# -- plans ------------------------------------------------------------------------------------------------
def test_jaccard_against_hand_counts():
    assert jaccard(torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(2 / 5)
    assert jaccard(torch.tensor([5, 1]), torch.tensor([1, 5])) == 1.0
    assert chance_jaccard(100, 50, 50) == pytest.approx(1 / 3)
    assert layer_jaccard([torch.tensor([0, 1])], [torch.tensor([1, 2])]) == [pytest.approx(1 / 3)]


def _two_expert_plan(tmp_path):
    lm = make_loaded("llama")
    stats = {t: collect_stats(lm.model, lm.tokenizer, lm.adapter, texts, progress=False)
             for t, texts in (("a", TEXTS[:4]), ("b", TEXTS[4:8]))}
    plan = build_plan(lm.model, lm.adapter, PruneConfig(ratio=0.25), stats, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))
    return plan, plan.save(tmp_path / "plan")


def test_plan_analysis_numbers(tmp_path):
    plan, folder = _two_expert_plan(tmp_path)
    res = analyze_plans([folder], out=tmp_path / "an")
    j = res.data["jaccard"]
    assert j["names"] == ["a", "b", "generic"]
    assert [j["mean"][i][i] for i in range(3)] == [1.0] * 3
    want = [jaccard(x, y) for x, y in zip(plan.experts["a"].ffn, plan.experts["b"].ffn)]
    assert j["by_layer"]["a vs b"] == pytest.approx(want)
    cut = [l for l in range(6) if min(len(plan.experts["a"].ffn[l]), len(plan.experts["b"].ffn[l])) < 64]
    assert cut == [2, 3]  # the logistic schedule keeps 2 first and 2 last layers dense: they do not dilute the mean
    assert j["mean"][0][1] == pytest.approx(sum(want[l] for l in cut) / 2)
    assert res.data["kept_fraction"]["a"] == [w / 64 for w in plan.experts["a"].widths()]
    assert (tmp_path / "an" / "plan_jaccard.png").is_file() and (tmp_path / "an" / "plan_widths.png").is_file()
    twice = analyze_plans([folder, folder])  # a plan against itself: every layer overlaps fully
    assert twice.data["jaccard"]["by_layer"]["logistic@0.25#1:a vs logistic@0.25#2:a"] == [1.0] * 6


# -- CLI --------------------------------------------------------------------------------------------------
def test_cli_end_to_end_on_a_tiny_folder(tmp_path, capsys):
    folder = tiny_folder(tmp_path, "llama")
    an = tmp_path / "an"
    assert main(["analyze", "sensitivity", "--model", str(folder), "--texts", "3", "--max-length", "32", "--limit",
                 "6", "--protect-first", "1", "--protect-last", "1", "--ratio", "0.5", "--ratio", "1.0",
                 "--metric", "ppl", "--out", str(an)]) == 0
    assert "fitted logistic (ppl)" in capsys.readouterr().out
    out = tmp_path / "pruned"
    capsys.readouterr()
    for extra, message in ((["--allocation", "uniform"], "not 'uniform'"), (["--k", "2"], "--k and --x0 come from the --schedule: drop them")):
        assert main(["prune", "--model", str(folder), "--schedule", str(an / "sensitivity.json"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["prune", "--model", str(folder), "--task", "default:science_qa", "--ratio", "0.3",
                 "--schedule", str(an / "sensitivity.json"), "--out", str(out)]) == 0
    meta = json.loads((out / "plan" / "plan.json").read_text())
    alloc = meta["config"]["allocation"]
    assert alloc["name"] == "logistic" and alloc["schedule"]["source"]["metric"] == "ppl"
    assert json.loads((out / "summary.json").read_text())["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    assert main(["analyze", "plan", "--plan", str(out / "plan"), "--out", str(an)]) == 0
    assert main(["analyze", "clusters", "--model", str(folder), "--task", "default:science_qa", "--task",
                 "default:math_word", "--limit", "6", "--no-tsne", "--out", str(an)]) == 0
    assert main(["analyze", "heatmap", "--model", str(folder), "--task", "default:science_qa", "--limit", "4",
                 "--dims", "8", "--out", str(an)]) == 0
    names = {p.name for p in an.iterdir()}
    assert {"sensitivity.json", "plan.json", "clusters.json", "heatmap.json", "clusters_pca.png", "heatmap.png",
            "plan_widths.png", "schedule.png"} <= names
    text = capsys.readouterr().out
    assert "within-task" in text and "silhouette" in text


@pytest.mark.parametrize("argv,message", [
    (["analyze", "plan", "--plan", "/nonexistent/plan"], "is not a plan folder"),
    (["prune", "--allocation", "logistic-fitted"], "needs the fitted schedule"),
    (["prune", "--allocation", "uniform", "--schedule", "x.json"], "schedule file x.json does not exist"),
    (["analyze", "sensitivity", "--ratio", "0"], "fractions in (0, 1]"),
    (["analyze", "clusters", "--task", "nope"], "unknown task"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seap: error:") and message in err and "\n" not in err
