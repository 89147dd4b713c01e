"""Launchers, launch configurations and M-dispatch for the 2:4 kernels.

Dispatch on M = number of rows of x (tokens x batch), per call, from shapes only (no host sync,
so the forward can be captured in a CUDA graph):

    M <= dispatch.gemv_max_m   gather-x GEMV (decode, batch 1)
    M <= dispatch.mm_max_m     expand-in-registers + tl.dot (swap-AB, split-K)
    otherwise                  prefill: unpack to a dense scratch weight, then cuBLAS

Tensors that Triton cannot run (CPU without TRITON_INTERPRET=1, or Triton missing) take the torch
reference path `F.linear(x, unpack_24(...))`.

The thresholds can be set with LLMPRUNE_S24_GEMV_MAX_M / LLMPRUNE_S24_MM_MAX_M (or by assigning
`dispatch.gemv_max_m` / `dispatch.mm_max_m`); benchmarks/kernels_24.py shows where they belong.

Launch configurations come from `tuned` (filled by `load_configs()` from the JSON that the
benchmark's --tune run writes, or at import from $LLMPRUNE_S24_CONFIGS) or from
`heuristic_config()`, written for Hopper: enough programs to keep all SMs streaming (split-K
when N alone gives too few tiles), 16-byte loads of the values, BN a multiple of 64 for the
tensor-core kernel so that each warpgroup's wgmma gets a full 64-row A tile from registers.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .format import Not24Error, unpack_24

try:
    import triton

    from . import _kernels

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton fixes interpreter-or-compiled when a kernel is defined, i.e. when _kernels was imported.
KERNELS_INTERPRETED = HAVE_TRITON and interpreting()


def triton_runs_on(t: torch.Tensor) -> bool:
    """Can the Triton kernels run on this tensor's device?"""
    if not HAVE_TRITON:
        return False
    if KERNELS_INTERPRETED:
        return t.device.type == "cpu" and interpreting()  # (tests unset it to force the torch path)
    return t.is_cuda


@dataclass
class Dispatch:
    # gather-x up to here: ~6.8 SASS instructions per weight element at M=1 and ~8.6 at M=2
    # (sm90, ptxas), vs ~7.7 for the expand + tl.dot kernel at any M <= BM. Re-check on a GPU
    # with the benchmark's `mm_us` column (it times the tl.dot kernel at every M).
    gemv_max_m: int = 1
    mm_max_m: int = 128  # software decompression stays memory-bound to M ~ 100-120 on H200


dispatch = Dispatch(
    gemv_max_m=int(os.environ.get("LLMPRUNE_S24_GEMV_MAX_M", Dispatch.gemv_max_m)),
    mm_max_m=int(os.environ.get("LLMPRUNE_S24_MM_MAX_M", Dispatch.mm_max_m)),
)


@dataclass(frozen=True)
class Config:
    BN: int
    BK: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 1


# (kernel, N, K, m_bucket) -> Config, filled by load_configs() (from the benchmark's --tune)
tuned: dict[tuple[str, int, int, int], Config] = {}


def m_bucket(m: int) -> int:
    """Next power of two (1, 2, 4, ..., 128, ...): the granularity of configs."""
    return 1 << max(0, (m - 1).bit_length())


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs is plenty


def _split_for(tiles: int, K: int, BK: int, target_programs: int, min_k_steps: int = 4) -> int:
    """Smallest power-of-two split-K that reaches target_programs, keeping >= min_k_steps tiles
    of K per split (a split that only streams one or two tiles is all prologue)."""
    split = 1
    while tiles * split < target_programs and K // (split * 2) >= min_k_steps * BK:
        split *= 2
    return split


def heuristic_config(kernel: str, M: int, N: int, K: int, device: torch.device) -> Config:
    if device.type != "cuda":  # interpreter: small tiles keep the numpy emulation quick
        return Config(BN=32, BK=128 if kernel == "gemv" else 64, SPLIT_K=1, num_warps=4, num_stages=1)
    sms = _sms(device)
    if kernel == "gemv":
        # 40-48 registers per thread at these sizes (sm90): high occupancy to hide gather latency
        BK = 256 if M == 1 else 128
        BN = 16 if M <= 2 and triton.cdiv(N, 16) >= sms else 8  # small N: more, thinner programs
        split = _split_for(triton.cdiv(N, BN), K, BK, target_programs=4 * sms)
        return Config(BN=BN, BK=BK, SPLIT_K=split, num_warps=4, num_stages=1)
    if kernel == "mm":
        BM = min(max(16, m_bucket(M)), 128)
        BN = 64 if BM <= 64 else 128  # one (or two) warpgroup-sized A tiles
        BK = 128 if BM <= 32 else 64
        warps = 4 if BM <= 32 else 8
        tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
        split = _split_for(tiles, K, BK, target_programs=2 * sms)
        return Config(BN=BN, BK=BK, SPLIT_K=split, num_warps=warps, num_stages=2)
    raise ValueError(kernel)


def get_config(kernel: str, M: int, N: int, K: int, device: torch.device) -> Config:
    cfg = tuned.get((kernel, N, K, m_bucket(M))) if device.type == "cuda" else None
    return cfg or heuristic_config(kernel, M, N, K, device)


def save_configs(path: str | os.PathLike) -> None:
    rows = [{"kernel": k[0], "N": k[1], "K": k[2], "m_bucket": k[3], **asdict(c)} for k, c in sorted(tuned.items())]
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def load_configs(path: str | os.PathLike) -> int:
    rows = json.loads(Path(path).read_text())
    for r in rows:
        tuned[(r["kernel"], r["N"], r["K"], r["m_bucket"])] = Config(
            BN=r["BN"], BK=r["BK"], SPLIT_K=r["SPLIT_K"], num_warps=r["num_warps"], num_stages=r["num_stages"])
    return len(rows)


if os.environ.get("LLMPRUNE_S24_CONFIGS"):
    load_configs(os.environ["LLMPRUNE_S24_CONFIGS"])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # (tf32 is ignored for 16-bit inputs)


def _check_args(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    N, KH = values.shape
    if x.shape[-1] != 2 * KH:
        raise ValueError(f"x has {x.shape[-1]} features but the packed weight expects {2 * KH}")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (N, KH // 4):
        raise Not24Error(f"bitmask must be uint8 [{N}, {KH // 4}], got {bitmask.dtype} {tuple(bitmask.shape)}")
    if values.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("values and bitmask must have contiguous rows")
    if x.dtype != values.dtype:
        raise ValueError(f"x is {x.dtype} but the packed weight is {values.dtype}; cast one of them")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")


def _finish_split(ws: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, split: int) -> torch.Tensor:
    M, N = out.shape
    BLOCK = 1024
    _kernels._splitk_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](
        ws, bias if bias is not None else ws, out, M, N, out.stride(0), ws.stride(0),
        SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
    return out


# Tests set this to fill outputs and split-K workspaces with NaN before every launch, so that
# an element a kernel forgets to write cannot pass as a correct value.
POISON_OUTPUTS = False


def _new(shape, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=x.device, dtype=dtype)
    return torch.empty(shape, device=x.device, dtype=dtype)


_VALUE_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def launch_gemv(x: torch.Tensor, w: torch.Tensor, bitmask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                config: Optional[Config] = None, dense: bool = False) -> torch.Tensor:
    """x [M, K] @ W^T with the gather-x GEMV (meant for M <= 4; M is tiled by 4 beyond that).
    w = packed values [N, K/2] (or, dense=True, a dense [N, K] weight for the dense twin)."""
    M, K = x.shape
    N = w.shape[0]
    cfg = config or get_config("gemv", M, N, K, x.device)
    BM = min(m_bucket(M), 4)
    K_SPLIT = triton.cdiv(triton.cdiv(K, cfg.SPLIT_K), cfg.BK) * cfg.BK
    split = triton.cdiv(K, K_SPLIT)
    out = _new((M, N), x, x.dtype)
    dst = out if split == 1 else _new((split, M, N), x, torch.float32)
    if dense:
        m = w
    else:  # the values as int64 words: 4 (16-bit) or 2 (fp32) values per word
        if w.dtype not in _VALUE_KIND:
            raise ValueError(f"unsupported weight dtype {w.dtype}")
        m = bitmask
        w = w.view(torch.int64)
    _kernels._s24_gemv_kernel[(triton.cdiv(N, cfg.BN), split, triton.cdiv(M, BM))](
        x, w, m, bias if bias is not None else x, dst,
        M, N, K, K_SPLIT,
        x.stride(0), w.stride(0), m.stride(0), out.stride(0), dst.stride(0) if split > 1 else 0,
        BM=BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=split, HAS_BIAS=bias is not None,
        DENSE=dense, VALUE_KIND=_VALUE_KIND.get(x.dtype, 0),
        EVEN=(N % cfg.BN == 0 and K % K_SPLIT == 0 and not dense), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if split == 1 else _finish_split(dst, bias, out, split)


def launch_mm(x: torch.Tensor, w: torch.Tensor, bitmask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              config: Optional[Config] = None, dense: bool = False, BM: Optional[int] = None) -> torch.Tensor:
    """x [M, K] @ W^T through expand-in-registers + tl.dot (swap-AB, split-K)."""
    M, K = x.shape
    N = w.shape[0]
    cfg = config or get_config("mm", M, N, K, x.device)
    BM = BM or min(max(16, m_bucket(M)), 128)
    K_SPLIT = triton.cdiv(triton.cdiv(K, cfg.SPLIT_K), cfg.BK) * cfg.BK
    split = triton.cdiv(K, K_SPLIT)
    out = _new((M, N), x, x.dtype)
    dst = out if split == 1 else _new((split, M, N), x, torch.float32)
    m = bitmask if bitmask is not None else w
    # K % 32 == 0 (every LLM linear): read the bitmask as int32 words, whose nibbles unpack with
    # shifts instead of byte shuffles (~15% fewer instructions per weight element on sm90)
    words = not dense and K % 32 == 0 and cfg.BK % 32 == 0 and m.data_ptr() % 4 == 0
    if words:
        m = m.view(torch.int32)
    upcast = KERNELS_INTERPRETED and x.dtype == torch.bfloat16
    _kernels._s24_mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, cfg.BN), split)](
        x, w, m, bias if bias is not None else w, dst,
        M, N, K, K_SPLIT,
        x.stride(0), w.stride(0), m.stride(0), out.stride(0), dst.stride(0) if split > 1 else 0,
        BM=BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=split, HAS_BIAS=bias is not None,
        UPCAST=upcast, DENSE=dense, DOT_PRECISION=_dot_precision(x.dtype), MASK_WORDS=words,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if split == 1 else _finish_split(dst, bias, out, split)


def launch_unpack(values: torch.Tensor, bitmask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton unpack: packed -> dense [N, K] (one pass: 9/16 read, 1 write)."""
    N, KH = values.shape
    K = 2 * KH
    if out is None:
        out = _new((N, K), values, values.dtype)
    BN, BK = (32, 256) if values.is_cuda else (16, 64)
    words = K % 32 == 0 and bitmask.data_ptr() % 4 == 0
    m = bitmask.view(torch.int32) if words else bitmask
    _kernels._s24_unpack_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        values, m, out, N, K, values.stride(0), m.stride(0), out.stride(0),
        BN=BN, BK=BK, MASK_WORDS=words, num_warps=4)
    return out


def linear_2d(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] (row-contiguous) -> [M, N]; the dispatch described in the module docstring."""
    M = x.shape[0]
    if not triton_runs_on(x):
        return F.linear(x, unpack_24(values, bitmask), bias)
    if M == 0:
        return x.new_empty((0, values.shape[0]))
    if M <= dispatch.gemv_max_m:
        return launch_gemv(x, values, bitmask, bias)
    if M <= dispatch.mm_max_m:
        return launch_mm(x, values, bitmask, bias)
    # Prefill is compute-bound: decompression cannot win there, so pay one unpack pass
    # (read 9/16, write 1 of dense bytes) and let cuBLAS do the GEMM.
    return F.linear(x, launch_unpack(values, bitmask), bias)


# torch.compile / torch.export see the kernels as one opaque op with a shape-only fake.
@torch.library.custom_op("llmprune::sparse24_linear", mutates_args=())
def _sparse24_linear_op(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    return linear_2d(x, values, bitmask, bias)


@_sparse24_linear_op.register_fake
def _(x, values, bitmask, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ Wᵀ (+ bias)` for x of any leading shape, W given packed as (values, bitmask)."""
    _check_args(x, values, bitmask, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.llmprune.sparse24_linear(x2, values, bitmask, bias)
    else:  # eager: skip the custom-op dispatcher (a few µs per call at decode matter)
        y = linear_2d(x2, values, bitmask, bias)
    return y.view(*lead, values.shape[0])
