// Internal to kernels/cuda: CUDA/cuBLAS error conversion and per-thread cuBLAS handles.
//
// Host-compiled only (.cc files of kernels/cuda); the .cu files stay free of Abseil and
// return cudaError_t from their launchers (launch.h), which the .cc files turn into a
// Status here. Thread-safe: handles are per thread and per device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "common/status.h"

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

}  // namespace moe::kernels::cuda::internal

#define MOE_CUDA_RETURN_IF_ERROR(expr, what) \
  MOE_RETURN_IF_ERROR(::moe::kernels::cuda::internal::CudaStatus((expr), (what)))
#define MOE_CUBLAS_RETURN_IF_ERROR(expr, what) \
  MOE_RETURN_IF_ERROR(::moe::kernels::cuda::internal::CublasStatus((expr), (what)))
