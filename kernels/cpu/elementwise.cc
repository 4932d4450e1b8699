// CPU kernels: embedding lookup, RMSNorm, elementwise ops and RoPE.
//
// These are memory-bound row loops: rows are split over the thread pool, the inner loops are
// plain f32 code the compiler vectorises.
#include <cmath>
#include <cstring>

#include "common/thread_pool.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/internal/check.h"
#include "kernels/cpu/internal/simd.h"

namespace moe::kernels::cpu {
namespace {

using common::DType;
using common::ThreadPool;
using common::TensorView;
using internal::CheckOptionalView;
using internal::CheckView;
using internal::Invalid;
using internal::kAnyDim;

// Grain for row loops: about 16k elements per chunk.
int64_t RowGrain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

// Widens n elements of a f32 or bf16 vector into `out`.
void WidenRow(const TensorView& v, const void* src, int64_t n, float* out) {
  if (v.dtype() == DType::kF32) {
    std::memcpy(out, src, n * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) out[i] = common::Bf16ToF32(s[i]);
  }
}

std::vector<float> WidenVector(const TensorView& v) {
  std::vector<float> out(v.dim(0));
  WidenRow(v, v.data(), v.dim(0), out.data());
  return out;
}

}  // namespace

absl::Status Embedding(const EmbeddingArgs& args) {
  MOE_RETURN_IF_ERROR(CheckView("Embedding", "ids", args.ids, {DType::kI32}, {kAnyDim}));
  const int64_t m = args.ids.dim(0);
  MOE_RETURN_IF_ERROR(CheckView("Embedding", "table", args.table, {DType::kF32, DType::kBF16},
                                {kAnyDim, kAnyDim}));
  const int64_t vocab = args.table.dim(0), h = args.table.dim(1);
  MOE_RETURN_IF_ERROR(CheckView("Embedding", "out", args.out, {DType::kF32}, {m, h}));
  for (int64_t i = 0; i < m; ++i) {
    int32_t id = args.ids.at<int32_t>(i);
    if (id < 0 || id >= vocab) {
      return Invalid("Embedding", "ids",
                     absl::StrCat("[", i, "] = ", id, " is outside [0, ", vocab, ")"));
    }
  }
  const size_t esize = common::DTypeSize(args.table.dtype());
  ThreadPool::Default().ParallelFor(m, RowGrain(h), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const char* row = static_cast<const char*>(args.table.data()) +
                        args.ids.at<int32_t>(i) * args.table.strides()[0] * esize;
      WidenRow(args.table, row, h, &args.out.at<float>(i, 0));  // [M, H]
    }
  });
  return absl::OkStatus();
}

absl::Status RmsNorm(const RmsNormArgs& args) {
  MOE_RETURN_IF_ERROR(CheckView("RmsNorm", "in", args.in, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t m = args.in.dim(0), d = args.in.dim(1);
  MOE_RETURN_IF_ERROR(
      CheckView("RmsNorm", "weight", args.weight, {DType::kF32, DType::kBF16}, {d}));
  MOE_RETURN_IF_ERROR(CheckView("RmsNorm", "out", args.out, {DType::kF32}, {m, d}));
  MOE_RETURN_IF_ERROR(CheckOptionalView("RmsNorm", "residual", args.residual, {DType::kF32}, {m, d}));
  const std::vector<float> weight = WidenVector(args.weight);
  const bool has_residual = !args.residual.empty();
  ThreadPool::Default().ParallelFor(m, RowGrain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* in = &args.in.at<float>(i, 0);  // [M, D]
      float* out = &args.out.at<float>(i, 0);
      const float* x = in;
      if (has_residual) {
        float* res = &args.residual.at<float>(i, 0);
        for (int64_t j = 0; j < d; ++j) res[j] += in[j];
        x = res;
      }
      double sum = 0.0;
      for (int64_t j = 0; j < d; ++j) sum += static_cast<double>(x[j]) * x[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(sum / d + args.eps));
      for (int64_t j = 0; j < d; ++j) out[j] = x[j] * inv * weight[j];
    }
  });
  return absl::OkStatus();
}

absl::Status Add(const AddArgs& args) {
  MOE_RETURN_IF_ERROR(CheckView("Add", "a", args.a, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t m = args.a.dim(0), n = args.a.dim(1);
  MOE_RETURN_IF_ERROR(CheckView("Add", "b", args.b, {DType::kF32}, {m, n}));
  MOE_RETURN_IF_ERROR(CheckView("Add", "out", args.out, {DType::kF32}, {m, n}));
  ThreadPool::Default().ParallelFor(m, RowGrain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* a = &args.a.at<float>(i, 0);  // [M, N]
      const float* b = &args.b.at<float>(i, 0);
      float* out = &args.out.at<float>(i, 0);
      for (int64_t j = 0; j < n; ++j) out[j] = a[j] + b[j];
    }
  });
  return absl::OkStatus();
}

absl::Status SiluMul(const SiluMulArgs& args) {
  MOE_RETURN_IF_ERROR(
      CheckView("SiluMul", "gate_up", args.gate_up, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t m = args.gate_up.dim(0), f = args.gate_up.dim(1) / 2;
  if (args.gate_up.dim(1) % 2 != 0) {
    return Invalid("SiluMul", "gate_up", "must have an even number of columns");
  }
  MOE_RETURN_IF_ERROR(CheckView("SiluMul", "out", args.out, {DType::kF32}, {m, f}));
  ThreadPool::Default().ParallelFor(m, RowGrain(f), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* gate = &args.gate_up.at<float>(i, 0);  // [M, 2F]: gate | up
      const float* up = gate + f;
      float* out = &args.out.at<float>(i, 0);             // [M, F]
      internal::SiluMul(gate, up, out, f);
    }
  });
  return absl::OkStatus();
}

absl::Status SigmoidGatedAdd(const SigmoidGatedAddArgs& args) {
  MOE_RETURN_IF_ERROR(
      CheckView("SigmoidGatedAdd", "in", args.in, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t m = args.in.dim(0), h = args.in.dim(1);
  MOE_RETURN_IF_ERROR(
      CheckView("SigmoidGatedAdd", "gate_logit", args.gate_logit, {DType::kF32}, {m, 1}));
  MOE_RETURN_IF_ERROR(CheckView("SigmoidGatedAdd", "out", args.out, {DType::kF32}, {m, h}));
  ThreadPool::Default().ParallelFor(m, RowGrain(h), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float gate = 1.0f / (1.0f + std::exp(-args.gate_logit.at<float>(i, 0)));
      const float* in = &args.in.at<float>(i, 0);  // [M, H]
      float* out = &args.out.at<float>(i, 0);
      for (int64_t j = 0; j < h; ++j) out[j] += gate * in[j];
    }
  });
  return absl::OkStatus();
}

absl::Status Rope(const RopeArgs& args) {
  if (args.table == nullptr) return Invalid("Rope", "table", "is required");
  const RopeTable& table = *args.table;
  MOE_RETURN_IF_ERROR(
      CheckView("Rope", "x", args.x, {DType::kF32}, {kAnyDim, kAnyDim, kAnyDim}));
  const int64_t t = args.x.dim(0), heads = args.x.dim(1), head_dim = args.x.dim(2);
  MOE_RETURN_IF_ERROR(CheckView("Rope", "positions", args.positions, {DType::kI32}, {t}));
  const int rd = table.rotary_dim, half = rd / 2;
  if (rd <= 0 || rd > head_dim) {
    return Invalid("Rope", "table",
                   absl::StrCat("rotary_dim ", rd, " does not fit head_dim ", head_dim));
  }
  if (static_cast<int64_t>(table.cos.size()) < static_cast<int64_t>(table.max_positions) * half) {
    return Invalid("Rope", "table", "has fewer cos/sin entries than max_positions");
  }
  for (int64_t i = 0; i < t; ++i) {
    int32_t p = args.positions.at<int32_t>(i);
    if (p < 0 || p >= table.max_positions) {
      return Invalid("Rope", "positions",
                     absl::StrCat("[", i, "] = ", p, " is outside [0, ", table.max_positions, ")"));
    }
  }
  const int64_t head_stride = args.x.strides()[1];
  ThreadPool::Default().ParallelFor(t, RowGrain(heads * rd), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t p = args.positions.at<int32_t>(i);
      const float* cos = &table.cos[static_cast<size_t>(p) * half];  // [max_positions, rd/2]
      const float* sin = &table.sin[static_cast<size_t>(p) * half];
      for (int64_t h = 0; h < heads; ++h) {
        float* x = &args.x.at<float>(i, 0) + h * head_stride;  // [T, heads, head_dim]
        if (args.style == RopeStyle::kHalf) {
          for (int j = 0; j < half; ++j) {
            const float x1 = x[j], x2 = x[j + half];
            x[j] = x1 * cos[j] - x2 * sin[j];
            x[j + half] = x2 * cos[j] + x1 * sin[j];
          }
        } else {
          for (int j = 0; j < half; ++j) {
            const float x1 = x[2 * j], x2 = x[2 * j + 1];
            x[2 * j] = x1 * cos[j] - x2 * sin[j];
            x[2 * j + 1] = x2 * cos[j] + x1 * sin[j];
          }
        }
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace moe::kernels::cpu
