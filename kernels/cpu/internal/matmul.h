// Host-side helpers shared by Linear, Mlp and ExpertFfn: activation rows in the form
// MatmulBlock (simd.h) wants, and the tiling constants of the weight-streaming loops.
//
//   ActivationRows a(x, /*bf16=*/true);          // converts [M, K] f32 to bf16 once
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

// Rows of an [M, K] f32 view, converted to bf16 (for bf16 weights) or referenced in place.
class ActivationRows {
 public:
  ActivationRows(const common::TensorView& x, bool bf16);
  // Rows listed by index (gathers for a grouped matmul).
  const void* const* rows() const { return rows_.data(); }
  const void* row(int64_t i) const { return rows_[i]; }
  int64_t size() const { return static_cast<int64_t>(rows_.size()); }

 private:
  std::vector<uint16_t> bf16_;  // [M, K] when converted
  std::vector<const void*> rows_;
};

// Runs MatmulBlock over [0, n) weight rows in chunks of kWeightChunk and [0, m) activation
// rows in blocks of kRowBlock on the default pool. c_rows[i] points at output row i's
// column 0.
void ParallelMatmul(const MatmulBlockArgs& args);

}  // namespace moe::kernels::cpu::internal
