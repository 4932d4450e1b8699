#include "kernels/cpu/internal/check.h"

#include <string>

namespace moe::kernels::cpu::internal {
namespace {

std::string ShapeString(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) s += ", ";
    first = false;
    s += d == kAnyDim ? std::string("*") : std::to_string(d);
  }
  return s + "]";
}

}  // namespace

absl::Status Invalid(const char* op, const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", field, " ", what));
}

absl::Status CheckView(const char* op, const char* field, const common::TensorView& view,
                       std::initializer_list<common::DType> dtypes,
                       std::initializer_list<int64_t> dims) {
  if (view.empty()) return Invalid(op, field, "is required but empty");
  if (view.device() != common::Device::kCpu) return Invalid(op, field, "is not on the CPU");
  if (view.rank() != static_cast<int>(dims.size())) {
    return Invalid(op, field,
                   absl::StrCat("has shape ", view.DebugString(), ", expected rank ",
                                dims.size(), " ", ShapeString(dims)));
  }
  int i = 0;
  for (int64_t d : dims) {
    if (d != kAnyDim && view.dim(i) != d) {
      return Invalid(op, field,
                     absl::StrCat("has shape ", view.DebugString(), ", expected ",
                                  ShapeString(dims)));
    }
    ++i;
  }
  bool dtype_ok = false;
  for (common::DType t : dtypes) dtype_ok |= view.dtype() == t;
  if (!dtype_ok) {
    std::string names;
    for (common::DType t : dtypes) {
      absl::StrAppend(&names, names.empty() ? "" : " or ", std::string(common::DTypeName(t)));
    }
    return absl::UnimplementedError(absl::StrCat(op, ": ", field, " has dtype ",
                                                 std::string(common::DTypeName(view.dtype())),
                                                 ", expected ", names));
  }
  if (view.rank() > 0 && view.dim(-1) > 1 && view.strides().back() != 1) {
    return Invalid(op, field, "must have unit stride in its last dimension");
  }
  return absl::OkStatus();
}

absl::Status CheckOptionalView(const char* op, const char* field,
                               const common::TensorView& view,
                               std::initializer_list<common::DType> dtypes,
                               std::initializer_list<int64_t> dims) {
  if (view.empty()) return absl::OkStatus();
  return CheckView(op, field, view, dtypes, dims);
}

}  // namespace moe::kernels::cpu::internal
