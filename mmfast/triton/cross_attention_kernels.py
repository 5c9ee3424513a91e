"""Triton cross-attention kernels: FlashAttention-2 forward and backward, split-KV merge.

Math (FlashAttention-2, https://arxiv.org/abs/2307.08691), for batch b, query head h, key/value
head g = h // (Hq // Hkv), query row i, key column j, with base-2 exponentials (log2(e) folded
into the scale, LSE converted back to natural log on the way out):

    s[i,j]   = scale * <q[i], k[j]> + bias[i,j]         (bias: float attn_mask, else 0)
    allowed  = not kpm[j] and bool_mask[i,j] and j < Lk and (j <= i + Lk - Lq if causal)
    lse[i]   = log sum_{j allowed} exp(s[i,j])           (-inf when no key is allowed)
    p[i,j]   = exp(s[i,j] - lse[i])  if allowed else 0
    z[i,j]   = keep(seed, (b*Hq + h)*Lq + i, j) / (1 - dropout_p)   (1 without dropout)
    out[i]   = sum_j p[i,j] z[i,j] v[j]

Backward (dO = dL/dout, dlse = dL/dlse, which is 0 unless the caller used the LSE):

    delta[i] = sum_d dO[i,d] out[i,d] - dlse[i]
    dP[i,j]  = z[i,j] <dO[i], v[j]>
    dS[i,j]  = p[i,j] (dP[i,j] - delta[i])                     (= dL/dbias[i,j])
    dq[i]    = scale sum_j dS[i,j] k[j]
    dk[j]    = scale sum_{h in group, i} dS[i,j] q[i]
    dv[j]    = sum_{h in group, i} p[i,j] z[i,j] dO[i]

Kernels: ``attn_fwd`` (online softmax over key tiles; with NUM_SPLITS > 1 each program covers a
contiguous share of the keys and writes an fp32 partial out and LSE), ``attn_merge`` (combines
the partials by LSE), ``attn_bwd_preprocess`` (delta), ``attn_bwd_dkdv`` (one program per key
tile and KV head, looping over the query heads of its group: no atomics), ``attn_bwd_dq`` (one
program per query tile; also writes dS as the float mask's gradient when asked).

Every tensor is addressed through its strides (broadcast mask dims have stride 0). Masks arrive
as uint8 (bool tensors viewed as uint8). Fully masked rows give out 0, LSE -inf, zero gradients.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finalizer (uint32 arithmetic, products mod 2**32)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _dropout_keep(seed_lo, seed_hi, thresh, rows, cols):
    """[BM, BN] keep-mask, bit-exact with mmfast.reference.dropout.keep_mask.

    rows: [BM] int64 global row index (b*Hq + h)*Lq + i; cols: [BN] int64 key index.
    seed_lo / seed_hi / thresh: int32 bit patterns of the uint32 values.
    """
    r = rows.to(tl.uint32)
    c = cols.to(tl.uint32)
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    th = thresh.to(tl.uint32, bitcast=True)
    x = lo ^ (r[:, None] * 0x9E3779B1) ^ (c[None, :] * 0x85EBCA77)
    x = _fmix32(_fmix32(x) ^ hi)
    return x >= th


@triton.jit
def _scores(
    q, kT, MASK, KPM, offs_m, start_n, mask_base, stride_mm, stride_mn, kpm_base, stride_kpn, Lq, Lk, qk_scale,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Base-2 scores of the [BM, BN] tile of keys start_n.., -inf where not allowed; q [BM, BD], kT [BD, BN]."""
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    # s = scale * log2(e) * q kT (+ log2(e) * bias), then every mask applied as -inf.
    s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
    col_ok = cols < Lk
    allowed = (offs_m[:, None] < Lq) & col_ok[None, :]
    if MASK_KIND != 0:
        mtile = MASK + mask_base + start_n * stride_mn
        mval = tl.load(mtile + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=allowed, other=0)
        if MASK_KIND == 1:
            allowed &= mval != 0
        else:
            allowed &= mval != float("-inf")  # a -inf entry is a mask: replace, never add
            s += mval.to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        pad = tl.load(KPM + kpm_base + cols * stride_kpn, mask=col_ok, other=1)
        allowed &= (pad == 0)[None, :]
    if IS_CAUSAL:  # bottom-right aligned: query i sees keys j <= i + Lk - Lq
        allowed &= cols[None, :] <= offs_m[:, None] + (Lk - Lq)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _tile_live(KPM, kpm_base, stride_kpn, cols, Lk, HAS_KPM: tl.constexpr):
    """False when every key of the tile is padding (the tile is then skipped)."""
    if HAS_KPM:
        pad = tl.load(KPM + kpm_base + cols * stride_kpn, mask=cols < Lk, other=1)
        return tl.min(pad.to(tl.int32), 0) == 0
    else:
        return True


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE, KPM, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh,
    stride_kpb, stride_kpn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hkv, Lq, Lk, D, Dv,
    qk_scale, seed_lo, seed_hi, drop_thresh, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Forward over one (query tile, b*Hq + h, key split); grid (cdiv(Lq, BM), B*Hq, NUM_SPLITS).

    Q (B, Hq, Lq, D), K (B, Hkv, Lk, D), V (B, Hkv, Lk, Dv); O: out (B, Hq, Lq, Dv) when
    NUM_SPLITS == 1, else fp32 partials (S, B, Hq, Lq, Dv); LSE: (B, Hq, Lq) or (S, B, Hq, Lq)
    fp32, natural log. qk_scale = scale * log2(e); drop_scale = 1 / (1 - dropout_p).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    g = h // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq

    # 1. Load the query tile once; padded rows and head dims are 0.
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    K_bg = K + b * stride_kb + g * stride_kh
    V_bg = V + b * stride_vb + g * stride_vh
    mask_base = b * stride_mb + h * stride_mh
    kpm_base = b * stride_kpb
    rows = (b * Hq + h) * Lq + offs_m

    # 2. This program's key range: a BLOCK_N-aligned share of Lk, cut at the causal frontier.
    chunk = tl.cdiv(tl.cdiv(Lk, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum((pid_m + 1) * BLOCK_M, Lq) + (Lk - Lq))

    # 3. Online softmax: m = running max (base 2), l = running sum of exp2(s - m), acc = sum p z v.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if _tile_live(KPM, kpm_base, stride_kpn, cols, Lk, HAS_KPM):
            kT = tl.load(
                K_bg + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                mask=(offs_d[:, None] < D) & (cols[None, :] < Lk),
                other=0.0,
            )
            s = _scores(q, kT, MASK, KPM, offs_m, start_n, mask_base, stride_mm, stride_mn, kpm_base, stride_kpn,
                        Lq, Lk, qk_scale, MASK_KIND, HAS_KPM, IS_CAUSAL, DOT_PREC, BLOCK_N)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed_lo, seed_hi, drop_thresh, rows, cols)
                p = tl.where(keep, p * drop_scale, 0.0)
            v = tl.load(
                V_bg + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(cols[:, None] < Lk) & (offs_dv[None, :] < Dv),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    # 4. Normalize; rows with no allowed key keep acc = 0 and get LSE = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptr = O + split * stride_os + b * stride_ob + h * stride_oh
    o_ptr += offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < Dv))
    tl.store(LSE + split * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def attn_merge(
    OP, LP, O, LSE,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
    stride_ls, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Merge split-KV partials; grid (cdiv(Lq, BM), B*Hq).

        lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s

    OP (S, B, Hq, Lq, Dv) fp32, LP (S, B, Hq, Lq) fp32 -> O (B, Hq, Lq, Dv), LSE (B, Hq, Lq) fp32.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    lp = LP + b * stride_lb + h * stride_lh + offs_m
    # 1. Max over the splits' LSEs (guarded against all -inf).
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(lp + s * stride_ls, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # 2. Weighted sum of the partial outputs.
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    op = OP + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_dv[None, :] * stride_pd
    io_mask = row_ok[:, None] & (offs_dv[None, :] < Dv)
    for s in range(NUM_SPLITS):
        w = tl.exp(tl.load(lp + s * stride_ls, mask=row_ok, other=float("-inf")) - m_safe)
        total += w
        acc += w[:, None] * tl.load(op + s * stride_ps, mask=io_mask, other=0.0)
    # 3. Normalize; rows with nothing allowed in any split: out 0, LSE -inf.
    empty = total == 0.0
    t_safe = tl.where(empty, 1.0, total)
    out = acc / t_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(t_safe))
    o_ptr = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)  # LSE is contiguous


@triton.jit
def attn_bwd_preprocess(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Lq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    """delta[b,h,i] = sum_d dO * out - dlse; grid (cdiv(Lq, BM), B*Hq). DLSE/DELTA (B, Hq, Lq) fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    io_mask = row_ok[:, None] & (offs_dv[None, :] < Dv)
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        mask=io_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=io_mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lin = pid_bh.to(tl.int64) * Lq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + lin, mask=row_ok, other=0.0)
    tl.store(DELTA + lin, delta, mask=row_ok)


@triton.jit
def _bwd_tile(s, lse2, delta, do, vT, rows, cols, seed_lo, seed_hi, drop_thresh, drop_scale,
              HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Recompute p z and dS = p (dP - delta) for one [BM, BN] tile (see the module docstring).

    s: base-2 scores (-inf where not allowed); lse2: base-2 LSE, +inf for empty rows so p = 0.
    """
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, drop_thresh, rows, cols)
        pz = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pz = p
    return pz, p * (dp - delta[:, None])


@triton.jit
def _load_lse2(LSE, lin, row_ok):
    """Base-2 LSE of a row block; +inf for empty (LSE -inf) and out-of-range rows, so p = 0 there."""
    lse = tl.load(LSE + lin, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kpb, stride_kpn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hkv, Lq, Lk, D, Dv,
    qk_scale, scale, seed_lo, seed_hi, drop_thresh, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile of one KV head; grid (cdiv(Lk, BN), B*Hkv).

    Loops over the Hq/Hkv query heads sharing this KV head and over their query tiles, so each
    dk/dv element is written once (no atomics). DK/DV have key/value's shapes, any strides.
    """
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // Hkv).to(tl.int64)
    g = (pid_bg % Hkv).to(tl.int64)
    group = Hq // Hkv
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < Lk
    kpm_base = b * stride_kpb
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # 1. A tile of padding keys has zero gradients: skip all the work, store zeros.
    if _tile_live(KPM, kpm_base, stride_kpn, cols, Lk, HAS_KPM):
        kT = tl.load(
            K + b * stride_kb + g * stride_kh + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
            mask=(offs_d[:, None] < D) & col_ok[None, :],
            other=0.0,
        )
        vT = tl.load(
            V + b * stride_vb + g * stride_vh + offs_dv[:, None] * stride_vd + cols[None, :] * stride_vn,
            mask=(offs_dv[:, None] < Dv) & col_ok[None, :],
            other=0.0,
        )
        # 2. Causal: query rows before start_n - (Lk - Lq) cannot see this tile.
        m_lo = 0
        if IS_CAUSAL:
            m_lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
        for hh in range(0, group):
            h = g * group + hh
            mask_base = b * stride_mb + h * stride_mh
            for start_m in range(m_lo, Lq, BLOCK_M):
                # 3. Recompute p and dS for this (query tile, key tile); accumulate dv, dk.
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_ok = offs_m < Lq
                q = tl.load(
                    Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )
                do = tl.load(
                    DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                    mask=row_ok[:, None] & (offs_dv[None, :] < Dv),
                    other=0.0,
                )
                lin = (b * Hq + h) * Lq + offs_m
                lse2 = _load_lse2(LSE, lin, row_ok)
                delta = tl.load(DELTA + lin, mask=row_ok, other=0.0)
                s = _scores(q, kT, MASK, KPM, offs_m, start_n, mask_base, stride_mm, stride_mn, kpm_base, stride_kpn,
                            Lq, Lk, qk_scale, MASK_KIND, HAS_KPM, IS_CAUSAL, DOT_PREC, BLOCK_N)  # fmt: skip
                pz, ds = _bwd_tile(s, lse2, delta, do, vT, lin, cols, seed_lo, seed_hi, drop_thresh, drop_scale,
                                   HAS_DROPOUT, DOT_PREC)  # fmt: skip
                dv += tl.dot(tl.trans(pz).to(do.dtype), do, input_precision=DOT_PREC)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    # 4. dk carries the softmax scale (s = scale q k); padded rows/dims are not stored.
    dk_ptr = DK + b * stride_dkb + g * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    dv_ptr = DV + b * stride_dvb + g * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < Dv))


@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DMASK, KPM, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpb, stride_kpn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hkv, Lq, Lk, D, Dv,
    qk_scale, scale, seed_lo, seed_hi, drop_thresh, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dq of one query tile (and dS into DMASK (B, Hq, Lq, Lk) fp32, contiguous, when MASK_GRAD);
    grid (cdiv(Lq, BM), B*Hq). DMASK must be zero-filled: skipped tiles are not written."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    g = h // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    # 1. Row data: q, dO, base-2 LSE and delta, loaded once.
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=row_ok[:, None] & (offs_dv[None, :] < Dv),
        other=0.0,
    )
    lin = pid_bh.to(tl.int64) * Lq + offs_m
    lse2 = _load_lse2(LSE, lin, row_ok)
    delta = tl.load(DELTA + lin, mask=row_ok, other=0.0)
    K_bg = K + b * stride_kb + g * stride_kh
    V_bg = V + b * stride_vb + g * stride_vh
    mask_base = b * stride_mb + h * stride_mh
    kpm_base = b * stride_kpb
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, tl.minimum((pid_m + 1) * BLOCK_M, Lq) + (Lk - Lq))
    # 2. Walk the key tiles (padding tiles skipped): dq += dS k.
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        if _tile_live(KPM, kpm_base, stride_kpn, cols, Lk, HAS_KPM):
            col_ok = cols < Lk
            k = tl.load(
                K_bg + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            vT = tl.load(
                V_bg + offs_dv[:, None] * stride_vd + cols[None, :] * stride_vn,
                mask=(offs_dv[:, None] < Dv) & col_ok[None, :],
                other=0.0,
            )
            s = _scores(q, tl.trans(k), MASK, KPM, offs_m, start_n, mask_base, stride_mm, stride_mn, kpm_base,
                        stride_kpn, Lq, Lk, qk_scale, MASK_KIND, HAS_KPM, IS_CAUSAL, DOT_PREC, BLOCK_N)  # fmt: skip
            pz, ds = _bwd_tile(s, lse2, delta, do, vT, lin, cols, seed_lo, seed_hi, drop_thresh, drop_scale,
                               HAS_DROPOUT, DOT_PREC)  # fmt: skip
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if MASK_GRAD:  # dL/dbias = dS
                dm_ptr = DMASK + lin[:, None] * Lk + cols[None, :]
                tl.store(dm_ptr, ds, mask=row_ok[:, None] & col_ok[None, :])
    dq_ptr = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
