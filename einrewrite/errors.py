"""The einrewrite error hierarchy.

Every error a user can cause is an :class:`EinrewriteError`. Each subclass also inherits the builtin a caller
would naturally catch (``ValueError`` for bad input, ``RuntimeError`` for a failure of tracing or export), so
``except ValueError`` keeps working. Messages say where (the layer's FQN when known), what was given, what is
allowed and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BudgetInfeasibleError",
    "EinrewriteError",
    "ExportError",
    "InvalidThetaError",
    "NoTargetsError",
    "PaddingError",
    "SavedModelError",
    "StructureMismatchError",
    "TraceError",
]


class EinrewriteError(Exception):
    """Base class of every error einrewrite raises on purpose."""


class InvalidThetaError(EinrewriteError, ValueError):
    """A θ vector breaks one of the rules of the einsum structure space."""


class PaddingError(EinrewriteError, ValueError):
    """A structure's integer axis sizes would pad a layer by more than the tolerance."""


class StructureMismatchError(EinrewriteError, ValueError):
    """A structure or its hyper-parameters do not fit the layer they are applied to."""


class BudgetInfeasibleError(EinrewriteError, ValueError):
    """No hyper-parameters of the structure meet the FLOP budget for some layer."""


class NoTargetsError(EinrewriteError, ValueError):
    """The targeting rules matched no layer of the model."""


class SavedModelError(EinrewriteError, ValueError):
    """A saved einrewrite directory is missing, partial or corrupt."""


class TraceError(EinrewriteError, RuntimeError):
    """The model could not be captured as a graph."""


class ExportError(EinrewriteError, RuntimeError):
    """ONNX export failed or the exported model does not match PyTorch."""
