#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace moe::model {
namespace {

constexpr double kGreedyEpsilon = 1e-5;  // vLLM's _SAMPLING_EPS
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t Mix64(uint64_t z) {  // SplitMix64 finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Ordering: higher value first, ties to the lower id.
struct ByValueDesc {
  const float* v;
  bool operator()(int32_t a, int32_t b) const {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  }
};

struct Scratch {
  std::vector<float> logprobs;
  std::vector<float> logits;
  std::vector<int32_t> order;
  std::vector<double> probs;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Raw log-softmax (double accumulation), NaN treated as -inf.
void RawLogSoftmax(std::span<const float> logits, std::vector<float>& out) {
  out.resize(logits.size());
  float max = kNegInf;
  for (float x : logits) {
    if (!std::isnan(x)) max = std::max(max, x);
  }
  if (max == kNegInf) {
    std::fill(out.begin(), out.end(), kNegInf);
    return;
  }
  double sum = 0.0;
  for (float x : logits) {
    if (!std::isnan(x)) sum += std::exp(static_cast<double>(x) - max);
  }
  const double log_z = max + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) {
    out[i] = std::isnan(logits[i]) ? kNegInf : static_cast<float>(logits[i] - log_z);
  }
}

int32_t Argmax(std::span<const float> v) {
  int32_t best = 0;
  for (int32_t i = 1; i < static_cast<int32_t>(v.size()); ++i) {
    if (v[i] > v[best] || std::isnan(v[best])) best = i;
  }
  return best;
}

}  // namespace

absl::Status ValidateSamplingOptions(const SamplingOptions& o) {
  auto bad = [](const char* field, auto value, const char* want) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must be ", want, ", got ", value));
  };
  if (!(o.temperature >= 0.0) || !std::isfinite(o.temperature)) {
    return bad("temperature", o.temperature, ">= 0");
  }
  if (!(o.top_p > 0.0 && o.top_p <= 1.0)) return bad("top_p", o.top_p, "in (0, 1]");
  if (o.top_k < -1) return bad("top_k", o.top_k, "-1, 0 (all tokens) or positive");
  if (!(o.min_p >= 0.0 && o.min_p <= 1.0)) return bad("min_p", o.min_p, "in [0, 1]");
  if (!(o.presence_penalty >= -2.0 && o.presence_penalty <= 2.0)) {
    return bad("presence_penalty", o.presence_penalty, "in [-2, 2]");
  }
  if (!(o.frequency_penalty >= -2.0 && o.frequency_penalty <= 2.0)) {
    return bad("frequency_penalty", o.frequency_penalty, "in [-2, 2]");
  }
  if (!(o.repetition_penalty > 0.0) || !std::isfinite(o.repetition_penalty)) {
    return bad("repetition_penalty", o.repetition_penalty, "> 0");
  }
  if (o.top_logprobs < 0) return bad("top_logprobs", o.top_logprobs, ">= 0");
  if (o.min_tokens < 0) return bad("min_tokens", o.min_tokens, ">= 0");
  return absl::OkStatus();
}

double SamplingUniform(uint64_t seed, uint64_t position) {
  const uint64_t bits = Mix64(Mix64(seed ^ 0x6a09e667f3bcc909ULL) + position * 0x9e3779b97f4a7c15ULL);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

SequenceSampler::SequenceSampler(SamplingOptions options, std::span<const int32_t> prompt,
                                 std::span<const int32_t> outputs)
    : options_(std::move(options)), num_prompt_(static_cast<int64_t>(prompt.size())) {
  if (options_.repetition_penalty != 1.0) seen_.insert(prompt.begin(), prompt.end());
  for (int32_t t : outputs) Append(t);
}

void SequenceSampler::Append(int32_t token) {
  ++num_outputs_;
  if (options_.repetition_penalty != 1.0) seen_.insert(token);
  if (options_.presence_penalty != 0.0 || options_.frequency_penalty != 0.0) {
    ++out_counts_[token];
  }
}

SampleOutput SequenceSampler::Sample(std::span<const float> raw) {
  Scratch& s = ThreadScratch();
  const int32_t vocab = static_cast<int32_t>(raw.size());
  SampleOutput result;

  // 1. Raw logprobs, and the top ones.
  RawLogSoftmax(raw, s.logprobs);
  const int top_n = std::min(options_.top_logprobs, vocab);
  if (top_n > 0) {
    s.order.resize(vocab);
    std::iota(s.order.begin(), s.order.end(), 0);
    std::partial_sort(s.order.begin(), s.order.begin() + top_n, s.order.end(),
                      ByValueDesc{s.logprobs.data()});
    result.top_logprobs.reserve(top_n);
    for (int i = 0; i < top_n; ++i) {
      result.top_logprobs.push_back({s.order[i], s.logprobs[s.order[i]]});
    }
  }

  // 2-3. Processed logits.
  s.logits.assign(raw.begin(), raw.end());
  for (float& x : s.logits) {
    if (std::isnan(x)) x = kNegInf;
  }
  if (num_outputs_ < options_.min_tokens) {
    for (int32_t id : options_.min_tokens_blocked) {
      if (id >= 0 && id < vocab) s.logits[id] = kNegInf;
    }
  }
  if (options_.repetition_penalty != 1.0) {
    const float r = static_cast<float>(options_.repetition_penalty);
    for (int32_t id : seen_) {
      if (id < 0 || id >= vocab) continue;
      float& x = s.logits[id];
      x = x > 0 ? x / r : x * r;
    }
  }
  for (const auto& [id, count] : out_counts_) {
    if (id < 0 || id >= vocab) continue;
    s.logits[id] -= static_cast<float>(options_.frequency_penalty * count +
                                       options_.presence_penalty);
  }

  int32_t chosen = -1;
  if (options_.temperature < kGreedyEpsilon) {
    chosen = Argmax(s.logits);
    if (s.logits[chosen] == kNegInf) chosen = Argmax(raw);
  } else {
    // 4. Softmax of logits / temperature over the finite tokens, in id order.
    const double inv_t = 1.0 / options_.temperature;
    float max = kNegInf;
    for (float x : s.logits) max = std::max(max, x);
    if (max == kNegInf) {
      chosen = Argmax(raw);
    } else {
      s.probs.assign(vocab, 0.0);
      for (int32_t i = 0; i < vocab; ++i) {
        if (s.logits[i] == kNegInf) continue;
        s.probs[i] = std::exp((static_cast<double>(s.logits[i]) - max) * inv_t);
      }
      // min-p relative to the most likely token (whose unnormalised prob is 1).
      double kept_floor = options_.min_p > 0.0 ? options_.min_p : 0.0;
      // Candidates: tokens with prob > 0 and >= min_p * max, sorted by prob desc, id asc.
      s.order.clear();
      for (int32_t i = 0; i < vocab; ++i) {
        if (s.probs[i] > 0.0 && s.probs[i] >= kept_floor) s.order.push_back(i);
      }
      auto by_prob = [&](int32_t a, int32_t b) {
        return s.probs[a] > s.probs[b] || (s.probs[a] == s.probs[b] && a < b);
      };
      size_t n = s.order.size();
      if (options_.top_k > 0 && static_cast<size_t>(options_.top_k) < n) {
        std::partial_sort(s.order.begin(), s.order.begin() + options_.top_k, s.order.end(),
                          by_prob);
        n = options_.top_k;
        s.order.resize(n);
      } else {
        std::sort(s.order.begin(), s.order.end(), by_prob);
      }
      double mass = 0.0;
      for (size_t i = 0; i < n; ++i) mass += s.probs[s.order[i]];
      if (options_.top_p < 1.0) {
        const double target = options_.top_p * mass;
        double acc = 0.0;
        size_t keep = n;
        for (size_t i = 0; i < n; ++i) {
          acc += s.probs[s.order[i]];
          if (acc >= target) {
            keep = i + 1;
            break;
          }
        }
        n = keep;
        mass = acc;
      }
      // Inverse CDF over the kept candidates, most likely first.
      const double u = SamplingUniform(options_.seed, static_cast<uint64_t>(next_position())) * mass;
      double acc = 0.0;
      chosen = s.order[n - 1];
      for (size_t i = 0; i < n; ++i) {
        acc += s.probs[s.order[i]];
        if (u < acc) {
          chosen = s.order[i];
          break;
        }
      }
    }
  }

  result.token = chosen;
  result.logprob = s.logprobs[chosen];
  Append(chosen);
  return result;
}

}  // namespace moe::model
