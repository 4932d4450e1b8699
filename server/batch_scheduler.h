// BatchScheduler: the pure core of the engine loop's continuous batching (vLLM V1 style).
//
// Every engine iteration calls Schedule(), which picks the work of one step under a single
// token budget: first the running sequences (one decode token each, or the next chunk of a
// prompt being prefilled), in arrival order, then waiting sequences in arrival order (FCFS)
// while the budget, `max_num_seqs` and KV blocks allow. Prompts longer than the remaining
// budget are split into chunks (chunked prefill) unless disabled. KV blocks come from one
// BlockAllocator per attention worker; when a running sequence needs a block and none is
// free, the latest-arrived running sequence is preempted: its blocks are freed and it goes
// back to the head of the waiting queue to be recomputed later from its prompt plus the
// tokens it already produced (preemption by recompute). Because waiting sequences are
// ordered by arrival and a preempted sequence keeps its arrival order, nobody starves.
// Update() then appends the sampled tokens and releases finished sequences.
//
// A scheduled sequence counts as computed up to the end of its chunk as soon as it is
// scheduled; if the step fails the caller must Finish() the sequences of that step.
//
// No I/O, no clock, no threads: one owner (the engine thread) calls everything, and tests
// drive it as small scripts.
//
//   BatchScheduler sched({.max_num_seqs = 8, .max_num_batched_tokens = 64, .num_blocks = 32});
//   MOE_RETURN_IF_ERROR(sched.Add(1, prompt_ids));
//   StepPlan plan = sched.Schedule();
//   ... run plan.chunks through the model, sample where chunk.sample ...
//   sched.Update({.tokens = {{1, next_token}}, .finished = {}});
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <vector>

#include "common/status.h"
#include "model/kv_cache.h"

namespace moe::server {

using SeqId = uint64_t;

struct BatchSchedulerOptions {
  int max_num_seqs = 256;             // running sequences at most
  int max_num_batched_tokens = 2048;  // tokens computed per step at most
  bool enable_chunked_prefill = true;
  int max_model_len = 4096;           // prompt + output tokens at most
  int max_waiting = 1024;             // queued sequences at most (then ResourceExhausted)
  int block_size = 16;
  int num_blocks = 1024;
};

// What one sequence computes in a step: tokens [start_position, start_position + num_tokens)
// of its token list (prompt followed by generated tokens).
struct ScheduledChunk {
  SeqId seq_id = 0;
  int32_t start_position = 0;
  int32_t num_tokens = 0;
  // True when the chunk ends at the last known token: sample the next one.
  bool sample = false;
  std::span<const int32_t> tokens;       // the chunk's tokens
  std::span<const int32_t> block_table;  // covers start_position + num_tokens
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;
  // Sequences preempted in this step (their cache is gone; they will be recomputed).
  std::vector<SeqId> preempted;
  // Sequences that can never fit the KV cache even alone: the caller finishes them
  // (finish reason "length"); they are already removed from the scheduler.
  std::vector<SeqId> dropped;
  int num_batched_tokens = 0;
  bool empty() const { return chunks.empty(); }
};

struct SampledToken {
  SeqId seq_id = 0;
  int32_t token = 0;
};

struct StepUpdate {
  std::vector<SampledToken> tokens;  // appended to their sequences
  std::vector<SeqId> finished;       // released after the tokens are appended
};

class BatchScheduler {
 public:
  explicit BatchScheduler(const BatchSchedulerOptions& options);

  // Queues a new sequence. InvalidArgument for an empty prompt or one that cannot fit
  // (max_model_len or the whole KV cache); AlreadyExists for a live id; ResourceExhausted
  // when max_waiting sequences already wait.
  absl::Status Add(SeqId id, std::vector<int32_t> prompt);

  StepPlan Schedule();
  void Update(const StepUpdate& update);
  // Removes a sequence wherever it is (abort, client gone, error); unknown ids are ignored.
  void Finish(SeqId id);

  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  // Fraction of KV blocks in use, in [0, 1].
  double kv_usage() const;
  // All tokens of a live sequence (prompt + generated); empty for unknown ids.
  std::span<const int32_t> tokens(SeqId id) const;
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  struct Sequence {
    SeqId id = 0;
    uint64_t arrival = 0;
    std::vector<int32_t> tokens;
    int32_t num_computed = 0;  // tokens whose KV is in the cache
    model::SequenceBlocks blocks;
  };
  using Queue = std::set<std::pair<uint64_t, SeqId>>;  // (arrival, id), FCFS order

  void Preempt(Sequence& seq);
  void Release(Sequence& seq);
  ScheduledChunk MakeChunk(const Sequence& seq, int32_t num_tokens) const;

  const BatchSchedulerOptions options_;
  model::BlockAllocator allocator_;
  std::map<SeqId, std::unique_ptr<Sequence>> seqs_;
  Queue running_;
  Queue waiting_;
  uint64_t next_arrival_ = 0;
  int64_t num_preemptions_ = 0;
};

}  // namespace moe::server
