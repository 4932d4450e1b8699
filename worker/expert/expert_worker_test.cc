// ExpertWorker on tiny generated models: a rank with a subset of the slots computes what
// LocalExpertExecutor computes for those experts; typed errors; two-phase placement;
// batching of several sources; load reports.
#include "worker/expert/expert_worker.h"

#include <cstring>
#include <random>

#include "common/metrics.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "model/weights.h"
#include "worker/testing/tiny_model.h"
#include "worker/transport/inproc.h"

namespace moe::worker {
namespace {

using common::DType;
using common::Tensor;

struct Routed {
  Tensor x;        // [T, H]
  Tensor ids;      // [T, k] logical experts
  Tensor weights;  // [T, k]
};

// Random rows routed to experts drawn from `experts` (distinct per row).
Routed MakeRouted(int64_t t, int64_t h, int64_t k, const std::vector<int>& experts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Routed r{Tensor(DType::kF32, {t, h}), Tensor(DType::kI32, {t, k}), Tensor(DType::kF32, {t, k})};
  for (int64_t i = 0; i < t * h; ++i) r.x.data_as<float>()[i] = u(rng);
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int> pool = experts;
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < k; ++j) {
      r.ids.data_as<int32_t>()[i * k + j] = pool[j % pool.size()];
      r.weights.data_as<float>()[i * k + j] = 0.5f + 0.5f * u(rng);
    }
  }
  return r;
}

class ExpertWorkerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir(GetParam());
    auto config = model::LoadModelConfig(dir_);
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    for (int l = 0; l < config_.num_layers; ++l) {
      if (config_.IsMoeLayer(l)) moe_layer_ = l, ++num_moe_layers_;
    }
    auto table = RoundRobinPlacement(config_, {.num_ranks = 2, .epoch = 1});
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = *table;
  }

  // The (slot, expert) pairs rank `rank` holds at `layer`.
  std::vector<std::pair<int, int>> Held(const PlacementTable& table, int rank, int layer) {
    auto index = PlacementIndex::Build(table, config_);
    EXPECT_TRUE(index.ok());
    std::vector<std::pair<int, int>> held;
    const auto& slots = index->rank_slots(rank, layer);
    for (int s = 0; s < static_cast<int>(slots.size()); ++s) {
      if (slots[s] >= 0) held.push_back({s, slots[s]});
    }
    return held;
  }

  std::shared_ptr<Dispatch> ToDispatch(const Routed& r, const std::vector<std::pair<int, int>>& held,
                                       uint64_t epoch, uint64_t step = 1, int source = 0) {
    const int64_t t = r.x.shape()[0], h = r.x.shape()[1], k = r.ids.shape()[1];
    auto d = std::make_shared<Dispatch>(Dispatch::Allocate(
        {.step_id = step, .epoch = epoch, .layer = moe_layer_, .source_rank = source}, t, h, k));
    std::memcpy(d->rows.data(), r.x.data(), t * h * sizeof(float));
    for (int64_t i = 0; i < t * k; ++i) {
      const int e = r.ids.data_as<int32_t>()[i];
      for (const auto& [slot, expert] : held) {
        if (expert == e) d->slots.data_as<int32_t>()[i] = slot;
      }
      d->weights.data_as<float>()[i] = r.weights.data_as<float>()[i];
    }
    return d;
  }

  Tensor Reference(const Routed& r) {
    if (full_ == nullptr) {
      auto w = model::ModelWeights::Load(dir_, config_);
      EXPECT_TRUE(w.ok()) << w.status();
      full_ = std::move(*w);
    }
    model::LocalExpertExecutor local(*full_);
    Tensor out(DType::kF32, {r.x.shape()[0], r.x.shape()[1]});
    EXPECT_TRUE(local.RunRoutedExperts(moe_layer_, r.x.view(), r.ids.view(), r.weights.view(), out.view()).ok());
    return out;
  }

  std::string dir_;
  model::ModelConfig config_;
  int moe_layer_ = -1;
  int num_moe_layers_ = 0;
  PlacementTable table_;
  std::unique_ptr<model::ModelWeights> full_;
};

TEST_P(ExpertWorkerTest, SubsetOfSlotsComputesWhatTheLocalExecutorComputes) {
  auto worker = ExpertWorker::Create({.rank = 1, .model_dir = dir_});
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE((*worker)->LoadPlacement(table_).ok());
  EXPECT_EQ((*worker)->epoch(), 1u);
  // Half the experts of every MoE layer, and only those in memory.
  EXPECT_EQ((*worker)->num_loaded_slots(), num_moe_layers_ * config_.moe.num_experts / 2);
  auto held = Held(table_, 1, moe_layer_);
  std::vector<int> experts;
  for (const auto& [slot, e] : held) experts.push_back(e);
  Routed r = MakeRouted(9, config_.hidden_size, config_.moe.top_k, experts, 3);
  InprocTransport transport({});
  transport.AddEndpoint(1, worker->get());
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(1, ToDispatch(r, held, 1)));
  ASSERT_TRUE(out.ok()) << out.status();
  Tensor want = Reference(r);
  for (int64_t i = 0; i < want.numel(); ++i) {
    ASSERT_EQ(out->data_as<float>()[i], want.data_as<float>()[i]) << "element " << i;
  }
  // Load report: every (row, choice) counted on its slot.
  moe::internal::v1::LoadReport report = (*worker)->TakeLoadReport();
  EXPECT_EQ(report.placement_epoch(), 1u);
  uint64_t total = 0;
  for (uint64_t v : report.slot_tokens()) total += v;
  EXPECT_EQ(total, 9u * config_.moe.top_k);
  EXPECT_EQ(report.steps(), 1u);
  EXPECT_EQ((*worker)->TakeLoadReport().slot_tokens(0), 0u);  // reset
  const std::string metrics = common::DefaultMetricsRegistry().Render();
  EXPECT_NE(metrics.find("moe_expert_dispatches_total{rank=\"1\",result=\"ok\"}"), std::string::npos);
  EXPECT_NE(metrics.find("moe_expert_placement_epoch{rank=\"1\"} 1"), std::string::npos);
}

TEST_P(ExpertWorkerTest, StaleEpochAndUnknownSlots) {
  const int spr = config_.moe.num_experts / 2 + 2;  // the last two slots stay empty
  auto table = RoundRobinPlacement(config_, {.num_ranks = 2, .slots_per_rank = spr, .epoch = 4});
  ASSERT_TRUE(table.ok());
  auto worker = ExpertWorker::Create({.rank = 0, .model_dir = dir_});
  ASSERT_TRUE(worker.ok());
  InprocTransport transport({});
  transport.AddEndpoint(0, worker->get());
  auto held = Held(*table, 0, moe_layer_);
  Routed r = MakeRouted(2, config_.hidden_size, 1, {held[0].second}, 5);

  // No placement yet.
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, ToDispatch(r, held, 4)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();

  ASSERT_TRUE((*worker)->LoadPlacement(*table).ok());
  out = transport.Wait(transport.Send(0, ToDispatch(r, held, 3)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();
  ASSERT_TRUE(WorkerEpochFromStatus(out.status()).has_value());
  EXPECT_EQ(*WorkerEpochFromStatus(out.status()), 4u);

  auto d = ToDispatch(r, held, 4);
  d->slots.data_as<int32_t>()[0] = spr - 1;  // in range, empty
  EXPECT_EQ(transport.Wait(transport.Send(0, d)).status().code(), absl::StatusCode::kNotFound);
  d = ToDispatch(r, held, 4);
  d->slots.data_as<int32_t>()[1] = spr;  // outside the rank's slots
  EXPECT_EQ(transport.Wait(transport.Send(0, d)).status().code(), absl::StatusCode::kInvalidArgument);
  d = ToDispatch(r, held, 4);
  const_cast<DispatchMeta&>(d->meta).layer = config_.num_layers + 3;
  EXPECT_EQ(transport.Wait(transport.Send(0, d)).status().code(), absl::StatusCode::kInvalidArgument);
  // And a good one still works.
  EXPECT_TRUE(transport.Wait(transport.Send(0, ToDispatch(r, held, 4))).ok());
  const std::string metrics = common::DefaultMetricsRegistry().Render();
  EXPECT_NE(metrics.find("moe_expert_dispatches_total{rank=\"0\",result=\"failed_precondition\"}"),
            std::string::npos);
  EXPECT_NE(metrics.find("moe_expert_dispatches_total{rank=\"0\",result=\"not_found\"}"),
            std::string::npos);
}

TEST_P(ExpertWorkerTest, PrepareThenCommitFlipsTheEpoch) {
  auto worker = ExpertWorker::Create({.rank = 0, .model_dir = dir_});
  ASSERT_TRUE(worker.ok());
  ASSERT_TRUE((*worker)->LoadPlacement(table_).ok());
  InprocTransport transport({});
  transport.AddEndpoint(0, worker->get());
  // Epoch 2 moves every expert to the other rank.
  auto next = RoundRobinPlacement(config_, {.num_ranks = 2, .epoch = 2});
  ASSERT_TRUE(next.ok());
  for (auto& layer : *next->mutable_layers()) {
    for (auto& e : *layer.mutable_experts()) {
      for (auto& r : *e.mutable_replicas()) r.set_rank(1 - r.rank());
    }
  }
  auto old_held = Held(table_, 0, moe_layer_), new_held = Held(*next, 0, moe_layer_);
  Routed r_old = MakeRouted(3, config_.hidden_size, 1, {old_held[0].second}, 7);
  Routed r_new = MakeRouted(3, config_.hidden_size, 1, {new_held[0].second}, 8);

  ASSERT_TRUE(transport.Wait(transport.Send(0, ToDispatch(r_old, old_held, 1, /*step=*/10))).ok());
  ASSERT_TRUE((*worker)->Prepare(*next).ok());
  EXPECT_EQ((*worker)->prepared_epoch(), 2u);
  // Prepared is not served.
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, ToDispatch(r_new, new_held, 2, 11)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*WorkerEpochFromStatus(out.status()), 1u);
  // Epoch 1 still served.
  ASSERT_TRUE(transport.Wait(transport.Send(0, ToDispatch(r_old, old_held, 1, 11))).ok());
  EXPECT_EQ((*worker)->Commit(3).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*worker)->Commit(2).ok());
  EXPECT_EQ((*worker)->epoch(), 2u);
  out = transport.Wait(transport.Send(0, ToDispatch(r_new, new_held, 2, 12)));
  ASSERT_TRUE(out.ok()) << out.status();
  Tensor want = Reference(r_new);
  for (int64_t i = 0; i < want.numel(); ++i) ASSERT_EQ(out->data_as<float>()[i], want.data_as<float>()[i]);
  // Step 11 had reached the rank before the flip: it finishes on epoch 1; step 12 may not.
  EXPECT_TRUE(transport.Wait(transport.Send(0, ToDispatch(r_old, old_held, 1, 11))).ok());
  out = transport.Wait(transport.Send(0, ToDispatch(r_old, old_held, 1, 13)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*WorkerEpochFromStatus(out.status()), 2u);
  // Older epochs cannot be prepared.
  EXPECT_EQ((*worker)->Prepare(table_).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(ExpertWorkerTest, DispatchesOfTheSameStepAndLayerAreComputedTogether) {
  auto worker = ExpertWorker::Create({.rank = 1,
                                      .model_dir = dir_,
                                      .gather_window = absl::Seconds(2),
                                      .expected_sources = 3});
  ASSERT_TRUE(worker.ok());
  ASSERT_TRUE((*worker)->LoadPlacement(table_).ok());
  InprocTransport transport({});
  transport.AddEndpoint(1, worker->get());
  auto held = Held(table_, 1, moe_layer_);
  std::vector<int> experts;
  for (const auto& [slot, e] : held) experts.push_back(e);
  std::vector<Routed> rs;
  std::vector<CallId> calls;
  const absl::Time start = absl::Now();
  for (int source = 0; source < 3; ++source) {
    rs.push_back(MakeRouted(2 + source, config_.hidden_size, config_.moe.top_k, experts, 20 + source));
    calls.push_back(transport.Send(1, ToDispatch(rs.back(), held, 1, /*step=*/5, source)));
    absl::SleepFor(absl::Milliseconds(20));
  }
  for (int source = 0; source < 3; ++source) {
    absl::StatusOr<Tensor> out = transport.Wait(calls[source]);
    ASSERT_TRUE(out.ok()) << out.status();
    Tensor want = Reference(rs[source]);
    for (int64_t i = 0; i < want.numel(); ++i) {
      ASSERT_NEAR(out->data_as<float>()[i], want.data_as<float>()[i], 1e-6f);
    }
  }
  // One ExpertFfn for the three sources, and no wait for the window once all had arrived.
  EXPECT_EQ((*worker)->num_ffn_calls(), 1);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST_P(ExpertWorkerTest, StopFailsQueuedWorkAsUnavailable) {
  auto worker = ExpertWorker::Create({.rank = 0, .model_dir = dir_});
  ASSERT_TRUE(worker.ok());
  (*worker)->Stop();
  InprocTransport transport({});
  transport.AddEndpoint(0, worker->get());
  auto held = Held(table_, 0, moe_layer_);
  Routed r = MakeRouted(1, config_.hidden_size, 1, {held[0].second}, 1);
  EXPECT_EQ(transport.Wait(transport.Send(0, ToDispatch(r, held, 1))).status().code(),
            absl::StatusCode::kUnavailable);
}

INSTANTIATE_TEST_SUITE_P(Archs, ExpertWorkerTest, ::testing::Values("qwen3_moe", "deepseek_v3"));

}  // namespace
}  // namespace moe::worker
