// Host-side launch sequences of the contrastive kernels (kernel.cuh): which kernels run, in which
// order, on which buffers. Torch-free: cuda.cu (through glue.h) runs them on the GPU, the emulated
// test module and the ThreadSanitizer driver run them on the CPU.
#pragma once

#include "contrastive/kernel_bwd.cuh"
#include "contrastive/kernel_fwd.cuh"

namespace mmfast {
namespace contrastive {

// ==== host side: the launch sequences (torch-free; cuda.cu and the emulated module call these) ====
struct Problem {
  const void* x;  // N x D, row stride ldx, last dim contiguous
  const void* y;  // M x D, row stride ldy
  int64_t ldx, ldy;
  int N, M, D;
  const float* scale;     // 0-dim fp32 on the device
  const float* bias;      // 0-dim fp32 on the device
  const int64_t* labels;  // or nullptr
  int loss, direction, reduction;
  bool vec;  // x, y 16-byte aligned with row strides a multiple of 16 bytes (cp.async is legal)
};

// Device buffers of the forward (sizes in elements). InfoNCE: row_stat (N) = row_lse, col_stat (M) =
// col_lse, col_part (stripes * M * 2), img_rows (N), txt_rows (M). SigLIP: img_rows (N) only.
// target (N): the block primitive's target logits (forward_block), else nullptr.
struct FwdBuffers {
  int* t;  // N
  int* u;  // M
  float *row_stat, *col_stat, *col_part, *img_rows, *txt_rows;
  float* out;   // R (reduction none) or 1
  int stripes;  // <= number of 64-row tiles
  float* target;
};

// Device buffers of the backward. acc_x (N x D) and acc_y (M x D) zero-filled; red 3 * ceil(N / 64).
// backward: a, c from grad_loss (coef_kernel); backward_block: a, c given (grad_loss unused) and
// dx, dy nullptr (the caller scales acc_x, acc_y by s * norm).
struct BwdBuffers {
  int* t;  // N
  int* u;  // M
  float *a, *c, *norm, *acc_x, *acc_y, *red;
  const float *row_stat, *col_stat;  // row_lse (N), col_lse (M) (InfoNCE, where the loss reads them)
  const float* grad_loss;
  void* dx;                              // N x D, contiguous
  void* dy;                              // M x D, contiguous
  float *dscale_parts, *dscale, *dbias;  // parts: 2 (row terms, column terms); dscale may be nullptr
  bool row_terms, col_terms;             // InfoNCE: the image (text) direction is in the loss
};

inline int row_tiles(int n) { return (n + kBM - 1) / kBM; }

#if MMFAST_EMULATION
template <class K>
inline void allow_smem(K, int) {}
#else
template <class K>
inline void allow_smem(K kernel, int bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
#endif

template <class T>
void forward(const Problem& pb, const FwdBuffers& b, stream_t stream) {
  const dim3_t block(kThreads);
  MMFAST_LAUNCH(targets_kernel, dim3_t(1), block, 0, stream,
                TargetParams{pb.labels, pb.N, pb.M, pb.direction, b.t, b.u});
  const bool nce = pb.loss == kInfoNCE;
  const FwdParams fp{pb.x,
                     pb.y,
                     pb.ldx,
                     pb.ldy,
                     pb.N,
                     pb.M,
                     pb.D,
                     pb.scale,
                     pb.bias,
                     pb.loss,
                     pb.vec,
                     b.t,
                     nce ? b.row_stat : b.img_rows,
                     b.col_part};
  constexpr int smem = fwd_smem_bytes(sizeof(T));
  allow_smem(fwd_tiles_kernel<T>, smem);
  MMFAST_LAUNCH(fwd_tiles_kernel<T>, dim3_t(b.stripes), block, smem, stream, fp);
  if (nce) {
    MMFAST_LAUNCH(colmerge_kernel, dim3_t((pb.M + kThreads - 1) / kThreads), block, 0, stream, b.col_part,
                  b.stripes, pb.M, b.col_stat);
    const PairParams pp{pb.x,     pb.y, pb.ldx, pb.ldy,     pb.N,       pb.M,       pb.D,       pb.direction,
                        pb.scale, b.t,  b.u,    b.row_stat, b.col_stat, b.img_rows, b.txt_rows, b.target};
    const int pairs = pb.direction == kText ? pb.M : pb.N, warps = kThreads / 32;
    MMFAST_LAUNCH(pairs_kernel<T>, dim3_t((pairs + warps - 1) / warps), block, 0, stream, pp);
  }
  if (b.out == nullptr) return;  // the block primitive stops at the statistics
  const FinishParams fin{b.img_rows, b.txt_rows, pb.N, pb.M, pb.loss, pb.direction, pb.reduction, b.out};
  MMFAST_LAUNCH(finish_kernel, dim3_t(1), block, kThreads * sizeof(float), stream, fin);
}

template <class T>
void backward(const Problem& pb, const BwdBuffers& b, stream_t stream) {
  const dim3_t block(kThreads);
  MMFAST_LAUNCH(targets_kernel, dim3_t(1), block, 0, stream,
                TargetParams{pb.labels, pb.N, pb.M, pb.direction, b.t, b.u});
  if (b.grad_loss != nullptr) {
    MMFAST_LAUNCH(coef_kernel, dim3_t(1), block, kThreads * sizeof(float), stream,
                  CoefParams{b.grad_loss, pb.N, pb.M, pb.loss, pb.direction, pb.reduction, b.a, b.c, b.norm});
  } else {
    MMFAST_LAUNCH(norm_kernel, dim3_t(1), block, kThreads * sizeof(float), stream, b.a, pb.N, b.c, pb.M,
                  b.norm);
  }
  constexpr int smem = bwd_smem_bytes(sizeof(T));
  allow_smem(bwd_tiles_kernel<T>, smem);
  const bool nce = pb.loss == kInfoNCE;
  // dx: own = x (rows i), other = y (columns j).
  BwdParams px{pb.x,
               pb.y,
               pb.ldx,
               pb.ldy,
               pb.N,
               pb.M,
               pb.D,
               pb.scale,
               pb.bias,
               b.norm,
               pb.loss,
               pb.vec,
               nce && b.row_terms,
               nce && b.col_terms,
               b.row_stat,
               b.col_stat,
               b.a,
               b.c,
               b.t,
               b.u,
               b.acc_x,
               b.dx,
               b.red};
  MMFAST_LAUNCH(bwd_tiles_kernel<T>, dim3_t(row_tiles(pb.N)), block, smem, stream, px);
  // dy: the same with the roles swapped (column-parallel over the logits).
  BwdParams py{pb.y,
               pb.x,
               pb.ldy,
               pb.ldx,
               pb.M,
               pb.N,
               pb.D,
               pb.scale,
               pb.bias,
               b.norm,
               pb.loss,
               pb.vec,
               nce && b.col_terms,
               nce && b.row_terms,
               b.col_stat,
               b.row_stat,
               b.c,
               b.a,
               b.u,
               b.t,
               b.acc_y,
               b.dy,
               nullptr};
  MMFAST_LAUNCH(bwd_tiles_kernel<T>, dim3_t(row_tiles(pb.M)), block, smem, stream, py);
  MMFAST_LAUNCH(dscale_kernel, dim3_t(1), block, kThreads * sizeof(float), stream, b.red, row_tiles(pb.N),
                b.dscale_parts, b.dscale, b.dbias);
}

}  // namespace contrastive
}  // namespace mmfast
