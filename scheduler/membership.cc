#include "scheduler/membership.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

namespace moe::scheduler {
namespace {

const char* RoleName(pb::Role role) {
  switch (role) {
    case pb::ROLE_ATTENTION: return "attention";
    case pb::ROLE_EXPERT: return "expert";
    case pb::ROLE_FRONTEND: return "frontend";
    case pb::ROLE_SCHEDULER: return "scheduler";
    default: return "unspecified";
  }
}

std::map<int32_t, int32_t> ExpectedSlots(const MembershipOptions& options) {
  std::map<int32_t, int32_t> out;
  for (const RankSlots& r : options.expert_ranks) out[r.rank] = r.num_slots;
  return out;
}

// Ranks with slots in `table`.
std::vector<RankSlots> TableRanks(const PlacementTable& table) {
  std::vector<RankSlots> out;
  for (int32_t r = 0; r < table.rank_slots_size(); ++r) {
    if (table.rank_slots(r) > 0) out.push_back({.rank = r, .num_slots = table.rank_slots(r)});
  }
  return out;
}

std::string RankList(const std::vector<int32_t>& ranks) {
  return absl::StrCat("[", absl::StrJoin(ranks, ", "), "]");
}

}  // namespace

std::string Action::ToString() const {
  switch (kind) {
    case Kind::kPrepare: return absl::StrCat("prepare epoch=", epoch, " rank=", rank);
    case Kind::kCommit: return absl::StrCat("commit epoch=", epoch, " rank=", rank);
    case Kind::kPlacementCommitted: return absl::StrCat("committed epoch=", epoch);
    case Kind::kRankDead:
      return absl::StrCat("dead ", RoleName(role), "=", rank, " (", message, ")");
    case Kind::kRankAdmitted:
      return absl::StrCat("admitted ", RoleName(role), "=", rank, " (", message, ")");
    case Kind::kStartupTimeout: return absl::StrCat("startup timeout ranks=", RankList(ranks));
    case Kind::kCapacityError: return absl::StrCat("capacity error (", message, ")");
    case Kind::kRebalance: return absl::StrCat("rebalance epoch=", epoch, " (", message, ")");
    case Kind::kEpochAbandoned:
      return absl::StrCat("abandoned epoch=", epoch, " (", message, ")");
  }
  return "unknown";
}

Membership::Membership(MembershipOptions options)
    : options_(std::move(options)),
      expected_slots_(ExpectedSlots(options_)),
      committed_(std::make_shared<PlacementTable>()) {}

absl::Status Membership::ValidateOptions(const MembershipOptions& options) {
  if (options.expert_ranks.empty()) {
    return absl::InvalidArgumentError("expert_ranks: the deployment has no expert ranks");
  }
  std::map<int32_t, int32_t> seen;
  for (const RankSlots& r : options.expert_ranks) {
    if (r.rank < 0 || r.num_slots < 0 || !seen.emplace(r.rank, r.num_slots).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert_ranks: rank ", r.rank, " is negative, repeated or has ",
                       r.num_slots, " slots"));
    }
  }
  if (options.num_attention_ranks < 0) {
    return absl::InvalidArgumentError("num_attention_ranks: must be >= 0");
  }
  if (options.model.moe_layers.empty() || options.model.num_experts <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model: need MoE layers and experts, got ", options.model.moe_layers.size(),
        " layers and ", options.model.num_experts, " experts"));
  }
  if (options.redundant_slots < 0) {
    return absl::InvalidArgumentError("redundant_slots: must be >= 0");
  }
  if (options.lease_ms <= 0 || options.startup_timeout_ms <= 0 ||
      options.prepare_timeout_ms <= 0) {
    return absl::InvalidArgumentError(
        "lease_ms, startup_timeout_ms, prepare_timeout_ms: must be > 0");
  }
  return absl::OkStatus();
}

void Membership::Start(int64_t now_ms) {
  if (started_) return;
  started_ = true;
  start_ms_ = now_ms;
}

Membership::Member* Membership::FindExpert(int32_t rank) {
  auto it = experts_.find(rank);
  return it == experts_.end() ? nullptr : &it->second;
}

Membership::IdState Membership::Lookup(const std::string& member_id, Member** member) {
  auto it = issued_ids_.find(member_id);
  if (it == issued_ids_.end()) return IdState::kUnknown;
  const auto& [role, rank] = it->second;
  auto& members = role == pb::ROLE_EXPERT ? experts_ : attention_;
  Member& m = members.at(rank);
  *member = &m;
  if (m.member_id != member_id) return IdState::kSuperseded;
  return m.alive ? IdState::kCurrent : IdState::kExpired;
}

std::vector<RankSlots> Membership::AliveExpertRanks() const {
  std::vector<RankSlots> out;
  for (const auto& [rank, m] : experts_) {
    if (m.alive && m.num_slots > 0) out.push_back({.rank = rank, .num_slots = m.num_slots});
  }
  return out;
}

std::vector<int32_t> Membership::MissingExpertRanks() const {
  std::vector<int32_t> out;
  for (const auto& [rank, slots] : expected_slots_) {
    if (!experts_.contains(rank)) out.push_back(rank);
  }
  return out;
}

std::string Membership::MissingReason() const {
  const std::vector<int32_t> missing = MissingExpertRanks();
  if (missing.empty()) return "";
  if (startup_reported_) {
    return absl::StrCat("expert ranks ", RankList(missing), " did not register within ",
                        options_.startup_timeout_ms, " ms");
  }
  return absl::StrCat("waiting for expert ranks ", RankList(missing), " to register");
}

void Membership::MarkDead(Member& member, const std::string& reason, Actions& actions) {
  if (!member.alive) return;
  member.alive = false;
  member.reason = reason;
  actions.push_back({.kind = Action::Kind::kRankDead, .role = member.role, .rank = member.rank,
                     .message = reason});
  if (member.role == pb::ROLE_EXPERT && pending_ &&
      member.rank < pending_->table->rank_slots_size() &&
      pending_->table->rank_slots(member.rank) > 0) {
    AbandonPending(absl::StrCat("expert rank ", member.rank, " died: ", reason), actions);
  }
}

void Membership::AbandonPending(const std::string& why, Actions& actions) {
  if (!pending_) return;
  actions.push_back(
      {.kind = Action::Kind::kEpochAbandoned, .epoch = pending_->epoch, .message = why});
  pending_.reset();
}

void Membership::StartEpoch(std::shared_ptr<PlacementTable> table, bool is_rebalance,
                            int64_t now_ms, Actions& actions) {
  last_epoch_ = table->epoch();
  membership_changed_ = false;
  capacity_error_.clear();
  Pending pending{.epoch = table->epoch(), .table = table, .started_ms = now_ms,
                  .is_rebalance = is_rebalance};
  for (const RankSlots& r : TableRanks(*table)) {
    pending.waiting.insert(r.rank);
    actions.push_back({.kind = Action::Kind::kPrepare, .role = pb::ROLE_EXPERT, .rank = r.rank,
                       .address = experts_.at(r.rank).control_address,
                       .epoch = table->epoch(), .table = table});
  }
  pending_ = std::move(pending);
}

void Membership::MaybeStartEpoch(int64_t now_ms, Actions& actions) {
  if (pending_ || !all_seen_) return;
  const std::vector<RankSlots> alive = AliveExpertRanks();
  absl::StatusOr<PlacementTable> next;
  if (committed_->epoch() == 0) {
    if (alive.empty()) {
      next = absl::ResourceExhaustedError("not enough capacity: no expert rank is alive");
    } else {
      next = InitialPlacement({.moe_layers = options_.model.moe_layers,
                               .num_experts = options_.model.num_experts,
                               .expert_bytes = options_.model.expert_bytes,
                               .ranks = alive,
                               .redundant_slots = options_.redundant_slots,
                               .epoch = last_epoch_ + 1});
    }
  } else {
    const std::vector<RankSlots> in_table = TableRanks(*committed_);
    const bool same = in_table.size() == alive.size() &&
                      std::equal(in_table.begin(), in_table.end(), alive.begin(),
                                 [](const RankSlots& a, const RankSlots& b) {
                                   return a.rank == b.rank && a.num_slots == b.num_slots;
                                 });
    if (same && !membership_changed_) return;
    if (alive.empty()) {
      next = absl::ResourceExhaustedError("not enough capacity: no expert rank is alive");
    } else {
      absl::StatusOr<RebalanceResult> result =
          Rebalance(options_.policy == PlacementPolicyKind::kEplb ? load_ : LoadStats{},
                    {.ranks = alive, .redundant_slots = options_.redundant_slots}, *committed_);
      if (result.ok()) {
        next = std::move(result->table);
        next->set_epoch(last_epoch_ + 1);
      } else {
        next = result.status();
      }
    }
  }
  if (!next.ok()) {
    std::string message(next.status().message());
    if (!absl::StartsWith(message, "not enough capacity")) {
      message = absl::StrCat("not enough capacity: ", message);
    }
    if (message != capacity_error_) {
      capacity_error_ = message;
      actions.push_back({.kind = Action::Kind::kCapacityError, .message = message});
    }
    return;
  }
  StartEpoch(std::make_shared<PlacementTable>(*std::move(next)), false, now_ms, actions);
}

EventResult<pb::RegisterResponse> Membership::Register(const pb::RegisterRequest& request,
                                                       int64_t now_ms) {
  Start(now_ms);
  EventResult<pb::RegisterResponse> result;
  if (request.version() != options_.version) {
    result.response = absl::FailedPreconditionError(absl::StrCat(
        "version mismatch: ", RoleName(request.role()), " rank ", request.rank(),
        " runs moe-serve \"", request.version(), "\", the scheduler runs \"", options_.version,
        "\"; every process of a deployment must run the same version"));
    return result;
  }
  Member* member = nullptr;
  int32_t num_slots = 0;
  if (request.role() == pb::ROLE_EXPERT) {
    auto it = expected_slots_.find(request.rank());
    if (it == expected_slots_.end()) {
      result.response = absl::InvalidArgumentError(absl::StrCat(
          "rank: expert rank ", request.rank(), " is not in roles.expert_workers"));
      return result;
    }
    num_slots = it->second;
    if (num_slots == 0) num_slots = request.num_slots();
    if (request.num_slots() > 0 && request.num_slots() != num_slots) {
      result.response = absl::InvalidArgumentError(absl::StrCat(
          "num_slots: expert rank ", request.rank(), " offers ", request.num_slots(),
          " slots, roles.expert_workers configures ", num_slots));
      return result;
    }
    if (num_slots <= 0) {
      result.response = absl::InvalidArgumentError(absl::StrCat(
          "num_slots: expert rank ", request.rank(),
          " offers no slots and roles.expert_workers sets none"));
      return result;
    }
    if (request.control_address().empty()) {
      result.response = absl::InvalidArgumentError(absl::StrCat(
          "control_address: expert rank ", request.rank(), " gave no control address"));
      return result;
    }
    member = &experts_[request.rank()];
  } else if (request.role() == pb::ROLE_ATTENTION) {
    if (request.rank() < 0 || request.rank() >= options_.num_attention_ranks) {
      result.response = absl::InvalidArgumentError(
          absl::StrCat("rank: attention rank ", request.rank(), " is not in 0..",
                       options_.num_attention_ranks - 1, " (roles.attention_workers)"));
      return result;
    }
    member = &attention_[request.rank()];
  } else {
    result.response = absl::InvalidArgumentError(absl::StrCat(
        "role: ", RoleName(request.role()), " does not register; only attention and expert "
        "workers do"));
    return result;
  }

  const bool first_time = member->member_id.empty();
  const bool was_alive = member->alive;
  const std::string old_id = member->member_id;
  const std::string old_reason = member->reason;
  const std::string id =
      absl::StrCat(RoleName(request.role()), "-", request.rank(), "-", next_member_number_++);
  issued_ids_[id] = {request.role(), request.rank()};
  *member = Member{.role = request.role(),
                   .rank = request.rank(),
                   .alive = true,
                   .member_id = id,
                   .control_address = request.control_address(),
                   .data_address = request.data_address(),
                   .num_slots = num_slots,
                   .last_seen_ms = now_ms};
  std::string why = first_time  ? "registered"
                    : was_alive ? absl::StrCat("re-registered, replaces ", old_id)
                                : absl::StrCat("re-admitted after: ", old_reason);
  result.actions.push_back({.kind = Action::Kind::kRankAdmitted, .role = request.role(),
                            .rank = request.rank(), .address = request.control_address(),
                            .message = why});

  if (request.role() == pb::ROLE_EXPERT) {
    // A restarted process has lost what it prepared or served.
    if (was_alive && pending_ && request.rank() < pending_->table->rank_slots_size() &&
        pending_->table->rank_slots(request.rank()) > 0) {
      AbandonPending(absl::StrCat("expert rank ", request.rank(), " re-registered"),
                     result.actions);
    }
    if (was_alive && request.rank() < committed_->rank_slots_size() &&
        committed_->rank_slots(request.rank()) > 0) {
      membership_changed_ = true;
    }
    if (!all_seen_ && MissingExpertRanks().empty()) all_seen_ = true;
    MaybeStartEpoch(now_ms, result.actions);
  }
  pb::RegisterResponse response;
  response.set_member_id(id);
  response.set_lease_ms(static_cast<uint32_t>(options_.lease_ms));
  *response.mutable_placement() = *committed_;
  result.response = std::move(response);
  return result;
}

void Membership::AddLoad(const Member& member, const pb::LoadReport& load) {
  if (!committed_index_ || load.placement_epoch() != committed_->epoch()) return;
  const PlacementIndex& index = *committed_index_;
  const int32_t num_slots = index.NumSlots(member.rank);
  // The row stride is the rank's slot count; a report strided by the table's slots_per_rank
  // (the same when every rank has as many slots) is read too.
  const size_t num_layers = index.layers().size();
  const size_t size = static_cast<size_t>(load.slot_tokens_size());
  size_t stride = static_cast<size_t>(num_slots);
  if (size != num_layers * stride) stride = static_cast<size_t>(committed_->slots_per_rank());
  if (num_slots == 0 || size != num_layers * stride) return;
  for (size_t l = 0; l < index.layers().size(); ++l) {
    const int32_t layer = index.layers()[l];
    const std::vector<int32_t>& slots = index.SlotExperts(member.rank, layer);
    std::vector<double>& sums = load_.expert_load[layer];
    sums.resize(index.num_experts(layer), 0.0);
    for (int32_t s = 0; s < num_slots && s < static_cast<int32_t>(slots.size()); ++s) {
      if (slots[s] >= 0) sums[slots[s]] += static_cast<double>(load.slot_tokens(l * stride + s));
    }
  }
}

EventResult<pb::HeartbeatResponse> Membership::Heartbeat(const pb::HeartbeatRequest& request,
                                                         int64_t now_ms) {
  Start(now_ms);
  EventResult<pb::HeartbeatResponse> result;
  Member* member = nullptr;
  switch (Lookup(request.member_id(), &member)) {
    case IdState::kUnknown:
      result.response = absl::NotFoundError(absl::StrCat(
          "unknown member id \"", request.member_id(), "\": register first"));
      return result;
    case IdState::kSuperseded:
      result.response = absl::FailedPreconditionError(absl::StrCat(
          "member id \"", request.member_id(), "\" was replaced by a newer registration of ",
          RoleName(member->role), " rank ", member->rank, " (\"", member->member_id, "\")"));
      return result;
    case IdState::kExpired: {
      pb::HeartbeatResponse response;
      response.set_lease_valid(false);
      response.set_latest_placement_epoch(committed_->epoch());
      result.response = std::move(response);
      return result;
    }
    case IdState::kCurrent:
      break;
  }
  member->last_seen_ms = now_ms;
  member->serving_epoch = request.placement_epoch();
  if (member->role == pb::ROLE_EXPERT && request.has_load()) {
    AddLoad(*member, request.load());
    if (request.load().placement_epoch() == committed_->epoch()) {
      member->steps += static_cast<int64_t>(request.load().steps());
    }
  }
  pb::HeartbeatResponse response;
  response.set_lease_valid(true);
  response.set_latest_placement_epoch(committed_->epoch());
  result.response = std::move(response);
  return result;
}

Actions Membership::PrepareDone(int32_t rank, uint64_t epoch, const absl::Status& status,
                                int64_t now_ms) {
  Start(now_ms);
  Actions actions;
  if (!pending_ || pending_->epoch != epoch || !pending_->waiting.contains(rank)) return actions;
  if (!status.ok()) {
    Member* member = FindExpert(rank);
    MOE_CHECK(member != nullptr) << "a rank in a pending table registered";
    MarkDead(*member,
             absl::StrCat("prepare of epoch ", epoch, " failed: ", status.message()), actions);
    AbandonPending(absl::StrCat("expert rank ", rank, " failed prepare"), actions);
    MaybeStartEpoch(now_ms, actions);
    return actions;
  }
  pending_->waiting.erase(rank);
  if (!pending_->waiting.empty()) return actions;

  // Every rank is ready: commit.
  std::shared_ptr<const PlacementTable> table = pending_->table;
  pending_.reset();
  absl::StatusOr<PlacementIndex> index = PlacementIndex::Build(*table);
  MOE_CHECK(index.ok()) << "our own table is malformed: " << index.status().message();
  committed_ = table;
  committed_index_ = std::make_shared<const PlacementIndex>(*std::move(index));
  for (const RankSlots& r : TableRanks(*table)) {
    actions.push_back({.kind = Action::Kind::kCommit, .role = pb::ROLE_EXPERT, .rank = r.rank,
                       .address = experts_.at(r.rank).control_address, .epoch = table->epoch()});
  }
  actions.push_back({.kind = Action::Kind::kPlacementCommitted, .epoch = table->epoch()});
  load_ = LoadStats{};
  for (auto& [r, m] : experts_) m.steps = 0;
  MaybeStartEpoch(now_ms, actions);
  return actions;
}

Actions Membership::CommitDone(int32_t rank, uint64_t epoch, const absl::Status& status,
                               int64_t now_ms) {
  Start(now_ms);
  Actions actions;
  if (status.ok() || epoch != committed_->epoch()) return actions;
  if (Member* member = FindExpert(rank); member != nullptr) {
    MarkDead(*member, absl::StrCat("commit of epoch ", epoch, " failed: ", status.message()),
             actions);
  }
  MaybeStartEpoch(now_ms, actions);
  return actions;
}

Actions Membership::Tick(int64_t now_ms) {
  Start(now_ms);
  Actions actions;
  for (auto* members : {&experts_, &attention_}) {
    for (auto& [rank, m] : *members) {
      if (m.alive && now_ms - m.last_seen_ms > options_.lease_ms) {
        MarkDead(m,
                 absl::StrCat("no heartbeat for ", now_ms - m.last_seen_ms, " ms (lease ",
                              options_.lease_ms, " ms)"),
                 actions);
      }
    }
  }
  if (!all_seen_ && !startup_reported_ && now_ms - start_ms_ >= options_.startup_timeout_ms) {
    startup_reported_ = true;
    actions.push_back({.kind = Action::Kind::kStartupTimeout,
                       .ranks = MissingExpertRanks(),
                       .message = MissingReason()});
  }
  if (pending_ && now_ms - pending_->started_ms >= options_.prepare_timeout_ms) {
    const uint64_t epoch = pending_->epoch;
    const std::set<int32_t> waiting = pending_->waiting;
    for (int32_t rank : waiting) {
      if (Member* m = FindExpert(rank); m != nullptr) {
        MarkDead(*m,
                 absl::StrCat("no answer to prepare of epoch ", epoch, " within ",
                              options_.prepare_timeout_ms, " ms"),
                 actions);
      }
    }
    AbandonPending("prepare timed out", actions);
  }
  if (options_.policy == PlacementPolicyKind::kEplb && options_.rebalance_interval_steps > 0 &&
      !pending_ && committed_->epoch() > 0) {
    int64_t steps = 0;
    for (const auto& [rank, m] : experts_) {
      if (m.alive) steps = std::max(steps, m.steps);
    }
    if (steps >= options_.rebalance_interval_steps) {
      Actions planned = RequestRebalance(now_ms);
      actions.insert(actions.end(), planned.begin(), planned.end());
    }
  }
  MaybeStartEpoch(now_ms, actions);
  return actions;
}

Actions Membership::RequestRebalance(int64_t now_ms) {
  Start(now_ms);
  Actions actions;
  if (pending_ || committed_->epoch() == 0) return actions;
  const std::vector<RankSlots> alive = AliveExpertRanks();
  if (alive.empty()) return actions;
  absl::StatusOr<RebalanceResult> result =
      Rebalance(load_, {.ranks = alive, .redundant_slots = options_.redundant_slots},
                *committed_);
  // A new window starts either way, so a rebalance that does not pay off is not retried on
  // every tick.
  load_ = LoadStats{};
  for (auto& [r, m] : experts_) m.steps = 0;
  if (!result.ok()) {
    MaybeStartEpoch(now_ms, actions);  // reports capacity problems
    return actions;
  }
  if (result->moved_replicas == 0 ||
      result->imbalance_after > result->imbalance_before - options_.min_rebalance_gain) {
    return actions;
  }
  auto table = std::make_shared<PlacementTable>(std::move(result->table));
  table->set_epoch(last_epoch_ + 1);
  last_imbalance_ = result->imbalance_after;
  ++rebalances_;
  moved_replicas_ += result->moved_replicas;
  actions.push_back(
      {.kind = Action::Kind::kRebalance,
       .epoch = table->epoch(),
       .moved_replicas = result->moved_replicas,
       .message = absl::StrFormat("max/mean load %.3f -> %.3f, %d replicas move",
                                  result->imbalance_before, result->imbalance_after,
                                  result->moved_replicas)});
  StartEpoch(std::move(table), true, now_ms, actions);
  return actions;
}

bool Membership::ready() const {
  if (!all_seen_ || committed_->epoch() == 0 || !committed_index_) return false;
  for (int32_t layer : committed_index_->layers()) {
    for (int32_t e = 0; e < committed_index_->num_experts(layer); ++e) {
      bool covered = false;
      for (const Replica& r : committed_index_->Replicas(layer, e)) {
        auto it = experts_.find(r.rank);
        if (it != experts_.end() && it->second.alive) covered = true;
      }
      if (!covered) return false;
    }
  }
  if (options_.num_attention_ranks > 0) {
    bool any = false;
    for (const auto& [rank, m] : attention_) any = any || m.alive;
    if (!any) return false;
  }
  return true;
}

pb::ClusterStatus Membership::Status(int64_t now_ms) const {
  pb::ClusterStatus status;
  status.set_ready(ready());
  status.set_placement_epoch(committed_->epoch());
  if (pending_) status.set_pending_epoch(pending_->epoch);
  status.set_load_imbalance(last_imbalance_);
  status.set_rebalances(rebalances_);
  auto add = [&](pb::Role role, int32_t rank, const Member* m) {
    pb::MemberStatus* out = status.add_members();
    out->set_role(role);
    out->set_rank(rank);
    if (m == nullptr) {
      out->set_state(pb::MEMBER_STATE_MISSING);
      out->set_reason("never registered");
      if (role == pb::ROLE_EXPERT) status.add_missing_expert_ranks(rank);
      return;
    }
    out->set_state(m->alive ? pb::MEMBER_STATE_ALIVE : pb::MEMBER_STATE_DEAD);
    out->set_member_id(m->member_id);
    out->set_control_address(m->control_address);
    out->set_data_address(m->data_address);
    out->set_num_slots(m->num_slots);
    out->set_serving_epoch(m->serving_epoch);
    out->set_ms_since_heartbeat(now_ms - m->last_seen_ms);
    out->set_reason(m->reason);
    if (!m->alive && role == pb::ROLE_EXPERT) status.add_dead_expert_ranks(rank);
  };
  for (const auto& [rank, slots] : expected_slots_) {
    auto it = experts_.find(rank);
    add(pb::ROLE_EXPERT, rank, it == experts_.end() ? nullptr : &it->second);
  }
  for (int32_t rank = 0; rank < options_.num_attention_ranks; ++rank) {
    auto it = attention_.find(rank);
    add(pb::ROLE_ATTENTION, rank, it == attention_.end() ? nullptr : &it->second);
  }
  if (!status.ready()) {
    std::string reason = MissingReason();
    if (reason.empty() && !capacity_error_.empty()) reason = capacity_error_;
    if (reason.empty() && committed_->epoch() == 0) {
      reason = pending_ ? absl::StrCat("placement epoch ", pending_->epoch, " is being prepared")
                        : "no placement yet";
    }
    if (reason.empty() && status.dead_expert_ranks_size() > 0) {
      std::vector<int32_t> dead(status.dead_expert_ranks().begin(),
                                status.dead_expert_ranks().end());
      reason = absl::StrCat("experts without a live replica (expert ranks ", RankList(dead),
                            " dead), re-placement in progress");
    }
    if (reason.empty()) reason = "no attention worker is alive";
    status.set_reason(reason);
  }
  return status;
}

}  // namespace moe::scheduler
