// Argument checks shared by the CPU kernels: every failure is an InvalidArgument (or
// Unimplemented for a dtype the op does not take) that names the op and the field.
//
//   MOE_RETURN_IF_ERROR(CheckView("RmsNorm", "weight", args.weight, {DType::kF32, DType::kBF16},
//                                 {d}));
// A dimension of kAnyDim in `dims` is not checked. Views must live on the host and have unit
// stride in their last dimension; other strides may be anything.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common/status.h"
#include "common/tensor.h"

namespace moe::kernels::cpu::internal {

inline constexpr int64_t kAnyDim = -1;

absl::Status CheckView(const char* op, const char* field, const common::TensorView& view,
                       std::initializer_list<common::DType> dtypes,
                       std::initializer_list<int64_t> dims);

// As CheckView, but an empty view is accepted (optional fields).
absl::Status CheckOptionalView(const char* op, const char* field,
                               const common::TensorView& view,
                               std::initializer_list<common::DType> dtypes,
                               std::initializer_list<int64_t> dims);

absl::Status Invalid(const char* op, const char* field, const std::string& what);

}  // namespace moe::kernels::cpu::internal
