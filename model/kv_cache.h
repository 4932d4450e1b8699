// Paged KV cache: the storage (KvCache) and a simple block allocator (BlockAllocator,
// SequenceBlocks), kept apart so that a serving frontend can own the block tables itself
// (vLLM style) while an attention worker owns only the memory.
//
// Storage layout per layer (block b holds positions [b * block_size, (b + 1) * block_size) of
// whichever sequence owns it):
//   GQA: k [num_blocks, block_size, kv_heads, head_dim], v [.., kv_heads, v_head_dim]
//   MLA: one latent cache [num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]: the
//        compressed row (normalised latent, then the rotated shared rope key). K is the whole
//        row and V the first kv_lora_rank features (a strided view of the same memory); the
//        expanded per-head K/V are never stored.
// A flat slot is block * block_size + offset (kernels::KvWriteArgs::slots).
//
// Contract: KvCache::Create validates the sizes and allocates everything up front (zeroed);
// views stay valid for the cache's lifetime. BlockAllocator hands out block ids in
// [0, num_blocks), ResourceExhausted when none is free; Free of a block that is not allocated
// is a broken invariant (CHECK).
//
// Threads: KvCache views may be used from any thread; writes into the cache follow the
// forward pass's threading (one Forward at a time). BlockAllocator and SequenceBlocks are
// not thread-safe: one owner (the engine loop or the generate loop) uses them.
//
//   MOE_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
//                        KvCache::Create(config, {.num_blocks = 512, .block_size = 16}));
//   BlockAllocator alloc(cache->num_blocks());
//   SequenceBlocks seq;
//   MOE_RETURN_IF_ERROR(seq.Reserve(prompt_len, cache->block_size(), alloc));
//   ... Forward with seq.table() ...
//   seq.Release(alloc);
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"
#include "model/model_config.h"

namespace moe::model {

struct KvCacheOptions {
  int num_blocks = 256;
  int block_size = 16;
  // kF32 or kBF16. bf16 (the default) halves the cache's memory and the bytes attention
  // reads; keys and values are rounded once when written (golden_test's bf16-KV cases bound
  // the effect on logits). kF32 reproduces f32 references exactly.
  common::DType dtype = common::DType::kBF16;
};

class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const ModelConfig& config,
                                                         const KvCacheOptions& options);

  int num_layers() const { return static_cast<int>(k_.size()); }
  int num_blocks() const { return options_.num_blocks; }
  int block_size() const { return options_.block_size; }
  common::DType dtype() const { return options_.dtype; }
  bool is_latent() const { return latent_; }
  // Tokens the cache can hold in all (num_blocks * block_size).
  int64_t capacity_tokens() const {
    return static_cast<int64_t>(options_.num_blocks) * options_.block_size;
  }
  // Bytes of cache memory over all layers.
  size_t bytes() const;

  // GQA: [num_blocks, block_size, kv_heads, head_dim]; MLA: [num_blocks, block_size, 1, L + R].
  common::TensorView k(int layer) const { return k_[layer].view(); }
  // GQA: [num_blocks, block_size, kv_heads, v_head_dim]; MLA: the first L features of k(layer),
  // strided; for writes pass an empty view (the latent row is written through k).
  common::TensorView v(int layer) const;

 private:
  KvCache() = default;

  KvCacheOptions options_;
  bool latent_ = false;
  int64_t latent_dim_ = 0;  // MLA: kv_lora_rank (the V width inside the latent row)
  std::vector<common::Tensor> k_;  // per layer
  std::vector<common::Tensor> v_;  // per layer, GQA only
};

// A free list of block ids. Allocation order is deterministic (lowest free id first after
// construction; freed blocks are reused last-in first-out).
class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);

  // A free block id, or ResourceExhausted when every block is in use.
  absl::StatusOr<int32_t> Allocate();
  // Returns a block allocated by Allocate (CHECKs that it is).
  void Free(int32_t block);

  int num_blocks() const { return static_cast<int>(in_use_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }

 private:
  std::vector<int32_t> free_;  // stack; back() is handed out next
  std::vector<bool> in_use_;   // [num_blocks]
};

// The block table of one sequence: block i holds its positions [i * bs, (i + 1) * bs).
class SequenceBlocks {
 public:
  // Grows the table to hold num_tokens positions. On ResourceExhausted the blocks taken by
  // this call are returned, so the table is unchanged.
  absl::Status Reserve(int64_t num_tokens, int block_size, BlockAllocator& allocator);
  // Returns every block to the allocator and empties the table.
  void Release(BlockAllocator& allocator);

  const std::vector<int32_t>& table() const { return blocks_; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }

 private:
  std::vector<int32_t> blocks_;
};

}  // namespace moe::model
