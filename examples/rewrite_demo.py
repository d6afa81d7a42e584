"""`make demo`: einrewrite's main job end to end on a built-in tiny GPT (examples/tiny_gpt.py).

1. inspect the model: its linear layers and what each structure would cost at the budget;
2. rewrite it to BTT at 25% of each linear layer's FLOPs, projecting the dense weights;
3. print the report; 4. save it; 5. reload it and check the reloaded outputs equal the rewritten ones;
6. generate a few tokens with the rewritten model.

The same from the shell::

    einrewrite inspect examples.tiny_gpt:build
    einrewrite rewrite examples.tiny_gpt:build --structure btt --budget 0.25 -o out/tiny_gpt_btt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import einrewrite as er  # noqa: E402
from examples.tiny_gpt import build  # noqa: E402

FACTORY = "examples.tiny_gpt:build"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit status (0 when the reloaded model matches)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: a temporary directory)")
    parser.add_argument("--budget", type=float, default=0.25, help="MACs of each layer as a fraction of dense")
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
        print(f"reloaded outputs equal the rewritten ones: {same} (max |diff| {float((expected - got).abs().max()):.3g})")

    print("\n== 6. generate with the rewritten model ==")
    prompt = example_inputs[0][:1, :4]
    print("tokens:", rewritten.generate(prompt, max_new_tokens=8)[0].tolist())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
