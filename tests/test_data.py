"""The offline stdlib corpus: fixed split, reproducible batches, vocabularies, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from einrewrite.data import DataError, Vocab, load_corpus, stdlib_files


@pytest.fixture(scope="module")
def corpus():  # type: ignore[no-untyped-def]
    return load_corpus(max_bytes=300_000)


def _tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "test").mkdir()  # left out
    for i in range(30):
        (root / f"mod{i:02d}.py").write_text(f'"""Module {i}."""\n' + f"x_{i} = {i}  # é\n" * 400)
    (root / "pkg" / "a.py").write_text('"""A package module."""\ndef f():\n    """Return one."""\n    return 1\n' * 50)
    (root / "test" / "skip.py").write_text("SKIPPED = True\n" * 100)


def test_split_is_fixed_and_deterministic(corpus) -> None:  # type: ignore[no-untyped-def]
    again = load_corpus(max_bytes=300_000)
    assert again.fingerprint == corpus.fingerprint
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert 0.01 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.2
    # a larger corpus keeps the chunks of the files both read on the same side: the val split only grows
    bigger = load_corpus(max_bytes=600_000)
    assert len(bigger.val) >= len(corpus.val)
    assert bigger.files[: len(corpus.files)] == corpus.files


def test_split_does_not_depend_on_which_files_come_later(tmp_path: Path) -> None:
    _tree(tmp_path)
    full = load_corpus(root=str(tmp_path), max_bytes=10**7, val_fraction=0.2)
    assert "test/skip.py" not in full.files and "pkg/a.py" in full.files
    assert list(stdlib_files(str(tmp_path)))[:2] == ["mod00.py", "mod01.py"]
    text = full.vocab.decode(full.train) + full.vocab.decode(full.val)
    assert "SKIPPED" not in text and "é" in text
    assert load_corpus(root=str(tmp_path), max_bytes=10**7, val_fraction=0.2).fingerprint == full.fingerprint


def test_batches_are_reproducible_shifted_windows(corpus) -> None:  # type: ignore[no-untyped-def]
    x1, y1 = corpus.batch("train", 4, 32, torch.Generator().manual_seed(3))
    x2, y2 = corpus.batch("train", 4, 32, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    evals = corpus.eval_batches("val", 3, 2, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals, corpus.eval_batches("val", 3, 2, 16), strict=True))


def test_vocabularies_round_trip() -> None:
    char = load_corpus(max_bytes=100_000, vocab="char")
    assert char.vocab.kind == "char" and char.vocab.size < 256
    assert char.vocab.decode(char.val[:200]) == char.vocab.decode(char.vocab.encode(char.vocab.decode(char.val[:200])))
    byte = Vocab("byte")
    assert byte.size == 256 and byte.decode(byte.encode("naïve ∑")) == "naïve ∑"
    with pytest.raises(DataError, match="not in this char vocabulary.*kind='byte'"):
        Vocab("char", ("a", "b")).encode("abc")


def test_docstring_source_is_prose(tmp_path: Path) -> None:
    _tree(tmp_path)
    docs = load_corpus(root=str(tmp_path), source="docstrings", max_bytes=10**7, val_fraction=0.3)
    text = docs.vocab.decode(docs.train) + docs.vocab.decode(docs.val)
    assert "Return one." in text and "x_1 =" not in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab": "word"}, "vocab must be 'byte' or 'char'"),
        ({"source": "web"}, "source must be 'code' or 'docstrings'"),
        ({"max_bytes": 10}, "max_bytes must be >= 10,000"),
        ({"val_fraction": 0.9}, r"val_fraction must be in \(0, 0.5\)"),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_corpus(**kwargs)  # type: ignore[arg-type]


def test_too_short_split_and_too_little_text(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="too few for windows.*lower block_size"):
        corpus.batch("val", 1, len(corpus.val), torch.Generator())
    with pytest.raises(DataError, match="split must be 'train' or 'val'"):
        corpus.split("test")  # type: ignore[arg-type]
    (tmp_path / "tiny.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="too little text"):
        load_corpus(root=str(tmp_path))
