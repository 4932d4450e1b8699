// Request checks shared by the public APIs (HTTP in http_server.cc, gRPC in grpc_server.cc),
// so that both accept the same values and refuse the rest with the same messages.
//
// Contract: every error is InvalidArgument and its message starts with the field it is
// about, "top_p: must be in (0, 1], got 1.5"; FieldOf() reads the field back (the HTTP
// error's `param`). Each API maps its own wire format onto an EngineRequest, then calls
// these; Engine::Submit checks what depends on the engine (context length, n, min_tokens
// against max_tokens, the model's vocabulary) with messages of the same shape.
//
// Threads: stateless; any thread.
//
//   EngineRequest r = ...;  // parsed from the wire
//   MOE_RETURN_IF_ERROR(ValidateSampling(r));
//   MOE_RETURN_IF_ERROR(ValidateTokenIds("prompt", r.prompt, tokenizer.vocab_size()));
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/types/span.h"
#include "common/status.h"
#include "server/engine.h"

namespace moe::server {

// Largest accepted temperature (vLLM accepts any; OpenAI stops at 2).
inline constexpr double kMaxTemperature = 100.0;
// Largest number of alternatives per token (OpenAI's limit).
inline constexpr int kMaxTopLogprobs = 20;
// max_tokens of a completion that gives none (OpenAI's and vLLM's default).
inline constexpr int kDefaultMaxTokens = 16;

// InvalidArgument "field: what".
absl::Status InvalidField(std::string_view field, std::string_view what);

// The field an error message starts with ("top_p: must be ..." -> "top_p"), or nullopt
// when the message does not start with an identifier (dots allowed) and a colon.
std::optional<std::string> FieldOf(std::string_view message);

// Range checks of the sampling and stop fields of a parsed request: temperature in
// [0, kMaxTemperature], top_logprobs in [0, kMaxTopLogprobs], no empty stop string, then
// model::ValidateSamplingOptions (top_p, top_k, min_p, penalties).
absl::Status ValidateSampling(const EngineRequest& request);

// Every id in [0, vocab_size): "field: token id 7 is outside the vocabulary [0, 5)".
absl::Status ValidateTokenIds(std::string_view field, absl::Span<const int32_t> ids,
                              int32_t vocab_size);

}  // namespace moe::server
