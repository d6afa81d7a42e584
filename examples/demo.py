"""`make demo`: the main job of einrewrite on a built-in default.

Today: one 1024x1024 layer rewritten into every registered structure (examples/structures_demo.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structures_demo  # noqa: E402


def main() -> None:
    print("== einrewrite demo: one dense layer in every structure ==")
    structures_demo.main([])


if __name__ == "__main__":
    main()
