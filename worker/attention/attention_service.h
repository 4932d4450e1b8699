// AttentionServer: one attention worker rank as a process-level service. It serves the
// moe.internal.v1.AttentionWorker.Step gRPC service (driven by the frontend's engine) over a
// Model loaded without routed experts, whose routed experts run on the expert ranks through
// a RemoteExpertExecutor over the TCP data plane.
//
//   - steps: each StepRequest goes through the same AttentionStepRunner as the worker inside
//     the frontend's process (attention_step.h): new sequences' data arrive once, then only
//     chunks and freed ids. Steps are served one at a time (the Model is not reentrant).
//   - placement: the worker registers with the scheduler (role attention, its rank and Step
//     address), heartbeats every heartbeat_interval, and fetches the placement (GetPlacement)
//     and the expert ranks' data addresses (GetClusterStatus) whenever the scheduler reports
//     a newer epoch. A step that fails with a stale epoch (kFailedPrecondition) or a dead or
//     silent rank (kUnavailable, kDeadlineExceeded) refetches the placement and is computed
//     again once if the epoch changed (failover to the surviving replicas).
//   - errors: a failed step answers the gRPC status with the data plane's code (a dead expert
//     rank: UNAVAILABLE; no combine in time: DEADLINE_EXCEEDED) and a message naming this
//     rank, the step, the layer and the expert rank. No placement yet: UNAVAILABLE with the
//     scheduler's reason.
//   - metrics (options.metrics, default the process registry): moe_dispatch_combine_seconds
//     (per MoE layer, the time a step waits on dispatch and combine),
//     moe_attention_forward_seconds (per step), moe_dispatch_bytes_total.
//
// Threads: Start returns once the gRPC server listens; one membership thread runs until
// Stop. Every public method may be called from any thread. Stop (or the destructor) stops
// membership, then the gRPC server (waiting for a step in flight, bounded by its deadline).
//
//   MOE_ASSIGN_OR_RETURN(auto model, model::Model::Load(dir, {.experts = NoRoutedExperts()}));
//   MOE_ASSIGN_OR_RETURN(auto server, AttentionServer::Start({.rank = 0,
//       .listen_address = "127.0.0.1:7100", .scheduler_address = "127.0.0.1:7001"}, model.get()));
//   // ... SIGTERM ...
//   server->Stop();
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "model/model.h"
#include "worker/attention/attention_step.h"
#include "worker/attention/remote_expert_executor.h"
#include "worker/transport/tcp.h"

namespace grpc {
class Server;
}

namespace moe::worker {

struct AttentionServerOptions {
  int rank = 0;
  // host:port of the Step service; port 0 = any free port (see address()).
  std::string listen_address = "127.0.0.1:0";
  // host:port the scheduler and the frontend reach it at ("" = the listen address).
  std::string advertise_address;
  // host:port of the scheduler (required).
  std::string scheduler_address;
  std::string version;
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration rpc_timeout = absl::Seconds(2);
  // Data plane (timeouts.connect_timeout_ms, timeouts.dispatch_timeout_ms).
  absl::Duration connect_timeout = absl::Seconds(2);
  absl::Duration dispatch_timeout = absl::Seconds(5);
  common::MetricsRegistry* metrics = nullptr;
};

// The experts filter of an attention worker's Model: no routed expert at all.
inline bool NoRoutedExperts(int /*layer*/, int /*expert*/) { return false; }

class AttentionServer {
 public:
  // `model` (not owned) must outlive Stop(); its expert executor is set to the remote one.
  static absl::StatusOr<std::unique_ptr<AttentionServer>> Start(
      const AttentionServerOptions& options, model::Model* model);
  ~AttentionServer();

  // host:port the Step service listens on.
  std::string address() const;
  int port() const { return port_; }
  bool registered() const { return registered_.load(); }
  // Epoch of the placement in use (0 = none yet).
  uint64_t placement_epoch() const { return executor_->epoch(); }
  void Stop();

 private:
  class StepService;
  struct Metrics {
    common::Histogram* dispatch_combine = nullptr;
    common::Histogram* forward = nullptr;
    common::Counter* bytes = nullptr;
  };
  AttentionServer(const AttentionServerOptions& options, model::Model* model);
  absl::StatusOr<StepOutput> RunStep(const StepInput& input) ABSL_LOCKS_EXCLUDED(step_mu_);
  // Fetches the placement and the expert ranks' addresses from the scheduler and installs
  // them when newer than the one in use. Returns the epoch in use afterwards.
  absl::StatusOr<uint64_t> RefreshPlacement() ABSL_LOCKS_EXCLUDED(refresh_mu_);
  void MembershipLoop();

  // Set at construction.
  const AttentionServerOptions options_;
  model::Model* const model_;
  Metrics metrics_;
  std::unique_ptr<TcpTransport> transport_;
  std::unique_ptr<RemoteExpertExecutor> executor_;
  std::unique_ptr<StepService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::thread membership_thread_;
  std::atomic<bool> registered_{false};

  absl::Mutex step_mu_;
  AttentionStepRunner runner_ ABSL_GUARDED_BY(step_mu_);

  absl::Mutex refresh_mu_;
  std::map<int, std::string> peers_ ABSL_GUARDED_BY(refresh_mu_);  // expert rank -> data address
  std::string not_ready_reason_ ABSL_GUARDED_BY(refresh_mu_);

  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
};

}  // namespace moe::worker
