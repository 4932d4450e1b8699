#include "server/request_validation.h"

#include <cctype>

#include "absl/strings/str_cat.h"
#include "model/sampler.h"

namespace moe::server {

absl::Status InvalidField(std::string_view field, std::string_view what) {
  std::string message(field);
  message += ": ";
  message += what;
  return absl::InvalidArgumentError(message);
}

std::optional<std::string> FieldOf(std::string_view message) {
  size_t colon = message.find(':');
  if (colon == std::string_view::npos || colon == 0) return std::nullopt;
  for (size_t i = 0; i < colon; ++i) {
    char c = message[i];
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.')) return std::nullopt;
  }
  return std::string(message.substr(0, colon));
}

absl::Status ValidateSampling(const EngineRequest& request) {
  const double t = request.sampling.temperature;
  if (t < 0 || t > kMaxTemperature) {
    return InvalidField("temperature", absl::StrCat("must be in [0, ", kMaxTemperature, "]"));
  }
  const int top = request.sampling.top_logprobs;
  if (top < 0 || top > kMaxTopLogprobs) {
    return InvalidField("top_logprobs",
                        absl::StrCat("must be in [0, ", kMaxTopLogprobs, "], got ", top));
  }
  for (const std::string& s : request.stop) {
    if (s.empty()) return InvalidField("stop", "stop strings must not be empty");
  }
  return model::ValidateSamplingOptions(request.sampling);
}

absl::Status ValidateTokenIds(std::string_view field, absl::Span<const int32_t> ids,
                              int32_t vocab_size) {
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size) {
      return InvalidField(field, absl::StrCat("token id ", id, " is outside the vocabulary [0, ",
                                              vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::server
