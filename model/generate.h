// Offline generation on one Model: prefill a prompt, then decode token by token with
// host-side sampling. Used by `moe-serve generate` and by tests; the serving engine has its
// own loop over many sequences.
//
// Sampling (Sampler) works on one f32 logits row:
//   temperature <= 0: greedy (argmax; ties go to the lower id);
//   otherwise logits / temperature, keep the top_k best (0 = all), softmax, keep the smallest
//   prefix of the sorted distribution whose mass reaches top_p, renormalise, and draw with
//   our own SplitMix64 generator seeded by `seed`: the same seed, model and prompt give the
//   same tokens on every machine and run.
// Logprobs are of the model's distribution (log-softmax of the raw logits, before
// temperature/top-k/top-p), as vLLM reports them by default: the chosen token's and the
// `logprobs` most likely tokens' (ties to the lower id).
//
// Contract: Generate validates the prompt (non-empty, ids inside the vocabulary, prompt plus
// max_tokens within the model's positions and KV cache) and returns InvalidArgument naming
// the problem; it allocates KV blocks from its own BlockAllocator over the model's cache and
// returns them before it returns. Decoding stops at max_tokens or an end-of-sequence id
// (unless ignore_eos).
//
// Threads: Generate uses the Model exclusively while it runs (Forward is not reentrant).
// Sampler is a value; one per sequence.
//
//   GenerateOptions opts{.max_tokens = 32, .sampling = {.temperature = 0.7, .seed = 1}};
//   MOE_ASSIGN_OR_RETURN(GenerateResult r, Generate(*model, tokenizer.get(), prompt_ids, opts));
//   for (const GeneratedToken& t : r.tokens) std::cout << t.text;
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/model.h"
#include "model/tokenizer.h"

namespace moe::model {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy
  double top_p = 1.0;        // (0, 1]
  int top_k = 0;             // 0: all tokens
  uint64_t seed = 0;
  int logprobs = 0;          // how many top logprobs to report per step (0 = none)
};

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;                     // log-softmax of the raw logits at id
  std::vector<TokenLogprob> top_logprobs;  // SamplingParams::logprobs best, descending
};

// Validates params: InvalidArgument naming the field (temperature < 0, top_p outside (0, 1],
// top_k < 0, logprobs < 0).
absl::Status ValidateSamplingParams(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // Picks the next token from one logits row [vocab].
  SampledToken Sample(std::span<const float> logits);

 private:
  double NextUniform();  // [0, 1)

  SamplingParams params_;
  uint64_t state_;
  std::vector<int32_t> order_;  // scratch: ids sorted by logit
  std::vector<double> probs_;   // scratch
};

struct GenerateOptions {
  int max_tokens = 16;
  SamplingParams sampling;
  bool ignore_eos = false;
  // Prefill in chunks of at most this many tokens (0 = the whole prompt in one step).
  int prefill_chunk_tokens = 0;
};

struct GeneratedToken {
  SampledToken sample;
  std::string text;  // the text this token completes (incremental decode; "" without tokenizer)
};

struct GenerateResult {
  int prompt_tokens = 0;
  std::vector<GeneratedToken> tokens;
  std::string text;                 // all generated text
  std::string finish_reason;        // "length" or "stop"
  double prefill_seconds = 0.0;     // prompt forward passes, first token included
  double decode_seconds = 0.0;      // the remaining steps
  double PrefillTokensPerSecond() const;
  double DecodeTokensPerSecond() const;  // tokens after the first / decode_seconds
};

// Runs the prompt and decodes. `tokenizer` may be null (no text, EOS from config.json).
// `on_token`, when set, is called after each token (streaming).
absl::StatusOr<GenerateResult> Generate(
    Model& model, const Tokenizer* tokenizer, std::span<const int32_t> prompt,
    const GenerateOptions& options,
    const std::function<void(const GeneratedToken&)>& on_token = nullptr);

// Log-softmax of a logits row into `out` (same size), in double precision for the sum.
void LogSoftmax(std::span<const float> logits, std::span<float> out);

}  // namespace moe::model
