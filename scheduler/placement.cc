#include "scheduler/placement.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

namespace moe::scheduler {
namespace {

using ::moe::internal::v1::ExpertPlacement;
using ::moe::internal::v1::LayerPlacement;

absl::Status ValidateRanks(const std::vector<RankSlots>& ranks, const char* field) {
  if (ranks.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": no expert ranks"));
  }
  std::set<int32_t> seen;
  for (const RankSlots& r : ranks) {
    if (r.rank < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": rank ", r.rank, " is negative"));
    }
    if (r.num_slots < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": rank ", r.rank, " has ", r.num_slots, " slots"));
    }
    if (!seen.insert(r.rank).second) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": rank ", r.rank, " appears twice"));
    }
  }
  return absl::OkStatus();
}

std::vector<RankSlots> SortedRanks(std::vector<RankSlots> ranks) {
  std::sort(ranks.begin(), ranks.end(),
            [](const RankSlots& a, const RankSlots& b) { return a.rank < b.rank; });
  return ranks;
}

int64_t TotalSlots(const std::vector<RankSlots>& ranks) {
  int64_t total = 0;
  for (const RankSlots& r : ranks) total += r.num_slots;
  return total;
}

// Fills num_ranks, slots_per_rank and rank_slots of `table` for `ranks`.
void SetTopology(const std::vector<RankSlots>& ranks, int32_t min_num_ranks,
                 PlacementTable* table) {
  int32_t num_ranks = min_num_ranks;
  int32_t max_slots = 0;
  for (const RankSlots& r : ranks) {
    num_ranks = std::max(num_ranks, r.rank + 1);
    max_slots = std::max(max_slots, r.num_slots);
  }
  table->set_num_ranks(num_ranks);
  table->set_slots_per_rank(max_slots);
  table->clear_rank_slots();
  for (int32_t i = 0; i < num_ranks; ++i) table->add_rank_slots(0);
  for (const RankSlots& r : ranks) table->set_rank_slots(r.rank, r.num_slots);
}

// One layer being built: per rank (index into the sorted rank list) its slots.
struct LayerBuild {
  explicit LayerBuild(const std::vector<RankSlots>& ranks, int32_t num_experts)
      : slots(ranks.size()), holds(ranks.size(), std::vector<bool>(num_experts, false)),
        replicas(num_experts) {
    for (size_t i = 0; i < ranks.size(); ++i) slots[i].assign(ranks[i].num_slots, -1);
  }
  // [rank index][slot] -> expert, -1 = empty
  std::vector<std::vector<int32_t>> slots;
  // [rank index][expert]
  std::vector<std::vector<bool>> holds;
  // [expert] -> rank indices
  std::vector<std::vector<size_t>> replicas;

  int32_t Used(size_t r) const {
    return static_cast<int32_t>(
        std::count_if(slots[r].begin(), slots[r].end(), [](int32_t e) { return e >= 0; }));
  }
  bool Free(size_t r) const { return Used(r) < static_cast<int32_t>(slots[r].size()); }
  // Puts `expert` on rank index r at `slot`, or the lowest free slot when slot < 0.
  void Put(size_t r, int32_t expert, int32_t slot = -1) {
    if (slot < 0) {
      slot = static_cast<int32_t>(std::find(slots[r].begin(), slots[r].end(), -1) -
                                  slots[r].begin());
    }
    slots[r][slot] = expert;
    holds[r][expert] = true;
    replicas[expert].push_back(r);
  }
};

void EmitLayer(int32_t layer, const LayerBuild& build, const std::vector<RankSlots>& ranks,
               PlacementTable* table) {
  LayerPlacement* out = table->add_layers();
  out->set_layer(layer);
  const int32_t num_experts = static_cast<int32_t>(build.replicas.size());
  std::vector<std::vector<std::pair<int32_t, int32_t>>> locations(num_experts);
  for (size_t r = 0; r < build.slots.size(); ++r) {
    for (size_t s = 0; s < build.slots[r].size(); ++s) {
      const int32_t e = build.slots[r][s];
      if (e >= 0) locations[e].push_back({ranks[r].rank, static_cast<int32_t>(s)});
    }
  }
  for (int32_t e = 0; e < num_experts; ++e) {
    ExpertPlacement* expert = out->add_experts();
    expert->set_expert(e);
    for (const auto& [rank, slot] : locations[e]) {  // ascending rank
      auto* replica = expert->add_replicas();
      replica->set_rank(rank);
      replica->set_slot(slot);
    }
  }
}

// Per-rank load of `layer` in `table` under `load` (split evenly over replicas).
std::map<int32_t, double> RankLoads(const LayerPlacement& layer, const std::vector<double>& load) {
  std::map<int32_t, double> out;
  for (const ExpertPlacement& e : layer.experts()) {
    if (e.replicas_size() == 0 || e.expert() < 0 ||
        static_cast<size_t>(e.expert()) >= load.size()) {
      continue;
    }
    const double share = load[e.expert()] / e.replicas_size();
    for (const auto& r : e.replicas()) out[r.rank()] += share;
  }
  return out;
}

double MaxOverMean(const std::vector<double>& loads) {
  if (loads.empty()) return 0.0;
  const double total = std::accumulate(loads.begin(), loads.end(), 0.0);
  if (total <= 0.0) return 0.0;
  return *std::max_element(loads.begin(), loads.end()) / (total / loads.size());
}

}  // namespace

absl::StatusOr<PlacementTable> InitialPlacement(const PlacementInput& input) {
  if (input.moe_layers.empty()) {
    return absl::InvalidArgumentError("moe_layers: no MoE layers");
  }
  std::vector<int32_t> layers = input.moe_layers;
  for (int32_t l : layers) {
    if (l < 0) return absl::InvalidArgumentError(absl::StrCat("moe_layers: layer ", l, " is negative"));
  }
  if (input.num_experts <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_experts: must be > 0, got ", input.num_experts));
  }
  if (!input.expert_bytes.empty() && input.expert_bytes.size() != 1 &&
      input.expert_bytes.size() != input.moe_layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert_bytes: ", input.expert_bytes.size(), " values for ", input.moe_layers.size(),
        " MoE layers (give one per layer, one for all, or none)"));
  }
  MOE_RETURN_IF_ERROR(ValidateRanks(input.ranks, "ranks"));
  if (input.redundant_slots < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("redundant_slots: must be >= 0, got ", input.redundant_slots));
  }
  std::map<int32_t, uint64_t> bytes_of_layer;
  for (size_t i = 0; i < input.moe_layers.size(); ++i) {
    uint64_t bytes = 1;
    if (input.expert_bytes.size() == 1) bytes = input.expert_bytes[0];
    if (input.expert_bytes.size() > 1) bytes = input.expert_bytes[i];
    if (!bytes_of_layer.emplace(input.moe_layers[i], bytes).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("moe_layers: layer ", input.moe_layers[i], " appears twice"));
    }
  }
  const std::vector<RankSlots> ranks = SortedRanks(input.ranks);
  const int64_t num_ranks = static_cast<int64_t>(ranks.size());
  const int64_t total_slots = TotalSlots(ranks);
  const int64_t needed = static_cast<int64_t>(input.num_experts) + input.redundant_slots;
  if (total_slots < needed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ranks: ", num_ranks, " ranks with ", total_slots, " slots per layer in all cannot hold ",
        input.num_experts, " experts + ", input.redundant_slots, " redundant replicas per layer"));
  }
  if (input.redundant_slots > static_cast<int64_t>(input.num_experts) * (num_ranks - 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redundant_slots: ", input.redundant_slots, " replicas per layer, but ",
        input.num_experts, " experts on ", num_ranks,
        " ranks allow at most one replica per expert and rank (",
        static_cast<int64_t>(input.num_experts) * (num_ranks - 1), " redundant)"));
  }

  PlacementTable table;
  table.set_epoch(input.epoch);
  SetTopology(ranks, 0, &table);
  std::vector<double> rank_bytes(ranks.size(), 0.0);
  const int32_t num_experts = input.num_experts;
  int32_t layer_index = 0;
  for (const auto& [layer, bytes] : bytes_of_layer) {  // ascending layer id
    LayerBuild build(ranks, num_experts);
    std::vector<int32_t> used(ranks.size(), 0);
    // The rank with the fewest bytes so far (then fewest replicas in this layer, then lowest
    // id) among those with a free slot that `ok` accepts.
    auto pick = [&](auto ok) -> int64_t {
      int64_t best = -1;
      for (size_t r = 0; r < ranks.size(); ++r) {
        if (used[r] >= ranks[r].num_slots || !ok(r)) continue;
        if (best < 0 || std::tie(rank_bytes[r], used[r]) <
                            std::tie(rank_bytes[best], used[best])) {
          best = static_cast<int64_t>(r);
        }
      }
      return best;
    };
    auto place = [&](size_t r, int32_t e) {
      build.Put(r, e);
      ++used[r];
      rank_bytes[r] += static_cast<double>(bytes);
    };
    for (int32_t e = 0; e < num_experts; ++e) {
      const int64_t r = pick([](size_t) { return true; });
      MOE_CHECK(r >= 0) << "slots were counted above";
      place(static_cast<size_t>(r), e);
    }
    // Redundant replicas: rotate the starting expert per layer so that the replicated experts
    // differ between layers.
    const int32_t offset =
        static_cast<int32_t>((static_cast<int64_t>(layer_index) * input.redundant_slots) %
                             num_experts);
    for (int32_t k = 0; k < input.redundant_slots; ++k) {
      const int64_t r = pick([&](size_t r) {
        return std::find(build.holds[r].begin(), build.holds[r].end(), false) !=
               build.holds[r].end();
      });
      if (r < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "redundant_slots: cannot place ", input.redundant_slots,
            " redundant replicas in layer ", layer,
            ": the ranks with free slots already hold every expert"));
      }
      int32_t best = -1;
      for (int32_t i = 0; i < num_experts; ++i) {
        const int32_t e = (offset + i) % num_experts;
        if (build.holds[r][e]) continue;
        if (best < 0 || build.replicas[e].size() < build.replicas[best].size()) best = e;
      }
      place(static_cast<size_t>(r), best);
    }
    EmitLayer(layer, build, ranks, &table);
    ++layer_index;
  }
  return table;
}

double LayerImbalance(const PlacementTable& table, int32_t layer,
                      const std::vector<double>& load) {
  for (const LayerPlacement& l : table.layers()) {
    if (l.layer() != layer) continue;
    std::map<int32_t, double> per_rank = RankLoads(l, load);
    // Ranks with slots but no replica carry zero load and still count in the mean.
    for (int32_t r = 0; r < table.rank_slots_size(); ++r) {
      if (table.rank_slots(r) > 0) per_rank.emplace(r, 0.0);
    }
    std::vector<double> loads;
    for (const auto& [rank, value] : per_rank) loads.push_back(value);
    return MaxOverMean(loads);
  }
  return 0.0;
}

namespace {

struct PackItem {
  double weight = 0.0;
  int32_t expert = 0;
  int32_t copy = 0;  // 0 = the expert's first replica
};

struct PackResult {
  bool ok = false;
  LayerBuild build;
  std::vector<double> rank_load;
  double max_load = 0.0;
};

// Greedy largest-first packing. `sticky_threshold` < 0 disables stickiness.
// current_slot[r][e] = slot of e on rank index r in the current table, -1 if none.
PackResult Pack(const std::vector<PackItem>& items, const std::vector<RankSlots>& ranks,
                int32_t num_experts, const std::vector<std::vector<int32_t>>& current_slot,
                double sticky_threshold) {
  PackResult result{.build = LayerBuild(ranks, num_experts),
                    .rank_load = std::vector<double>(ranks.size(), 0.0)};
  LayerBuild& build = result.build;
  std::vector<int32_t> used(ranks.size(), 0);
  // Which replicas end up where; slots are assigned afterwards so staying replicas keep theirs.
  std::vector<std::vector<int32_t>> chosen(ranks.size());
  constexpr double kEps = 1e-9;
  for (const PackItem& item : items) {
    int64_t best = -1;
    auto better = [&](size_t r) {
      return best < 0 || result.rank_load[r] < result.rank_load[best] - kEps ||
             (std::abs(result.rank_load[r] - result.rank_load[best]) <= kEps &&
              used[r] < used[best]);
    };
    if (sticky_threshold >= 0) {
      for (size_t r = 0; r < ranks.size(); ++r) {
        if (current_slot[r][item.expert] < 0 || build.holds[r][item.expert] ||
            used[r] >= ranks[r].num_slots ||
            result.rank_load[r] + item.weight > sticky_threshold + kEps) {
          continue;
        }
        if (better(r)) best = static_cast<int64_t>(r);
      }
    }
    if (best < 0) {
      for (size_t r = 0; r < ranks.size(); ++r) {
        if (build.holds[r][item.expert] || used[r] >= ranks[r].num_slots) continue;
        if (better(r)) best = static_cast<int64_t>(r);
      }
    }
    if (best < 0) {
      if (item.copy == 0) return result;  // cannot happen while total slots >= experts
      continue;                           // drop a redundant replica that fits nowhere
    }
    build.holds[best][item.expert] = true;
    ++used[best];
    chosen[best].push_back(item.expert);
    result.rank_load[best] += item.weight;
  }
  // Slots: staying replicas keep their slot, new ones take the lowest free slot.
  for (size_t r = 0; r < ranks.size(); ++r) {
    std::fill(build.holds[r].begin(), build.holds[r].end(), false);
    std::vector<int32_t> fresh;
    for (int32_t e : chosen[r]) {
      const int32_t slot = current_slot[r][e];
      if (slot >= 0 && slot < ranks[r].num_slots && build.slots[r][slot] < 0) {
        build.Put(r, e, slot);
      } else {
        fresh.push_back(e);
      }
    }
    for (int32_t e : fresh) build.Put(r, e);
  }
  result.ok = true;
  result.max_load = result.rank_load.empty()
                        ? 0.0
                        : *std::max_element(result.rank_load.begin(), result.rank_load.end());
  return result;
}

}  // namespace

absl::StatusOr<RebalanceResult> Rebalance(const LoadStats& load, const Topology& topology,
                                          const PlacementTable& current) {
  MOE_RETURN_IF_ERROR(ValidateRanks(topology.ranks, "topology.ranks"));
  if (topology.redundant_slots < 0) {
    return absl::InvalidArgumentError(absl::StrCat("topology.redundant_slots: must be >= 0, got ",
                                                   topology.redundant_slots));
  }
  if (!(topology.stickiness >= 0)) {
    return absl::InvalidArgumentError("topology.stickiness: must be >= 0");
  }
  MOE_ASSIGN_OR_RETURN(PlacementIndex index, PlacementIndex::Build(current));
  if (index.layers().empty()) {
    return absl::InvalidArgumentError("current: the table has no layers");
  }
  const std::vector<RankSlots> ranks = SortedRanks(topology.ranks);
  const int64_t total_slots = TotalSlots(ranks);
  for (const auto& [layer, values] : load.expert_load) {
    if (index.num_experts(layer) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("load: layer ", layer, " is not a MoE layer of the table"));
    }
    if (values.size() != static_cast<size_t>(index.num_experts(layer))) {
      return absl::InvalidArgumentError(absl::StrCat("load: layer ", layer, " has ", values.size(),
                                                     " values for ", index.num_experts(layer),
                                                     " experts"));
    }
    for (double v : values) {
      if (!(v >= 0) || std::isinf(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("load: layer ", layer, " has a negative or non-finite value"));
      }
    }
  }

  RebalanceResult result;
  PlacementTable& table = result.table;
  table.set_epoch(current.epoch() + 1);
  SetTopology(ranks, current.num_ranks(), &table);
  // The current table as the surviving ranks see it, for "before".
  PlacementTable survivors = current;
  SetTopology(ranks, current.num_ranks(), &survivors);
  std::map<int32_t, size_t> rank_index;
  for (size_t i = 0; i < ranks.size(); ++i) rank_index[ranks[i].rank] = i;
  for (LayerPlacement& l : *survivors.mutable_layers()) {
    for (ExpertPlacement& e : *l.mutable_experts()) {
      auto* reps = e.mutable_replicas();
      reps->erase(std::remove_if(reps->begin(), reps->end(),
                                 [&](const auto& r) { return !rank_index.contains(r.rank()); }),
                  reps->end());
    }
  }

  for (int32_t layer : index.layers()) {
    const int32_t num_experts = index.num_experts(layer);
    if (total_slots < num_experts) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "not enough capacity: ", ranks.size(), " expert ranks with ", total_slots,
          " slots per layer in all cannot hold the ", num_experts, " experts of layer ", layer));
    }
    std::vector<double> expert_load(num_experts, 1.0);
    if (auto it = load.expert_load.find(layer); it != load.expert_load.end()) {
      if (std::accumulate(it->second.begin(), it->second.end(), 0.0) > 0) expert_load = it->second;
    }
    // Replicate: one replica each, then the heaviest load per replica gets the next one.
    const int64_t budget = std::min<int64_t>(total_slots, num_experts + topology.redundant_slots);
    std::vector<int32_t> count(num_experts, 1);
    for (int64_t k = num_experts; k < budget; ++k) {
      int32_t best = -1;
      for (int32_t e = 0; e < num_experts; ++e) {
        if (count[e] >= static_cast<int32_t>(ranks.size())) continue;
        if (best < 0 || expert_load[e] / count[e] > expert_load[best] / count[best]) best = e;
      }
      if (best < 0) break;
      ++count[best];
    }
    std::vector<PackItem> items;
    for (int32_t e = 0; e < num_experts; ++e) {
      for (int32_t c = 0; c < count[e]; ++c) {
        items.push_back({.weight = expert_load[e] / count[e], .expert = e, .copy = c});
      }
    }
    std::stable_sort(items.begin(), items.end(), [](const PackItem& a, const PackItem& b) {
      return std::tie(b.weight, a.copy) < std::tie(a.weight, b.copy);
    });
    std::vector<std::vector<int32_t>> current_slot(ranks.size(),
                                                   std::vector<int32_t>(num_experts, -1));
    for (int32_t e = 0; e < num_experts; ++e) {
      for (const Replica& r : index.Replicas(layer, e)) {
        if (auto it = rank_index.find(r.rank); it != rank_index.end()) {
          current_slot[it->second][e] = r.slot;
        }
      }
    }
    PackResult balanced = Pack(items, ranks, num_experts, current_slot, -1.0);
    if (!balanced.ok) {
      return absl::InternalError(absl::StrCat("packing layer ", layer, " failed"));
    }
    const double total = std::accumulate(expert_load.begin(), expert_load.end(), 0.0);
    const double mean = total / static_cast<double>(ranks.size());
    const double threshold = std::max(balanced.max_load, mean * (1.0 + topology.stickiness));
    PackResult sticky = Pack(items, ranks, num_experts, current_slot, threshold);
    const PackResult& chosen =
        (sticky.ok && sticky.max_load <= threshold * (1.0 + 1e-9)) ? sticky : balanced;
    EmitLayer(layer, chosen.build, ranks, &table);

    LayerRebalance numbers{.layer = layer};
    numbers.imbalance_before = LayerImbalance(survivors, layer, expert_load);
    numbers.imbalance_after = LayerImbalance(table, layer, expert_load);
    for (size_t r = 0; r < ranks.size(); ++r) {
      for (int32_t e = 0; e < num_experts; ++e) {
        if (chosen.build.holds[r][e] && current_slot[r][e] < 0) ++numbers.moved_replicas;
      }
    }
    result.moved_replicas += numbers.moved_replicas;
    result.imbalance_before = std::max(result.imbalance_before, numbers.imbalance_before);
    result.imbalance_after = std::max(result.imbalance_after, numbers.imbalance_after);
    result.layers.push_back(numbers);
  }
  return result;
}

absl::StatusOr<PlacementIndex> PlacementIndex::Build(const PlacementTable& table) {
  PlacementIndex index;
  index.epoch_ = table.epoch();
  if (table.rank_slots_size() > 0 && table.rank_slots_size() != table.num_ranks()) {
    return absl::InvalidArgumentError(absl::StrCat("placement: rank_slots has ",
                                                   table.rank_slots_size(), " entries for ",
                                                   table.num_ranks(), " ranks"));
  }
  auto slots_of = [&](int32_t rank) {
    return table.rank_slots_size() > 0 ? table.rank_slots(rank) : table.slots_per_rank();
  };
  for (const LayerPlacement& layer : table.layers()) {
    const int32_t id = layer.layer();
    if (index.replicas_.contains(id)) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", id, " appears twice"));
    }
    const int32_t num_experts = layer.experts_size();
    std::vector<std::vector<Replica>>& replicas = index.replicas_[id];
    replicas.resize(num_experts);
    std::vector<bool> seen(num_experts, false);
    for (const ExpertPlacement& expert : layer.experts()) {
      const int32_t e = expert.expert();
      if (e < 0 || e >= num_experts || seen[e]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement: layer ", id, " lists expert ", e, " out of range or twice (experts are 0..",
            num_experts - 1, ")"));
      }
      seen[e] = true;
      if (expert.replicas_size() == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", id, " expert ", e, " has no replica"));
      }
      std::set<int32_t> ranks;
      for (const auto& r : expert.replicas()) {
        if (r.rank() < 0 || r.rank() >= table.num_ranks()) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layer ", id, " expert ", e,
                                                         " on rank ", r.rank(), " of ",
                                                         table.num_ranks()));
        }
        if (r.slot() < 0 || r.slot() >= slots_of(r.rank())) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layer ", id, " expert ", e,
                                                         " in slot ", r.slot(), " of rank ",
                                                         r.rank(), " which has ",
                                                         slots_of(r.rank()), " slots"));
        }
        if (!ranks.insert(r.rank()).second) {
          return absl::InvalidArgumentError(absl::StrCat(
              "placement: layer ", id, " expert ", e, " has two replicas on rank ", r.rank()));
        }
        std::vector<int32_t>& slots = index.slot_experts_[r.rank()][id];
        slots.resize(slots_of(r.rank()), -1);
        if (slots[r.slot()] >= 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "placement: layer ", id, " rank ", r.rank(), " slot ", r.slot(), " holds experts ",
              slots[r.slot()], " and ", e));
        }
        slots[r.slot()] = e;
        replicas[e].push_back({.rank = r.rank(), .slot = r.slot()});
      }
    }
    index.layers_.push_back(id);
  }
  std::sort(index.layers_.begin(), index.layers_.end());
  for (auto& [rank, layers] : index.slot_experts_) {
    index.ranks_.push_back(rank);
    index.num_slots_[rank] = slots_of(rank);
    // A rank holding nothing in some layer still has its (empty) slots there.
    for (int32_t layer : index.layers_) layers[layer].resize(slots_of(rank), -1);
  }
  return index;
}

int32_t PlacementIndex::num_experts(int32_t layer) const {
  auto it = replicas_.find(layer);
  return it == replicas_.end() ? 0 : static_cast<int32_t>(it->second.size());
}

const std::vector<Replica>& PlacementIndex::Replicas(int32_t layer, int32_t expert) const {
  static const std::vector<Replica> kNone;
  auto it = replicas_.find(layer);
  if (it == replicas_.end() || expert < 0 || static_cast<size_t>(expert) >= it->second.size()) {
    return kNone;
  }
  return it->second[expert];
}

const std::vector<int32_t>& PlacementIndex::SlotExperts(int32_t rank, int32_t layer) const {
  static const std::vector<int32_t> kNone;
  auto it = slot_experts_.find(rank);
  if (it == slot_experts_.end()) return kNone;
  auto jt = it->second.find(layer);
  return jt == it->second.end() ? kNone : jt->second;
}

std::vector<SlotAssignment> PlacementIndex::SlotsOfRank(int32_t rank) const {
  std::vector<SlotAssignment> out;
  auto it = slot_experts_.find(rank);
  if (it == slot_experts_.end()) return out;
  for (const auto& [layer, slots] : it->second) {
    for (size_t s = 0; s < slots.size(); ++s) {
      if (slots[s] >= 0) {
        out.push_back({.layer = layer, .slot = static_cast<int32_t>(s), .expert = slots[s]});
      }
    }
  }
  return out;
}

int32_t PlacementIndex::NumSlots(int32_t rank) const {
  auto it = num_slots_.find(rank);
  return it == num_slots_.end() ? 0 : it->second;
}

}  // namespace moe::scheduler
