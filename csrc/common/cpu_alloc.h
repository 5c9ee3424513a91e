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
// Freed blocks go to a small cache (at most mmfast.cpu_options(block_cache_mb=...), default 256 MB;
// 0 turns it off) and
// the next request of the same rounded size takes one back: no faults and no zeroing at all, the
// common case of a training loop whose steps repeat the same shapes (the zeroing of fresh 2 MB
// pages alone was 9% of the single-threaded text->image backward). This is what a caching
// allocator (jemalloc, tcmalloc) does for every tensor; c10's default CPU allocator does not.
//
// empty_hugepage() falls back to c10's CPU allocator below kMinBytes, when mmap fails, or with
// mmfast.cpu_options(hugepages=False) (read per allocation; the cache is then skipped too). Its
// tensors have ordinary resizable storages (resize_ allocates through the same allocator).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/cpu_isa.h"

namespace mmfast::cpu {

// Cache of freed huge-page blocks: (address, length) pairs, lengths multiples of 2 MB.
struct HugeBlockPool {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;
  size_t cached = 0;

  static size_t cap() {
    const int64_t mb = options().block_cache_mb.load(std::memory_order_relaxed);
    return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
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

// A c10::Allocator handing out blocks of >= kMinBytes on 2 MB pages (from the cache when a block of
// the same rounded length is there) and smaller ones from c10's CPU allocator. Tensors made with it
// own an ordinary resizable storage: resize_ beyond the block asks this allocator for a new one and
// the old block goes back to the cache when its last reference dies.
struct HugePageAllocator final : c10::Allocator {
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = size_t(8) << 20;  // rounding up to 2 MB wastes at most 20%

  struct Block {  // deleter context: the mapping's start and length
    void* ptr;
    size_t len;
  };
  static void free_block(void* ctx) {
    auto* blk = static_cast<Block*>(ctx);
    huge_block_pool().give(blk->ptr, blk->len);
    delete blk;
  }
  static bool enabled() { return options().hugepages.load(std::memory_order_relaxed); }
  // A 2 MB aligned mapping of len bytes (len a multiple of 2 MB), or null when mmap fails.
  static void* map_aligned(size_t len) {
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    // Keep a 2 MB aligned window of len bytes; give the head and tail back.
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t start = (base + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    if (start > base) munmap(raw, start - base);
    const uintptr_t end = base + len + kHuge;
    if (end > start + len) munmap(reinterpret_cast<void*>(start + len), end - (start + len));
    void* p = reinterpret_cast<void*>(start);
    madvise(p, len, MADV_HUGEPAGE);  // advice only: without THP the block is ordinary pages
    return p;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes || !enabled()) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t len = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* p = huge_block_pool().take(len);
    if (p == nullptr) p = map_aligned(len);
    if (p == nullptr) return c10::GetCPUAllocator()->allocate(nbytes);
    return {p, new Block{p, len}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context frees, not the pointer
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline HugePageAllocator* hugepage_allocator() {
  static auto* alloc = new HugePageAllocator();  // never destroyed: storages may outlive statics
  return alloc;
}

// A contiguous CPU tensor on the allocator above (an ordinary tensor: resizable, any dtype).
inline at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, hugepage_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace mmfast::cpu
