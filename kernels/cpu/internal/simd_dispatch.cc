#include "kernels/cpu/internal/simd.h"

#include <cstdlib>

namespace moe::kernels::cpu::internal {

bool HasAvx512Bf16() {
  static const bool has = [] {
#if defined(__x86_64__) && defined(MOE_CPU_AVX512)
    // MOE_CPU_NO_AVX512=1 forces the portable build (to test it on this machine).
    const char* off = std::getenv("MOE_CPU_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return has;
}

#if defined(MOE_CPU_AVX512)
#define MOE_SIMD_CALL(fn, ...) \
  (HasAvx512Bf16() ? avx512::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))
#else
#define MOE_SIMD_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif

void MatmulBlock(const MatmulBlockArgs& args) { MOE_SIMD_CALL(MatmulBlock, args); }
void ConvertToBf16(const float* in, uint16_t* out, int64_t n) {
  MOE_SIMD_CALL(ConvertToBf16, in, out, n);
}
void DotRows(const float* q, const void* k, bool k_bf16, int64_t stride, int64_t rows,
             int64_t d, float* out) {
  MOE_SIMD_CALL(DotRows, q, k, k_bf16, stride, rows, d, out);
}
void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  MOE_SIMD_CALL(SiluMul, gate, up, out, n);
}
void AccumulateRows(const float* p, const void* v, bool v_bf16, int64_t stride, int64_t rows,
                    int64_t d, float acc_scale, float* acc) {
  MOE_SIMD_CALL(AccumulateRows, p, v, v_bf16, stride, rows, d, acc_scale, acc);
}

}  // namespace moe::kernels::cpu::internal
