// Large CPU output tensors on transparent huge pages (2 MB), from a small cache of freed blocks.
//
// Why: c10's CPU allocator hands out fresh mmap'ed memory for blocks above glibc's mmap threshold
// (at most 32 MB), so every call that returns e.g. dk and dv of cross-attention (57 MB each for
// B=32 H=12 Lk=577 D=64) takes one page fault per 4 KB page on first write: ~28k faults per
// backward, which cost 25% of the single-threaded backward and more under load (memcg charging
// and zone locks are shared with the other processes). With the block on 2 MB pages (madvise, the
// kernel's default THP mode "madvise" honours it) the fault count drops 512x; the kernel still
// zeroes the pages. PyTorch's own THP_MEM_ALLOC_ENABLE=1 does the same for every allocation.
//
// Freed blocks go to a small cache (at most MMFAST_CPU_POOL_MB, default 256 MB; 0 turns it off) and
// the next request of the same rounded size takes one back: no faults and no zeroing at all, the
// common case of a training loop whose steps repeat the same shapes (the zeroing of fresh 2 MB
// pages alone was 9% of the single-threaded text->image backward). This is what a caching
// allocator (jemalloc, tcmalloc) does for every tensor; c10's default CPU allocator does not.
//
// empty_hugepage() falls back to at::empty below kMinBytes, when mmap fails, or when
// MMFAST_CPU_HUGEPAGES=0 (read per call, for A/B runs; the pool is then skipped too).
#pragma once

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace mmfast::cpu {

// Cache of freed huge-page blocks: (address, length) pairs, lengths multiples of 2 MB.
struct HugeBlockPool {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;
  size_t cached = 0;

  static size_t cap() {
    static const size_t bytes = [] {
      const char* e = std::getenv("MMFAST_CPU_POOL_MB");
      return (e == nullptr ? size_t(256) : static_cast<size_t>(std::strtoull(e, nullptr, 10))) << 20;
    }();
    return bytes;
  }
  void* take(size_t len) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i].second == len) {
        void* p = blocks[i].first;
        blocks[i] = blocks.back();
        blocks.pop_back();
        cached -= len;
        return p;
      }
    }
    return nullptr;
  }
  void release() {  // unmap every cached block
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& [p, len] : blocks) munmap(p, len);
    blocks.clear();
    cached = 0;
  }
  void give(void* p, size_t len) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (cached + len <= cap()) {
        blocks.emplace_back(p, len);
        cached += len;
        return;
      }
    }
    munmap(p, len);
  }
};

inline HugeBlockPool& huge_block_pool() {
  static auto* pool = new HugeBlockPool();  // never destroyed: deleters may run at exit
  return *pool;
}

// Returns the cached blocks to the OS (the benchmark does this before measuring a call's memory,
// so that the call is charged for its outputs as a fresh process would be).
inline void release_huge_block_cache() { huge_block_pool().release(); }

inline at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  constexpr size_t kMinBytes = size_t(8) << 20;  // rounding up to 2 MB wastes at most 20%
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  const char* e = std::getenv("MMFAST_CPU_HUGEPAGES");
  if (nbytes < kMinBytes || (e != nullptr && std::string(e) == "0")) return at::empty(sizes, options);
  const size_t len = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* p = huge_block_pool().take(len);
  if (p == nullptr) {
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return at::empty(sizes, options);
    // Keep a 2 MB aligned window of len bytes; give the head and tail back.
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t start = (base + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    if (start > base) munmap(raw, start - base);
    const uintptr_t end = base + len + kHuge;
    if (end > start + len) munmap(reinterpret_cast<void*>(start + len), end - (start + len));
    p = reinterpret_cast<void*>(start);
    madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the block is ordinary pages
  }
  return at::from_blob(
      p, sizes, [len](void* q) { huge_block_pool().give(q, len); }, options.device(at::kCPU));
}

}  // namespace mmfast::cpu
