// CPU kernels: paged KV cache writes and paged attention.
#include "kernels/cpu/cpu_kernels.h"

namespace moe::kernels::cpu {

absl::Status WriteKvCache(const KvWriteArgs&) {
  return absl::UnimplementedError("cpu WriteKvCache");
}
absl::Status PagedAttention(const AttentionArgs&) {
  return absl::UnimplementedError("cpu PagedAttention");
}

}  // namespace moe::kernels::cpu
