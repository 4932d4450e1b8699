#include "model/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

namespace moe::model {
namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

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
  MOE_RETURN_IF_ERROR(ValidateSamplingOptions(options.sampling));
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
  SequenceSampler sampler(options.sampling, prompt);
  std::unique_ptr<IncrementalDecoder> decoder;
  if (tokenizer != nullptr) decoder = std::make_unique<IncrementalDecoder>(*tokenizer, true);

  auto emit = [&](SampleOutput sample) {
    GeneratedToken t;
    t.sample = std::move(sample);
    if (decoder) t.text = decoder->Add(t.sample.token);
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
    const int32_t last = result.tokens.back().sample.token;
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
