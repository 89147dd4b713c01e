"""2:4 format and Triton kernels (CPU: TRITON_INTERPRET=1 is set by conftest.py before import).

Kernel outputs are compared with a float64 reference `x @ unpack(W)ᵀ`; outputs and split-K
workspaces are NaN-poisoned before every launch and every check draws fresh random inputs.
"""
import itertools

import numpy as np
import pytest
import torch

from llmprune.kernels import Not24Error, check_packed, is_24, keep_mask_24, pack_24, sparse24_linear, unpack_24
from llmprune.triton_kernels import ops
from llmprune.triton_kernels.format import LUT_FIRST, LUT_SECOND

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_seed = itertools.count(1234)
# Kernels run on the GPU when there is one (then without the interpreter, see conftest.py);
# inputs and references are built on the CPU either way.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def on_dev(*tensors):
    return tuple(t.to(DEV) if t is not None else None for t in tensors)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


def random_keep(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random 2:4 keep mask (exactly two of every four along k)."""
    order = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order, True).view(n, k)


def random_24(n: int, k: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(next(_seed))
    keep = random_keep(n, k, gen)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.where(keep, w, 0.0).to(dtype), keep  # +0.0 where pruned (w * keep would leave -0.0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu()
    assert not torch.isnan(out).any(), "output has NaN: some element was never written"
    return ((out.double() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_round_trip_and_sizes(dtype):
    w, keep = random_24(24, 96, dtype)
    values, bitmask = pack_24(w)
    assert values.shape == (24, 48) and values.dtype == dtype
    assert bitmask.shape == (24, 12) and bitmask.dtype == torch.uint8
    back = unpack_24(values, bitmask)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))  # bit-exact
    # the kept values are the non-zeros, in ascending column order within each row
    assert torch.equal(values, w[keep].view(24, 48))
    if dtype != torch.float32:  # 16-bit: values + 2 bits per kept value = 9/16 of dense
        nbytes = values.numel() * values.element_size() + bitmask.numel()
        assert nbytes / (w.numel() * w.element_size()) == 9 / 16


def test_every_group_has_exactly_two_bits_and_compressed_tensors_bit_order():
    w, keep = random_24(10, 64)
    w[0, :4] = 0  # an all-zero group still gets two slots
    w[1, 4:8] = torch.tensor([0.0, 0.0, 3.0, 0.0])  # a group with one non-zero
    values, bitmask = pack_24(w)
    nib = torch.stack([bitmask & 0xF, bitmask >> 4], -1).view(10, 16)
    popcount = sum((nib >> j) & 1 for j in range(4))
    assert torch.equal(popcount, torch.full_like(popcount, 2))
    check_packed(values, bitmask)
    # bit j of byte b <-> column 8b + j, like numpy.packbits(bitorder="little") in compressed-tensors
    expected = np.packbits(keep_mask_24(w).numpy(), axis=1, bitorder="little")
    assert np.array_equal(bitmask.numpy(), expected)
    # the group with one non-zero keeps that value and the lowest-index zero
    assert torch.equal(keep_mask_24(w)[1, 4:8], torch.tensor([True, False, True, False]))
    assert torch.equal(unpack_24(values, bitmask), w)


def test_lut_matches_definition():
    for nib in range(16):
        bits = [j for j in range(4) if nib >> j & 1]
        if len(bits) == 2:
            assert (LUT_FIRST >> 2 * nib) & 3 == bits[0]
            assert (LUT_SECOND >> 2 * nib) & 3 == bits[1]
    assert LUT_FIRST < 2**31 and LUT_SECOND < 2**31  # int32 constants in the kernels


def test_kept_exact_zeros_and_negative_zero():
    w, keep = random_24(6, 32)
    # a kept weight that is exactly 0.0, and pruned entries stored as -0.0 (as w * mask leaves them)
    kept_pos = keep.nonzero()[0]
    w[kept_pos[0], kept_pos[1]] = 0.0
    w = torch.where(keep, w, torch.full_like(w, -0.0))
    assert (torch.signbit(w) & ~keep).any()
    values, bitmask = pack_24(w, keep_mask=keep)
    assert np.array_equal(bitmask.numpy(), np.packbits(keep.numpy(), axis=1, bitorder="little"))
    back = unpack_24(values, bitmask)
    assert torch.equal(back, w)  # == treats -0.0 as 0.0
    assert not torch.signbit(back[~keep]).any()  # pruned entries come back as +0.0
    # without the mask, -0.0 counts as zero, so the weight is still recognised as 2:4
    assert is_24(w)
    v2, b2 = pack_24(w)
    assert torch.equal(unpack_24(v2, b2), w)


def test_rejects_non_24():
    w, _ = random_24(4, 32)
    w[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # three non-zeros in one group
    assert not is_24(w)
    with pytest.raises(Not24Error, match="not 2:4"):
        pack_24(w)
    with pytest.raises(Not24Error, match="multiple of 8"):
        pack_24(torch.zeros(4, 12))
    with pytest.raises(Not24Error):
        pack_24(torch.zeros(8))
    dense, keep = random_24(4, 32)
    with pytest.raises(Not24Error, match="outside keep_mask"):
        pack_24(dense + 1.0, keep_mask=keep)
    bad_keep = keep.clone()
    bad_keep[0, :4] = True
    with pytest.raises(Not24Error, match="exactly two"):
        pack_24(dense, keep_mask=bad_keep)
    values, bitmask = pack_24(dense)
    bitmask[1, 0] = 0xFF
    with pytest.raises(Not24Error, match="corrupt"):
        check_packed(values, bitmask)


# ------------------------------------------------------------------------------------ kernels
# N and K are not multiples of any block size; K=392 with BK=64 also leaves a ragged last split.
N, K = 72, 392
CASES = [(dtype, M) for dtype in (torch.float32, torch.float16, torch.bfloat16) for M in (1, 3, 16, 17, 40)]


@pytest.mark.parametrize("kernel", ["gemv", "mm"])
@pytest.mark.parametrize("dtype,M", CASES, ids=[f"{str(d)[6:]}-M{m}" for d, m in CASES])
def test_kernel_matches_float64_reference(kernel, dtype, M):
    gen = torch.Generator().manual_seed(next(_seed))
    split = 1 + (M + len(kernel)) % 4  # split-K 1..4, different across the matrix
    w, _ = random_24(N, K, dtype)
    values, bitmask = pack_24(w)
    bias = torch.randn(N, generator=gen).to(dtype) if M % 2 else None
    x = torch.randn(M, K, generator=gen).to(dtype)
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    cfg = ops.Config(BN=32, BK=128, SPLIT_K=split) if kernel == "gemv" else ops.Config(BN=16, BK=32, SPLIT_K=split)
    launch = ops.launch_gemv if kernel == "gemv" else ops.launch_mm
    out = launch(*on_dev(x, values, bitmask, bias), config=cfg)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype], (kernel, split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemv_even_tiles_without_masks(dtype):
    """N % BN == 0 and whole BK tiles per split: the mask-free loop of the GEMV (the path that
    real LLM shapes take), including a partial group of rows (M=3 in a BM=4 program)."""
    gen = torch.Generator().manual_seed(next(_seed))
    w, _ = random_24(64, 512, dtype)
    values, bitmask = pack_24(w)
    for M, split in [(1, 1), (3, 2), (2, 4)]:
        x = torch.randn(M, 512, generator=gen).to(dtype)
        bias = torch.randn(64, generator=gen).to(dtype)
        cfg = ops.Config(BN=32, BK=128, SPLIT_K=split)
        assert 64 % cfg.BN == 0 and 512 % (512 // split) == 0
        out = ops.launch_gemv(*on_dev(x, values, bitmask, bias), config=cfg)
        ref = x.double() @ w.double().T + bias.double()
        assert rel_err(out, ref) <= TOL[dtype], (M, split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mm_bitmask_words(dtype):
    """K % 32 == 0: the tensor-core kernel reads the bitmask as int32 words (the LLM-shape path)."""
    gen = torch.Generator().manual_seed(next(_seed))
    w, _ = random_24(72, 512, dtype)
    values, bitmask = pack_24(w)
    for M, split in [(5, 1), (17, 3), (40, 2)]:
        x = torch.randn(M, 512, generator=gen).to(dtype)
        out = ops.launch_mm(*on_dev(x, values, bitmask), None, config=ops.Config(BN=16, BK=64, SPLIT_K=split))
        assert rel_err(out, x.double() @ w.double().T) <= TOL[dtype], (M, split)


@pytest.mark.parametrize("kernel", ["gemv", "mm"])
def test_dense_twin_kernels(kernel):
    w, _ = random_24(N, K, torch.float16)
    x = torch.randn(5, K).half()
    launch = ops.launch_gemv if kernel == "gemv" else ops.launch_mm
    out = launch(*on_dev(x, w), None, None, config=ops.Config(BN=16, BK=64, SPLIT_K=2), dense=True)
    assert rel_err(out, x.double() @ w.double().T) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [K, 512])  # bitmask bytes / int32 words
def test_unpack_kernel_is_bit_exact(dtype, k):
    w, _ = random_24(N, k, dtype)
    values, bitmask = pack_24(w)
    dense = ops.launch_unpack(*on_dev(values, bitmask)).cpu()
    assert torch.equal(dense.view(torch.uint8), w.view(torch.uint8))


def test_sparse24_linear_dispatch_and_leading_shapes(monkeypatch):
    """Public entry point: every path of the M-dispatch, 3-D inputs, bias, empty input."""
    w, _ = random_24(40, 128)
    values, bitmask = pack_24(w)
    bias = torch.randn(40)
    values_d, bitmask_d, bias_d = on_dev(values, bitmask, bias)
    calls = []
    for name in ("launch_gemv", "launch_mm", "launch_unpack"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(ops.dispatch, "gemv_max_m", 4)
    monkeypatch.setattr(ops.dispatch, "mm_max_m", 24)
    for shape, path in [((1, 1, 128), "launch_gemv"), ((2, 2, 128), "launch_gemv"), ((3, 5, 128), "launch_mm"),
                        ((2, 15, 128), "launch_unpack")]:
        calls.clear()
        x = torch.randn(*shape)
        out = sparse24_linear(x.to(DEV), values_d, bitmask_d, bias_d)
        assert out.shape == (*shape[:-1], 40)
        assert calls == [path]
        assert rel_err(out, x.double() @ w.double().T + bias.double()) <= 1e-5
    assert sparse24_linear(torch.randn(0, 128, device=DEV), values_d, bitmask_d).shape == (0, 40)
    # a transposed (non-contiguous) input
    xt = torch.randn(128, 3).T
    assert rel_err(sparse24_linear(xt.to(DEV), values_d, bitmask_d), xt.double() @ w.double().T) <= 1e-5
    with pytest.raises(ValueError, match="features"):
        sparse24_linear(torch.randn(2, 64, device=DEV), values_d, bitmask_d)
    with pytest.raises(ValueError, match="cast"):
        sparse24_linear(torch.randn(2, 128, device=DEV).half(), values_d, bitmask_d)


def test_torch_reference_path_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take F.linear on the unpacked weight."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "launch_gemv", None)  # would fail loudly if called
    w, _ = random_24(16, 64)
    values, bitmask = pack_24(w)
    x = torch.randn(2, 64)
    assert rel_err(sparse24_linear(x, values, bitmask), x.double() @ w.double().T) <= 1e-6


def test_heuristic_configs_fill_an_h200(monkeypatch):
    """The launch heuristics give enough programs for 132 SMs on Llama-3-8B shapes and keep
    16-byte value loads (BK/2 * 2 bytes a multiple of 16)."""
    monkeypatch.setattr(ops, "_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    import triton

    for n, k in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        for m in (1, 2, 4):
            c = ops.heuristic_config("gemv", m, n, k, cuda)
            programs = triton.cdiv(n, c.BN) * c.SPLIT_K
            assert programs >= 2 * 132 and k // c.SPLIT_K >= 4 * c.BK, (n, k, m, c)
        for m in (8, 16, 32, 64, 128):
            c = ops.heuristic_config("mm", m, n, k, cuda)
            programs = triton.cdiv(n, c.BN) * triton.cdiv(m, 128) * c.SPLIT_K
            assert programs >= 120 and (c.BK // 2 * 2) % 16 == 0, (n, k, m, c)
