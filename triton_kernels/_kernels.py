"""Triton kernels for the packed 2:4 format (see format.py for the layout).

Upstream Triton has no sparse tensor-core instruction, so every kernel here is a *bandwidth*
win: it reads the packed weight (9/16 of dense bytes) and either gathers the matching
activations (tiny M) or rebuilds the dense tile in registers and multiplies densely.

  _s24_gemv_kernel   M <= 4     gather-x: for each kept value load x at its column; no expansion,
                                bitmask bytes and int64 value words share one register layout
  _s24_mm_kernel     M <= ~128  expand-in-registers + tl.dot, swap-AB (W tile is the MMA's A
                                operand, tokens are the MMA-N dimension), split-K; bitmask read
                                as int32 words when K % 32 == 0
  _s24_unpack_kernel            packed -> dense (prefill path: unpack once, then cuBLAS)
  _splitk_reduce_kernel         sums split-K partials, adds bias, casts: deterministic, no atomics

DENSE=True turns the two GEMM kernels into their "dense twin": identical tiling, loads and
epilogue, but reading a dense weight instead of decompressing. The benchmark uses it to separate
kernel engineering from the sparsity gain.

Every load of the weight streams once (evict_first); the next K tile is loaded before the current
one is used so that each program keeps two tiles of HBM traffic in flight.
"""
import triton
import triton.language as tl

from .format import LUT_FIRST, LUT_SECOND

_LUT_FIRST = tl.constexpr(LUT_FIRST)
_LUT_SECOND = tl.constexpr(LUT_SECOND)


@triton.jit
def _nibbles(byts, BN: tl.constexpr, BB: tl.constexpr):
    # byts: [BN, BB] uint8 -> [BN, 2*BB] int32; nibble g holds the keep bits of columns 4g..4g+3
    b = byts.to(tl.int32)
    return tl.reshape(tl.join(b & 0xF, (b >> 4) & 0xF), (BN, 2 * BB))


@triton.jit
def _nibbles_from_words(words, BN: tl.constexpr, BW: tl.constexpr):
    # words: [BN, BW] int32 (32 columns each) -> [BN, 8*BW] int32 nibbles
    sh = tl.arange(0, 8) * 4
    return tl.reshape((words[:, :, None] >> sh[None, None, :]) & 0xF, (BN, 8 * BW))


@triton.jit
def _expand_24(vals, nib, BN: tl.constexpr, BK: tl.constexpr):
    # vals: [BN, BK//2] kept values, nib: [BN, BK//4] -> dense tile [BN, BK]
    v0, v1 = tl.split(tl.reshape(vals, (BN, BK // 4, 2)))
    z = tl.zeros_like(v0)
    keep0 = (nib & 1) != 0
    d0 = tl.where(keep0, v0, z)
    d1 = tl.where((nib & 2) != 0, tl.where(keep0, v1, v0), z)  # second kept iff column 0 is kept
    d2 = tl.where((nib & 4) != 0, tl.where((nib & 3) != 0, v1, v0), z)
    d3 = tl.where((nib & 8) != 0, v1, z)  # column 3 can only be the second kept entry
    # join(join(d0, d2), join(d1, d3)) is [BN, BK//4, 2, 2] with element [g, a, b] = d_{2a+b}
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BN, BK))


@triton.jit
def _load_w_tile(v_ptr, m_ptr, rn, n_ok, k, k_end, stride_vn, stride_bn,
                 BK: tl.constexpr, DENSE: tl.constexpr, MASK_WORDS: tl.constexpr = False):
    # One K tile of the weight: (values [BN, BK//2], bitmask bytes [BN, BK//8]) or, for the dense
    # twin, (dense [BN, BK], unused).
    if DENSE:
        kk = k + tl.arange(0, BK)
        w = tl.load(v_ptr + rn[:, None] * stride_vn + kk[None, :],
                    mask=n_ok[:, None] & (kk < k_end)[None, :], other=0.0, eviction_policy="evict_first")
        return w, w
    else:
        kh = k // 2 + tl.arange(0, BK // 2)
        vals = tl.load(v_ptr + rn[:, None] * stride_vn + kh[None, :],
                       mask=n_ok[:, None] & (kh < k_end // 2)[None, :], other=0.0, eviction_policy="evict_first")
        if MASK_WORDS:  # m_ptr is the bitmask viewed as int32: one word per 32 columns
            kw = k // 32 + tl.arange(0, BK // 32)
            byts = tl.load(m_ptr + rn[:, None] * stride_bn + kw[None, :],
                           mask=n_ok[:, None] & (kw < k_end // 32)[None, :], other=0, eviction_policy="evict_first")
        else:
            kb = k // 8 + tl.arange(0, BK // 8)
            byts = tl.load(m_ptr + rn[:, None] * stride_bn + kb[None, :],
                           mask=n_ok[:, None] & (kb < k_end // 8)[None, :], other=0, eviction_policy="evict_first")
        return vals, byts


@triton.jit
def _load_gemv_tile(w_ptr, m_ptr, rn, n_ok, k, k_end, stride_wn, stride_bn,
                    BB: tl.constexpr, TWO_WORDS: tl.constexpr, EVEN: tl.constexpr):
    # One K tile of BB bitmask bytes per row and the values of the same 8*BB columns as int64
    # words: one word per byte for 16-bit values (4 values), two for fp32 (2 + 2).
    # EVEN: the tile is known to be in bounds, so no masks (and no predicate math) at all.
    kb = k // 8 + tl.arange(0, BB)
    ok = n_ok[:, None] & (kb < k_end // 8)[None, :]
    if EVEN:
        byts = tl.load(m_ptr + rn[:, None] * stride_bn + kb[None, :], eviction_policy="evict_first")
    else:
        byts = tl.load(m_ptr + rn[:, None] * stride_bn + kb[None, :], mask=ok, other=0,
                       eviction_policy="evict_first")
    if TWO_WORDS:  # fp32 values (CPU tests): never on the fast path, keep it simple
        w0 = tl.load(w_ptr + rn[:, None] * stride_wn + 2 * kb[None, :], mask=ok, other=0,
                     eviction_policy="evict_first")
        w1 = tl.load(w_ptr + rn[:, None] * stride_wn + 2 * kb[None, :] + 1, mask=ok, other=0,
                     eviction_policy="evict_first")
        return byts, w0, w1
    else:
        if EVEN:
            w0 = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :], eviction_policy="evict_first")
        else:
            w0 = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :], mask=ok, other=0,
                         eviction_policy="evict_first")
        return byts, w0, w0


@triton.jit
def _four_values(w0, w1, VALUE_KIND: tl.constexpr):
    # int64 words -> the 4 kept values of one bitmask byte as fp32 (little-endian: the value at
    # the lowest address sits in the lowest bits). VALUE_KIND: 0 bf16, 1 fp16, 2 fp32.
    lo = w0.to(tl.int32)  # truncation keeps bits 0..31
    hi = (w0 >> 32).to(tl.int32)
    if VALUE_KIND == 2:
        return (lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True),
                w1.to(tl.int32).to(tl.float32, bitcast=True), (w1 >> 32).to(tl.int32).to(tl.float32, bitcast=True))
    elif VALUE_KIND == 0:  # bf16 -> fp32 is the 16 bits moved to the top: one integer op per value
        return ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
                (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))
    else:
        return (lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _gather_row(acc, x_ptr, row, M, stride_xm, k_end, c0, c1, c2, c3, f0, f1, f2, f3, EVEN: tl.constexpr):
    # acc [BN, BB] += value * x[row, column of the value], over the 4 kept values of each byte
    if EVEN:  # every column is in bounds; a row past M reads row M-1 and is never stored
        xr = x_ptr + tl.minimum(row, M - 1) * stride_xm
        x0 = tl.load(xr + c0, eviction_policy="evict_last")
        x1 = tl.load(xr + c1, eviction_policy="evict_last")
        x2 = tl.load(xr + c2, eviction_policy="evict_last")
        x3 = tl.load(xr + c3, eviction_policy="evict_last")
    else:
        xr = x_ptr + row * stride_xm
        lim = tl.where(row < M, k_end, 0)  # a row past M loads nothing
        x0 = tl.load(xr + c0, mask=c0 < lim, other=0.0, eviction_policy="evict_last")
        x1 = tl.load(xr + c1, mask=c1 < lim, other=0.0, eviction_policy="evict_last")
        x2 = tl.load(xr + c2, mask=c2 < lim, other=0.0, eviction_policy="evict_last")
        x3 = tl.load(xr + c3, mask=c3 < lim, other=0.0, eviction_policy="evict_last")
    acc += f0 * x0.to(tl.float32)  # one FFMA each
    acc += f1 * x1.to(tl.float32)
    acc += f2 * x2.to(tl.float32)
    acc += f3 * x3.to(tl.float32)
    return acc


@triton.jit
def _store_row(y_ptr, bias_ptr, out, row, M, N, rn, pid_k, stride_ym, stride_ys,
               SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    n_ok = rn < N
    ok = rn < tl.where(row < M, N, 0)  # rows past M store nothing (scalar & tensor masks trip the interpreter)
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=ok)
    else:  # fp32 partials, summed (plus bias) by _splitk_reduce_kernel
        tl.store(y_ptr + pid_k * stride_ys + row * stride_ym + rn, out, mask=ok)


@triton.jit
def _s24_gemv_kernel(
    x_ptr, w_ptr, m_ptr, bias_ptr, y_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_bn, stride_ym, stride_ys,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DENSE: tl.constexpr, VALUE_KIND: tl.constexpr, EVEN: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] W[n, k] for M <= 4 rows per program.
    Grid: (cdiv(N, BN), SPLIT_K, cdiv(M, BM)), BM in {1, 2, 4}.

    Sparse (gather-x): the tile is BB = BK/8 bitmask bytes per row; byte b covers columns
    8b..8b+7 and its 4 kept values are exactly one int64 word of `values` (16-bit types), so the
    bytes and the words are loaded with the same [BN, BB] offsets (same register layout, no
    shuffles through shared memory). The column of each kept value is 8b + 4*(half) + a 2-bit
    position looked up in a 32-bit constant; x (a few KB, L1/L2-resident) is gathered there and
    multiplied with the value in fp32. No dense weight tile is ever formed: ~6.8 SASS
    instructions per weight element at M=1 (sm90, BN=16, BK=256), under the ~8.8 that the SM issue
    rate allows at 4.3 TB/s (14.6 weight elements per SM per cycle, 128 lane-instructions).
    fp32 arithmetic also keeps the CPU interpreter (which cannot do bf16 arithmetic) exact.
    EVEN (N % BN == 0 and every split a whole number of BK tiles, true for LLM shapes) drops
    every mask and predicate from the loop. The dense twin (DENSE=True, w_ptr a dense [N, K]
    weight) is a plain tiled GEMV.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BM
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)

    if DENSE:
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < M
        acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
        cur = tl.load(w_ptr + rn[:, None] * stride_wn + (k_start + tl.arange(0, BK))[None, :],
                      mask=n_ok[:, None] & ((k_start + tl.arange(0, BK)) < k_end)[None, :], other=0.0,
                      eviction_policy="evict_first")
        for k in range(k_start, k_end, BK):
            kn = k + BK + tl.arange(0, BK)
            nxt = tl.load(w_ptr + rn[:, None] * stride_wn + kn[None, :], mask=n_ok[:, None] & (kn < k_end)[None, :],
                          other=0.0, eviction_policy="evict_first")
            kk = k + tl.arange(0, BK)
            xv = tl.load(x_ptr + rm[:, None, None] * stride_xm + kk[None, None, :],
                         mask=m_ok[:, None, None] & (kk < k_end)[None, None, :], other=0.0, eviction_policy="evict_last")
            acc += xv.to(tl.float32) * cur.to(tl.float32)[None, :, :]
            cur = nxt
        out = tl.sum(acc, axis=2)  # [BM, BN]
        y_off = rm[:, None] * stride_ym + rn[None, :]
        y_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            tl.store(y_ptr + pid_k * stride_ys + y_off, out, mask=y_mask)
    else:
        BB: tl.constexpr = BK // 8
        TWO_WORDS: tl.constexpr = VALUE_KIND == 2
        acc0 = tl.zeros((BN, BB), dtype=tl.float32)
        acc1 = tl.zeros((BN, BB), dtype=tl.float32)
        acc2 = tl.zeros((BN, BB), dtype=tl.float32)
        acc3 = tl.zeros((BN, BB), dtype=tl.float32)
        byts, w0, w1 = _load_gemv_tile(w_ptr, m_ptr, rn, n_ok, k_start, k_end, stride_wn, stride_bn, BB,
                                       TWO_WORDS, EVEN)
        for k in range(k_start, k_end, BK):
            # prefetch the next tile; on the last step EVEN re-reads the current one (an L2 hit)
            k_next = tl.minimum(k + BK, k_end - BK) if EVEN else k + BK
            n_byts, n_w0, n_w1 = _load_gemv_tile(w_ptr, m_ptr, rn, n_ok, k_next, k_end, stride_wn, stride_bn,
                                                 BB, TWO_WORDS, EVEN)
            b = byts.to(tl.uint32)
            sh_a = (b << 1) & 0x1E  # 2 * (nibble of the byte's first group of 4 columns)
            sh_b = (b >> 3) & 0x1E  # 2 * (nibble of its second group)
            # columns as unsigned offsets: one 32x32+64 multiply-add per address instead of two
            base = (k + 8 * tl.arange(0, BB)).to(tl.uint32)[None, :]
            c0 = base + ((_LUT_FIRST >> sh_a) & 3)
            c1 = base + ((_LUT_SECOND >> sh_a) & 3)
            c2 = base + 4 + ((_LUT_FIRST >> sh_b) & 3)
            c3 = base + 4 + ((_LUT_SECOND >> sh_b) & 3)
            f0, f1, f2, f3 = _four_values(w0, w1, VALUE_KIND)
            acc0 = _gather_row(acc0, x_ptr, m0, M, stride_xm, k_end, c0, c1, c2, c3, f0, f1, f2, f3, EVEN)
            if BM > 1:
                acc1 = _gather_row(acc1, x_ptr, m0 + 1, M, stride_xm, k_end, c0, c1, c2, c3, f0, f1, f2, f3, EVEN)
            if BM > 2:
                acc2 = _gather_row(acc2, x_ptr, m0 + 2, M, stride_xm, k_end, c0, c1, c2, c3, f0, f1, f2, f3, EVEN)
                acc3 = _gather_row(acc3, x_ptr, m0 + 3, M, stride_xm, k_end, c0, c1, c2, c3, f0, f1, f2, f3, EVEN)
            byts = n_byts
            w0 = n_w0
            w1 = n_w1
        _store_row(y_ptr, bias_ptr, tl.sum(acc0, axis=1), m0, M, N, rn, pid_k, stride_ym, stride_ys,
                   SPLIT_K, HAS_BIAS)
        if BM > 1:
            _store_row(y_ptr, bias_ptr, tl.sum(acc1, axis=1), m0 + 1, M, N, rn, pid_k, stride_ym, stride_ys,
                       SPLIT_K, HAS_BIAS)
        if BM > 2:
            _store_row(y_ptr, bias_ptr, tl.sum(acc2, axis=1), m0 + 2, M, N, rn, pid_k, stride_ym, stride_ys,
                       SPLIT_K, HAS_BIAS)
            _store_row(y_ptr, bias_ptr, tl.sum(acc3, axis=1), m0 + 3, M, N, rn, pid_k, stride_ym, stride_ys,
                       SPLIT_K, HAS_BIAS)


@triton.jit
def _s24_mm_kernel(
    x_ptr, v_ptr, m_ptr, bias_ptr, y_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_vn, stride_bn, stride_ym, stride_ys,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DENSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_WORDS: tl.constexpr = False,
):
    """y = x @ W^T for small-to-medium M. Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT_K).

    Swap-AB: computes y^T tile [BN, BM] = W_tile [BN, BK] @ x_tile^T [BK, BM], so the weight
    rebuilt in registers is the MMA's A operand (Hopper wgmma takes A from registers) and the
    few tokens are the MMA-N dimension (>= 16 here instead of padding M to 64). The M tiles are
    the fastest grid axis so programs sharing a weight tile run together and hit L2.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    n_ok = rn < N
    m_ok = rm < M
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    x_rows = x_ptr + rm[:, None] * stride_xm

    cur_a, cur_b = _load_w_tile(v_ptr, m_ptr, rn, n_ok, k_start, k_end, stride_vn, stride_bn, BK, DENSE,
                                MASK_WORDS)
    for k in range(k_start, k_end, BK):
        nxt_a, nxt_b = _load_w_tile(v_ptr, m_ptr, rn, n_ok, k + BK, k_end, stride_vn, stride_bn, BK, DENSE,
                                    MASK_WORDS)
        kk = k + tl.arange(0, BK)
        xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < k_end)[None, :], other=0.0,
                     eviction_policy="evict_last")
        if DENSE:
            w = cur_a
        elif MASK_WORDS:
            w = _expand_24(cur_a, _nibbles_from_words(cur_b, BN, BK // 32), BN, BK)
        else:
            w = _expand_24(cur_a, _nibbles(cur_b, BN, BK // 8), BN, BK)
        if UPCAST:  # the CPU interpreter cannot do bf16 arithmetic
            acc = tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PRECISION)
        cur_a = nxt_a
        cur_b = nxt_b

    y_off = rm[None, :] * stride_ym + rn[:, None]  # acc is y^T: [BN, BM]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptr + pid_k * stride_ys + y_off, acc, mask=y_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, M, N, stride_ym, stride_ys,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # ws: [SPLIT_K, M, N] fp32 partials (row stride N) -> y [M, N] (row stride stride_ym)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ys + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + col, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _s24_unpack_kernel(v_ptr, m_ptr, w_ptr, N, K, stride_vn, stride_bn, stride_wn,
                       BN: tl.constexpr, BK: tl.constexpr, MASK_WORDS: tl.constexpr = False):
    # packed -> dense [N, K] with zeros. Grid: (cdiv(N, BN), cdiv(K, BK)).
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK
    n_ok = rn < N
    vals, mbits = _load_w_tile(v_ptr, m_ptr, rn, n_ok, k, K, stride_vn, stride_bn, BK, False, MASK_WORDS)
    if MASK_WORDS:
        w = _expand_24(vals, _nibbles_from_words(mbits, BN, BK // 32), BN, BK)
    else:
        w = _expand_24(vals, _nibbles(mbits, BN, BK // 8), BN, BK)
    kk = k + tl.arange(0, BK)
    tl.store(w_ptr + rn[:, None] * stride_wn + kk[None, :], w, mask=n_ok[:, None] & (kk < K)[None, :])
