"""Example inputs: what a model is run, traced and exported with, as positional and keyword arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import ConfigError

__all__ = ["Inputs", "default_example_inputs", "split_inputs"]


class Inputs(NamedTuple):
    """Example inputs split into positional and keyword arguments (also accepted as ``example_inputs``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def split_inputs(example_inputs: Any) -> Inputs | None:
    """``None`` | a tensor | a tuple/list of positional inputs | a dict of keyword inputs -> (args, kwargs)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return Inputs(tuple(example_inputs), {})
    raise ConfigError(
        f"example_inputs: expected a tensor, a tuple of positional inputs or a dict of keyword inputs, got "
        f"{type(example_inputs).__name__}"
    )


def default_example_inputs(model: nn.Module, *, batch: int = 2, seq: int = 8) -> Inputs | None:
    """Dummy inputs for a Hugging Face model from its config (``input_ids`` or ``pixel_values``), else None.

    Examples:
        >>> default_example_inputs(torch.nn.Linear(2, 2)) is None
        True
    """
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if config is None or name is None:
        return None
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs: dict[str, Any]
    if name == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 2)
        kwargs = {"input_ids": torch.randint(0, min(vocab, 1000), (batch, seq), generator=generator).to(device)}
        if hasattr(config, "use_cache"):
            kwargs["use_cache"] = False
    elif name == "pixel_values":
        size = getattr(config, "image_size", 32)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        channels = int(getattr(config, "num_channels", 3))
        kwargs = {"pixel_values": torch.randn(batch, channels, h, w, generator=generator).to(device, dtype)}
    else:
        return None
    return Inputs((), kwargs)
