// RemoteExpertExecutor over in-process expert workers (inproc and tcp transports), with and
// without replicas: the model's logits match the local forward pass; replicated experts
// spread their rows over ranks; a dead rank fails the step with kUnavailable.
#include "worker/attention/remote_expert_executor.h"

#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "model/model.h"
#include "worker/expert/expert_worker.h"
#include "worker/testing/tiny_model.h"
#include "worker/transport/inproc.h"
#include "worker/transport/tcp.h"

namespace moe::worker {
namespace {

using model::ForwardBatch;
using model::Model;

constexpr int kBlockSize = 16;

// Logits of every position of two sequences (a prefill of 13 and one of 7 tokens).
absl::StatusOr<std::vector<float>> Logits(Model& m) {
  std::vector<int32_t> a(13), b(7);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int32_t>((i * 37 + 5) % 500);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int32_t>((i * 11 + 90) % 500);
  const std::vector<int32_t> blocks_a = {0}, blocks_b = {1};
  ForwardBatch batch;
  batch.seqs.push_back({.tokens = a, .start_position = 0, .block_table = blocks_a,
                        .logits = model::LogitsRows::kAll});
  batch.seqs.push_back({.tokens = b, .start_position = 0, .block_table = blocks_b,
                        .logits = model::LogitsRows::kAll});
  MOE_ASSIGN_OR_RETURN(model::ForwardOutput out, m.Forward(batch));
  const float* p = out.logits.data_as<float>();
  return std::vector<float>(p, p + out.logits.numel());
}

enum class Backend { kInproc, kTcp };

struct Case {
  std::string arch;
  Backend backend;
  int ranks;
  bool replicas;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return c.arch + (c.backend == Backend::kTcp ? "_tcp_" : "_inproc_") + std::to_string(c.ranks) +
         "ranks" + (c.replicas ? "_replicas" : "");
}

// A cluster of expert workers in this process, reached over one transport.
class Cluster {
 public:
  absl::Status Start(const std::string& dir, const PlacementTable& table, int ranks, Backend backend,
                     absl::Duration timeout = absl::Seconds(5)) {
    std::vector<std::string> addresses;
    for (int r = 0; r < ranks; ++r) {
      MOE_ASSIGN_OR_RETURN(auto w, ExpertWorker::Create({.rank = r, .model_dir = dir}));
      MOE_RETURN_IF_ERROR(w->LoadPlacement(table));
      if (backend == Backend::kTcp) {
        MOE_ASSIGN_OR_RETURN(auto s, TcpServer::Start({}, w.get()));
        addresses.push_back(s->address());
        servers.push_back(std::move(s));
      }
      workers.push_back(std::move(w));
    }
    if (backend == Backend::kTcp) {
      transport = std::make_unique<TcpTransport>(
          TcpTransportOptions{.peers = addresses, .dispatch_timeout = timeout});
    } else {
      auto t = std::make_unique<InprocTransport>(InprocTransportOptions{.dispatch_timeout = timeout});
      for (int r = 0; r < ranks; ++r) t->AddEndpoint(r, workers[r].get());
      inproc = t.get();
      transport = std::move(t);
    }
    return absl::OkStatus();
  }
  ~Cluster() {
    transport.reset();
    for (auto& s : servers) s->Stop();
    for (auto& w : workers) w->Stop();
  }

  std::vector<std::unique_ptr<ExpertWorker>> workers;
  std::vector<std::unique_ptr<TcpServer>> servers;
  std::unique_ptr<Transport> transport;
  InprocTransport* inproc = nullptr;
};

class RemoteExpertExecutorTest : public ::testing::TestWithParam<Case> {};

TEST_P(RemoteExpertExecutorTest, ReproducesTheLocalLogits) {
  const Case& c = GetParam();
  const std::string& dir = testing::TinyModelDir(c.arch);
  auto reference = Model::Load(dir, {.kv = {.num_blocks = 4, .block_size = kBlockSize}});
  ASSERT_TRUE(reference.ok()) << reference.status();
  auto want = Logits(**reference);
  ASSERT_TRUE(want.ok()) << want.status();

  // The attention side holds no routed expert at all.
  auto attention = Model::Load(dir, {.kv = {.num_blocks = 4, .block_size = kBlockSize},
                                     .experts = [](int, int) { return false; }});
  ASSERT_TRUE(attention.ok()) << attention.status();
  const model::ModelConfig& config = (*attention)->config();
  RoundRobinOptions ro{.num_ranks = c.ranks, .epoch = 1};
  if (c.replicas) {
    for (int e = 0; e < config.moe.num_experts; e += 2) ro.extra_replicas.push_back({-1, e});
  }
  auto table = RoundRobinPlacement(config, ro);
  ASSERT_TRUE(table.ok()) << table.status();
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(dir, *table, c.ranks, c.backend).ok());
  RemoteExpertExecutor executor(config, {.transport = cluster.transport.get(), .source_rank = 0});
  ASSERT_TRUE(executor.SetPlacement(*table).ok());
  (*attention)->SetExpertExecutor(&executor);
  executor.SetNextStepId(100);
  auto got = Logits(**attention);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(executor.step_id(), 100u);
  ASSERT_EQ(got->size(), want->size());
  float max_err = 0;
  for (size_t i = 0; i < want->size(); ++i) max_err = std::max(max_err, std::abs((*got)[i] - (*want)[i]));
  EXPECT_LE(max_err, 1e-5f) << c.arch;
  // Every rank did some work.
  for (int r = 0; r < c.ranks; ++r) EXPECT_GT(executor.rows_sent_per_rank()[r], 0) << "rank " << r;
  // The next Forward is step 101.
  ASSERT_TRUE(Logits(**attention).ok());
  EXPECT_EQ(executor.step_id(), 101u);
}

INSTANTIATE_TEST_SUITE_P(
    Models, RemoteExpertExecutorTest,
    ::testing::Values(Case{"qwen3_moe", Backend::kInproc, 2, false},
                      Case{"qwen3_moe", Backend::kInproc, 3, true},
                      Case{"qwen3_moe", Backend::kTcp, 3, true},
                      Case{"deepseek_v3", Backend::kInproc, 4, false},
                      Case{"deepseek_v3", Backend::kInproc, 2, true},
                      Case{"deepseek_v3", Backend::kTcp, 2, false},
                      Case{"deepseek_v3", Backend::kTcp, 4, true},
                      Case{"qwen2_moe", Backend::kInproc, 3, true},
                      Case{"mixtral", Backend::kTcp, 2, true}),
    CaseName);

TEST(RemoteExpertExecutorReplicaTest, RowsOfAReplicatedExpertReachSeveralRanks) {
  const std::string& dir = testing::TinyModelDir("qwen3_moe");
  auto attention = Model::Load(dir, {.kv = {.num_blocks = 4, .block_size = kBlockSize},
                                     .experts = [](int, int) { return false; }});
  ASSERT_TRUE(attention.ok());
  const model::ModelConfig& config = (*attention)->config();
  // Every expert on two of the three ranks.
  RoundRobinOptions ro{.num_ranks = 3, .epoch = 1};
  for (int e = 0; e < config.moe.num_experts; ++e) ro.extra_replicas.push_back({-1, e});
  auto table = RoundRobinPlacement(config, ro);
  ASSERT_TRUE(table.ok());
  auto index = PlacementIndex::Build(*table, config);
  ASSERT_TRUE(index.ok());
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(dir, *table, 3, Backend::kInproc).ok());
  RemoteExpertExecutor executor(config, {.transport = cluster.transport.get()});
  ASSERT_TRUE(executor.SetPlacement(*table).ok());
  (*attention)->SetExpertExecutor(&executor);
  ASSERT_TRUE(Logits(**attention).ok());

  // Per (layer, expert): the ranks whose replica computed rows, from the load reports.
  std::vector<moe::internal::v1::LoadReport> reports;
  for (auto& w : cluster.workers) reports.push_back(w->TakeLoadReport());
  int spread = 0, used = 0;
  for (int layer : index->moe_layers()) {
    for (int e = 0; e < config.moe.num_experts; ++e) {
      int ranks_with_rows = 0;
      for (const Replica& r : index->replicas(layer, e)) {
        if (reports[r.rank].slot_tokens(index->SlotTokenIndex(layer, r.slot)) > 0) ++ranks_with_rows;
      }
      if (ranks_with_rows > 0) ++used;
      if (ranks_with_rows > 1) ++spread;
    }
  }
  EXPECT_GT(used, 0);
  EXPECT_GT(spread, 0) << "no replicated expert had its rows on more than one rank";
  // Least-loaded choice keeps ranks within a small margin of each other.
  std::vector<int64_t> rows = executor.rows_sent_per_rank();
  const int64_t max_rows = *std::max_element(rows.begin(), rows.end());
  const int64_t min_rows = *std::min_element(rows.begin(), rows.end());
  EXPECT_LE(max_rows - min_rows, max_rows / 2) << rows[0] << " " << rows[1] << " " << rows[2];
}

TEST(RemoteExpertExecutorFailureTest, DeadRankFailsTheStepWithUnavailable) {
  const std::string& dir = testing::TinyModelDir("qwen3_moe");
  auto attention = Model::Load(dir, {.kv = {.num_blocks = 4, .block_size = kBlockSize},
                                     .experts = [](int, int) { return false; }});
  ASSERT_TRUE(attention.ok());
  const model::ModelConfig& config = (*attention)->config();
  auto table = RoundRobinPlacement(config, {.num_ranks = 2, .epoch = 1});
  ASSERT_TRUE(table.ok());
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(dir, *table, 2, Backend::kTcp).ok());
  RemoteExpertExecutor executor(config, {.transport = cluster.transport.get()});
  ASSERT_TRUE(executor.SetPlacement(*table).ok());
  (*attention)->SetExpertExecutor(&executor);
  ASSERT_TRUE(Logits(**attention).ok());
  cluster.servers[1]->Stop();
  const absl::Time start = absl::Now();
  auto failed = Logits(**attention);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_NE(failed.status().message().find("expert rank 1"), absl::string_view::npos)
      << failed.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
}

TEST(RemoteExpertExecutorFailureTest, StaleEpochReportsTheWorkersEpoch) {
  const std::string& dir = testing::TinyModelDir("qwen3_moe");
  auto attention = Model::Load(dir, {.kv = {.num_blocks = 4, .block_size = kBlockSize},
                                     .experts = [](int, int) { return false; }});
  ASSERT_TRUE(attention.ok());
  const model::ModelConfig& config = (*attention)->config();
  auto table = RoundRobinPlacement(config, {.num_ranks = 2, .epoch = 5});
  ASSERT_TRUE(table.ok());
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(dir, *table, 2, Backend::kInproc).ok());
  auto old_table = *table;
  old_table.set_epoch(4);
  RemoteExpertExecutor executor(config, {.transport = cluster.transport.get()});
  ASSERT_TRUE(executor.SetPlacement(old_table).ok());
  (*attention)->SetExpertExecutor(&executor);
  auto failed = Logits(**attention);
  ASSERT_EQ(failed.status().code(), absl::StatusCode::kFailedPrecondition) << failed.status();
  ASSERT_TRUE(WorkerEpochFromStatus(failed.status()).has_value());
  EXPECT_EQ(*WorkerEpochFromStatus(failed.status()), 5u);
  // Refetch and go on.
  ASSERT_TRUE(executor.SetPlacement(*table).ok());
  EXPECT_TRUE(Logits(**attention).ok());
}

}  // namespace
}  // namespace moe::worker
