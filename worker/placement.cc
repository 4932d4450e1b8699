#include "worker/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe::worker {

absl::StatusOr<PlacementIndex> PlacementIndex::Build(const PlacementTable& table,
                                                     const model::ModelConfig& config) {
  PlacementIndex index;
  index.epoch_ = table.epoch();
  index.num_ranks_ = table.num_ranks();
  index.slots_per_rank_ = table.slots_per_rank();
  if (index.num_ranks_ <= 0 || index.slots_per_rank_ <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement epoch ", table.epoch(), ": num_ranks (", index.num_ranks_,
        ") and slots_per_rank (", index.slots_per_rank_, ") must be > 0"));
  }
  const int num_experts = config.moe.num_experts;
  index.layer_ordinal_.assign(config.num_layers, -1);
  for (int l = 0; l < config.num_layers; ++l) {
    if (config.IsMoeLayer(l)) {
      index.layer_ordinal_[l] = static_cast<int>(index.moe_layers_.size());
      index.moe_layers_.push_back(l);
    }
  }
  const size_t num_moe = index.moe_layers_.size();
  index.replicas_.assign(num_moe, std::vector<std::vector<Replica>>(num_experts));
  index.slot_expert_.assign(
      index.num_ranks_,
      std::vector<std::vector<int32_t>>(num_moe, std::vector<int32_t>(index.slots_per_rank_, -1)));
  std::vector<bool> seen(num_moe, false);
  for (const auto& lp : table.layers()) {
    const int l = lp.layer();
    if (l < 0 || l >= config.num_layers || index.layer_ordinal_[l] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("placement epoch ", table.epoch(),
                                                     ": layer ", l, " is not a MoE layer"));
    }
    const int ord = index.layer_ordinal_[l];
    if (seen[ord]) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement epoch ", table.epoch(), ": layer ", l, " appears twice"));
    }
    seen[ord] = true;
    for (const auto& ep : lp.experts()) {
      const int e = ep.expert();
      if (e < 0 || e >= num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("placement epoch ", table.epoch(),
                                                       ": layer ", l, " expert ", e,
                                                       " is outside [0, ", num_experts, ")"));
      }
      for (const auto& r : ep.replicas()) {
        if (r.rank() < 0 || r.rank() >= index.num_ranks_ || r.slot() < 0 ||
            r.slot() >= index.slots_per_rank_) {
          return absl::InvalidArgumentError(absl::StrCat(
              "placement epoch ", table.epoch(), ": layer ", l, " expert ", e, " replica (rank ",
              r.rank(), ", slot ", r.slot(), ") is outside ", index.num_ranks_, " ranks x ",
              index.slots_per_rank_, " slots"));
        }
        int32_t& holder = index.slot_expert_[r.rank()][ord][r.slot()];
        if (holder >= 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "placement epoch ", table.epoch(), ": layer ", l, " rank ", r.rank(), " slot ",
              r.slot(), " holds both expert ", holder, " and expert ", e));
        }
        holder = e;
        index.replicas_[ord][e].push_back({r.rank(), r.slot()});
      }
    }
  }
  for (size_t ord = 0; ord < num_moe; ++ord) {
    const int l = index.moe_layers_[ord];
    if (!seen[ord]) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement epoch ", table.epoch(), ": MoE layer ", l, " is missing"));
    }
    for (int e = 0; e < num_experts; ++e) {
      if (index.replicas_[ord][e].empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement epoch ", table.epoch(), ": layer ", l, " expert ", e, " has no replica"));
      }
    }
  }
  return index;
}

absl::StatusOr<PlacementTable> RoundRobinPlacement(const model::ModelConfig& config,
                                                   const RoundRobinOptions& options) {
  const int ranks = options.num_ranks;
  const int num_experts = config.moe.num_experts;
  if (ranks <= 0) return absl::InvalidArgumentError("placement: num_ranks must be > 0");
  if (num_experts <= 0) return absl::InvalidArgumentError("placement: the model has no experts");
  std::vector<int> moe_layers;
  for (int l = 0; l < config.num_layers; ++l) {
    if (config.IsMoeLayer(l)) moe_layers.push_back(l);
  }
  // replicas[ord][e]: ranks in order of creation; slots assigned after.
  std::vector<std::vector<std::vector<int>>> ranks_of(
      moe_layers.size(), std::vector<std::vector<int>>(num_experts));
  for (size_t ord = 0; ord < moe_layers.size(); ++ord) {
    for (int e = 0; e < num_experts; ++e) ranks_of[ord][e].push_back(e % ranks);
  }
  for (const auto& [layer, expert] : options.extra_replicas) {
    if (expert < 0 || expert >= num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: extra replica of expert ", expert, " outside the model"));
    }
    for (size_t ord = 0; ord < moe_layers.size(); ++ord) {
      if (layer >= 0 && moe_layers[ord] != layer) continue;
      std::vector<int>& rs = ranks_of[ord][expert];
      if (static_cast<int>(rs.size()) >= ranks) {
        return absl::InvalidArgumentError(absl::StrCat("placement: expert ", expert,
                                                       " already has a replica on every rank"));
      }
      int r = (rs.back() + 1) % ranks;
      while (std::find(rs.begin(), rs.end(), r) != rs.end()) r = (r + 1) % ranks;
      rs.push_back(r);
    }
  }
  // Slots: per layer, per rank, in order of (expert, replica).
  int needed = 0;
  for (size_t ord = 0; ord < moe_layers.size(); ++ord) {
    std::vector<int> used(ranks, 0);
    for (int e = 0; e < num_experts; ++e) {
      for (int r : ranks_of[ord][e]) needed = std::max(needed, ++used[r]);
    }
  }
  const int slots = options.slots_per_rank > 0 ? options.slots_per_rank : needed;
  if (slots < needed) {
    return absl::InvalidArgumentError(absl::StrCat("placement: ", needed,
                                                   " slots per rank needed, ", slots, " given"));
  }
  PlacementTable table;
  table.set_epoch(options.epoch);
  table.set_num_ranks(ranks);
  table.set_slots_per_rank(slots);
  for (size_t ord = 0; ord < moe_layers.size(); ++ord) {
    auto* lp = table.add_layers();
    lp->set_layer(moe_layers[ord]);
    std::vector<int> used(ranks, 0);
    for (int e = 0; e < num_experts; ++e) {
      auto* ep = lp->add_experts();
      ep->set_expert(e);
      for (int r : ranks_of[ord][e]) {
        auto* rep = ep->add_replicas();
        rep->set_rank(r);
        rep->set_slot(used[r]++);
      }
    }
  }
  return table;
}

}  // namespace moe::worker
