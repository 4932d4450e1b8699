// CPU kernels: Linear (out = in · weightᵀ + bias).
#include "kernels/cpu/cpu_kernels.h"

namespace moe::kernels::cpu {

absl::Status Linear(const LinearArgs&) { return absl::UnimplementedError("cpu Linear"); }

}  // namespace moe::kernels::cpu
