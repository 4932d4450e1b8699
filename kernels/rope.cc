// Host-side RoPE tables (kernels.h: BuildRopeTable, YarnMscale).
//
// Mirrors Hugging Face transformers' modeling_rope_utils.py (default, linear and yarn) step by
// step in f32, the precision torch computes inv_freq and cos/sin in, so that tables match the
// reference bit for bit or within an ulp. YaRN's attention factor (mscale / mscale_all_dim
// for DeepSeek) is folded into cos and sin here, as HF does with attention_scaling. The
// DeepSeek softmax-scale correction (scale *= YarnMscale(factor, mscale_all_dim)²) is not a
// property of the table: the model applies it to the attention scale.
#include <algorithm>
#include <cmath>

#include "kernels/kernels.h"

namespace moe::kernels {
namespace {

// find_correction_dim: the dimension whose wavelength makes `num_rotations` turns over
// `max_positions`.
double CorrectionDim(double num_rotations, int dim, double base, int max_positions) {
  return (dim * std::log(max_positions / (num_rotations * 2 * M_PI))) / (2 * std::log(base));
}

}  // namespace

double YarnMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

absl::StatusOr<RopeTable> BuildRopeTable(int rotary_dim, int max_positions, double theta,
                                         const RopeScalingParams& scaling) {
  if (rotary_dim <= 0 || rotary_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildRopeTable: rotary_dim must be positive and even, got ", rotary_dim));
  }
  if (max_positions <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildRopeTable: max_positions must be positive, got ", max_positions));
  }
  if (!(theta > 0)) return absl::InvalidArgumentError("BuildRopeTable: theta must be positive");
  const int half = rotary_dim / 2;
  // pos_freqs = base ** (arange(0, dim, 2).float() / dim), all f32 as in torch.
  std::vector<float> pos_freqs(half);
  for (int i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    pos_freqs[i] = std::pow(static_cast<float>(theta), exponent);
  }
  std::vector<float> inv_freq(half);
  float attention_factor = 1.0f;
  using Type = RopeScalingParams::Type;
  switch (scaling.type) {
    case Type::kNone:
      for (int i = 0; i < half; ++i) inv_freq[i] = 1.0f / pos_freqs[i];
      break;
    case Type::kLinear:
      if (!(scaling.factor > 0)) {
        return absl::InvalidArgumentError("BuildRopeTable: scaling.factor must be positive");
      }
      for (int i = 0; i < half; ++i) {
        inv_freq[i] = (1.0f / pos_freqs[i]) / static_cast<float>(scaling.factor);
      }
      break;
    case Type::kYarn: {
      if (!(scaling.factor > 0)) {
        return absl::InvalidArgumentError("BuildRopeTable: scaling.factor must be positive");
      }
      if (scaling.original_max_positions <= 0) {
        return absl::InvalidArgumentError(
            "BuildRopeTable: scaling.original_max_positions must be positive for yarn");
      }
      const double factor = scaling.factor;
      double af = scaling.attention_factor;
      if (af == 0.0) {
        // HF: `if mscale and mscale_all_dim` (both truthy) uses the DeepSeek ratio.
        af = (scaling.mscale != 0.0 && scaling.mscale_all_dim != 0.0)
                 ? YarnMscale(factor, scaling.mscale) / YarnMscale(factor, scaling.mscale_all_dim)
                 : YarnMscale(factor, 1.0);
      }
      attention_factor = static_cast<float>(af);
      const double beta_fast = scaling.beta_fast != 0.0 ? scaling.beta_fast : 32.0;
      const double beta_slow = scaling.beta_slow != 0.0 ? scaling.beta_slow : 1.0;
      double low = CorrectionDim(beta_fast, rotary_dim, theta, scaling.original_max_positions);
      double high = CorrectionDim(beta_slow, rotary_dim, theta, scaling.original_max_positions);
      if (scaling.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(rotary_dim - 1));
      if (low == high) high += 0.001;  // HF: prevent singularity
      const float low_f = static_cast<float>(low);
      const float range_f = static_cast<float>(high - low);
      for (int i = 0; i < half; ++i) {
        float ramp = std::clamp((static_cast<float>(i) - low_f) / range_f, 0.0f, 1.0f);
        float extrapolation_factor = 1.0f - ramp;
        float extrapolation = 1.0f / pos_freqs[i];
        float interpolation = 1.0f / (static_cast<float>(factor) * pos_freqs[i]);
        inv_freq[i] = interpolation * (1.0f - extrapolation_factor) +
                      extrapolation * extrapolation_factor;
      }
      break;
    }
  }
  RopeTable table;
  table.rotary_dim = rotary_dim;
  table.max_positions = max_positions;
  table.cos.resize(static_cast<size_t>(max_positions) * half);  // [max_positions, half]
  table.sin.resize(static_cast<size_t>(max_positions) * half);
  for (int p = 0; p < max_positions; ++p) {
    for (int i = 0; i < half; ++i) {
      // torch: freqs = pos.float() * inv_freq (f32); cos = freqs.cos() * attention_scaling.
      float freq = static_cast<float>(p) * inv_freq[i];
      table.cos[static_cast<size_t>(p) * half + i] =
          static_cast<float>(std::cos(static_cast<double>(freq))) * attention_factor;
      table.sin[static_cast<size_t>(p) * half + i] =
          static_cast<float>(std::sin(static_cast<double>(freq))) * attention_factor;
    }
  }
  return table;
}

}  // namespace moe::kernels
