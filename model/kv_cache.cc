#include "model/kv_cache.h"

#include <algorithm>

#include "common/logging.h"

namespace moe::model {

using common::DType;
using common::Tensor;
using common::TensorView;

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const ModelConfig& config,
                                                         const KvCacheOptions& options) {
  if (options.num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv cache: num_blocks must be positive, got ", options.num_blocks));
  }
  if (options.block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv cache: block_size must be positive, got ", options.block_size));
  }
  if (options.dtype != DType::kF32 && options.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv cache: dtype must be f32 or bf16, got ", std::string(DTypeName(options.dtype))));
  }
  if (config.num_layers <= 0) {
    return absl::InvalidArgumentError("kv cache: the model has no layers");
  }
  std::unique_ptr<KvCache> cache(new KvCache());
  cache->options_ = options;
  const int64_t nb = options.num_blocks, bs = options.block_size;
  if (config.attention == AttentionKind::kMla) {
    cache->latent_ = true;
    cache->latent_dim_ = config.mla.kv_lora_rank;
    const int64_t row = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim;
    for (int l = 0; l < config.num_layers; ++l) {
      cache->k_.emplace_back(options.dtype, std::vector<int64_t>{nb, bs, 1, row});
    }
  } else {
    const int64_t kv = config.num_kv_heads, dk = config.QkHeadDim(), dv = config.VHeadDim();
    for (int l = 0; l < config.num_layers; ++l) {
      cache->k_.emplace_back(options.dtype, std::vector<int64_t>{nb, bs, kv, dk});
      cache->v_.emplace_back(options.dtype, std::vector<int64_t>{nb, bs, kv, dv});
    }
  }
  return cache;
}

size_t KvCache::bytes() const {
  size_t total = 0;
  for (const Tensor& t : k_) total += t.view().nbytes();
  for (const Tensor& t : v_) total += t.view().nbytes();
  return total;
}

TensorView KvCache::v(int layer) const {
  if (!latent_) return v_[layer].view();
  const TensorView k = k_[layer].view();  // [nb, bs, 1, L + R]
  return TensorView(k.data(), k.dtype(), {k.dim(0), k.dim(1), 1, latent_dim_}, k.strides(),
                    k.device());
}

BlockAllocator::BlockAllocator(int num_blocks) : in_use_(std::max(num_blocks, 0), false) {
  free_.reserve(in_use_.size());
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

absl::StatusOr<int32_t> BlockAllocator::Allocate() {
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("kv cache full: all ", num_blocks(), " blocks are in use"));
  }
  int32_t b = free_.back();
  free_.pop_back();
  in_use_[b] = true;
  return b;
}

void BlockAllocator::Free(int32_t block) {
  MOE_CHECK(block >= 0 && block < num_blocks() && in_use_[block])
      << "freeing block " << block << " that is not allocated";
  in_use_[block] = false;
  free_.push_back(block);
}

absl::Status SequenceBlocks::Reserve(int64_t num_tokens, int block_size,
                                     BlockAllocator& allocator) {
  const int64_t needed = (num_tokens + block_size - 1) / block_size;
  const size_t before = blocks_.size();
  while (static_cast<int64_t>(blocks_.size()) < needed) {
    absl::StatusOr<int32_t> b = allocator.Allocate();
    if (!b.ok()) {
      while (blocks_.size() > before) {
        allocator.Free(blocks_.back());
        blocks_.pop_back();
      }
      return b.status();
    }
    blocks_.push_back(*b);
  }
  return absl::OkStatus();
}

void SequenceBlocks::Release(BlockAllocator& allocator) {
  for (int32_t b : blocks_) allocator.Free(b);
  blocks_.clear();
}

}  // namespace moe::model
