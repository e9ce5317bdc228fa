"""Cost of pruning at scale: `seap prune` on random-weight checkpoints of real geometries.

    python benchmarks/scaling.py                       # 135M, 1B, 3B, 8B geometries (about an hour on 2 cores)
    python benchmarks/scaling.py --models llama-3.2-1b --work /tmp/seap-scaling

Each checkpoint (benchmarks/checkpoints.py: bf16 sharded safetensors, a real tokenizer, seeded
random weights) is pruned by 50% with SEAP on a fixed calibration set (the embedded corpus,
--limit 32 texts, at most 128 tokens each) as a separate process under `/usr/bin/time -v`, with the
default (one pass: statistics, the preset's channel choice, least-squares refit) and with `--reconstruct none`: the
layer-by-layer path always, the whole-model path where the float32 model fits in memory. Then the
pruned folder is reloaded (bfloat16) and generates one token. Wall time per stage comes from the
run's summary.json; peak RSS and wall time from /usr/bin/time. Random weights make accuracy
meaningless; time, memory and bytes are exact. Results: benchmarks/results/scaling/*.json, a
section of RESULTS.md (`python benchmarks/run.py --stage render`) and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling"
ORDER = ("smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
CALIBRATION = ["--task", "default", "--limit", "32", "--max-length", "128", "--batch-size", "8"]
# rows of `seap prune` as a user runs it (no calibration flags: the whole embedded corpus), --record-default
DEFAULT_RESULTS = HERE / "results" / "scaling-default"
# each path with the default (one pass: statistics, OBS choice, refit) and with the statistics alone
VARIANTS = ("", "--reconstruct none")
WHOLE_FITS_BYTES = 14e9  # the float32 model must leave room for Python, torch and the activations in 24 GB


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, peak RSS and the exit status."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    return {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "peak_rss_gb": time_v(log)["peak_rss_gb"],
            "command": " ".join(cmd)}


def time_v(log: Path) -> dict:
    """Wall seconds and peak RSS (GiB) from a log that ends with `/usr/bin/time -v`'s report."""
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    parts = [float(x) for x in wall.group(1).split(":")] if wall else [0.0]
    return {"wall_s": round(sum(v * 60 ** i for i, v in enumerate(reversed(parts))), 1),
            "peak_rss_gb": round(int(rss.group(1)) / 2**20, 3) if rss else None}


def run_model(name: str, work: Path, keep: bool, only: set[str] | None = None) -> dict:
    from checkpoints import GEOMETRIES, write_checkpoint

    from seap.model.checkpoint import Checkpoint

    ckpt_dir = work / name / "checkpoint"
    t0 = time.time()
    if not ckpt_dir.is_dir():
        write_checkpoint(name, ckpt_dir)
    ckpt = Checkpoint.open(ckpt_dir)
    row = {"model": name, "geometry": GEOMETRIES[name], "params": ckpt.n_params, "checkpoint_bytes": ckpt.nbytes,
           "checkpoint_write_s": round(time.time() - t0, 1), "calibration": " ".join(CALIBRATION), "paths": {}}
    seap = [sys.executable, "-m", "seap"]
    runs = [(path, variant) for path in ["layerwise"] + (["whole"] if ckpt.n_params * 4 <= WHOLE_FITS_BYTES else [])
            for variant in VARIANTS]
    for load, variant in runs:
        path = load + (f", {variant}" if variant else "")
        if only is not None and path not in only:
            continue
        out = work / name / path.replace(", ", "-").replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*seap, "prune", "--model", str(ckpt_dir), "--load", load, "--device", "cpu", "--ratio", "0.5",
               *CALIBRATION, *variant.split(), "--out", str(out)]
        res = timed(cmd, out.with_suffix(".log"))
        if res["rc"] == 0:
            summary = json.loads((out / "summary.json").read_text())
            res.update(stage_seconds=summary["stage_seconds"], bytes_written=summary["bytes_written"],
                       params_after=summary["params_after"], achieved_ratio=summary["achieved_ratio"],
                       max_resident_layers=summary["max_resident_layers"], runtime=summary["runtime"],
                       calibration_tokens=_tokens(out / "stats"))
        row["paths"][path] = res
        print(f"{name} {path}: rc {res['rc']}, {res['wall_s']}s, peak RSS {res['peak_rss_gb']} GiB", flush=True)
    pruned = work / name / "layerwise" / "model"  # the default's output
    if pruned.is_dir():
        cmd = [*seap, "generate", "--model", str(pruned), "--dtype", "bfloat16", "--device", "cpu",
               "--max-new-tokens", "1", "--json", "The capital of France is"]
        res = timed(cmd, work / name / "generate.log")
        text = (work / name / "generate.log").read_text(errors="replace")
        res["generated"] = re.findall(r'"text": "(.*)"', text)[:1]
        row["reload_generate"] = res
        print(f"{name} reload + 1 token: rc {res['rc']}, {res['wall_s']}s, peak RSS {res['peak_rss_gb']} GiB",
              flush=True)
    if not keep:
        shutil.rmtree(work / name, ignore_errors=True)
    return row


def resume_check(name: str, work: Path, kill_after: int = 6) -> dict:
    """Kill a layer-by-layer `seap prune` (SIGKILL) once it has checkpointed `kill_after` layers, run the
    same command again, and compare its plan with an uninterrupted run's."""
    import signal

    from seap import Plan

    ckpt_dir = work / name / "checkpoint"
    if not ckpt_dir.is_dir():
        from checkpoints import write_checkpoint

        write_checkpoint(name, ckpt_dir)
    args = ["prune", "--model", str(ckpt_dir), "--load", "layerwise", "--device", "cpu", "--ratio", "0.5", *CALIBRATION]
    seap = [sys.executable, "-m", "seap", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    clean, resumed = work / name / "clean", work / name / "resumed"
    for d in (clean, resumed):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    subprocess.run([*seap, "--out", str(clean)], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    clean_s = time.time() - t0
    proc = subprocess.Popen([*seap, "--out", str(resumed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = 0
    while proc.poll() is None:
        states = list((resumed / "stats").glob(".calibration-*/state.json"))
        done = json.loads(states[0].read_text())["next_layer"] if states else 0
        if done >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    t1 = time.time()
    log = work / name / "resumed.log"
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "seap", "-v", *args, "--out", str(resumed)], env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    resumed_s = time.time() - t1
    a, b = Plan.load(clean / "plan"), Plan.load(resumed / "plan")
    ea, eb = a.experts[a.meta.default_expert], b.experts[b.meta.default_expert]
    same = all(torch_equal(x, y) for x, y in zip(ea.ffn, eb.ffn))
    note = re.findall(r"resuming the .* pass at layer (\d+)", log.read_text())
    return {"model": name, "command": " ".join(["seap", *args]), "killed_after_layers": done, "kill_signal": "SIGKILL",
            "restart_rc": rc, "resumed_at_layer": int(note[0]) if note else None, "plans_equal": same,
            "models_tensor_equal": _same_tensors(clean / "model", resumed / "model"),
            "uninterrupted_s": round(clean_s, 1), "restart_s": round(resumed_s, 1)}


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two saved model folders equal, shard by shard."""
    from safetensors.torch import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if [f.name for f in fa] != [f.name for f in fb]:
        return False
    for x, y in zip(fa, fb):
        ta, tb = load_file(str(x)), load_file(str(y))
        if ta.keys() != tb.keys() or not all(torch_equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def _tokens(stats_dir: Path) -> int | None:
    from safetensors import safe_open

    for f in stats_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            return int(json.loads(fh.metadata()["seap"])["n_tokens"])
    return None


def scaling_section() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    rows.sort(key=lambda r: r["params"])
    if not rows:
        return ""
    tok = next((p.get("calibration_tokens") for r in rows for p in r["paths"].values() if p.get("calibration_tokens")),
               None)
    text = ("\n## Scaling: pruning 135M to 8B checkpoints on this machine\n\n"
            "`python benchmarks/scaling.py` (then `--stage render`): seeded random-weight checkpoints with the exact "
            "geometry of each model (bf16 sharded safetensors as the hub ships them, SmolLM2's tokenizer), pruned "
            f"by 50% with SEAP on {tok} calibration tokens (`{rows[0]['calibration']}`), each run a separate process "
            "under `/usr/bin/time -v` on the CPU (float32 compute, output saved in bf16). **Random weights make "
            "accuracy meaningless; time, memory and bytes are exact.** Stages from the run's summary.json: load "
            "(skeleton or whole model, tokenizer, fingerprint), calibration (the one pass of statistics, choice and refit; "
            "statistics alone with --reconstruct none), plan, slice and "
            "save. `path` names the loading path and, after a comma, what differs from the default. The 135M to 3B rows "
            "were measured when the OBS channel choice was the default (so their default rows are `--refit-choice "
            "obs` rows); the 8B geometry has both, the default now (the score's channels for the embedded corpus) "
            "and the OBS choice.\n\n"
            "| model | params | checkpoint | path | wall s | load | calibration | plan | slice+save | peak RSS GiB | "
            "written GB | layers in memory |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        for path, p in r["paths"].items():
            if p["rc"] != 0:
                text += (f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_bytes'] / 1e9:.1f} GB | {path} | "
                         f"failed (rc {p['rc']}) | | | | | {p['peak_rss_gb']} | | |\n")
                continue
            s = p["stage_seconds"]
            text += (f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_bytes'] / 1e9:.1f} GB | {path} | "
                     f"{p['wall_s']:.0f} | {s['load']:.0f} | {s.get('statistics', s.get('calibration', 0)):.0f} | "
                     f"{s.get('plan', 0):.1f} | "
                     f"{s['slice_and_save']:.0f} | {p['peak_rss_gb']:.2f} | {p['bytes_written'] / 1e9:.2f} | "
                     f"{p['max_resident_layers'] if p['max_resident_layers'] is not None else 'all'} |\n")
    text += "\nReload of each layer-by-layer output (bfloat16, CPU) and one generated token:\n\n"
    text += "| model | wall s | peak RSS GiB | token |\n|---|---|---|---|\n"
    for r in rows:
        g = r.get("reload_generate")
        if g:
            token = (g.get("generated") or ["?"])[0]
            text += f"| {r['model']} | {g['wall_s']:.0f} | {g['peak_rss_gb']:.2f} | {token!r} |\n"
    check = HERE / "results" / "resume_check.json"
    if check.is_file():
        c = json.loads(check.read_text())
        text += (f"\nResume (`python benchmarks/scaling.py --resume-check {c['model']}`): a layer-by-layer prune of the "
                 f"{c['model']} geometry was killed with {c['kill_signal']} after {c['killed_after_layers']} layers had "
                 f"been checkpointed; the same command started again resumed at layer {c['resumed_at_layer']} and "
                 f"finished in {c['restart_s']:.0f} s (an uninterrupted run: {c['uninterrupted_s']:.0f} s); its plan "
                 f"{'equals' if c['plans_equal'] else 'DIFFERS from'} the uninterrupted run's, index for index.\n")
    if (HERE / "scaling.png").is_file():
        text += "\n![time and peak memory against parameters](scaling.png)\n"
    return text + default_section()


def default_section() -> str:
    """The default prune (no calibration flags) of each geometry, one row per run."""
    rows = [json.loads(p.read_text()) for p in sorted(DEFAULT_RESULTS.glob("*.json"))]
    if not rows:
        return ""
    text = ("\n### The default prune at scale\n\n`seap prune --model CKPT --ratio 0.5 --out OUT` as a user runs it "
            "(the `seap` preset: one calibration pass with statistics, OBS channel choice and least-squares refit "
            "per layer; the whole embedded corpus; float32 on the CPU, output in bf16), under `/usr/bin/time -v` "
            "on this 2-core machine (the 8B row of 2026-12-06 while a niced test run shared the cores; the same command "
            "on the idle machine, before each layer's inputs were freed after its forward, took 49.1 min at 5.82 GiB). Stage seconds from summary.json; the calibration pass split as the "
            "engine timed it.\n\n| model | command | wall | calibration pass (forward / decide / checkpoint) | "
            "slice+save | calibration tokens | peak RSS GiB | written GB | reload + 1 token |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        c, s, g = r["calibration"], r["stage_seconds"], r.get("reload_generate") or {}
        cs = c.get("seconds", {})
        text += (f"| {r['model']} | `{r['label']}` | {r['wall_s'] / 60:.1f} min | {s.get('calibration', 0) / 60:.1f} min "
                 f"({cs.get('forward', 0) / 60:.1f} / {cs.get('decide', 0) / 60:.1f} / {cs.get('checkpoint', 0) / 60:.1f}) "
                 f"| {s.get('slice_and_save', 0):.0f} s | {sum(c.get('tokens_per_process', [0])):,} | "
                 f"{r['peak_rss_gb']:.2f} | {r['bytes_written'] / 1e9:.2f} | "
                 f"{g.get('wall_s', 0):.0f} s, {g.get('peak_rss_gb', 0):.2f} GiB, {(g.get('generated') or ['?'])[0]!r} |\n")
    return text


def record_default(name: str, out: Path, log: Path, gen_log: Path | None, label: str) -> dict:
    """The row of one default prune run from its output folder and its /usr/bin/time logs."""
    text = log.read_text(errors="replace")
    summary = json.loads((out / "summary.json").read_text())
    row = {"model": name, "label": label, **time_v(log),
           "estimate": next((ln for ln in text.splitlines() if ln.startswith("seap: one calibration pass")), None),
           **{k: summary[k] for k in ("stage_seconds", "calibration", "bytes_written", "params_before", "params_after",
                                      "achieved_ratio", "ffn_widths", "max_resident_layers", "runtime")}}
    if gen_log is not None and gen_log.is_file():
        row["reload_generate"] = {**time_v(gen_log),
                                  "generated": re.findall(r'"text": "(.*)"', gen_log.read_text(errors="replace"))[:1]}
    return row


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for path, marker in (("layerwise", "o-"), ("whole", "s--")):
        pts = [(r["params"] / 1e9, r["paths"][path]) for r in rows
               if path in r["paths"] and r["paths"][path]["rc"] == 0]
        if not pts:
            continue
        x = [p[0] for p in pts]
        a.plot(x, [p[1]["wall_s"] / 60 for p in pts], marker, label=path)
        b.plot(x, [p[1]["peak_rss_gb"] for p in pts], marker, label=path)
    a.set(xlabel="parameters (billions)", ylabel="wall minutes", title="seap prune --ratio 0.5 (CPU)")
    b.set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="peak memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ORDER))
    ap.add_argument("--work", default="/tmp/seap-scaling", help="where checkpoints and outputs go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--paths", default=None,
                    help="only these runs, ';'-separated (e.g. 'whole;whole, --reconstruct none'), merged into "
                         "the model's existing row")
    ap.add_argument("--record-default", nargs=4, metavar=("MODEL", "OUT", "LOG", "GENERATE_LOG"),
                    help="only: record a default prune run (its --out folder and /usr/bin/time -v logs)")
    ap.add_argument("--resume-check", default=None, metavar="MODEL",
                    help="only: kill a layer-by-layer prune of MODEL midway, restart it, compare plans")
    args = ap.parse_args()
    from seap._io import write_json

    if args.record_default:
        name, out, log, gen = args.record_default
        row = record_default(name, Path(out), Path(log), Path(gen), "seap prune --model CKPT --ratio 0.5 --out OUT")
        write_json(DEFAULT_RESULTS / f"{name}.json", row)
        print(json.dumps(row, indent=1))
        return 0
    if args.resume_check:
        res = resume_check(args.resume_check, Path(args.work))
        write_json(HERE / "results" / "resume_check.json", res)
        print(json.dumps(res, indent=2))
        if not args.keep:
            shutil.rmtree(Path(args.work) / args.resume_check, ignore_errors=True)
        return 0

    for name in [m for m in args.models.split(",") if m]:
        only = set(args.paths.split(";")) if args.paths else None
        row = run_model(name, Path(args.work), args.keep, only)
        if only is not None and (RESULTS / f"{name}.json").is_file():
            old = json.loads((RESULTS / f"{name}.json").read_text())
            row = {**old, "paths": {**old["paths"], **row["paths"]},
                   "reload_generate": row.get("reload_generate", old.get("reload_generate"))}
        write_json(RESULTS / f"{name}.json", row)
    rows = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")), key=lambda r: r["params"])
    plot(rows)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
