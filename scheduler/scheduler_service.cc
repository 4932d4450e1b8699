#include "scheduler/scheduler_service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "proto/grpc_status.h"
#include "common/status.h"
#include "moe/v1/internal.grpc.pb.h"

namespace moe::scheduler {
namespace {

using ::moe::proto::FromGrpc;
using ::moe::proto::ToGrpc;

constexpr char kServiceName[] = "moe.internal.v1.Scheduler";

const char* RoleLabel(pb::Role role) {
  return role == pb::ROLE_EXPERT ? "expert" : role == pb::ROLE_ATTENTION ? "attention" : "other";
}

struct Metrics {
  common::GaugeFamily* ranks = nullptr;
  common::Gauge* epoch = nullptr;
  common::CounterFamily* failures = nullptr;
  common::Counter* rebalances = nullptr;
  common::Counter* moved = nullptr;
};

absl::StatusOr<Metrics> RegisterMetrics(common::MetricsRegistry& registry) {
  Metrics m;
  MOE_ASSIGN_OR_RETURN(m.ranks, registry.AddGauge("moe_scheduler_ranks",
                                                  "Members known to the scheduler by role and "
                                                  "state (alive, dead, missing).",
                                                  {"role", "state"}));
  MOE_ASSIGN_OR_RETURN(common::GaugeFamily * epoch,
                       registry.AddGauge("moe_placement_epoch",
                                         "Epoch of the committed expert placement."));
  m.epoch = &epoch->Get();
  MOE_ASSIGN_OR_RETURN(m.failures, registry.AddCounter("moe_rank_failures_total",
                                                       "Ranks declared dead (lease expired, "
                                                       "failed prepare or commit).",
                                                       {"role"}));
  MOE_ASSIGN_OR_RETURN(common::CounterFamily * rebalances,
                       registry.AddCounter("moe_rebalances_total",
                                           "Expert rebalances planned from load statistics."));
  m.rebalances = &rebalances->Get();
  MOE_ASSIGN_OR_RETURN(common::CounterFamily * moved,
                       registry.AddCounter("moe_placement_moved_replicas_total",
                                           "Expert replicas loaded because of rebalances."));
  m.moved = &moved->Get();
  return m;
}

class SchedulerServerImpl final : public SchedulerServer,
                                  public internal::v1::Scheduler::Service {
 public:
  SchedulerServerImpl(SchedulerServerOptions options, Metrics metrics)
      : options_(std::move(options)), metrics_(metrics), membership_(options_.membership) {}

  ~SchedulerServerImpl() override { Shutdown(); }

  absl::Status Listen() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    // A second scheduler on the same port is a deployment error, not a load balancer.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.AddListeningPort(options_.listen_address, grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("scheduler: cannot listen on ", options_.listen_address));
    }
    if (auto* health = server_->GetHealthCheckService(); health != nullptr) {
      health->SetServingStatus("", true);
      health->SetServingStatus(kServiceName, false);
    }
    {
      absl::MutexLock lock(&mu_);
      UpdateGaugesLocked();
    }
    ticker_ = std::thread([this] { TickLoop(); });
    return absl::OkStatus();
  }

  int port() const override { return port_; }

  internal::v1::ClusterStatus Status() const override {
    absl::MutexLock lock(&mu_);
    return membership_.Status(Now());
  }

  internal::v1::PlacementTable Placement() const override {
    absl::MutexLock lock(&mu_);
    return membership_.placement();
  }

  void Shutdown() override {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    if (ticker_.joinable()) ticker_.join();
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    }
    absl::MutexLock lock(&mu_);
    for (grpc::ClientContext* call : calls_) call->TryCancel();
    mu_.Await(absl::Condition(
        +[](std::set<grpc::ClientContext*>* calls) { return calls->empty(); }, &calls_));
    if (server_ != nullptr) {
      mu_.Unlock();
      server_->Wait();
      mu_.Lock();
    }
  }

  // ---- moe.internal.v1.Scheduler ----

  grpc::Status Register(grpc::ServerContext*, const pb::RegisterRequest* request,
                        pb::RegisterResponse* response) override {
    Actions actions;
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      EventResult<pb::RegisterResponse> result = membership_.Register(*request, Now());
      actions = std::move(result.actions);
      if (result.response.ok()) {
        *response = *std::move(result.response);
      } else {
        status = result.response.status();
      }
      UpdateGaugesLocked();
    }
    if (!status.ok()) {
      MOE_LOG(WARNING) << "registration refused" << common::Kv("role", RoleLabel(request->role()))
                       << common::Kv("rank", request->rank()) << ": " << status.message();
    }
    Perform(std::move(actions));
    return ToGrpc(status);
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const pb::HeartbeatRequest* request,
                         pb::HeartbeatResponse* response) override {
    Actions actions;
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      EventResult<pb::HeartbeatResponse> result = membership_.Heartbeat(*request, Now());
      actions = std::move(result.actions);
      if (result.response.ok()) {
        *response = *std::move(result.response);
      } else {
        status = result.response.status();
      }
    }
    Perform(std::move(actions));
    return ToGrpc(status);
  }

  grpc::Status GetPlacement(grpc::ServerContext*, const pb::GetPlacementRequest*,
                            pb::PlacementTable* response) override {
    absl::MutexLock lock(&mu_);
    *response = membership_.placement();
    return grpc::Status::OK;
  }

  grpc::Status GetClusterStatus(grpc::ServerContext*, const pb::GetClusterStatusRequest*,
                                pb::ClusterStatus* response) override {
    absl::MutexLock lock(&mu_);
    *response = membership_.Status(Now());
    return grpc::Status::OK;
  }

 private:
  struct PrepareCall {
    grpc::ClientContext context;
    pb::PlacementTable request;
    pb::PrepareResponse response;
  };
  struct CommitCall {
    grpc::ClientContext context;
    pb::CommitRequest request;
    pb::CommitResponse response;
  };

  int64_t Now() const {
    if (options_.clock) return options_.clock();
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  void TickLoop() {
    for (;;) {
      Actions actions;
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(&stopping_),
                             absl::Milliseconds(options_.tick_interval_ms));
        if (stopping_) return;
        actions = membership_.Tick(Now());
        if (!actions.empty()) UpdateGaugesLocked();
      }
      Perform(std::move(actions));
    }
  }

  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const pb::ClusterStatus status = membership_.Status(Now());
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const char* role : {"expert", "attention"}) {
      for (const char* state : {"alive", "dead", "missing"}) counts[{role, state}] = 0;
    }
    for (const pb::MemberStatus& m : status.members()) {
      const char* state = m.state() == pb::MEMBER_STATE_ALIVE  ? "alive"
                          : m.state() == pb::MEMBER_STATE_DEAD ? "dead"
                                                               : "missing";
      ++counts[{RoleLabel(m.role()), state}];
    }
    for (const auto& [labels, n] : counts) {
      absl::StatusOr<common::Gauge*> gauge = metrics_.ranks->WithLabels({labels.first,
                                                                         labels.second});
      if (gauge.ok()) (*gauge)->Set(n);
    }
    metrics_.epoch->Set(static_cast<double>(status.placement_epoch()));
    if (status.ready() != ready_) {
      ready_ = status.ready();
      if (auto* health = server_ ? server_->GetHealthCheckService() : nullptr; health) {
        health->SetServingStatus(kServiceName, ready_);
      }
      MOE_LOG(INFO) << (ready_ ? "cluster ready" : "cluster not ready")
                    << common::Kv("epoch", status.placement_epoch())
                    << common::Kv("reason", status.reason());
    }
  }

  internal::v1::ExpertControl::Stub* StubFor(const std::string& address) {
    absl::MutexLock lock(&stubs_mu_);
    std::unique_ptr<internal::v1::ExpertControl::Stub>& stub = stubs_[address];
    if (stub == nullptr) {
      stub = internal::v1::ExpertControl::NewStub(
          grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    }
    return stub.get();
  }

  // Registers a call so Shutdown can cancel it; false when stopping.
  bool Track(grpc::ClientContext* context) {
    absl::MutexLock lock(&mu_);
    if (stopping_) return false;
    calls_.insert(context);
    return true;
  }

  // Reports an outcome to the state machine, untracks the call, and performs what follows.
  template <typename Event>
  void Finish(grpc::ClientContext* context, Event event) {
    Actions next;
    {
      absl::MutexLock lock(&mu_);
      next = event();
      calls_.erase(context);
      UpdateGaugesLocked();
    }
    Perform(std::move(next));
  }

  void StartPrepare(const Action& action) {
    auto* call = new PrepareCall;
    call->request = *action.table;
    call->context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::milliseconds(options_.prepare_timeout_ms));
    if (!Track(&call->context)) {
      delete call;
      return;
    }
    const int32_t rank = action.rank;
    const uint64_t epoch = action.epoch;
    StubFor(action.address)
        ->async()
        ->PreparePlacement(&call->context, &call->request, &call->response,
                           [this, call, rank, epoch](grpc::Status rpc) {
                             absl::Status status = FromGrpc(rpc);
                             if (status.ok() && !call->response.ready()) {
                               status = absl::FailedPreconditionError(
                                   call->response.error().empty() ? "worker not ready"
                                                                  : call->response.error());
                             }
                             if (status.ok() && call->response.epoch() != epoch) {
                               status = absl::InternalError(absl::StrCat(
                                   "worker answered for epoch ", call->response.epoch()));
                             }
                             if (!status.ok()) {
                               MOE_LOG(WARNING) << "prepare failed" << common::Kv("rank", rank)
                                                << common::Kv("epoch", epoch) << ": "
                                                << status.message();
                             }
                             Finish(&call->context, [&] {
                               return membership_.PrepareDone(rank, epoch, status, Now());
                             });
                             delete call;
                           });
  }

  void StartCommit(const Action& action) {
    auto* call = new CommitCall;
    call->request.set_epoch(action.epoch);
    call->context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::milliseconds(options_.commit_timeout_ms));
    if (!Track(&call->context)) {
      delete call;
      return;
    }
    const int32_t rank = action.rank;
    const uint64_t epoch = action.epoch;
    StubFor(action.address)
        ->async()
        ->CommitPlacement(&call->context, &call->request, &call->response,
                          [this, call, rank, epoch](grpc::Status rpc) {
                            absl::Status status = FromGrpc(rpc);
                            if (!status.ok()) {
                              MOE_LOG(WARNING) << "commit failed" << common::Kv("rank", rank)
                                               << common::Kv("epoch", epoch) << ": "
                                               << status.message();
                            }
                            Finish(&call->context, [&] {
                              return membership_.CommitDone(rank, epoch, status, Now());
                            });
                            delete call;
                          });
  }

  // Runs without mu_: logs, counts and starts the calls the state machine asked for.
  void Perform(Actions actions) ABSL_LOCKS_EXCLUDED(mu_) {
    for (const Action& a : actions) {
      switch (a.kind) {
        case Action::Kind::kPrepare:
          MOE_LOG(INFO) << "preparing placement" << common::Kv("epoch", a.epoch)
                        << common::Kv("rank", a.rank) << common::Kv("address", a.address);
          StartPrepare(a);
          break;
        case Action::Kind::kCommit:
          StartCommit(a);
          break;
        case Action::Kind::kPlacementCommitted:
          MOE_LOG(INFO) << "placement committed" << common::Kv("epoch", a.epoch);
          break;
        case Action::Kind::kRankDead: {
          MOE_LOG(WARNING) << "rank dead" << common::Kv("role", RoleLabel(a.role))
                           << common::Kv("rank", a.rank) << common::Kv("reason", a.message);
          absl::StatusOr<common::Counter*> c = metrics_.failures->WithLabels({RoleLabel(a.role)});
          if (c.ok()) (*c)->Inc();
          break;
        }
        case Action::Kind::kRankAdmitted:
          MOE_LOG(INFO) << "rank admitted" << common::Kv("role", RoleLabel(a.role))
                        << common::Kv("rank", a.rank) << common::Kv("address", a.address)
                        << common::Kv("reason", a.message);
          break;
        case Action::Kind::kStartupTimeout:
          MOE_LOG(ERROR) << "cluster not ready: " << a.message;
          break;
        case Action::Kind::kCapacityError:
          MOE_LOG(ERROR) << "cannot place experts: " << a.message;
          break;
        case Action::Kind::kRebalance:
          MOE_LOG(INFO) << "rebalance planned" << common::Kv("epoch", a.epoch) << ": "
                        << a.message;
          metrics_.rebalances->Inc();
          metrics_.moved->Inc(static_cast<double>(a.moved_replicas));
          break;
        case Action::Kind::kEpochAbandoned:
          MOE_LOG(WARNING) << "placement epoch abandoned" << common::Kv("epoch", a.epoch) << ": "
                           << a.message;
          break;
      }
    }
  }

  // Set at construction / Listen().
  const SchedulerServerOptions options_;
  const Metrics metrics_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::thread ticker_;

  mutable absl::Mutex mu_;
  Membership membership_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  // Outgoing calls in flight.
  std::set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);

  absl::Mutex stubs_mu_;
  std::map<std::string, std::unique_ptr<internal::v1::ExpertControl::Stub>> stubs_
      ABSL_GUARDED_BY(stubs_mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<SchedulerServer>> SchedulerServer::Start(
    SchedulerServerOptions options) {
  MOE_RETURN_IF_ERROR(Membership::ValidateOptions(options.membership));
  if (options.prepare_timeout_ms <= 0 || options.commit_timeout_ms <= 0 ||
      options.tick_interval_ms <= 0) {
    return absl::InvalidArgumentError(
        "prepare_timeout_ms, commit_timeout_ms, tick_interval_ms: must be > 0");
  }
  common::MetricsRegistry& registry =
      options.metrics != nullptr ? *options.metrics : common::DefaultMetricsRegistry();
  MOE_ASSIGN_OR_RETURN(Metrics metrics, RegisterMetrics(registry));
  auto server = std::make_unique<SchedulerServerImpl>(std::move(options), metrics);
  MOE_RETURN_IF_ERROR(server->Listen());
  return server;
}

}  // namespace moe::scheduler
