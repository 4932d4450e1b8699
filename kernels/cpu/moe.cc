// CPU kernels: router top-k, permute/unpermute, grouped expert FFN and dense MLP.
#include "kernels/cpu/cpu_kernels.h"

namespace moe::kernels::cpu {

absl::Status RouterTopK(const RouterArgs&) { return absl::UnimplementedError("cpu RouterTopK"); }
absl::Status Permute(const PermuteArgs&) { return absl::UnimplementedError("cpu Permute"); }
absl::Status Unpermute(const UnpermuteArgs&) { return absl::UnimplementedError("cpu Unpermute"); }
absl::Status ExpertFfn(const ExpertFfnArgs&) { return absl::UnimplementedError("cpu ExpertFfn"); }
absl::Status Mlp(const MlpArgs&) { return absl::UnimplementedError("cpu Mlp"); }

}  // namespace moe::kernels::cpu
