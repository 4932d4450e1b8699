#include "common/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_join.h"

namespace moe::common {

TensorView::TensorView(void* data, DType dtype, std::vector<int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), shape_(std::move(shape)) {
  strides_.assign(shape_.size(), 1);
  for (int i = static_cast<int>(shape_.size()) - 2; i >= 0; --i) {
    strides_[i] = strides_[i + 1] * shape_[i + 1];
  }
}

TensorView::TensorView(void* data, DType dtype, std::vector<int64_t> shape,
                       std::vector<int64_t> strides, Device device)
    : data_(data), dtype_(dtype), device_(device), shape_(std::move(shape)),
      strides_(std::move(strides)) {
  MOE_CHECK(shape_.size() == strides_.size()) << "shape and strides differ in rank";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = rank() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

TensorView TensorView::Row(int64_t i) const {
  MOE_DCHECK(rank() >= 1 && i >= 0 && i < shape_[0]);
  char* base = static_cast<char*>(data_) + i * strides_[0] * DTypeSize(dtype_);
  return TensorView(base, dtype_, std::vector<int64_t>(shape_.begin() + 1, shape_.end()),
                    std::vector<int64_t>(strides_.begin() + 1, strides_.end()), device_);
}

TensorView TensorView::Slice(int64_t begin, int64_t end) const {
  MOE_DCHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= shape_[0]);
  char* base = static_cast<char*>(data_) + begin * strides_[0] * DTypeSize(dtype_);
  std::vector<int64_t> shape = shape_;
  shape[0] = end - begin;
  return TensorView(base, dtype_, std::move(shape), strides_, device_);
}

std::string TensorView::DebugString() const {
  return std::string(DTypeName(dtype_)) + "[" + absl::StrJoin(shape_, ", ") + "]";
}

void Tensor::FreeDeleter::operator()(void* p) const { std::free(p); }

Tensor::Tensor(DType dtype, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  size_t bytes = static_cast<size_t>(n) * DTypeSize(dtype);
  size_t padded = (bytes + 63) / 64 * 64;
  if (padded == 0) padded = 64;
  void* p = std::aligned_alloc(64, padded);
  MOE_CHECK(p != nullptr) << "out of host memory allocating " << padded << " bytes";
  std::memset(p, 0, padded);
  buffer_.reset(p);
  view_ = TensorView(p, dtype, std::move(shape));
}

}  // namespace moe::common
