// SIMT emulation runtime: runs a CUDA-style kernel on the CPU, one std::thread per CUDA thread.
//
// Used only when device code is compiled as plain C++ (csrc/common/portable.cuh includes it when
// __CUDACC__ is not defined). Torch-free, header-only, C++17.
//
// Model (what CUDA guarantees, no more):
//   - launch(grid, block, smem_bytes, fn): blocks run ONE AT A TIME, in linear order; inside a block
//     every CUDA thread is a real OS thread running fn() concurrently, so ThreadSanitizer sees the
//     same races a GPU would have.
//   - block_sync() is a real barrier over the block's threads (mutex + condition variable, so TSAN
//     knows the happens-before edges).
//   - Warp collectives (shuffles, mma, ldmatrix) go through a per-warp exchange: every lane writes
//     its operand into a slot, a 32-thread barrier, every lane reads what it needs, a second
//     barrier. All 32 lanes must reach the same collective (as with a full 0xffffffff mask).
//   - Dynamic shared memory is poisoned (0xFF bytes: NaN for floats and halves) before each block,
//     so reads of unwritten shared memory show up as NaN.
//   - cp.async copies are DEFERRED until the matching cp_async_wait<N>() (see emu_async below), so
//     a kernel that forgets to wait reads poison, as it may on hardware.
//   - A failed device check (MMFAST_DEVICE_ASSERT) aborts the process with a message.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace mmfast {
namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  unsigned count() const { return x * y * z; }
};

// A reusable barrier for a fixed number of threads (generation counting).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 64;  // the largest operand a lane puts into a warp collective

struct Warp {
  Barrier bar{kWarpSize};
  alignas(16) unsigned char slot[kWarpSize][kSlotBytes];
};

struct Block {
  Dim3 idx;
  unsigned char* smem = nullptr;
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

// One deferred cp.async copy; groups are closed by cp_async_commit().
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;      // bytes read from src
  int dst_bytes;  // bytes written to dst (the rest zero-filled)
};

struct Thread {
  Dim3 tid, block_dim, grid_dim;
  Block* block = nullptr;
  int linear = 0;  // threadIdx.x + threadIdx.y * blockDim.x + ...
  std::vector<AsyncCopy> open_group;
  std::deque<std::vector<AsyncCopy>> committed;
};

inline thread_local Thread* tls = nullptr;

inline Thread& self() {
  if (tls == nullptr) {
    std::fprintf(stderr, "mmfast emu: device function called outside emu::launch\n");
    std::abort();
  }
  return *tls;
}

inline int lane() { return self().linear % kWarpSize; }
inline Warp& warp() { return *self().block->warps[self().linear / kWarpSize]; }

// Warp exchange: each lane publishes `bytes` bytes, then `read(slots)` runs with every lane's data.
template <class Read>
inline void warp_exchange(const void* mine, int bytes, Read&& read) {
  Warp& w = warp();
  std::memcpy(w.slot[lane()], mine, bytes);
  w.bar.arrive_and_wait();
  read(w.slot);
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
}

inline void block_sync() { self().block->bar->arrive_and_wait(); }
inline void warp_sync() { warp().bar.arrive_and_wait(); }

// ---- cp.async: deferred copies, performed in order at cp_async_wait<N>() ----
inline void async_copy(void* dst, const void* src, int bytes, int dst_bytes) {
  self().open_group.push_back({dst, src, bytes, dst_bytes});
}
inline void async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}
inline void async_wait(int pending_allowed) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > pending_allowed) {
    for (const AsyncCopy& c : t.committed.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, c.dst_bytes - c.bytes);
    }
    t.committed.pop_front();
  }
}

[[noreturn]] inline void device_fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "mmfast emu: device assertion failed: %s at %s:%d\n", what, file, line);
  std::abort();
}

// Runs fn() as a kernel: grid blocks one after another, block.count() threads each.
template <class Fn>
void launch(Dim3 grid, Dim3 block, size_t smem_bytes, Fn&& fn) {
  const int n = static_cast<int>(block.count());
  if (n <= 0 || n % kWarpSize != 0) {
    std::fprintf(stderr, "mmfast emu: block size %d must be a positive multiple of 32\n", n);
    std::abort();
  }
  std::vector<unsigned char> smem(smem_bytes + 16);
  Block blk;
  blk.smem = smem.data();
  blk.bar = std::make_unique<Barrier>(n);
  for (int w = 0; w < n / kWarpSize; ++w) blk.warps.push_back(std::make_unique<Warp>());
  Barrier between(n);
  const unsigned num_blocks = grid.count();

  auto body = [&](int linear) {
    Thread t;
    t.linear = linear;
    t.block_dim = block;
    t.grid_dim = grid;
    t.block = &blk;
    t.tid = Dim3(linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y));
    tls = &t;
    for (unsigned b = 0; b < num_blocks; ++b) {
      between.arrive_and_wait();  // the previous block is finished by every thread
      if (linear == 0) {
        blk.idx = Dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
        std::memset(blk.smem, 0xFF, smem_bytes);
      }
      between.arrive_and_wait();
      fn();
      async_wait(0);  // a kernel ends with no copy in flight
    }
    tls = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int i = 0; i < n; ++i) threads.emplace_back(body, i);
  for (auto& th : threads) th.join();
}

}  // namespace emu
}  // namespace mmfast
