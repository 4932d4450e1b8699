// Device helpers (device.h) and the error plumbing of the CUDA backend (cuda_util.h).
#include "kernels/cuda/device.h"

#include <array>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_util.h"

namespace moe::kernels::cuda {
namespace internal {

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clears the error unless it is sticky (the context is then lost)
  std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
  switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInvalidDevice:
      return absl::UnavailableError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  std::string message = absl::StrCat(what, ": ", cublasGetStatusName(status), ": ",
                                     cublasGetStatusString(status));
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return absl::UnimplementedError(message);
  return absl::InternalError(message);
}

absl::Status RequireDevice() {
  static const absl::Status status = [] {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return absl::UnavailableError(absl::StrCat("no usable CUDA device: ",
                                                 cudaGetErrorName(err), ": ",
                                                 cudaGetErrorString(err)));
    }
    if (count == 0) return absl::UnavailableError("no CUDA device");
    return absl::OkStatus();
  }();
  return status;
}

absl::StatusOr<cublasHandle_t> CublasHandle(cudaStream_t stream) {
  // One handle per thread and device, created on first use and deliberately never destroyed:
  // destroying handles from thread_local destructors can run after the CUDA runtime has shut
  // down at process exit. The number of threads calling kernels is small and fixed.
  constexpr int kMaxDevices = 64;
  thread_local std::array<cublasHandle_t, kMaxDevices> handles{};
  MOE_RETURN_IF_ERROR(RequireDevice());
  int device = 0;
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= kMaxDevices) {
    return absl::InternalError(absl::StrCat("device ordinal ", device, " out of range"));
  }
  cublasHandle_t& handle = handles[device];
  if (handle == nullptr) {
    MOE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle), "cublasCreate");
  }
  MOE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream), "cublasSetStream");
  return handle;
}

absl::StatusOr<StreamBuffer> StreamBuffer::Allocate(size_t bytes, cudaStream_t stream) {
  StreamBuffer buffer;
  buffer.stream_ = stream;
  if (bytes == 0) return buffer;
  MOE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&buffer.data_, bytes, stream), "cudaMallocAsync");
  return buffer;
}

StreamBuffer::~StreamBuffer() { Release(); }

StreamBuffer::StreamBuffer(StreamBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), stream_(other.stream_) {}

StreamBuffer& StreamBuffer::operator=(StreamBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    stream_ = other.stream_;
  }
  return *this;
}

void StreamBuffer::Release() {
  if (data_ != nullptr) cudaFreeAsync(data_, stream_);
  data_ = nullptr;
}

}  // namespace internal

using internal::CudaStatus;
using internal::RequireDevice;

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

bool CudaAvailable() { return RequireDevice().ok(); }

absl::Status SetDevice(int device) {
  MOE_RETURN_IF_ERROR(RequireDevice());
  return CudaStatus(cudaSetDevice(device), "cudaSetDevice");
}

absl::StatusOr<std::string> DeviceName() {
  MOE_RETURN_IF_ERROR(RequireDevice());
  int device = 0;
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop;
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                      prop.multiProcessorCount, " SMs)");
}

absl::StatusOr<void*> Malloc(size_t bytes) {
  MOE_RETURN_IF_ERROR(RequireDevice());
  void* ptr = nullptr;
  if (bytes == 0) return ptr;
  MOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr, bytes), "cudaMalloc");
  return ptr;
}

absl::Status Free(void* ptr) {
  if (ptr == nullptr) return absl::OkStatus();
  return CudaStatus(cudaFree(ptr), "cudaFree");
}

namespace {

absl::Status Copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, void* stream,
                  const char* what) {
  MOE_RETURN_IF_ERROR(RequireDevice());
  if (bytes == 0) return absl::OkStatus();
  auto s = static_cast<cudaStream_t>(stream);
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, kind, s), what);
  return CudaStatus(cudaStreamSynchronize(s), what);
}

}  // namespace

absl::Status CopyToDevice(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy(dst, src, bytes, cudaMemcpyHostToDevice, stream, "copy to device");
}
absl::Status CopyToHost(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy(dst, src, bytes, cudaMemcpyDeviceToHost, stream, "copy to host");
}
absl::Status CopyDeviceToDevice(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy(dst, src, bytes, cudaMemcpyDeviceToDevice, stream, "copy device to device");
}

absl::Status Memset(void* dst, int value, size_t bytes, void* stream) {
  MOE_RETURN_IF_ERROR(RequireDevice());
  if (bytes == 0) return absl::OkStatus();
  return CudaStatus(cudaMemsetAsync(dst, value, bytes, static_cast<cudaStream_t>(stream)),
                    "cudaMemsetAsync");
}

absl::StatusOr<void*> CreateStream() {
  MOE_RETURN_IF_ERROR(RequireDevice());
  cudaStream_t stream = nullptr;
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                           "cudaStreamCreate");
  return static_cast<void*>(stream);
}

absl::Status DestroyStream(void* stream) {
  if (stream == nullptr) return absl::OkStatus();
  return CudaStatus(cudaStreamDestroy(static_cast<cudaStream_t>(stream)), "cudaStreamDestroy");
}

absl::Status SynchronizeStream(void* stream) {
  MOE_RETURN_IF_ERROR(RequireDevice());
  return CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                    "cudaStreamSynchronize");
}

absl::Status SynchronizeDevice() {
  MOE_RETURN_IF_ERROR(RequireDevice());
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  MOE_ASSIGN_OR_RETURN(void* ptr, Malloc(bytes));
  DeviceBuffer buffer;
  buffer.data_ = ptr;
  buffer.bytes_ = bytes;
  return buffer;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

common::TensorView DeviceBuffer::View(common::DType dtype, std::vector<int64_t> shape) const {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  MOE_CHECK(static_cast<size_t>(numel) * common::DTypeSize(dtype) <= bytes_)
      << "view larger than the device buffer";
  return common::TensorView(data_, dtype, std::move(shape), common::Device::kCuda);
}

}  // namespace moe::kernels::cuda
