"""`make demo`: einrewrite's main job end to end on a built-in tiny GPT (examples/tiny_gpt.py).

1. inspect the model: its linear layers and what each structure would cost at the budget;
2. rewrite it to BTT at 25% of each linear layer's FLOPs, projecting the dense weights;
3. print the report; 4. save it; 5. reload it and check the reloaded outputs equal the rewritten ones;
6. generate a few tokens with the rewritten model;
7. export the rewritten and the dense model to ONNX, run both in ONNX Runtime: parity and speed.

The same from the shell::

    einrewrite inspect examples.tiny_gpt:build
    einrewrite rewrite examples.tiny_gpt:build --structure btt --budget 0.25 -o out/tiny_gpt_btt
    einrewrite export out/tiny_gpt_btt -o out/tiny_gpt_btt.onnx
    einrewrite bench out/tiny_gpt_btt --tokens 1,512,2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import einrewrite as er  # noqa: E402
from einrewrite.bench import max_sequence_length, resize_inputs, time_interleaved  # noqa: E402
from einrewrite.export import onnxruntime_session  # noqa: E402
from examples.tiny_gpt import build  # noqa: E402

FACTORY = "examples.tiny_gpt:build"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit status (0 when the reloaded model matches)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: a temporary directory)")
    parser.add_argument("--budget", type=float, default=0.25, help="MACs of each layer as a fraction of dense")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per ONNX Runtime call in step 7")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds in step 7")
    args = parser.parse_args(argv)

    model, example_inputs = build()
    config = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=args.budget))

    print("== 1. inspect: the linear layers and what each structure costs at the budget ==")
    print(er.inspect_model(model, config, example_inputs).table())

    print(f"\n== 2-3. rewrite to BTT at {args.budget:.0%} of each layer's MACs; the report ==")
    rewritten, report = er.rewrite(model, config, example_inputs)
    print(report.table())

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "tiny_gpt_btt"
        print(f"\n== 4. save to {out} ==")
        er.save_pretrained(rewritten, out, report, factory=FACTORY, overwrite=args.out is not None)
        print("files:", ", ".join(sorted(p.name for p in out.iterdir())))

        print("\n== 5. reload (the factory rebuilds the base model) and compare outputs ==")
        reloaded = er.load_pretrained(out)
        with torch.no_grad():
            expected = rewritten(*example_inputs)
            got = reloaded(*example_inputs)
        same = torch.equal(expected, got)
        print(
            f"reloaded outputs equal the rewritten ones: {same} (max |diff| {float((expected - got).abs().max()):.3g})"
        )

    print("\n== 6. generate with the rewritten model ==")
    prompt = example_inputs[0][:1, :4]
    print("tokens:", rewritten.generate(prompt, max_new_tokens=8)[0].tolist())

    print(f"\n== 7. ONNX: export both models, run them in ONNX Runtime ({args.tokens} tokens) ==")
    faithful = onnx_step(model, rewritten, example_inputs, tokens=args.tokens, repeats=args.repeats)
    return 0 if same and faithful else 1


def onnx_step(dense: nn.Module, rewritten: nn.Module, example_inputs: tuple[Any, ...], *, tokens: int,
              repeats: int) -> bool:
    """Export both models (MatMul chains, dynamic shapes, ORT parity), then time them side by side in ORT."""
    with tempfile.TemporaryDirectory() as tmp:
        reports = {}
        for name, m in (("dense", dense), ("btt", rewritten)):
            reports[name] = er.export_onnx(m, example_inputs, Path(tmp) / f"{name}.onnx")  # checks ORT parity
            r = reports[name]
            print(f"{name:5s} exported: {sum(r.op_counts.values())} nodes, {r.op_counts.get('MatMul', 0)} MatMul, "
                  f"{len(r.einsum_nodes)} Einsum; ORT vs PyTorch max |diff| {r.max_abs_diff:.2g}")
        args, kwargs = resize_inputs(example_inputs, {}, tokens, max_seq=max_sequence_length(dense))
        feed = args[0].numpy()  # another shape than the export's: batch and sequence are dynamic
        sessions = {name: onnxruntime_session(r.path, "cpu", threads=torch.get_num_threads(), stop_spinning=True,
                                              flush_denormals=True)  # timed in turn; see einrewrite.denormals
                    for name, r in reports.items()}
        outputs = {name: s.run(None, {s.get_inputs()[0].name: feed})[0] for name, s in sessions.items()}
        with torch.no_grad():
            expected = rewritten(*args, **kwargs)
        diff = float((torch.from_numpy(outputs["btt"]) - expected).abs().max())
        print(f"btt in ORT at {tuple(feed.shape)} vs PyTorch: max |diff| {diff:.2g}")
        fns = {f"{name} ORT": (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}
        best = time_interleaved(fns, repeats=repeats)
    dense_ms, btt_ms = best["dense ORT"] * 1e3, best["btt ORT"] * 1e3
    print(f"ONNX Runtime CPU, best of {repeats}: dense {dense_ms:.2f} ms, btt {btt_ms:.2f} ms -> "
          f"{dense_ms / btt_ms:.2f}x vs the dense export (a tiny model: per-op overheads weigh more than FLOPs)")
    return diff < 1e-3


if __name__ == "__main__":
    sys.exit(main())
