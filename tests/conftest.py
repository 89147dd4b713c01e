"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is *defined* (decorated), so it is set here,
before test modules import llmprune.kernels. CPU-only machines (CI) always use the interpreter.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Modules of many tiny ops (small training runs, per-expert loops) run faster on one thread than on
    two oversubscribed ones on a shared CPU (test_moe: 4 min with the default threads, under 1 with one)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
