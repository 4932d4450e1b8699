// ClusterMonitor: the frontend's view of an expert-parallel cluster, from the scheduler's
// GetClusterStatus and GetPlacement (moe.internal.v1.Scheduler).
//
// A background thread polls the status every poll_interval, so ready() (behind /health) is
// a cached read that never blocks. The frontend is ready when the scheduler says the cluster
// is ready (every expert has a live replica under a committed placement) and every expected
// attention worker is alive. StatusJson() (GET /v1/cluster) asks the scheduler at once and
// renders ranks (role, rank, address, state, slots, serving epoch, heartbeat age), the
// placement epoch, a per-layer replica summary and the dead/missing ranks; an unreachable
// scheduler is reported in the JSON (ready false, reason naming it), not as an error.
//
// Threads: every method may be called from any thread; the destructor stops the poller.
//
//   auto monitor = ClusterMonitor::Start({.scheduler_address = "127.0.0.1:7001"});
//   http.SetBackend({..., .ready = [m = monitor.get()] { return m->ready(); },
//                    .cluster_status = [m = monitor.get()] { return m->StatusJson(); }});
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "moe/v1/internal.pb.h"
#include "nlohmann/json.hpp"

namespace moe::server {

struct ClusterMonitorOptions {
  std::string scheduler_address;
  absl::Duration poll_interval = absl::Milliseconds(250);
  absl::Duration rpc_timeout = absl::Seconds(2);
};

class ClusterMonitor {
 public:
  static std::unique_ptr<ClusterMonitor> Start(const ClusterMonitorOptions& options);
  ~ClusterMonitor();

  bool ready() const { return ready_.load(); }
  // Why not ready ("" when ready), from the last poll.
  std::string reason() const ABSL_LOCKS_EXCLUDED(mu_);
  std::string StatusJson() const;

  // The JSON of /v1/cluster for a status and a placement (exposed for tests).
  static nlohmann::json ToJson(const ::moe::internal::v1::ClusterStatus& status,
                               const ::moe::internal::v1::PlacementTable& placement);
  // Ready as the frontend means it (see above), with the reason when not.
  static bool FrontendReady(const ::moe::internal::v1::ClusterStatus& status,
                            std::string* reason);

 private:
  struct Stub;
  explicit ClusterMonitor(const ClusterMonitorOptions& options);
  void Poll();

  const ClusterMonitorOptions options_;
  std::unique_ptr<Stub> stub_;
  std::atomic<bool> ready_{false};
  mutable absl::Mutex mu_;
  std::string reason_ ABSL_GUARDED_BY(mu_) = "no answer from the scheduler yet";
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace moe::server
