// CallTable: the calls a Transport has started and not yet handed to Wait. Shared by the
// backends: a call completes once (from any thread) and is waited on once, with a deadline.
//
// Threads: every method is thread-safe. Complete on a call that Wait already gave up on is a
// no-op (the result is dropped), so late completions are harmless.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/tensor.h"
#include "worker/transport/transport.h"

namespace moe::worker::internal {

class CallState {
 public:
  explicit CallState(absl::Time deadline) : deadline_(deadline) {}
  // Stores the result if none is there yet; returns whether it did.
  bool Complete(absl::StatusOr<common::Tensor> result) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until completed or `deadline` (also bounded by the call's own deadline).
  absl::StatusOr<common::Tensor> Await(absl::Time deadline, int rank) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Time deadline() const { return deadline_; }

 private:
  const absl::Time deadline_;
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<absl::StatusOr<common::Tensor>> result_ ABSL_GUARDED_BY(mu_);
};

class CallTable {
 public:
  explicit CallTable(absl::Duration timeout) : timeout_(timeout) {}
  // Registers a new call with deadline now + timeout.
  std::pair<CallId, std::shared_ptr<CallState>> Start(int rank) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for `id` and forgets it.
  absl::StatusOr<common::Tensor> Wait(CallId id, absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Duration timeout() const { return timeout_; }

 private:
  struct Entry {
    int rank;
    std::shared_ptr<CallState> state;
  };
  const absl::Duration timeout_;
  absl::Mutex mu_;
  CallId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<CallId, Entry> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::worker::internal
