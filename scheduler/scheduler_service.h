// SchedulerServer: the moe.internal.v1.Scheduler gRPC service on top of Membership, plus the
// I/O the state machine asks for (ExpertControl.PreparePlacement / CommitPlacement calls to
// expert workers), metrics, grpc.health.v1 and reflection.
//
// Threads: gRPC handler threads, a ticker thread (lease expiry, timeouts; every
// tick_interval_ms) and gRPC's callback threads (answers of Prepare/Commit calls) all take
// one mutex around the Membership; network calls are started with the callback API after the
// mutex is released, so no handler ever waits on a peer while holding it. Every method of
// SchedulerServer may be called from any thread.
//
// Health: the overall service ("") serves as soon as the server listens;
// "moe.internal.v1.Scheduler" is SERVING only while the cluster is ready (ClusterStatus.ready).
//
// Metrics (on options.metrics, default the process registry):
//   moe_scheduler_ranks{role,state}   gauge: members per role and state (alive|dead|missing)
//   moe_placement_epoch               gauge: committed placement epoch
//   moe_rank_failures_total{role}     counter: ranks declared dead
//   moe_rebalances_total              counter: rebalances planned
//   moe_placement_moved_replicas_total counter: replicas loaded by planned rebalances
//
//   SchedulerServerOptions opts;
//   opts.membership = ...;                       // from the deployment config
//   opts.listen_address = "127.0.0.1:0";
//   MOE_ASSIGN_OR_RETURN(std::unique_ptr<SchedulerServer> server, SchedulerServer::Start(opts));
//   ... server->port(), server->Status() ...
//   server->Shutdown();                          // also done by the destructor
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "moe/v1/internal.pb.h"
#include "scheduler/membership.h"

namespace moe::scheduler {

struct SchedulerServerOptions {
  MembershipOptions membership;
  // host:port to listen on; port 0 = any free port (see port()).
  std::string listen_address = "127.0.0.1:0";
  // Deadline of PreparePlacement calls (loading weights) and CommitPlacement calls (the next
  // step boundary; timeouts.connect_timeout_ms + timeouts.dispatch_timeout_ms).
  int64_t prepare_timeout_ms = 120000;
  int64_t commit_timeout_ms = 7000;
  // How often lease expiry and timeouts are checked.
  int64_t tick_interval_ms = 50;
  // Where the metrics live; null = common::DefaultMetricsRegistry().
  common::MetricsRegistry* metrics = nullptr;
  // Milliseconds of a monotonic clock; null = std::chrono::steady_clock.
  std::function<int64_t()> clock;
};

class SchedulerServer {
 public:
  // Validates the options, binds, starts serving and ticking. InvalidArgument for bad
  // options, Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<SchedulerServer>> Start(SchedulerServerOptions options);

  virtual ~SchedulerServer() = default;

  // The bound port.
  virtual int port() const = 0;
  // The membership and placement snapshot (GET /v1/cluster, GetClusterStatus).
  virtual internal::v1::ClusterStatus Status() const = 0;
  // The committed placement table.
  virtual internal::v1::PlacementTable Placement() const = 0;
  // Stops serving and ticking and waits for calls in flight (bounded by their deadlines).
  // Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace moe::scheduler
