// Sampling of the next token for serving: per-request options (greedy, temperature, top-k,
// top-p, min-p, repetition/presence/frequency penalties, min_tokens), a per-request seed, and
// logprobs. It runs where the logits are (the attention worker), so only token ids and
// logprobs travel back to the frontend.
//
// Order of operations on one logits row (as vLLM's V1 sampler):
//   1. logprobs: log-softmax of the *raw* logits (before penalties, temperature and
//      truncation). This is what vLLM reports by default (logprobs_mode "raw_logprobs"), and
//      what OpenAI clients expect: the model's own distribution.
//   2. while fewer than min_tokens outputs exist, the `min_tokens_blocked` ids (EOS and stop
//      token ids) get -inf.
//   3. penalties: repetition over prompt + output tokens (logit > 0 ? logit / r : logit * r),
//      frequency (- f * count in output) and presence (- p if in output).
//   4. temperature < 1e-5: greedy, argmax of the penalised logits (ties to the lower id).
//      Otherwise logits / temperature → softmax → min-p (drop probs < min_p * max prob) →
//      top-k → top-p (smallest prefix of the sorted distribution whose mass reaches top_p) →
//      renormalise → draw.
// Randomness comes from a counter-based generator of our own: the uniform draw for the token
// at sequence position `pos` is Hash(seed, pos). So one request with one seed produces the
// same tokens whatever else shares its batch, after preemption and recompute, and on replay
// on another worker.
//
// Contract: ValidateSamplingOptions names the bad field (InvalidArgument). Sample never
// fails on a finite row; NaN logits are treated as -inf. If every token is masked (all -inf),
// the argmax of the raw logits is returned.
//
// Threads: a SequenceSampler belongs to one sequence and is used by one thread at a time.
// Scratch buffers are thread-local, so any number of threads may sample different
// sequences.
//
//   SequenceSampler sampler({.temperature = 0.7, .top_p = 0.9, .seed = 42, .top_logprobs = 2},
//                           prompt_ids);
//   SampleOutput s = sampler.Sample(logits_row);   // appends s.token to the sampler's outputs
//
// (generate.h's Sampler predates this one and will be switched over to it.)
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "common/status.h"

namespace moe::model {

// Field names follow proto/moe/v1/internal.proto's SamplingOptions.
struct SamplingOptions {
  double temperature = 1.0;  // < 1e-5: greedy
  double top_p = 1.0;        // (0, 1]
  int top_k = 0;             // 0 (or -1): all tokens
  double min_p = 0.0;        // [0, 1]
  double presence_penalty = 0.0;    // [-2, 2]
  double frequency_penalty = 0.0;   // [-2, 2]
  double repetition_penalty = 1.0;  // > 0; 1 = off
  uint64_t seed = 0;
  int top_logprobs = 0;  // how many most likely tokens to report per step (>= 0)
  // Outputs before which `min_tokens_blocked` ids cannot be sampled.
  int min_tokens = 0;
  std::vector<int32_t> min_tokens_blocked;
};

// InvalidArgument naming the field when a value is out of range.
absl::Status ValidateSamplingOptions(const SamplingOptions& options);

struct CandidateLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

struct SampleOutput {
  int32_t token = 0;
  float logprob = 0.0f;                       // raw log-softmax at `token`
  std::vector<CandidateLogprob> top_logprobs;  // top_logprobs best raw, descending, ties to lower id
};

// The seeded uniform draw in [0, 1) for (seed, position); exposed for tests.
double SamplingUniform(uint64_t seed, uint64_t position);

class SequenceSampler {
 public:
  // `prompt` and `outputs` (tokens already generated, for a replayed sequence) feed the
  // penalties and the position counter.
  SequenceSampler(SamplingOptions options, std::span<const int32_t> prompt,
                  std::span<const int32_t> outputs = {});

  // Picks the next token from one logits row [vocab] and appends it to the outputs.
  SampleOutput Sample(std::span<const float> logits);

  const SamplingOptions& options() const { return options_; }
  int64_t num_outputs() const { return num_outputs_; }
  // Position of the token the next Sample picks (prompt + outputs so far).
  int64_t next_position() const { return num_prompt_ + num_outputs_; }

 private:
  void Append(int32_t token);

  SamplingOptions options_;
  int64_t num_prompt_ = 0;
  int64_t num_outputs_ = 0;
  absl::flat_hash_set<int32_t> seen_;                // prompt + output tokens (repetition)
  absl::flat_hash_map<int32_t, int32_t> out_counts_;  // output token -> count
};

}  // namespace moe::model
