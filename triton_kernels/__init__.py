"""2:4 sparse Triton kernels (installed as llmprune.triton_kernels)."""
