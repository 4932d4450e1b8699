// PlacementIndex: the placement table (proto PlacementTable, computed by the scheduler) in the
// two shapes the data plane looks it up by:
//   - attention side: (layer, logical expert) -> replicas [(rank, slot), ...]
//   - expert side:    (rank, layer, slot)     -> logical expert (or -1 for an empty slot)
//
// Slots are per MoE layer: slot s of rank r at layer l holds one logical expert of layer l,
// s in [0, slots_per_rank). Load reports (LoadReport.slot_tokens) flatten (layer, slot) as
// moe_layer_ordinal * slots_per_rank + slot, MoE layers in increasing layer order
// (SlotTokenIndex).
//
// Contract: Build validates the table against the model (every MoE layer present once, every
// logical expert with at least one replica, ranks in [0, num_ranks), slots in
// [0, slots_per_rank), no slot holding two experts) and returns kInvalidArgument naming the
// layer/expert otherwise. Immutable afterwards; any thread may read it.
//
// RoundRobinPlacement is the static policy (expert e of every layer on rank e % R; without
// extra replicas in slot e / R) plus optional extra replicas on the following ranks (each
// rank's slots are then handed out in expert order): it serves tests, the embedded default
// and a rank started without a scheduler. The scheduler's own policies live in scheduler/.
//
//   MOE_ASSIGN_OR_RETURN(PlacementTable table, RoundRobinPlacement(config, {.num_ranks = 2}));
//   MOE_ASSIGN_OR_RETURN(PlacementIndex index, PlacementIndex::Build(table, config));
//   for (const Replica& r : index.replicas(/*layer=*/1, /*expert=*/5)) { ... r.rank, r.slot }
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model_config.h"
#include "moe/v1/internal.pb.h"

namespace moe::worker {

using PlacementTable = ::moe::internal::v1::PlacementTable;

struct Replica {
  int32_t rank = 0;
  int32_t slot = 0;
};

class PlacementIndex {
 public:
  static absl::StatusOr<PlacementIndex> Build(const PlacementTable& table,
                                              const model::ModelConfig& config);

  uint64_t epoch() const { return epoch_; }
  int num_ranks() const { return num_ranks_; }
  int slots_per_rank() const { return slots_per_rank_; }
  int num_layers() const { return static_cast<int>(layer_ordinal_.size()); }
  // The MoE layers, increasing.
  const std::vector<int>& moe_layers() const { return moe_layers_; }
  bool is_moe_layer(int layer) const {
    return layer >= 0 && layer < num_layers() && layer_ordinal_[layer] >= 0;
  }
  // Replicas of `expert` at MoE layer `layer` (at least one). Requires is_moe_layer(layer).
  const std::vector<Replica>& replicas(int layer, int expert) const {
    return replicas_[layer_ordinal_[layer]][expert];
  }
  // Logical expert in (rank, layer, slot), -1 when the slot is empty. [slots_per_rank].
  const std::vector<int32_t>& rank_slots(int rank, int layer) const {
    return slot_expert_[rank][layer_ordinal_[layer]];
  }
  // Index of (layer, slot) in LoadReport.slot_tokens.
  int64_t SlotTokenIndex(int layer, int slot) const {
    return static_cast<int64_t>(layer_ordinal_[layer]) * slots_per_rank_ + slot;
  }

 private:
  uint64_t epoch_ = 0;
  int num_ranks_ = 0;
  int slots_per_rank_ = 0;
  std::vector<int> moe_layers_;
  std::vector<int> layer_ordinal_;                         // [num_layers], -1 = dense
  std::vector<std::vector<std::vector<Replica>>> replicas_;  // [moe layer][expert][replica]
  std::vector<std::vector<std::vector<int32_t>>> slot_expert_;  // [rank][moe layer][slot]
};

struct RoundRobinOptions {
  int num_ranks = 1;
  // Slots per rank per layer; 0 = just enough for the experts plus the extra replicas.
  int slots_per_rank = 0;
  uint64_t epoch = 1;
  // Extra replicas: (layer, expert) pairs, each adding one more replica on the next rank
  // that does not hold the expert yet (layer -1 = every MoE layer).
  std::vector<std::pair<int, int>> extra_replicas;
};

absl::StatusOr<PlacementTable> RoundRobinPlacement(const model::ModelConfig& config,
                                                   const RoundRobinOptions& options);

}  // namespace moe::worker
