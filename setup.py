"""Packaging glue that pyproject.toml alone cannot express.

The top-level folders `triton_kernels/`, `recipes/` and `evals/` are installed *inside* the
llmprune namespace (llmprune.triton_kernels, llmprune.recipes, llmprune.evals): named recipes and
eval suites then work after a plain non-editable install, and our kernels never shadow the
separate `triton_kernels` distribution that Triton publishes.
"""
from setuptools import find_packages, setup

MAPPED = {
    "llmprune.triton_kernels": "triton_kernels",
    "llmprune.recipes": "recipes",
    "llmprune.evals": "evals",
}

setup(
    packages=find_packages(include=["llmprune", "llmprune.*"]) + list(MAPPED),
    package_dir=MAPPED,
)
