"""`seap bench`: prefill and decode speed of dense and pruned models, measured in one process (docs/design.md §4).

Speed is reported as ratios to the dense model measured in the same run, with warm-up and the
median of several repeats, next to the physical limit of a static cut: the ratio of bytes a
decode step reads (weights, plus the KV cache it attends over).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..inference.decoding import greedy, sync
from ..inference.griffin import GriffinConfig
from ..model.loading import LoadedModel
from ..pruning.surgery import count_params, ffn_params, weight_bytes

log = logging.getLogger(__name__)

DECODE_PATHS = ("seap", "generate")


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    gen_len: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 1
    repeats: int = 5
    decode_path: str = "seap"  # seap: the lean greedy loop (seap.inference.decoding.greedy); generate: transformers' generate()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 2:
            raise ConfigError(f"`prompt_len` must be >= 1 and `gen_len` >= 2, got {self.prompt_len}, "
                              f"{self.gen_len}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"`batch_sizes` must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"`repeats` must be >= 1 and `warmup` >= 0, got {self.repeats}, {self.warmup}")
        if self.decode_path not in DECODE_PATHS:
            raise ConfigError(f"unknown `decode_path` {self.decode_path!r}: choose {' or '.join(DECODE_PATHS)}")


# -- bytes ---------------------------------------------------------------------------------------
def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: everything except an untied input-embedding table, of
    which only the looked-up rows are read (a tied table is read whole by the LM head)."""
    total = weight_bytes(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_position(model: nn.Module, adapter) -> int:
    """KV-cache bytes per cached token of one sequence (all layers, keys and values)."""
    total = 0
    elem = next(model.parameters()).element_size()
    for layer in adapter.layers(model):
        g = adapter.head_geometry(layer)
        total += 2 * g.num_kv_heads * g.head_dim * elem
    return total


def decode_step_bytes(model: nn.Module, adapter, batch: int, context: float) -> float:
    """Bytes one decode step of `batch` sequences reads at mean context length `context`."""
    return decode_weight_bytes(model) + batch * context * kv_bytes_per_position(model, adapter)


# -- timing ----------------------------------------------------------------------------------------
@torch.inference_mode()
def _generate_times(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of transformers' generate(): prefill timed as a one-token generate."""
    device = input_ids.device
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    t1 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)


@dataclass
class Measurement:
    batch: int
    prefill_tok_s: float
    decode_tok_s: float
    prefill_runs: list[float] = field(default_factory=list)  # seconds per repeat
    decode_runs: list[float] = field(default_factory=list)
    kv_cache_bytes: int = 0
    peak_memory: int = 0  # CUDA: allocator peak; CPU: weights + KV cache (activations not counted)
    union_fraction: float | None = None  # GRIFFIN: share of FFN neurons a decode step reads


@dataclass
class ModelSpeed:
    name: str
    params: int
    weight_bytes: int
    decode_bytes: dict[int, float]  # batch -> bytes per decode step
    results: dict[int, Measurement]

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "weight_bytes": self.weight_bytes,
                "decode_bytes": self.decode_bytes, "results": {b: asdict(m) for b, m in self.results.items()}}


def _prompts(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Avoid the lowest ids (special tokens): a random sequence of ordinary tokens.
    return torch.randint(min(1000, vocab // 2), vocab, (batch, length), generator=g).to(device)


def text_prompts(tokenizer, texts: Sequence[str], length: int, chat: bool = False) -> torch.Tensor:
    """[N, length] token ids: the first `length` tokens of every text long enough to give them; with
    `chat`, the last `length` tokens of each text as a user turn of the chat template (so a prompt
    ends where the assistant's answer starts, as an instruct model is served)."""
    from ..model.loading import chat_prompts

    if chat:
        wrapped, _ = chat_prompts(tokenizer, texts, True)
        ids = tokenizer(wrapped, add_special_tokens=False)["input_ids"]
        rows = [x[-length:] for x in ids if len(x) >= length]
    else:
        rows = [ids[:length] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]
                if len(ids) >= length]
    if not rows:
        raise ConfigError(f"no prompt text reaches {length} tokens: give longer texts or a shorter --prompt-len")
    return torch.tensor(rows, dtype=torch.long)


def repeat_batch(pool: torch.Tensor, batch: int, repeat: int, device) -> torch.Tensor:
    """Rows of a prompt pool for one repeat: consecutive, wrapping around, different per repeat."""
    idx = (torch.arange(batch) + repeat * batch) % pool.shape[0]
    return pool[idx].to(device)


def bench_models(models: dict[str, LoadedModel], cfg: BenchConfig | None = None, *,
                 progress: bool = True, griffin: dict[str, float | GriffinConfig] | None = None,
                 texts: Sequence[str] | None = None, chat: bool = False) -> dict[str, ModelSpeed]:
    """Time every model at every batch size; repeats are interleaved across models so that drift
    of the machine (thermal, other load) hits all models alike. Names in `griffin` decode with
    GRIFFIN experts at that density, or as that GriffinConfig says (per-sequence or shared batch
    experts); the selection counts as prefill time, the weight gather as decode time.

    Prompts are random ordinary tokens, or with `texts` the first prompt_len tokens of those texts
    (each model's own tokenizer): GRIFFIN's experts, and so the union a batch reads, depend on
    what the prompts say, which random tokens do not show."""
    from ..inference.griffin import GriffinSelection, griffin_prior

    cfg = cfg or BenchConfig()
    pools = ({name: text_prompts(lm.tokenizer, texts, cfg.prompt_len, chat) for name, lm in models.items()}
             if texts else {})
    griffin = {n: g if isinstance(g, GriffinConfig) else GriffinConfig(density=g) for n, g in (griffin or {}).items()}
    if set(griffin) - set(models):
        raise ConfigError(f"GRIFFIN entries {sorted(set(griffin) - set(models))} name no model to time")
    priors = {n: griffin_prior(models[n]) for n, g in griffin.items() if g.short == "prior" and not g.pure}
    if griffin and cfg.decode_path != "seap":
        raise ConfigError("GRIFFIN is timed with seap's decode loop only: use --decode-path seap")
    if not models:
        raise ConfigError("nothing to benchmark: give at least one model")
    unions: dict[tuple[str, int], list[float]] = {}
    out: dict[str, ModelSpeed] = {}
    context = cfg.prompt_len + cfg.gen_len / 2
    for name, lm in models.items():
        m = lm.model
        out[name] = ModelSpeed(name, count_params(m),
                               weight_bytes(m),
                               {b: decode_step_bytes(m, lm.adapter, b, context) for b in cfg.batch_sizes}, {})
    steps = [(b, name) for b in cfg.batch_sizes for name in models]
    bar = tqdm(total=len(steps) * (cfg.warmup + cfg.repeats + 1), desc="bench", disable=not progress)
    for b in cfg.batch_sizes:
        runs: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in models}
        for r in range(cfg.warmup + cfg.repeats):
            for name, lm in models.items():
                dev = next(lm.model.parameters()).device
                ids = (repeat_batch(pools[name], b, r, dev) if pools else
                       _prompts(lm.model.config.vocab_size, b, cfg.prompt_len, cfg.seed + r, dev))
                if cfg.decode_path == "seap":
                    sel = GriffinSelection(lm.adapter, griffin[name], priors.get(name)) if name in griffin else None
                    g = greedy(lm.model, ids, cfg.gen_len, selection=sel)
                    tp, td = g.prefill_s, g.decode_s
                    if sel is not None:
                        unions.setdefault((name, b), []).append(g.stats["union_fraction"])
                else:
                    tp, td = _generate_times(lm.model, ids, cfg.gen_len)
                if r >= cfg.warmup:
                    runs[name][0].append(tp)
                    runs[name][1].append(td)
                bar.update()
        for name, lm in models.items():
            pre, dec = runs[name]
            meas = Measurement(b, b * cfg.prompt_len / statistics.median(pre),
                               b * (cfg.gen_len - 1) / statistics.median(dec), pre, dec)
            dev = next(lm.model.parameters()).device
            ids = _prompts(lm.model.config.vocab_size, b, cfg.prompt_len, cfg.seed, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            meas.kv_cache_bytes = greedy(lm.model, ids, cfg.gen_len).kv_cache_bytes
            meas.peak_memory = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                                else out[name].weight_bytes + meas.kv_cache_bytes)
            bar.update()
            out[name].results[b] = meas
            if name in griffin:  # the FFN bytes a step reads shrink to the batch's union of experts
                u = statistics.median(unions[(name, b)])
                ffn = ffn_params(lm.model, lm.adapter) * next(lm.model.parameters()).element_size()
                out[name].decode_bytes[b] -= (1 - u) * ffn
                meas.union_fraction = u
                if next(lm.model.parameters()).device.type != "cuda":
                    meas.peak_memory += int(u * ffn)  # the batch's gathered expert weights
    bar.close()
    return out


def speed_table(speeds: dict[str, ModelSpeed], reference: str | None = None) -> list[dict]:
    """Rows with tokens/s and ratios to the reference (the dense model) and the bytes limit."""
    reference = reference or next(iter(speeds))
    ref = speeds[reference]
    rows = []
    for name, s in speeds.items():
        for b, m in s.results.items():
            r = ref.results[b]
            limit = ref.decode_bytes[b] / s.decode_bytes[b]
            decode_ratio = m.decode_tok_s / r.decode_tok_s
            rows.append({
                "model": name, "batch": b, "params": s.params, "weight_MB": s.weight_bytes / 2**20,
                "kv_MB": m.kv_cache_bytes / 2**20, "peak_MB": m.peak_memory / 2**20, "prefill_tok_s": m.prefill_tok_s, "decode_tok_s": m.decode_tok_s,
                "prefill_ratio": m.prefill_tok_s / r.prefill_tok_s, "decode_ratio": decode_ratio,
                "bytes_limit": limit, "of_limit": decode_ratio / limit if limit > 0 else float("nan"),
                "union_fraction": m.union_fraction,
            })
    return rows


def _share(fraction: float | None) -> str:
    return "all" if fraction is None else f"{100 * fraction:.0f}%"


def speed_markdown(rows: Sequence[dict]) -> str:
    head = ("model", "batch", "params", "weights MB", "KV cache MB", "peak MB", "prefill tok/s", "decode tok/s", "prefill ×",
            "decode ×", "bytes limit ×", "decode / limit", "FFN read")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['weight_MB']:.0f} | "
                     f"{r['kv_MB']:.1f} | {r['peak_MB']:.0f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {r['bytes_limit']:.2f} | "
                     f"{100 * r['of_limit']:.0f}% | {_share(r.get('union_fraction'))} |")
    return "\n".join(lines) + "\n"
