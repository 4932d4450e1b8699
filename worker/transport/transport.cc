#include "worker/transport/transport.h"

#include <algorithm>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moe::worker {
namespace {

constexpr char kWorkerEpochUrl[] = "type.moe-serve.dev/moe.worker.WorkerEpoch";

}  // namespace

Dispatch Dispatch::Allocate(const DispatchMeta& meta, int64_t num_rows, int64_t hidden,
                            int64_t num_choices) {
  Dispatch d;
  d.meta = meta;
  d.rows = common::Tensor(common::DType::kF32, {num_rows, hidden});
  d.slots = common::Tensor(common::DType::kI32, {num_rows, num_choices});
  d.weights = common::Tensor(common::DType::kF32, {num_rows, num_choices});
  std::fill_n(d.slots.data_as<int32_t>(), num_rows * num_choices, -1);
  return d;
}

absl::Status Dispatch::Validate() const {
  if (rows.dtype() != common::DType::kF32 || rows.shape().size() != 2) {
    return absl::InvalidArgumentError("dispatch: rows must be f32 [n, hidden]");
  }
  if (slots.dtype() != common::DType::kI32 || slots.shape().size() != 2) {
    return absl::InvalidArgumentError("dispatch: slots must be i32 [n, k]");
  }
  if (weights.dtype() != common::DType::kF32 || weights.shape().size() != 2) {
    return absl::InvalidArgumentError("dispatch: weights must be f32 [n, k]");
  }
  const int64_t n = num_rows(), k = num_choices();
  if (hidden() <= 0) return absl::InvalidArgumentError("dispatch: hidden must be > 0");
  if (k <= 0) return absl::InvalidArgumentError("dispatch: k (pairs per row) must be > 0");
  if (slots.shape()[0] != n || weights.shape()[0] != n || weights.shape()[1] != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dispatch: rows [", n, ", ", hidden(), "], slots [", slots.shape()[0], ", ", k,
        "] and weights [", weights.shape()[0], ", ", weights.shape()[1], "] disagree"));
  }
  return absl::OkStatus();
}

absl::Status StaleEpochError(uint64_t request_epoch, uint64_t worker_epoch,
                             std::string_view detail) {
  absl::Status status = absl::FailedPreconditionError(absl::StrCat(
      "placement epoch ", request_epoch, " is not served here; worker epoch ", worker_epoch,
      detail.empty() ? "" : " (", std::string(detail), detail.empty() ? "" : ")"));
  SetWorkerEpoch(status, worker_epoch);
  return status;
}

void SetWorkerEpoch(absl::Status& status, uint64_t worker_epoch) {
  status.SetPayload(kWorkerEpochUrl, absl::Cord(absl::StrCat(worker_epoch)));
}

std::optional<uint64_t> WorkerEpochFromStatus(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kWorkerEpochUrl);
  if (!payload.has_value()) return std::nullopt;
  uint64_t epoch = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &epoch)) return std::nullopt;
  return epoch;
}

}  // namespace moe::worker
