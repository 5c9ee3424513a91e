"""Triton kernels for the tiled contrastive losses (InfoNCE / CLIP and SigLIP).

x = image features (N, D), y = text features (M, D), s = logit scale, b = logit bias,
T = x yᵀ (fp32 accumulation), S = s·T, the logits. S is never stored: every kernel recomputes its
(BLOCK_N x BLOCK_M) tiles from x and y (the approach of Inf-CL, https://arxiv.org/abs/2410.17243,
with both directions from the same tiles).

InfoNCE (LOSS = 0), per row i and column j, with target column l_i (default i; -1: none):
    row_lse_i = log Σ_j exp S_ij           col_lse_j = log Σ_i exp S_ij
    l_img_i = row_lse_i - S_{i,l_i}        l_txt_j = col_lse_j - S_{inv_j, j}   (l_{inv_j} = j)
SigLIP (LOSS = 1), z_ij = 1 if j == l_i (default i == j; l_i = -1: no positive) else -1:
    l_i = Σ_j softplus(-z_ij (S_ij + b))   (= -Σ_j log σ(z_ij (S_ij + b)))

Backward, with g_i = ∂L/∂l_img_i (or ∂L/∂l_i) and h_j = ∂L/∂l_txt_j given by the host:
    G_ij = ∂L/∂S_ij
         = g_i (P_ij - [j == l_i]) + h_j (Q_ij - [j == l_i]),   P = exp(S - row_lse), Q = exp(S - col_lse)
         = -g_i z_ij σ(-z_ij (S_ij + b))                                          (SigLIP)
    dx = s·G y        dy = s·Gᵀ x        ds = Σ_ij G_ij T_ij (its g and h terms apart)   db = Σ_ij G_ij

The backward recomputes S with the forward's K chunks (BLOCK_K), and the launches turn FMA fusion
off (``enable_fp_fusion=False``) so s·T is rounded before anything is subtracted from it, in both:
where the exact gradient is 0 (one candidate: P = 1) the kernels give 0. Log-sum-exps follow
NUMERICS.md: running maxima are clamped to ±FLT_MAX before they are subtracted, so a +inf logit
makes its row's and column's log-sum-exp +inf (never inf - inf = NaN) and a NaN stays in its own.

Cost, with c = ceil(D / BLOCK_DV) D chunks per backward program: the forward does one GEMM's worth
of work (2NMD FLOPs), each backward kernel (c + 1) (c recomputations of S, one G·y or Gᵀ·x), so
5 GEMM-equivalents in all when D <= BLOCK_DV (Inf-CL: ~10 for both directions). Extra memory:
(splits + 1) x N and (N / BLOCK_N + 1) x M fp32 statistics; the column partials are 1/BLOCK_N of
the N x M logits (N = M = 131072, BLOCK_N = 128: 512 MiB), the only term above O((N + M) D).

Kernels:
  _fwd_kernel      grid (row blocks, column splits): per-split row partials (log-sum-exp and target
                   logit, or the SigLIP row sum) and per-row-block column log-sum-exp partials.
  _lse_merge_kernel  log-sum-exp over the leading axis of a partials buffer (deterministic order).
  _bwd_dx_kernel   grid (row blocks, D chunks): dx rows, plus per-row ds and db contributions.
  _bwd_dy_kernel   grid (column blocks, D chunks): dy rows. No atomics anywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _score_tile(
    x_ptr, y_ptr, rows, cols, N, M, D, sxn, sxd, syn, syd,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """T[r, c] = <x[rows[r]], y[cols[c]]> in fp32, looping over D in BLOCK_K chunks (0 outside)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(
            x_ptr + rows[:, None] * sxn + ks[None, :] * sxd, mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0
        )
        yk = tl.load(
            y_ptr + cols[:, None] * syn + ks[None, :] * syd, mask=(cols[:, None] < M) & (ks[None, :] < D), other=0.0
        )
        acc = tl.dot(xk, tl.trans(yk), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _shift(m):
    """m clamped to ±FLT_MAX: exp(v - _shift(m)) is never exp(inf - inf) or exp(-inf + inf)."""
    return tl.minimum(tl.maximum(m, -3.4028234663852886e38), 3.4028234663852886e38)


@triton.jit
def _softplus(v):
    """softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|), without overflow (no libdevice)."""
    t = tl.exp(-tl.abs(v))
    # log1p(t) for t in (0, 1]: the series avoids the rounding of 1 + t when t is tiny.
    log1p_t = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
    return tl.maximum(v, 0.0) + log1p_t


@triton.jit
def _sigmoid(v):
    """σ(v) from t = e^-|v| (never overflows): 1 / (1 + t) for v >= 0, t / (1 + t) otherwise."""
    t = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0, t) / (1.0 + t)


@triton.jit
def _grad_tile(
    S, rows, cols, N, M, lab, g, h, rlse, clse, bias,
    LOSS: tl.constexpr, COL_STATS: tl.constexpr,
):  # fmt: skip
    """(G, Gc): G = ∂L/∂S on one tile (formulas in the module docstring), Gc its column (h) terms;
    0 outside the N x M matrix.

    rows, lab, g, rlse: (BLOCK_N,) per-row terms; cols, h, clse: (BLOCK_M,) per-column terms.
    """
    hit = tl.where(cols[None, :] == lab[:, None], 1.0, 0.0)
    valid = (rows[:, None] < N) & (cols[None, :] < M)
    if LOSS == 0:
        G = g[:, None] * (tl.exp(S - rlse[:, None]) - hit)
        if COL_STATS:
            Gc = tl.where(valid, h[None, :] * (tl.exp(S - clse[None, :]) - hit), 0.0)
            G += Gc
        else:
            Gc = tl.zeros_like(G)
    else:
        z = 2.0 * hit - 1.0
        G = -g[:, None] * z * _sigmoid(-z * (S + bias))
        Gc = tl.zeros_like(G)
    return tl.where(valid, G, 0.0), Gc


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr,  # N x D, M x D (any strides)
    scale_ptr, bias_ptr,  # 0-dim fp32
    labels_ptr,  # N int64, contiguous (read only when HAS_LABELS; -1: no target / positive)
    row_part_ptr,  # SPLITS x N fp32: InfoNCE row log-sum-exp over the split's columns; SigLIP row sum
    tgt_part_ptr,  # SPLITS x N fp32: S[i, l_i] if l_i lies in the split's columns, else 0 (InfoNCE)
    col_part_ptr,  # ROW_BLOCKS x M fp32: column log-sum-exp over the block's rows (COL_STATS)
    N, M, D, cols_per_split,
    sxn, sxd, syn, syd,
    LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, COL_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One pass over the tiles of rows [pid_n·BLOCK_N, +BLOCK_N) x columns of split pid_s."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s = tl.load(scale_ptr)
    b = tl.load(bias_ptr)
    if HAS_LABELS:
        lab = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    else:
        lab = rows
    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, M)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running Σ exp(S - m_i)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # target logit (InfoNCE) or loss row sum (SigLIP)
    for c0 in range(c_begin, c_end, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        # 1. the logits tile
        S = s * _score_tile(x_ptr, y_ptr, rows, cols, N, M, D, sxn, sxd, syn, syd, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        ok = row_ok[:, None] & (cols[None, :] < c_end)
        if LOSS == 0:
            # 2. online row log-sum-exp: m' = max(m, max_j S), l' = l e^(m^ - m'^) + Σ_j e^(S - m'^),
            # m^ = _shift(m). Masked columns hold -inf, rows past N finite zeros (never stored).
            Sr = tl.where(cols[None, :] < c_end, S, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(Sr, axis=1))
            ms = _shift(m_new)
            l_i = l_i * tl.exp(_shift(m_i) - ms) + tl.sum(tl.exp(Sr - ms[:, None]), axis=1)
            m_i = m_new
            # 3. the target logit, picked from the same tile
            acc += tl.sum(tl.where(ok & (cols[None, :] == lab[:, None]), S, 0.0), axis=1)
            if COL_STATS:
                # 4. this row block's column log-sum-exp (every row block has at least one row)
                Sc = tl.where(row_ok[:, None], S, float("-inf"))
                c_max = tl.max(Sc, axis=0)
                c_lse = c_max + tl.log(tl.sum(tl.exp(Sc - _shift(c_max)[None, :]), axis=0))
                tl.store(col_part_ptr + pid_n.to(tl.int64) * M + cols, c_lse, mask=cols < c_end)
        else:
            # 2'. SigLIP: Σ_j softplus(-z (S + b))
            z = tl.where(lab[:, None] == cols[None, :], 1.0, -1.0)
            acc += tl.sum(tl.where(ok, _softplus(-z * (S + b)), 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + rows
    if LOSS == 0:
        tl.store(row_part_ptr + out, m_i + tl.log(l_i), mask=row_ok)
        tl.store(tgt_part_ptr + out, acc, mask=row_ok)
    else:
        tl.store(row_part_ptr + out, acc, mask=row_ok)


@triton.jit
def _lse_merge_kernel(part_ptr, out_ptr, P, L, BLOCK: tl.constexpr):
    """out[c] = log Σ_p exp part[p, c] for a P x L buffer of partial log-sum-exps (±inf allowed)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < L
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, P):
        v = tl.load(part_ptr + p * L + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, v)
        ms = _shift(m_new)
        acc = acc * tl.exp(_shift(m) - ms) + tl.exp(v - ms)
        m = m_new
    tl.store(out_ptr + cols, m + tl.log(acc), mask=ok)


@triton.jit
def _bwd_dx_kernel(
    x_ptr, y_ptr,  # N x D, M x D
    scale_ptr, bias_ptr,  # 0-dim fp32
    labels_ptr,  # N int (HAS_LABELS)
    g_ptr, h_ptr,  # N, M fp32 loss weights (h read only when COL_STATS)
    rlse_ptr, clse_ptr,  # N, M fp32 (InfoNCE; clse only when COL_STATS)
    dx_ptr,  # N x D, contiguous, x's dtype (or fp32 for the blocks)
    ds_ptr, dsc_ptr, db_ptr,  # N fp32: Σ_j G_ij T_ij of the g terms, of the h terms, Σ_j G_ij per row
    N, M, D,
    sxn, sxd, syn, syd,
    LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, COL_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT_DS: tl.constexpr,
):  # fmt: skip
    """dx[rows, dv] = s Σ_j G[rows, j] y[j, dv] for rows of block pid_n and dims of chunk pid_d.
    SPLIT_DS (the block primitive): d(scale) kept as its g terms (ds) and h terms (dsc) apart;
    otherwise all of it in ds (and dsc 0), which spares the loss a live tile of registers."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    s = tl.load(scale_ptr)
    b = tl.load(bias_ptr)
    # 1. per-row terms, held for the whole sweep over columns
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    rlse = tl.load(rlse_ptr + rows, mask=row_ok, other=0.0) if LOSS == 0 else g
    lab = tl.load(labels_ptr + rows, mask=row_ok, other=-1) if HAS_LABELS else rows

    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    ds = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        h = tl.load(h_ptr + cols, mask=col_ok, other=0.0) if COL_STATS else g
        clse = tl.load(clse_ptr + cols, mask=col_ok, other=0.0) if COL_STATS else g
        # 2. recompute the tile, 3. its gradient, 4. dx += G y (operands in the input dtype)
        T = _score_tile(x_ptr, y_ptr, rows, cols, N, M, D, sxn, sxd, syn, syd, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        G, Gc = _grad_tile(s * T, rows, cols, N, M, lab, g, h, rlse, clse, b, LOSS, COL_STATS)
        yv = tl.load(
            y_ptr + cols[:, None] * syn + dv[None, :] * syd, mask=col_ok[:, None] & (dv[None, :] < D), other=0.0
        )
        acc = tl.dot(G.to(yv.dtype), yv, acc, input_precision=PRECISION)
        if SPLIT_DS:
            ds += tl.sum((G - Gc) * T, axis=1)
            dsc += tl.sum(Gc * T, axis=1)
        else:
            ds += tl.sum(G * T, axis=1)
        db += tl.sum(G, axis=1)
    tl.store(
        dx_ptr + rows[:, None] * D + dv[None, :],
        (s * acc).to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < D),
    )
    if pid_d == 0:
        tl.store(ds_ptr + rows, ds, mask=row_ok)
        tl.store(dsc_ptr + rows, dsc, mask=row_ok)
        tl.store(db_ptr + rows, db, mask=row_ok)


@triton.jit
def _bwd_dy_kernel(
    x_ptr, y_ptr,  # N x D, M x D
    scale_ptr, bias_ptr,  # 0-dim fp32
    labels_ptr,  # N int (HAS_LABELS)
    g_ptr, h_ptr,  # N, M fp32 loss weights (h read only when COL_STATS)
    rlse_ptr, clse_ptr,  # N, M fp32 (InfoNCE; clse only when COL_STATS)
    dy_ptr,  # M x D, contiguous, y's dtype (or fp32 for the blocks)
    N, M, D,
    sxn, sxd, syn, syd,
    LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, COL_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dy[cols, dv] = s Σ_i G[i, cols] x[i, dv] for columns of block pid_m and dims of chunk pid_d."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    s = tl.load(scale_ptr)
    b = tl.load(bias_ptr)
    # 1. per-column terms, held for the whole sweep over rows
    h = tl.load(h_ptr + cols, mask=col_ok, other=0.0) if COL_STATS else tl.zeros((BLOCK_M,), dtype=tl.float32)
    clse = tl.load(clse_ptr + cols, mask=col_ok, other=0.0) if COL_STATS else h

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        rlse = tl.load(rlse_ptr + rows, mask=row_ok, other=0.0) if LOSS == 0 else g
        lab = tl.load(labels_ptr + rows, mask=row_ok, other=-1) if HAS_LABELS else rows
        # 2. recompute the tile (same orientation as the forward), 3. its gradient, 4. dy += Gᵀ x
        T = _score_tile(x_ptr, y_ptr, rows, cols, N, M, D, sxn, sxd, syn, syd, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        G, _Gc = _grad_tile(s * T, rows, cols, N, M, lab, g, h, rlse, clse, b, LOSS, COL_STATS)
        xv = tl.load(
            x_ptr + rows[:, None] * sxn + dv[None, :] * sxd, mask=row_ok[:, None] & (dv[None, :] < D), other=0.0
        )
        acc = tl.dot(tl.trans(G.to(xv.dtype)), xv, acc, input_precision=PRECISION)
    tl.store(
        dy_ptr + cols[:, None] * D + dv[None, :],
        (s * acc).to(dy_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (dv[None, :] < D),
    )
