// Offline generation on one Model: prefill a prompt, then decode token by token with
// host-side sampling. Used by `moe-serve generate` and by tests; the serving engine has its
// own loop over many sequences.
//
// Sampling is model/sampler.h's SequenceSampler (the same one the serving workers use), so
// `generate` and the server give the same tokens for the same seed. Temperature defaults to 0
// here (greedy); logprobs are of the raw distribution.
//
// Contract: Generate validates the prompt (non-empty, ids inside the vocabulary, prompt plus
// max_tokens within the model's positions and KV cache) and returns InvalidArgument naming
// the problem; it allocates KV blocks from its own BlockAllocator over the model's cache and
// returns them before it returns. Decoding stops at max_tokens or an end-of-sequence id
// (unless ignore_eos).
//
// Threads: Generate uses the Model exclusively while it runs (Forward is not reentrant).
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
#include "model/sampler.h"
#include "model/tokenizer.h"

namespace moe::model {

struct GenerateOptions {
  int max_tokens = 16;
  SamplingOptions sampling{.temperature = 0.0};
  bool ignore_eos = false;
  // Prefill in chunks of at most this many tokens (0 = the whole prompt in one step).
  int prefill_chunk_tokens = 0;
};

struct GeneratedToken {
  SampleOutput sample;
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

}  // namespace moe::model
