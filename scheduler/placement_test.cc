#include "scheduler/placement.h"

#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::scheduler {
namespace {

using ::testing::HasSubstr;

std::vector<RankSlots> Ranks(int n, int slots) {
  std::vector<RankSlots> out;
  for (int r = 0; r < n; ++r) out.push_back({.rank = r, .num_slots = slots});
  return out;
}

// Checks the table invariants by building the index, and returns it.
PlacementIndex MustIndex(const PlacementTable& table) {
  absl::StatusOr<PlacementIndex> index = PlacementIndex::Build(table);
  EXPECT_TRUE(index.ok()) << index.status();
  return index.ok() ? *std::move(index) : PlacementIndex();
}

// Replicas per rank in `layer`.
std::map<int32_t, int> CountPerRank(const PlacementTable& table, int32_t layer) {
  std::map<int32_t, int> out;
  for (const auto& l : table.layers()) {
    if (l.layer() != layer) continue;
    for (const auto& e : l.experts()) {
      for (const auto& r : e.replicas()) ++out[r.rank()];
    }
  }
  return out;
}

// Zipf(s=1) load over `n` experts, hottest experts at shuffled positions (fixed seed).
std::vector<double> ZipfLoad(int n, uint32_t seed) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::mt19937 rng(seed);
  for (int i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
  std::vector<double> load(n);
  for (int k = 0; k < n; ++k) load[order[k]] = 1000.0 / (k + 1);
  return load;
}

TEST(InitialPlacementTest, OneReplicaEachRoundRobinWithoutRedundancy) {
  absl::StatusOr<PlacementTable> table = InitialPlacement(
      {.moe_layers = {3, 1}, .num_experts = 8, .ranks = Ranks(4, 2), .epoch = 7});
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->epoch(), 7u);
  EXPECT_EQ(table->num_ranks(), 4);
  EXPECT_EQ(table->slots_per_rank(), 2);
  ASSERT_EQ(table->layers_size(), 2);
  EXPECT_EQ(table->layers(0).layer(), 1);  // ascending
  EXPECT_EQ(table->layers(1).layer(), 3);
  PlacementIndex index = MustIndex(*table);
  for (int32_t layer : {1, 3}) {
    for (int e = 0; e < 8; ++e) {
      ASSERT_EQ(index.Replicas(layer, e).size(), 1u) << "layer " << layer << " expert " << e;
      EXPECT_EQ(index.Replicas(layer, e)[0].rank, e % 4) << "expert " << e;
    }
    for (int r = 0; r < 4; ++r) EXPECT_EQ(CountPerRank(*table, layer)[r], 2) << "rank " << r;
  }
}

TEST(InitialPlacementTest, RedundantReplicasFillEverySlotOnDistinctRanks) {
  // The cluster example: 64 experts, 4 ranks x 18 slots, 8 redundant replicas per layer.
  absl::StatusOr<PlacementTable> table =
      InitialPlacement({.moe_layers = {0, 1, 2, 3}, .num_experts = 64,
                        .expert_bytes = {3u << 20}, .ranks = Ranks(4, 18),
                        .redundant_slots = 8});
  ASSERT_TRUE(table.ok()) << table.status();
  PlacementIndex index = MustIndex(*table);  // distinct ranks, slots in range, no slot twice
  std::set<int32_t> replicated_in_layer0;
  for (int32_t layer = 0; layer < 4; ++layer) {
    int total = 0;
    for (int e = 0; e < 64; ++e) {
      const size_t n = index.Replicas(layer, e).size();
      EXPECT_GE(n, 1u);
      EXPECT_LE(n, 2u);
      total += static_cast<int>(n);
      if (layer == 0 && n == 2) replicated_in_layer0.insert(e);
    }
    EXPECT_EQ(total, 72) << "layer " << layer;
    for (int r = 0; r < 4; ++r) EXPECT_EQ(CountPerRank(*table, layer)[r], 18);
  }
  EXPECT_EQ(replicated_in_layer0.size(), 8u);
  // The replicated experts rotate between layers.
  EXPECT_EQ(index.Replicas(1, 0).size(), 1u);
  EXPECT_EQ(index.Replicas(1, 8).size(), 2u);
}

TEST(InitialPlacementTest, BalancesParameterBytesAcrossLayers) {
  // 5 replicas per layer on 3 ranks: one rank gets one fewer per layer; which one rotates so
  // that the bytes even out. Layers weigh 100, 300, 200 bytes per expert.
  absl::StatusOr<PlacementTable> table =
      InitialPlacement({.moe_layers = {0, 1, 2}, .num_experts = 4,
                        .expert_bytes = {100, 300, 200}, .ranks = Ranks(3, 2),
                        .redundant_slots = 1});
  ASSERT_TRUE(table.ok()) << table.status();
  MustIndex(*table);
  std::map<int32_t, double> bytes;
  const std::map<int32_t, double> per_layer = {{0, 100}, {1, 300}, {2, 200}};
  for (const auto& [layer, b] : per_layer) {
    for (const auto& [rank, n] : CountPerRank(*table, layer)) bytes[rank] += n * b;
  }
  double lo = 1e18, hi = 0;
  for (const auto& [rank, b] : bytes) {
    lo = std::min(lo, b);
    hi = std::max(hi, b);
  }
  EXPECT_LE(hi - lo, 300.0) << "bytes per rank differ by more than one expert";
}

TEST(InitialPlacementTest, UnequalSlotsAreNeverExceeded) {
  absl::StatusOr<PlacementTable> table = InitialPlacement(
      {.moe_layers = {0}, .num_experts = 8,
       .ranks = {{.rank = 0, .num_slots = 9}, {.rank = 2, .num_slots = 2}},
       .redundant_slots = 2});
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->num_ranks(), 3);
  ASSERT_EQ(table->rank_slots_size(), 3);
  EXPECT_EQ(table->rank_slots(1), 0);
  PlacementIndex index = MustIndex(*table);
  EXPECT_LE(CountPerRank(*table, 0)[0], 9);
  EXPECT_LE(CountPerRank(*table, 0)[2], 2);
  EXPECT_EQ(CountPerRank(*table, 0)[0] + CountPerRank(*table, 0)[2], 10);
  EXPECT_EQ(index.NumSlots(2), 2);
}

TEST(InitialPlacementTest, IsDeterministic) {
  PlacementInput in{.moe_layers = {5, 2, 9}, .num_experts = 16, .expert_bytes = {7, 9, 11},
                    .ranks = Ranks(3, 7), .redundant_slots = 5};
  absl::StatusOr<PlacementTable> a = InitialPlacement(in);
  absl::StatusOr<PlacementTable> b = InitialPlacement(in);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());
}

TEST(InitialPlacementTest, ErrorsNameTheField) {
  struct Case {
    const char* name;
    PlacementInput input;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"no ranks", {.moe_layers = {0}, .num_experts = 4}, "ranks: no expert ranks"},
      {"no layers", {.num_experts = 4, .ranks = Ranks(1, 4)}, "moe_layers:"},
      {"zero experts", {.moe_layers = {0}, .num_experts = 0, .ranks = Ranks(1, 4)},
       "num_experts:"},
      {"too few slots", {.moe_layers = {0}, .num_experts = 64, .ranks = Ranks(2, 8)},
       "ranks: 2 ranks with 16 slots per layer in all cannot hold 64 experts + 0 redundant"},
      {"slots for redundancy",
       {.moe_layers = {0}, .num_experts = 8, .ranks = Ranks(2, 4), .redundant_slots = 1},
       "cannot hold 8 experts + 1 redundant"},
      {"more replicas than ranks",
       {.moe_layers = {0}, .num_experts = 2, .ranks = Ranks(2, 8), .redundant_slots = 3},
       "redundant_slots:"},
      {"duplicate rank",
       {.moe_layers = {0}, .num_experts = 2, .ranks = {{0, 2}, {0, 2}}},
       "ranks: rank 0 appears twice"},
      {"duplicate layer", {.moe_layers = {1, 1}, .num_experts = 2, .ranks = Ranks(1, 2)},
       "moe_layers: layer 1 appears twice"},
      {"bytes per layer",
       {.moe_layers = {0, 1, 2}, .num_experts = 2, .expert_bytes = {1, 2}, .ranks = Ranks(1, 2)},
       "expert_bytes:"},
      {"negative redundancy",
       {.moe_layers = {0}, .num_experts = 2, .ranks = Ranks(1, 2), .redundant_slots = -1},
       "redundant_slots:"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<PlacementTable> table = InitialPlacement(c.input);
    ASSERT_FALSE(table.ok()) << c.name;
    EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(std::string(table.status().message()), HasSubstr(c.message)) << c.name;
  }
}

TEST(RebalanceTest, ZipfLoadOver64ExpertsOn4RanksWith8RedundantSlots) {
  absl::StatusOr<PlacementTable> initial =
      InitialPlacement({.moe_layers = {0, 1}, .num_experts = 64, .ranks = Ranks(4, 18),
                        .redundant_slots = 8, .epoch = 1});
  ASSERT_TRUE(initial.ok()) << initial.status();
  LoadStats load;
  load.expert_load[0] = ZipfLoad(64, 1);
  load.expert_load[1] = ZipfLoad(64, 2);
  absl::StatusOr<RebalanceResult> next =
      Rebalance(load, {.ranks = Ranks(4, 18), .redundant_slots = 8}, *initial);
  ASSERT_TRUE(next.ok()) << next.status();
  std::printf("zipf 64 experts / 4 ranks / 8 redundant: max/mean %.4f -> %.4f, moved %lld\n",
              next->imbalance_before, next->imbalance_after,
              static_cast<long long>(next->moved_replicas));
  EXPECT_EQ(next->table.epoch(), 2u);
  EXPECT_GT(next->imbalance_before, 1.3);
  EXPECT_LT(next->imbalance_after, 1.15);
  EXPECT_LT(next->imbalance_after, next->imbalance_before);
  PlacementIndex index = MustIndex(next->table);
  for (int32_t layer : {0, 1}) {
    for (int r = 0; r < 4; ++r) EXPECT_LE(CountPerRank(next->table, layer)[r], 18);
    // The hottest expert got the most replicas.
    const std::vector<double>& l = load.expert_load[layer];
    const int hottest = static_cast<int>(std::max_element(l.begin(), l.end()) - l.begin());
    EXPECT_GE(index.Replicas(layer, hottest).size(), 2u);
    EXPECT_NEAR(LayerImbalance(next->table, layer, l), next->layers[layer].imbalance_after, 1e-9);
  }
  // The same load again: nothing moves.
  absl::StatusOr<RebalanceResult> again =
      Rebalance(load, {.ranks = Ranks(4, 18), .redundant_slots = 8}, next->table);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->moved_replicas, 0);
  EXPECT_NEAR(again->imbalance_after, next->imbalance_after, 1e-9);
}

TEST(RebalanceTest, ImbalanceDropsForSeveralSkews) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    absl::StatusOr<PlacementTable> initial = InitialPlacement(
        {.moe_layers = {0}, .num_experts = 64, .ranks = Ranks(8, 9), .redundant_slots = 8});
    ASSERT_TRUE(initial.ok());
    LoadStats load;
    load.expert_load[0] = ZipfLoad(64, seed);
    absl::StatusOr<RebalanceResult> next =
        Rebalance(load, {.ranks = Ranks(8, 9), .redundant_slots = 8}, *initial);
    ASSERT_TRUE(next.ok()) << next.status();
    std::printf("seed %u, 8 ranks: max/mean %.4f -> %.4f, moved %lld\n", seed,
                next->imbalance_before, next->imbalance_after,
                static_cast<long long>(next->moved_replicas));
    EXPECT_LT(next->imbalance_after, next->imbalance_before) << "seed " << seed;
    EXPECT_LT(next->imbalance_after, 1.25) << "seed " << seed;
  }
}

TEST(RebalanceTest, DeadRankIsDroppedAndSurvivorsKeepTheirReplicas) {
  absl::StatusOr<PlacementTable> initial = InitialPlacement(
      {.moe_layers = {0}, .num_experts = 64, .ranks = Ranks(4, 24), .redundant_slots = 8});
  ASSERT_TRUE(initial.ok());
  PlacementIndex before = MustIndex(*initial);
  const size_t lost = before.SlotsOfRank(3).size();
  absl::StatusOr<RebalanceResult> next =
      Rebalance({}, {.ranks = Ranks(3, 24), .redundant_slots = 8}, *initial);
  ASSERT_TRUE(next.ok()) << next.status();
  PlacementIndex after = MustIndex(next->table);
  EXPECT_TRUE(after.SlotsOfRank(3).empty());
  EXPECT_EQ(next->table.rank_slots(3), 0);
  for (int e = 0; e < 64; ++e) EXPECT_FALSE(after.Replicas(0, e).empty()) << "expert " << e;
  std::printf("rank 3 of 4 dead: %zu replicas lost, %lld moved, max/mean %.4f\n", lost,
              static_cast<long long>(next->moved_replicas), next->imbalance_after);
  // Survivors' replicas stay in their slots; only the lost ones (and the redundant ones the
  // uniform load now assigns elsewhere) are loaded.
  EXPECT_LE(next->moved_replicas, static_cast<int64_t>(lost) + 8);
  int kept = 0;
  for (int r = 0; r < 3; ++r) {
    for (const SlotAssignment& s : before.SlotsOfRank(r)) {
      const auto& slots = after.SlotExperts(r, s.layer);
      if (slots[s.slot] == s.expert) ++kept;
    }
  }
  EXPECT_GE(kept, 72 - static_cast<int>(lost) - 8);
}

TEST(RebalanceTest, NotEnoughCapacityIsResourceExhausted) {
  absl::StatusOr<PlacementTable> initial = InitialPlacement(
      {.moe_layers = {0}, .num_experts = 64, .ranks = Ranks(4, 18), .redundant_slots = 8});
  ASSERT_TRUE(initial.ok());
  absl::StatusOr<RebalanceResult> next =
      Rebalance({}, {.ranks = Ranks(3, 18), .redundant_slots = 8}, *initial);
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(next.status().message()),
              HasSubstr("not enough capacity: 3 expert ranks with 54 slots per layer"));
}

TEST(RebalanceTest, RejectsBadLoad) {
  absl::StatusOr<PlacementTable> initial =
      InitialPlacement({.moe_layers = {0}, .num_experts = 4, .ranks = Ranks(2, 2)});
  ASSERT_TRUE(initial.ok());
  LoadStats wrong_length;
  wrong_length.expert_load[0] = {1, 2, 3};
  EXPECT_THAT(std::string(Rebalance(wrong_length, {.ranks = Ranks(2, 2)}, *initial)
                              .status()
                              .message()),
              HasSubstr("load: layer 0 has 3 values for 4 experts"));
  LoadStats negative;
  negative.expert_load[0] = {1, -2, 3, 4};
  EXPECT_EQ(Rebalance(negative, {.ranks = Ranks(2, 2)}, *initial).status().code(),
            absl::StatusCode::kInvalidArgument);
  LoadStats unknown_layer;
  unknown_layer.expert_load[5] = {1, 1, 1, 1};
  EXPECT_EQ(Rebalance(unknown_layer, {.ranks = Ranks(2, 2)}, *initial).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Rebalance({}, {}, *initial).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RebalanceTest, ReadmittedRankTakesLoad) {
  // Rank 1 is absent from the current table (it was dead); it comes back and gets replicas.
  absl::StatusOr<PlacementTable> initial = InitialPlacement(
      {.moe_layers = {0}, .num_experts = 8, .ranks = {{0, 8}, {2, 8}}, .redundant_slots = 0});
  ASSERT_TRUE(initial.ok());
  absl::StatusOr<RebalanceResult> next =
      Rebalance({}, {.ranks = Ranks(3, 8), .redundant_slots = 0}, *initial);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_GT(CountPerRank(next->table, 0)[1], 0);
  EXPECT_LT(next->imbalance_after, next->imbalance_before);
}

TEST(PlacementIndexTest, LookupsBothWays) {
  absl::StatusOr<PlacementTable> table = InitialPlacement(
      {.moe_layers = {2, 4}, .num_experts = 4, .ranks = Ranks(2, 3), .redundant_slots = 2});
  ASSERT_TRUE(table.ok());
  PlacementIndex index = MustIndex(*table);
  EXPECT_EQ(index.layers(), (std::vector<int32_t>{2, 4}));
  EXPECT_EQ(index.ranks(), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(index.num_experts(2), 4);
  EXPECT_EQ(index.num_experts(3), 0);
  EXPECT_TRUE(index.Replicas(3, 0).empty());
  // Both directions agree.
  for (int32_t rank : index.ranks()) {
    for (const SlotAssignment& s : index.SlotsOfRank(rank)) {
      const std::vector<Replica>& reps = index.Replicas(s.layer, s.expert);
      EXPECT_NE(std::find(reps.begin(), reps.end(), Replica{rank, s.slot}), reps.end());
      EXPECT_EQ(index.SlotExperts(rank, s.layer)[s.slot], s.expert);
    }
    EXPECT_EQ(index.SlotsOfRank(rank).size(), 6u);  // 3 slots x 2 layers
  }
}

TEST(PlacementIndexTest, RejectsBrokenTables) {
  auto base = [] {
    PlacementTable t;
    t.set_num_ranks(2);
    t.set_slots_per_rank(2);
    auto* l = t.add_layers();
    l->set_layer(0);
    for (int e = 0; e < 2; ++e) {
      auto* x = l->add_experts();
      x->set_expert(e);
      auto* r = x->add_replicas();
      r->set_rank(e);
      r->set_slot(0);
    }
    return t;
  };
  ASSERT_TRUE(PlacementIndex::Build(base()).ok());
  PlacementTable no_replica = base();
  no_replica.mutable_layers(0)->mutable_experts(1)->clear_replicas();
  EXPECT_THAT(std::string(PlacementIndex::Build(no_replica).status().message()),
              HasSubstr("expert 1 has no replica"));
  PlacementTable same_rank = base();
  auto* dup = same_rank.mutable_layers(0)->mutable_experts(0)->add_replicas();
  dup->set_rank(0);
  dup->set_slot(1);
  EXPECT_THAT(std::string(PlacementIndex::Build(same_rank).status().message()),
              HasSubstr("two replicas on rank 0"));
  PlacementTable same_slot = base();
  same_slot.mutable_layers(0)->mutable_experts(1)->mutable_replicas(0)->set_rank(0);
  EXPECT_THAT(std::string(PlacementIndex::Build(same_slot).status().message()),
              HasSubstr("rank 0 slot 0 holds experts 0 and 1"));
  PlacementTable slot_range = base();
  slot_range.mutable_layers(0)->mutable_experts(1)->mutable_replicas(0)->set_slot(2);
  EXPECT_THAT(std::string(PlacementIndex::Build(slot_range).status().message()),
              HasSubstr("slot 2 of rank 1 which has 2 slots"));
  PlacementTable rank_range = base();
  rank_range.mutable_layers(0)->mutable_experts(1)->mutable_replicas(0)->set_rank(5);
  EXPECT_FALSE(PlacementIndex::Build(rank_range).ok());
}

}  // namespace
}  // namespace moe::scheduler
