// The hot inner loops of the CPU kernels, in two builds: AVX-512 (F/BW/VL/DQ/BF16, compiled
// with those flags in simd_avx512.cc) and portable scalar C++ (simd_generic.cc). The
// functions in this namespace pick one at run time (__builtin_cpu_supports, checked once),
// so the binary runs on CPUs without AVX-512 (MOE_CPU_NO_AVX512=1 forces the portable build). Both builds take raw pointers only and keep
// std:: templates out of the AVX-512 file, so no AVX-512 code can leak into shared inline
// functions.
//
// Matmul numerics: weights are f32 or bf16. With bf16 weights, activations are rounded to
// bf16 once (ConvertToBf16) and products are accumulated in f32 (vdpbf16ps); with f32
// weights everything is f32. Both builds compute the same products; only the summation order
// differs.
//
// Thread-safe: pure functions of their arguments.
#pragma once

#include <cstdint>

namespace moe::kernels::cpu::internal {

// C[i][j] = (accumulate ? C[i][j] : 0) + row_scale[i] · Σ_k A[i][k] · W[j][k]
// for i < m, j < n. A rows are bf16 when w_bf16, else f32. Reads each W row once per call
// when m is small (all m rows are kept in flight per weight tile).
struct MatmulBlockArgs {
  const void* const* a_rows = nullptr;  // m pointers to k activations
  int64_t m = 0;
  const void* w = nullptr;              // [n, k] at row stride ldw (elements)
  int64_t ldw = 0;
  bool w_bf16 = false;
  int64_t n = 0;
  int64_t k = 0;
  float* const* c_rows = nullptr;       // m pointers to n outputs
  const float* row_scale = nullptr;     // [m], optional (1)
  bool accumulate = false;
};

// bf16 matmuls with at most this many activation rows stream each weight row once
// (decode); more rows take the packed-panel GEMM, which repacks weights per call.
inline constexpr int64_t kStreamMaxRows = 31;

bool HasAvx512Bf16();

void MatmulBlock(const MatmulBlockArgs& args);
// out[i] = bf16(in[i]), round to nearest even.
void ConvertToBf16(const float* in, uint16_t* out, int64_t n);
// out[j] = Σ_d q[d] · K_j[d] for j < rows, K_j at k + j * stride (f32 or bf16).
void DotRows(const float* q, const void* k, bool k_bf16, int64_t stride, int64_t rows,
             int64_t d, float* out);
// out[i] = silu(gate[i]) · up[i] (out may alias gate or up).
void SiluMul(const float* gate, const float* up, float* out, int64_t n);
// acc[d] = acc[d] · acc_scale + Σ_j p[j] · V_j[d], V_j at v + j * stride (f32 or bf16).
void AccumulateRows(const float* p, const void* v, bool v_bf16, int64_t stride, int64_t rows,
                    int64_t d, float acc_scale, float* acc);

// The two builds, for the dispatcher and for tests that compare them.
#define MOE_SIMD_DECLARE_ISA(ns)                                                           \
  namespace ns {                                                                           \
  void MatmulBlock(const MatmulBlockArgs& args);                                           \
  void ConvertToBf16(const float* in, uint16_t* out, int64_t n);                           \
  void DotRows(const float* q, const void* k, bool k_bf16, int64_t stride, int64_t rows,   \
               int64_t d, float* out);                                                     \
  void AccumulateRows(const float* p, const void* v, bool v_bf16, int64_t stride,          \
                      int64_t rows, int64_t d, float acc_scale, float* acc);               \
  void SiluMul(const float* gate, const float* up, float* out, int64_t n);                 \
  }
MOE_SIMD_DECLARE_ISA(avx512)
MOE_SIMD_DECLARE_ISA(generic)
#undef MOE_SIMD_DECLARE_ISA

}  // namespace moe::kernels::cpu::internal
