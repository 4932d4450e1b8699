#include "server/batch_scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace moe::server {

BatchScheduler::BatchScheduler(const BatchSchedulerOptions& options)
    : options_(options), allocator_(options.num_blocks) {
  MOE_CHECK(options.max_num_seqs > 0 && options.max_num_batched_tokens > 0 &&
            options.block_size > 0 && options.num_blocks > 0)
      << "BatchScheduler options must be positive";
}

absl::Status BatchScheduler::Add(SeqId id, std::vector<int32_t> prompt) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: must contain at least one token");
  const int64_t capacity = static_cast<int64_t>(options_.num_blocks) * options_.block_size;
  const int64_t limit = std::min<int64_t>(options_.max_model_len, capacity);
  if (static_cast<int64_t>(prompt.size()) >= limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", prompt.size(), " tokens leave no room to generate (limit ", limit,
        " tokens: max_model_len ", options_.max_model_len, ", KV cache ", capacity, ")"));
  }
  if (!options_.enable_chunked_prefill &&
      static_cast<int64_t>(prompt.size()) > options_.max_num_batched_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt: ", prompt.size(), " tokens exceed max_num_batched_tokens (",
                     options_.max_num_batched_tokens, ") and chunked prefill is disabled"));
  }
  if (seqs_.count(id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " is already scheduled"));
  }
  if (static_cast<int>(waiting_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", options_.max_waiting, " requests)"));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->arrival = next_arrival_++;
  seq->tokens = std::move(prompt);
  waiting_.insert({seq->arrival, id});
  seqs_[id] = std::move(seq);
  return absl::OkStatus();
}

ScheduledChunk BatchScheduler::MakeChunk(const Sequence& seq, int32_t num_tokens) const {
  ScheduledChunk chunk;
  chunk.seq_id = seq.id;
  chunk.start_position = seq.num_computed;
  chunk.num_tokens = num_tokens;
  chunk.sample = seq.num_computed + num_tokens == static_cast<int32_t>(seq.tokens.size());
  chunk.tokens = std::span<const int32_t>(seq.tokens).subspan(seq.num_computed, num_tokens);
  chunk.block_table = seq.blocks.table();
  return chunk;
}

void BatchScheduler::Release(Sequence& seq) {
  seq.blocks.Release(allocator_);
  seq.num_computed = 0;
}

void BatchScheduler::Preempt(Sequence& seq) {
  Release(seq);
  running_.erase({seq.arrival, seq.id});
  waiting_.insert({seq.arrival, seq.id});
  ++num_preemptions_;
}

StepPlan BatchScheduler::Schedule() {
  StepPlan plan;
  int budget = options_.max_num_batched_tokens;
  std::set<SeqId> scheduled;

  // Running sequences first, oldest first. Iterate over a snapshot: preemption edits running_.
  std::vector<std::pair<uint64_t, SeqId>> running(running_.begin(), running_.end());
  for (const auto& [arrival, id] : running) {
    if (budget == 0) break;
    if (running_.count({arrival, id}) == 0) continue;  // preempted by an older sequence
    Sequence& seq = *seqs_[id];
    int32_t n = static_cast<int32_t>(seq.tokens.size()) - seq.num_computed;
    if (n <= 0) continue;  // waiting for its sampled token (should not happen)
    n = std::min(n, budget);
    bool fitted = false;
    while (true) {
      if (seq.blocks.Reserve(seq.num_computed + n, options_.block_size, allocator_).ok()) {
        fitted = true;
        break;
      }
      // Preempt the latest arrival that is not scheduled yet in this step.
      auto victim = running_.end();
      for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
        if (scheduled.count(it->second) == 0) {
          victim = std::prev(it.base());
          break;
        }
      }
      MOE_CHECK(victim != running_.end()) << "the sequence itself is always a candidate";
      Sequence& v = *seqs_[victim->second];
      plan.preempted.push_back(v.id);
      Preempt(v);
      if (v.id == id) break;  // it was itself the latest: it waits now
    }
    // Not fitted means it preempted itself (it was the latest): it waits now, and the
    // waiting phase drops it if it cannot fit even alone.
    if (!fitted) continue;
    plan.chunks.push_back(MakeChunk(seq, n));
    seq.num_computed += n;
    budget -= n;
    scheduled.insert(id);
  }

  // Then waiting sequences in arrival order, unless this step had to preempt.
  while (plan.preempted.empty() && budget > 0 && !waiting_.empty() &&
         static_cast<int>(running_.size()) < options_.max_num_seqs) {
    auto [arrival, id] = *waiting_.begin();
    Sequence& seq = *seqs_[id];
    int32_t n = static_cast<int32_t>(seq.tokens.size()) - seq.num_computed;
    if (!options_.enable_chunked_prefill && n > budget) break;
    n = std::min(n, budget);
    if (!seq.blocks.Reserve(seq.num_computed + n, options_.block_size, allocator_).ok()) {
      if (running_.empty()) {
        // Nothing holds blocks and it still does not fit: it never will.
        plan.dropped.push_back(id);
        Finish(id);
        continue;
      }
      break;
    }
    waiting_.erase(waiting_.begin());
    running_.insert({arrival, id});
    plan.chunks.push_back(MakeChunk(seq, n));
    seq.num_computed += n;
    budget -= n;
  }
  plan.num_batched_tokens = options_.max_num_batched_tokens - budget;
  return plan;
}

void BatchScheduler::Update(const StepUpdate& update) {
  for (const SampledToken& t : update.tokens) {
    auto it = seqs_.find(t.seq_id);
    if (it == seqs_.end()) continue;  // finished meanwhile
    it->second->tokens.push_back(t.token);
  }
  for (SeqId id : update.finished) Finish(id);
}

void BatchScheduler::Finish(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  Sequence& seq = *it->second;
  Release(seq);
  running_.erase({seq.arrival, id});
  waiting_.erase({seq.arrival, id});
  seqs_.erase(it);
}

double BatchScheduler::kv_usage() const {
  return 1.0 - static_cast<double>(allocator_.num_free()) / allocator_.num_blocks();
}

std::span<const int32_t> BatchScheduler::tokens(SeqId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {};
  return it->second->tokens;
}

}  // namespace moe::server
