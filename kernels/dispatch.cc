// Routes each op of kernels.h to the backend of its output tensor's device.
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"
#include "common/thread_pool.h"
#if MOE_HAVE_CUDA
#include "kernels/cuda/cuda_kernels.h"
#endif

namespace moe::kernels {
#if !MOE_HAVE_CUDA
namespace {

absl::Status NoCuda(const char* op) {
  return absl::UnimplementedError(std::string(op) +
                                  ": this build has no CUDA backend (configure with MOE_CUDA=ON)");
}

}  // namespace
#endif

#if MOE_HAVE_CUDA
#define MOE_KERNEL_DISPATCH(Op, OpArgs, device_view)                             \
  absl::Status Op(const OpArgs& args) {                                          \
    if ((device_view).device() == common::Device::kCuda) return cuda::Op(args);  \
    return cpu::Op(args);                                                        \
  }
#else
#define MOE_KERNEL_DISPATCH(Op, OpArgs, device_view)                             \
  absl::Status Op(const OpArgs& args) {                                          \
    if ((device_view).device() == common::Device::kCuda) return NoCuda(#Op);     \
    return cpu::Op(args);                                                        \
  }
#endif

MOE_KERNEL_DISPATCH(Linear, LinearArgs, args.out)
MOE_KERNEL_DISPATCH(Embedding, EmbeddingArgs, args.out)
MOE_KERNEL_DISPATCH(RmsNorm, RmsNormArgs, args.out)
MOE_KERNEL_DISPATCH(Add, AddArgs, args.out)
MOE_KERNEL_DISPATCH(SiluMul, SiluMulArgs, args.out)
MOE_KERNEL_DISPATCH(SigmoidGatedAdd, SigmoidGatedAddArgs, args.out)
MOE_KERNEL_DISPATCH(Rope, RopeArgs, args.x)
MOE_KERNEL_DISPATCH(WriteKvCache, KvWriteArgs, args.k_cache)
MOE_KERNEL_DISPATCH(PagedAttention, AttentionArgs, args.out)
MOE_KERNEL_DISPATCH(RouterTopK, RouterArgs, args.topk_weights)
MOE_KERNEL_DISPATCH(Permute, PermuteArgs, args.permuted)
MOE_KERNEL_DISPATCH(Unpermute, UnpermuteArgs, args.out)
MOE_KERNEL_DISPATCH(ExpertFfn, ExpertFfnArgs, args.out)
MOE_KERNEL_DISPATCH(Mlp, MlpArgs, args.out)

#undef MOE_KERNEL_DISPATCH

void SetCpuThreads(int num_threads) { common::ThreadPool::SetDefaultThreads(num_threads); }
int CpuThreads() { return common::ThreadPool::Default().num_threads(); }

}  // namespace moe::kernels
