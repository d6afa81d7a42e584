"""`make demo`: the main job of einrewrite on a built-in default.

1. One 1024x1024 layer rewritten into every registered structure (examples/structures_demo.py).
2. A built-in small GPT (examples/tiny_gpt.py): inspect, rewrite to BTT at 25% of the linear-layer FLOPs, the
   report, save, reload and check the reloaded outputs equal the rewritten ones, then export the rewritten
   and the dense model to ONNX and run both in ONNX Runtime: parity and speed (examples/rewrite_demo.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rewrite_demo  # noqa: E402
import structures_demo  # noqa: E402


def main() -> int:
    print("== einrewrite demo, part 1: one dense layer in every structure ==")
    structures_demo.main([])
    print("\n== einrewrite demo, part 2: rewrite a small GPT ==")
    return rewrite_demo.main([])


if __name__ == "__main__":
    sys.exit(main())
