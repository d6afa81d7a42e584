"""Graph passes over torch.fx GraphModules (installed as ``einrewrite.passes``)."""

from __future__ import annotations

__all__: list[str] = []
