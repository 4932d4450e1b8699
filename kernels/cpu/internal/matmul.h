// Host-side helpers shared by Linear, Mlp and ExpertFfn: activation rows in the form
// MatmulBlock (simd.h) wants, and the tiling constants of the weight-streaming loops.
//
//   ActivationRows a(x, /*bf16=*/true);          // converts [M, K] f32 to bf16 once, into
//                                                // the thread's kScratchActivations slot
//   MatmulBlockArgs mb{.a_rows = a.rows(), ...};
// Not thread-safe to build; read-only afterwards (shared by the pool's threads).
#pragma once

#include <cstdint>
#include <vector>

#include "common/tensor.h"
#include "kernels/cpu/internal/simd.h"

namespace moe::kernels::cpu::internal {

// Output rows per work item when streaming weights (an item reads kWeightChunk weight
// rows once). 32 rows of K = 1024..4096 bf16 is 64..256 KiB: items are long enough to
// amortise scheduling and short enough for ~16+ items per matrix on two cores.
inline constexpr int64_t kWeightChunk = 32;
// Activation rows per work item for large M (prefill): 128 rows of bf16 K = 1024 is
// 256 KiB, which stays in L2 while a weight chunk streams past.
inline constexpr int64_t kRowBlock = 128;
inline constexpr int64_t kPackedRowBlock = 512;

// Weight rows per work item when streaming (m <= kStreamMaxRows, bf16): the n rows are cut
// into about kStreamItemsPerThread contiguous ranges per pool thread, so each thread reads
// long sequential stretches of the weight matrix (the hardware prefetcher follows one
// stream well, several short ones poorly). At least kStreamMinChunk rows, a multiple of 16.
inline constexpr int64_t kStreamItemsPerThread = 2;
inline constexpr int64_t kStreamMinChunk = 16;
int64_t StreamChunkRows(int64_t n);

// Per-thread scratch reused across kernel calls instead of a fresh allocation per call
// (large vectors cost an mmap and page clearing each time). Slot `slot` of the calling
// thread, grown to at least `bytes` (64-byte aligned, contents undefined); valid until the
// next ThreadScratch call with the same slot on the same thread.
enum ScratchSlot : int {
  kScratchActivations = 0,  // ActivationRows' bf16 copy
  kScratchHidden,           // RunSwiglu: silu(gate) * up for every routed row
  kScratchGateUp,           // RunSwiglu pass 1: one item's gate and up outputs
  kScratchPointers,         // row pointer tables
  kScratchAttention,        // PagedAttention per-item buffers
  kNumScratchSlots,
};
void* ThreadScratch(ScratchSlot slot, size_t bytes);
template <typename T>
T* ThreadScratchAs(ScratchSlot slot, size_t count) {
  return static_cast<T*>(ThreadScratch(slot, count * sizeof(T)));
}

// Rows of an [M, K] f32 view, converted to bf16 (for bf16 weights) or referenced in place.
class ActivationRows {
 public:
  ActivationRows(const common::TensorView& x, bool bf16);
  // Rows listed by index (gathers for a grouped matmul).
  const void* const* rows() const { return rows_.data(); }
  const void* row(int64_t i) const { return rows_[i]; }
  int64_t size() const { return static_cast<int64_t>(rows_.size()); }

 private:
  std::vector<const void*> rows_;
};

// Runs MatmulBlock on the default pool: for bf16 with m <= kStreamMaxRows over contiguous
// ranges of StreamChunkRows(n) weight rows with all m rows; otherwise over chunks of
// kWeightChunk weight rows × blocks of activation rows. c_rows[i] points at output row i's
// column 0.
void ParallelMatmul(const MatmulBlockArgs& args);

}  // namespace moe::kernels::cpu::internal
