// The CPU backend of the kernel API (kernels/kernels.h): one function per op, same Args.
//
// kernels/dispatch.cc calls these when the output tensor lives on Device::kCpu; nothing
// else should include this header (callers use moe::kernels::<Op>). Every function
// validates its views (InvalidArgument naming the field, Unimplemented for dtypes it does
// not take), then runs on common::ThreadPool::Default(). Calls from several threads are
// safe: they serialise on the pool.
//
// Weights in bf16 stay bf16; the matmul kernels use AVX-512 BF16 (vdpbf16ps) when the CPU
// has it (chosen once at run time) and a portable scalar path otherwise, both with f32
// accumulation.
//
//   MOE_RETURN_IF_ERROR(moe::kernels::cpu::RmsNorm({.in = x, .weight = w, .out = y}));
#pragma once

#include "common/status.h"
#include "kernels/kernels.h"

namespace moe::kernels::cpu {

absl::Status Linear(const LinearArgs& args);
absl::Status Embedding(const EmbeddingArgs& args);
absl::Status RmsNorm(const RmsNormArgs& args);
absl::Status Add(const AddArgs& args);
absl::Status SiluMul(const SiluMulArgs& args);
absl::Status SigmoidGatedAdd(const SigmoidGatedAddArgs& args);
absl::Status Rope(const RopeArgs& args);
absl::Status WriteKvCache(const KvWriteArgs& args);
absl::Status PagedAttention(const AttentionArgs& args);
absl::Status RouterTopK(const RouterArgs& args);
absl::Status Permute(const PermuteArgs& args);
absl::Status Unpermute(const UnpermuteArgs& args);
absl::Status ExpertFfn(const ExpertFfnArgs& args);
absl::Status Mlp(const MlpArgs& args);

}  // namespace moe::kernels::cpu
