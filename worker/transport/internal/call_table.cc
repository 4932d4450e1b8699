#include "worker/transport/internal/call_table.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe::worker::internal {

bool CallState::Complete(absl::StatusOr<common::Tensor> result) {
  absl::MutexLock lock(&mu_);
  if (done_) return false;
  done_ = true;
  result_.emplace(std::move(result));
  return true;
}

absl::StatusOr<common::Tensor> CallState::Await(absl::Time deadline, int rank) {
  const absl::Time until = std::min(deadline, deadline_);
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithDeadline(absl::Condition(&done_), until);
  if (!done_) {
    // Later completions are dropped.
    done_ = true;
    return absl::DeadlineExceededError(
        absl::StrCat("no combine from expert rank ", rank, " before the deadline"));
  }
  if (!result_.has_value()) {
    return absl::InternalError("call completed twice");  // Await called twice
  }
  absl::StatusOr<common::Tensor> out = std::move(*result_);
  result_.reset();
  return out;
}

std::pair<CallId, std::shared_ptr<CallState>> CallTable::Start(int rank) {
  auto state = std::make_shared<CallState>(absl::Now() + timeout_);
  absl::MutexLock lock(&mu_);
  const CallId id = next_id_++;
  calls_.emplace(id, Entry{rank, state});
  return {id, std::move(state)};
}

absl::StatusOr<common::Tensor> CallTable::Wait(CallId id, absl::Time deadline) {
  Entry entry;
  {
    absl::MutexLock lock(&mu_);
    auto it = calls_.find(id);
    if (it == calls_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("call ", id, " is unknown or already waited on"));
    }
    entry = std::move(it->second);
    calls_.erase(it);
  }
  return entry.state->Await(deadline, entry.rank);
}

}  // namespace moe::worker::internal
