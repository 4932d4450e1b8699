// InprocTransport: the data plane between threads of one process (the embedded default and
// the unit tests). Send hands the shared Dispatch itself to the rank's ExpertEndpoint (zero
// copy: no serialisation, the expert reads the sender's rows) and the endpoint's combine
// tensor is moved to the waiter.
//
// Contract: a rank with no endpoint (never added, or removed to simulate its death) fails at
// once with kUnavailable; Wait is bounded by options.dispatch_timeout. Endpoints are not
// owned and must outlive their registration (RemoveEndpoint before destroying one); a call
// whose endpoint answers after Wait gave up is dropped.
//
// Threads: every method is thread-safe. Send calls ExpertEndpoint::Submit on the caller's
// thread (Submit never blocks).
//
//   InprocTransport transport({.dispatch_timeout = absl::Seconds(5)});
//   transport.AddEndpoint(0, worker0.get());
//   CallId call = transport.Send(0, dispatch);
//   absl::StatusOr<common::Tensor> combine = transport.Wait(call);
#pragma once

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/transport/internal/call_table.h"
#include "worker/transport/transport.h"

namespace moe::worker {

struct InprocTransportOptions {
  // Longest wait for a combine (timeouts.dispatch_timeout_ms).
  absl::Duration dispatch_timeout = absl::Seconds(5);
};

class InprocTransport : public Transport {
 public:
  explicit InprocTransport(const InprocTransportOptions& options);
  ~InprocTransport() override = default;

  // Routes rank `rank` to `endpoint` (replacing any previous one).
  void AddEndpoint(int rank, ExpertEndpoint* endpoint) ABSL_LOCKS_EXCLUDED(mu_);
  // Later sends to `rank` fail with kUnavailable.
  void RemoveEndpoint(int rank) ABSL_LOCKS_EXCLUDED(mu_);

  CallId Send(int rank, std::shared_ptr<const Dispatch> dispatch) override;
  absl::StatusOr<common::Tensor> Wait(CallId call, absl::Time deadline) override;
  using Transport::Wait;

 private:
  internal::CallTable calls_;
  absl::Mutex mu_;
  absl::flat_hash_map<int, ExpertEndpoint*> endpoints_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::worker
