#include "server/batch_scheduler.h"

#include <numeric>

#include "gtest/gtest.h"

namespace moe::server {
namespace {

std::vector<int32_t> Prompt(int n, int first = 1) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), first);
  return p;
}

// Samples token 7 for every chunk that asks for one; finishes sequences listed in `done`.
StepUpdate SampleAll(const StepPlan& plan, std::vector<SeqId> done = {}) {
  StepUpdate u;
  for (const auto& c : plan.chunks) {
    if (c.sample) u.tokens.push_back({c.seq_id, 7});
  }
  u.finished = std::move(done);
  return u;
}

TEST(BatchSchedulerTest, PrefillThenDecode) {
  BatchScheduler s({.max_num_seqs = 4, .max_num_batched_tokens = 64, .block_size = 4,
                    .num_blocks = 16});
  ASSERT_TRUE(s.Add(1, Prompt(10)).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].start_position, 0);
  EXPECT_EQ(p.chunks[0].num_tokens, 10);
  EXPECT_TRUE(p.chunks[0].sample);
  EXPECT_EQ(p.chunks[0].block_table.size(), 3u);  // ceil(10 / 4)
  EXPECT_EQ(p.chunks[0].tokens[9], 10);
  s.Update(SampleAll(p));
  p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].start_position, 10);
  EXPECT_EQ(p.chunks[0].num_tokens, 1);
  EXPECT_EQ(p.chunks[0].tokens[0], 7);
  EXPECT_EQ(s.tokens(1).size(), 11u);
}

TEST(BatchSchedulerTest, ChunkedPrefillMixesWithDecodes) {
  BatchScheduler s({.max_num_seqs = 4, .max_num_batched_tokens = 8, .block_size = 4,
                    .num_blocks = 32});
  ASSERT_TRUE(s.Add(1, Prompt(3)).ok());
  s.Update(SampleAll(s.Schedule()));  // seq 1 now decodes
  ASSERT_TRUE(s.Add(2, Prompt(20)).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].seq_id, 1u);  // decode first
  EXPECT_EQ(p.chunks[0].num_tokens, 1);
  EXPECT_EQ(p.chunks[1].seq_id, 2u);  // then 7 tokens of the prompt
  EXPECT_EQ(p.chunks[1].num_tokens, 7);
  EXPECT_FALSE(p.chunks[1].sample);
  EXPECT_EQ(p.num_batched_tokens, 8);
  s.Update(SampleAll(p));
  p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[1].start_position, 7);
  EXPECT_EQ(p.chunks[1].num_tokens, 7);
  s.Update(SampleAll(p));
  p = s.Schedule();
  EXPECT_EQ(p.chunks[1].start_position, 14);
  EXPECT_EQ(p.chunks[1].num_tokens, 6);
  EXPECT_TRUE(p.chunks[1].sample);
}

TEST(BatchSchedulerTest, MaxNumSeqsAndFcfs) {
  BatchScheduler s({.max_num_seqs = 2, .max_num_batched_tokens = 100, .block_size = 4,
                    .num_blocks = 64});
  for (SeqId id = 1; id <= 4; ++id) ASSERT_TRUE(s.Add(id, Prompt(5)).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].seq_id, 1u);
  EXPECT_EQ(p.chunks[1].seq_id, 2u);
  EXPECT_EQ(s.num_waiting(), 2);
  s.Update(SampleAll(p, {1}));
  p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].seq_id, 2u);
  EXPECT_EQ(p.chunks[1].seq_id, 3u);  // the oldest waiting one, not 4
}

TEST(BatchSchedulerTest, PreemptsLatestArrivalAndRecomputes) {
  // 4 blocks of 2 tokens = 8 token slots. Two sequences of 3 tokens take 2 blocks each.
  BatchScheduler s({.max_num_seqs = 4, .max_num_batched_tokens = 64, .block_size = 2,
                    .num_blocks = 4});
  ASSERT_TRUE(s.Add(1, Prompt(3)).ok());
  ASSERT_TRUE(s.Add(2, Prompt(3, 100)).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_DOUBLE_EQ(s.kv_usage(), 1.0);
  s.Update(SampleAll(p));
  // Both decode: seq 1 needs positions [3, 4] -> fits its 2nd block (4 slots). Next step
  // needs a 3rd block for seq 1: seq 2 (latest) is preempted.
  p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 2u);
  s.Update(SampleAll(p));
  p = s.Schedule();
  ASSERT_EQ(p.preempted, std::vector<SeqId>{2});
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq_id, 1u);
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(s.num_preemptions(), 1);
  s.Update(SampleAll(p, {1}));
  // Seq 2 comes back and recomputes prompt + its 2 generated tokens in one chunk.
  p = s.Schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq_id, 2u);
  EXPECT_EQ(p.chunks[0].start_position, 0);
  EXPECT_EQ(p.chunks[0].num_tokens, 5);
  EXPECT_TRUE(p.chunks[0].sample);
  EXPECT_EQ(p.chunks[0].tokens[0], 100);
  EXPECT_EQ(p.chunks[0].tokens[4], 7);
}

TEST(BatchSchedulerTest, SequenceThatOutgrowsTheCacheIsDropped) {
  BatchScheduler s({.max_num_seqs = 4, .max_num_batched_tokens = 64, .max_model_len = 100,
                    .block_size = 2, .num_blocks = 2});
  ASSERT_TRUE(s.Add(1, Prompt(3)).ok());
  StepPlan p = s.Schedule();
  s.Update(SampleAll(p));  // 4 tokens
  p = s.Schedule();        // computes position 3, fits
  s.Update(SampleAll(p));  // 5 tokens: needs a 3rd block
  p = s.Schedule();
  EXPECT_EQ(p.preempted, std::vector<SeqId>{1});
  EXPECT_TRUE(p.chunks.empty());
  p = s.Schedule();
  EXPECT_EQ(p.dropped, std::vector<SeqId>{1});
  EXPECT_FALSE(s.has_work());
  EXPECT_DOUBLE_EQ(s.kv_usage(), 0.0);
}

TEST(BatchSchedulerTest, AdmissionErrors) {
  BatchScheduler s({.max_num_batched_tokens = 8, .enable_chunked_prefill = false,
                    .max_model_len = 16, .max_waiting = 1, .block_size = 4, .num_blocks = 8});
  EXPECT_EQ(s.Add(1, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(1, Prompt(16)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(1, Prompt(9)).code(), absl::StatusCode::kInvalidArgument);  // no chunking
  ASSERT_TRUE(s.Add(1, Prompt(4)).ok());
  EXPECT_EQ(s.Add(1, Prompt(4)).code(), absl::StatusCode::kAlreadyExists);
  absl::Status full = s.Add(2, Prompt(4));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(full.message()).find("waiting queue is full"), std::string::npos);
}

TEST(BatchSchedulerTest, FinishReleasesBlocksAnywhere) {
  BatchScheduler s({.max_num_batched_tokens = 4, .block_size = 4, .num_blocks = 8});
  ASSERT_TRUE(s.Add(1, Prompt(10)).ok());
  ASSERT_TRUE(s.Add(2, Prompt(3)).ok());
  s.Schedule();  // seq 1 takes a first chunk
  EXPECT_GT(s.kv_usage(), 0.0);
  s.Finish(1);
  s.Finish(2);
  s.Finish(99);
  EXPECT_FALSE(s.has_work());
  EXPECT_DOUBLE_EQ(s.kv_usage(), 0.0);
}

TEST(BatchSchedulerTest, NoStarvationUnderSteadyLoad) {
  // Long prompt arrives behind a stream of short requests; it must finish its prefill.
  BatchScheduler s({.max_num_seqs = 8, .max_num_batched_tokens = 16, .block_size = 4,
                    .num_blocks = 64});
  ASSERT_TRUE(s.Add(1, Prompt(40)).ok());
  SeqId next = 2;
  bool long_sampled = false;
  for (int step = 0; step < 50 && !long_sampled; ++step) {
    ASSERT_TRUE(s.Add(next++, Prompt(2)).ok());
    StepPlan p = s.Schedule();
    std::vector<SeqId> done;
    for (const auto& c : p.chunks) {
      if (c.seq_id == 1 && c.sample) long_sampled = true;
      if (c.seq_id != 1 && c.sample) done.push_back(c.seq_id);
    }
    s.Update(SampleAll(p, done));
  }
  EXPECT_TRUE(long_sampled);
}

}  // namespace
}  // namespace moe::server
