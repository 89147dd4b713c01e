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
