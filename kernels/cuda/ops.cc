// CUDA backend ops (placeholder while the kernels land).
#include "kernels/cuda/cuda_kernels.h"

namespace moe::kernels::cuda {

#define MOE_CUDA_STUB(Op, OpArgs) \
  absl::Status Op(const OpArgs&) { return absl::UnimplementedError("cuda " #Op); }
MOE_CUDA_STUB(Linear, LinearArgs)
MOE_CUDA_STUB(Embedding, EmbeddingArgs)
MOE_CUDA_STUB(RmsNorm, RmsNormArgs)
MOE_CUDA_STUB(Add, AddArgs)
MOE_CUDA_STUB(SiluMul, SiluMulArgs)
MOE_CUDA_STUB(SigmoidGatedAdd, SigmoidGatedAddArgs)
MOE_CUDA_STUB(Rope, RopeArgs)
MOE_CUDA_STUB(WriteKvCache, KvWriteArgs)
MOE_CUDA_STUB(PagedAttention, AttentionArgs)
MOE_CUDA_STUB(RouterTopK, RouterArgs)
MOE_CUDA_STUB(Permute, PermuteArgs)
MOE_CUDA_STUB(Unpermute, UnpermuteArgs)
MOE_CUDA_STUB(ExpertFfn, ExpertFfnArgs)
MOE_CUDA_STUB(Mlp, MlpArgs)
#undef MOE_CUDA_STUB

}  // namespace moe::kernels::cuda
