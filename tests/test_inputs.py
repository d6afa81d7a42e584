"""Example inputs (einrewrite.inputs): the forms a caller may give, and the dummies made from a model's config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from einrewrite.config import ConfigError
from einrewrite.inputs import Inputs, default_example_inputs, split_inputs

import models  # type: ignore[import-not-found]  # tests/models.py


def test_every_accepted_form_splits_into_positional_and_keyword_inputs() -> None:
    ids, mask = torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8)
    assert split_inputs(None) is None
    assert split_inputs(ids) == Inputs((ids,), {})
    assert split_inputs((ids, mask)) == Inputs((ids, mask), {})
    assert split_inputs([ids, mask]) == Inputs((ids, mask), {})
    assert split_inputs({"input_ids": ids}) == Inputs((), {"input_ids": ids})
    given = Inputs((ids,), {"attention_mask": mask})
    assert split_inputs(given) is given


def test_a_mapping_that_is_not_a_dict_gives_keyword_inputs() -> None:
    """A tokenizer's output (transformers' BatchEncoding) is a UserDict, not a dict."""
    from collections import UserDict

    ids = torch.ones(2, 8, dtype=torch.long)
    inputs = split_inputs(UserDict(input_ids=ids))
    assert inputs is not None and inputs.args == ()
    assert type(inputs.kwargs) is dict and inputs.kwargs["input_ids"] is ids


def test_any_other_form_is_a_config_error_naming_the_forms_allowed() -> None:
    with pytest.raises(ConfigError, match=r"expected a tensor, a tuple of positional inputs or a dict .* got str"):
        split_inputs("input_ids")


def test_dummies_come_from_a_hugging_face_config_and_turn_the_kv_cache_off() -> None:
    llama = default_example_inputs(models.tiny_llama(), batch=3, seq=5)
    assert llama is not None and llama.args == ()
    assert llama.kwargs["input_ids"].shape == (3, 5) and llama.kwargs["use_cache"] is False
    assert int(llama.kwargs["input_ids"].max()) < 128  # inside the vocabulary
    vit = default_example_inputs(models.tiny_vit(), batch=2)
    assert vit is not None and set(vit.kwargs) == {"pixel_values"} and vit.kwargs["pixel_values"].shape[0] == 2
    assert default_example_inputs(nn.Linear(4, 4)) is None  # no config: none to make
