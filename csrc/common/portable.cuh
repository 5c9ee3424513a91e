// Portability layer for mmfast device code: the same kernel source compiles with nvcc (real CUDA,
// sm_80+) or as plain C++ (g++) that runs on the CPU under the SIMT emulation in emu.h.
//
// ---------------------------------------------------------------------------------------------
// API (namespace mmfast::port; everything is a device function unless said otherwise)
//
//   Qualifiers   MMFAST_DEVICE (inline device fn), MMFAST_HOST_DEVICE, MMFAST_GLOBAL (kernel),
//                MMFAST_LAUNCH_BOUNDS(threads), MMFAST_DEVICE_ASSERT(cond), MMFAST_UNROLL
//                (#pragma unroll under nvcc), MMFAST_EMULATION
//                (defined to 1 under emulation, 0 under nvcc), MMFAST_LAUNCH(kernel, grid, block,
//                smem, stream, args...) (host: <<<>>> under nvcc, emu::launch otherwise);
//                host types port::dim3_t, port::stream_t (cudaStream_t; int under emulation).
//   Indices      thread_x/y/z(), block_x/y/z(), block_dim_x/y/z(), grid_dim_x/y/z(),
//                lane_id() (threadIdx linearized % 32), warp_id() (linearized / 32).
//   Memory       dynamic_smem<T>(): the block's dynamic shared memory (the ONLY shared memory a
//                portable kernel may use; no static __shared__ arrays).
//   Sync         block_sync() (__syncthreads), warp_sync() (__syncwarp with a full mask).
//   Shuffles     shfl_xor(v, lane_mask), shfl(v, src_lane) for float, int, uint32_t; full warp.
//   Types        half_t (__half), bf16_t (__nv_bfloat16); to_float(x) (float/half_t/bf16_t),
//                from_float<T>(f) (round to nearest even), bits_of(x), from_bits<T>(u16),
//                pack2<T>(lo, hi) -> uint32_t with lo in the low 16 bits, unpack<T>(r, 0|1)
//                -> float (T = half_t or bf16_t).
//   Tensor core  mma_m16n8k16<T>(d[4], a[4], b[2], c[4]): D = A(16x16, row) * B(16x8, col) + C,
//                T = half_t or bf16_t inputs, fp32 accumulate; d may alias c. Fragment layouts
//                (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane >> 2, t = lane % 4:
//                  A: a[0] = (A[g][2t], A[g][2t+1])      a[1] = (A[g+8][2t], A[g+8][2t+1])
//                     a[2] = (A[g][2t+8], A[g][2t+9])    a[3] = (A[g+8][2t+8], A[g+8][2t+9])
//                  B: b[0] = (B[2t][g], B[2t+1][g])      b[1] = (B[2t+8][g], B[2t+9][g])
//                  C: c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
//   ldmatrix     ldmatrix_x1/x2/x4(r, row_ptr) and ldmatrix_x1/x2/x4_trans: r[i] = matrix i (8x8
//                16-bit) whose row k starts at the row_ptr of lane 8i + k (16-byte aligned shared
//                address). Non-trans: lane l gets (M[l/4][2(l%4)], M[l/4][2(l%4)+1]); trans: lane
//                l gets (M[2(l%4)][l/4], M[2(l%4)+1][l/4]). For an A operand stored row-major
//                [m][k]: x4 with row_ptr = &A[l%16][(l/16)*8]. For a B operand stored [n][k]
//                (k contiguous): non-trans; stored [k][n]: .trans.
//   cp.async     cp_async_16(smem_dst, gmem_src, src_bytes = 16): copy 16 bytes global->shared
//                asynchronously, zero-filling past src_bytes (0 = pure zero fill; both pointers
//                16-byte aligned); cp_async_commit(); cp_async_wait<N>() (wait until at most N
//                committed groups are pending). Follow a wait with block_sync() before other
//                threads read the data.
//
// Rules for portable kernels: block sizes are multiples of 32; every lane of a warp reaches the
// same warp collective (no divergence around shuffles/mma/ldmatrix); kernels are free functions
// taking their arguments by value (a params struct).
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MMFAST_EMULATION 0
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MMFAST_DEVICE __device__ __forceinline__
#define MMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#define MMFAST_GLOBAL __global__
#define MMFAST_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define MMFAST_DEVICE_ASSERT(cond) \
  do {                             \
    if (!(cond)) __trap();         \
  } while (0)
#define MMFAST_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define MMFAST_UNROLL _Pragma("unroll")
#else
#define MMFAST_EMULATION 1
#include "common/emu.h"
#define MMFAST_DEVICE inline
#define MMFAST_HOST_DEVICE inline
#define MMFAST_GLOBAL
#define MMFAST_LAUNCH_BOUNDS(n)
#define MMFAST_DEVICE_ASSERT(cond) ((cond) ? (void)0 : ::mmfast::emu::device_fail(#cond, __FILE__, __LINE__))
#define MMFAST_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mmfast::emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
#define MMFAST_UNROLL
#endif

namespace mmfast {
namespace port {

#if MMFAST_EMULATION
using dim3_t = emu::Dim3;
using stream_t = int;  // ignored: emulated launches are synchronous
#else
using dim3_t = dim3;
using stream_t = cudaStream_t;
#endif

// ---- indices ------------------------------------------------------------------------------
#if MMFAST_EMULATION
MMFAST_DEVICE int thread_x() { return emu::self().tid.x; }
MMFAST_DEVICE int thread_y() { return emu::self().tid.y; }
MMFAST_DEVICE int thread_z() { return emu::self().tid.z; }
MMFAST_DEVICE int block_x() { return emu::self().block->idx.x; }
MMFAST_DEVICE int block_y() { return emu::self().block->idx.y; }
MMFAST_DEVICE int block_z() { return emu::self().block->idx.z; }
MMFAST_DEVICE int block_dim_x() { return emu::self().block_dim.x; }
MMFAST_DEVICE int block_dim_y() { return emu::self().block_dim.y; }
MMFAST_DEVICE int block_dim_z() { return emu::self().block_dim.z; }
MMFAST_DEVICE int grid_dim_x() { return emu::self().grid_dim.x; }
MMFAST_DEVICE int grid_dim_y() { return emu::self().grid_dim.y; }
MMFAST_DEVICE int grid_dim_z() { return emu::self().grid_dim.z; }
MMFAST_DEVICE int linear_thread() { return emu::self().linear; }
template <class T>
MMFAST_DEVICE T* dynamic_smem() {
  return reinterpret_cast<T*>(emu::self().block->smem);
}
MMFAST_DEVICE void block_sync() { emu::block_sync(); }
MMFAST_DEVICE void warp_sync() { emu::warp_sync(); }
#else
MMFAST_DEVICE int thread_x() { return threadIdx.x; }
MMFAST_DEVICE int thread_y() { return threadIdx.y; }
MMFAST_DEVICE int thread_z() { return threadIdx.z; }
MMFAST_DEVICE int block_x() { return blockIdx.x; }
MMFAST_DEVICE int block_y() { return blockIdx.y; }
MMFAST_DEVICE int block_z() { return blockIdx.z; }
MMFAST_DEVICE int block_dim_x() { return blockDim.x; }
MMFAST_DEVICE int block_dim_y() { return blockDim.y; }
MMFAST_DEVICE int block_dim_z() { return blockDim.z; }
MMFAST_DEVICE int grid_dim_x() { return gridDim.x; }
MMFAST_DEVICE int grid_dim_y() { return gridDim.y; }
MMFAST_DEVICE int grid_dim_z() { return gridDim.z; }
MMFAST_DEVICE int linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
template <class T>
MMFAST_DEVICE T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char mmfast_dynamic_smem[];
  return reinterpret_cast<T*>(mmfast_dynamic_smem);
}
MMFAST_DEVICE void block_sync() { __syncthreads(); }
MMFAST_DEVICE void warp_sync() { __syncwarp(); }
#endif
MMFAST_DEVICE int lane_id() { return linear_thread() % 32; }
MMFAST_DEVICE int warp_id() { return linear_thread() / 32; }

// ---- shuffles -----------------------------------------------------------------------------
#if MMFAST_EMULATION
template <class T>
MMFAST_DEVICE T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= emu::kSlotBytes, "shuffle operand too large");
  T out;
  emu::warp_exchange(&v, sizeof(T), [&](auto& slot) { std::memcpy(&out, slot[src_lane & 31], sizeof(T)); });
  return out;
}
template <class T>
MMFAST_DEVICE T shfl_xor(T v, int lane_mask) {
  return shfl(v, emu::lane() ^ lane_mask);
}
#else
template <class T>
MMFAST_DEVICE T shfl(T v, int src_lane) {
  return __shfl_sync(0xffffffffu, v, src_lane);
}
template <class T>
MMFAST_DEVICE T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
#endif

// ---- 16-bit float types -------------------------------------------------------------------
#if MMFAST_EMULATION
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
MMFAST_HOST_DEVICE float to_float(float x) { return x; }
MMFAST_HOST_DEVICE float to_float(half_t x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
MMFAST_HOST_DEVICE float to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MMFAST_HOST_DEVICE uint16_t bits_of(half_t x) { return x.bits; }
MMFAST_HOST_DEVICE uint16_t bits_of(bf16_t x) { return x.bits; }
template <class T>
MMFAST_HOST_DEVICE T from_bits(uint16_t b) {
  return T{b};
}
template <class T>
MMFAST_HOST_DEVICE T from_float(float f);
template <>
MMFAST_HOST_DEVICE float from_float<float>(float f) {
  return f;
}
template <>
MMFAST_HOST_DEVICE half_t from_float<half_t>(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  half_t out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
template <>
MMFAST_HOST_DEVICE bf16_t from_float<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  bf16_t out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  } else {
    out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
  }
  return out;
}
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
MMFAST_HOST_DEVICE float to_float(float x) { return x; }
MMFAST_DEVICE float to_float(half_t x) { return __half2float(x); }
MMFAST_DEVICE float to_float(bf16_t x) { return __bfloat162float(x); }
MMFAST_DEVICE uint16_t bits_of(half_t x) { return __half_as_ushort(x); }
MMFAST_DEVICE uint16_t bits_of(bf16_t x) { return __bfloat16_as_ushort(x); }
template <class T>
MMFAST_DEVICE T from_bits(uint16_t b);
template <>
MMFAST_DEVICE half_t from_bits<half_t>(uint16_t b) {
  return __ushort_as_half(b);
}
template <>
MMFAST_DEVICE bf16_t from_bits<bf16_t>(uint16_t b) {
  return __ushort_as_bfloat16(b);
}
template <class T>
MMFAST_DEVICE T from_float(float f);
template <>
MMFAST_DEVICE float from_float<float>(float f) {
  return f;
}
template <>
MMFAST_DEVICE half_t from_float<half_t>(float f) {
  return __float2half_rn(f);
}
template <>
MMFAST_DEVICE bf16_t from_float<bf16_t>(float f) {
  return __float2bfloat16_rn(f);
}
#endif

template <class T>
MMFAST_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits_of(from_float<T>(lo))) |
         (static_cast<uint32_t>(bits_of(from_float<T>(hi))) << 16);
}

// The float value of the 16-bit element `which` (0 = low, 1 = high) of a packed register.
template <class T>
MMFAST_DEVICE float unpack(uint32_t r, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? (r >> 16) : (r & 0xffffu));
  return to_float(from_bits<T>(bits));
}

// ---- mma.sync m16n8k16, fp32 accumulate -----------------------------------------------------
#if MMFAST_EMULATION
template <class T>
MMFAST_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                const float (&c)[4]) {
  struct Operands {
    uint32_t a[4], b[2];
  } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const int g = emu::lane() >> 2, t = emu::lane() % 4;
  float acc[4] = {c[0], c[1], c[2], c[3]};
  emu::warp_exchange(&mine, sizeof(mine), [&](auto& slot) {
    auto lane_ops = [&](int l) {
      Operands o;
      std::memcpy(&o, slot[l], sizeof(o));
      return o;
    };
    // A[r][k] lives in lane (r%8)*4 + (k%8)/2, register (r>=8) + 2*(k>=8), half k%2.
    auto A = [&](int r, int k) {
      return unpack<T>(lane_ops((r % 8) * 4 + (k % 8) / 2).a[(r >= 8) + 2 * (k >= 8)], k % 2);
    };
    // B[k][n] lives in lane n*4 + (k%8)/2, register (k>=8), half k%2.
    auto B = [&](int k, int n) { return unpack<T>(lane_ops(n * 4 + (k % 8) / 2).b[k >= 8], k % 2); };
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i >= 2), n = 2 * t + (i % 2);
      float s = acc[i];
      for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
      acc[i] = s;
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = acc[i];
}
#else
template <class T>
MMFAST_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                const float (&c)[4]);
template <>
MMFAST_DEVICE void mma_m16n8k16<bf16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                        const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
template <>
MMFAST_DEVICE void mma_m16n8k16<half_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                        const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
#endif

// ---- ldmatrix ------------------------------------------------------------------------------
#if MMFAST_EMULATION
template <int NUM, bool TRANS>
MMFAST_DEVICE void ldmatrix_impl(uint32_t (&r)[NUM], const void* row_ptr) {
  const int l = emu::lane();
  emu::warp_exchange(&row_ptr, sizeof(row_ptr), [&](auto& slot) {
    auto row = [&](int src_lane) {
      const uint16_t* p;
      std::memcpy(&p, slot[src_lane], sizeof(p));
      return p;
    };
    for (int i = 0; i < 8 * NUM; ++i) {
      MMFAST_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(row(i)) % 16 ==
                           0);  // ldmatrix rows are 16-byte aligned
    }
    for (int i = 0; i < NUM; ++i) {
      uint16_t lo, hi;
      if (TRANS) {
        lo = row(8 * i + 2 * (l % 4))[l / 4];
        hi = row(8 * i + 2 * (l % 4) + 1)[l / 4];
      } else {
        lo = row(8 * i + l / 4)[2 * (l % 4)];
        hi = row(8 * i + l / 4)[2 * (l % 4) + 1];
      }
      r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  });
}
#else
MMFAST_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
template <int NUM, bool TRANS>
MMFAST_DEVICE void ldmatrix_impl(uint32_t (&r)[NUM], const void* row_ptr) {
  const uint32_t a = smem_addr(row_ptr);
  if constexpr (NUM == 1 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (NUM == 1 && TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (NUM == 2 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else if constexpr (NUM == 2 && TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else if constexpr (NUM == 4 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    static_assert(NUM == 4 && TRANS, "ldmatrix takes 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
}
#endif
MMFAST_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* p) { ldmatrix_impl<1, false>(r, p); }
MMFAST_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* p) { ldmatrix_impl<2, false>(r, p); }
MMFAST_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl<4, false>(r, p); }
MMFAST_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { ldmatrix_impl<1, true>(r, p); }
MMFAST_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { ldmatrix_impl<2, true>(r, p); }
MMFAST_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl<4, true>(r, p); }

// ---- cp.async (16 bytes, global -> shared) ---------------------------------------------------
#if MMFAST_EMULATION
MMFAST_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  MMFAST_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(smem_dst) % 16 == 0);
  MMFAST_DEVICE_ASSERT(src_bytes == 0 || reinterpret_cast<uintptr_t>(gmem_src) % 16 == 0);
  MMFAST_DEVICE_ASSERT(src_bytes >= 0 && src_bytes <= 16);
  emu::async_copy(smem_dst, gmem_src, src_bytes, 16);
}
MMFAST_DEVICE void cp_async_commit() { emu::async_commit(); }
template <int N>
MMFAST_DEVICE void cp_async_wait() {
  emu::async_wait(N);
}
#else
MMFAST_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
MMFAST_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
MMFAST_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

}  // namespace port
}  // namespace mmfast
