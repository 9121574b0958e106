"""The built-in corpus: Python's own help texts, so a demo run needs no download.

``pydoc_data.topics.topics`` (the text behind ``help("if")`` etc.) ships with CPython: 79
documents, ~465K characters of English prose and code on Python 3.11. Its content changes
between Python versions, so the corpus name carries the version (``builtin_source()``) and a
cached dataset built by another Python is rebuilt.
"""

from __future__ import annotations

import platform

__all__ = ["BUILTIN_CORPUS", "builtin_documents", "builtin_source"]

BUILTIN_CORPUS = "pydoc_data"


def builtin_documents() -> list[str]:
    """The topics' texts in sorted-key order (a fixed order: dict order is not promised)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ImportError("the built-in corpus needs the standard library's pydoc_data module, "
                          "which this Python lacks; pass input files instead") from None
    return [topics[key] for key in sorted(topics)]


def builtin_source() -> str:
    """How the built-in corpus is named in a dataset's meta.json ``sources``."""
    return f"{BUILTIN_CORPUS} (Python {platform.python_version()})"
