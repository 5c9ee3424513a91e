// The contrastive losses' tile products and tile schedule (CPU), shared by the forward
// (cpu_forward.cpp) and the backward (cpu_backward.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_blas.h"
#include "common/cpu_gemm_bf16.h"
#include "common/cpu_gemm_f32.h"

namespace mmfast::contrastive {

using cpu::acc_type;  // float for fp32 / bf16 / fp16, double for fp64

// ---------------------------------------------------------------------------------------------
// The three tile products, on raw pointers (a tile is ~1 ms of work; ATen calls per tile would add
// allocations and dispatch). x (N x D) and y (M x D) are contiguous.
//   logits: U (bn x bm, row stride ldu) = x_blk y_blkᵀ
//   grad_x: dx_blk (bn x D) += s G y_blk          G: bn x bm in the input dtype, row stride ldg
//   grad_y: dy_blk (bm x D) += s Gᵀ x_blk
// fp32 on a CPU with AVX-512 runs the FMA kernel of common/cpu_gemm_f32.h: yᵀ is packed once per
// call (the size of y), and for the backward y as well (grad_x's B: a panel of a row-major y block
// has its rows D floats apart, which crowds a few L1 sets; packed, the loss runs ~2-3% faster).
// grad_y's B, x_blk, has the same problem and is packed per row block into a per-thread buffer
// (pack_x_block: the size of one block, not of x); its A, Gᵀ, is read straight from G (row stride
// 1). bf16 on a CPU with AVX512_BF16 runs the vdpbf16ps kernel (common/cpu_gemm_bf16.h) on
// operands packed once per call (yᵀ for logits, y and x for the gradients; each the size of the
// input), and grad_y then reads Gᵀ, which the caller writes beside G. Everything else goes to MKL
// (cpu::gemm: SGEMM / DGEMM, or bf16/fp16 x bf16/fp16 -> fp32; on a CPU with AMX, MKL's bf16 GEMM
// runs on the tiles). The path is the one common/cpu_isa.h picks per dtype (mmfast.cpu_options
// forces one: gemm="avx2" or "blas" puts fp32 on MKL, "amx" or "blas" puts bf16 on MKL).
// ---------------------------------------------------------------------------------------------
// Instantiated for float, double, at::BFloat16 and at::Half (cpu_tiles.cpp).
template <typename scalar_t>
class TileProducts {
 public:
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  static constexpr bool kF32 = std::is_same_v<scalar_t, float>;

  // Packs what the chosen kernel needs once per call (backward: the operands of grad_x, grad_y too).
  TileProducts(const at::Tensor& x, const at::Tensor& y, bool backward);
  bool avx512() const { return avx512_; }  // fp32 on the AVX-512 kernel
  bool vnni() const { return vnni_; }      // bf16 on the vdpbf16ps kernel
  // Whether logits_epilogue runs (the tile in registers): avx512() or vnni().
  bool fused() const { return avx512_ || vnni_; }

  void logits(int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U, int64_t ldu) const;
  // The logits tile handed to epi in registers (InfoNceLseTile, InfoNceGradTile), U never stored;
  // only where fused(). j0 is a multiple of the column block, so of the panel width.
  template <typename Epi>
  void logits_epilogue(int64_t i0, int64_t bn, int64_t j0, int64_t bm, Epi& epi) const {
    if constexpr (kF32) {
      cpu::gemm_f32_epilogue(bn, bm, D_, x_ + i0 * D_, D_, 1, yt_f32_.data_ptr<float>() + j0 * D_,
                             cpu::kF32Cols, D_ * cpu::kF32Cols, epi);
    } else if constexpr (kBf16) {
      const int64_t ps = cpu::vnni_panel_stride(D_);
      cpu::gemm_bf16_vnni_epilogue(bn, bm, D_, raw(x_ + i0 * D_), D_, yt_.get() + j0 / cpu::kVnniCols * ps,
                                   ps, epi);
    }
  }
  void grad_x(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G, int64_t ldg, acc_t s,
              acc_t* dx, bool accumulate) const;
  // fp32 on the AVX-512 kernel: x_blk (bn rows from i0) packed into xp, grad_y's B (the caller's
  // per-thread buffer of x_block_size(bn) floats, packed once per row block).
  int64_t x_block_size(int64_t bn) const { return cpu::f32_packed_size(bn, D_); }
  void pack_x_block(int64_t i0, int64_t bn, float* xp) const;
  // G (bn x bm, ldg) feeds MKL and the fp32 kernel (with xp, x_blk packed by pack_x_block); Gᵀ
  // (bm x bn, ldgt) the vdpbf16ps kernel.
  void grad_y(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G, int64_t ldg,
              const scalar_t* Gt, int64_t ldgt, const float* xp, acc_t s, acc_t* dy, bool accumulate) const;

 private:
  static const uint16_t* raw(const scalar_t* p) { return reinterpret_cast<const uint16_t*>(p); }

  const scalar_t* x_;
  const scalar_t* y_;
  int64_t N_, M_, D_;
  bool vnni_ = false, avx512_ = false;
  std::unique_ptr<uint16_t[]> yt_, y_rows_, x_rows_;  // bf16 packs (vdpbf16ps)
  at::Tensor yt_f32_, y_rows_f32_;                    // fp32 packs (AVX-512)
};

// How the rows are cut: one contiguous chunk of row blocks per thread. The forward and the backward
// use the same tiles, so each logit is computed by the same GEMM call (same shapes, same summation
// order, whichever library runs it) in both: the backward reproduces the forward's S bit for bit.
struct Tiling {
  int64_t bn, bm, chunks, rows_per_chunk;
};
Tiling make_tiling(int64_t N, int64_t M);

// Calls fn(chunk, i0, bn_actual, j0, bm_actual, U) for every tile of U = x yᵀ: U points to the
// thread's BN x BM acc-dtype workspace (row-major, ld = BM) holding the tile in its top-left corner
// (with logits = false, fn computes the tile itself and U is only the workspace). Chunks run in
// parallel; per_row_block(chunk, i0, bn) runs after each row block's last tile.
template <typename scalar_t, typename TileFn, typename RowFn>
void for_each_tile(const TileProducts<scalar_t>& tp, int64_t N, int64_t M, const Tiling& tl, TileFn&& fn,
                   RowFn&& per_row_block, bool logits = true) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, tl.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> U(tl.bn * tl.bm);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r_end = std::min(N, (c + 1) * tl.rows_per_chunk);
      for (int64_t i0 = c * tl.rows_per_chunk; i0 < r_end; i0 += tl.bn) {
        const int64_t bn = std::min(tl.bn, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.bm) {
          const int64_t bm = std::min(tl.bm, M - j0);
          if (logits) tp.logits(i0, bn, j0, bm, U.data(), tl.bm);
          fn(c, i0, bn, j0, bm, U.data());
        }
        per_row_block(c, i0, bn);
      }
    }
  });
}

// Calls fn(chunk, i0, bn, j0, bm, U) for every tile, in tl.chunks phases: in phase p, row chunk c
// takes the column chunk (c + p) mod T (T = tl.chunks; column chunk q holds the column blocks
// [q B / T, (q + 1) B / T) of the B blocks). U is the thread's BN x BM workspace; fn computes the
// tile. Each phase is one parallel_for, so a phase's writes are done before the next starts.
template <typename scalar_t, typename TileFn>
void for_each_tile_phased(int64_t N, int64_t M, const Tiling& tl, TileFn&& fn) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = tl.chunks, col_blocks = (M + tl.bm - 1) / tl.bm;
  std::vector<std::vector<acc_t>> U(T);
  for (int64_t p = 0; p < T; ++p) {
    at::parallel_for(0, T, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        U[c].resize(tl.bn * tl.bm);
        const int64_t q = (c + p) % T;
        const int64_t j_begin = q * col_blocks / T * tl.bm;
        const int64_t j_end = std::min(M, (q + 1) * col_blocks / T * tl.bm);
        const int64_t r_end = std::min(N, (c + 1) * tl.rows_per_chunk);
        for (int64_t i0 = c * tl.rows_per_chunk; i0 < r_end; i0 += tl.bn) {
          for (int64_t j0 = j_begin; j0 < j_end; j0 += tl.bm) {
            fn(c, i0, std::min(tl.bn, N - i0), j0, std::min(tl.bm, M - j0), U[c].data());
          }
        }
      }
    });
  }
}

}  // namespace mmfast::contrastive
