"""Compute-optimal scaling laws of structured GPTs at CPU scale (paper-notes §5, §7; arXiv 2410.02117 Fig. 1, 4, 6).

For dense, a full-rank BTT (ω=0, ψ=1), a low-rank BTT (ψ<1), a Kronecker/TT point (ω>0) and BTT-MoE (E=8, k=2),
sweep the model width, train each model on character-level text from the Python standard library (offline)
with warmup then a constant learning rate, and record (training compute, validation loss) at log-spaced steps.
Then take each structure's Pareto frontier, fit ``L = a·C^-b`` to it, and write:

* ``points.csv``: every evaluation (structure, width, params, MACs/token, step, tokens, compute, loss, frontier);
* ``fits.csv``: the power law of each structure, its loss at a common compute and its compute multiplier
  over dense (geometric mean over its frontier points inside dense's loss range);
* ``scaling_laws.png``: loss vs compute, log-log, points, frontiers and fits.

Compute is 6 × active forward MACs/token × tokens (MoE counts only the k active experts, as the paper does).

    python examples/scaling_laws.py             # the default sweep: under 30 minutes on 2 CPU cores
    python examples/scaling_laws.py --quick     # a smoke run: under a minute
    python examples/scaling_laws.py --estimate  # time 3 steps of every run and print the projected total
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import einrewrite as er
from einrewrite.data import load_corpus
from einrewrite.gpt import GPTConfig, build_gpt
from einrewrite.scaling import FitError, PowerLaw, compute_multiplier, fit_power_law, pareto_frontier
from einrewrite.structures import BTTMoE, Einsum
from einrewrite.train import TrainConfig, train

log = logging.getLogger("scaling_laws")


@dataclass(frozen=True)
class Arm:
    """One structure of the sweep: a label, the structure (None = dense) and its widths."""

    label: str
    structure: Any
    widths: tuple[int, ...]
    quick_widths: tuple[int, ...]


ARMS = (
    Arm("dense", None, (32, 48, 64, 96, 128), (16, 32)),
    Arm("btt ω=0 ψ=1 (.33|0|.67|0|.67|.33|.25)", Einsum(theta="(.33|0|.67|0|.67|.33|.25)"),
        (48, 64, 96, 128, 192), (32, 48)),
    Arm("low-rank btt ψ<1 (.67|0|.33|0|.67|.33|0)", Einsum(theta="(.67|0|.33|0|.67|.33|0)"),
        (48, 64, 96, 128, 192), (32, 48)),
    Arm("kronecker ω>0 (.5|.5|0|.5|.5|0|.25)", Einsum(theta="(.5|.5|0|.5|.5|0|.25)"),
        (48, 64, 96, 128, 192), (32, 48)),
    Arm("btt-moe E=8 k=2", BTTMoE(num_experts=8, top_k=2), (48, 64, 96, 128), (32, 48)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny widths and steps: a smoke run in under a minute")
    p.add_argument("--estimate", action="store_true", help="time 3 steps of every run and print the projected total")
    p.add_argument("--out", default="scaling_out", help="output directory (default: scaling_out)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 240; quick 12)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; quick 8)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default 64; quick 32)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default 2; quick 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate (µP-scaled per layer)")
    p.add_argument("--only", action="append", default=None, help="run only structures whose label contains this")
    p.add_argument("--offset", choices=["none", "fit"], default="none", help="fit L = a·C^-b (none) or + c (fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, else torch's)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, one thread each (default: 2 on 2+ cores; 1 with --quick)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "steps": args.steps or (12 if quick else 240),
        "batch_size": args.batch_size or (8 if quick else 16),
        "block_size": args.block_size or (32 if quick else 64),
        "layers": args.layers or (1 if quick else 2),
        "corpus_bytes": 200_000 if quick else 2_000_000,
        "eval_points": 4 if quick else 10,
        "eval_batches": 2 if quick else 8,
    }


def build(arm: Arm, width: int, s: dict[str, Any], vocab: int, seed: int) -> torch.nn.Module:
    """The GPT of ``width`` with every projection in the arm's structure (µP init; head and embeddings dense)."""
    config = GPTConfig(vocab_size=vocab, block_size=s["block_size"], n_layer=s["layers"], d_model=width, d_head=16)
    rewrite = None
    if arm.structure is not None:
        rewrite = er.RewriteConfig(structure=arm.structure, budget=er.FlopBudget(ratio=1e6), init="mup", min_features=1)
    model, _ = build_gpt(config, rewrite, seed=seed)
    return model


_CORPUS: dict[int, Any] = {}  # per process: the corpus, loaded once


def _corpus(max_bytes: int) -> Any:
    if max_bytes not in _CORPUS:
        _CORPUS[max_bytes] = load_corpus(vocab="char", max_bytes=max_bytes)
    return _CORPUS[max_bytes]


def run_one(arm_index: int, width: int, s: dict[str, Any], args: argparse.Namespace,
            threads: int | None) -> tuple[str, list[dict[str, Any]], float]:
    """Train one (structure, width) run; returns (log line, evaluation rows, projected seconds for --estimate)."""
    if threads:
        torch.set_num_threads(threads)
    arm = ARMS[arm_index]
    corpus = _corpus(s["corpus_bytes"])
    cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], block_size=s["block_size"], lr=args.lr,
                      warmup=max(1, s["steps"] // 10), eval_points=s["eval_points"], eval_batches=s["eval_batches"],
                      seed=args.seed)
    try:
        model = build(arm, width, s, corpus.vocab.size, args.seed)
    except er.EinrewriteError as e:
        return f"  {arm.label} @ {width}: skipped ({str(e).splitlines()[0][:120]})", [], 0.0
    if args.estimate:  # one warm-up step (first-call costs), then time 3 steps
        probe = {**cfg.to_dict(), "eval_points": 0, "eval_batches": 1, "betas": cfg.betas}
        train(model, corpus, TrainConfig(**{**probe, "steps": 1, "eval_every": 1}))
        start = time.perf_counter()
        train(model, corpus, TrainConfig(**{**probe, "steps": 3, "eval_every": 3}))
        per_step = (time.perf_counter() - start) / 3.5  # 3 steps + 2 one-batch evaluations
        seconds = per_step * s["steps"] + len(cfg.eval_steps()) * s["eval_batches"] * per_step / 3  # eval ≈ 1/3 step
        return f"  {arm.label} @ {width}: ~{seconds:.0f} s", [], seconds
    start = time.perf_counter()
    result = train(model, corpus, cfg)
    line = (f"  {arm.label} @ {width}: {result.params:,} params, {result.macs.total:,} MACs/token, "
            f"val {result.final_val_loss:.4f} in {time.perf_counter() - start:.1f} s")
    rows = [{"structure": arm.label, "width": width, "params": result.params, "macs_per_token": result.macs.total,
             "step": p.step, "tokens": p.tokens, "compute": p.compute, "val_loss": p.val_loss}
            for p in result.history if p.step > 0]  # step 0 spent no compute: not a point of a log-log frontier
    return line, rows, 0.0


def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (structure, width) run, ``--jobs`` at a time (one torch thread each when running in parallel)."""
    s = settings(args)
    print(_corpus(s["corpus_bytes"]).describe(), flush=True)
    runs = [(i, w) for i, arm in enumerate(ARMS) if not args.only or any(o in arm.label for o in args.only)
            for w in (arm.quick_widths if args.quick else arm.widths)]
    runs.sort(key=lambda r: -r[1])  # widest first: the pool ends with short runs
    jobs = max(1, min(args.jobs, len(runs)))
    threads = 1 if jobs > 1 else None
    results: list[tuple[int, int, tuple[str, list[dict[str, Any]], float]]] = []
    if jobs == 1:
        for i, w in runs:
            results.append((i, w, run_one(i, w, s, args, threads)))
            print(results[-1][2][0], flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, i, w, s, args, threads): (i, w) for i, w in runs}
            for future in as_completed(futures):
                i, w = futures[future]
                results.append((i, w, future.result()))
                print(results[-1][2][0], flush=True)
    results.sort(key=lambda r: (r[0], r[1]))
    if args.estimate:
        total = sum(r[2][2] for r in results)
        print(f"projected total: ~{total / 60:.1f} min of runs, ~{total / 60 / jobs:.1f} min with --jobs {jobs} "
              "(plus start-up)")
    return [row for _, _, (_, rows, _) in results for row in rows]


def analyse(
    rows: list[dict[str, Any]], offset: str
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, PowerLaw | None]]:
    """Frontier and power law per structure; marks frontier rows in place."""
    frontiers: dict[str, list[tuple[float, float]]] = {}
    fits: dict[str, PowerLaw | None] = {}
    for label in dict.fromkeys(r["structure"] for r in rows):
        mine = [r for r in rows if r["structure"] == label]
        front = pareto_frontier((r["compute"], r["val_loss"]) for r in mine)
        frontiers[label] = front
        on = set(front)
        for r in mine:
            r["frontier"] = int((float(r["compute"]), float(r["val_loss"])) in on)
        try:
            fits[label] = fit_power_law(front, offset="fit" if offset == "fit" else None)
        except FitError as e:
            log.warning("%s: %s", label, e)
            fits[label] = None
    return frontiers, fits


def common_compute(frontiers: dict[str, list[tuple[float, float]]]) -> float | None:
    """The geometric middle of the compute range every frontier covers (None if they do not overlap)."""
    lo = max(f[0][0] for f in frontiers.values() if f)
    hi = min(f[-1][0] for f in frontiers.values() if f)
    return math.sqrt(lo * hi) if lo < hi else None


def dense_multiplier(label: str, frontiers: dict[str, list[tuple[float, float]]],
                     fits: dict[str, PowerLaw | None]) -> float | None:
    """Geometric mean over the frontier points inside dense's loss range of (dense compute for that loss) / compute.

    Above 1: the structure reaches those losses with less compute than dense (the paper's Fig. 6 multiplier).
    """
    dense, front = fits.get("dense"), frontiers.get(label, [])
    dense_front = frontiers.get("dense", [])
    if dense is None or not dense_front or label == "dense":
        return None
    lo, hi = dense_front[-1][1], dense_front[0][1]
    inside = [p for p in front if lo <= p[1] <= hi]  # no extrapolation of the dense law
    if not inside:
        return None
    ratios = compute_multiplier(dense, inside)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def write_outputs(out: Path, rows: list[dict[str, Any]], frontiers: dict[str, list[tuple[float, float]]],
                  fits: dict[str, PowerLaw | None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["structure", "width", "params", "macs_per_token", "step", "tokens",
                                               "compute", "val_loss", "frontier"])
        writer.writeheader()
        writer.writerows(rows)
    c_star = common_compute(frontiers)
    with open(out / "fits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["structure", "a", "b", "c", "r2", "n_frontier", "common_compute", "fitted_loss_at_common",
                         "multiplier_vs_dense"])
        for label, law in fits.items():
            at = float(law(c_star)) if law is not None and c_star is not None else ""
            writer.writerow([label, *(("", "", "", "") if law is None else (law.a, law.b, law.c, law.r2)),
                             len(frontiers[label]), c_star or "", at, dense_multiplier(label, frontiers, fits) or ""])
    plot(out / "scaling_laws.png", rows, frontiers, fits)


def plot(path: Path, rows: list[dict[str, Any]], frontiers: dict[str, list[tuple[float, float]]],
         fits: dict[str, PowerLaw | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (label, front) in enumerate(frontiers.items()):
        color = f"C{i}"
        pts = [(r["compute"], r["val_loss"]) for r in rows if r["structure"] == label]
        ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.25, color=color)
        if front:
            ax.plot(*zip(*front, strict=True), "o-", ms=3, lw=1.2, color=color, label=label)
        law = fits.get(label)
        if law is not None and front:
            grid = np.geomspace(front[0][0], front[-1][0], 50)
            ax.plot(grid, law(grid), "--", lw=1, color=color, label=f"  {law.describe()}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.set_xlabel("training compute (FLOPs = 6 × active MACs/token × tokens)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Compute-optimal frontiers: stdlib characters, small GPT")
    ax.legend(fontsize=6.5, loc="upper right")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)  # tiny models: more threads only contend
    if args.jobs is None:
        args.jobs = 1 if args.quick else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    rows = run_sweep(args)
    if args.estimate:
        return 0
    if not rows:
        print("no run finished; nothing to fit", file=sys.stderr)
        return 1
    frontiers, fits = analyse(rows, args.offset)
    out = Path(args.out)
    write_outputs(out, rows, frontiers, fits)
    c_star = common_compute(frontiers)
    print("\npower laws on each frontier:")
    for label, law in fits.items():
        mult = dense_multiplier(label, frontiers, fits)
        extra = f"  compute multiplier vs dense {mult:.2f}x" if mult else ""
        print(f"  {label:45s} {law.describe() if law else 'no fit (too few frontier points)'}{extra}")
    if c_star is not None:
        ranked = sorted((float(law(c_star)), label) for label, law in fits.items() if law is not None)
        print(f"\nordering at C = {c_star:.3g} FLOPs (fitted loss, best first):")
        for loss, label in ranked:
            print(f"  {loss:.4f}  {label}")
    print(f"\nwrote {out / 'points.csv'}, {out / 'fits.csv'}, {out / 'scaling_laws.png'} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
