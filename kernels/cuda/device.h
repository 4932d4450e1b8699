// CUDA device helpers for the layers above kernels/ (model loading, workers, tests):
// device discovery, device memory, host<->device copies and streams, all returning Status.
//
// This is a plain C++ header (no CUDA include), so code outside kernels/ can use a GPU
// without seeing CUDA types: streams travel as `void*` (a cudaStream_t), the same as
// kernels::Exec::stream. Built only when the CUDA backend is (MOE_CUDA_ENABLED); the
// binary starts without a driver or device, and then CudaAvailable() is false and every
// other call returns kUnavailable.
//
// Contract: copies are synchronous with respect to the host (they return when the host
// buffer may be reused or read) and ordered on `stream` with the kernels enqueued there.
// Pointers are device pointers of the current device (SetDevice). Any thread may call.
//
//   if (!moe::kernels::cuda::CudaAvailable()) return absl::UnavailableError("no GPU");
//   MOE_ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Allocate(t.nbytes()));
//   MOE_RETURN_IF_ERROR(CopyToDevice(buf.data(), t.data(), t.nbytes()));
//   TensorView dev = buf.View(DType::kF32, {rows, cols});   // Device::kCuda
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"

namespace moe::kernels::cuda {

// Number of usable CUDA devices; 0 when the driver or a device is missing.
int DeviceCount();
// DeviceCount() > 0.
bool CudaAvailable();
// Makes `device` current for the calling thread.
absl::Status SetDevice(int device);
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" for the current device.
absl::StatusOr<std::string> DeviceName();

// Device memory (cudaMalloc / cudaFree). Free(nullptr) is OK.
absl::StatusOr<void*> Malloc(size_t bytes);
absl::Status Free(void* ptr);

// Synchronous copies (with respect to the host), ordered on `stream`.
absl::Status CopyToDevice(void* dst, const void* src, size_t bytes, void* stream = nullptr);
absl::Status CopyToHost(void* dst, const void* src, size_t bytes, void* stream = nullptr);
absl::Status CopyDeviceToDevice(void* dst, const void* src, size_t bytes,
                                void* stream = nullptr);
// Asynchronous memset of device memory on `stream`.
absl::Status Memset(void* dst, int value, size_t bytes, void* stream = nullptr);

// Streams (non-blocking with respect to the legacy default stream).
absl::StatusOr<void*> CreateStream();
absl::Status DestroyStream(void* stream);
// Waits for `stream` (nullptr = the legacy default stream).
absl::Status SynchronizeStream(void* stream);
// Waits for all work on the current device.
absl::Status SynchronizeDevice();

// An owning, move-only device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  // A contiguous Device::kCuda view of the buffer; CHECKs that it fits.
  common::TensorView View(common::DType dtype, std::vector<int64_t> shape) const;

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moe::kernels::cuda
