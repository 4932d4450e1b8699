// CPU kernels: router top-k, permute/unpermute, grouped expert FFN and dense MLP.
//
// ExpertFfn and Mlp share one grouped SwiGLU (RunSwiglu): token rows are grouped by expert,
// then two parallel passes run over (expert, weight-chunk) work items:
//   1. gate and up: for each expert and range of FFN rows (a long contiguous range at decode
//      sizes, kWeightChunk rows for the packed GEMM), both weight slabs are streamed once for
//      all of the expert's rows; h = silu(g) * u is written in the form the
//      down projection wants (bf16 or f32).
//   2. down: each item owns a chunk of output columns and walks all experts in id order,
//      adding weight * (h · downᵀ) into out. Items never share output, so no atomics, and the
//      per-token sum order is fixed (deterministic results for any thread count).
// Either pass keeps both cores busy even when a single expert gets every token.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "common/thread_pool.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/internal/check.h"
#include "kernels/cpu/internal/matmul.h"
#include "kernels/cpu/internal/simd.h"

namespace moe::kernels::cpu {
namespace {

using common::DType;
using common::TensorView;
using internal::CheckOptionalView;
using internal::CheckView;
using internal::Invalid;
using internal::kAnyDim;
using internal::kRowBlock;
using internal::kWeightChunk;

// Token rows grouped by expert: rows of group g are [offsets[g], offsets[g + 1]).
struct Groups {
  std::vector<const SwigluWeights*> weights;  // one per group
  std::vector<int64_t> offsets;               // [groups + 1]
  std::vector<int32_t> token;                 // [R] source row of x / out
  std::vector<float> scale;                   // [R] gate weight, empty = 1
};

absl::Status CheckSwiglu(const char* op, const std::string& field, const SwigluWeights& w,
                         int64_t h, int64_t f) {
  const std::string gate = field + ".gate", up = field + ".up", down = field + ".down";
  MOE_RETURN_IF_ERROR(CheckView(op, gate.c_str(), w.gate, {DType::kF32, DType::kBF16}, {f, h}));
  MOE_RETURN_IF_ERROR(CheckView(op, up.c_str(), w.up, {DType::kF32, DType::kBF16}, {f, h}));
  MOE_RETURN_IF_ERROR(CheckView(op, down.c_str(), w.down, {DType::kF32, DType::kBF16}, {h, f}));
  if (w.gate.dtype() != w.up.dtype()) {
    return Invalid(op, up.c_str(), "must have the dtype of gate");
  }
  return absl::OkStatus();
}

// FFN rows per pass-1 item of a group with m rows: long contiguous ranges when the group is
// streamed (decode sizes), kWeightChunk-row panels when it takes the packed GEMM.
int64_t FfnChunk(int64_t f, int64_t m) {
  return m <= internal::kStreamMaxRows ? std::min(f, internal::StreamChunkRows(f))
                                       : kWeightChunk;
}

// out[token[r]] (+)= scale[r] * swiglu_g(x[token[r]]) for every group g and its rows r.
// With accumulate false, out must be covered by exactly one group row per token (Mlp).
void RunSwiglu(const TensorView& x, const Groups& groups, const TensorView& out,
               bool accumulate) {
  const int64_t num_groups = static_cast<int64_t>(groups.weights.size());
  const int64_t h = x.dim(1);
  const int64_t f = groups.weights[0]->gate.dim(0);
  const int64_t rows = groups.offsets.back();
  bool any_bf16 = false, any_f32 = false;
  int64_t max_group_rows = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    (groups.weights[g]->gate.dtype() == DType::kBF16 ? any_bf16 : any_f32) = true;
    max_group_rows = std::max(max_group_rows, groups.offsets[g + 1] - groups.offsets[g]);
  }
  // Activations once per dtype, then gathered per routed row (pointers only).
  std::optional<internal::ActivationRows> x_bf16, x_f32;
  if (any_bf16) x_bf16.emplace(x, true);
  if (any_f32) x_f32.emplace(x, false);
  std::vector<const void*> a_rows(rows);
  // h = silu(gate · x) * (up · x): [R, F], bf16 or f32 by the group's down dtype; row r at
  // byte r * f * 4 either way (the calling thread's scratch).
  char* h_data = internal::ThreadScratchAs<char>(internal::kScratchHidden,
                                                 static_cast<size_t>(rows) * f * 4);
  std::vector<const void*> h_rows(rows);
  std::vector<float*> out_rows(rows);
  for (int64_t g = 0; g < num_groups; ++g) {
    const bool bf16 = groups.weights[g]->gate.dtype() == DType::kBF16;
    for (int64_t r = groups.offsets[g]; r < groups.offsets[g + 1]; ++r) {
      a_rows[r] = (bf16 ? *x_bf16 : *x_f32).row(groups.token[r]);
      out_rows[r] = &out.at<float>(groups.token[r], 0);  // [T, H]
      h_rows[r] = h_data + static_cast<size_t>(r) * f * 4;
    }
  }

  // Pass 1: items (group, FFN-row range, row block).
  struct Item {
    int64_t group, f0, f1, r0, r1;
  };
  std::vector<Item> items;
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t r0 = groups.offsets[g]; r0 < groups.offsets[g + 1]; r0 += kRowBlock) {
      const int64_t r1 = std::min(groups.offsets[g + 1], r0 + kRowBlock);
      const int64_t chunk = FfnChunk(f, r1 - r0);
      for (int64_t f0 = 0; f0 < f; f0 += chunk) {
        items.push_back({g, f0, std::min(f, f0 + chunk), r0, r1});
      }
    }
  }
  common::ThreadPool::Default().ParallelFor(
      static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
        float* g_rows[kRowBlock];
        float* u_rows[kRowBlock];
        for (int64_t it = begin; it < end; ++it) {
          const Item& item = items[it];
          const SwigluWeights& w = *groups.weights[item.group];
          const int64_t m = item.r1 - item.r0;
          const int64_t n = item.f1 - item.f0;
          // [rows, 2, n]: gate then up outputs of each row.
          float* gu = internal::ThreadScratchAs<float>(internal::kScratchGateUp,
                                                       static_cast<size_t>(m) * 2 * n);
          for (int64_t i = 0; i < m; ++i) {
            g_rows[i] = gu + i * 2 * n;
            u_rows[i] = g_rows[i] + n;
          }
          const bool bf16 = w.gate.dtype() == DType::kBF16;
          const size_t wsize = bf16 ? 2 : 4;
          internal::MatmulBlockArgs mb{.a_rows = a_rows.data() + item.r0, .m = m,
                                       .w_bf16 = bf16, .n = n, .k = h};
          mb.w = static_cast<const char*>(w.gate.data()) + item.f0 * w.gate.strides()[0] * wsize;
          mb.ldw = w.gate.strides()[0];
          mb.c_rows = g_rows;
          internal::MatmulBlock(mb);
          mb.w = static_cast<const char*>(w.up.data()) + item.f0 * w.up.strides()[0] * wsize;
          mb.ldw = w.up.strides()[0];
          mb.c_rows = u_rows;
          internal::MatmulBlock(mb);
          const bool down_bf16 = w.down.dtype() == DType::kBF16;
          for (int64_t i = 0; i < m; ++i) {
            float* act = g_rows[i];  // silu(g) * u, in place
            internal::SiluMul(act, u_rows[i], act, n);
            char* dst = h_data + static_cast<size_t>(item.r0 + i) * f * 4;
            if (down_bf16) {
              internal::ConvertToBf16(act, reinterpret_cast<uint16_t*>(dst) + item.f0, n);
            } else {
              std::memcpy(reinterpret_cast<float*>(dst) + item.f0, act, n * sizeof(float));
            }
          }
        }
      });

  // Pass 2: items = ranges of output columns (down-projection rows); each walks all groups
  // in order.
  const int64_t col_chunk = max_group_rows <= internal::kStreamMaxRows
                                ? std::min(h, internal::StreamChunkRows(h))
                                : kWeightChunk;
  const int64_t col_chunks = (h + col_chunk - 1) / col_chunk;
  common::ThreadPool::Default().ParallelFor(col_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float*> c_rows(max_group_rows);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t c0 = chunk * col_chunk;
      for (int64_t g = 0; g < num_groups; ++g) {
        const SwigluWeights& w = *groups.weights[g];
        const bool bf16 = w.down.dtype() == DType::kBF16;
        const int64_t r_begin = groups.offsets[g], r_end = groups.offsets[g + 1];
        for (int64_t r = r_begin; r < r_end; ++r) c_rows[r - r_begin] = out_rows[r] + c0;
        internal::MatmulBlockArgs mb{
            .a_rows = h_rows.data() + r_begin, .m = r_end - r_begin,
            .w = static_cast<const char*>(w.down.data()) +
                 c0 * w.down.strides()[0] * (bf16 ? 2 : 4),
            .ldw = w.down.strides()[0], .w_bf16 = bf16, .n = std::min(col_chunk, h - c0),
            .k = f, .c_rows = c_rows.data(),
            .row_scale = groups.scale.empty() ? nullptr : groups.scale.data() + r_begin,
            .accumulate = accumulate};
        internal::MatmulBlock(mb);
      }
    }
  });
}

// Top-k indices of v by (value desc, index asc), written in that order.
void TopK(const std::vector<float>& v, int k, std::vector<int32_t>* idx) {
  idx->resize(v.size());
  std::iota(idx->begin(), idx->end(), 0);
  std::partial_sort(idx->begin(), idx->begin() + k, idx->end(), [&](int32_t a, int32_t b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  idx->resize(k);
}

}  // namespace

absl::Status RouterTopK(const RouterArgs& args) {
  constexpr const char* kOp = "RouterTopK";
  MOE_RETURN_IF_ERROR(CheckView(kOp, "logits", args.logits, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t t = args.logits.dim(0), e = args.logits.dim(1);
  const int k = args.top_k;
  if (k <= 0 || k > e) {
    return Invalid(kOp, "top_k", absl::StrCat("= ", k, " must be in [1, ", e, "]"));
  }
  MOE_RETURN_IF_ERROR(CheckOptionalView(kOp, "correction_bias", args.correction_bias,
                                        {DType::kF32, DType::kBF16}, {e}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "topk_ids", args.topk_ids, {DType::kI32}, {t, k}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "topk_weights", args.topk_weights, {DType::kF32}, {t, k}));
  const int n_group = args.n_group;
  if (n_group < 1 || e % n_group != 0) {
    return Invalid(kOp, "n_group", absl::StrCat("= ", n_group, " must divide ", e, " experts"));
  }
  const int64_t group_size = e / n_group;
  if (n_group > 1) {
    if (args.topk_group < 1 || args.topk_group > n_group ||
        args.topk_group * group_size < k) {
      return Invalid(kOp, "topk_group",
                     absl::StrCat("= ", args.topk_group, " keeps fewer than top_k = ", k,
                                  " experts"));
    }
    if (args.group_score == GroupScore::kTop2Sum && group_size < 2) {
      return Invalid(kOp, "group_score", "kTop2Sum needs groups of at least two experts");
    }
  }
  std::vector<float> bias;
  if (!args.correction_bias.empty()) {
    bias.resize(e);
    for (int64_t i = 0; i < e; ++i) {
      bias[i] = args.correction_bias.dtype() == DType::kF32
                    ? args.correction_bias.at<float>(i)
                    : common::Bf16ToF32(args.correction_bias.at<uint16_t>(i));
    }
  }
  common::ThreadPool::Default().ParallelFor(t, 0, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(e), choice(e), group_scores(n_group);
    std::vector<int32_t> ids, top_groups;
    for (int64_t row = begin; row < end; ++row) {
      const float* logits = &args.logits.at<float>(row, 0);  // [T, E]
      if (args.scoring == Scoring::kSoftmax) {
        const float max = *std::max_element(logits, logits + e);
        double sum = 0.0;
        for (int64_t i = 0; i < e; ++i) {
          scores[i] = std::exp(logits[i] - max);
          sum += scores[i];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t i = 0; i < e; ++i) scores[i] *= inv;
      } else {
        for (int64_t i = 0; i < e; ++i) scores[i] = 1.0f / (1.0f + std::exp(-logits[i]));
      }
      for (int64_t i = 0; i < e; ++i) choice[i] = bias.empty() ? scores[i] : scores[i] + bias[i];
      if (n_group > 1) {
        for (int g = 0; g < n_group; ++g) {
          const float* s = choice.data() + g * group_size;
          float best = -std::numeric_limits<float>::infinity(), second = best;
          for (int64_t i = 0; i < group_size; ++i) {
            if (s[i] > best) {
              second = best;
              best = s[i];
            } else if (s[i] > second) {
              second = s[i];
            }
          }
          group_scores[g] = args.group_score == GroupScore::kMax ? best : best + second;
        }
        TopK(group_scores, args.topk_group, &top_groups);
        std::vector<bool> keep(n_group, false);
        for (int32_t g : top_groups) keep[g] = true;
        for (int64_t i = 0; i < e; ++i) {
          if (!keep[i / group_size]) choice[i] = -std::numeric_limits<float>::infinity();
        }
      }
      TopK(choice, k, &ids);
      float* weights = &args.topk_weights.at<float>(row, 0);  // [T, k]
      int32_t* out_ids = &args.topk_ids.at<int32_t>(row, 0);
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        out_ids[j] = ids[j];
        weights[j] = scores[ids[j]];
        sum += weights[j];
      }
      if (args.norm_topk_prob) {
        const float denom = args.scoring == Scoring::kSigmoid ? sum + 1e-20f : sum;
        for (int j = 0; j < k; ++j) weights[j] /= denom;
      }
      const float scaling = static_cast<float>(args.routed_scaling_factor);
      for (int j = 0; j < k; ++j) weights[j] *= scaling;
    }
  });
  return absl::OkStatus();
}

absl::Status Permute(const PermuteArgs& args) {
  constexpr const char* kOp = "Permute";
  MOE_RETURN_IF_ERROR(CheckView(kOp, "x", args.x, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t t = args.x.dim(0), h = args.x.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "topk_ids", args.topk_ids, {DType::kI32}, {t, kAnyDim}));
  const int64_t k = args.topk_ids.dim(1);
  const int64_t e = args.num_experts;
  if (e <= 0) return Invalid(kOp, "num_experts", "must be positive");
  MOE_RETURN_IF_ERROR(CheckView(kOp, "permuted", args.permuted, {DType::kF32}, {t * k, h}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "row_of", args.row_of, {DType::kI32}, {t * k}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "choice_of", args.choice_of, {DType::kI32}, {t * k}));
  MOE_RETURN_IF_ERROR(
      CheckView(kOp, "expert_offsets", args.expert_offsets, {DType::kI32}, {e + 1}));
  // Counting sort by expert; tokens stay ascending inside an expert.
  std::vector<int32_t> next(e + 1, 0);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = args.topk_ids.at<int32_t>(i, j);
      if (id >= 0 && id < e) ++next[id + 1];
    }
  }
  for (int64_t i = 0; i < e; ++i) next[i + 1] += next[i];
  for (int64_t i = 0; i <= e; ++i) args.expert_offsets.at<int32_t>(i) = next[i];
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = args.topk_ids.at<int32_t>(i, j);
      if (id < 0 || id >= e) continue;
      const int32_t r = next[id]++;
      args.row_of.at<int32_t>(r) = static_cast<int32_t>(i);
      args.choice_of.at<int32_t>(r) = static_cast<int32_t>(j);
    }
  }
  const int64_t rows = args.expert_offsets.at<int32_t>(e);
  common::ThreadPool::Default().ParallelFor(
      rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          std::memcpy(&args.permuted.at<float>(r, 0), &args.x.at<float>(args.row_of.at<int32_t>(r), 0),
                      h * sizeof(float));  // [R, H] <- [T, H]
        }
      });
  return absl::OkStatus();
}

absl::Status Unpermute(const UnpermuteArgs& args) {
  constexpr const char* kOp = "Unpermute";
  MOE_RETURN_IF_ERROR(CheckView(kOp, "y", args.y, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t rows = args.y.dim(0), h = args.y.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "row_of", args.row_of, {DType::kI32}, {rows}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "choice_of", args.choice_of, {DType::kI32}, {rows}));
  MOE_RETURN_IF_ERROR(
      CheckView(kOp, "topk_weights", args.topk_weights, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t t = args.topk_weights.dim(0), k = args.topk_weights.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "out", args.out, {DType::kF32}, {t, h}));
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t row = args.row_of.at<int32_t>(r), choice = args.choice_of.at<int32_t>(r);
    if (row < 0 || row >= t) {
      return Invalid(kOp, "row_of", absl::StrCat("[", r, "] = ", row, " is outside [0, ", t, ")"));
    }
    if (choice < 0 || choice >= k) {
      return Invalid(kOp, "choice_of",
                     absl::StrCat("[", r, "] = ", choice, " is outside [0, ", k, ")"));
    }
  }
  // Items own column ranges, so rows of the same token never race.
  constexpr int64_t kCols = 256;
  common::ThreadPool::Default().ParallelFor(
      (h + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
        const int64_t c0 = begin * kCols, c1 = std::min(h, end * kCols);
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t row = args.row_of.at<int32_t>(r);
          const float w = args.topk_weights.at<float>(row, args.choice_of.at<int32_t>(r));
          const float* y = &args.y.at<float>(r, 0);  // [R, H]
          float* out = &args.out.at<float>(row, 0);  // [T, H]
          for (int64_t c = c0; c < c1; ++c) out[c] += w * y[c];
        }
      });
  return absl::OkStatus();
}

absl::Status ExpertFfn(const ExpertFfnArgs& args) {
  constexpr const char* kOp = "ExpertFfn";
  if (args.experts == nullptr) return Invalid(kOp, "experts", "is required");
  MOE_RETURN_IF_ERROR(CheckView(kOp, "x", args.x, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t t = args.x.dim(0), h = args.x.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "topk_ids", args.topk_ids, {DType::kI32}, {t, kAnyDim}));
  const int64_t k = args.topk_ids.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "topk_weights", args.topk_weights, {DType::kF32}, {t, k}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "out", args.out, {DType::kF32}, {t, h}));
  const std::vector<SwigluWeights>& experts = *args.experts;
  const int64_t e = static_cast<int64_t>(experts.size());
  // Rows per expert (counting sort), tokens ascending inside an expert.
  std::vector<int64_t> count(e + 1, 0);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = args.topk_ids.at<int32_t>(i, j);  // [T, k]
      if (id >= 0 && id < e && !experts[id].gate.empty()) ++count[id + 1];
    }
  }
  Groups groups;
  std::vector<int64_t> group_of(e, -1);
  const int64_t f = [&] {
    for (int64_t id = 0; id < e; ++id) if (count[id + 1] > 0) return experts[id].gate.dim(0);
    return int64_t{0};
  }();
  int64_t total = 0;
  for (int64_t id = 0; id < e; ++id) {
    if (count[id + 1] == 0) continue;
    MOE_RETURN_IF_ERROR(
        CheckSwiglu(kOp, absl::StrCat("experts[", id, "]"), experts[id], h, f));
    group_of[id] = static_cast<int64_t>(groups.weights.size());
    groups.weights.push_back(&experts[id]);
    groups.offsets.push_back(total);
    total += count[id + 1];
  }
  if (groups.weights.empty()) return absl::OkStatus();
  groups.offsets.push_back(total);
  groups.token.resize(total);
  groups.scale.resize(total);
  std::vector<int64_t> fill(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = args.topk_ids.at<int32_t>(i, j);
      if (id < 0 || id >= e || group_of[id] < 0) continue;
      const int64_t r = fill[group_of[id]]++;
      groups.token[r] = static_cast<int32_t>(i);
      groups.scale[r] = args.topk_weights.at<float>(i, j);
    }
  }
  RunSwiglu(args.x, groups, args.out, /*accumulate=*/true);
  return absl::OkStatus();
}

absl::Status Mlp(const MlpArgs& args) {
  constexpr const char* kOp = "Mlp";
  if (args.weights == nullptr) return Invalid(kOp, "weights", "is required");
  MOE_RETURN_IF_ERROR(CheckView(kOp, "x", args.x, {DType::kF32}, {kAnyDim, kAnyDim}));
  const int64_t t = args.x.dim(0), h = args.x.dim(1);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "out", args.out, {DType::kF32}, {t, h}));
  MOE_RETURN_IF_ERROR(
      CheckView(kOp, "weights.gate", args.weights->gate, {DType::kF32, DType::kBF16},
                {kAnyDim, h}));
  MOE_RETURN_IF_ERROR(CheckSwiglu(kOp, "weights", *args.weights, h, args.weights->gate.dim(0)));
  if (t == 0) return absl::OkStatus();
  Groups groups;
  groups.weights = {args.weights};
  groups.offsets = {0, t};
  groups.token.resize(t);
  std::iota(groups.token.begin(), groups.token.end(), 0);
  RunSwiglu(args.x, groups, args.out, args.accumulate);
  return absl::OkStatus();
}

}  // namespace moe::kernels::cpu
