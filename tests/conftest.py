"""Shared fixtures. Real test material lives in ../shared (see its MANIFEST.md);
it is read-only in CI, so anything a test modifies is copied to tmp_path first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTSTUDIO_SHARED", ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
MINIMIND_TOKENIZER = SHARED / "tokenizers" / "minimind_chatml"
STORIES_MODEL = SHARED / "models" / "stories260K"


def pytest_configure(config):
    # Nothing may reach the Hub from a test; the datasets cache is per run.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not SHARED.is_dir():
        raise pytest.UsageError(f"test material not found at {SHARED}; set FTSTUDIO_SHARED")


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    import datasets.config

    old_cfg = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    yield cache
    datasets.config.HF_DATASETS_CACHE = old_cfg
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@pytest.fixture(scope="session")
def minimind_tokenizer():
    """The real minimind ChatML tokenizer (byte-level BPE, vocab 6400, chat_template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINIMIND_TOKENIZER)


@pytest.fixture(scope="session")
def stories_tokenizer():
    """The real stories260K Llama tokenizer (adds <s> itself, no chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES_MODEL)


@pytest.fixture(scope="session", autouse=True)
def demo_dir(tmp_path_factory):
    """The bundled demo (tokenizer trained on the project's text, tiny random
    Llama) is built once per test session here, never in the user's folder."""
    path = tmp_path_factory.mktemp("demo")
    os.environ["FTSTUDIO_DEMO_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(demo_dir):
    """A tiny random Llama-style model and its tokenizer, built locally."""
    from backend.demo import demo_model_dir

    return demo_model_dir()
