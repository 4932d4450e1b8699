// The Scheduler gRPC service on 127.0.0.1 with fake expert workers (ExpertControl servers in
// this process): registration, two-phase placement, startup timeout, lease expiry, errors.
#include "scheduler/scheduler_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <map>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moe/v1/internal.grpc.pb.h"

namespace moe::scheduler {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kVersion[] = "9.9.9";

// An expert worker's control service that records what it was asked.
class FakeExpert final : public pb::ExpertControl::Service {
 public:
  explicit FakeExpert(bool fail_prepare = false) : fail_prepare_(fail_prepare) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
  }
  ~FakeExpert() override { server_->Shutdown(std::chrono::system_clock::now()); }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  grpc::Status PreparePlacement(grpc::ServerContext*, const pb::PlacementTable* table,
                                pb::PrepareResponse* response) override {
    absl::MutexLock lock(&mu_);
    prepared_.push_back(table->epoch());
    response->set_epoch(table->epoch());
    response->set_ready(!fail_prepare_);
    if (fail_prepare_) response->set_error("not enough device memory for 4 slots");
    return grpc::Status::OK;
  }
  grpc::Status CommitPlacement(grpc::ServerContext*, const pb::CommitRequest* request,
                               pb::CommitResponse* response) override {
    absl::MutexLock lock(&mu_);
    committed_.push_back(request->epoch());
    response->set_epoch(request->epoch());
    return grpc::Status::OK;
  }
  std::vector<uint64_t> prepared() const {
    absl::MutexLock lock(&mu_);
    return prepared_;
  }
  std::vector<uint64_t> committed() const {
    absl::MutexLock lock(&mu_);
    return committed_;
  }

 private:
  const bool fail_prepare_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> prepared_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> committed_ ABSL_GUARDED_BY(mu_);
};

// Polls `done` every 10 ms for up to `limit`.
bool WaitFor(const std::function<bool()>& done,
             std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

class SchedulerServiceTest : public ::testing::Test {
 protected:
  // Starts a scheduler expecting `num_experts_ranks` expert ranks with 4 slots, one
  // attention rank, one MoE layer of 8 experts.
  void StartScheduler(int num_expert_ranks, int64_t lease_ms = 10000,
                      int64_t startup_timeout_ms = 10000) {
    SchedulerServerOptions o;
    for (int r = 0; r < num_expert_ranks; ++r) o.membership.expert_ranks.push_back({r, 4});
    o.membership.num_attention_ranks = 1;
    o.membership.model = {.moe_layers = {0}, .num_experts = 8};
    o.membership.lease_ms = lease_ms;
    o.membership.startup_timeout_ms = startup_timeout_ms;
    o.membership.version = kVersion;
    o.prepare_timeout_ms = 2000;
    o.commit_timeout_ms = 2000;
    o.tick_interval_ms = 10;
    o.metrics = &registry_;
    absl::StatusOr<std::unique_ptr<SchedulerServer>> server = SchedulerServer::Start(o);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_GT(server_->port(), 0);
    stub_ = pb::Scheduler::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials()));
  }

  grpc::Status Register(pb::Role role, int rank, const std::string& address,
                        std::string* member_id, const std::string& version = kVersion) {
    pb::RegisterRequest request;
    request.set_role(role);
    request.set_rank(rank);
    request.set_control_address(address);
    request.set_version(version);
    pb::RegisterResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status status = stub_->Register(&context, request, &response);
    if (member_id != nullptr) *member_id = response.member_id();
    return status;
  }

  grpc::Status Heartbeat(const std::string& member_id, pb::HeartbeatResponse* response) {
    pb::HeartbeatRequest request;
    request.set_member_id(member_id);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return stub_->Heartbeat(&context, request, response);
  }

  pb::ClusterStatus ClusterStatus() {
    pb::ClusterStatus status;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    EXPECT_TRUE(stub_->GetClusterStatus(&context, {}, &status).ok());
    return status;
  }

  common::MetricsRegistry registry_;
  std::unique_ptr<SchedulerServer> server_;
  std::unique_ptr<pb::Scheduler::Stub> stub_;
};

TEST_F(SchedulerServiceTest, RegistrationPreparesAndCommitsOnEveryRank) {
  StartScheduler(2);
  FakeExpert e0, e1;
  std::string id;
  ASSERT_TRUE(Register(pb::ROLE_ATTENTION, 0, "127.0.0.1:1", &id).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), &id).ok());
  EXPECT_EQ(id, "expert-0-2");
  EXPECT_FALSE(ClusterStatus().ready());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 1, e1.address(), &id).ok());
  ASSERT_TRUE(WaitFor([&] { return e0.committed().size() == 1 && e1.committed().size() == 1; }));
  EXPECT_THAT(e0.prepared(), ElementsAre(1u));
  EXPECT_THAT(e1.committed(), ElementsAre(1u));
  ASSERT_TRUE(WaitFor([&] { return ClusterStatus().ready(); }));
  pb::PlacementTable table;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetPlacement(&context, {}, &table).ok());
  EXPECT_EQ(table.epoch(), 1u);
  ASSERT_EQ(table.layers_size(), 1);
  EXPECT_EQ(table.layers(0).experts_size(), 8);
  EXPECT_EQ(server_->Placement().epoch(), 1u);
  const std::string metrics = registry_.Render();
  EXPECT_THAT(metrics, HasSubstr("moe_placement_epoch 1"));
  EXPECT_THAT(metrics, HasSubstr("moe_scheduler_ranks{role=\"expert\",state=\"alive\"} 2"));
}

TEST_F(SchedulerServiceTest, RankThatNeverRegistersIsReportedWithinTheTimeout) {
  StartScheduler(2, /*lease_ms=*/10000, /*startup_timeout_ms=*/300);
  FakeExpert e0;
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), nullptr).ok());
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(WaitFor([&] {
    return ClusterStatus().reason() == "expert ranks [1] did not register within 300 ms";
  }));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  pb::ClusterStatus status = server_->Status();
  EXPECT_FALSE(status.ready());
  EXPECT_THAT(status.missing_expert_ranks(), ElementsAre(1));
  EXPECT_TRUE(e0.prepared().empty()) << "no placement without every rank";
  EXPECT_THAT(registry_.Render(),
              HasSubstr("moe_scheduler_ranks{role=\"expert\",state=\"missing\"} 1"));
}

TEST_F(SchedulerServiceTest, SilentRankDiesAndTheOthersGetANewEpoch) {
  StartScheduler(3, /*lease_ms=*/300);
  FakeExpert e0, e1, e2;
  std::string attention, id0, id1, id2;
  ASSERT_TRUE(Register(pb::ROLE_ATTENTION, 0, "127.0.0.1:1", &attention).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), &id0).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 1, e1.address(), &id1).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 2, e2.address(), &id2).ok());
  // Everyone but rank 1 keeps beating.
  pb::HeartbeatResponse beat;
  ASSERT_TRUE(WaitFor([&] {
    for (const std::string& id : {attention, id0, id2}) {
      EXPECT_TRUE(Heartbeat(id, &beat).ok());
    }
    pb::ClusterStatus s = ClusterStatus();
    return s.dead_expert_ranks_size() == 1 && s.placement_epoch() == 2 && s.ready();
  }));
  EXPECT_THAT(ClusterStatus().dead_expert_ranks(), ElementsAre(1));
  EXPECT_THAT(e0.committed(), ElementsAre(1u, 2u));
  EXPECT_THAT(e2.committed(), ElementsAre(1u, 2u));
  EXPECT_THAT(e1.committed(), ElementsAre(1u));
  ASSERT_TRUE(Heartbeat(id1, &beat).ok());
  EXPECT_FALSE(beat.lease_valid()) << "the dead rank must register again";
  EXPECT_EQ(beat.latest_placement_epoch(), 2u);
  EXPECT_THAT(registry_.Render(), HasSubstr("moe_rank_failures_total{role=\"expert\"} 1"));
}

TEST_F(SchedulerServiceTest, FailedPrepareIsPlacedAround) {
  StartScheduler(3);
  FakeExpert e0, e1;
  FakeExpert broken(/*fail_prepare=*/true);
  ASSERT_TRUE(Register(pb::ROLE_ATTENTION, 0, "127.0.0.1:1", nullptr).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), nullptr).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 1, e1.address(), nullptr).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 2, broken.address(), nullptr).ok());
  ASSERT_TRUE(WaitFor([&] { return ClusterStatus().placement_epoch() == 2; }));
  EXPECT_THAT(e0.committed(), ElementsAre(2u));
  EXPECT_TRUE(broken.committed().empty());
  pb::ClusterStatus status = ClusterStatus();
  EXPECT_TRUE(status.ready());
  EXPECT_THAT(status.dead_expert_ranks(), ElementsAre(2));
  EXPECT_THAT(status.members(2).reason(),
              HasSubstr("prepare of epoch 1 failed: not enough device memory"));
}

TEST_F(SchedulerServiceTest, UnreachableRankFailsPrepareFast) {
  StartScheduler(3);
  FakeExpert e0, e1;
  int closed_port = 0;
  {
    FakeExpert gone;  // bound, then closed: nothing listens there any more
    closed_port = std::stoi(gone.address().substr(gone.address().rfind(':') + 1));
  }
  ASSERT_TRUE(Register(pb::ROLE_ATTENTION, 0, "127.0.0.1:1", nullptr).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), nullptr).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 1, e1.address(), nullptr).ok());
  ASSERT_TRUE(
      Register(pb::ROLE_EXPERT, 2, "127.0.0.1:" + std::to_string(closed_port), nullptr).ok());
  ASSERT_TRUE(WaitFor([&] { return ClusterStatus().placement_epoch() == 2; }));
  EXPECT_THAT(ClusterStatus().dead_expert_ranks(), ElementsAre(2));
}

TEST_F(SchedulerServiceTest, StaleUnknownAndMismatchedCallsGetClearStatuses) {
  StartScheduler(1);
  FakeExpert e0;
  std::string first, second;
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), &first).ok());
  ASSERT_TRUE(Register(pb::ROLE_EXPERT, 0, e0.address(), &second).ok());
  pb::HeartbeatResponse beat;
  grpc::Status superseded = Heartbeat(first, &beat);
  EXPECT_EQ(superseded.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(superseded.error_message(),
              HasSubstr("was replaced by a newer registration of expert rank 0"));
  grpc::Status unknown = Heartbeat("expert-0-12345", &beat);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(unknown.error_message(), HasSubstr("register first"));
  EXPECT_TRUE(Heartbeat(second, &beat).ok());
  EXPECT_TRUE(beat.lease_valid());
  grpc::Status old = Register(pb::ROLE_EXPERT, 0, e0.address(), nullptr, "0.0.1");
  EXPECT_EQ(old.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(old.error_message(), HasSubstr("version mismatch"));
  grpc::Status bad_rank = Register(pb::ROLE_EXPERT, 5, e0.address(), nullptr);
  EXPECT_EQ(bad_rank.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(SchedulerServerStartTest, BadOptionsAndBusyPort) {
  SchedulerServerOptions o;
  EXPECT_EQ(SchedulerServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
  common::MetricsRegistry registry;
  o.metrics = &registry;
  o.membership.expert_ranks = {{0, 8}};
  o.membership.model = {.moe_layers = {0}, .num_experts = 8};
  o.membership.version = kVersion;
  absl::StatusOr<std::unique_ptr<SchedulerServer>> first = SchedulerServer::Start(o);
  ASSERT_TRUE(first.ok()) << first.status();
  o.listen_address = "127.0.0.1:" + std::to_string((*first)->port());
  absl::StatusOr<std::unique_ptr<SchedulerServer>> second = SchedulerServer::Start(o);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  (*first)->Shutdown();
  (*first)->Shutdown();  // idempotent
}

}  // namespace
}  // namespace moe::scheduler
