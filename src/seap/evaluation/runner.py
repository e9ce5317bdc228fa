"""`seap eval`: accuracy, token and word perplexity of a dense model, a pruned folder, or a model + plan.

Protocols for a plan (the SEAP paper's): `task` evaluates each task with the expert built from
that task's corpus ("task experts"); `generic` (or any expert name) evaluates one expert on all
tasks. Experts are sliced from a copy of the base model, so the base stays dense.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..inference.griffin import GriffinConfig
from ..model.adapters import get_adapter
from ..model.fingerprints import check_fingerprint
from ..model.loading import LoadedModel
from ..pruning.plan import GENERIC, Plan
from ..pruning.surgery import count_params, sliced
from ..tasks import ACCURACY_TASKS, PAPER_METRIC, SUITE
from .harness import WORD_PPL_TASK, TaskScore, evaluate_tasks, make_lm, paper_average
from .perplexity import Perplexity, token_perplexity, wikitext_stream

log = logging.getLogger(__name__)

TASK_EXPERTS = "task"


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = SUITE
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_length: int | None = None  # lm-eval context cap (None: the model's positions)
    ppl_window: int = 1024
    ppl_windows: int | None = None  # None: the whole test stream
    token_ppl: bool = True
    word_ppl_docs: int | None = 0  # 0: skip lm-eval's word perplexity; None: every article
    xsum: int = 0  # XSum prompts to summarise (ROUGE); 0: skip
    xsum_shots: int = 1  # GRIFFIN reports XSum 1-shot; instruct models end a 0-shot prompt at once
    gen_batch_size: int = 8
    # GRIFFIN (a GriffinConfig, or a density for its defaults): classification mode for accuracy at its
    # density, its experts (shared, short-prompt fix and all) for XSum
    griffin: GriffinConfig | None = None
    chat: bool = False  # XSum prompts as user turns of the chat template (the papers' protocol is raw)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ACCURACY_TASKS]
        if unknown:
            raise ConfigError(f"`tasks`: unknown accuracy task(s) {unknown}: choose from {', '.join(ACCURACY_TASKS)}")
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"`limit` must be >= 1, got {self.limit}")
        if self.word_ppl_docs is not None and self.word_ppl_docs < 0:
            raise ConfigError(f"`word_ppl_docs` (word perplexity articles) must be >= 0, got {self.word_ppl_docs}")
        if self.xsum < 0 or self.xsum_shots not in (0, 1) or self.gen_batch_size < 1:
            raise ConfigError(f"XSum needs `xsum` >= 0 prompts, `xsum_shots` 0 or 1 and `gen_batch_size` >= 1, got "
                              f"{self.xsum}, {self.xsum_shots}, {self.gen_batch_size}")
        if isinstance(self.griffin, (int, float)) and not isinstance(self.griffin, bool):
            object.__setattr__(self, "griffin", GriffinConfig(density=float(self.griffin)))
        if self.griffin is not None and not isinstance(self.griffin, GriffinConfig):
            raise ConfigError(f"`griffin` must be a GriffinConfig or a density, got {self.griffin!r}")

    def to_dict(self) -> dict:
        """JSON-ready (results files record the configuration they were measured with)."""
        return {**self.__dict__, "griffin": None if self.griffin is None else asdict(self.griffin)}


@dataclass
class EvalReport:
    label: str
    params: int
    scores: dict[str, TaskScore] = field(default_factory=dict)
    experts: dict[str, str] = field(default_factory=dict)  # task -> expert that answered it
    token_ppl: Perplexity | None = None
    word_ppl: dict | None = None
    items: dict[str, list[int]] = field(default_factory=dict)  # per-item correctness (paper metric)
    meta: dict = field(default_factory=dict)
    generation: dict | None = None  # XSum ROUGE (GenerationReport.to_dict())

    @property
    def average(self) -> tuple[float, float] | None:
        return paper_average(self.scores)

    def to_dict(self) -> dict:
        avg = self.average
        return {
            "label": self.label, "params": self.params, "meta": self.meta,
            "tasks": {t: s.to_dict() for t, s in self.scores.items()}, "experts": self.experts,
            "average": None if avg is None else {"value": avg[0], "stderr": avg[1],
                                                  "metrics": {t: PAPER_METRIC[t] for t in self.scores}},
            "token_perplexity": None if self.token_ppl is None else self.token_ppl.to_dict(),
            "word_perplexity": self.word_ppl, "items": self.items, "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        scores = {t: TaskScore(t, s["metrics"], s["stderr"], s["n"], s["split"]) for t, s in d["tasks"].items()}
        ppl = Perplexity(**d["token_perplexity"]) if d.get("token_perplexity") else None
        return cls(d["label"], d["params"], scores, d.get("experts", {}), ppl, d.get("word_perplexity"),
                   d.get("items", {}), d.get("meta", {}), d.get("generation"))


def _generation_and_perplexity(report: EvalReport, model, tokenizer, cfg: EvalConfig, lm_eval_model) -> None:
    """The measurements that are not task accuracy: XSum ROUGE, token and word perplexity."""
    if cfg.xsum:
        from .generation import evaluate_xsum

        if cfg.data_dir is None:
            raise ConfigError("XSum reads local prompt files: pass --data-dir (e.g. ../shared/data)")
        lm = LoadedModel(model, tokenizer, get_adapter(model), None)  # type: ignore[arg-type]
        report.generation = evaluate_xsum(lm, data_dir=cfg.data_dir, limit=cfg.xsum, shots=cfg.xsum_shots,
                                          batch_size=cfg.gen_batch_size,
                                          density=cfg.griffin,
                                          label=report.label,
                                          chat=cfg.chat).to_dict()
    if cfg.griffin is not None and (cfg.token_ppl or cfg.word_ppl_docs != 0):
        report.meta["perplexity"] = "not measured with GRIFFIN (its experts are chosen per prompt)"
        return
    if cfg.token_ppl:
        text, source = wikitext_stream(cfg.data_dir)
        report.token_ppl = token_perplexity(model, tokenizer, text, window=cfg.ppl_window,
                                            max_windows=cfg.ppl_windows, source=source)
    if cfg.word_ppl_docs != 0:
        scores, _ = evaluate_tasks(lm_eval_model, [WORD_PPL_TASK], data_dir=cfg.data_dir, limit=cfg.word_ppl_docs)
        s = scores[WORD_PPL_TASK]
        report.word_ppl = {"word_perplexity": s.metrics.get("word_perplexity"),
                           "byte_perplexity": s.metrics.get("byte_perplexity"),
                           "bits_per_byte": s.metrics.get("bits_per_byte"), "documents": s.n, "split": s.split}


def _accuracy_lm(lm: LoadedModel, cfg: EvalConfig):
    """lm-eval's model: plain, or GRIFFIN's classification mode when cfg.griffin is set."""
    if cfg.griffin is not None:
        from .generation import make_classification_lm

        return make_classification_lm(lm, cfg.griffin.density, max_length=cfg.max_length)
    return make_lm(lm.model, lm.tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)


def evaluate_model(lm: LoadedModel, cfg: EvalConfig | None = None, *, label: str = "model",
                   expert: str | None = None) -> EvalReport:
    """Every task of cfg on one model (dense or pruned), plus the perplexities."""
    cfg = cfg or EvalConfig()
    report = EvalReport(label, count_params(lm.model))
    hf = _accuracy_lm(lm, cfg)
    if cfg.griffin is not None:
        report.meta["griffin"] = {"density": cfg.griffin.density, "accuracy": "classification mode (batch size 1)"}
    if cfg.tasks:
        report.scores, report.items = evaluate_tasks(hf, cfg.tasks, data_dir=cfg.data_dir, limit=cfg.limit,
                                                     log_samples=True)
        report.experts = {t: expert or label for t in cfg.tasks}
    _generation_and_perplexity(report, lm.model, lm.tokenizer, cfg, hf)
    return report


def evaluate_plan(lm: LoadedModel, plan: Plan, cfg: EvalConfig | None = None, *, experts: str = TASK_EXPERTS,
                  label: str | None = None) -> EvalReport:
    """Evaluate a plan on its base model: `experts="task"` gives each task its own expert (tasks
    without an expert of their name fall back to the plan's default expert); any expert name
    evaluates that expert on every task."""
    cfg = cfg or EvalConfig()
    check_fingerprint(plan.meta.fingerprint, lm.model, lm.adapter)
    label = label or f"{plan.meta.label} ({experts})"
    if experts != TASK_EXPERTS:
        name, _ = plan.expert(experts)
        pruned = sliced(lm, plan, name)
        report = evaluate_model(pruned, cfg, label=label, expert=name)
        report.meta.update({"plan_method": plan.meta.method, "target_ratio": plan.meta.target_ratio,
                            "achieved_ratio": plan.experts[name].stats.get("achieved_ratio")})
        return report
    default, _ = plan.expert(None)
    by_expert: dict[str, list[str]] = {}
    for task in cfg.tasks:
        by_expert.setdefault(task if task in plan.experts else default, []).append(task)
    report = EvalReport(label, 0, meta={"plan_method": plan.meta.method, "target_ratio": plan.meta.target_ratio,
                                        "params_by_expert": {}})
    for name, tasks in by_expert.items():
        if name not in plan.experts:
            raise ConfigError(f"plan has no expert {name!r} for tasks {tasks}")
        log.info("expert %s on %s", name, ", ".join(tasks))
        pruned = sliced(lm, plan, name)
        hf = _accuracy_lm(pruned, cfg)
        scores, items = evaluate_tasks(hf, tasks, data_dir=cfg.data_dir, limit=cfg.limit, log_samples=True)
        report.scores.update(scores)
        report.items.update(items)
        report.experts.update({t: name for t in tasks})
        report.meta["params_by_expert"][name] = count_params(pruned.model)
        del pruned, hf
    report.params = round(sum(report.meta["params_by_expert"].values()) / len(by_expert))
    report.meta["params"] = "mean over the experts used"
    if cfg.token_ppl or cfg.word_ppl_docs != 0 or cfg.xsum:
        # Language modelling (and summarisation) has no task expert: perplexity comes from the generic expert when the plan has one.
        name = GENERIC if GENERIC in plan.experts else default
        pruned = sliced(lm, plan, name)
        _generation_and_perplexity(report, pruned.model, pruned.tokenizer, cfg,
                      make_lm(pruned.model, pruned.tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length))
        report.meta["perplexity_expert"] = name
    return report


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def markdown_table(reports: Sequence[EvalReport], tasks: Sequence[str] | None = None) -> str:
    """Rows = reports; columns = the paper metric per task, the average (± s.e.), perplexities."""
    tasks = list(tasks or dict.fromkeys(t for r in reports for t in r.scores))
    gen = any(r.generation for r in reports)
    head = ["model", "params"] + [f"{t} ({PAPER_METRIC[t]})" for t in tasks] + ["average ± s.e.", "token ppl",
                                                                               "word ppl"]
    head += ["XSum R-1 / R-2 / R-L"] if gen else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        avg = r.average
        cells = [r.label, f"{r.params / 1e6:.1f}M"]
        cells += [_fmt(r.scores[t].paper) if t in r.scores else "—" for t in tasks]
        cells.append("—" if avg is None else f"{100 * avg[0]:.1f} ± {100 * avg[1]:.1f}")
        cells.append(_fmt(r.token_ppl.perplexity, pct=False) if r.token_ppl else "—")
        cells.append(_fmt((r.word_ppl or {}).get("word_perplexity"), pct=False))
        if gen:
            g = (r.generation or {}).get("rouge")
            cells.append(" / ".join(_fmt(g[k]) for k in ("rouge1", "rouge2", "rougeL")) if g else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detail_table(report: EvalReport) -> str:
    """acc and acc_norm (± s.e.) per task of one report, with items, split and expert."""
    lines = ["| task | split | n | expert | acc | acc_norm |", "|---|---|---|---|---|---|"]
    def cell(s: TaskScore, m: str) -> str:
        return "—" if m not in s.metrics else f"{100 * s.metrics[m]:.1f} ± {100 * s.stderr.get(m, 0):.1f}"

    for t, s in report.scores.items():
        lines.append(f"| {t} | {s.split} | {s.n} | {report.experts.get(t, '')} | {cell(s, 'acc')} | "
                     f"{cell(s, 'acc_norm')} |")
    return "\n".join(lines) + "\n"


def save_report(reports: Sequence[EvalReport], out: str | Path) -> dict[str, str]:
    from .._io import write_json, write_text

    out = Path(out)
    md = "# seap eval\n\n" + markdown_table(reports) + "".join(
        f"\n## {r.label}\n\n" + detail_table(r) for r in reports)
    write_json(out / "eval.json", {"reports": [r.to_dict() for r in reports]})
    write_text(out / "eval.md", md)
    return {"json": str(out / "eval.json"), "markdown": str(out / "eval.md")}
