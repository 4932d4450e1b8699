// ExpertServer: registration and heartbeats against a fake scheduler, ExpertControl
// prepare/commit over gRPC, dispatches over the TCP data plane.
#include "worker/expert/expert_server.h"

#include <grpcpp/grpcpp.h>

#include <cstring>

#include "gtest/gtest.h"
#include "moe/v1/internal.grpc.pb.h"
#include "worker/testing/tiny_model.h"
#include "worker/transport/tcp.h"

namespace moe::worker {
namespace {

namespace pb = ::moe::internal::v1;

class FakeScheduler final : public pb::Scheduler::Service {
 public:
  grpc::Status Register(grpc::ServerContext*, const pb::RegisterRequest* request,
                        pb::RegisterResponse* response) override {
    absl::MutexLock lock(&mu);
    registers.push_back(*request);
    response->set_member_id("expert-" + std::to_string(request->rank()));
    response->set_lease_ms(3000);
    *response->mutable_placement() = placement;
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const pb::HeartbeatRequest* request,
                         pb::HeartbeatResponse* response) override {
    absl::MutexLock lock(&mu);
    heartbeats.push_back(*request);
    response->set_lease_valid(!expire_next);
    expire_next = false;
    return grpc::Status::OK;
  }
  grpc::Status GetPlacement(grpc::ServerContext*, const pb::GetPlacementRequest*,
                            pb::PlacementTable* table) override {
    absl::MutexLock lock(&mu);
    *table = placement;
    return grpc::Status::OK;
  }

  absl::Mutex mu;
  pb::PlacementTable placement ABSL_GUARDED_BY(mu);
  std::vector<pb::RegisterRequest> registers ABSL_GUARDED_BY(mu);
  std::vector<pb::HeartbeatRequest> heartbeats ABSL_GUARDED_BY(mu);
  bool expire_next ABSL_GUARDED_BY(mu) = false;
};

template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return pred();
}

TEST(ExpertServerTest, RegistersHeartbeatsAndServesThePlacementItIsGiven) {
  const std::string& dir = testing::TinyModelDir("qwen3_moe");
  auto config = model::LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  auto table = RoundRobinPlacement(*config, {.num_ranks = 2, .epoch = 1});
  ASSERT_TRUE(table.ok());

  FakeScheduler scheduler;
  {
    absl::MutexLock lock(&scheduler.mu);
    scheduler.placement = *table;
  }
  int scheduler_port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &scheduler_port);
  builder.RegisterService(&scheduler);
  std::unique_ptr<grpc::Server> scheduler_server = builder.BuildAndStart();
  ASSERT_NE(scheduler_port, 0);

  auto worker = ExpertWorker::Create({.rank = 1, .model_dir = dir});
  ASSERT_TRUE(worker.ok());
  auto server = ExpertServer::Start({.rank = 1,
                                     .scheduler_address = "127.0.0.1:" + std::to_string(scheduler_port),
                                     .num_slots = 4,
                                     .version = "test",
                                     .heartbeat_interval = absl::Milliseconds(20)},
                                    worker->get());
  ASSERT_TRUE(server.ok()) << server.status();

  // Registration carries both addresses; the placement of the answer is served.
  ASSERT_TRUE(WaitFor([&] { return (*worker)->epoch() == 1; }));
  {
    absl::MutexLock lock(&scheduler.mu);
    ASSERT_FALSE(scheduler.registers.empty());
    const pb::RegisterRequest& r = scheduler.registers[0];
    EXPECT_EQ(r.role(), pb::ROLE_EXPERT);
    EXPECT_EQ(r.rank(), 1);
    EXPECT_EQ(r.num_slots(), 4);
    EXPECT_EQ(r.data_address(), (*server)->data_address());
    EXPECT_EQ(r.control_address(), (*server)->control_address());
  }

  // A dispatch over the data plane, counted in the next heartbeat's load report.
  TcpTransport transport({.peers = {"", (*server)->data_address()}});
  auto d = std::make_shared<Dispatch>(Dispatch::Allocate(
      {.step_id = 1, .epoch = 1, .layer = 0, .source_rank = 0}, 3, config->hidden_size, 1));
  for (int i = 0; i < 3; ++i) d->slots.data_as<int32_t>()[i] = 0, d->weights.data_as<float>()[i] = 1;
  ASSERT_TRUE(transport.Wait(transport.Send(1, d)).ok());
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&scheduler.mu);
    for (const auto& h : scheduler.heartbeats) {
      if (h.load().slot_tokens_size() > 0 && h.load().slot_tokens(0) == 3) return true;
    }
    return false;
  }));

  // ExpertControl: prepare epoch 2, commit it.
  auto stub = pb::ExpertControl::NewStub(
      grpc::CreateChannel((*server)->control_address(), grpc::InsecureChannelCredentials()));
  pb::PlacementTable next = *table;
  next.set_epoch(2);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    pb::PrepareResponse response;
    ASSERT_TRUE(stub->PreparePlacement(&ctx, next, &response).ok());
    EXPECT_TRUE(response.ready()) << response.error();
    EXPECT_EQ(response.epoch(), 2u);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    pb::CommitRequest request;
    request.set_epoch(7);  // not prepared
    pb::CommitResponse response;
    EXPECT_EQ(stub->CommitPlacement(&ctx, request, &response).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    pb::CommitRequest request;
    request.set_epoch(2);
    pb::CommitResponse response;
    ASSERT_TRUE(stub->CommitPlacement(&ctx, request, &response).ok());
    EXPECT_EQ(response.epoch(), 2u);
  }
  EXPECT_EQ((*worker)->epoch(), 2u);
  {
    // A table that does not fit the model is refused with ready = false.
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    pb::PlacementTable bad = next;
    bad.set_epoch(3);
    bad.mutable_layers(0)->set_layer(999);
    pb::PrepareResponse response;
    ASSERT_TRUE(stub->PreparePlacement(&ctx, bad, &response).ok());
    EXPECT_FALSE(response.ready());
    EXPECT_FALSE(response.error().empty());
  }
  // The heartbeat reports the new epoch; a lost lease registers again.
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&scheduler.mu);
    return !scheduler.heartbeats.empty() && scheduler.heartbeats.back().placement_epoch() == 2;
  }));
  {
    absl::MutexLock lock(&scheduler.mu);
    scheduler.expire_next = true;
  }
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&scheduler.mu);
    return scheduler.registers.size() >= 2;
  }));
  (*server)->Stop();
  scheduler_server->Shutdown();
}

TEST(ExpertServerTest, KeepsServingWithoutAScheduler) {
  const std::string& dir = testing::TinyModelDir("qwen3_moe");
  auto worker = ExpertWorker::Create({.rank = 0, .model_dir = dir});
  ASSERT_TRUE(worker.ok());
  // Nothing listens at the scheduler address: the rank still comes up and stops cleanly.
  auto server = ExpertServer::Start({.rank = 0,
                                     .scheduler_address = "127.0.0.1:1",
                                     .heartbeat_interval = absl::Milliseconds(20),
                                     .rpc_timeout = absl::Milliseconds(100)},
                                    worker->get());
  ASSERT_TRUE(server.ok()) << server.status();
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE((*server)->registered());
  const absl::Time start = absl::Now();
  (*server)->Stop();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

}  // namespace
}  // namespace moe::worker
