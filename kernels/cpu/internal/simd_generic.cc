// Portable scalar build of simd.h (the fallback on CPUs without AVX-512 BF16).
#include <cmath>
#include <cstring>

#include "kernels/cpu/internal/simd.h"

namespace moe::kernels::cpu::internal::generic {
namespace {

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t RoundBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x40);
  }
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <typename T>
void Matmul(const MatmulBlockArgs& args) {
  const T* w = static_cast<const T*>(args.w);
  for (int64_t j = 0; j < args.n; ++j) {
    const T* wj = w + j * args.ldw;  // [n, k]
    for (int64_t i = 0; i < args.m; ++i) {
      const T* a = static_cast<const T*>(args.a_rows[i]);
      float sum = 0.0f;
      for (int64_t kk = 0; kk < args.k; ++kk) sum += Widen(a[kk]) * Widen(wj[kk]);
      if (args.row_scale != nullptr) sum *= args.row_scale[i];
      float& c = args.c_rows[i][j];
      c = args.accumulate ? c + sum : sum;
    }
  }
}

template <typename T>
void Dot(const float* q, const T* k, int64_t stride, int64_t rows, int64_t d, float* out) {
  for (int64_t j = 0; j < rows; ++j) {
    const T* kj = k + j * stride;
    float sum = 0.0f;
    for (int64_t i = 0; i < d; ++i) sum += q[i] * Widen(kj[i]);
    out[j] = sum;
  }
}

template <typename T>
void Accumulate(const float* p, const T* v, int64_t stride, int64_t rows, int64_t d,
                float acc_scale, float* acc) {
  for (int64_t i = 0; i < d; ++i) acc[i] *= acc_scale;
  for (int64_t j = 0; j < rows; ++j) {
    const T* vj = v + j * stride;
    for (int64_t i = 0; i < d; ++i) acc[i] += p[j] * Widen(vj[i]);
  }
}

}  // namespace

void MatmulBlock(const MatmulBlockArgs& args) {
  if (args.w_bf16) {
    Matmul<uint16_t>(args);
  } else {
    Matmul<float>(args);
  }
}

void ConvertToBf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = RoundBf16(in[i]);
}

void DotRows(const float* q, const void* k, bool k_bf16, int64_t stride, int64_t rows,
             int64_t d, float* out) {
  if (k_bf16) {
    Dot(q, static_cast<const uint16_t*>(k), stride, rows, d, out);
  } else {
    Dot(q, static_cast<const float*>(k), stride, rows, d, out);
  }
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void AccumulateRows(const float* p, const void* v, bool v_bf16, int64_t stride, int64_t rows,
                    int64_t d, float acc_scale, float* acc) {
  if (v_bf16) {
    Accumulate(p, static_cast<const uint16_t*>(v), stride, rows, d, acc_scale, acc);
  } else {
    Accumulate(p, static_cast<const float*>(v), stride, rows, d, acc_scale, acc);
  }
}

}  // namespace moe::kernels::cpu::internal::generic
