#include "server/cluster_monitor.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "proto/grpc_status.h"
#include "moe/v1/internal.grpc.pb.h"

namespace moe::server {

namespace pb = ::moe::internal::v1;
using json = nlohmann::json;

namespace {

using ::moe::proto::DeadlineAfter;

const char* RoleName(pb::Role role) {
  switch (role) {
    case pb::ROLE_FRONTEND: return "frontend";
    case pb::ROLE_ATTENTION: return "attention";
    case pb::ROLE_EXPERT: return "expert";
    case pb::ROLE_SCHEDULER: return "scheduler";
    default: return "unspecified";
  }
}

const char* StateName(pb::MemberState state) {
  switch (state) {
    case pb::MEMBER_STATE_ALIVE: return "alive";
    case pb::MEMBER_STATE_DEAD: return "dead";
    case pb::MEMBER_STATE_MISSING: return "missing";
    default: return "unspecified";
  }
}

}  // namespace

struct ClusterMonitor::Stub {
  std::unique_ptr<pb::Scheduler::Stub> stub;
};

ClusterMonitor::ClusterMonitor(const ClusterMonitorOptions& options)
    : options_(options), stub_(std::make_unique<Stub>()) {
  stub_->stub = pb::Scheduler::NewStub(
      grpc::CreateChannel(options.scheduler_address, grpc::InsecureChannelCredentials()));
}

std::unique_ptr<ClusterMonitor> ClusterMonitor::Start(const ClusterMonitorOptions& options) {
  std::unique_ptr<ClusterMonitor> m(new ClusterMonitor(options));
  m->thread_ = std::thread([p = m.get()] { p->Poll(); });
  return m;
}

ClusterMonitor::~ClusterMonitor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

std::string ClusterMonitor::reason() const {
  absl::MutexLock lock(&mu_);
  return reason_;
}

bool ClusterMonitor::FrontendReady(const pb::ClusterStatus& status, std::string* reason) {
  if (!status.ready()) {
    *reason = status.reason().empty() ? "the cluster is not ready" : status.reason();
    return false;
  }
  std::vector<int32_t> down;
  for (const pb::MemberStatus& m : status.members()) {
    if (m.role() == pb::ROLE_ATTENTION && m.state() != pb::MEMBER_STATE_ALIVE) {
      down.push_back(m.rank());
    }
  }
  if (!down.empty()) {
    std::string ranks;
    for (int32_t r : down) absl::StrAppend(&ranks, ranks.empty() ? "" : ", ", r);
    *reason = absl::StrCat("attention workers [", ranks, "] are not alive");
    return false;
  }
  reason->clear();
  return true;
}

void ClusterMonitor::Poll() {
  bool was_ready = false;
  std::string last_reason;
  while (true) {
    pb::ClusterStatus status;
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(options_.rpc_timeout));
    grpc::Status s = stub_->stub->GetClusterStatus(&context, pb::GetClusterStatusRequest(), &status);
    std::string why;
    const bool ok = s.ok() && FrontendReady(status, &why);
    if (!s.ok()) {
      why = absl::StrCat("scheduler at ", options_.scheduler_address,
                         " does not answer: ", s.error_message());
    }
    ready_.store(ok);
    if (ok != was_ready || (!ok && why != last_reason)) {
      if (ok) {
        MOE_LOG(INFO) << "cluster ready" << common::Kv("epoch", status.placement_epoch());
      } else {
        MOE_LOG(WARNING) << "cluster not ready: " << why;
      }
      was_ready = ok;
      last_reason = why;
    }
    absl::MutexLock lock(&mu_);
    reason_ = why;
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    mu_.AwaitWithTimeout(absl::Condition(&stop), options_.poll_interval);
    if (stopping_) return;
  }
}

json ClusterMonitor::ToJson(const pb::ClusterStatus& status, const pb::PlacementTable& placement) {
  std::string why;
  const bool ready = FrontendReady(status, &why);
  json ranks = json::array();
  for (const pb::MemberStatus& m : status.members()) {
    ranks.push_back({{"role", RoleName(m.role())},
                     {"rank", m.rank()},
                     {"state", StateName(m.state())},
                     {"address", m.control_address()},
                     {"data_address", m.data_address()},
                     {"num_slots", m.num_slots()},
                     {"serving_epoch", m.serving_epoch()},
                     {"ms_since_heartbeat", m.ms_since_heartbeat()},
                     {"reason", m.reason()}});
  }
  // Per layer: experts, replicas, experts with more than one replica, most replicas of one.
  json layers = json::array();
  std::vector<int64_t> slots_used(static_cast<size_t>(std::max(0, placement.num_ranks())), 0);
  for (const pb::LayerPlacement& l : placement.layers()) {
    int replicas = 0, replicated = 0, most = 0;
    for (const pb::ExpertPlacement& e : l.experts()) {
      replicas += e.replicas_size();
      if (e.replicas_size() > 1) ++replicated;
      most = std::max(most, e.replicas_size());
      for (const pb::ReplicaLocation& r : e.replicas()) {
        if (r.rank() >= 0 && r.rank() < static_cast<int>(slots_used.size())) ++slots_used[r.rank()];
      }
    }
    layers.push_back({{"layer", l.layer()},
                      {"experts", l.experts_size()},
                      {"replicas", replicas},
                      {"replicated_experts", replicated},
                      {"max_replicas", most}});
  }
  // Slots in use per rank, per MoE layer (every layer is placed alike in size).
  if (placement.layers_size() > 0) {
    for (int64_t& n : slots_used) n /= placement.layers_size();
  }
  json rank_slots = json::array();
  for (int i = 0; i < placement.num_ranks(); ++i) {
    rank_slots.push_back(placement.rank_slots_size() > i ? placement.rank_slots(i)
                                                         : placement.slots_per_rank());
  }
  return {{"ready", ready},
          {"reason", why},
          {"scheduler_ready", status.ready()},
          {"placement_epoch", status.placement_epoch()},
          {"pending_epoch", status.pending_epoch()},
          {"ranks", ranks},
          {"dead_expert_ranks", json(std::vector<int32_t>(status.dead_expert_ranks().begin(),
                                                          status.dead_expert_ranks().end()))},
          {"missing_expert_ranks",
           json(std::vector<int32_t>(status.missing_expert_ranks().begin(),
                                     status.missing_expert_ranks().end()))},
          {"load_imbalance", status.load_imbalance()},
          {"rebalances", status.rebalances()},
          {"placement",
           {{"epoch", placement.epoch()},
            {"num_ranks", placement.num_ranks()},
            {"slots_per_rank", placement.slots_per_rank()},
            {"rank_slots", rank_slots},
            {"slots_used_per_rank", slots_used},
            {"layers", layers}}}};
}

std::string ClusterMonitor::StatusJson() const {
  pb::ClusterStatus status;
  grpc::Status s;
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(options_.rpc_timeout));
    s = stub_->stub->GetClusterStatus(&context, pb::GetClusterStatusRequest(), &status);
  }
  if (!s.ok()) {
    return json{{"ready", false},
                {"reason", absl::StrCat("scheduler at ", options_.scheduler_address,
                                        " does not answer: ", s.error_message())},
                {"ranks", json::array()}}
        .dump();
  }
  pb::PlacementTable placement;
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(options_.rpc_timeout));
    s = stub_->stub->GetPlacement(&context, pb::GetPlacementRequest(), &placement);
  }
  json out = ToJson(status, placement);
  out["scheduler"] = options_.scheduler_address;
  return out.dump();
}

}  // namespace moe::server
