"""Shared fixtures (the shared functions and constants are in tests/helpers.py). Tests never
download: tiny seeded BERTs are built in-process, the real teacher comes from its pip package, and
the hubs are switched off."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from transformers import AutoTokenizer

from compressor.teacher import resolve_source
from tests.helpers import PACKAGED, RECIPES


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Teacher ONNX exports are cached per session, not in the user's cache; finished runs are
    registered in a session zoo, never in the repository's ./zoo."""
    os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("compress-cache"))
    os.environ["COMPRESS_ZOO"] = str(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real run of recipes/tiny-test.yaml (packaged teacher, real text), shared by tests."""
    from compressor import pipeline

    return pipeline.run(RECIPES / "tiny-test.yaml", output=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def packaged_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source(PACKAGED))


@pytest.fixture(scope="session")
def packaged_teacher():
    """The real pre-trained all-MiniLM-L6-v2 from its pip package, frozen."""
    from compressor.teacher import load_teacher

    return load_teacher(PACKAGED)
