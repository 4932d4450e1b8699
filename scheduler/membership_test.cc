// Failure scenarios of the membership state machine, written as scripts: each step is an
// event at a time, and the expected actions as the lines Action::ToString writes.
#include "scheduler/membership.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::scheduler {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int64_t kLease = 1000;
constexpr int64_t kStartup = 5000;
constexpr int64_t kPrepare = 2000;

// 3 expert ranks with 4 slots, one attention rank, one MoE layer of 8 experts.
MembershipOptions Options(int num_expert_ranks = 3, int slots = 4) {
  MembershipOptions o;
  for (int r = 0; r < num_expert_ranks; ++r) o.expert_ranks.push_back({r, slots});
  o.num_attention_ranks = 1;
  o.model = {.moe_layers = {1}, .num_experts = 8};
  o.lease_ms = kLease;
  o.startup_timeout_ms = kStartup;
  o.prepare_timeout_ms = kPrepare;
  o.version = "1.2.3";
  return o;
}

pb::RegisterRequest Expert(int rank, std::string version = "1.2.3") {
  pb::RegisterRequest r;
  r.set_role(pb::ROLE_EXPERT);
  r.set_rank(rank);
  r.set_control_address("127.0.0.1:" + std::to_string(7200 + rank));
  r.set_version(version);
  return r;
}

pb::RegisterRequest Attention(int rank) {
  pb::RegisterRequest r;
  r.set_role(pb::ROLE_ATTENTION);
  r.set_rank(rank);
  r.set_control_address("127.0.0.1:7100");
  r.set_version("1.2.3");
  return r;
}

std::vector<std::string> Lines(const Actions& actions) {
  std::vector<std::string> out;
  for (const Action& a : actions) out.push_back(a.ToString());
  return out;
}

// Drives a Membership and remembers member ids by rank.
class Script {
 public:
  explicit Script(MembershipOptions options = Options()) : m(std::move(options)) {}

  std::vector<std::string> Register(const pb::RegisterRequest& request, int64_t now) {
    EventResult<pb::RegisterResponse> r = m.Register(request, now);
    EXPECT_TRUE(r.response.ok()) << r.response.status();
    if (r.response.ok()) {
      (request.role() == pb::ROLE_EXPERT ? expert_ids : attention_ids)[request.rank()] =
          r.response->member_id();
    }
    return Lines(r.actions);
  }
  absl::StatusOr<pb::HeartbeatResponse> Beat(const std::string& id, int64_t now,
                                             uint64_t epoch = 0) {
    pb::HeartbeatRequest h;
    h.set_member_id(id);
    h.set_placement_epoch(epoch);
    EventResult<pb::HeartbeatResponse> r = m.Heartbeat(h, now);
    EXPECT_THAT(r.actions, IsEmpty());
    return r.response;
  }
  std::vector<std::string> Prepared(int rank, uint64_t epoch, int64_t now,
                                    absl::Status status = absl::OkStatus()) {
    return Lines(m.PrepareDone(rank, epoch, status, now));
  }
  std::vector<std::string> Tick(int64_t now) { return Lines(m.Tick(now)); }
  // Registers expert ranks 0..n-1 and attention 0 at t=0 and commits epoch 1.
  void BringUp(int n = 3) {
    Register(Attention(0), 0);
    for (int r = 0; r < n; ++r) Register(Expert(r), 0);
    for (int r = 0; r < n; ++r) Prepared(r, 1, 0);
    ASSERT_EQ(m.placement().epoch(), 1u);
  }

  Membership m;
  std::map<int, std::string> expert_ids;
  std::map<int, std::string> attention_ids;
};

TEST(MembershipTest, AllRanksRegisterThenTwoPhaseCommit) {
  Script s;
  EXPECT_THAT(s.Register(Expert(0), 0), ElementsAre("admitted expert=0 (registered)"));
  EXPECT_THAT(s.Register(Expert(2), 5), ElementsAre("admitted expert=2 (registered)"));
  EXPECT_FALSE(s.m.ready());
  EXPECT_EQ(s.m.Status(5).reason(), "waiting for expert ranks [1] to register");
  EXPECT_THAT(s.Register(Expert(1), 10),
              ElementsAre("admitted expert=1 (registered)", "prepare epoch=1 rank=0",
                          "prepare epoch=1 rank=1", "prepare epoch=1 rank=2"));
  EXPECT_EQ(s.m.Status(10).pending_epoch(), 1u);
  EXPECT_THAT(s.Prepared(2, 1, 20), IsEmpty());
  EXPECT_THAT(s.Prepared(0, 1, 21), IsEmpty());
  EXPECT_EQ(s.m.placement().epoch(), 0u) << "nothing is served before every rank is ready";
  EXPECT_THAT(s.Prepared(1, 1, 22),
              ElementsAre("commit epoch=1 rank=0", "commit epoch=1 rank=1",
                          "commit epoch=1 rank=2", "committed epoch=1"));
  EXPECT_EQ(s.m.placement().epoch(), 1u);
  EXPECT_FALSE(s.m.ready()) << "no attention worker yet";
  EXPECT_EQ(s.m.Status(22).reason(), "no attention worker is alive");
  EXPECT_THAT(s.Register(Attention(0), 30), ElementsAre("admitted attention=0 (registered)"));
  EXPECT_TRUE(s.m.ready());
  pb::ClusterStatus status = s.m.Status(30);
  EXPECT_TRUE(status.ready());
  EXPECT_EQ(status.placement_epoch(), 1u);
  EXPECT_EQ(status.members_size(), 4);
  EXPECT_EQ(status.members(0).state(), pb::MEMBER_STATE_ALIVE);
  // A late prepare answer for a finished epoch changes nothing.
  EXPECT_THAT(s.Prepared(1, 1, 40), IsEmpty());
}

TEST(MembershipTest, RegistrationErrorsAreClear) {
  Script s;
  EventResult<pb::RegisterResponse> old = s.m.Register(Expert(0, "0.0.9"), 0);
  ASSERT_FALSE(old.response.ok());
  EXPECT_EQ(old.response.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(old.response.status().message()),
              HasSubstr("version mismatch: expert rank 0 runs moe-serve \"0.0.9\", the scheduler "
                        "runs \"1.2.3\""));
  EXPECT_THAT(old.actions, IsEmpty());
  EventResult<pb::RegisterResponse> unknown = s.m.Register(Expert(7), 0);
  EXPECT_EQ(unknown.response.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.response.status().message()),
              HasSubstr("expert rank 7 is not in roles.expert_workers"));
  pb::RegisterRequest slots = Expert(0);
  slots.set_num_slots(3);
  EXPECT_THAT(std::string(s.m.Register(slots, 0).response.status().message()),
              HasSubstr("num_slots: expert rank 0 offers 3 slots, roles.expert_workers "
                        "configures 4"));
  EXPECT_EQ(s.m.Register(Attention(1), 0).response.status().code(),
            absl::StatusCode::kInvalidArgument);
  pb::RegisterRequest frontend = Attention(0);
  frontend.set_role(pb::ROLE_FRONTEND);
  EXPECT_EQ(s.m.Register(frontend, 0).response.status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MembershipTest, ExpertRankSilentPastLeaseDiesAndIsPlacedAround) {
  Script s;
  s.BringUp();
  // Ranks 0, 2 and the attention worker keep beating; rank 1 goes silent.
  for (int64_t t = 500; t <= 1000; t += 500) {
    ASSERT_TRUE(s.Beat(s.expert_ids[0], t, 1).ok());
    ASSERT_TRUE(s.Beat(s.expert_ids[2], t, 1).ok());
    ASSERT_TRUE(s.Beat(s.attention_ids[0], t).ok());
  }
  EXPECT_THAT(s.Tick(1000), IsEmpty()) << "lease not over yet";
  EXPECT_THAT(s.Tick(1001),
              ElementsAre("dead expert=1 (no heartbeat for 1001 ms (lease 1000 ms))",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=2"));
  EXPECT_FALSE(s.m.ready()) << "rank 1's experts have no replica until epoch 2";
  EXPECT_THAT(s.m.Status(1001).dead_expert_ranks(), ElementsAre(1));
  s.Prepared(0, 2, 1100);
  EXPECT_THAT(s.Prepared(2, 2, 1100),
              ElementsAre("commit epoch=2 rank=0", "commit epoch=2 rank=2", "committed epoch=2"));
  EXPECT_TRUE(s.m.ready());
  absl::StatusOr<PlacementIndex> index = PlacementIndex::Build(s.m.placement());
  ASSERT_TRUE(index.ok());
  EXPECT_TRUE(index->SlotsOfRank(1).empty());

  // The dead rank's heartbeat says: register again. It is re-admitted into epoch 3.
  absl::StatusOr<pb::HeartbeatResponse> stale = s.Beat(s.expert_ids[1], 1200, 1);
  ASSERT_TRUE(stale.ok());
  EXPECT_FALSE(stale->lease_valid());
  EXPECT_EQ(stale->latest_placement_epoch(), 2u);
  EXPECT_THAT(s.Register(Expert(1), 1300),
              ElementsAre(
                  "admitted expert=1 (re-admitted after: no heartbeat for 1001 ms (lease 1000 ms))",
                  "prepare epoch=3 rank=0", "prepare epoch=3 rank=1", "prepare epoch=3 rank=2"));
}

TEST(MembershipTest, AttentionWorkerDeathIsReportedWithoutNewPlacement) {
  Script s;
  s.BringUp();
  for (int r = 0; r < 3; ++r) ASSERT_TRUE(s.Beat(s.expert_ids[r], 900, 1).ok());
  EXPECT_THAT(s.Tick(1001),
              ElementsAre("dead attention=0 (no heartbeat for 1001 ms (lease 1000 ms))"));
  EXPECT_FALSE(s.m.ready());
}

TEST(MembershipTest, FailedPrepareAbandonsTheEpochAndRetriesWithoutTheRank) {
  Script s;
  s.Register(Attention(0), 0);
  s.Register(Expert(0), 0);
  s.Register(Expert(1), 0);
  s.Register(Expert(2), 0);
  s.Prepared(0, 1, 10);
  EXPECT_THAT(s.Prepared(2, 1, 10, absl::ResourceExhaustedError("out of memory")),
              ElementsAre("dead expert=2 (prepare of epoch 1 failed: out of memory)",
                          "abandoned epoch=1 (expert rank 2 died: prepare of epoch 1 failed: out "
                          "of memory)",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=1"));
  // Answers for the abandoned epoch are ignored.
  EXPECT_THAT(s.Prepared(1, 1, 11), IsEmpty());
  s.Prepared(0, 2, 12);
  EXPECT_THAT(s.Prepared(1, 2, 12), ElementsAre("commit epoch=2 rank=0", "commit epoch=2 rank=1",
                                                "committed epoch=2"));
  EXPECT_TRUE(s.m.ready());
}

TEST(MembershipTest, NotEnoughCapacityIsReportedAndRecoveredWhenTheRankReturns) {
  Script s(Options(/*num_expert_ranks=*/2, /*slots=*/4));  // exactly 8 slots for 8 experts
  s.Register(Attention(0), 0);
  s.Register(Expert(0), 0);
  s.Register(Expert(1), 0);
  EXPECT_THAT(s.Prepared(1, 1, 10, absl::UnavailableError("connection refused")),
              ElementsAre("dead expert=1 (prepare of epoch 1 failed: connection refused)",
                          "abandoned epoch=1 (expert rank 1 died: prepare of epoch 1 failed: "
                          "connection refused)",
                          "capacity error (not enough capacity: ranks: 1 ranks with 4 slots per "
                          "layer in all cannot hold 8 experts + 0 redundant replicas per layer)"));
  pb::ClusterStatus status = s.m.Status(10);
  EXPECT_FALSE(status.ready());
  EXPECT_THAT(status.reason(), HasSubstr("not enough capacity"));
  // The rank restarts and registers: the next epoch goes out.
  EXPECT_THAT(s.Register(Expert(1), 20),
              ElementsAre("admitted expert=1 (re-admitted after: prepare of epoch 1 failed: "
                          "connection refused)",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=1"));
}

TEST(MembershipTest, RankDyingDuringPrepareAbandonsTheEpoch) {
  Script s;
  s.Register(Attention(0), 0);
  s.Register(Expert(0), 0);
  s.Register(Expert(1), 0);
  s.Register(Expert(2), 0);
  s.Prepared(0, 1, 100);
  s.Prepared(1, 1, 100);
  ASSERT_TRUE(s.Beat(s.expert_ids[0], 900).ok());
  ASSERT_TRUE(s.Beat(s.expert_ids[1], 900).ok());
  ASSERT_TRUE(s.Beat(s.attention_ids[0], 900).ok());
  EXPECT_THAT(s.Tick(1001),
              ElementsAre("dead expert=2 (no heartbeat for 1001 ms (lease 1000 ms))",
                          "abandoned epoch=1 (expert rank 2 died: no heartbeat for 1001 ms (lease "
                          "1000 ms))",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=1"));
}

TEST(MembershipTest, PrepareWithoutAnswerTimesOut) {
  Script s;
  s.Register(Attention(0), 0);
  for (int r = 0; r < 3; ++r) s.Register(Expert(r), 0);
  s.Prepared(0, 1, 10);
  s.Prepared(2, 1, 10);
  for (int64_t t = 500; t <= 2000; t += 500) {
    for (int r = 0; r < 3; ++r) ASSERT_TRUE(s.Beat(s.expert_ids[r], t).ok());
    ASSERT_TRUE(s.Beat(s.attention_ids[0], t).ok());
    if (t < 2000) EXPECT_THAT(s.Tick(t), IsEmpty());
  }
  EXPECT_THAT(s.Tick(2000),
              ElementsAre("dead expert=1 (no answer to prepare of epoch 1 within 2000 ms)",
                          "abandoned epoch=1 (expert rank 1 died: no answer to prepare of epoch 1 "
                          "within 2000 ms)",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=2"));
}

TEST(MembershipTest, RankThatNeverRegistersIsReportedAtTheStartupTimeout) {
  Script s;
  s.Register(Attention(0), 0);
  s.Register(Expert(0), 0);
  s.Register(Expert(1), 0);
  for (int64_t t = 500; t < kStartup; t += 500) {
    ASSERT_TRUE(s.Beat(s.expert_ids[0], t).ok());
    ASSERT_TRUE(s.Beat(s.expert_ids[1], t).ok());
    ASSERT_TRUE(s.Beat(s.attention_ids[0], t).ok());
    EXPECT_THAT(s.Tick(t), IsEmpty()) << "t=" << t;
  }
  EXPECT_THAT(s.Tick(kStartup), ElementsAre("startup timeout ranks=[2]"));
  pb::ClusterStatus status = s.m.Status(kStartup);
  EXPECT_FALSE(status.ready());
  EXPECT_EQ(status.reason(), "expert ranks [2] did not register within 5000 ms");
  EXPECT_THAT(status.missing_expert_ranks(), ElementsAre(2));
  EXPECT_EQ(status.members(2).state(), pb::MEMBER_STATE_MISSING);
  EXPECT_THAT(s.Tick(kStartup + 1), IsEmpty()) << "reported once";
  // When it finally comes, placement proceeds.
  EXPECT_THAT(s.Register(Expert(2), kStartup + 100),
              ElementsAre("admitted expert=2 (registered)", "prepare epoch=1 rank=0",
                          "prepare epoch=1 rank=1", "prepare epoch=1 rank=2"));
}

TEST(MembershipTest, DuplicateRegistrationReplacesTheOldMember) {
  Script s;
  s.BringUp();
  const std::string old_id = s.expert_ids[1];
  EXPECT_THAT(s.Register(Expert(1), 100),
              ElementsAre("admitted expert=1 (re-registered, replaces " + old_id + ")",
                          "prepare epoch=2 rank=0", "prepare epoch=2 rank=1",
                          "prepare epoch=2 rank=2"))
      << "the restarted process must load its weights again";
  absl::StatusOr<pb::HeartbeatResponse> superseded = s.Beat(old_id, 110);
  EXPECT_EQ(superseded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(superseded.status().message()),
              HasSubstr("was replaced by a newer registration of expert rank 1"));
  EXPECT_TRUE(s.Beat(s.expert_ids[1], 110).ok());
  absl::StatusOr<pb::HeartbeatResponse> unknown = s.Beat("expert-9-99", 110);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(unknown.status().message()),
              HasSubstr("unknown member id \"expert-9-99\": register first"));
}

TEST(MembershipTest, SkewedLoadReportsTriggerARebalance) {
  MembershipOptions o = Options(/*num_expert_ranks=*/2, /*slots=*/5);
  o.redundant_slots = 2;
  o.rebalance_interval_steps = 100;
  Script s(o);
  s.BringUp(2);
  absl::StatusOr<PlacementIndex> index = PlacementIndex::Build(s.m.placement());
  ASSERT_TRUE(index.ok());
  // Experts 2 and 4 (both on rank 0) get almost every token; per slot, [layers=1, slots=5].
  for (int r = 0; r < 2; ++r) {
    pb::HeartbeatRequest h;
    h.set_member_id(s.expert_ids[r]);
    h.set_placement_epoch(1);
    h.mutable_load()->set_placement_epoch(1);
    h.mutable_load()->set_steps(100);
    for (int32_t expert : index->SlotExperts(r, 1)) {
      h.mutable_load()->add_slot_tokens(expert < 0 ? 0 : (expert == 2 || expert == 4) ? 1000 : 10);
    }
    ASSERT_TRUE(s.m.Heartbeat(h, 200).response.ok());
  }
  ASSERT_TRUE(s.Beat(s.attention_ids[0], 200).ok());
  EXPECT_EQ(s.m.load().expert_load.at(1)[2], 1000);
  std::vector<std::string> lines = s.Tick(200);
  ASSERT_GE(lines.size(), 3u) << ::testing::PrintToString(lines);
  EXPECT_THAT(lines[0], HasSubstr("rebalance epoch=2 (max/mean load"));
  EXPECT_EQ(lines[1], "prepare epoch=2 rank=0");
  EXPECT_EQ(lines[2], "prepare epoch=2 rank=1");
  EXPECT_EQ(s.m.Status(200).rebalances(), 1u);
  // Reports of another epoch are ignored.
  EXPECT_TRUE(s.m.load().expert_load.empty());
}

TEST(MembershipTest, OptionsAreValidated) {
  EXPECT_TRUE(Membership::ValidateOptions(Options()).ok());
  MembershipOptions none = Options();
  none.expert_ranks.clear();
  EXPECT_THAT(std::string(Membership::ValidateOptions(none).message()),
              HasSubstr("expert_ranks:"));
  MembershipOptions dup = Options();
  dup.expert_ranks.push_back({0, 4});
  EXPECT_FALSE(Membership::ValidateOptions(dup).ok());
  MembershipOptions model = Options();
  model.model.num_experts = 0;
  EXPECT_THAT(std::string(Membership::ValidateOptions(model).message()), HasSubstr("model:"));
}

}  // namespace
}  // namespace moe::scheduler
