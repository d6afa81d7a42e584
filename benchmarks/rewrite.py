"""How long einrewrite's main job takes: inspect, rewrite with projection, save (issue 4 §7).

Models are GPT-2-shaped (Hugging Face ``GPT2LMHeadModel``, random init, built offline): the GPT-2-small shape
(12 layers, d=768, vocab 50257) and a d=2048 variant. Target: under 60 s for the GPT-2-small shape on 2 cores.
Each phase is timed once per repeat and the best repeat is reported (the machine is shared; single runs vary).

    .venv/bin/python benchmarks/rewrite.py                 # d=768 and d=2048, 12 layers
    .venv/bin/python benchmarks/rewrite.py --sizes 768 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import einrewrite as er  # noqa: E402
from einrewrite.tables import format_table  # noqa: E402


def build(d: int, layers: int, vocab: int) -> torch.nn.Module:
    """A randomly initialised GPT-2 of width ``d`` (head size 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=d, n_head=d // 64, vocab_size=vocab, n_positions=1024)
    return GPT2LMHeadModel(config).eval()


def run_once(d: int, layers: int, vocab: int, config: er.RewriteConfig, inplace: bool) -> dict[str, float]:
    """Seconds per phase for one model: build (not counted), inspect, rewrite, save, and the total."""
    model = build(d, layers, vocab)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    er.inspect_model(model, config)
    times["inspect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    new, report = er.rewrite(model, config, inplace=inplace, progress=False)
    times["rewrite"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        er.save_pretrained(new, Path(tmp) / "out", report)
        times["save"] = time.perf_counter() - t0
    times["total"] = times["inspect"] + times["rewrite"] + times["save"]
    totals = report.totals()
    times["replaced"] = totals["replaced"]
    times["macs_ratio"] = totals["replaced_macs_after"] / totals["replaced_macs_before"]
    times["params_m"] = report.model_params_before / 1e6
    del model, new, report
    gc.collect()
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="768,2048", help="comma-separated model widths")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--structure", default="btt")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target is 2 cores)")
    parser.add_argument("--inplace-above", type=int, default=1024,
                        help="rewrite in place for widths above this (saves a full copy of a large model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = er.RewriteConfig(structure=args.structure, budget=er.FlopBudget(ratio=args.budget))
    rows = []
    for d in (int(s) for s in args.sizes.split(",")):
        inplace = d > args.inplace_above
        runs = [run_once(d, args.layers, args.vocab, config, inplace) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["total"])
        rows.append((
            f"gpt2 {args.layers}x{d}", f"{best['params_m']:.0f}M", f"{best['inspect']:.2f}", f"{best['rewrite']:.2f}",
            f"{best['save']:.2f}", f"{best['total']:.2f}", f"{best['replaced']:.0f}", f"{best['macs_ratio']:.1%}",
            "in place" if inplace else "copy",
        ))
        print(f"done d={d}: total {best['total']:.2f}s", file=sys.stderr)
    header = ("model", "params", "inspect s", "rewrite s", "save s", "total s", "replaced", "MACs after", "input")
    print(f"{args.structure} at {args.budget:.0%} of each layer's MACs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(format_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
