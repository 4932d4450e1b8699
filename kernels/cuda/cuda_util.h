// Internal to kernels/cuda: CUDA/cuBLAS error conversion and per-thread cuBLAS handles.
//
// Host-compiled only (.cc files of kernels/cuda); the .cu files stay free of Abseil and
// return cudaError_t from their launchers (launch.h), which the .cc files turn into a
// Status here. Thread-safe: handles are per thread and per device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/status.h"
#include "common/tensor.h"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda::internal {

// OK for cudaSuccess; kUnavailable when there is no driver/device; otherwise kInternal with
// "<what>: <cuda error name>: <cuda error string>". Clears the sticky last-error state of
// recoverable errors so one failed launch does not poison the next call.
absl::Status CudaStatus(cudaError_t err, const char* what);
absl::Status CublasStatus(cublasStatus_t status, const char* what);

// kUnavailable unless a CUDA device is usable (cached after the first call).
absl::Status RequireDevice();

// The calling thread's cuBLAS handle for the current device, bound to `stream`.
absl::StatusOr<cublasHandle_t> CublasHandle(cudaStream_t stream);

// View checks at the op boundary. CheckView: `v` is a Device::kCuda view of `rank` with a
// unit innermost stride (InvalidArgument) and one of `dtypes` (Unimplemented); the message
// names "cuda <op>: <field>". CheckDims: every dim equals `dims` where that is >= 0.
absl::Status CheckView(const common::TensorView& v, const char* op, const char* field, int rank,
                       std::initializer_list<common::DType> dtypes);
absl::Status CheckDims(const common::TensorView& v, const char* op, const char* field,
                       std::initializer_list<int64_t> dims);
absl::Status FieldError(const char* op, const char* field, const std::string& what);

inline ConstMatF32 ConstMat(const common::TensorView& v) {
  return {v.data_as<const float>(), v.rank() > 1 ? v.strides()[0] : 0};
}
inline MatF32 Mat(const common::TensorView& v) {
  return {v.data_as<float>(), v.rank() > 1 ? v.strides()[0] : 0};
}
inline cudaStream_t StreamOf(void* stream) { return static_cast<cudaStream_t>(stream); }

// out[rows, n] (+)= in[rows, k] · weightᵀ with weight [n, k] f32 or bf16 (row stride any,
// innermost 1). Rows <= kSkinnyMaxRows run the exact small-M kernel; more rows run cuBLAS
// (bf16 weights: activations rounded to bf16, fp32 accumulation). gemm.cc.
absl::Status MatMul(ConstMatF32 in, int64_t rows, int64_t k, const common::TensorView& weight,
                    MatF32 out, bool accumulate, cudaStream_t stream);

// out[t] += sum_j topk_weights[t, j] * y[i] over the permuted rows i < rows with
// (row_of[i], choice_of[i]) == (t, j); deterministic (per token, in choice order). ops.cc.
absl::Status CombineRows(ConstMatF32 y, int64_t rows, const int32_t* row_of,
                         const int32_t* choice_of, const common::TensorView& topk_weights,
                         const common::TensorView& out, cudaStream_t stream);

// A stream-ordered workspace (cudaMallocAsync / cudaFreeAsync on `stream`): valid for work
// enqueued on that stream until it is destroyed; legal inside CUDA graph capture.
class StreamBuffer {
 public:
  StreamBuffer() = default;
  static absl::StatusOr<StreamBuffer> Allocate(size_t bytes, cudaStream_t stream);
  ~StreamBuffer();
  StreamBuffer(StreamBuffer&& other) noexcept;
  StreamBuffer& operator=(StreamBuffer&& other) noexcept;
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;

  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  void Release();
  void* data_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace moe::kernels::cuda::internal

#define MOE_CUDA_RETURN_IF_ERROR(expr, what) \
  MOE_RETURN_IF_ERROR(::moe::kernels::cuda::internal::CudaStatus((expr), (what)))
#define MOE_CUBLAS_RETURN_IF_ERROR(expr, what) \
  MOE_RETURN_IF_ERROR(::moe::kernels::cuda::internal::CublasStatus((expr), (what)))
