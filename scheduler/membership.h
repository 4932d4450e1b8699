// Membership and placement lifecycle: a deterministic state machine, no I/O.
//
// Events come in as method calls with the current time (`now_ms`, any monotonic clock the
// caller injects); each returns the Actions the caller performs (gRPC calls to expert
// workers, log lines, metrics). Equal event sequences give equal actions, so failure
// scenarios are scripts in tests:
//
//   Membership m(options);                                 // expects expert ranks 0 and 1
//   m.Register(ExpertRegistration(0), /*now_ms=*/0);        // -> no action yet
//   m.Register(ExpertRegistration(1), 10);                  // -> kPrepare epoch 1 to ranks 0, 1
//   m.PrepareDone(0, 1, absl::OkStatus(), 20);
//   m.PrepareDone(1, 1, absl::OkStatus(), 25);              // -> kCommit epoch 1 to 0, 1,
//                                                           //    kPlacementCommitted epoch 1
//   m.Tick(25 + lease_ms + 1);                              // -> kRankDead 0, kRankDead 1, ...
//
// Rules:
// - Register: the version must equal options.version (else FailedPrecondition naming both);
//   the role must be attention or expert and the rank one the config expects (else
//   InvalidArgument). Registering a rank that is alive replaces the old registration: the old
//   member id becomes stale (its heartbeats get FailedPrecondition), the newer process is
//   taken to be the rank's restart. A dead rank that registers again is re-admitted.
//   Every registration gets a fresh member id "<role>-<rank>-<n>".
// - Leases: a member silent for lease_ms (no Register/Heartbeat) is dead at the next Tick:
//   kRankDead (the caller logs and counts it). Heartbeat of an expired id: OK with
//   lease_valid=false (register again); of a superseded id: FailedPrecondition; of an id never
//   issued: NotFound.
// - Placement, two-phase: once every expected expert rank is alive, epoch 1 is computed with
//   InitialPlacement and a kPrepare goes to every rank in it. When all answered PrepareDone OK,
//   kCommit goes to each and kPlacementCommitted reports the new serving epoch. A rank that
//   fails prepare (or does not answer within prepare_timeout_ms, or dies meanwhile) is marked
//   dead and the epoch is abandoned; the next epoch is computed without it, from the committed
//   table (Rebalance, keeping replicas in place) or from scratch before the first commit. When
//   the alive ranks cannot hold every expert, kCapacityError says so and the cluster stays
//   not ready until ranks come back.
// - After the first commit, any change of the expert ranks (death, re-admission, restart)
//   starts a new epoch the same way. Epochs only grow; an abandoned epoch number is not reused.
// - Startup: expected expert ranks that have not registered startup_timeout_ms after the
//   machine was created (first event time) are reported once by kStartupTimeout; the status
//   stays not ready ("expert ranks [2] did not register within 30000 ms") until they come.
// - Rebalance: heartbeats' LoadReports of the serving epoch are summed per (layer, expert).
//   With policy kEplb and rebalance_interval_steps > 0, once that many steps were reported,
//   the next Tick runs Rebalance; when it lowers the worst imbalance by at least
//   min_rebalance_gain, a new epoch is prepared (kRebalance reports the numbers). Load
//   statistics restart at every commit.
//
// Threads: not thread-safe; one owner (SchedulerService holds it under its mutex).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moe/v1/internal.pb.h"
#include "scheduler/placement.h"

namespace moe::scheduler {

namespace pb = ::moe::internal::v1;

// What the model looks like to the scheduler.
struct ModelShape {
  std::vector<int32_t> moe_layers;
  int32_t num_experts = 0;
  // As PlacementInput::expert_bytes.
  std::vector<uint64_t> expert_bytes;
};

enum class PlacementPolicyKind { kStatic, kEplb };

struct MembershipOptions {
  // The deployment's expert ranks with their slots per layer; num_slots 0 = take the count
  // the worker registers with.
  std::vector<RankSlots> expert_ranks;
  // Attention ranks are 0..num_attention_ranks-1.
  int32_t num_attention_ranks = 0;
  ModelShape model;
  PlacementPolicyKind policy = PlacementPolicyKind::kEplb;
  int32_t redundant_slots = 0;
  int64_t rebalance_interval_steps = 0;  // 0 = never
  // Rebalance only when the worst layer's max/mean load drops by at least this much.
  double min_rebalance_gain = 0.05;
  int64_t lease_ms = 3000;
  int64_t startup_timeout_ms = 60000;
  int64_t prepare_timeout_ms = 120000;
  // Registrations must carry this version (MOE_SERVE_VERSION).
  std::string version;
};

struct Action {
  enum class Kind {
    // Call ExpertControl.PreparePlacement(*table) on `address`; report with PrepareDone.
    kPrepare,
    // Call ExpertControl.CommitPlacement(epoch) on `address`; report with CommitDone.
    kCommit,
    // `epoch` is now served; attention workers and the frontend may use it (GetPlacement).
    kPlacementCommitted,
    // (role, rank) died: `message` says why. Log, count (moe_rank_failures_total).
    kRankDead,
    // A dead or new rank joined again (log).
    kRankAdmitted,
    // Expected expert ranks `ranks` did not register in time; `message` for the log.
    kStartupTimeout,
    // The alive ranks cannot hold the model; `message` says why. The cluster is not ready.
    kCapacityError,
    // A rebalance was planned as `epoch` (numbers in `message`; count moe_rebalances_total).
    kRebalance,
    // The epoch being prepared was given up (`message` says why); a newer one follows.
    kEpochAbandoned,
  };
  Kind kind = Kind::kPrepare;
  pb::Role role = pb::ROLE_EXPERT;
  int32_t rank = -1;
  std::string address;  // control address of the rank (kPrepare, kCommit)
  uint64_t epoch = 0;
  std::shared_ptr<const PlacementTable> table;  // kPrepare
  std::vector<int32_t> ranks;                   // kStartupTimeout
  int64_t moved_replicas = 0;                   // kRebalance
  std::string message;

  // One line for logs and test scripts, e.g. "prepare epoch=2 rank=1".
  std::string ToString() const;
};

using Actions = std::vector<Action>;

template <typename T>
struct EventResult {
  absl::StatusOr<T> response;
  Actions actions;
};

class Membership {
 public:
  explicit Membership(MembershipOptions options);

  // Validates options (ranks unique, model shape sane); InvalidArgument naming the field.
  static absl::Status ValidateOptions(const MembershipOptions& options);

  EventResult<pb::RegisterResponse> Register(const pb::RegisterRequest& request, int64_t now_ms);
  EventResult<pb::HeartbeatResponse> Heartbeat(const pb::HeartbeatRequest& request,
                                               int64_t now_ms);
  // Outcome of a kPrepare (status of the RPC, or FailedPrecondition carrying the worker's
  // ready=false error). Stale epochs are ignored.
  Actions PrepareDone(int32_t rank, uint64_t epoch, const absl::Status& status, int64_t now_ms);
  // Outcome of a kCommit. A failed commit marks the rank dead (a new epoch follows).
  Actions CommitDone(int32_t rank, uint64_t epoch, const absl::Status& status, int64_t now_ms);
  // Lease expiry, startup and prepare timeouts, periodic rebalance.
  Actions Tick(int64_t now_ms);
  // Plans a rebalance now from the load gathered so far (also for operators / tests).
  Actions RequestRebalance(int64_t now_ms);

  // The committed table (epoch 0 and no layers before the first commit).
  const PlacementTable& placement() const { return *committed_; }
  std::shared_ptr<const PlacementTable> placement_ptr() const { return committed_; }
  pb::ClusterStatus Status(int64_t now_ms) const;
  bool ready() const;
  // Sum of per-(layer, expert) load since the last commit.
  const LoadStats& load() const { return load_; }

 private:
  struct Member {
    pb::Role role = pb::ROLE_UNSPECIFIED;
    int32_t rank = 0;
    bool alive = false;
    std::string member_id;
    std::string control_address;
    std::string data_address;
    int32_t num_slots = 0;
    int64_t last_seen_ms = 0;
    uint64_t serving_epoch = 0;
    std::string reason;  // why dead
    int64_t steps = 0;   // reported since the last commit
  };
  struct Pending {
    uint64_t epoch = 0;
    std::shared_ptr<const PlacementTable> table;
    std::set<int32_t> waiting;  // ranks that have not answered prepare
    int64_t started_ms = 0;
    bool is_rebalance = false;
  };
  enum class IdState { kCurrent, kSuperseded, kExpired, kUnknown };

  void Start(int64_t now_ms);
  Member* FindExpert(int32_t rank);
  IdState Lookup(const std::string& member_id, Member** member);
  void MarkDead(Member& member, const std::string& reason, Actions& actions);
  // Recomputes and starts a new epoch from the alive expert ranks when the cluster needs one
  // (no epoch in flight, all expected ranks seen once, alive set differs from the table).
  void MaybeStartEpoch(int64_t now_ms, Actions& actions);
  void StartEpoch(std::shared_ptr<PlacementTable> table, bool is_rebalance, int64_t now_ms,
                  Actions& actions);
  void AbandonPending(const std::string& why, Actions& actions);
  std::vector<RankSlots> AliveExpertRanks() const;
  std::string MissingReason() const;
  std::vector<int32_t> MissingExpertRanks() const;
  void AddLoad(const Member& member, const pb::LoadReport& load);

  // Set at construction.
  const MembershipOptions options_;
  const std::map<int32_t, int32_t> expected_slots_;  // expert rank -> configured slots

  bool started_ = false;
  int64_t start_ms_ = 0;
  bool startup_reported_ = false;
  // Member ids issued: id -> (role, rank).
  std::map<std::string, std::pair<pb::Role, int32_t>> issued_ids_;
  uint64_t next_member_number_ = 1;
  std::map<int32_t, Member> experts_;
  std::map<int32_t, Member> attention_;
  // Every expected expert rank has registered at least once.
  bool all_seen_ = false;
  std::shared_ptr<const PlacementTable> committed_;
  std::optional<Pending> pending_;
  uint64_t last_epoch_ = 0;
  // Alive ranks that the committed table did not account for (restarts), to re-prepare.
  bool membership_changed_ = false;
  std::string capacity_error_;
  LoadStats load_;
  std::shared_ptr<const PlacementIndex> committed_index_;
  double last_imbalance_ = 0.0;
  uint64_t rebalances_ = 0;
  int64_t moved_replicas_ = 0;
};

}  // namespace moe::scheduler
