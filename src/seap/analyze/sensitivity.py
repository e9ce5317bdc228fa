"""How much does pruning each layer hurt? (SEAP Figures 5 and 6), and a schedule fitted to it.

Measurement. For layer l and ratio r, the r * d_ff lowest-scoring FFN channels of layer l alone
are masked (score: SEAP's s_W from statistics of a calibration corpus) and a small text sample is
run and compared with the dense model on the same tokens:
  - cosine damage  1 - mean_t cos(h_t, h_t^dense), h = the final hidden state (the LM head's input);
  - perplexity damage  mean NLL - dense mean NLL = log(ppl / ppl_dense).
Layers before l are not recomputed: their dense outputs are cached and replayed (`replay_from`).

From damage to a pruning-rate curve ("less damage -> prune more"):
  1. sensitivity c_l: the least-squares coefficient of d_l(r) ~ c_l r^2 over the measured ratios
     (a smooth loss grows quadratically with a small perturbation; the mapping only needs one
     shape shared by all layers, so the exponent matters little);
  2. tolerance tau_l ~ (c_l + eps)^(-1/2): the rate at which layer l reaches a damage every layer
     shares (c_l rho_l^2 = const: equal damage per layer), divided by its maximum over the pruned
     layers; eps = 1e-3 x the median c_l, so a layer whose pruning changes nothing gets at most
     ~32 times the median layer's tolerance instead of all of the budget;
  3. tau(x) ~ A / (1 + exp(-k (x - x0))) fitted by least squares over the pruned layers' relative
     depth x (the logistic schedule's own coordinate, seap.core.allocation.relative_depths); A in
     closed form, (k, x0) by a zooming grid search.
`--allocation logistic-fitted` (seap.analyze.schedule) uses that (k, x0) in SEAP's schedule with
Lambda still bisected so the ratio holds over all layers: the measured curve sets the shape, the
budget its height. A flat curve (k = 0) is the uniform schedule over the pruned layers; k < 0
prunes shallow layers more.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.layerwise import collect_stats
from ..calibration.stats import batches
from ..core.allocation import logistic, relative_depths, uniform
from ..core.scores import DATA_FREE, SCORES, channel_scores, top_k
from ..errors import ConfigError
from ..model.fingerprints import fingerprint
from ..model.hooks import hooked
from ..model.loading import LoadedModel, use_or_open
from ..model.weights import ModuleWeights
from ..pruning.plan import Expert, Plan, pools
from ..pruning.surgery import masked
from ..tasks import resolve_corpus
from .common import Analysis, check_positive, layer_outputs, markdown_table, task_texts
from .schedule import DEFAULT_K, DEFAULT_X0, SENS_FORMAT, SENS_VERSION

METRICS = ("cosine", "ppl")


@dataclass(frozen=True)
class SensitivityConfig:
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    metric: str = "cosine"  # the damage the schedule is fitted to
    score: str = "wifn"
    limit: int = 32  # calibration texts per task (they only rank the channels)
    sample: str = "default:general_text"  # the text the damage is measured on
    texts: int = 8
    max_length: int = 64
    batch_size: int = 8
    protect_first: int = 2  # layers the schedule keeps dense (measured, but left out of the fit)
    protect_last: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ratios or any(not (isinstance(r, (int, float)) and 0 < r <= 1) for r in self.ratios):
            raise ConfigError(f"ratios must be fractions in (0, 1] (e.g. --ratio 0.25 --ratio 0.5), got {self.ratios}")
        if len(set(self.ratios)) != len(self.ratios):
            raise ConfigError(f"a ratio is given twice in {self.ratios}")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        if self.score not in SCORES:
            raise ConfigError(f"unknown score {self.score!r}: choose one of {', '.join(SCORES)}")
        check_positive(limit=self.limit, texts=self.texts, batch_size=self.batch_size)
        if self.max_length < 2:
            raise ConfigError(f"max length must be at least 2 tokens (one predicted), got {self.max_length}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ConfigError("protected layer counts must be >= 0")


# -- the maths (pure) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LogisticFit:
    k: float
    x0: float
    amplitude: float
    rmse: float
    r2: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.amplitude / (1.0 + np.exp(np.clip(-self.k * (np.asarray(x, float) - self.x0), -500, 500)))


def fit_logistic(x: Sequence[float], y: Sequence[float], *, k_range: tuple[float, float] = (-20.0, 20.0),
                 x0_range: tuple[float, float] = (-0.5, 1.5), rounds: int = 7) -> LogisticFit:
    """Least-squares y ~ A / (1 + exp(-k (x - x0))), A >= 0: A in closed form, (k, x0) on a zooming grid.

    The default ranges keep every fitted curve usable by the schedule: with |k| <= 20 and x0 in
    [-0.5, 1.5] its end layer is still at 4.5e-5 of the top, so Lambda can always reach the ratio."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or len(x) != len(y):
        raise ConfigError(f"fitting the logistic needs at least 3 pruned layers, got {len(x)}: protect fewer layers")

    def best(ks: np.ndarray, x0s: np.ndarray) -> tuple[float, float, float, float]:
        kk, xx = np.meshgrid(ks, x0s, indexing="ij")
        s = 1.0 / (1.0 + np.exp(np.clip(-kk[..., None] * (x - xx[..., None]), -500, 500)))  # [nk, nx, n]
        a = np.clip((s * y).sum(-1) / np.maximum((s * s).sum(-1), 1e-300), 0.0, None)
        sse = ((a[..., None] * s - y) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        return float(ks[i]), float(x0s[j]), float(a[i, j]), float(sse[i, j])

    ks, x0s = np.linspace(*k_range, 81), np.linspace(*x0_range, 81)  # odd counts: k = 0 is on the grid
    for _ in range(rounds):
        k, x0, a, sse = best(ks, x0s)
        dk, dx = ks[1] - ks[0], x0s[1] - x0s[0]
        ks = np.linspace(max(k_range[0], k - 2 * dk), min(k_range[1], k + 2 * dk), 21)
        x0s = np.linspace(max(x0_range[0], x0 - 2 * dx), min(x0_range[1], x0 + 2 * dx), 21)
    if abs(k) < 1e-9:
        x0 = 0.5  # a flat curve has no midpoint
    sst = float(((y - y.mean()) ** 2).sum())
    return LogisticFit(k, x0, a, math.sqrt(sse / len(y)), 1.0 - sse / sst if sst > 0 else float(sse < 1e-18))


def quadratic_sensitivity(damage: Sequence[Sequence[float]], ratios: Sequence[float]) -> list[float]:
    """Per layer, c minimising sum_r (d(r) - c r^2)^2, clipped at 0 (a layer whose pruning helps is not fragile)."""
    r2 = np.asarray(ratios, dtype=float) ** 2
    d = np.asarray(damage, dtype=float)  # [layers, ratios]
    return np.clip(d @ r2 / (r2 @ r2), 0.0, None).tolist()


def tolerance(sensitivity: Sequence[float]) -> list[float]:
    """Equal-damage rates (c_l + eps)^(-1/2), normalised to max 1 (see the module docstring)."""
    c = np.asarray(sensitivity, dtype=float)
    eps = 1e-3 * float(np.median(c)) + 1e-30
    t = 1.0 / np.sqrt(c + eps)
    return (t / t.max()).tolist()


# -- measurement ------------------------------------------------------------------------------------
def _replayed(out, hidden_states, *args, **kwargs):
    return hidden_states if out is None else out


@contextmanager
def replay_from(model: nn.Module, adapter, start: int, cached) -> Iterator[None]:
    """Skip the layers before `start`: layer start-1 returns `cached` (its dense output, as that
    layer returned it) and the ones before it return their input. The model's own loop, masks and
    position embeddings run as usual; the original forwards come back on exit."""
    layers = adapter.layers(model)
    patched = []
    try:
        for i in range(start):
            layers[i].forward = functools.partial(_replayed, cached if i == start - 1 else None)
            patched.append(layers[i])
        yield
    finally:
        for layer in patched:
            del layer.forward


@contextmanager
def _final_hidden(model: nn.Module, store: dict) -> Iterator[None]:
    with hooked([(model.get_output_embeddings(), "pre", lambda _m, args: store.__setitem__("h", args[0].detach()))]):
        yield


def _token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every real position that has a real successor: [n] (float64)."""
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return nll[mask[:, :-1] & mask[:, 1:]].double()


@dataclass
class _Batch:
    enc: dict
    outs: list  # dense output of every layer, as the layer returned it
    h: torch.Tensor  # dense final hidden states of the real tokens [n, d]
    nll: torch.Tensor  # dense token NLL [m]


@torch.no_grad()
def final_hidden_nll(model: nn.Module, b: _Batch | dict, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states of a batch's real tokens and their next-token NLL, from one forward."""
    enc = b.enc if isinstance(b, _Batch) else b
    mask = enc["attention_mask"].bool()
    with _final_hidden(model, store):
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    return store.pop("h")[mask].double(), _token_nll(logits, enc["input_ids"], mask)


@torch.no_grad()
def dense_reference(lm: LoadedModel, texts: Sequence[str], cfg: SensitivityConfig) -> list[_Batch]:
    """Per batch, the dense model's layer outputs, final hidden states and NLL: what damage is measured against."""
    out, store = [], {}
    for enc in batches(lm.tokenizer, texts, cfg.batch_size, cfg.max_length):
        outs: dict[int, object] = {}
        with layer_outputs(lm.model, lm.adapter, outs.__setitem__, raw=True):
            h, nll = final_hidden_nll(lm.model, enc, store)
        out.append(_Batch(enc, [outs[i] for i in sorted(outs)], h, nll))
    return out


def _probe_plan(widths: Sequence[int], layer: int, keep: torch.Tensor) -> Plan:
    """A one-expert plan that keeps everything except layer `layer`'s removed channels."""
    ffn = [keep if i == layer else torch.arange(w) for i, w in enumerate(widths)]
    return Plan.probe({"probe": Expert(ffn)})


@torch.no_grad()
def layer_damage(lm: LoadedModel, dense: list[_Batch], layer: int, keep: torch.Tensor) -> tuple[float, float]:
    """(cosine damage, NLL increase) on the sample when `layer` keeps only the channels `keep`."""
    widths = [lm.adapter.d_ff(l) for l in lm.adapter.layers(lm.model)]
    plan = _probe_plan(widths, layer, keep)
    cos_sum, n_tok, nll_sum, n_pred, store = 0.0, 0, 0.0, 0, {}
    for b in dense:
        with replay_from(lm.model, lm.adapter, layer, b.outs[layer - 1] if layer else None), \
                masked(lm.model, lm.adapter, plan, "probe"):
            h, nll = final_hidden_nll(lm.model, b, store)
        cos_sum += float(nn.functional.cosine_similarity(h, b.h, dim=-1).clamp(max=1.0).sum())
        n_tok += len(h)
        nll_sum += float((nll - b.nll).sum())
        n_pred += len(nll)
    return max(0.0, 1.0 - cos_sum / n_tok), nll_sum / max(n_pred, 1)


def _rates_at(lm: LoadedModel, ratio: float, cfg: SensitivityConfig, fit: LogisticFit) -> dict[str, list[float] | None]:
    """Per-layer pruned fractions of the three schedules at `ratio` (as `seap prune` would allocate them)."""
    pool, _ = pools(lm.adapter, lm.model, None)
    runs = {"uniform": lambda: uniform(pool, ratio),
            "logistic": lambda: logistic(pool, ratio, k=DEFAULT_K, x0=DEFAULT_X0),
            "logistic-fitted": lambda: logistic(pool, ratio, protect_first=cfg.protect_first,
                                                protect_last=cfg.protect_last, k=fit.k, x0=fit.x0)}
    out = {}
    for name, run in runs.items():
        try:
            out[name] = [1 - k / n for k, n in zip(run(), pool.counts)]
        except ConfigError:
            out[name] = None  # out of that schedule's reach
    return out


# -- the command ------------------------------------------------------------------------------------
def analyze_sensitivity(model: str | LoadedModel | None = None, tasks: Sequence[str] = ("default",), *,
                        config: SensitivityConfig | None = None, data_dir: str | Path | None = None,
                        out: str | Path | None = None, progress: bool = True, runtime=None) -> Analysis:
    """`seap analyze sensitivity`: damage of pruning each layer alone, and the logistic fitted to it."""
    t0 = time.time()
    cfg = config or SensitivityConfig()
    lm = use_or_open(model, runtime)
    n_layers = len(lm.adapter.layers(lm.model))
    depth = relative_depths(n_layers, cfg.protect_first, cfg.protect_last)
    sample = list(resolve_corpus(cfg.sample, data_dir=data_dir, limit=cfg.texts, seed=cfg.seed).texts)
    stats, calib = None, {}
    if cfg.score not in DATA_FREE:
        calib = task_texts(list(tasks), data_dir=data_dir, limit=cfg.limit, seed=cfg.seed, prompts=False)
        stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, [t for ts in calib.values() for t in ts],
                              batch_size=cfg.batch_size, progress=progress)
    weights = ModuleWeights(lm.model, lm.adapter)
    scores = [channel_scores(cfg.score, stats=stats.ffn[i] if stats else None, weights=weights.layer(i).ffn,
                             seed=cfg.seed, salt=2 * i) for i in range(n_layers)]
    dense = dense_reference(lm, sample, cfg)
    dense_nll = float(torch.cat([b.nll for b in dense]).mean())
    damage = {m: [[0.0] * len(cfg.ratios) for _ in range(n_layers)] for m in METRICS}
    with tqdm(total=n_layers * len(cfg.ratios), desc="pruning one layer at a time", unit="run",
              disable=not progress) as bar:
        for l in range(n_layers):
            for j, r in enumerate(cfg.ratios):
                damage["cosine"][l][j], damage["ppl"][l][j] = layer_damage(lm, dense, l, top_k(scores[l], len(scores[l]) - round(r * len(scores[l]))))
                bar.update()
    sens = {m: quadratic_sensitivity(damage[m], cfg.ratios) for m in METRICS}
    active = sorted(depth)
    fits = {}
    for m in METRICS:
        tau = tolerance([sens[m][l] for l in active])
        fit = fit_logistic([depth[l] for l in active], tau)
        fits[m] = {"k": fit.k, "x0": fit.x0, "amplitude": fit.amplitude, "r2": fit.r2, "rmse": fit.rmse,
                   "layers": active, "x": [depth[l] for l in active], "tolerance": tau}
    chosen = fits[cfg.metric]
    fit = LogisticFit(chosen["k"], chosen["x0"], chosen["amplitude"], chosen["rmse"], chosen["r2"])
    fp = fingerprint(lm.model, lm.adapter)
    data = {
        "format": SENS_FORMAT, "version": SENS_VERSION, "model": lm.source.model_id, "fingerprint": fp,
        "config": asdict(cfg), "calibration": {"tasks": {t: len(v) for t, v in calib.items()}},
        "sample": {"corpus": cfg.sample, "texts": len(sample), "tokens": sum(len(b.h) for b in dense)},
        "dense": {"nll": dense_nll, "perplexity": math.exp(dense_nll)},
        "damage": damage, "sensitivity": sens, "fits": fits,
        "schedule": {"k": fit.k, "x0": fit.x0, "metric": cfg.metric, "ratios": list(cfg.ratios),
                     "protect_first": cfg.protect_first, "protect_last": cfg.protect_last},
        "rates_at_0.5": _rates_at(lm, 0.5, cfg, fit), "seconds": round(time.time() - t0, 1),
    }
    res = Analysis("sensitivity", data, _markdown(data, depth))
    if out is not None:
        from . import plots

        res.save(out, {"sensitivity.png": lambda p: plots.sensitivity_curves(data, p),
                       "schedule.png": lambda p: plots.schedule_fit(data, p)})
        res.files["schedule"] = str(Path(out) / "sensitivity.json")
    return res


def _markdown(data: dict, depth: dict[int, float]) -> str:
    cfg, sched, fit = data["config"], data["schedule"], data["fits"][data["schedule"]["metric"]]
    tau = dict(zip(fit["layers"], fit["tolerance"]))
    ratios = cfg["ratios"]
    head = (["layer", "x"] + [f"1-cos @{r:g}" for r in ratios] + [f"Δ NLL @{r:g}" for r in ratios]
            + [f"tolerance ({sched['metric']})"])
    rows = []
    for l in range(len(data["damage"]["cosine"])):
        rows.append([l, f"{depth[l]:.2f}" if l in depth else "dense"]
                    + [f"{v:.4f}" for v in data["damage"]["cosine"][l]] + [f"{v:+.4f}" for v in data["damage"]["ppl"][l]]
                    + [f"{tau[l]:.3f}" if l in tau else "—"])
    other = data["fits"]["ppl" if sched["metric"] == "cosine" else "cosine"]
    return (f"Model `{data['model']}`; channels ranked by `{cfg['score']}`; damage measured on "
            f"{data['sample']['texts']} texts of `{data['sample']['corpus']}` ({data['sample']['tokens']} tokens, "
            f"dense perplexity {data['dense']['perplexity']:.2f}), one layer pruned at a time at ratios "
            f"{', '.join(f'{r:g}' for r in ratios)}.\n\n"
            f"**Fitted logistic ({sched['metric']} damage, layers {cfg['protect_first']}..{len(depth) + cfg['protect_first'] - 1}): "
            f"k = {sched['k']:.3f}, x0 = {sched['x0']:.3f}** (R² {fit['r2']:.3f}; SEAP's default is k = {DEFAULT_K}, "
            f"x0 = {DEFAULT_X0}). The other metric would give k = {other['k']:.3f}, x0 = {other['x0']:.3f} "
            f"(R² {other['r2']:.3f}).\n\nUse it: `seap prune --allocation logistic-fitted --schedule "
            f"<this folder>/sensitivity.json` (same model only).\n\n" + markdown_table(head, rows))
