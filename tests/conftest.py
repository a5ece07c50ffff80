"""Shared fixtures. Real test material lives in ../shared (see its MANIFEST.md);
it is read-only in CI, so anything a test modifies is copied to tmp_path first."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
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
def _device_locks(tmp_path_factory):
    """This session's own device leases (backend.devices.leases): runs of one test session queue for this
    machine's devices among themselves, never behind another session's (or a user's) runs."""
    os.environ["FTSTUDIO_DEVICE_LOCKS"] = str(tmp_path_factory.mktemp("device-locks"))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_conf(tmp_path_factory):
    """A real one-node Slurm cluster from Debian's packages (tests/slurm_cluster.sh), started once for the
    session's Slurm tests (test_distributed, test_slurm_submit); yields its slurm.conf."""
    missing = [b for b in ("slurmctld", "slurmd", "srun", "sinfo", "sbatch", "squeue") if not shutil.which(b)]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): "
                    "apt-get install slurmctld slurmd slurm-client (.ci/run does this)", pytrace=False)
    folder = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "tests" / "slurm_cluster.sh")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "SLURM_CTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    started = subprocess.run(["bash", script, "start", str(folder)], env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    yield folder / "slurm.conf"
    subprocess.run(["bash", script, "stop", str(folder)], env=env, capture_output=True, timeout=120)
