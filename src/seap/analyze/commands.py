"""`seap analyze {clusters,heatmap,sensitivity,plan}`: argparse definitions and dispatch (a thin layer)."""

from __future__ import annotations

import argparse

from ..core.scores import SCORES

OUT_HELP = "output folder for <name>.json, <name>.md and the PNG figures (default seap-analyze)"


def _common(p: argparse.ArgumentParser, *, limit: int, tasks_help: str) -> None:
    from ..model.runtime import add_runtime_args

    add_runtime_args(p, device_map=True)
    p.add_argument("--model", default=None, help="bundled name (smollm2-135m [default], gemma3-270m), a Hugging "
                   "Face id, a local folder or a .gguf file")
    p.add_argument("--task", dest="tasks", action="append", default=None, help=tasks_help)
    p.add_argument("--data-dir", default=None, help="local task data laid out as <task>/<split>.parquet "
                   "(e.g. ../shared/data)")
    p.add_argument("--limit", type=int, default=limit, help=f"examples per task (seeded subset; default {limit})")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="seap-analyze", help=OUT_HELP)


def add_parser(sub) -> None:
    """Register `analyze` and its four commands on the `seap` subparsers."""
    p = sub.add_parser("analyze", help="SEAP's evidence on your model: task clusters, activation heatmaps, "
                       "layer sensitivity (and a fitted schedule), plan overlap")
    asub = p.add_subparsers(dest="analyze_cmd", required=True)
    suite = ("task corpus (repeatable); default: the six benchmark tasks with --data-dir, the five embedded "
             "families (default:science_qa, ...) without")

    a = asub.add_parser("clusters", help="hidden states of task prompts in 2-D (PCA, t-SNE) and the silhouette")
    _common(a, limit=60, tasks_help=suite)
    a.add_argument("--layer", dest="layers", type=int, action="append", default=None,
                   help="layer to draw (0-based, repeatable); default four spread over the depth")
    a.add_argument("--pool", default="mean", choices=("mean", "last"), help="pool a prompt's tokens by mean or last")
    a.add_argument("--no-tsne", action="store_true", help="PCA only (t-SNE takes a few seconds per layer)")

    a = asub.add_parser("heatmap", help="per-task channel activation profiles, two random halves side by side")
    _common(a, limit=60, tasks_help=suite)
    a.add_argument("--dims", type=int, default=128, help="channels drawn per layer (all are compared)")

    a = asub.add_parser("sensitivity", help="prune one layer at a time, measure the damage, fit the logistic "
                        "schedule (for --allocation logistic-fitted)")
    _common(a, limit=32, tasks_help="calibration corpus that ranks the channels (repeatable; default: default)")
    a.add_argument("--ratio", dest="ratios", type=float, action="append", default=None,
                   help="share of one layer's channels to prune (repeatable; default 0.25, 0.5, 0.75)")
    a.add_argument("--metric", default="cosine", choices=("cosine", "ppl"),
                   help="damage the schedule is fitted to: cosine of the final hidden states or perplexity")
    a.add_argument("--score", default="wifn", choices=SCORES, help="channel ranking (default wifn, SEAP's s_W)")
    a.add_argument("--sample", default="default:general_text", help="corpus the damage is measured on")
    a.add_argument("--texts", type=int, default=8, help="texts of --sample (default 8)")
    a.add_argument("--protect-first", type=int, default=2, help="layers the schedule keeps dense (left out of the fit)")
    a.add_argument("--protect-last", type=int, default=2)

    a = asub.add_parser("plan", help="per-layer widths of plans and the Jaccard overlap of their experts")
    a.add_argument("--plan", dest="plans", action="append", required=True, help="plan folder (repeatable)")
    a.add_argument("--expert", dest="experts", action="append", default=None,
                   help="only this expert of each plan (repeatable; default all)")
    a.add_argument("--out", default="seap-analyze", help=OUT_HELP)


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def run(args: argparse.Namespace, runtime=None) -> None:
    """Dispatch `seap analyze <cmd>` and print what was written."""
    from . import analyze_clusters, analyze_heatmap, analyze_plans, analyze_sensitivity
    from .clusters import ClusterConfig
    from .heatmap import HeatmapConfig
    from .sensitivity import SensitivityConfig

    cmd = args.analyze_cmd
    if cmd == "plan":
        res = analyze_plans(args.plans, experts=args.experts, out=args.out)
        print(f"{len(res.data['jaccard']['names'])} experts of {len(args.plans)} plan(s)")
    else:
        size = _given(batch_size=args.batch_size, max_length=args.max_length)
        if cmd == "clusters":
            cfg = ClusterConfig(layers=tuple(args.layers) if args.layers else None, pool=args.pool, limit=args.limit,
                                methods=("pca",) if args.no_tsne else ("pca", "tsne", "umap"), seed=args.seed, **size)
            res = analyze_clusters(args.model, args.tasks, config=cfg, data_dir=args.data_dir, out=args.out,
                                   runtime=runtime)
            d = res.data
            print(f"silhouette by task: best layer {d['best_layer']} ({d['best_silhouette']:.3f}); layers drawn "
                  + ", ".join(f"{l} ({d['silhouette'][l]:.3f})" for l in d["layers_shown"]))
        elif cmd == "heatmap":
            cfg = HeatmapConfig(limit=args.limit, dims=args.dims, seed=args.seed, **size)
            res = analyze_heatmap(args.model, args.tasks, config=cfg, data_dir=args.data_dir, out=args.out,
                                  runtime=runtime)
            print(f"profile similarity: within-task {res.data['within_task']:.3f}, "
                  f"between tasks {res.data['between_task']:.3f}")
        else:
            cfg = SensitivityConfig(ratios=tuple(args.ratios) if args.ratios else SensitivityConfig.ratios,
                                    metric=args.metric, score=args.score, limit=args.limit, sample=args.sample,
                                    texts=args.texts, protect_first=args.protect_first,
                                    protect_last=args.protect_last, seed=args.seed, **size)
            res = analyze_sensitivity(args.model, args.tasks or ("default",), config=cfg, data_dir=args.data_dir,
                                      out=args.out, runtime=runtime)
            s = res.data["schedule"]
            print(f"fitted logistic ({s['metric']}): k = {s['k']:.3f}, x0 = {s['x0']:.3f} "
                  f"(R² {res.data['fits'][s['metric']]['r2']:.3f}); use it with "
                  f"seap prune --allocation logistic-fitted --schedule {res.files['schedule']}")
        print(f"done in {res.data['seconds']:.0f}s")
    for name, path in res.files.items():
        if name != "schedule":
            print(f"  {name}: {path}")
