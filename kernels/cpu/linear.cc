// CPU kernels: Linear (out = in · weightᵀ + bias), on the weight-streaming matmul of
// internal/simd.h.
#include <vector>

#include "common/thread_pool.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/internal/check.h"
#include "kernels/cpu/internal/matmul.h"

namespace moe::kernels::cpu {

using common::DType;
using internal::CheckOptionalView;
using internal::CheckView;
using internal::kAnyDim;

absl::Status Linear(const LinearArgs& args) {
  MOE_RETURN_IF_ERROR(CheckView("Linear", "in", args.in, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t m = args.in.dim(0), k = args.in.dim(1);
  MOE_RETURN_IF_ERROR(
      CheckView("Linear", "weight", args.weight, {DType::kF32, DType::kBF16}, {kAnyDim, k}));
  const int64_t n = args.weight.dim(0);
  MOE_RETURN_IF_ERROR(
      CheckOptionalView("Linear", "bias", args.bias, {DType::kF32, DType::kBF16}, {n}));
  MOE_RETURN_IF_ERROR(CheckView("Linear", "out", args.out, {DType::kF32}, {m, n}));
  if (m == 0 || n == 0) return absl::OkStatus();
  const bool bf16 = args.weight.dtype() == DType::kBF16;
  internal::ActivationRows a(args.in, bf16);
  std::vector<float*> c_rows(m);
  for (int64_t i = 0; i < m; ++i) c_rows[i] = &args.out.at<float>(i, 0);  // [M, N]
  internal::ParallelMatmul({.a_rows = a.rows(), .m = m, .w = args.weight.data(),
                            .ldw = args.weight.strides()[0], .w_bf16 = bf16, .n = n, .k = k,
                            .c_rows = c_rows.data(), .accumulate = args.accumulate});
  if (!args.bias.empty()) {
    std::vector<float> bias(n);
    for (int64_t j = 0; j < n; ++j) {
      bias[j] = args.bias.dtype() == DType::kF32 ? args.bias.at<float>(j)
                                                 : common::Bf16ToF32(args.bias.at<uint16_t>(j));
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) c_rows[i][j] += bias[j];
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::kernels::cpu
