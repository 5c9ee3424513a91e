// The contrastive losses' tile products (cpu_tiles.h): each product on the kernel the CPU path of its
// dtype selects, on operands packed once per call where that kernel wants them packed.
#include "contrastive/cpu_tiles.h"

#include "common/cpu_alloc.h"
#include "common/cpu_isa.h"

namespace mmfast::contrastive {
namespace {

constexpr int64_t kBlockRows = 256;  // BN: rows of a tile (image features)
constexpr int64_t kBlockCols = 256;  // BM: columns of a tile (text features)

// B (K x cols; element (k, n) at b[k * sk + n * sn]) packed for gemm_bf16_vnni, panels in parallel.
std::unique_ptr<uint16_t[]> pack(const uint16_t* b, int64_t sk, int64_t sn, int64_t K, int64_t cols) {
  std::unique_ptr<uint16_t[]> dst(new uint16_t[cpu::vnni_packed_size(K, cols)]);
  const int64_t panels = (cols + cpu::kVnniCols - 1) / cpu::kVnniCols;
  at::parallel_for(0, panels, 1,
                   [&](int64_t p0, int64_t p1) { cpu::pack_vnni(b, sk, sn, K, cols, dst.get(), p0, p1); });
  return dst;
}
// The same for gemm_f32 (fp32 only; the caller's scalar_t is float), on 2 MB pages: the logits
// and grad_x products stream these panels from memory, and on 4 KB pages their TLB misses slow
// those products by ~5% (per-product replay: benchmarks/contrastive_tiles.cpp; the vdpbf16ps packs
// measured slower on 2 MB pages and stay on ordinary ones). From the huge-page block cache, so
// the backward reuses the forward's block and a training loop takes no page faults.
at::Tensor pack32(const float* f, int64_t sk, int64_t sn, int64_t K, int64_t cols) {
  at::Tensor dst =
      cpu::empty_hugepage({cpu::f32_packed_size(K, cols)}, at::TensorOptions().dtype(at::kFloat));
  float* d = dst.data_ptr<float>();
  const int64_t panels = (cols + cpu::kF32Cols - 1) / cpu::kF32Cols;
  at::parallel_for(0, panels, 1,
                   [&](int64_t p0, int64_t p1) { cpu::pack_f32(f, sk, sn, K, cols, d, p0, p1); });
  return dst;
}

}  // namespace

template <typename scalar_t>
TileProducts<scalar_t>::TileProducts(const at::Tensor& x, const at::Tensor& y, bool backward)
    : x_(x.data_ptr<scalar_t>()), y_(y.data_ptr<scalar_t>()), N_(x.size(0)), M_(y.size(0)), D_(x.size(1)) {
  if constexpr (kF32) {
    avx512_ = cpu::gemm_for(at::kFloat) == cpu::Gemm::kAvx512;
    if (avx512_) {
      yt_f32_ = pack32(reinterpret_cast<const float*>(y_), 1, D_, D_, M_);  // yᵀ: K = D, columns = texts
      if (backward)
        y_rows_f32_ = pack32(reinterpret_cast<const float*>(y_), D_, 1, M_, D_);  // y: K = texts, columns = D
    }
  }
  if constexpr (kBf16) {
    vnni_ = cpu::gemm_for(at::kBFloat16) == cpu::Gemm::kAvx512Bf16;
    if (vnni_) {
      yt_ = pack(raw(y_), 1, D_, D_, M_);  // yᵀ: K = D, columns = texts
      if (backward) {
        y_rows_ = pack(raw(y_), D_, 1, M_, D_);  // y: K = texts, columns = D
        x_rows_ = pack(raw(x_), D_, 1, N_, D_);  // x: K = images, columns = D
      }
    }
  }
}

template <typename scalar_t>
void TileProducts<scalar_t>::logits(int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U,
                                    int64_t ldu) const {
  if constexpr (kF32) {
    if (avx512_) {  // j0 is a multiple of the column block, so of the panel width
      cpu::gemm_f32(bn, bm, D_, 1.f, x_ + i0 * D_, D_, 1, yt_f32_.data_ptr<float>() + j0 * D_, cpu::kF32Cols,
                    D_ * cpu::kF32Cols, U, ldu, false);
      return;
    }
  }
  if constexpr (kBf16) {
    // K in L1-sized chunks (gemm_bf16_vnni): over the whole K (logits_epilogue) SigLIP's loss ran
    // slower. Only SigLIP stores the tile, in its forward and backward alike, so their S agree.
    if (vnni_) {  // j0 is a multiple of the column block, so of the panel width
      const int64_t ps = cpu::vnni_panel_stride(D_);
      cpu::gemm_bf16_vnni(bn, bm, D_, 1.f, raw(x_ + i0 * D_), D_, yt_.get() + j0 / cpu::kVnniCols * ps, ps, U,
                          ldu, false);
      return;
    }
  }
  cpu::gemm<scalar_t>(false, true, bn, bm, D_, acc_t(1), x_ + i0 * D_, D_, y_ + j0 * D_, D_, acc_t(0), U,
                      ldu);
}

template <typename scalar_t>
void TileProducts<scalar_t>::grad_x(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G,
                                    int64_t ldg, acc_t s, acc_t* dx, bool accumulate) const {
  if constexpr (kF32) {
    if (avx512_) {  // B = y_blk, packed: k row j0 of every panel
      cpu::gemm_f32(bn, D_, bm, s, G, ldg, 1, y_rows_f32_.data_ptr<float>() + j0 * cpu::kF32Cols,
                    cpu::kF32Cols, M_ * cpu::kF32Cols, dx + i0 * D_, D_, accumulate);
      return;
    }
  }
  if constexpr (kBf16) {
    if (vnni_) {  // j0 is even: the packed rows of y start at pair j0 / 2
      cpu::gemm_bf16_vnni(bn, D_, bm, s, raw(G), ldg, y_rows_.get() + j0 * cpu::kVnniCols,
                          cpu::vnni_panel_stride(M_), dx + i0 * D_, D_, accumulate);
      return;
    }
  }
  cpu::gemm<scalar_t>(false, false, bn, D_, bm, s, G, ldg, y_ + j0 * D_, D_, acc_t(accumulate ? 1 : 0),
                      dx + i0 * D_, D_);
}

template <typename scalar_t>
void TileProducts<scalar_t>::pack_x_block(int64_t i0, int64_t bn, float* xp) const {
  if constexpr (kF32)
    cpu::pack_f32(x_ + i0 * D_, D_, 1, bn, D_, xp, 0, (D_ + cpu::kF32Cols - 1) / cpu::kF32Cols);
}

template <typename scalar_t>
void TileProducts<scalar_t>::grad_y(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G,
                                    int64_t ldg, const scalar_t* Gt, int64_t ldgt, const float* xp, acc_t s,
                                    acc_t* dy, bool accumulate) const {
  if constexpr (kF32) {
    if (avx512_) {  // A = Gᵀ read from G (row stride 1, k stride ldg), B = x_blk packed in xp
      cpu::gemm_f32(bm, D_, bn, s, G, 1, ldg, xp, cpu::kF32Cols, bn * cpu::kF32Cols, dy + j0 * D_, D_,
                    accumulate);
      return;
    }
  }
  if constexpr (kBf16) {
    if (vnni_) {  // i0 is even (a multiple of the row block)
      cpu::gemm_bf16_vnni(bm, D_, bn, s, raw(Gt), ldgt, x_rows_.get() + i0 * cpu::kVnniCols,
                          cpu::vnni_panel_stride(N_), dy + j0 * D_, D_, accumulate);
      return;
    }
  }
  cpu::gemm<scalar_t>(true, false, bm, D_, bn, s, G, ldg, x_ + i0 * D_, D_, acc_t(accumulate ? 1 : 0),
                      dy + j0 * D_, D_);
}

Tiling make_tiling(int64_t N, int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Smaller row blocks when N is small, so every thread gets rows (multiples of 16 rows).
  int64_t bn = std::min<int64_t>(kBlockRows, (N + threads - 1) / threads);
  bn = std::max<int64_t>(16, (bn + 15) / 16 * 16);
  const int64_t row_blocks = (N + bn - 1) / bn;
  const int64_t chunks = std::min(threads, row_blocks);
  const int64_t rows_per_chunk = (row_blocks + chunks - 1) / chunks * bn;
  // Column blocks narrow enough for every thread to get a column chunk in each phase of the backward
  // (a multiple of 32, the width of the packed panels that a block must start on).
  const int64_t bm =
      std::min({kBlockCols, M, std::max<int64_t>(32, ((M + chunks - 1) / chunks + 31) / 32 * 32)});
  return {bn, bm, chunks, rows_per_chunk};
}

template class TileProducts<float>;
template class TileProducts<double>;
template class TileProducts<at::BFloat16>;
template class TileProducts<at::Half>;

}  // namespace mmfast::contrastive
