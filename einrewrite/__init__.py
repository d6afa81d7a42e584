"""einrewrite: rewrite the dense linear layers of a PyTorch model into structured einsum layers.

The structure space and its taxonomy come from arXiv 2410.02117 (Potapczynski et al., NeurIPS 2024).
"""

from __future__ import annotations

from .errors import (
    BudgetInfeasibleError,
    EinrewriteError,
    ExportError,
    InvalidThetaError,
    NoTargetsError,
    PaddingError,
    SavedModelError,
    StructureMismatchError,
    TraceError,
)
from .export import ExportReport, export_onnx, export_saved
from .api import (
    Inspection,
    LoadedModel,
    ModelSourceError,
    default_example_inputs,
    inspect_model,
    load_base_model,
    load_model,
    load_pretrained,
    rewrite,
    save_pretrained,
)
from .budget import LayerChoice, LayerRequest, candidate_specs, solve, solve_layer
from .config import ConfigError, FlopBudget, LayerOverride, RewriteConfig
from .init import mup_std, param_groups, project_weight
from .passes import DEFAULT_PIPELINE, BypassedLayerError, VerificationError
from .report import Decision, RewriteReport
from .layers import EinsumLinear
from .moe import BTTMoELinear, moe_aux_loss
from .spec import EinsumSpec, Sizes, factorize
from .structures import STRUCTURES, BTTMoE, register_structure, structure
from .theta import Theta, parse_theta
from .data import load_corpus
from .gpt import GPT, GPTConfig, build_gpt
from .train import TrainConfig, TrainResult, train
from .search import SearchResult, search

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PIPELINE",
    "BypassedLayerError",
    "ConfigError",
    "Decision",
    "FlopBudget",
    "Inspection",
    "LayerChoice",
    "LayerOverride",
    "LayerRequest",
    "LoadedModel",
    "ModelSourceError",
    "RewriteConfig",
    "RewriteReport",
    "VerificationError",
    "candidate_specs",
    "default_example_inputs",
    "inspect_model",
    "load_base_model",
    "load_model",
    "load_pretrained",
    "rewrite",
    "save_pretrained",
    "solve",
    "solve_layer",
    "STRUCTURES",
    "BTTMoE",
    "BTTMoELinear",
    "BudgetInfeasibleError",
    "EinrewriteError",
    "EinsumLinear",
    "EinsumSpec",
    "ExportReport",
    "ExportError",
    "InvalidThetaError",
    "NoTargetsError",
    "PaddingError",
    "SavedModelError",
    "Sizes",
    "StructureMismatchError",
    "Theta",
    "TraceError",
    "__version__",
    "export_onnx",
    "export_saved",
    "factorize",
    "moe_aux_loss",
    "mup_std",
    "param_groups",
    "parse_theta",
    "project_weight",
    "register_structure",
    "structure",
    "GPT",
    "GPTConfig",
    "SearchResult",
    "TrainConfig",
    "TrainResult",
    "build_gpt",
    "load_corpus",
    "search",
    "train",
]
