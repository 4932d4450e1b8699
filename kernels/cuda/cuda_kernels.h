// The CUDA backend of the kernel API (kernels/kernels.h): one function per op, same Args.
//
// kernels/dispatch.cc calls these when the output tensor lives on Device::kCuda; nothing
// else should include this header (callers use moe::kernels::<Op>). This is a plain C++
// header: it is compiled by the host compiler and pulls in no CUDA header.
//
// Contract
// - Every tensor of a call is device memory of the current device, except where a field
//   says host-readable (Permute's expert_offsets may be a host view) and the host pointers
//   kernels.h names (AttentionSeq::block_table, RopeTable).
// - Activations are f32; weights f32 or bf16, accumulation in f32. Linear/ExpertFfn/Mlp
//   with more than a few rows use cuBLAS tensor cores: with bf16 weights the activations are
//   rounded to bf16 first (fp32 accumulation), so results differ from the CPU backend by
//   bf16 rounding of the input; with f32 weights the GEMM is full f32 (no TF32).
// - Work is enqueued on args.exec.stream (nullptr = the legacy default stream) and the call
//   returns without waiting, except where noted: Permute with a host expert_offsets view and
//   ExpertFfn read the per-expert counts back (a stream synchronisation); Embedding with
//   device ids checks them on the device and reads the verdict back when the stream is not
//   capturing a graph; the first Rope call per table uploads it once and caches it per
//   table (ops.cc), so warm up before capturing a graph.
// - Errors: kUnavailable when there is no usable CUDA device, kInternal with the CUDA or
//   cuBLAS error string for failed launches, InvalidArgument/Unimplemented naming the field
//   for bad or unsupported views (checked on the host before anything is launched).
//
// Threads: any thread may call; each thread gets its own cuBLAS handle per device. Calls
// on one stream are ordered; callers own cross-stream ordering.
//
//   MOE_RETURN_IF_ERROR(moe::kernels::cuda::RmsNorm({.in = x, .weight = w, .out = y}));
#pragma once

#include "common/status.h"
#include "kernels/kernels.h"

namespace moe::kernels::cuda {

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

}  // namespace moe::kernels::cuda
