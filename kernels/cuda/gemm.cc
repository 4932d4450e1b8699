// The GEMM ops of the CUDA backend: Linear, Mlp and the grouped expert FFN, over one MatMul
// helper (small-M kernel for decode, cuBLAS GemmEx otherwise).
//
// ExpertFfn, first version: permute rows by expert on the device, read the per-expert
// counts back (one stream synchronisation), then per present expert three GEMMs and an
// in-place SwiGLU, then a deterministic weighted combine. TODO(perf): replace the per-expert
// loop with one fused Hopper grouped-GEMM kernel (TMA loads of the expert tiles, WGMMA,
// SwiGLU in the epilogue, expert offsets read on the device so there is no sync and the step
// can be captured in a CUDA graph); see README.md.
#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda {
namespace internal {

absl::Status MatMul(ConstMatF32 in, int64_t rows, int64_t k, const common::TensorView& weight,
                    MatF32 out, bool accumulate, cudaStream_t stream) {
  const int64_t n = weight.dim(0);
  const bool bf16 = weight.dtype() == common::DType::kBF16;
  if (rows == 0 || n == 0) return absl::OkStatus();
  if (rows <= kSkinnyMaxRows) {
    SkinnyGemmParams p{.in = in,
                       .weight = weight.data(),
                       .weight_ld = weight.strides()[0],
                       .weight_bf16 = bf16,
                       .out = out,
                       .rows = rows,
                       .n = n,
                       .k = k,
                       .accumulate = accumulate};
    return CudaStatus(LaunchSkinnyGemm(p, stream), "cuda small-M GEMM");
  }
  if (rows > INT_MAX || n > INT_MAX || k > INT_MAX || in.ld > INT_MAX || out.ld > INT_MAX ||
      weight.strides()[0] > INT_MAX) {
    return absl::UnimplementedError("cuda GEMM: a dimension exceeds cuBLAS's int range");
  }
  MOE_ASSIGN_OR_RETURN(cublasHandle_t handle, CublasHandle(stream));
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  // Row-major out[rows, n] = in[rows, k] · W[n, k]ᵀ is column-major outᵀ = W · inᵀ:
  // A = W seen as column-major [k, n] (transposed), B = in seen as column-major [k, rows].
  const void* b = in.data;
  cudaDataType_t b_type = CUDA_R_32F;
  int64_t ldb = in.ld;
  StreamBuffer rounded;
  if (bf16) {
    // cuBLAS has no f32 x bf16 product: round the activations to bf16 (fp32 accumulation).
    MOE_ASSIGN_OR_RETURN(rounded, StreamBuffer::Allocate(rows * k * sizeof(uint16_t), stream));
    MOE_CUDA_RETURN_IF_ERROR(LaunchToBf16(ConstMatF32{in.data, in.ld}, rounded.as<uint16_t>(),
                                          rows, k, stream),
                             "cuda GEMM: bf16 rounding");
    b = rounded.as<void>();
    b_type = CUDA_R_16BF;
    ldb = k;
  }
  return CublasStatus(
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(rows),
                   static_cast<int>(k), &alpha, weight.data(), bf16 ? CUDA_R_16BF : CUDA_R_32F,
                   static_cast<int>(weight.strides()[0]), b, b_type, static_cast<int>(ldb), &beta,
                   out.data, CUDA_R_32F, static_cast<int>(out.ld), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

}  // namespace internal

namespace {

using common::DType;
using common::TensorView;
using namespace internal;  // NOLINT: the launchers and checks of this backend

constexpr auto kF32 = DType::kF32;
constexpr auto kBF16 = DType::kBF16;

// Checks one SwiGLU weight set for hidden size `hidden`; returns its F.
absl::StatusOr<int64_t> CheckSwiglu(const SwigluWeights& w, const char* op,
                                    const std::string& name, int64_t hidden) {
  const std::string gate = name + ".gate", up = name + ".up", down = name + ".down";
  MOE_RETURN_IF_ERROR(CheckView(w.gate, op, gate.c_str(), 2, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(w.up, op, up.c_str(), 2, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(w.down, op, down.c_str(), 2, {kF32, kBF16}));
  const int64_t f = w.gate.dim(0);
  MOE_RETURN_IF_ERROR(CheckDims(w.gate, op, gate.c_str(), {f, hidden}));
  MOE_RETURN_IF_ERROR(CheckDims(w.up, op, up.c_str(), {f, hidden}));
  MOE_RETURN_IF_ERROR(CheckDims(w.down, op, down.c_str(), {hidden, f}));
  return f;
}

// out[rows, H] (+)= down · (silu(gate · x) * (up · x)), with h a [rows, 2F] workspace.
absl::Status Swiglu(ConstMatF32 x, int64_t rows, int64_t hidden, const SwigluWeights& w,
                    int64_t f, float* h, MatF32 out, bool accumulate, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  const MatF32 gate_up{h, 2 * f};
  MOE_RETURN_IF_ERROR(MatMul(x, rows, hidden, w.gate, gate_up, false, stream));
  MOE_RETURN_IF_ERROR(MatMul(x, rows, hidden, w.up, MatF32{h + f, 2 * f}, false, stream));
  // In place: each element's silu(gate) * up overwrites its gate.
  MOE_CUDA_RETURN_IF_ERROR(
      LaunchSiluMul(ConstMatF32{h, 2 * f}, gate_up, rows, f, stream), "cuda SwiGLU");
  return MatMul(ConstMatF32{h, 2 * f}, rows, f, w.down, out, accumulate, stream);
}

}  // namespace

absl::Status Linear(const LinearArgs& args) {
  constexpr const char* kOp = "Linear";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.in, kOp, "in", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.weight, kOp, "weight", 2, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t m = args.in.dim(0), k = args.in.dim(1), n = args.weight.dim(0);
  MOE_RETURN_IF_ERROR(CheckDims(args.weight, kOp, "weight", {n, k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {m, n}));
  cudaStream_t stream = StreamOf(args.exec.stream);
  MOE_RETURN_IF_ERROR(
      MatMul(ConstMat(args.in), m, k, args.weight, Mat(args.out), args.accumulate, stream));
  if (args.bias.empty()) return absl::OkStatus();
  MOE_RETURN_IF_ERROR(CheckView(args.bias, kOp, "bias", 1, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckDims(args.bias, kOp, "bias", {n}));
  return CudaStatus(LaunchAddBias(args.bias.data(), args.bias.dtype() == kBF16, Mat(args.out),
                                  m, n, stream),
                    "cuda Linear: bias");
}

absl::Status Mlp(const MlpArgs& args) {
  constexpr const char* kOp = "Mlp";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.x, kOp, "x", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  if (args.weights == nullptr) return FieldError(kOp, "weights", "is missing");
  const int64_t tokens = args.x.dim(0), hidden = args.x.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {tokens, hidden}));
  MOE_ASSIGN_OR_RETURN(int64_t f, CheckSwiglu(*args.weights, kOp, "weights", hidden));
  if (tokens == 0) return absl::OkStatus();
  cudaStream_t stream = StreamOf(args.exec.stream);
  MOE_ASSIGN_OR_RETURN(StreamBuffer h,
                       StreamBuffer::Allocate(tokens * 2 * f * sizeof(float), stream));
  return Swiglu(ConstMat(args.x), tokens, hidden, *args.weights, f, h.as<float>(), Mat(args.out),
                args.accumulate, stream);
}

absl::Status ExpertFfn(const ExpertFfnArgs& args) {
  constexpr const char* kOp = "ExpertFfn";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.x, kOp, "x", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_ids, kOp, "topk_ids", 2, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_weights, kOp, "topk_weights", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  if (args.experts == nullptr) return FieldError(kOp, "experts", "is missing");
  const int64_t tokens = args.x.dim(0), hidden = args.x.dim(1), k = args.topk_ids.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_ids, kOp, "topk_ids", {tokens, k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_weights, kOp, "topk_weights", {tokens, k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {tokens, hidden}));
  const std::vector<SwigluWeights>& experts = *args.experts;
  const int num_experts = static_cast<int>(experts.size());
  std::vector<int64_t> ffn_dim(num_experts, 0);  // 0 = absent on this worker
  int64_t max_f = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (experts[e].gate.empty()) continue;
    MOE_ASSIGN_OR_RETURN(ffn_dim[e], CheckSwiglu(experts[e], kOp, absl::StrCat("experts[", e, "]"),
                                                 hidden));
    max_f = std::max(max_f, ffn_dim[e]);
  }
  const int64_t n = tokens * k;
  if (n == 0 || max_f == 0) return absl::OkStatus();

  cudaStream_t stream = StreamOf(args.exec.stream);
  MOE_ASSIGN_OR_RETURN(StreamBuffer index,
                       StreamBuffer::Allocate((num_experts + 1 + 2 * n) * sizeof(int32_t), stream));
  MOE_ASSIGN_OR_RETURN(StreamBuffer permuted,
                       StreamBuffer::Allocate(n * hidden * sizeof(float), stream));  // [n, H]
  MOE_ASSIGN_OR_RETURN(StreamBuffer y,
                       StreamBuffer::Allocate(n * hidden * sizeof(float), stream));  // [n, H]
  int32_t* offsets_dev = index.as<int32_t>();          // [E + 1]
  int32_t* row_of = offsets_dev + num_experts + 1;     // [n]
  int32_t* choice_of = row_of + n;                     // [n]
  PermuteIndexParams p{.topk_ids = args.topk_ids.data_as<const int32_t>(),
                       .ids_ld = args.topk_ids.strides()[0],
                       .tokens = tokens,
                       .k = k,
                       .num_experts = num_experts,
                       .expert_offsets = offsets_dev,
                       .row_of = row_of,
                       .choice_of = choice_of};
  MOE_CUDA_RETURN_IF_ERROR(LaunchPermuteIndex(p, stream), "cuda ExpertFfn: permute");
  const MatF32 permuted_mat{permuted.as<float>(), hidden};
  MOE_CUDA_RETURN_IF_ERROR(LaunchGatherRows(ConstMat(args.x), row_of, offsets_dev + num_experts,
                                            n, hidden, permuted_mat, stream),
                           "cuda ExpertFfn: gather");
  std::vector<int32_t> offsets(num_experts + 1);
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(offsets.data(), offsets_dev,
                                           offsets.size() * sizeof(int32_t),
                                           cudaMemcpyDeviceToHost, stream),
                           "cuda ExpertFfn: offsets download");
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cuda ExpertFfn");
  const int64_t rows = offsets[num_experts];
  if (rows == 0) return absl::OkStatus();

  int64_t max_rows = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (ffn_dim[e] > 0) max_rows = std::max<int64_t>(max_rows, offsets[e + 1] - offsets[e]);
  }
  MOE_ASSIGN_OR_RETURN(StreamBuffer h,
                       StreamBuffer::Allocate(max_rows * 2 * max_f * sizeof(float), stream));
  for (int e = 0; e < num_experts; ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - offsets[e];
    if (count == 0) continue;
    float* y_rows = y.as<float>() + begin * hidden;
    if (ffn_dim[e] == 0) {  // absent expert: its rows contribute nothing
      MOE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(y_rows, 0, count * hidden * sizeof(float), stream),
                               "cudaMemsetAsync");
      continue;
    }
    MOE_RETURN_IF_ERROR(Swiglu(ConstMatF32{permuted.as<float>() + begin * hidden, hidden}, count,
                               hidden, experts[e], ffn_dim[e], h.as<float>(),
                               MatF32{y_rows, hidden}, false, stream));
  }
  return CombineRows(ConstMatF32{y.as<float>(), hidden}, rows, row_of, choice_of,
                     args.topk_weights, args.out, stream);
}

}  // namespace moe::kernels::cuda
