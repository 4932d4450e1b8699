// Engine: the frontend's engine loop. One thread owns every request's state and one
// BatchScheduler per attention worker; each iteration it schedules a step for every worker
// with work, sends them (in parallel when there are several), and turns the sampled tokens
// into text deltas, stop decisions and metrics.
//
// Data-parallel attention: with several AttentionWorkers each owns its sequences and its KV
// cache (options.scheduler sizes every worker's cache and budget alike). A new sequence goes
// to the worker with the fewest running + waiting sequences (then the lowest KV usage, then
// the lowest index) and stays there. A worker whose step fails fails only the requests of
// that step; the others go on. With max_consecutive_step_failures > 0 the engine gives up
// (healthy() false) after that many iterations in a row in which every stepped worker
// failed; 0 keeps it serving (a cluster whose ranks can come back).
//
// Pieces (who owns what, which thread calls what):
//   - AttentionWorker: the seam to the model. Step(StepInput) -> StepOutput is shaped like
//     proto/moe/v1/internal.proto's StepRequest/StepResponse: a new sequence's prompt and
//     sampling options are sent once (NewSequence), then per step only chunks (positions
//     and block tables) and the ids to forget. The worker keeps each sequence's tokens
//     (prompt + what it sampled), samples on its side, and returns only token ids and
//     logprobs. InProcessAttentionWorker wraps a Model and a SequenceSampler per sequence;
//     a gRPC client can implement the same interface. Called only from the engine thread.
//   - Engine::Submit (any thread, never blocks): validates the request, checks admission
//     (ResourceExhausted when the waiting queue would exceed max_waiting: HTTP 429), and
//     hands back a RequestStream. The engine thread picks the request up on its next
//     iteration.
//   - RequestStream: the per-request channel. The engine thread pushes ChoiceDelta events
//     without ever blocking; the consumer (an HTTP handler thread) waits on Next(). The
//     buffer is bounded (EngineOptions::max_buffered_events): a consumer that stops reading
//     gets its request cancelled (finish_reason "abort", status ResourceExhausted) instead
//     of stalling the engine. Cancel() (client gone, abort) is seen by the engine thread at
//     its next iteration.
//
// Per sequence the engine stops on, in this order: an end-of-sequence id (unless
// ignore_eos; never before min_tokens), a stop token id, a stop string (the text that could
// still become a stop string is held back from the stream; the stop string itself is not
// returned unless include_stop_str_in_output), max_tokens, max_model_len. Finish reasons
// are OpenAI's: "stop", "length", plus "abort" (cancelled or cut at drain). Text is decoded
// incrementally per sequence (IncrementalDecoder). `n > 1` runs n sequences with seeds
// seed, seed + 1, ...; a request without a seed gets a random one, so each sequence's
// randomness depends only on (seed, position) and never on its batch neighbours.
//
// Metrics (Prometheus, vLLM's names with the `moe_` prefix): moe_num_requests_running,
// moe_num_requests_waiting, moe_kv_cache_usage_perc, moe_request_success_total
// {finished_reason}, moe_prompt_tokens_total, moe_generation_tokens_total,
// moe_num_preemptions_total, histograms moe_time_to_first_token_seconds,
// moe_inter_token_latency_seconds, moe_e2e_request_latency_seconds,
// moe_request_queue_time_seconds, moe_step_duration_seconds, moe_iteration_tokens (tokens
// per step; vLLM calls it iteration_tokens_total, a suffix Prometheus keeps for counters)
// and moe_iteration_num_seqs (sequences per step). No unprefixed aliases
// (num_requests_waiting, ...): the Gateway API inference extension scrapes vLLM's
// `vllm:`-prefixed names by default, which we cannot export (':' is reserved for recording
// rules), so an unprefixed alias would not make it work unchanged either; its metric-name
// settings point at the moe_ names instead.
//
//   auto engine = Engine::Create(options, std::make_unique<InProcessAttentionWorker>(*model));
//   MOE_ASSIGN_OR_RETURN(std::shared_ptr<RequestStream> stream, (*engine)->Submit(request));
//   std::vector<ChoiceDelta> deltas;
//   while (stream->Next(&deltas, absl::Milliseconds(100))) { ... send deltas ... }
//   // stream->status(), stream->usage()
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/status.h"
#include "model/model.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "server/batch_scheduler.h"
#include "worker/attention/attention_step.h"

namespace moe::server {

// ---- The attention-worker seam (compare internal.proto StepRequest / StepResponse) ----

// StepInput / StepOutput are defined beside the step logic they feed
// (worker/attention/attention_step.h), so the worker inside this process and the attention
// worker role run the very same code.
using StepInput = worker::StepInput;
using StepOutput = worker::StepOutput;

class AttentionWorker {
 public:
  virtual ~AttentionWorker() = default;
  // Frees, registers new sequences, computes the chunks and samples where asked. An error
  // means no token of this step was produced; the engine fails the step's sequences.
  virtual absl::StatusOr<StepOutput> Step(const StepInput& input) = 0;
};

// The worker inside this process: the Model (not owned; it must outlive the worker) and a
// SequenceSampler per sequence (worker::AttentionStepRunner).
class InProcessAttentionWorker : public AttentionWorker {
 public:
  explicit InProcessAttentionWorker(model::Model& model) : runner_(model) {}
  absl::StatusOr<StepOutput> Step(const StepInput& input) override { return runner_.Step(input); }

 private:
  worker::AttentionStepRunner runner_;
};

// ---- Requests and their streams ----

struct EngineRequest {
  std::string request_id;  // for logs
  std::vector<int32_t> prompt;
  // Sampling; `seed` is used only when has_seed (otherwise the engine draws one).
  // top_logprobs > 0 reports that many alternatives per token.
  model::SamplingOptions sampling;
  bool has_seed = false;
  int n = 1;
  std::optional<int> max_tokens;  // nullopt: up to max_model_len
  int min_tokens = 0;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop;
  bool include_stop_str_in_output = false;
  bool skip_special_tokens = true;
};

struct TokenInfo {
  int32_t id = 0;
  float logprob = 0.0f;
  std::vector<model::CandidateLogprob> top_logprobs;
};

// What one choice (sequence) produced since the last event.
struct ChoiceDelta {
  int index = 0;
  std::string text;
  std::vector<TokenInfo> tokens;  // the tokens behind this delta
  std::string finish_reason;      // "" while running; "stop" | "length" | "abort"
  // Why a "stop" happened: the matched stop string, or the stop token id (EOS: neither).
  std::optional<std::string> stop_string;
  std::optional<int32_t> stop_token;
};

struct RequestUsage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int cached_tokens = 0;
};

class RequestStream {
 public:
  explicit RequestStream(size_t max_buffered) : max_buffered_(max_buffered) {}

  // Waits up to `timeout` for events and appends them to *out. Returns false once the
  // request is finished and every event has been read.
  bool Next(std::vector<ChoiceDelta>* out, absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_);
  // Asks the engine to stop the request (finish_reason "abort"). Never blocks.
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

  // Valid once Next returned false.
  absl::Status status() const ABSL_LOCKS_EXCLUDED(mu_);
  RequestUsage usage() const ABSL_LOCKS_EXCLUDED(mu_);

  // Engine side. Push returns false when the buffer is full (the consumer is too slow);
  // `force` pushes anyway (final events).
  bool Push(ChoiceDelta delta, bool force) ABSL_LOCKS_EXCLUDED(mu_);
  void Close(absl::Status status, RequestUsage usage) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const size_t max_buffered_;
  std::atomic<bool> cancelled_{false};
  mutable absl::Mutex mu_;
  std::deque<ChoiceDelta> events_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  RequestUsage usage_ ABSL_GUARDED_BY(mu_);
};

// ---- The engine ----

struct EngineOptions {
  BatchSchedulerOptions scheduler;
  // Token events buffered per request before a slow consumer is cancelled.
  size_t max_buffered_events = 4096;
  // Detokenizer (not owned; may be null: no text, stop strings never match).
  const model::Tokenizer* tokenizer = nullptr;
  std::vector<int32_t> eos_ids;
  int32_t vocab_size = 0;  // > 0: prompt ids are checked against it
  // Registry for the metrics (null: the process-wide one).
  common::MetricsRegistry* metrics = nullptr;
  // Monotonic clock in seconds (tests inject one).
  std::function<double()> now;
  // Iterations in a row with every step failed before the engine stops (0 = never).
  int max_consecutive_step_failures = 3;
};

class Engine {
 public:
  // Starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(EngineOptions options,
                                                        std::unique_ptr<AttentionWorker> worker);
  // Data-parallel attention workers (at least one); worker i is "attention worker i" in
  // logs and errors.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      EngineOptions options, std::vector<std::unique_ptr<AttentionWorker>> workers);
  // Stop()s.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Any thread; never blocks on the engine. InvalidArgument names the field (prompt, n,
  // max_tokens, ...); ResourceExhausted when the waiting queue is full; Unavailable after
  // Stop() or when the engine died.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(EngineRequest request)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Finishes every live request with "abort" at the next iteration (drain deadline).
  void AbortAll();
  // Aborts what is left and joins the engine thread. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  // False once the worker failed repeatedly (the engine stops taking requests).
  bool healthy() const { return !dead_.load(); }
  // Requests submitted and not finished yet.
  int num_unfinished() const { return unfinished_.load(); }
  int num_workers() const { return static_cast<int>(workers_.size()); }
  // Sequences assigned to each worker so far (for tests and logs). Any thread.
  std::vector<int64_t> sequences_per_worker() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Metrics;
  struct Request;
  struct Sequence;
  // One attention worker: its batching core, the ids it should forget, and this
  // iteration's step.
  struct Worker {
    Worker(std::unique_ptr<AttentionWorker> w, const BatchSchedulerOptions& options)
        : worker(std::move(w)), scheduler(options) {}
    std::unique_ptr<AttentionWorker> worker;
    BatchScheduler scheduler;
    std::vector<SeqId> pending_free;
    // This iteration.
    bool stepping = false;
    StepInput input;
    int num_batched_tokens = 0;
    absl::StatusOr<StepOutput> out;
  };

  Engine(EngineOptions options, std::vector<std::unique_ptr<AttentionWorker>> workers);
  absl::Status InitMetrics();
  void Loop();
  void Admit(std::unique_ptr<Request> request);
  void ProcessToken(Sequence& seq, const StepOutput::Token& token, double now,
                    std::vector<SeqId>* finished);
  // Marks the sequence finished with `reason`, flushes held-back text, pushes the final
  // delta; closes the request when it was its last sequence. The caller removes it from
  // the scheduler.
  void FinishSequence(Sequence& seq, const std::string& reason, double now,
                      ChoiceDelta delta = {});
  void FailRequest(Request& request, const absl::Status& status, double now);
  void CloseRequest(Request& request, const absl::Status& status, double now);
  // Returns the part of `text` (held-back text + new text) that can be streamed now; holds
  // back the longest tail that is a prefix of a stop string. On a match, sets *matched and
  // returns the text before it (plus the stop string when include_stop_str_in_output).
  std::string HoldBackStopPrefix(Sequence& seq, std::string text,
                                 std::optional<std::string>* matched);
  void UpdateGauges();
  // The worker a new sequence goes to.
  int PickWorker() const;
  bool HasWork() const;
  // Builds this iteration's step of every worker with work; false when none has any.
  bool PlanSteps(double now);
  // Runs the planned steps (in parallel when several).
  void RunSteps();
  // Fails every live request and waits for Stop (the engine gave up).
  void Die(const absl::Status& status, double now);

  // Set at construction.
  const EngineOptions options_;
  std::vector<std::unique_ptr<Worker>> workers_;  // the vector itself never changes
  std::unique_ptr<Metrics> metrics_;

  // Read by any thread.
  std::atomic<bool> dead_{false};
  std::atomic<int> unfinished_{0};
  std::atomic<int> num_waiting_seqs_{0};  // scheduler's waiting + not yet admitted

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Request>> incoming_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool abort_all_ ABSL_GUARDED_BY(mu_) = false;
  int incoming_seqs_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int64_t> assigned_ ABSL_GUARDED_BY(mu_);  // [workers]: sequences assigned

  // Engine thread only.
  std::map<uint64_t, std::unique_ptr<Request>> requests_;  // by request key
  std::map<SeqId, Sequence*> seqs_;
  SeqId next_seq_id_ = 1;
  uint64_t next_request_key_ = 1;
  uint64_t next_step_id_ = 1;
  uint64_t seed_state_ = 0;
  int consecutive_failures_ = 0;
  int64_t reported_preemptions_ = 0;

  std::thread thread_;  // last: starts after everything above exists
};

}  // namespace moe::server
