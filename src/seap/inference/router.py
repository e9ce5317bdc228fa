"""SEAP's task router (docs/design.md §2.5): which expert a prompt should run on.

Features are the mean input embedding of the prompt's tokens (no transformer layer runs);
the classifier is scikit-learn's multinomial logistic regression. Besides one class per task
expert, a background class learnt from plain text (windows of general text whose lengths
follow the task prompts') stands for "no task": it and any prompt whose top probability is
under the threshold go to the generic expert. A classifier must pick some class for any input,
so prompts of kinds it was never fitted on are caught apart (`seap.inference.ood`), on the prompt's form
(length, digits, line breaks, symbols, case), which the mean embedding averages away: a prompt whose
form is farther from the class it is routed to than nearly all of that class's training prompts is
unfamiliar and goes to the generic expert too.

The fitted router is saved without pickles: `router.json` (classes, expert per class,
threshold, the base model's fingerprint and the digest of every expert it routes to) and
`router.safetensors` (scaler and logistic-regression weights). A router is refused on another
model, or with plans whose experts differ from those it was fitted for.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .._io import atomic_dir, save_tensors
from .._version import __version__
from ..errors import ArtifactError, ConfigError, DataError
from ..model.adapters import Adapter
from ..model.fingerprints import check_fingerprint, fingerprint
from ..model.loading import LoadedModel
from ..outputs import read_artifact
from ..pruning.plan import GENERIC, Expert
from ..tasks import TASKS, Corpus, resolve_corpus
from .ood import OodTest, VocabularyTest, form_features

log = logging.getLogger(__name__)

ROUTER_FORMAT = "seap-router"
# 2: the form test compares with the routed class, one threshold per class; 3: nine form features;
# 4: the vocabulary test
ROUTER_VERSION = 4
BACKGROUND = GENERIC  # the class of "no task": routed to the generic expert
FEATURES = "mean_input_embedding"


@dataclass(frozen=True)
class RouterConfig:
    threshold: float = 0.5  # top probability below this -> generic expert
    c: float = 0.1  # inverse L2 strength of the logistic regression
    limit: int | None = 1500  # training prompts per task (seeded subset)
    background: tuple[str, ...] = ("default:general_text",)
    background_samples: int = 1000
    max_iter: int = 3000
    seed: int = 0
    # Prompts whose form (length, digits, line breaks, symbols) is farther from the class they are routed
    # to than this share of that class's training prompts are unfamiliar and go to the generic expert
    # (seap.inference.ood); None: no test.
    ood_quantile: float | None = 0.998
    # ... and (with the form test) prompts whose mean token log-probability under that class's unigram model
    # is below this quantile of its held-out training prompts' (seap.inference.ood.VocabularyTest); None: none
    vocab_quantile: float | None = 0.005

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"router `threshold` must be in [0, 1), got {self.threshold}")
        if self.c <= 0:
            raise ConfigError(f"regularisation `c` must be > 0, got {self.c}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"router training needs at least 2 prompts per task, got `limit` {self.limit}")
        if self.ood_quantile is not None and not 0.5 <= self.ood_quantile <= 1.0:
            raise ConfigError(f"the out-of-distribution `ood_quantile` must be in [0.5, 1] (or None), "
                              f"got {self.ood_quantile}")
        if self.vocab_quantile is not None and not 0.0 < self.vocab_quantile < 0.5:
            raise ConfigError(f"the vocabulary test's `vocab_quantile` must be in (0, 0.5) (or None), "
                              f"got {self.vocab_quantile}")
        if self.background_samples < 0:
            raise ConfigError(f"`background_samples` must be >= 0, got {self.background_samples}")


@dataclass(frozen=True)
class Route:
    """The decision for one prompt."""

    expert: str
    label: str  # the class the classifier chose (a task, or the background class)
    confidence: float
    reason: str  # "task" | "low confidence" | "background" | "unfamiliar" | "empty prompt"
    probs: dict[str, float] = field(default_factory=dict)


# -- features -----------------------------------------------------------------------------------
def token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


@torch.no_grad()
def mean_embeddings(embedding: torch.Tensor, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, d] float64: the mean input-embedding row of each token list (NaN for an empty list)."""
    out = torch.full((len(ids), embedding.shape[1]), float("nan"), dtype=torch.float64)
    for i, row in enumerate(ids):
        if len(row):
            out[i] = embedding[torch.as_tensor(row, dtype=torch.long)].double().mean(0)
    return out


def prompt_features(model: nn.Module, adapter: Adapter, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    # The raw table, not the module: Gemma's embedding scales by sqrt(d), which standardisation undoes anyway.
    return mean_embeddings(adapter.embeddings(model).weight.detach(), token_ids(tokenizer, prompts))


# -- the classifier -----------------------------------------------------------------------------
@dataclass
class Router:
    classes: tuple[str, ...]
    experts: dict[str, str]  # class -> expert name
    mean: torch.Tensor  # [d] standardisation
    scale: torch.Tensor  # [d]
    coef: torch.Tensor  # [K, d] multinomial weights (binary fits are expanded to two rows)
    intercept: torch.Tensor  # [K]
    threshold: float = 0.5
    meta: dict = field(default_factory=dict)
    ood: OodTest | None = None  # unfamiliar prompts -> generic expert

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """[N, K] softmax of the logistic regression (rows of NaN features stay NaN)."""
        z = (features.double() - self.mean.double()) / self.scale.double()
        return torch.softmax(z @ self.coef.double().T + self.intercept.double(), dim=-1)

    def assess(self, lm: LoadedModel, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class probabilities [N, K] and (with an OOD test) its evidence per task class [N, K_ood, 2] (the
        form's distance, the mean token log-probability): what `decide` needs."""
        self.check_model(lm.model, lm.adapter)
        ids = token_ids(lm.tokenizer, prompts)
        probs = self.probabilities(mean_embeddings(lm.adapter.embeddings(lm.model).weight.detach(), ids))
        return probs, (None if self.ood is None else self.ood.evidence(lm.tokenizer, ids))

    def decide(self, probs: torch.Tensor, evidence: torch.Tensor | None = None) -> list[Route]:
        routes = []
        for r, row in enumerate(probs):
            if torch.isnan(row).any():
                routes.append(Route(GENERIC, BACKGROUND, 0.0, "empty prompt"))
                continue
            k = int(row.argmax())
            label, conf = self.classes[k], float(row[k])
            p = {c: float(v) for c, v in zip(self.classes, row)}
            if label == BACKGROUND:
                routes.append(Route(self.experts[label], label, conf, "background", p))
            elif evidence is not None and self.ood.unfamiliar(evidence[r], label):
                routes.append(Route(self.experts.get(BACKGROUND, GENERIC), label, conf, "unfamiliar", p))
            elif conf < self.threshold:
                routes.append(Route(self.experts.get(BACKGROUND, GENERIC), label, conf, "low confidence", p))
            else:
                routes.append(Route(self.experts[label], label, conf, "task", p))
        return routes

    def route(self, lm: LoadedModel, prompts: Sequence[str]) -> list[Route]:
        return self.decide(*self.assess(lm, prompts))

    # -- compatibility ----------------------------------------------------------------------
    def check_model(self, model: nn.Module, adapter: Adapter) -> None:
        check_fingerprint(self.meta["fingerprint"], model, adapter, what="router")

    def check_experts(self, experts: Mapping[str, Expert]) -> None:
        """Refuse plans other than those the router was fitted for (same names, same kept units)."""
        want: dict[str, str] = self.meta.get("expert_digests", {})
        missing = [n for n in want if n not in experts]
        if missing:
            raise ArtifactError(f"this router routes to expert(s) {missing} that the given plans do not have "
                                f"(they have {', '.join(experts)}): give the plans it was fitted with, or refit "
                                "it with `seap route fit`")
        changed = [n for n, d in want.items() if experts[n].digest() != d]
        if changed:
            raise ArtifactError(f"this router was fitted for other plans: expert(s) {changed} keep different "
                                "units than when it was fitted; refit it with `seap route fit` on these plans")

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        meta = dict(self.meta, format=ROUTER_FORMAT, version=ROUTER_VERSION, classes=list(self.classes),
                    experts=self.experts, threshold=self.threshold, features=FEATURES)
        tensors = {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}
        if self.ood is not None:
            tensors.update({"ood_centroids": self.ood.centroids, "ood_precision": self.ood.precision,
                            "ood_thresholds": self.ood.thresholds})
            meta["ood"] = {"quantile": self.ood.quantile, "classes": list(self.ood.classes)}
            v = self.ood.vocabulary
            if v is not None:
                tensors.update({"vocab_ids": torch.cat(v.ids), "vocab_logp": torch.cat(v.logp),
                                "vocab_counts": torch.tensor([len(i) for i in v.ids], dtype=torch.long),
                                "vocab_unseen": v.unseen, "vocab_thresholds": v.thresholds})
                meta["ood"]["vocabulary"] = {"quantile": v.quantile, "vocab_size": v.vocab_size, "alpha": v.alpha}
        with atomic_dir(folder) as tmp:
            save_tensors(tmp / "router.safetensors", {k: v.contiguous() for k, v in tensors.items()})
            (tmp / "router.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Router:
        meta, t = read_artifact(folder, "router.json", "router.safetensors", kind="router", fmt=ROUTER_FORMAT,
                                version=ROUTER_VERSION, missing="give the folder that `seap route fit` wrote",
                                redo="fit it again")
        try:
            classes = tuple(meta["classes"])
            coef, intercept = t["coef"], t["intercept"]
            if coef.shape != (len(classes), t["mean"].numel()) or intercept.shape != (len(classes),):
                raise KeyError("weights of the right shape")
            ood = None
            if "ood" in meta:  # fitted with ood_quantile=None: none
                o = meta["ood"]
                ood = OodTest(tuple(o["classes"]), t["ood_centroids"], t["ood_precision"], t["ood_thresholds"],
                              float(o["quantile"]))
                if ood.thresholds.shape != (len(ood.classes),):
                    raise KeyError("one form threshold per class")
                if "vocabulary" in o:
                    v, counts = o["vocabulary"], t["vocab_counts"].tolist()
                    if len(counts) != len(ood.classes) or t["vocab_thresholds"].shape != (len(ood.classes),):
                        raise KeyError("one vocabulary model per class")
                    ood.vocabulary = VocabularyTest(
                        ood.classes, list(t["vocab_ids"].split(counts)), list(t["vocab_logp"].split(counts)),
                        t["vocab_unseen"], t["vocab_thresholds"], float(v["quantile"]), int(v["vocab_size"]),
                        float(v["alpha"]))
            router = cls(classes, dict(meta["experts"]), t["mean"], t["scale"], coef, intercept,
                         float(meta["threshold"]), {k: v for k, v in meta.items()
                                                    if k not in ("classes", "experts", "threshold", "ood")}, ood)
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"router {folder} is incomplete (missing {err}): fit it again") from None
        return router


# -- training data ------------------------------------------------------------------------------
def _task_prompts(name: str, data_dir: str | Path | None, split: str | None, seed: int) -> Corpus | None:
    """The corpus behind expert `name`; None when the name is no corpus seap knows (e.g. "all")."""
    key = name.strip().lower()
    if not (key in TASKS or key == "default" or key.startswith("default:") or Path(name).suffix):
        log.info("expert %s is not a known corpus: not a router class", name)
        return None
    return resolve_corpus(name, data_dir=data_dir, split=split if key in TASKS else None, seed=seed)


def _subset(items: Sequence[str], limit: int | None, seed: int) -> list[str]:
    items = list(items)
    if limit is None or len(items) <= limit:
        return items
    return random.Random(seed).sample(items, limit)


def background_windows(tokenizer, texts: Sequence[str], lengths: Sequence[int], n: int, seed: int) -> list[list[int]]:
    """Token windows of plain text whose lengths are drawn from the task prompts' lengths."""
    stream = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    if len(stream) < 2 or not lengths or n == 0:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(1, min(rng.choice(list(lengths)), len(stream) - 1))
        start = rng.randrange(0, len(stream) - length + 1)
        out.append(stream[start:start + length])
    return out


def training_set(lm: LoadedModel, expert_names: Sequence[str], cfg: RouterConfig, *, data_dir=None,
                 split: str | None = "train", tasks: Sequence[str] | None = None) -> dict[str, list[list[int]]]:
    """Token ids of the training prompts per class: tasks whose corpora have prompts, plus background."""
    names = list(tasks) if tasks else [n for n in expert_names if n != GENERIC]
    per_class: dict[str, list[list[int]]] = {}
    background: list[str] = []
    for name in names:
        if name not in expert_names:
            raise ConfigError(f"task {name!r} has no expert in the plans (they have {', '.join(expert_names)})")
        corpus = _task_prompts(name, data_dir, split, cfg.seed)
        if corpus is None:
            continue
        if corpus.prompts:
            per_class[name] = token_ids(lm.tokenizer, _subset(corpus.prompts, cfg.limit, cfg.seed))
        else:  # a language-modelling corpus: it teaches the router what "no task" looks like
            background.extend(corpus.texts)
    if len(per_class) < 2:
        raise DataError(f"a router needs prompts of at least two task experts; found {list(per_class) or 'none'} "
                        f"among {names}: fit it on a plan built from several tasks (e.g. --task piqa --task boolq)")
    for spec in cfg.background:
        background.extend(resolve_corpus(spec, data_dir=data_dir, seed=cfg.seed).texts)
    background = list(dict.fromkeys(background))  # an LM expert and --background may name the same text
    lengths = [len(ids) for rows in per_class.values() for ids in rows]
    windows = background_windows(lm.tokenizer, background, lengths, cfg.background_samples, cfg.seed)
    if windows:
        per_class[BACKGROUND] = windows
    return per_class


def fit_router(lm: LoadedModel, experts: Mapping[str, Expert], cfg: RouterConfig | None = None, *,
               data_dir: str | Path | None = None, split: str | None = "train",
               tasks: Sequence[str] | None = None) -> Router:
    """Fit the router on the training prompts of the experts' tasks (bare prompts, no answers)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg = cfg or RouterConfig()
    if GENERIC not in experts:
        raise ConfigError("routing needs a generic expert for prompts of no known task: build the plan from "
                          "several tasks (seap prune adds 'generic' then)")
    data = training_set(lm, list(experts), cfg, data_dir=data_dir, split=split, tasks=tasks)
    emb = lm.adapter.embeddings(lm.model).weight.detach()
    classes = tuple(data)
    x = torch.cat([mean_embeddings(emb, data[c]) for c in classes]).numpy()
    y = [c for c in classes for _ in data[c]]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter).fit(scaler.transform(x), y)
    order = [list(clf.classes_).index(c) for c in classes]
    coef = torch.as_tensor(clf.coef_, dtype=torch.float64)
    intercept = torch.as_tensor(clf.intercept_, dtype=torch.float64)
    if coef.shape[0] == 1:  # binary: sigmoid(w.x + b) == softmax over (-w/2, w/2)
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    experts_of = {c: (GENERIC if c == BACKGROUND else c) for c in classes}
    train_acc = float((clf.predict(scaler.transform(x)) == y).mean())
    ood = None
    if cfg.ood_quantile is not None:
        tasks = [c for c in classes if c != BACKGROUND]
        ood = OodTest.fit({c: form_features(lm.tokenizer, data[c]) for c in tasks}, cfg.ood_quantile)
        if cfg.vocab_quantile is not None:
            ood.vocabulary = VocabularyTest.fit({c: data[c] for c in tasks}, int(emb.shape[0]), cfg.vocab_quantile,
                                                seed=cfg.seed)
    meta = {
        "fingerprint": fingerprint(lm.model, lm.adapter), "base_model": lm.source.model_id,
        "expert_digests": {n: experts[n].digest() for n in sorted(set(experts_of.values()))},
        "config": {**asdict(cfg), "background": list(cfg.background)}, "split": split,
        "train_counts": {c: len(data[c]) for c in classes}, "train_accuracy": train_acc,
        "seap_version": __version__,
    }
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float64)
    return Router(classes, experts_of, torch.as_tensor(scaler.mean_, dtype=torch.float64), scale,
                  coef[order], intercept[order], cfg.threshold, meta, ood)


# -- evaluation (the paper's Table 6) ---------------------------------------------------------
@dataclass
class RouterEval:
    classes: list[str]  # true classes (tasks)
    predicted: list[str]  # columns of the confusion matrix: the experts prompts went to
    confusion: list[list[int]]  # rows: true task; columns: routed expert
    report: dict  # per class precision / recall / F1 / support of the routed expert
    accuracy: float  # prompts routed to their own task's expert (threshold and fallback included)
    classifier_accuracy: float  # argmax of the classifier over the task classes alone
    fallback_rate: float  # prompts sent to the generic expert
    unknown: dict = field(default_factory=dict)  # corpus -> fraction routed to the generic expert
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = ["| task | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c in self.classes:
            r = self.report.get(c, {})
            lines.append(f"| {c} | {r.get('precision', 0):.3f} | {r.get('recall', 0):.3f} | "
                         f"{r.get('f1-score', 0):.3f} | {int(r.get('support', 0))} |")
        lines += ["", f"accuracy (routed to its own expert): **{self.accuracy:.4f}**; classifier argmax over the "
                  f"tasks: {self.classifier_accuracy:.4f}; sent to the generic expert: {self.fallback_rate:.2%}", "",
                  "confusion (rows: true task, columns: expert routed to)", "",
                  "| | " + " | ".join(self.predicted) + " |", "|---|" + "---|" * len(self.predicted)]
        for c, row in zip(self.classes, self.confusion):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
        if self.unknown:
            lines += ["", "prompts of kinds the router was not fitted on, share sent to the generic expert:", ""]
            lines += [f"- {k}: {v:.2%}" for k, v in self.unknown.items()]
        return "\n".join(lines) + "\n"


def evaluate_router(lm: LoadedModel, router: Router, *, data_dir: str | Path | None = None,
                    split: str | None = "validation", limit: int | None = None,
                    unknown: Mapping[str, Sequence[str]] | None = None) -> RouterEval:
    """Held-out prompts of every task class: where they are routed, against their own expert."""
    from sklearn.metrics import classification_report, confusion_matrix

    router.check_model(lm.model, lm.adapter)
    tasks = [c for c in router.classes if c != BACKGROUND]
    prompts, truth = [], []
    for t in tasks:
        corpus = _task_prompts(t, data_dir, split, router.meta.get("config", {}).get("seed", 0))
        if corpus is None or not corpus.prompts:
            raise DataError(f"no held-out prompts for task {t!r} (split {split})")
        ps = _subset(corpus.prompts, limit, 0)
        prompts += ps
        truth += [t] * len(ps)
    probs, dist = router.assess(lm, prompts)
    routes = router.decide(probs, dist)
    got = [r.expert for r in routes]
    want = [router.experts[t] for t in truth]
    cols = list(dict.fromkeys([*want, *sorted(set(got) - set(want))]))
    task_cols = torch.tensor([router.classes.index(t) for t in tasks])
    argmax = [tasks[int(i)] for i in probs[:, task_cols].argmax(1)]
    res = RouterEval(
        classes=tasks, predicted=cols, confusion=confusion_matrix(want, got, labels=cols)[: len(tasks)].tolist(),
        report=classification_report(want, got, labels=[router.experts[t] for t in tasks], output_dict=True,
                                     zero_division=0),
        accuracy=sum(a == b for a, b in zip(got, want)) / len(want),
        classifier_accuracy=sum(a == b for a, b in zip(argmax, truth)) / len(truth),
        fallback_rate=sum(g == GENERIC for g in got) / len(got),
        meta={"split": split, "n": len(prompts), "threshold": router.threshold, "limit": limit})
    for name, ps in (unknown or {}).items():
        rs = router.route(lm, list(ps))
        res.unknown[name] = sum(r.expert == GENERIC for r in rs) / max(1, len(rs))
    return res
