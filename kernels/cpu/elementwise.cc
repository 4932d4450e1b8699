// CPU kernels: embedding lookup, RMSNorm, elementwise ops and RoPE.
#include "kernels/cpu/cpu_kernels.h"

namespace moe::kernels::cpu {

absl::Status Embedding(const EmbeddingArgs&) { return absl::UnimplementedError("cpu Embedding"); }
absl::Status RmsNorm(const RmsNormArgs&) { return absl::UnimplementedError("cpu RmsNorm"); }
absl::Status Add(const AddArgs&) { return absl::UnimplementedError("cpu Add"); }
absl::Status SiluMul(const SiluMulArgs&) { return absl::UnimplementedError("cpu SiluMul"); }
absl::Status SigmoidGatedAdd(const SigmoidGatedAddArgs&) {
  return absl::UnimplementedError("cpu SigmoidGatedAdd");
}
absl::Status Rope(const RopeArgs&) { return absl::UnimplementedError("cpu Rope"); }

}  // namespace moe::kernels::cpu
