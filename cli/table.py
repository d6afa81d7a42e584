"""Plain-text tables (the implementation lives in the core, which reports also use)."""

from __future__ import annotations

from einrewrite.tables import format_table

__all__ = ["format_table"]
