"""Routing: the multi-expert model against sliced copies, the router against scikit-learn, bad input."""

import collections
import json
import math
import random

import pytest
import torch
from conftest import TEXTS, left_padded, make_loaded, tiny_folder

import seap
from seap import PruneConfig
from seap.calibration.layerwise import collect_stats
from seap.cli import main
from seap.errors import ArtifactError, ConfigError
from seap.inference.experts import MultiExpertModel
from seap.inference.router import BACKGROUND, Router, RouterConfig, prompt_features
from seap.model.fingerprints import fingerprint
from seap.model.loading import encode_left_padded, load_model
from seap.pruning.plan import GENERIC, build_plan
from seap.pruning.surgery import ffn_params, sliced


def multi_task_plan(lm, method="seap", ratio=0.5):
    heads = lm.model.config.model_type == "opt"
    stats = {n: collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS[i::3], heads=heads, meta={"corpus": n},
                              progress=False) for i, n in enumerate("abc")}
    cfg = PruneConfig.from_method(method, ratio=ratio, protect_first=1, protect_last=1)
    return build_plan(lm.model, lm.adapter, cfg, stats, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))



@pytest.mark.parametrize("materialize", [True, False])
def test_mixed_batch_equals_each_sequence_alone_on_its_sliced_expert(family, materialize):
    lm = make_loaded(family)
    # OPT: FLAP prunes heads and adds bias compensation, so both routed paths are exercised.
    plan = multi_task_plan(lm, "flap" if family == "opt" else "seap")
    assert len({e.digest() for e in plan.experts.values()}) == 4  # four different experts
    multi = MultiExpertModel(lm, plan, materialize=materialize)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, 128, (n,), generator=g) for n in (17, 9, 13, 5)]
    names = ["a", "b", GENERIC, "a"]
    ids, mask = left_padded(seqs)
    with multi.use(names) as model:
        out = model(input_ids=ids, attention_mask=mask).logits
    for r, (s, name) in enumerate(zip(seqs, names)):
        alone = sliced(lm, plan, name).model(s[None]).logits[0]
        torch.testing.assert_close(out[r, ids.shape[1] - len(s):], alone, rtol=1e-5, atol=1e-5)


def test_use_puts_the_dense_linears_back_even_after_an_error():
    lm = make_loaded("llama")
    ids = torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    dense = lm.model(ids).logits
    before = [m for m in lm.model.modules()]
    multi = MultiExpertModel(lm, multi_task_plan(lm))
    with pytest.raises(RuntimeError):
        with multi.use(["a", "b"]):
            raise RuntimeError("boom")
    assert [m for m in lm.model.modules()] == before
    assert torch.equal(lm.model(ids).logits, dense)
    with pytest.raises(ConfigError, match="no expert"):
        with multi.use(["a", "nope"]):
            pass
    with pytest.raises(ConfigError, match="one expert per sequence"):
        with multi.use(["a", "b"]) as model:
            model(torch.randint(2, 128, (3, 5)))


def test_memory_report_counts_the_gathered_weights():
    lm = make_loaded("llama")
    plan = multi_task_plan(lm)
    multi = MultiExpertModel(lm, plan)
    mem = multi.memory()
    layers = lm.adapter.layers(lm.model)
    for name, ex in plan.experts.items():
        # Independent: FFN parameters of the sliced model, minus the layers an expert keeps whole
        # (those share the base weights), plus the int64 indices (one tensor per layer, shared by its linears).
        pruned = sliced(lm, plan, name).model
        shared = sum(3 * lm.adapter.hidden_size(lm.model) * len(ex.ffn[i]) for i, layer in enumerate(layers)
                     if len(ex.ffn[i]) == lm.adapter.d_ff(layer))
        want = (ffn_params(pruned, lm.adapter) - shared) * 4 + 8 * sum(ex.widths())
        assert mem["per_expert_bytes"][name] == want
    assert mem["base_bytes"] == sum(p.numel() * 4 for p in {id(p): p for p in lm.model.parameters()}.values())
    lazy = MultiExpertModel(lm, plan, materialize=False).memory()
    assert lazy["added_bytes"] == sum(8 * sum(e.widths()) for e in plan.experts.values())


def test_routed_generation_of_a_mixed_batch_equals_each_prompt_alone(tmp_path):
    lm = load_model(str(tiny_folder(tmp_path, "llama")))
    plan = multi_task_plan(lm)
    multi = MultiExpertModel(lm, plan)
    prompts = ["The quick brown fox", "Question: why?", "A", "Numbers: 1 2 3 4 5 6"]
    names = ["b", "a", GENERIC, "c"]
    texts, got = multi.generate(prompts, experts=names, max_new_tokens=8)
    assert got == names
    for p, name, text in zip(prompts, names, texts):
        alone = sliced(lm, plan, name)  # the reference: transformers' generate() on the sliced model
        enc = encode_left_padded(alone.tokenizer, [p])
        ref = alone.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=alone.tokenizer.pad_token_id)
        assert alone.tokenizer.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) == [text]


# -- the router ---------------------------------------------------------------------------------
KINDS = {
    "digits": lambda r: " ".join(str(r.randint(0, 999)) for _ in range(r.randint(3, 9))) + " =",
    "shout": lambda r: " ".join(r.choice(["WHY", "STOP", "NOW", "HELP", "LOOK", "RUN"]) for _ in range(r.randint(2, 6))) + "!",
    "quiz": lambda r: "Question: " + " ".join(r.choice(["is", "the", "a", "sky", "blue", "sea", "cold", "why"])
                                            for _ in range(r.randint(3, 8))) + "?\nAnswer:",
}


def write_corpora(folder, n=60):
    rng = random.Random(0)
    paths = {}
    for kind, make in KINDS.items():
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"prompt": make(rng), "answer": " ok"}) + "\n" for _ in range(n)))
        paths[kind] = str(path)
    return paths


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routed")
    folder = tiny_folder(tmp, "llama")
    paths = write_corpora(tmp)
    res = seap.prune(str(folder), PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1),
                     seap.CalibrationData(tuple(paths.values()), batch_size=4), tmp / "out")
    lm = load_model(str(folder))
    # No form test here: these tests are about the classifier (the form test has its own below).
    router = seap.fit_router(lm, [tmp / "out" / "plan"],
                             config=RouterConfig(limit=50, background_samples=60, ood_quantile=None))
    return {"tmp": tmp, "folder": folder, "paths": paths, "plan": tmp / "out" / "plan", "lm": lm, "router": router,
            "res": res}


def test_router_probabilities_equal_scikit_learn(routed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from seap.inference.router import mean_embeddings, training_set

    lm, router = routed["lm"], routed["router"]
    assert set(router.classes) == {*routed["paths"].values(), BACKGROUND}
    cfg = RouterConfig(limit=50, background_samples=60)
    data = training_set(lm, [*routed["paths"].values(), GENERIC], cfg)
    x = torch.cat([mean_embeddings(lm.model.get_input_embeddings().weight.detach(), data[c]) for c in data]).numpy()
    y = [c for c in data for _ in data[c]]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x), y)
    prompts = ["12 7 300 =", "HELP NOW!", "Question: is the sea cold?\nAnswer:", "something else entirely"]
    want = clf.predict_proba(scaler.transform(prompt_features(lm.model, lm.adapter, lm.tokenizer, prompts).numpy()))
    got = router.probabilities(prompt_features(lm.model, lm.adapter, lm.tokenizer, prompts))
    order = [list(clf.classes_).index(c) for c in router.classes]
    torch.testing.assert_close(got, torch.as_tensor(want[:, order]), rtol=1e-6, atol=1e-8)
    routes = router.route(lm, prompts[:3])
    assert [r.expert for r in routes] == [routed["paths"][k] for k in ("digits", "shout", "quiz")]


def test_saved_router_routes_exactly_like_the_fitted_one(routed):
    saved = Router.load(routed["plan"].parent / "router")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(saved.probabilities(x), routed["router"].probabilities(x))
    assert saved.classes == routed["router"].classes and saved.threshold == routed["router"].threshold


def test_unknown_prompts_go_to_the_generic_expert(routed):
    lm, router = routed["lm"], routed["router"]
    text = "Bees dance to tell their sisters where the flowers are, and how far away they grow."  # not in any corpus
    routes = router.route(lm, [text, ""])
    assert [r.expert for r in routes] == [GENERIC, GENERIC]
    assert routes[0].reason == "background" and routes[1].reason == "empty prompt"
    # Under the threshold, a prompt goes to the generic expert even when its class is a task.
    sure = router.route(lm, ["12 7 300 ="])[0]
    strict = Router(router.classes, router.experts, router.mean, router.scale, router.coef, router.intercept,
                    threshold=min(0.999, sure.confidence + 1e-6), meta=router.meta)
    r = strict.route(lm, ["12 7 300 ="])[0]
    assert (r.expert, r.reason, r.label) == (GENERIC, "low confidence", sure.label)


def test_form_features_and_the_out_of_distribution_test(routed, tmp_path):
    from seap.inference.ood import OodTest, form_features
    from seap.inference.router import token_ids

    lm, router = routed["lm"], routed["router"]
    tok = lm.tokenizer
    ids = token_ids(tok, ["Ab 12\n$"])
    pieces = [tok.decode([i]) for i in ids[0]]
    n, digits = len(pieces), sum(any(c.isdigit() for c in p) for p in pieces)
    want = [math.log1p(n), digits / n, sum("\n" in p for p in pieces) / n,
            sum(not any(c.isalnum() for c in p) for p in pieces) / n, 1 / 7, 7 / n, math.log1p(digits), math.log1p(1),
            math.log1p(sum("\n" in p for p in pieces))]
    torch.testing.assert_close(form_features(tok, ids)[0], torch.tensor(want, dtype=torch.float64))
    # Each class's threshold is the quantile of its own training prompts' distances to it.
    g = torch.Generator().manual_seed(0)
    by_class = {"a": torch.randn(400, 8, generator=g, dtype=torch.float64),
                "b": torch.randn(300, 8, generator=g, dtype=torch.float64) * 2 + 5}
    test = OodTest.fit(by_class, 0.95)
    for k, c in enumerate(test.classes):
        own = test.distances(by_class[c])[:, k]
        assert abs(float((own > test.thresholds[k]).double().mean()) - 0.05) < 0.005
    # The distance is Mahalanobis under the class's covariance (plus a 0.1% variance floor), computed apart.
    x = by_class["b"][:3]
    cov = torch.cov(by_class["b"].T) + torch.diag(1e-3 * torch.cat([by_class["a"], by_class["b"]]).var(0))
    diff = x - by_class["b"].mean(0)
    want_d = torch.sqrt(((diff @ torch.linalg.inv(cov)) * diff).sum(1))
    torch.testing.assert_close(test.distances(x)[:, 1], want_d)
    # Unfamiliar is judged against the class a prompt is routed to: a prompt at the centre of "a" is
    # familiar to "a" and unfamiliar to "b"; a label with no form model (the background) never is.
    d = test.distances(by_class["a"].mean(0, keepdim=True))[0]
    d = torch.stack([d, torch.full_like(d, float("nan"))], dim=-1)  # the evidence row, no vocabulary test
    assert not test.unfamiliar(d, "a") and test.unfamiliar(d, "b") and not test.unfamiliar(d, GENERIC)
    # A prompt of a form no task has (a long run of digits and signs) is unfamiliar and goes to the
    # generic expert; a saved router decides the same; the classifier alone sends it to a task expert.
    ood = seap.fit_router(lm, [routed["plan"]], out=tmp_path / "r",
                          config=RouterConfig(limit=50, background_samples=60, ood_quantile=0.99))
    assert ood.ood is not None and ood.meta["config"]["ood_quantile"] == 0.99
    odd = " ".join(["= 1234 + 5678 * 90 / 12 %"] * 30)
    probs, dist = ood.assess(lm, [odd, "12 7 300 ="])
    assert dist.shape == (2, len(ood.ood.classes), 2) and ood.ood.vocabulary is not None
    assert ood.route(lm, [odd])[0].expert == GENERIC and ood.route(lm, [odd])[0].reason == "unfamiliar"
    saved = Router.load(tmp_path / "r")
    assert torch.equal(saved.ood.thresholds, ood.ood.thresholds) and torch.equal(saved.assess(lm, [odd])[1], dist[:1])
    assert torch.equal(saved.ood.vocabulary.thresholds, ood.ood.vocabulary.thresholds)
    assert saved.route(lm, [odd])[0].expert == GENERIC
    assert router.route(lm, [odd])[0].expert != GENERIC  # the fixture's router has no form test


def test_the_vocabulary_test_is_a_smoothed_unigram_model_with_a_held_out_threshold():
    from seap.inference.ood import VocabularyTest

    rng = random.Random(0)
    by_class = {"a": [[rng.randrange(0, 10) for _ in range(rng.randint(3, 9))] for _ in range(500)],
                "b": [[rng.randrange(10, 20) for _ in range(rng.randint(3, 9))] for _ in range(400)]}
    test = VocabularyTest.fit(by_class, vocab_size=30, quantile=0.05, seed=0)
    # the model is four fifths of the (seeded) prompts, add-0.1 smoothed over the vocabulary, computed apart
    rows = list(by_class["a"])
    random.Random(0).shuffle(rows)
    fit, held = rows[:400], rows[400:]
    counts = collections.Counter(i for r in fit for i in r)
    total = sum(counts.values()) + 0.1 * 30
    prompt = [1, 2, 25]  # two seen tokens and one no class showed
    want = sum(math.log((counts[i] + 0.1) / total) for i in prompt) / 3
    assert float(test.scores([prompt])[0, 0]) == pytest.approx(want, rel=1e-12)
    # the threshold is the quantile of the held-out fifth's scores, so about that share of it falls below
    own = test.scores(held)[:, 0]
    assert float(test.thresholds[0]) == pytest.approx(float(torch.quantile(own, 0.05)))
    # a prompt of "b"'s words is unfamiliar to "a" (its form aside), one of "a"'s is not
    from seap.inference.ood import OodTest

    form = OodTest.fit({c: torch.randn(len(v), 9, dtype=torch.float64) for c, v in by_class.items()}, 1.0)
    form.vocabulary = test
    ev = form.evidence(_Chars(), [[12, 13, 14, 15], [1, 2, 3, 4]])
    ev[:, :, 0] = 0.0  # at the centre of every class's form
    assert form.unfamiliar(ev[0], "a") and not form.unfamiliar(ev[1], "a") and form.unfamiliar(ev[1], "b")


class _Chars:
    """A tokenizer whose token i decodes to one letter (form features need decode only)."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_router_for_another_model_or_other_plans_is_refused(routed, tmp_path):
    from seap import Plan

    other = load_model(str(tiny_folder(tmp_path, "llama", num_hidden_layers=4)))
    with pytest.raises(ArtifactError, match="router was made for another model"):
        routed["router"].route(other, ["x"])
    plan = Plan.load(routed["plan"])
    name = routed["paths"]["digits"]
    plan.experts[name].ffn[1] = plan.experts[name].ffn[1][:-1]
    with pytest.raises(ArtifactError, match="fitted for other plans"):
        MultiExpertModel(routed["lm"], plan, routed["router"])
    del plan.experts[name]
    with pytest.raises(ArtifactError, match="plans do not have"):
        MultiExpertModel(routed["lm"], plan, routed["router"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "router.json").write_text("{not json")
    (tmp_path / "bad" / "router.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ArtifactError, match="corrupt"):
        Router.load(tmp_path / "bad")
    with pytest.raises(ConfigError, match="threshold"):
        RouterConfig(threshold=1.5)


def test_routed_lm_eval_model_scores_each_document_on_its_expert(routed):
    from lm_eval.api.instance import Instance

    from seap.evaluation.harness import make_lm
    from seap.evaluation.routed import make_routed_lm

    lm, plan_path = routed["lm"], routed["plan"]
    from seap import Plan

    plan = Plan.load(plan_path)
    multi = MultiExpertModel(lm, plan, routed["router"])
    ctx = ["12 7 300 =", "HELP NOW!", "Question: is the sky blue?\nAnswer:", "The old stone tools"]
    reqs = [Instance("loglikelihood", {}, (c, cont), i, ("t", d, 1))
            for i, (d, c, cont) in enumerate((d, c, cont) for d, c in enumerate(ctx) for cont in (" ok", " no"))]
    routed_lm = make_routed_lm(multi, batch_size=3)
    got = routed_lm.loglikelihood(reqs, disable_tqdm=True)
    experts = {r["doc_id"]: r["expert"] for r in routed_lm.routing_log}
    assert [experts[d] for d in range(4)] == [routed["paths"]["digits"], routed["paths"]["shout"],
                                              routed["paths"]["quiz"], GENERIC]
    for req, (ll, greedy) in zip(reqs, got):
        ref = make_lm(sliced(lm, plan, experts[req.doc_id]).model, lm.tokenizer, batch_size=1)
        (want, want_greedy), = ref.loglikelihood([req], disable_tqdm=True)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_routed_documents_decide_as_the_router_with_its_form_test(routed, tmp_path):
    """lm-eval's requests of one document share a decision, the router's own on that context, form test
    included (an unfamiliar context goes to the generic expert)."""
    from lm_eval.api.instance import Instance

    from seap import Plan
    from seap.evaluation.routed import route_requests

    lm = routed["lm"]
    router = seap.fit_router(lm, [routed["plan"]], out=tmp_path / "r",
                             config=RouterConfig(limit=50, background_samples=60, ood_quantile=0.99))
    multi = MultiExpertModel(lm, Plan.load(routed["plan"]), router)
    ctx = ["12 7 300 =", "HELP NOW!", " ".join(["= 1234 + 5678 * 90 / 12 %"] * 30)]
    reqs = [Instance("loglikelihood", {}, (c, cont), i, ("t", d, 1))
            for i, (d, c, cont) in enumerate((d, c, cont) for d, c in enumerate(ctx) for cont in (" ok", " no"))]
    experts, log_rows = route_requests(multi, reqs)
    want = router.route(lm, ctx)
    assert experts == [want[r.doc_id].expert for r in reqs]
    assert [r["reason"] for r in log_rows] == [w.reason for w in want] and want[2].reason == "unfamiliar"


def test_route_and_generate_cli(routed, capsys, tmp_path):
    folder, plan, router = str(routed["folder"]), str(routed["plan"]), str(routed["plan"].parent / "router")
    digits = routed["paths"]["digits"]
    assert main(["route", "eval", "--model", folder, "--router", router, "--split", "train", "--out",
                 str(tmp_path / "ev")]) == 0
    out = json.loads((tmp_path / "ev" / "route_eval.json").read_text())
    assert out["accuracy"] > 0.9 and len(out["confusion"]) == 3
    assert "accuracy (routed to its own expert)" in capsys.readouterr().out
    assert main(["route", "explain", "--model", folder, "--router", router, "--json", "5 6 7 =", "hello there"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["expert"] == digits and abs(sum(rows[0]["probs"].values()) - 1) < 1e-9
    assert main(["generate", "--model", folder, "--plan", plan, "--router", router, "--json",
                 "--max-new-tokens", "4", "5 6 7 =", "STOP NOW!"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["expert"] for r in rows] == [digits, routed["paths"]["shout"]]
    # one row shape on every path: the router's confidence and reason, the expert's share of the FFN
    assert all(set(r) == {"prompt", "expert", "text", "chat_template", "kept_fraction", "confidence", "reason"}
               and r["reason"] == "task" and 0 < r["confidence"] <= 1 and 0 < r["kept_fraction"] < 1 for r in rows)
    assert main(["generate", "--model", folder, "--router", router, "x"]) == 2
    assert "add --plan" in capsys.readouterr().err
    assert main(["route", "explain", "--model", folder, "--router", str(tmp_path), "x"]) == 2
    assert "not a router folder" in capsys.readouterr().err
    # A plan from one task only has no generic expert: nothing to fall back on.
    single = seap.prune(folder, PruneConfig.from_method("seap", ratio=0.4, protect_first=1, protect_last=1),
                        seap.CalibrationData((digits,), batch_size=4), tmp_path / "one")
    assert single.plan.experts.keys() == {digits}
    assert main(["route", "fit", "--model", folder, "--plan", str(tmp_path / "one" / "plan")]) == 2
    assert "generic expert" in capsys.readouterr().err
