// Status plumbing shared by every layer.
//
// Anything that can fail returns absl::Status or absl::StatusOr<T>. These macros keep the
// happy path short:
//
//   absl::StatusOr<Config> Load(const std::string& path) {
//     MOE_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
//     MOE_RETURN_IF_ERROR(Validate(text));
//     ...
//   }
//
// Codes mean what gRPC means: kInvalidArgument names the bad field, kUnavailable is a dead
// peer, kResourceExhausted a full queue or cache, kUnimplemented a part that is not there yet.
// Thread-safe: everything here is stateless.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define MOE_STATUS_CONCAT_INNER_(a, b) a##b
#define MOE_STATUS_CONCAT_(a, b) MOE_STATUS_CONCAT_INNER_(a, b)

#define MOE_RETURN_IF_ERROR(expr)                          \
  do {                                                     \
    ::absl::Status moe_status_ = (expr);                   \
    if (!moe_status_.ok()) return moe_status_;             \
  } while (0)

#define MOE_ASSIGN_OR_RETURN(lhs, expr) \
  MOE_ASSIGN_OR_RETURN_IMPL_(MOE_STATUS_CONCAT_(moe_statusor_, __LINE__), lhs, expr)

#define MOE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return std::move(tmp).status();   \
  lhs = std::move(tmp).value()

namespace moe::common {

// Returns `status` with `context` prepended to its message ("loading x.yaml: <message>"),
// keeping the code. OK stays OK.
absl::Status Annotate(const absl::Status& status, std::string_view context);

// The lower-case gRPC name of a code ("invalid_argument"), used in logs and error bodies.
std::string_view StatusCodeName(absl::StatusCode code);

}  // namespace moe::common
