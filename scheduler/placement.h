// Expert placement: which expert worker slot holds a replica of which (layer, logical expert).
//
// Pure functions over plain values, testable without a cluster (DeepSeek EPLB style):
//   - InitialPlacement: the first table, without load statistics.
//   - Rebalance: a new table from per-expert load, the surviving ranks and the current table
//     (replicate the heaviest experts into the redundant slots, pack replicas onto ranks by
//     load, keep replicas where they are when that costs little balance).
//   - PlacementIndex: the lookups the data plane needs, built from a table.
//
// Slots are per MoE layer: a rank with `num_slots` slots holds up to `num_slots` experts of
// every MoE layer, at slot indices [0, num_slots). A table lists, per MoE layer, every logical
// expert 0..num_experts-1 with at least one replica; the replicas of one expert sit on
// different ranks; a (rank, layer, slot) holds at most one replica.
//
// `redundant_slots` is the number of extra replicas per MoE layer over all ranks together (the
// config key placement.redundant_slots): each layer has num_experts + redundant_slots replicas.
// A rank may hold more slots than it is given replicas; unused slots stay empty.
//
// Determinism: equal inputs give equal tables (ties broken by lower rank, then lower expert).
// Threads: everything here is stateless and thread-safe; a PlacementIndex is immutable.
//
//   PlacementInput in{.moe_layers = {0, 1, 2, 3}, .num_experts = 64,
//                     .expert_bytes = {3u << 20},
//                     .ranks = {{0, 18}, {1, 18}, {2, 18}, {3, 18}},
//                     .redundant_slots = 8, .epoch = 1};
//   MOE_ASSIGN_OR_RETURN(PlacementTable table, InitialPlacement(in));
//   MOE_ASSIGN_OR_RETURN(PlacementIndex index, PlacementIndex::Build(table));
//   for (const Replica& r : index.Replicas(/*layer=*/2, /*expert=*/17)) { ... r.rank, r.slot }
//
//   LoadStats load = ...;  // tokens per (layer, expert) over the last window
//   MOE_ASSIGN_OR_RETURN(RebalanceResult next,
//                        Rebalance(load, {.ranks = alive, .redundant_slots = 8}, table));
//   // next.table.epoch() == table.epoch() + 1; next.moved_replicas weights to load.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/statusor.h"
#include "moe/v1/internal.pb.h"

namespace moe::scheduler {

using ::moe::internal::v1::PlacementTable;

// An expert rank and the slots per MoE layer it offers.
struct RankSlots {
  int32_t rank = 0;
  int32_t num_slots = 0;
};

struct PlacementInput {
  // Decoder layer ids of the MoE layers; unique (any order; the table lists them ascending).
  std::vector<int32_t> moe_layers;
  // Routed experts per MoE layer, > 0.
  int32_t num_experts = 0;
  // Parameter bytes of one expert: one value per MoE layer (same order as moe_layers), or a
  // single value for every layer, or empty (all experts weigh the same). Only balances the
  // bytes each rank holds; never changes which replicas exist.
  std::vector<uint64_t> expert_bytes;
  // Expert ranks with their slots per layer; rank ids unique and >= 0 (need not be
  // contiguous: a dead rank is simply absent). Slot counts may differ between ranks.
  std::vector<RankSlots> ranks;
  // Extra replicas per MoE layer over all ranks (see the header comment), >= 0.
  int32_t redundant_slots = 0;
  uint64_t epoch = 1;
};

// The first table, without load statistics: every expert gets one replica, then the
// redundant replicas go round robin over the experts (fewest replicas first, lower id first)
// and every replica goes to the rank holding the fewest parameter bytes so far (over all
// layers) that has a free slot and no replica of that expert. A rank never exceeds its slots.
// InvalidArgument naming the field when the input is malformed (no ranks, no layers,
// duplicate ids, negative counts) or when the slots cannot hold every expert plus the
// redundant replicas (e.g. "ranks: 2 ranks with 16 slots in all cannot hold 64 experts + 0
// redundant replicas per layer").
absl::StatusOr<PlacementTable> InitialPlacement(const PlacementInput& input);

// Load per logical expert over a window, e.g. routed tokens.
struct LoadStats {
  // layer id -> load of each logical expert [num_experts]. A layer of the table that is
  // missing here counts as uniform load.
  std::map<int32_t, std::vector<double>> expert_load;
};

// The ranks a rebalance may use.
struct Topology {
  // Alive expert ranks and their slots per layer. Replicas of `current` on other ranks are
  // dropped (their experts are re-replicated).
  std::vector<RankSlots> ranks;
  // Extra replicas per MoE layer over all ranks; fewer are placed when the slots or the
  // rule "replicas of one expert on different ranks" do not allow more.
  int32_t redundant_slots = 0;
  // Keep a replica on its current rank when that rank's load stays within
  // mean * (1 + stickiness) (or the greedy packing's max, whichever is larger). 0 = balance
  // only, moves be damned.
  double stickiness = 0.05;
};

struct LayerRebalance {
  int32_t layer = 0;
  // Max over ranks of the rank's load divided by the mean over ranks, before (the current
  // table under this load, dead ranks' replicas dropped) and after. 1.0 = perfect.
  double imbalance_before = 0.0;
  double imbalance_after = 0.0;
  int64_t moved_replicas = 0;
};

struct RebalanceResult {
  // epoch = current.epoch() + 1.
  PlacementTable table;
  // Replicas of the new table that are not in the current one at the same (rank, layer,
  // expert): the weights to load.
  int64_t moved_replicas = 0;
  // Worst layer's max/mean rank load, before and after.
  double imbalance_before = 0.0;
  double imbalance_after = 0.0;
  std::vector<LayerRebalance> layers;
};

// EPLB-family rebalance of `current` (see the header comment). Per MoE layer of `current`:
// replicate the heaviest experts (by load per replica) into the redundant slots, then pack
// the replicas onto ranks largest-first, each onto the least-loaded rank with a free slot
// and no replica of that expert, preferring the rank that already holds it when that keeps
// the balance (Topology::stickiness). A replica that stays keeps its slot index.
// InvalidArgument when `current` is malformed, a load vector has the wrong length or a
// negative entry, or topology.ranks is empty; ResourceExhausted when the ranks' slots cannot
// hold one replica of every expert ("not enough capacity: ...").
absl::StatusOr<RebalanceResult> Rebalance(const LoadStats& load, const Topology& topology,
                                          const PlacementTable& current);

// Max over ranks / mean over ranks of the load each rank carries under `table` in `layer`
// (an expert's load is split evenly over its replicas); 0 when the layer has no load.
double LayerImbalance(const PlacementTable& table, int32_t layer, const std::vector<double>& load);

struct Replica {
  int32_t rank = 0;
  int32_t slot = 0;
  bool operator==(const Replica&) const = default;
};

struct SlotAssignment {
  int32_t layer = 0;
  int32_t slot = 0;
  int32_t expert = 0;
  bool operator==(const SlotAssignment&) const = default;
};

// Lookups over one table: per (layer, expert) its replicas, per rank what each slot holds.
// Immutable once built; cheap to copy around by shared_ptr.
class PlacementIndex {
 public:
  // Checks the table's invariants (experts 0..n-1 per layer each with >= 1 replica, replicas
  // of an expert on distinct ranks, slot < the rank's slot count, no slot used twice) and
  // builds the lookups. InvalidArgument naming the layer/expert/rank on a violation.
  static absl::StatusOr<PlacementIndex> Build(const PlacementTable& table);

  uint64_t epoch() const { return epoch_; }
  // MoE layer ids, ascending.
  const std::vector<int32_t>& layers() const { return layers_; }
  // Ranks that hold at least one replica, ascending.
  const std::vector<int32_t>& ranks() const { return ranks_; }
  int32_t num_experts(int32_t layer) const;
  // Replicas of (layer, expert), in table order; empty when unknown.
  const std::vector<Replica>& Replicas(int32_t layer, int32_t expert) const;
  // Slot -> expert of `rank` in `layer` ([num_slots of rank]; -1 = empty); empty when unknown.
  const std::vector<int32_t>& SlotExperts(int32_t rank, int32_t layer) const;
  // Every occupied slot of `rank`, by layer then slot.
  std::vector<SlotAssignment> SlotsOfRank(int32_t rank) const;
  // Slots per layer of `rank` in the table (0 when it has none).
  int32_t NumSlots(int32_t rank) const;

 private:
  uint64_t epoch_ = 0;
  std::vector<int32_t> layers_;
  std::vector<int32_t> ranks_;
  std::map<int32_t, std::vector<std::vector<Replica>>> replicas_;            // layer -> [expert]
  std::map<int32_t, std::map<int32_t, std::vector<int32_t>>> slot_experts_;  // rank -> layer -> [slot]
  std::map<int32_t, int32_t> num_slots_;                                     // rank -> slots
};

}  // namespace moe::scheduler
