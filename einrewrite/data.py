"""An offline character-level corpus: the Python standard library's own sources (or their docstrings).

Every machine with Python has this text, so language-model training needs no download. The corpus is read in
a fixed order (top-level modules sorted by name, then packages, tests and site-packages left out) up to a byte
cap, split into train and validation by 4,096-character chunks with a hash of (file path, chunk index), stable
across runs and machines with the same Python, and encoded with a byte vocabulary (256 symbols) or a character
vocabulary (the characters that occur, sorted).

Batches are random contiguous windows drawn with an explicit ``torch.Generator``, so a run is reproducible and
every process of a distributed run can draw the same global batch.

Examples:
    >>> corpus = load_corpus(max_bytes=200_000)
    >>> x, y = corpus.batch("train", 4, 32, torch.Generator().manual_seed(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 32]), True)
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .errors import EinrewriteError

__all__ = ["Corpus", "DataError", "Vocab", "load_corpus", "stdlib_files"]

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib"})
_HASH_SPACE = 2**32
_CHUNK = 4096  # characters per split unit
_DOC_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class DataError(EinrewriteError, ValueError):
    """A corpus or batch request is invalid (the message says what was given, what is allowed and the fix)."""


@dataclass(frozen=True)
class Vocab:
    """A byte vocabulary (``kind="byte"``, 256 symbols) or a character vocabulary (``kind="char"``).

    Attributes:
        kind: ``"byte"`` or ``"char"``.
        chars: the characters of a char vocabulary, in index order (empty for bytes).
    """

    kind: Literal["byte", "char"]
    chars: tuple[str, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("byte", "char"):
            raise DataError(f"Vocab.kind must be 'byte' or 'char', got {self.kind!r}")
        if self.kind == "char":
            if not self.chars:
                raise DataError("a char vocabulary needs at least one character")
            self._index.update({c: i for i, c in enumerate(self.chars)})

    @property
    def size(self) -> int:
        """Number of token ids (256 for bytes)."""
        return 256 if self.kind == "byte" else len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Token ids (int64) of ``text``.

        Raises:
            DataError: a character is not in a char vocabulary.
        """
        if self.kind == "byte":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise DataError(
                f"character {e.args[0]!r} is not in this char vocabulary of {self.size} symbols; use the byte "
                "vocabulary (kind='byte') for arbitrary text"
            ) from None

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 byte sequences are replaced)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.kind == "byte":
            return bytes(int(v) for v in values).decode("utf-8", errors="replace")
        return "".join(self.chars[int(v)] for v in values)


@dataclass(frozen=True)
class Corpus:
    """Encoded train and validation token streams with their vocabulary.

    Attributes:
        train: 1-D int tensor of training token ids.
        val: 1-D int tensor of validation token ids.
        vocab: the vocabulary.
        files: the files read (relative to the stdlib), in order.
        fingerprint: SHA-256 of the text, to tell two corpora apart.
    """

    train: Tensor
    val: Tensor
    vocab: Vocab
    files: tuple[str, ...]
    fingerprint: str

    def split(self, name: Split) -> Tensor:
        """The token stream of split ``"train"`` or ``"val"``."""
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise DataError(f"split must be 'train' or 'val', got {name!r}")

    def batch(
        self, split: Split, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random contiguous windows: inputs ``x`` and next-token targets ``y``, both (batch_size, block_size).

        Raises:
            DataError: the split is shorter than one window, or a size is not positive.
        """
        data = self.split(split)
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if len(data) <= block_size + 1:
            raise DataError(
                f"the {split} split has {len(data):,} tokens, too few for windows of {block_size + 1}; "
                "raise max_bytes or lower block_size"
            )
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=generator)  # (B,)
        offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
        window = data[offsets].long()  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def eval_batches(
        self, split: Split, n_batches: int, batch_size: int, block_size: int, *, seed: int = 1234
    ) -> list[tuple[Tensor, Tensor]]:
        """A fixed list of batches (the same on every call with the same arguments), for comparable evaluations."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(split, batch_size, block_size, generator) for _ in range(n_batches)]

    def describe(self) -> str:
        """One line: sizes, vocabulary and fingerprint."""
        return (
            f"stdlib corpus: {len(self.train):,} train / {len(self.val):,} val tokens "
            f"from {len(self.files)} files, {self.vocab.kind} vocab of "
            f"{self.vocab.size}, sha256 {self.fingerprint[:12]}"
        )


def stdlib_files(root: str | None = None) -> Iterator[str]:
    """Paths (relative to the stdlib) of its ``.py`` files in corpus order.

    Top-level modules come first, sorted by name, then each package's files, walked in sorted order; tests,
    IDLE, caches and site-packages are left out.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    yield from (e.name for e in entries if e.is_file() and e.name.endswith(".py"))
    for entry in entries:
        if not entry.is_dir() or entry.name in _SKIP_DIRS or entry.name.startswith("."):
            continue
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, name), root)


def _docstrings(source: str) -> str:
    """The module, class and function docstrings of ``source``, separated by blank lines ('' if unparsable)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:  # only bodies of modules, classes and functions: far cheaper than ast.walk over expressions
        node = stack.pop()
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            docs.append(doc)
        body = getattr(node, "body", [])
        stack.extend(reversed([n for n in body if isinstance(n, _DOC_NODES)]))
    return "\n\n".join(docs)


def _is_val(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") < val_fraction * _HASH_SPACE


def load_corpus(
    *,
    vocab: Literal["byte", "char"] = "byte",
    source: Literal["code", "docstrings"] = "code",
    max_bytes: int = 4_000_000,
    val_fraction: float = 0.05,
    root: str | None = None,
) -> Corpus:
    """Read the standard library's text and encode it, split by chunk into train and validation.

    Args:
        vocab: ``"byte"`` (256 ids, any text) or ``"char"`` (the characters that occur, sorted).
        source: ``"code"`` (whole ``.py`` files) or ``"docstrings"`` (module/class/function docstrings only,
            mostly English prose; needs parsing, so a larger share of the stdlib is read).
        max_bytes: stop reading once this many bytes of text are collected (keeps loading under 2 s).
        val_fraction: the share of 4,096-character chunks (by a hash of path and index) that go to validation.
        root: the directory to read (default: this interpreter's stdlib, ``sysconfig.get_paths()["stdlib"]``).

    Raises:
        DataError: bad arguments, or no text found.

    Examples:
        >>> load_corpus(max_bytes=100_000, vocab="char").vocab.kind
        'char'
    """
    if vocab not in ("byte", "char"):
        raise DataError(f"vocab must be 'byte' or 'char', got {vocab!r}")
    if source not in ("code", "docstrings"):
        raise DataError(f"source must be 'code' or 'docstrings', got {source!r}")
    if max_bytes < 10_000:
        raise DataError(f"max_bytes must be >= 10,000 to hold a validation split, got {max_bytes:,}")
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    base = root or sysconfig.get_paths()["stdlib"]
    parts: dict[bool, list[str]] = {False: [], True: []}
    files: list[str] = []
    total = 0
    for rel in stdlib_files(base):
        try:
            with open(os.path.join(base, rel), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib fixtures are not UTF-8; the corpus does not need them
        if source == "docstrings":
            text = _docstrings(text)
        if not text.strip():
            continue
        text += "\n"
        files.append(rel)
        key = rel.replace(os.sep, "/")
        for i in range(0, len(text), _CHUNK):  # split unit: a chunk of a file, by a hash of (path, index)
            parts[_is_val(f"{key}:{i // _CHUNK}", val_fraction)].append(text[i : i + _CHUNK])
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not parts[False] or not parts[True]:
        raise DataError(
            f"found too little text under {base!r} ({total:,} bytes in {len(files)} files) for both splits; "
            "point root at a directory of .py files or raise max_bytes"
        )
    train_text = "".join(parts[False])
    val_text = "".join(parts[True])
    if vocab == "byte":
        voc = Vocab("byte")
        train = torch.frombuffer(bytearray(train_text.encode("utf-8")), dtype=torch.uint8)  # (N,)
        val = torch.frombuffer(bytearray(val_text.encode("utf-8")), dtype=torch.uint8)  # (M,)
    else:
        voc = Vocab("char", tuple(sorted(set(train_text) | set(val_text))))
        dtype = torch.uint8 if voc.size <= 256 else torch.int32
        train, val = voc.encode(train_text).to(dtype), voc.encode(val_text).to(dtype)
    fingerprint = hashlib.sha256((train_text + "\x00" + val_text).encode("utf-8")).hexdigest()
    corpus = Corpus(train, val, voc, tuple(files), fingerprint)
    logger.info("%s", corpus.describe())
    return corpus
