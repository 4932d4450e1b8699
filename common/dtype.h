// Element types and the bf16/f16 <-> f32 conversions every layer uses.
//
// bf16 is stored as the upper 16 bits of an IEEE f32; conversion to bf16 rounds to nearest
// even (NaN stays NaN). f16 is IEEE half. All functions are pure and thread-safe.
//
//   uint16_t b = moe::common::F32ToBf16(1.5f);  float f = moe::common::Bf16ToF32(b);
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace moe::common {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64, kU8, kI8 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// "f32", "bf16", ...
std::string_view DTypeName(DType dtype);
// Accepts our names and safetensors names ("F32", "BF16", "F16", "I32", "I64", "U8", "I8").
bool ParseDType(std::string_view text, DType* dtype);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  }
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t v);
uint16_t F32ToF16(float f);

}  // namespace moe::common
