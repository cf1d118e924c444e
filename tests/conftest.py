"""Shared fixtures: a tiny random-initialised Llama built at test time (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a ChatML chat template, saved once per test session (per worker)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama whose tokenizer has no chat template (a base model)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-base"), with_chat_template=False)
