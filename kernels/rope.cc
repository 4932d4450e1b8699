// Host-side RoPE tables (kernels.h: BuildRopeTable, YarnMscale).
#include "kernels/kernels.h"

namespace moe::kernels {

double YarnMscale(double scale, double mscale) { return 1.0; }

absl::StatusOr<RopeTable> BuildRopeTable(int rotary_dim, int max_positions, double theta,
                                         const RopeScalingParams& scaling) {
  return absl::UnimplementedError("BuildRopeTable");
}

}  // namespace moe::kernels
