"""`seap eval --routed`: the task suite with the router choosing each item's expert (no oracle).

An lm-eval model (`HFLM` subclass) around a `MultiExpertModel`. Every document is routed once,
from the contexts of its requests (their class probabilities averaged, so the choices of one
question never go to different experts); the requests are then scored expert by expert on
the shared base weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import torch

from ..inference.experts import MultiExpertModel
from ..inference.router import Router
from ..model.loading import LoadedModel
from ..pruning.plan import GENERIC, Plan
from .harness import evaluate_tasks, make_lm
from .runner import EvalConfig, EvalReport, _generation_and_perplexity

log = logging.getLogger(__name__)


def _doc_key(req, i: int) -> tuple:
    return (req.task_name, req.doc_id) if req.doc_id is not None else ("", -1 - i)


def route_requests(multi: MultiExpertModel, requests: Sequence) -> tuple[list[str], list[dict]]:
    """The expert of every request (one per document) and a log of the decisions."""
    router: Router = multi.router
    keys = [_doc_key(r, i) for i, r in enumerate(requests)]
    contexts = list(dict.fromkeys((k, r.args[0]) for k, r in zip(keys, requests)))
    lm = multi.lm
    probs, dist = router.assess(lm, [c for _, c in contexts])
    by_doc: dict[tuple, list[int]] = {}
    for j, (k, _) in enumerate(contexts):
        by_doc.setdefault(k, []).append(j)
    docs = list(by_doc)
    routes = router.decide(torch.stack([probs[by_doc[k]].mean(0) for k in docs]),
                           None if dist is None else torch.stack([dist[by_doc[k]].mean(0) for k in docs]))
    decided = dict(zip(docs, routes))
    log_rows = [{"task": k[0], "doc_id": k[1], "expert": r.expert, "label": r.label,
                 "confidence": round(r.confidence, 4), "reason": r.reason} for k, r in decided.items()]
    return [decided[k].expert for k in keys], log_rows


def make_routed_lm(multi: MultiExpertModel, batch_size: int = 16, max_length: int | None = None):
    """An lm-eval model whose requests run on the experts the router picks (each expert's share
    through seap's selective scorer, HFLM's numbers)."""
    from .scorer import SelectiveHFLM

    class RoutedLM(SelectiveHFLM):
        def _grouped(self, requests, method: str, **kw):
            experts, rows = route_requests(multi, requests)
            self.routing_log.extend(rows)
            out: list = [None] * len(requests)
            for name in dict.fromkeys(experts):
                idx = [i for i, e in enumerate(experts) if e == name]
                with multi.use(name):
                    res = getattr(super(), method)([requests[i] for i in idx], **kw)
                for i, r in zip(idx, res):
                    out[i] = r
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._grouped(requests, "loglikelihood", disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._grouped(requests, "loglikelihood_rolling", disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._grouped(requests, "generate_until", disable_tqdm=disable_tqdm)

    lm = RoutedLM(pretrained=multi.lm.model, tokenizer=multi.lm.tokenizer, batch_size=batch_size,
                  max_length=max_length)
    lm.routing_log = []
    return lm


def expert_params(multi: MultiExpertModel) -> dict[str, int]:
    """Parameters each expert runs with: the base minus its removed FFN channels (and heads)."""
    from ..pruning.surgery import count_params

    model, adapter = multi.lm.model, multi.lm.adapter
    base = count_params(model)
    out = {}
    for name, ex in multi.experts.items():
        removed = 0
        for i, layer in enumerate(adapter.layers(model)):
            removed += (adapter.d_ff(layer) - len(ex.ffn[i])) * adapter.ffn_channel_cost(layer)
            if ex.heads is not None:
                g = adapter.head_geometry(layer)
                kv = multi._owner[name].head_unit == "kv_groups"
                total = g.num_kv_heads if kv else g.num_heads
                removed += (total - len(ex.heads[i])) * adapter.head_unit_cost(layer, kv)
        out[name] = base - removed
    return out


def evaluate_routed(lm: LoadedModel, plans: Plan | Sequence[Plan], router: Router, cfg: EvalConfig | None = None,
                    *, label: str | None = None) -> EvalReport:
    """Accuracy with the router choosing every item's expert; perplexity from the generic expert,
    as in the task-expert (oracle) protocol."""
    cfg = cfg or EvalConfig()
    multi = MultiExpertModel(lm, plans, router)
    plan = next(iter(multi._owner.values()))
    label = label or f"{plan.meta.label} (routed)"
    hf = make_routed_lm(multi, batch_size=cfg.batch_size, max_length=cfg.max_length)
    params = expert_params(multi)
    report = EvalReport(label, 0, meta={"plan_method": plan.meta.method, "target_ratio": plan.meta.target_ratio,
                                        "router_threshold": router.threshold, "memory": multi.memory()})
    if cfg.tasks:
        report.scores, report.items = evaluate_tasks(hf, cfg.tasks, data_dir=cfg.data_dir, limit=cfg.limit,
                                                     log_samples=True)
        routing = {t: Counter(r["expert"] for r in hf.routing_log if r["task"] == t) for t in cfg.tasks}
        report.meta["routing"] = {t: dict(c.most_common()) for t, c in routing.items()}
        for t, c in routing.items():
            n = sum(c.values()) or 1
            report.experts[t] = "router: " + ", ".join(f"{e} {v / n:.0%}" for e, v in c.most_common(3))
        shares = Counter(r["expert"] for r in hf.routing_log if r["task"] in cfg.tasks)
        total = sum(shares.values()) or 1
        report.params = round(sum(params[e] * v for e, v in shares.items()) / total)
        report.meta["params"] = "mean over the routed items"
    report.meta["params_by_expert"] = params
    if cfg.token_ppl or cfg.word_ppl_docs != 0:
        with multi.use(GENERIC) as model:
            _generation_and_perplexity(report, model, lm.tokenizer, cfg, make_lm(model, lm.tokenizer, batch_size=cfg.batch_size,
                                                                     max_length=cfg.max_length))
        report.meta["perplexity_expert"] = GENERIC
    return report
