#include "worker/transport/inproc.h"

#include "absl/strings/str_cat.h"

namespace moe::worker {

InprocTransport::InprocTransport(const InprocTransportOptions& options)
    : calls_(options.dispatch_timeout) {}

void InprocTransport::AddEndpoint(int rank, ExpertEndpoint* endpoint) {
  absl::MutexLock lock(&mu_);
  endpoints_[rank] = endpoint;
}

void InprocTransport::RemoveEndpoint(int rank) {
  absl::MutexLock lock(&mu_);
  endpoints_.erase(rank);
}

CallId InprocTransport::Send(int rank, std::shared_ptr<const Dispatch> dispatch) {
  auto [id, state] = calls_.Start(rank);
  ExpertEndpoint* endpoint = nullptr;
  {
    absl::MutexLock lock(&mu_);
    auto it = endpoints_.find(rank);
    if (it != endpoints_.end()) endpoint = it->second;
  }
  if (endpoint == nullptr) {
    state->Complete(absl::UnavailableError(absl::StrCat("expert rank ", rank, " is not reachable (no in-process endpoint)")));
    return id;
  }
  if (absl::Status valid = dispatch == nullptr ? absl::InvalidArgumentError("null dispatch")
                                               : dispatch->Validate();
      !valid.ok()) {
    state->Complete(valid);
    return id;
  }
  endpoint->Submit(std::move(dispatch),
                   [state = state](absl::StatusOr<common::Tensor> result) {
                     state->Complete(std::move(result));
                   });
  return id;
}

absl::StatusOr<common::Tensor> InprocTransport::Wait(CallId call, absl::Time deadline) {
  return calls_.Wait(call, deadline);
}

}  // namespace moe::worker
