// TensorView: a non-owning view of a strided n-d array (shape, dtype, strides, device).
//
// The view never owns memory: whoever created the buffer (a memory-mapped checkpoint, a
// Tensor, a kernel workspace) keeps it alive longer than every view of it. Tensor is the
// owning companion for host memory (64-byte aligned). Views are plain values and may be
// copied across threads; writes through them follow the owner's threading rules.
//
//   moe::common::Tensor t(DType::kF32, {4, 8});            // [rows, cols], zeroed
//   TensorView v = t.view();  v.at<float>(1, 2) = 3.f;
//   TensorView row = v.Row(1);                             // [8]
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/logging.h"

namespace moe::common {

enum class Device : uint8_t { kCpu, kCuda };

class TensorView {
 public:
  TensorView() = default;
  // Contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::vector<int64_t> shape, Device device = Device::kCpu);
  TensorView(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
             Device device = Device::kCpu);

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }  // in elements
  int64_t dim(int i) const { return shape_[i < 0 ? i + rank() : i]; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  bool is_contiguous() const;
  bool empty() const { return data_ == nullptr; }

  // The i-th slice along dimension 0, rank one less.
  TensorView Row(int64_t i) const;
  // Rows [begin, end) along dimension 0.
  TensorView Slice(int64_t begin, int64_t end) const;

  template <typename T>
  T& at(int64_t i) const { return data_as<T>()[i * strides_[0]]; }
  template <typename T>
  T& at(int64_t i, int64_t j) const { return data_as<T>()[i * strides_[0] + j * strides_[1]]; }

  // "bf16[4, 8]"
  std::string DebugString() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
};

// Owning, contiguous, zero-initialised host tensor.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape);
  Tensor(Tensor&&) = default;
  Tensor& operator=(Tensor&&) = default;

  TensorView view() const { return view_; }
  void* data() const { return view_.data(); }
  template <typename T>
  T* data_as() const { return view_.data_as<T>(); }
  const std::vector<int64_t>& shape() const { return view_.shape(); }
  int64_t numel() const { return view_.numel(); }
  DType dtype() const { return view_.dtype(); }

 private:
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, FreeDeleter> buffer_;
  TensorView view_;
};

}  // namespace moe::common
