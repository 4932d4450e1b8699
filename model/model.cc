#include "model/model.h"

#include <algorithm>
#include <cstring>

#include "common/logging.h"

namespace moe::model {

using common::DType;
using common::Tensor;
using common::TensorView;

namespace {

// DeepSeek's q_a_layernorm and kv_a_layernorm are built without an eps argument in
// transformers, so they use the RMSNorm default rather than config.rms_norm_eps.
constexpr double kMlaLatentNormEps = 1e-6;

// A [rows, cols] view into a row-major buffer whose rows are `stride` elements apart,
// starting `offset` elements in.
TensorView View2d(const TensorView& base, int64_t offset, int64_t rows, int64_t cols,
                  int64_t stride) {
  char* p = static_cast<char*>(base.data()) + offset * DTypeSize(base.dtype());
  return TensorView(p, base.dtype(), {rows, cols}, {stride, 1}, base.device());
}

// A [rows, heads, dim] view: rows `row_stride` apart, heads `head_stride` apart.
TensorView View3d(const TensorView& base, int64_t offset, int64_t rows, int64_t heads,
                  int64_t dim, int64_t row_stride, int64_t head_stride) {
  char* p = static_cast<char*>(base.data()) + offset * DTypeSize(base.dtype());
  return TensorView(p, base.dtype(), {rows, heads, dim}, {row_stride, head_stride, 1},
                    base.device());
}

kernels::RopeScalingParams RopeParams(const ModelConfig& c) {
  kernels::RopeScalingParams p;
  switch (c.rope.scaling) {
    case RopeScalingKind::kNone: p.type = kernels::RopeScalingParams::Type::kNone; break;
    case RopeScalingKind::kLinear: p.type = kernels::RopeScalingParams::Type::kLinear; break;
    case RopeScalingKind::kYarn: p.type = kernels::RopeScalingParams::Type::kYarn; break;
  }
  p.factor = c.rope.factor;
  p.original_max_positions = static_cast<int>(c.rope.original_max_position_embeddings > 0
                                                   ? c.rope.original_max_position_embeddings
                                                   : c.max_position_embeddings);
  p.beta_fast = c.rope.beta_fast;
  p.beta_slow = c.rope.beta_slow;
  p.mscale = c.rope.mscale;
  p.mscale_all_dim = c.rope.mscale_all_dim;
  p.truncate = c.rope.truncate;
  // The cos/sin multiplier exactly as transformers derives it (ModelConfig knows the rules).
  if (c.rope.scaling == RopeScalingKind::kYarn) p.attention_factor = c.rope.CosSinScale();
  return p;
}

}  // namespace

// Activation buffers reused across steps. Sized for `tokens` rows and `logit_rows` rows.
struct Model::Scratch {
  int64_t tokens = 0;
  int64_t logit_rows = 0;

  // Per token.
  Tensor ids, positions, slots;          // [T] i32, [T] i32, [T] i64
  Tensor hidden, normed, attn_out;       // [T, hidden]
  Tensor mlp_out, shared_out;            // [T, hidden]
  Tensor q, k, v, attn;                  // GQA: [T, H*D], [T, KV*D], [T, KV*Dv], [T, H*Dv]
  Tensor q_a, kv, q_cat, attn_latent;    // MLA: [T, q_lora], [T, L+R], [T, H*(L+R)], [T, H*L]
  Tensor router_logits;                  // [T, E]
  Tensor topk_ids, topk_weights;         // [T, k]
  Tensor gate_logit;                     // [T, 1]
  // Per logits row.
  Tensor gather_ids;                     // [R] i32
  Tensor gathered;                       // [R, hidden]
  Tensor logits;                         // [R, V]

  // Per-step host metadata (capacity kept across steps).
  std::vector<kernels::AttentionSeq> attn_seqs;

  void Ensure(const ModelConfig& c, int64_t t, int64_t r) {
    if (t > tokens) {
      t = std::max(t, tokens * 2);
      const int64_t h = c.hidden_size;
      ids = Tensor(DType::kI32, {t});
      positions = Tensor(DType::kI32, {t});
      slots = Tensor(DType::kI64, {t});
      hidden = Tensor(DType::kF32, {t, h});
      normed = Tensor(DType::kF32, {t, h});
      attn_out = Tensor(DType::kF32, {t, h});
      mlp_out = Tensor(DType::kF32, {t, h});
      shared_out = Tensor(DType::kF32, {t, h});
      const int64_t heads = c.num_heads;
      if (c.attention == AttentionKind::kGqa) {
        q = Tensor(DType::kF32, {t, heads * c.QkHeadDim()});
        k = Tensor(DType::kF32, {t, c.num_kv_heads * c.QkHeadDim()});
        v = Tensor(DType::kF32, {t, c.num_kv_heads * c.VHeadDim()});
      } else {
        const int64_t lat = c.mla.kv_lora_rank, rope = c.mla.qk_rope_head_dim;
        if (c.mla.q_lora_rank > 0) q_a = Tensor(DType::kF32, {t, c.mla.q_lora_rank});
        q = Tensor(DType::kF32, {t, heads * c.QkHeadDim()});
        kv = Tensor(DType::kF32, {t, lat + rope});
        q_cat = Tensor(DType::kF32, {t, heads * (lat + rope)});
        attn_latent = Tensor(DType::kF32, {t, heads * lat});
      }
      attn = Tensor(DType::kF32, {t, heads * c.VHeadDim()});
      if (c.moe.num_experts > 0) {
        router_logits = Tensor(DType::kF32, {t, c.moe.num_experts});
        topk_ids = Tensor(DType::kI32, {t, c.moe.top_k});
        topk_weights = Tensor(DType::kF32, {t, c.moe.top_k});
      }
      gate_logit = Tensor(DType::kF32, {t, 1});
      tokens = t;
    }
    if (r > logit_rows) {
      r = std::max(r, logit_rows * 2);
      gather_ids = Tensor(DType::kI32, {r});
      gathered = Tensor(DType::kF32, {r, c.hidden_size});
      logits = Tensor(DType::kF32, {r, c.vocab_size});
      logit_rows = r;
    }
  }
};

absl::Status LocalExpertExecutor::RunRoutedExperts(int layer, TensorView x, TensorView topk_ids,
                                                   TensorView topk_weights, TensorView out) {
  const LayerWeights& lw = weights_.layer(layer);
  if (!lw.is_moe) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " has no routed experts"));
  }
  for (int64_t t = 0; t < out.dim(0); ++t) {
    std::memset(out.Row(t).data(), 0, out.dim(1) * sizeof(float));
  }
  return kernels::ExpertFfn({.x = x,
                             .topk_ids = topk_ids,
                             .topk_weights = topk_weights,
                             .experts = &lw.moe.experts,
                             .out = out});
}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelOptions& options) {
  MOE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  if (config.hidden_act != "silu") {
    return absl::UnimplementedError(absl::StrCat(
        "config.json: hidden_act \"", config.hidden_act, "\" is not supported (only silu)"));
  }
  if (config.clip_qkv > 0.0) {
    return absl::UnimplementedError("config.json: clip_qkv is not supported yet");
  }
  // Resizing the process-wide pool destroys it, so only when asked for and different.
  if (options.threads > 0 && options.threads != kernels::CpuThreads()) {
    kernels::SetCpuThreads(options.threads);
  }
  std::unique_ptr<Model> m(new Model());
  m->config_ = config;
  WeightsOptions wopts;
  wopts.dtype = options.dtype;
  wopts.experts = options.experts;
  wopts.huge_pages = options.huge_pages;
  MOE_ASSIGN_OR_RETURN(m->weights_, ModelWeights::Load(dir, config, wopts));
  MOE_ASSIGN_OR_RETURN(m->kv_cache_, KvCache::Create(config, options.kv));

  const int64_t max_positions =
      std::min<int64_t>(config.max_position_embeddings, m->kv_cache_->capacity_tokens());
  MOE_ASSIGN_OR_RETURN(m->rope_table_,
                       kernels::BuildRopeTable(config.rope.rotary_dim,
                                               static_cast<int>(max_positions),
                                               config.rope.theta, RopeParams(config)));
  m->rope_style_ = config.rope.layout == RopeLayout::kInterleaved
                       ? kernels::RopeStyle::kInterleaved
                       : kernels::RopeStyle::kHalf;
  m->attention_scale_ = static_cast<float>(config.AttentionScale());
  m->local_executor_ = std::make_unique<LocalExpertExecutor>(*m->weights_);
  m->executor_ = m->local_executor_.get();
  m->scratch_ = std::make_unique<Scratch>();
  m->scratch_->Ensure(config, std::max(1, options.initial_batch_tokens), 1);
  return m;
}

void Model::SetExpertExecutor(ExpertExecutor* executor) {
  executor_ = executor != nullptr ? executor : local_executor_.get();
}

absl::StatusOr<ForwardOutput> Model::Forward(const ForwardBatch& batch) {
  const ModelConfig& c = config_;
  if (batch.seqs.empty()) return absl::InvalidArgumentError("forward: empty batch");
  const int bs = kv_cache_->block_size();
  int64_t num_tokens = 0, num_logit_rows = 0;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const SequenceInput& s = batch.seqs[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (n == 0) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", i, " has no tokens"));
    }
    const int64_t end = s.start_position + n;
    if (s.start_position < 0 || end > rope_table_.max_positions) {
      return absl::InvalidArgumentError(absl::StrCat(
          "forward: sequence ", i, " positions [", s.start_position, ", ", end,
          ") exceed the model's limit of ", rope_table_.max_positions,
          " positions (max_position_embeddings and the KV cache capacity)"));
    }
    if (static_cast<int64_t>(s.block_table.size()) * bs < end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "forward: sequence ", i, " block table holds ", s.block_table.size() * bs,
          " positions, needs ", end));
    }
    for (int32_t b : s.block_table.first((end + bs - 1) / bs)) {
      if (b < 0 || b >= kv_cache_->num_blocks()) {
        return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", i, " block id ", b,
                                                       " is outside the cache [0, ",
                                                       kv_cache_->num_blocks(), ")"));
      }
    }
    for (int32_t id : s.tokens) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", i, " token id ", id,
                                                       " is outside the vocabulary [0, ",
                                                       c.vocab_size, ")"));
      }
    }
    num_tokens += n;
    num_logit_rows += s.logits == LogitsRows::kAll ? n : s.logits == LogitsRows::kLast ? 1 : 0;
  }

  Scratch& sc = *scratch_;
  sc.Ensure(c, num_tokens, std::max<int64_t>(num_logit_rows, 1));
  const int64_t t_all = num_tokens;
  ForwardOutput result;
  result.logits_offset.reserve(batch.seqs.size() + 1);
  result.logits_offset.push_back(0);
  sc.attn_seqs.clear();
  {
    int32_t* ids = sc.ids.data_as<int32_t>();
    int32_t* pos = sc.positions.data_as<int32_t>();
    int64_t* slots = sc.slots.data_as<int64_t>();
    int32_t* gather = sc.gather_ids.data_as<int32_t>();
    int64_t row = 0, logit_row = 0;
    for (const SequenceInput& s : batch.seqs) {
      const int32_t n = static_cast<int32_t>(s.tokens.size());
      const int32_t context = s.start_position + n;
      sc.attn_seqs.push_back({.q_start = static_cast<int32_t>(row),
                              .q_len = n,
                              .context_len = context,
                              .block_table = s.block_table.data(),
                              .num_blocks = (context + bs - 1) / bs});
      for (int32_t j = 0; j < n; ++j) {
        const int32_t p = s.start_position + j;
        ids[row + j] = s.tokens[j];
        pos[row + j] = p;
        slots[row + j] = static_cast<int64_t>(s.block_table[p / bs]) * bs + p % bs;
        if (s.logits == LogitsRows::kAll || (s.logits == LogitsRows::kLast && j == n - 1)) {
          gather[logit_row++] = static_cast<int32_t>(row + j);
        }
      }
      row += n;
      result.logits_offset.push_back(static_cast<int32_t>(logit_row));
    }
  }

  const TensorView hidden = sc.hidden.view().Slice(0, t_all);
  const TensorView normed = sc.normed.view().Slice(0, t_all);
  const TensorView attn_out = sc.attn_out.view().Slice(0, t_all);
  const TensorView mlp_out = sc.mlp_out.view().Slice(0, t_all);
  const double eps = c.rms_norm_eps;

  MOE_RETURN_IF_ERROR(kernels::Embedding(
      {.ids = sc.ids.view().Slice(0, t_all), .table = weights_->embedding(), .out = hidden}));
  MOE_RETURN_IF_ERROR(kernels::RmsNorm(
      {.in = hidden, .weight = weights_->layer(0).input_norm, .eps = eps, .out = normed}));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = weights_->layer(l);
    MOE_RETURN_IF_ERROR(Attention(l, static_cast<int>(t_all)));
    MOE_RETURN_IF_ERROR(kernels::RmsNorm({.in = attn_out,
                                          .weight = lw.post_attention_norm,
                                          .eps = eps,
                                          .out = normed,
                                          .residual = hidden}));
    MOE_RETURN_IF_ERROR(FeedForward(l, static_cast<int>(t_all)));
    if (l + 1 < c.num_layers) {
      MOE_RETURN_IF_ERROR(kernels::RmsNorm({.in = mlp_out,
                                            .weight = weights_->layer(l + 1).input_norm,
                                            .eps = eps,
                                            .out = normed,
                                            .residual = hidden}));
    }
  }
  MOE_RETURN_IF_ERROR(kernels::Add({.a = hidden, .b = mlp_out, .out = hidden}));

  const int64_t r = num_logit_rows;
  if (r > 0) {
    const TensorView gathered = sc.gathered.view().Slice(0, r);
    const TensorView logits = sc.logits.view().Slice(0, r);
    MOE_RETURN_IF_ERROR(kernels::Embedding(
        {.ids = sc.gather_ids.view().Slice(0, r), .table = hidden, .out = gathered}));
    MOE_RETURN_IF_ERROR(kernels::RmsNorm(
        {.in = gathered, .weight = weights_->final_norm(), .eps = eps, .out = gathered}));
    MOE_RETURN_IF_ERROR(
        kernels::Linear({.in = gathered, .weight = weights_->lm_head(), .out = logits}));
    result.logits = logits;
  } else {
    result.logits = sc.logits.view().Slice(0, 0);
  }
  return result;
}

absl::Status Model::Attention(int layer, int num_tokens) {
  return config_.attention == AttentionKind::kMla ? MlaAttention(layer, num_tokens)
                                                  : GqaAttention(layer, num_tokens);
}

absl::Status Model::GqaAttention(int layer, int t) {
  const ModelConfig& c = config_;
  const AttentionWeights& a = weights_->layer(layer).attn;
  Scratch& sc = *scratch_;
  const int64_t heads = c.num_heads, kv_heads = c.num_kv_heads, d = c.QkHeadDim(),
                dv = c.VHeadDim();
  const TensorView x = sc.normed.view().Slice(0, t);   // [T, hidden]
  const TensorView q = sc.q.view().Slice(0, t);        // [T, H*D]
  const TensorView k = sc.k.view().Slice(0, t);        // [T, KV*D]
  const TensorView v = sc.v.view().Slice(0, t);        // [T, KV*Dv]
  const TensorView attn = sc.attn.view().Slice(0, t);  // [T, H*Dv]
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = a.q_proj, .bias = a.q_bias, .out = q}));
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = a.k_proj, .bias = a.k_bias, .out = k}));
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = a.v_proj, .bias = a.v_bias, .out = v}));
  if (c.qk_norm == QkNormKind::kPerHead) {
    // Heads as rows: [T*H, D] and [T*KV, D].
    const TensorView qh(q.data(), DType::kF32, {t * heads, d});
    const TensorView kh(k.data(), DType::kF32, {t * kv_heads, d});
    MOE_RETURN_IF_ERROR(
        kernels::RmsNorm({.in = qh, .weight = a.q_norm, .eps = c.rms_norm_eps, .out = qh}));
    MOE_RETURN_IF_ERROR(
        kernels::RmsNorm({.in = kh, .weight = a.k_norm, .eps = c.rms_norm_eps, .out = kh}));
  } else if (c.qk_norm == QkNormKind::kWholeProjection) {
    MOE_RETURN_IF_ERROR(
        kernels::RmsNorm({.in = q, .weight = a.q_norm, .eps = c.rms_norm_eps, .out = q}));
    MOE_RETURN_IF_ERROR(
        kernels::RmsNorm({.in = k, .weight = a.k_norm, .eps = c.rms_norm_eps, .out = k}));
  }
  const TensorView q3(q.data(), DType::kF32, {t, heads, d});         // [T, H, D]
  const TensorView k3(k.data(), DType::kF32, {t, kv_heads, d});      // [T, KV, D]
  const TensorView v3(v.data(), DType::kF32, {t, kv_heads, dv});     // [T, KV, Dv]
  const TensorView positions = sc.positions.view().Slice(0, t);
  MOE_RETURN_IF_ERROR(kernels::Rope(
      {.x = q3, .positions = positions, .table = &rope_table_, .style = rope_style_}));
  MOE_RETURN_IF_ERROR(kernels::Rope(
      {.x = k3, .positions = positions, .table = &rope_table_, .style = rope_style_}));
  MOE_RETURN_IF_ERROR(kernels::WriteKvCache({.k = k3,
                                             .v = v3,
                                             .slots = sc.slots.view().Slice(0, t),
                                             .k_cache = kv_cache_->k(layer),
                                             .v_cache = kv_cache_->v(layer)}));
  const TensorView out3(attn.data(), DType::kF32, {t, heads, dv});  // [T, H, Dv]
  MOE_RETURN_IF_ERROR(kernels::PagedAttention({.q = q3,
                                               .k_cache = kv_cache_->k(layer),
                                               .v_cache = kv_cache_->v(layer),
                                               .seqs = &sc.attn_seqs,
                                               .scale = attention_scale_,
                                               .out = out3}));
  return kernels::Linear(
      {.in = attn, .weight = a.o_proj, .out = sc.attn_out.view().Slice(0, t)});
}

absl::Status Model::MlaAttention(int layer, int t) {
  const ModelConfig& c = config_;
  const AttentionWeights& a = weights_->layer(layer).attn;
  Scratch& sc = *scratch_;
  const int64_t heads = c.num_heads, dn = c.mla.qk_nope_head_dim, rope = c.mla.qk_rope_head_dim,
                dv = c.mla.v_head_dim, lat = c.mla.kv_lora_rank, qk = dn + rope,
                row = lat + rope;
  const TensorView x = sc.normed.view().Slice(0, t);  // [T, hidden]
  const TensorView positions = sc.positions.view().Slice(0, t);

  // Query: [T, H, dn + R] from x (or from the normalised q_a projection).
  TensorView q_in = x;
  TensorView q_weight = a.q_proj;
  if (c.mla.q_lora_rank > 0) {
    q_in = sc.q_a.view().Slice(0, t);  // [T, q_lora]
    q_weight = a.q_b_proj;
    MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = a.q_a_proj, .out = q_in}));
    MOE_RETURN_IF_ERROR(kernels::RmsNorm(
        {.in = q_in, .weight = a.q_a_norm, .eps = kMlaLatentNormEps, .out = q_in}));
  }
  const TensorView q = sc.q.view().Slice(0, t);  // [T, H * qk]
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = q_in, .weight = q_weight, .out = q}));

  // Compressed KV row: [latent L | k_pe R], normalised latent and rotated k_pe.
  const TensorView kv = sc.kv.view().Slice(0, t);  // [T, L + R]
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = a.kv_a_proj, .out = kv}));
  const TensorView latent = View2d(kv, 0, t, lat, row);  // [T, L], stride L + R
  MOE_RETURN_IF_ERROR(kernels::RmsNorm(
      {.in = latent, .weight = a.kv_a_norm, .eps = kMlaLatentNormEps, .out = latent}));
  MOE_RETURN_IF_ERROR(kernels::Rope({.x = View3d(kv, lat, t, 1, rope, row, rope),  // [T, 1, R]
                                     .positions = positions,
                                     .table = &rope_table_,
                                     .style = rope_style_}));
  const TensorView kv3 = View3d(kv, 0, t, 1, row, row, row);  // [T, 1, L + R]
  MOE_RETURN_IF_ERROR(kernels::WriteKvCache({.k = kv3,
                                             .slots = sc.slots.view().Slice(0, t),
                                             .k_cache = kv_cache_->k(layer)}));

  // Absorbed query q_cat [T, H, L + R]: per head W_UKᵀ_h · q_nope_h, then the rope part
  // (recomputed from q_in by the rope rows of the q weight, straight into place).
  const TensorView q_cat = sc.q_cat.view().Slice(0, t);
  for (int64_t h = 0; h < heads; ++h) {
    MOE_RETURN_IF_ERROR(kernels::Linear({.in = View2d(q, h * qk, t, dn, heads * qk),  // [T, dn]
                                         .weight = a.w_uk_t[h],                       // [L, dn]
                                         .out = View2d(q_cat, h * row, t, lat, heads * row)}));
    MOE_RETURN_IF_ERROR(
        kernels::Linear({.in = q_in,
                         .weight = a.q_pe[h],  // [R, q_in]
                         .out = View2d(q_cat, h * row + lat, t, rope, heads * row)}));
  }
  MOE_RETURN_IF_ERROR(
      kernels::Rope({.x = View3d(q_cat, lat, t, heads, rope, heads * row, row),  // [T, H, R]
                     .positions = positions,
                     .table = &rope_table_,
                     .style = rope_style_}));

  const TensorView attn_latent = sc.attn_latent.view().Slice(0, t);  // [T, H * L]
  MOE_RETURN_IF_ERROR(kernels::PagedAttention(
      {.q = TensorView(q_cat.data(), DType::kF32, {t, heads, row}),
       .k_cache = kv_cache_->k(layer),
       .v_cache = kv_cache_->v(layer),
       .seqs = &sc.attn_seqs,
       .scale = attention_scale_,
       .out = TensorView(attn_latent.data(), DType::kF32, {t, heads, lat})}));

  // Per head back from the latent space: W_UV_h · out_h → [T, H * dv].
  const TensorView attn = sc.attn.view().Slice(0, t);
  for (int64_t h = 0; h < heads; ++h) {
    MOE_RETURN_IF_ERROR(
        kernels::Linear({.in = View2d(attn_latent, h * lat, t, lat, heads * lat),  // [T, L]
                         .weight = a.w_uv[h],                                      // [dv, L]
                         .out = View2d(attn, h * dv, t, dv, heads * dv)}));
  }
  return kernels::Linear(
      {.in = attn, .weight = a.o_proj, .out = sc.attn_out.view().Slice(0, t)});
}

absl::Status Model::FeedForward(int layer, int t) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = weights_->layer(layer);
  Scratch& sc = *scratch_;
  const TensorView x = sc.normed.view().Slice(0, t);
  const TensorView out = sc.mlp_out.view().Slice(0, t);
  if (!lw.is_moe) return kernels::Mlp({.x = x, .weights = &lw.mlp, .out = out});

  const MoeWeights& m = lw.moe;
  const TensorView router_logits = sc.router_logits.view().Slice(0, t);  // [T, E]
  const TensorView topk_ids = sc.topk_ids.view().Slice(0, t);            // [T, k]
  const TensorView topk_weights = sc.topk_weights.view().Slice(0, t);    // [T, k]
  MOE_RETURN_IF_ERROR(kernels::Linear({.in = x, .weight = m.router, .out = router_logits}));
  const bool sigmoid = c.moe.scoring == RouterScoring::kSigmoid;
  MOE_RETURN_IF_ERROR(kernels::RouterTopK(
      {.logits = router_logits,
       .correction_bias = m.correction_bias,
       .scoring = sigmoid ? kernels::Scoring::kSigmoid : kernels::Scoring::kSoftmax,
       .top_k = c.moe.top_k,
       .norm_topk_prob = c.moe.norm_topk_prob,
       .n_group = c.moe.n_group,
       .topk_group = c.moe.topk_group,
       .group_score = sigmoid ? kernels::GroupScore::kTop2Sum : kernels::GroupScore::kMax,
       .routed_scaling_factor = c.moe.routed_scaling_factor,
       .topk_ids = topk_ids,
       .topk_weights = topk_weights}));
  // The routed experts may run elsewhere (a remote executor has sent its dispatches when
  // Begin returns): the shared expert is computed meanwhile into its own buffer, and added
  // once Finish has written `out`.
  MOE_RETURN_IF_ERROR(executor_->BeginRoutedExperts(layer, x, topk_ids, topk_weights, out));
  if (m.shared.gate.empty()) return executor_->FinishRoutedExperts(layer);
  const TensorView shared = sc.shared_out.view().Slice(0, t);      // [T, hidden]
  const TensorView gate_logit = sc.gate_logit.view().Slice(0, t);  // [T, 1]
  absl::Status status = kernels::Mlp({.x = x, .weights = &m.shared, .out = shared});
  if (status.ok() && !m.shared_gate.empty()) {
    status = kernels::Linear({.in = x, .weight = m.shared_gate, .out = gate_logit});
  }
  // Finish is owed after a successful Begin, even when the shared expert failed.
  absl::Status finished = executor_->FinishRoutedExperts(layer);
  MOE_RETURN_IF_ERROR(status);
  MOE_RETURN_IF_ERROR(finished);
  if (m.shared_gate.empty()) return kernels::Add({.a = out, .b = shared, .out = out});
  return kernels::SigmoidGatedAdd({.in = shared, .gate_logit = gate_logit, .out = out});
}

}  // namespace moe::model
