"""Real English text every machine has, and fixed-shape token batches for calibration.

Sentences come from the docstrings of the Python standard library's source
(parsed with ``ast``, nothing imported). Files are split by a stable hash of
their path into a calibration part and a held-out part, so no held-out file is
read for calibration (a stock sentence that recurs in files of both parts, such
as "Get the watcher for child processes.", is in both: 86 of 2,070 held-out
sentences on Python 3.11).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test"}
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


def _docstrings(path: Path) -> Iterable[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _in_split(path: Path, split: str, heldout_share: float) -> bool:
    bucket = int(hashlib.sha1(path.as_posix().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return (bucket < heldout_share) == (split == "heldout")


def _stdlib_files(root: Path) -> Iterator[Path]:
    """The stdlib's top-level modules, then each package's modules, sorted; a package is walked only when the
    caller asks past the files before it (site-packages never)."""
    yield from sorted(root.glob("*.py"))
    for package in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _SKIPPED_DIRS):
        yield from sorted(p for p in package.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts))


def stdlib_sentences(
    split: Literal["calibration", "heldout"], limit: int, min_words: int = 6, max_words: int = 40, heldout_share: float = 0.3
) -> list[str]:
    """Up to ``limit`` distinct plain-prose sentences from stdlib docstrings, in a stable order: the top-level
    modules first, then the packages (tests and site-packages left out), so asking for more sentences only
    appends to a shorter answer."""
    seen: set[str] = set()
    out: list[str] = []
    for path in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        if not _in_split(path, split, heldout_share):
            continue
        for doc in _docstrings(path):
            for sentence in _SENTENCE_END.split(" ".join(doc.split())):
                words = sentence.split()
                if min_words <= len(words) <= max_words and _PLAIN.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) >= limit:
                        return out
    return out


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file (one sample per line)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def token_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` into batches of exactly ``[batch_size, seq_len]`` (padded, truncated).

    Fixed shapes let every batch run through a graph captured with static shapes;
    a trailing partial batch is dropped.
    """
    batches = []
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        batches.append(dict(encoded))
    return batches


def packed_token_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, seq_len: int,
                         count: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``count`` batches ``[batch_size, seq_len]`` cut from ``texts`` joined by newlines into one
    token stream: no padding, every position a real next-token target (for causal LMs)."""
    ids = tokenizer("\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    size = batch_size * seq_len
    batches = [ids[i * size:(i + 1) * size].reshape(batch_size, seq_len) for i in range(min(count, len(ids) // size))]
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]
