#include "model/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

namespace moe::model {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Orders ids by logit, larger first, ties to the lower id.
struct ByLogit {
  std::span<const float> logits;
  bool operator()(int32_t a, int32_t b) const {
    if (logits[a] != logits[b]) return logits[a] > logits[b];
    return a < b;
  }
};

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

void LogSoftmax(std::span<const float> logits, std::span<float> out) {
  float max = -std::numeric_limits<float>::infinity();
  for (float x : logits) max = std::max(max, x);
  double sum = 0.0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) - max);
  const double log_z = max + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) {
    out[i] = static_cast<float>(static_cast<double>(logits[i]) - log_z);
  }
}

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0, got ", p.temperature));
  }
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  }
  if (p.logprobs < 0) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs must be >= 0, got ", p.logprobs));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), state_(params.seed) {
  SplitMix64(state_);  // decorrelate small seeds
}

double Sampler::NextUniform() {
  return static_cast<double>(SplitMix64(state_) >> 11) * 0x1.0p-53;
}

SampledToken Sampler::Sample(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  SampledToken result;
  const ByLogit by_logit{logits};

  if (params_.temperature <= 0.0) {
    int32_t best = 0;
    for (int32_t i = 1; i < vocab; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    result.id = best;
  } else {
    order_.resize(vocab);
    std::iota(order_.begin(), order_.end(), 0);
    int32_t n = vocab;
    if (params_.top_k > 0 && params_.top_k < vocab) {
      n = params_.top_k;
      std::partial_sort(order_.begin(), order_.begin() + n, order_.end(), by_logit);
    } else {
      std::sort(order_.begin(), order_.end(), by_logit);
    }
    const double inv_t = 1.0 / params_.temperature;
    const double top = logits[order_[0]];
    probs_.resize(n);
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
      probs_[i] = std::exp((static_cast<double>(logits[order_[i]]) - top) * inv_t);
      sum += probs_[i];
    }
    // Smallest prefix whose mass reaches top_p (at least one token).
    int32_t keep = n;
    if (params_.top_p < 1.0) {
      double mass = 0.0;
      for (int32_t i = 0; i < n; ++i) {
        mass += probs_[i] / sum;
        if (mass >= params_.top_p) {
          keep = i + 1;
          break;
        }
      }
    }
    double kept = 0.0;
    for (int32_t i = 0; i < keep; ++i) kept += probs_[i];
    double u = NextUniform() * kept;
    result.id = order_[keep - 1];
    for (int32_t i = 0; i < keep; ++i) {
      if (u < probs_[i]) {
        result.id = order_[i];
        break;
      }
      u -= probs_[i];
    }
  }

  // Logprobs of the raw distribution.
  float max = -std::numeric_limits<float>::infinity();
  for (float x : logits) max = std::max(max, x);
  double sum = 0.0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) - max);
  const double log_z = max + std::log(sum);
  result.logprob = static_cast<float>(logits[result.id] - log_z);
  if (params_.logprobs > 0) {
    const int32_t k = std::min(params_.logprobs, vocab);
    std::vector<int32_t> ids(vocab);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
    for (int32_t i = 0; i < k; ++i) {
      result.top_logprobs.push_back(
          {ids[i], static_cast<float>(static_cast<double>(logits[ids[i]]) - log_z)});
    }
  }
  return result;
}

double GenerateResult::PrefillTokensPerSecond() const {
  return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0.0;
}

double GenerateResult::DecodeTokensPerSecond() const {
  const double n = tokens.size() > 1 ? static_cast<double>(tokens.size() - 1) : 0.0;
  return decode_seconds > 0 ? n / decode_seconds : 0.0;
}

absl::StatusOr<GenerateResult> Generate(Model& model, const Tokenizer* tokenizer,
                                        std::span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(const GeneratedToken&)>& on_token) {
  const ModelConfig& config = model.config();
  MOE_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", options.max_tokens));
  }
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " (id ", prompt[i],
                                                     ") is outside the vocabulary [0, ",
                                                     config.vocab_size, ")"));
    }
  }
  KvCache& cache = model.kv_cache();
  const int64_t positions = static_cast<int64_t>(prompt.size()) + options.max_tokens - 1;
  const int64_t limit = std::min<int64_t>(config.max_position_embeddings, cache.capacity_tokens());
  if (positions > limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt too long: ", prompt.size(), " prompt tokens + max_tokens ", options.max_tokens,
        " need ", positions, " positions, the limit is ", limit,
        " (max_position_embeddings ", config.max_position_embeddings, ", KV cache ",
        cache.capacity_tokens(), " tokens)"));
  }

  std::set<int32_t> eos;
  if (!options.ignore_eos) {
    if (tokenizer != nullptr) eos.insert(tokenizer->eos_ids().begin(), tokenizer->eos_ids().end());
    for (int64_t id : config.eos_token_ids) eos.insert(static_cast<int32_t>(id));
  }

  BlockAllocator allocator(cache.num_blocks());
  SequenceBlocks blocks;
  MOE_RETURN_IF_ERROR(blocks.Reserve(positions, cache.block_size(), allocator));
  struct ReleaseOnExit {
    SequenceBlocks& blocks;
    BlockAllocator& allocator;
    ~ReleaseOnExit() { blocks.Release(allocator); }
  } release{blocks, allocator};

  GenerateResult result;
  result.prompt_tokens = static_cast<int>(prompt.size());
  Sampler sampler(options.sampling);
  std::unique_ptr<IncrementalDecoder> decoder;
  if (tokenizer != nullptr) decoder = std::make_unique<IncrementalDecoder>(*tokenizer, true);

  auto emit = [&](SampledToken sample) {
    GeneratedToken t;
    t.sample = std::move(sample);
    if (decoder) t.text = decoder->Add(t.sample.id);
    result.text += t.text;
    result.tokens.push_back(std::move(t));
  };

  const auto start = std::chrono::steady_clock::now();
  const int64_t chunk = options.prefill_chunk_tokens > 0 ? options.prefill_chunk_tokens
                                                         : static_cast<int64_t>(prompt.size());
  for (int64_t begin = 0; begin < static_cast<int64_t>(prompt.size()); begin += chunk) {
    const int64_t end = std::min<int64_t>(begin + chunk, prompt.size());
    ForwardBatch batch;
    batch.seqs.push_back({.tokens = prompt.subspan(begin, end - begin),
                          .start_position = static_cast<int32_t>(begin),
                          .block_table = blocks.table(),
                          .logits = end == static_cast<int64_t>(prompt.size())
                                        ? LogitsRows::kLast
                                        : LogitsRows::kNone});
    MOE_ASSIGN_OR_RETURN(ForwardOutput out, model.Forward(batch));
    if (batch.seqs[0].logits == LogitsRows::kLast) {
      emit(sampler.Sample(std::span<const float>(out.logits.Row(0).data_as<const float>(),
                                                 config.vocab_size)));
    }
  }
  const auto prefill_done = std::chrono::steady_clock::now();
  result.prefill_seconds = Seconds(start, prefill_done);
  if (on_token) on_token(result.tokens.back());

  result.finish_reason = "length";
  int32_t position = static_cast<int32_t>(prompt.size());
  while (true) {
    const int32_t last = result.tokens.back().sample.id;
    if (eos.count(last) > 0) {
      result.finish_reason = "stop";
      break;
    }
    if (static_cast<int>(result.tokens.size()) >= options.max_tokens) break;
    ForwardBatch batch;
    batch.seqs.push_back({.tokens = std::span<const int32_t>(&last, 1),
                          .start_position = position,
                          .block_table = blocks.table()});
    MOE_ASSIGN_OR_RETURN(ForwardOutput out, model.Forward(batch));
    ++position;
    emit(sampler.Sample(
        std::span<const float>(out.logits.Row(0).data_as<const float>(), config.vocab_size)));
    if (on_token) on_token(result.tokens.back());
  }
  if (decoder) {
    std::string tail = decoder->Finish();
    result.text += tail;
    result.tokens.back().text += tail;
  }
  result.decode_seconds = Seconds(prefill_done, std::chrono::steady_clock::now());
  return result;
}

}  // namespace moe::model
