// CPU kernels: paged KV cache writes and paged attention.
//
// PagedAttention runs one work item per (sequence, KV head, block of up to kQueryRowBlock
// query rows): the item covers every query head of the KV head's GQA group, so each cache
// block's keys and values are read from memory once and then serve all of the item's
// (row, head) queries from L1. It walks the sequence's cache blocks in order with an online
// softmax per query (one rescale per block), scoring a block of keys with DotRows and folding
// its values in with AccumulateRows (internal/simd.h). Keys and values are read through their
// views' strides, so MLA's v (the first L features of the latent cache row) needs no copy.
#include <algorithm>
#include <cmath>
#include <limits>
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
using internal::CheckView;
using internal::Invalid;
using internal::kAnyDim;

// Query rows per work item: prefill rows of one sequence are split into blocks of this many
// so both cores share a long prompt (items with later rows, which see more keys, run first).
constexpr int64_t kQueryRowBlock = 16;

// Converts one row of n f32 values into the cache's dtype.
void StoreRow(const float* src, int64_t n, DType dtype, void* dst) {
  if (dtype == DType::kF32) {
    std::copy(src, src + n, static_cast<float*>(dst));
  } else {
    internal::ConvertToBf16(src, static_cast<uint16_t*>(dst), n);
  }
}

// Address of [block, offset, head, 0] in a [num_blocks, block_size, heads, D] cache view.
char* CacheRow(const TensorView& cache, int64_t block, int64_t offset, int64_t head) {
  const auto& s = cache.strides();
  return static_cast<char*>(cache.data()) +
         (block * s[0] + offset * s[1] + head * s[2]) * common::DTypeSize(cache.dtype());
}

}  // namespace

absl::Status WriteKvCache(const KvWriteArgs& args) {
  constexpr const char* kOp = "WriteKvCache";
  MOE_RETURN_IF_ERROR(CheckView(kOp, "k", args.k, {DType::kF32}, {kAnyDim, kAnyDim, kAnyDim}));
  const int64_t t = args.k.dim(0), kv_heads = args.k.dim(1), d = args.k.dim(2);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "slots", args.slots, {DType::kI64}, {t}));
  MOE_RETURN_IF_ERROR(CheckView(kOp, "k_cache", args.k_cache, {DType::kF32, DType::kBF16},
                                {kAnyDim, kAnyDim, kv_heads, d}));
  const int64_t capacity = args.k_cache.dim(0) * args.k_cache.dim(1);
  const int64_t block_size = args.k_cache.dim(1);
  const bool has_v = !args.v.empty();
  if (has_v != !args.v_cache.empty()) {
    return Invalid(kOp, "v_cache", "must be given exactly when v is");
  }
  int64_t dv = 0;
  if (has_v) {
    MOE_RETURN_IF_ERROR(CheckView(kOp, "v", args.v, {DType::kF32}, {t, kv_heads, kAnyDim}));
    dv = args.v.dim(2);
    MOE_RETURN_IF_ERROR(CheckView(kOp, "v_cache", args.v_cache, {DType::kF32, DType::kBF16},
                                  {args.k_cache.dim(0), block_size, kv_heads, dv}));
  }
  for (int64_t i = 0; i < t; ++i) {
    const int64_t slot = args.slots.at<int64_t>(i);
    if (slot >= capacity) {
      return Invalid(kOp, "slots",
                     absl::StrCat("[", i, "] = ", slot, " is outside the cache (", capacity,
                                  " slots)"));
    }
  }
  common::ThreadPool::Default().ParallelFor(t, 0, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = args.slots.at<int64_t>(i);
      if (slot < 0) continue;  // padding row
      const int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < kv_heads; ++h) {
        // k: [T, kv_heads, D] -> k_cache: [num_blocks, block_size, kv_heads, D]
        StoreRow(&args.k.at<float>(i, h), d, args.k_cache.dtype(),
                 CacheRow(args.k_cache, block, offset, h));
        if (has_v) {
          StoreRow(&args.v.at<float>(i, h), dv, args.v_cache.dtype(),
                   CacheRow(args.v_cache, block, offset, h));
        }
      }
    }
  });
  return absl::OkStatus();
}

absl::Status PagedAttention(const AttentionArgs& args) {
  constexpr const char* kOp = "PagedAttention";
  if (args.seqs == nullptr) return Invalid(kOp, "seqs", "is required");
  MOE_RETURN_IF_ERROR(CheckView(kOp, "q", args.q, {DType::kF32}, {kAnyDim, kAnyDim, kAnyDim}));
  const int64_t t = args.q.dim(0), heads = args.q.dim(1), d = args.q.dim(2);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "k_cache", args.k_cache, {DType::kF32, DType::kBF16},
                                {kAnyDim, kAnyDim, kAnyDim, d}));
  const int64_t num_blocks = args.k_cache.dim(0), block_size = args.k_cache.dim(1);
  const int64_t kv_heads = args.k_cache.dim(2);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "v_cache", args.v_cache, {DType::kF32, DType::kBF16},
                                {num_blocks, block_size, kv_heads, kAnyDim}));
  const int64_t dv = args.v_cache.dim(3);
  MOE_RETURN_IF_ERROR(CheckView(kOp, "out", args.out, {DType::kF32}, {t, heads, dv}));
  if (kv_heads == 0 || heads % kv_heads != 0) {
    return Invalid(kOp, "k_cache",
                   absl::StrCat("has ", kv_heads, " kv heads, which must divide ", heads,
                                " query heads"));
  }
  const std::vector<AttentionSeq>& seqs = *args.seqs;
  // Rows no sequence covers are left untouched.
  for (size_t s = 0; s < seqs.size(); ++s) {
    const AttentionSeq& seq = seqs[s];
    const std::string field = absl::StrCat("seqs[", s, "]");
    if (seq.q_len < 0 || seq.q_start < 0 || seq.q_start + seq.q_len > t) {
      return Invalid(kOp, field.c_str(), absl::StrCat("query rows [", seq.q_start, ", ",
                                                      seq.q_start + seq.q_len,
                                                      ") exceed the ", t, " rows of q"));
    }
    if (seq.q_len > seq.context_len) {
      return Invalid(kOp, field.c_str(), "has q_len > context_len");
    }
    if (static_cast<int64_t>(seq.num_blocks) * block_size < seq.context_len ||
        (seq.context_len > 0 && seq.block_table == nullptr)) {
      return Invalid(kOp, field.c_str(), "has too few blocks for its context_len");
    }
    const int64_t used_blocks = (seq.context_len + block_size - 1) / block_size;
    for (int64_t b = 0; b < used_blocks; ++b) {
      if (seq.block_table[b] < 0 || seq.block_table[b] >= num_blocks) {
        return Invalid(kOp, field.c_str(),
                       absl::StrCat("block_table[", b, "] = ", seq.block_table[b],
                                    " is outside the cache's ", num_blocks, " blocks"));
      }
    }
  }
  const bool k_bf16 = args.k_cache.dtype() == DType::kBF16;
  const bool v_bf16 = args.v_cache.dtype() == DType::kBF16;
  const int64_t group = heads / kv_heads;
  // Items: (sequence, KV head, query-row block), the blocks of a sequence last-first.
  struct Item {
    int32_t seq;
    int32_t kvh;
    int32_t r0, r1;  // query rows (absolute rows of q)
  };
  std::vector<Item> items;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const AttentionSeq& seq = seqs[s];
    if (seq.q_len == 0) continue;
    const int64_t blocks = (seq.q_len + kQueryRowBlock - 1) / kQueryRowBlock;
    for (int64_t qb = blocks - 1; qb >= 0; --qb) {
      const int32_t r0 = static_cast<int32_t>(seq.q_start + qb * kQueryRowBlock);
      const int32_t r1 = static_cast<int32_t>(
          std::min<int64_t>(seq.q_start + seq.q_len, r0 + kQueryRowBlock));
      for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
        items.push_back({static_cast<int32_t>(s), static_cast<int32_t>(kvh), r0, r1});
      }
    }
  }
  common::ThreadPool::Default().ParallelFor(
      static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(block_size);
        for (int64_t it = begin; it < end; ++it) {
          const Item& item = items[it];
          const AttentionSeq& seq = seqs[item.seq];
          const int64_t nq = (item.r1 - item.r0) * group;  // queries: (row, head in group)
          // Per query: running max, denominator, and the [dv] accumulator.
          float* state = internal::ThreadScratchAs<float>(internal::kScratchAttention,
                                                          static_cast<size_t>(nq) * (dv + 2));
          float* max_score = state;
          float* denom = state + nq;
          float* acc = state + 2 * nq;
          std::fill(max_score, max_score + nq, -std::numeric_limits<float>::infinity());
          std::fill(denom, denom + nq, 0.0f);
          std::fill(acc, acc + nq * dv, 0.0f);
          // Position of the first query row; row r sees keys [0, first_pos + r - r0].
          const int64_t first_pos = seq.context_len - seq.q_len + (item.r0 - seq.q_start);
          const int64_t last_pos = first_pos + (item.r1 - 1 - item.r0);
          for (int64_t b = 0; b * block_size <= last_pos; ++b) {
            const int64_t block = seq.block_table[b];
            const char* k_block = CacheRow(args.k_cache, block, 0, item.kvh);
            const char* v_block = CacheRow(args.v_cache, block, 0, item.kvh);
            for (int64_t row = item.r0; row < item.r1; ++row) {
              const int64_t pos = first_pos + (row - item.r0);
              if (b * block_size > pos) continue;  // causal: this row sees none of the block
              const int64_t n = std::min(block_size, pos + 1 - b * block_size);
              for (int64_t g = 0; g < group; ++g) {
                const int64_t h = item.kvh * group + g;
                const int64_t qi = (row - item.r0) * group + g;
                const float* q = &args.q.at<float>(row, h);  // [T, heads, D]
                internal::DotRows(q, k_block, k_bf16, args.k_cache.strides()[1], n, d,
                                  scores.data());
                float block_max = -std::numeric_limits<float>::infinity();
                for (int64_t j = 0; j < n; ++j) {
                  scores[j] *= args.scale;
                  block_max = std::max(block_max, scores[j]);
                }
                const float new_max = std::max(max_score[qi], block_max);
                const float rescale = std::exp(max_score[qi] - new_max);  // 0 on the first block
                float block_sum = 0.0f;
                for (int64_t j = 0; j < n; ++j) {
                  scores[j] = std::exp(scores[j] - new_max);
                  block_sum += scores[j];
                }
                denom[qi] = denom[qi] * rescale + block_sum;
                internal::AccumulateRows(scores.data(), v_block, v_bf16,
                                         args.v_cache.strides()[1], n, dv, rescale,
                                         acc + qi * dv);
                max_score[qi] = new_max;
              }
            }
          }
          for (int64_t row = item.r0; row < item.r1; ++row) {
            for (int64_t g = 0; g < group; ++g) {
              const int64_t qi = (row - item.r0) * group + g;
              float* out = &args.out.at<float>(row, item.kvh * group + g);  // [T, heads, Dv]
              const float inv = 1.0f / denom[qi];
              for (int64_t i = 0; i < dv; ++i) out[i] = acc[qi * dv + i] * inv;
            }
          }
        }
      });
  return absl::OkStatus();
}

}  // namespace moe::kernels::cpu
