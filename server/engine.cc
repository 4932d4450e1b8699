#include "server/engine.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace moe::server {

// ---------------------------------------------------------------------------------------
// RequestStream

bool RequestStream::Next(std::vector<ChoiceDelta>* out, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty() || closed_; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  while (!events_.empty()) {
    out->push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return !closed_;
}

absl::Status RequestStream::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

RequestUsage RequestStream::usage() const {
  absl::MutexLock lock(&mu_);
  return usage_;
}

bool RequestStream::Push(ChoiceDelta delta, bool force) {
  absl::MutexLock lock(&mu_);
  if (!force && events_.size() >= max_buffered_) return false;
  events_.push_back(std::move(delta));
  return true;
}

void RequestStream::Close(absl::Status status, RequestUsage usage) {
  absl::MutexLock lock(&mu_);
  closed_ = true;
  status_ = std::move(status);
  usage_ = usage;
}

// ---------------------------------------------------------------------------------------
// Engine state

struct Engine::Metrics {
  common::Gauge* running = nullptr;
  common::Gauge* waiting = nullptr;
  common::Gauge* kv_usage = nullptr;
  common::CounterFamily* success = nullptr;
  common::Counter* prompt_tokens = nullptr;
  common::Counter* generation_tokens = nullptr;
  common::Counter* preemptions = nullptr;
  common::Counter* step_errors = nullptr;
  common::Histogram* ttft = nullptr;
  common::Histogram* itl = nullptr;
  common::Histogram* e2e = nullptr;
  common::Histogram* queue = nullptr;
  common::Histogram* step = nullptr;
  common::Histogram* iteration_tokens = nullptr;
  common::Histogram* iteration_seqs = nullptr;
};

struct Engine::Request {
  uint64_t key = 0;
  EngineRequest req;
  std::shared_ptr<RequestStream> stream;
  double arrival = 0.0;
  std::vector<std::unique_ptr<Sequence>> seqs;
  int num_finished = 0;
  bool scheduled = false;    // a chunk of it ran (queue time observed)
  bool first_token = false;  // TTFT observed
  bool closed = false;
};

struct Engine::Sequence {
  Request* request = nullptr;
  SeqId id = 0;
  int index = 0;
  model::SamplingOptions sampling;  // seed resolved
  std::vector<int32_t> outputs;
  std::unique_ptr<model::IncrementalDecoder> decoder;
  std::string held;  // text that may still become a stop string
  int worker = 0;  // index into workers_
  bool sent_to_worker = false;
  bool finished = false;
  double last_token_time = 0.0;
};

namespace {

double SteadySeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

bool Contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

Engine::Engine(EngineOptions options, std::vector<std::unique_ptr<AttentionWorker>> workers)
    : options_(std::move(options)) {
  for (auto& w : workers) {
    workers_.push_back(std::make_unique<Worker>(std::move(w), options_.scheduler));
  }
  assigned_.assign(workers_.size(), 0);
  std::random_device rd;
  seed_state_ = (uint64_t{rd()} << 32) ^ rd();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options,
                                                       std::unique_ptr<AttentionWorker> worker) {
  std::vector<std::unique_ptr<AttentionWorker>> workers;
  workers.push_back(std::move(worker));
  return Create(std::move(options), std::move(workers));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    EngineOptions options, std::vector<std::unique_ptr<AttentionWorker>> workers) {
  if (workers.empty()) return absl::InvalidArgumentError("workers: need at least one");
  for (const auto& w : workers) {
    if (w == nullptr) return absl::InvalidArgumentError("worker: must not be null");
  }
  const BatchSchedulerOptions& s = options.scheduler;
  if (s.max_num_seqs <= 0 || s.max_num_batched_tokens <= 0 || s.block_size <= 0 ||
      s.num_blocks <= 0 || s.max_model_len <= 1 || s.max_waiting <= 0) {
    return absl::InvalidArgumentError("scheduler options must be positive");
  }
  if (!options.now) options.now = SteadySeconds;
  std::unique_ptr<Engine> engine(new Engine(std::move(options), std::move(workers)));
  MOE_RETURN_IF_ERROR(engine->InitMetrics());
  engine->thread_ = std::thread([e = engine.get()] { e->Loop(); });
  return engine;
}

Engine::~Engine() { Stop(); }

absl::Status Engine::InitMetrics() {
  common::MetricsRegistry& reg =
      options_.metrics != nullptr ? *options_.metrics : common::DefaultMetricsRegistry();
  metrics_ = std::make_unique<Metrics>();
  Metrics& m = *metrics_;
  MOE_ASSIGN_OR_RETURN(auto running, reg.AddGauge("moe_num_requests_running",
                                                  "Sequences in the running batch."));
  MOE_ASSIGN_OR_RETURN(auto waiting, reg.AddGauge("moe_num_requests_waiting",
                                                  "Sequences waiting to be scheduled."));
  MOE_ASSIGN_OR_RETURN(auto kv, reg.AddGauge("moe_kv_cache_usage_perc",
                                             "Fraction of KV cache blocks in use (1 = 100%)."));
  m.running = &running->Get();
  m.waiting = &waiting->Get();
  m.kv_usage = &kv->Get();
  MOE_ASSIGN_OR_RETURN(m.success, reg.AddCounter("moe_request_success_total",
                                                 "Finished sequences by finish reason.",
                                                 {"finished_reason"}));
  MOE_ASSIGN_OR_RETURN(auto prompt, reg.AddCounter("moe_prompt_tokens_total",
                                                   "Prompt tokens of admitted requests."));
  MOE_ASSIGN_OR_RETURN(auto gen, reg.AddCounter("moe_generation_tokens_total",
                                                "Generated tokens."));
  MOE_ASSIGN_OR_RETURN(auto pre, reg.AddCounter("moe_num_preemptions_total",
                                                "Sequences preempted (recomputed later)."));
  MOE_ASSIGN_OR_RETURN(auto errs, reg.AddCounter("moe_engine_step_errors_total",
                                                 "Engine steps the attention worker failed."));
  m.prompt_tokens = &prompt->Get();
  m.generation_tokens = &gen->Get();
  m.preemptions = &pre->Get();
  m.step_errors = &errs->Get();
  auto hist = [&](const char* name, const char* help,
                  std::vector<double> bounds) -> absl::StatusOr<common::Histogram*> {
    MOE_ASSIGN_OR_RETURN(auto family, reg.AddHistogram(name, help, {}, std::move(bounds)));
    return &family->Get();
  };
  const std::vector<double> latency = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                       0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                       20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
  const std::vector<double> request = {0.3,  0.5,  0.8,   1.0,   1.5,   2.0,   2.5,
                                       5.0,  10.0, 15.0,  20.0,  30.0,  40.0,  50.0,
                                       60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  MOE_ASSIGN_OR_RETURN(m.ttft, hist("moe_time_to_first_token_seconds",
                                    "Time from arrival to the first token.", latency));
  MOE_ASSIGN_OR_RETURN(m.itl, hist("moe_inter_token_latency_seconds",
                                   "Time between consecutive tokens of a sequence.", latency));
  MOE_ASSIGN_OR_RETURN(m.e2e, hist("moe_e2e_request_latency_seconds",
                                   "Time from arrival to the end of a request.", request));
  MOE_ASSIGN_OR_RETURN(m.queue, hist("moe_request_queue_time_seconds",
                                     "Time from arrival to the first scheduled chunk.", request));
  MOE_ASSIGN_OR_RETURN(m.step, hist("moe_step_duration_seconds",
                                    "Duration of one engine step on the attention worker.",
                                    latency));
  MOE_ASSIGN_OR_RETURN(m.iteration_tokens,
                       hist("moe_iteration_tokens", "Tokens computed per engine step.",
                            {1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384}));
  MOE_ASSIGN_OR_RETURN(m.iteration_seqs,
                       hist("moe_iteration_num_seqs", "Sequences per engine step.",
                            {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024}));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Any thread

absl::StatusOr<std::shared_ptr<RequestStream>> Engine::Submit(EngineRequest request) {
  if (dead_.load()) return absl::UnavailableError("the engine stopped after worker failures");
  const BatchSchedulerOptions& s = options_.scheduler;
  const int64_t prompt_len = static_cast<int64_t>(request.prompt.size());
  if (prompt_len == 0) return absl::InvalidArgumentError("prompt: must contain at least one token");
  if (options_.vocab_size > 0) {
    for (int32_t id : request.prompt) {
      if (id < 0 || id >= options_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "prompt: token id ", id, " is outside the vocabulary [0, ", options_.vocab_size, ")"));
      }
    }
  }
  if (prompt_len >= s.max_model_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt: this model's maximum context length is ", s.max_model_len,
                     " tokens, and the prompt has ", prompt_len, " tokens"));
  }
  if (request.n < 1 || request.n > s.max_waiting) {
    return absl::InvalidArgumentError(
        absl::StrCat("n: must be in [1, ", s.max_waiting, "], got ", request.n));
  }
  if (request.max_tokens.has_value()) {
    if (*request.max_tokens < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_tokens: must be >= 1, got ", *request.max_tokens));
    }
    if (prompt_len + *request.max_tokens > s.max_model_len) {
      return absl::InvalidArgumentError(absl::StrCat(
          "max_tokens: this model's maximum context length is ", s.max_model_len,
          " tokens; the prompt has ", prompt_len, " tokens and max_tokens is ",
          *request.max_tokens));
    }
  }
  if (request.min_tokens < 0 ||
      (request.max_tokens.has_value() && request.min_tokens > *request.max_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "min_tokens: must be in [0, max_tokens], got ", request.min_tokens));
  }
  for (const std::string& stop : request.stop) {
    if (stop.empty()) return absl::InvalidArgumentError("stop: stop strings must not be empty");
  }
  MOE_RETURN_IF_ERROR(model::ValidateSamplingOptions(request.sampling));

  auto r = std::make_unique<Request>();
  r->stream = std::make_shared<RequestStream>(options_.max_buffered_events);
  r->arrival = options_.now();
  const int n = request.n;
  r->req = std::move(request);
  std::shared_ptr<RequestStream> stream = r->stream;
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (num_waiting_seqs_.load() + incoming_seqs_ + n > s.max_waiting) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the waiting queue is full (", s.max_waiting, " sequences); retry later"));
  }
  incoming_seqs_ += n;
  unfinished_.fetch_add(1);
  incoming_.push_back(std::move(r));
  return stream;
}

void Engine::AbortAll() {
  absl::MutexLock lock(&mu_);
  abort_all_ = true;
}

void Engine::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

// ---------------------------------------------------------------------------------------
// Engine thread

void Engine::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Request>> incoming;
    bool stopping = false, abort_all = false;
    {
      absl::MutexLock lock(&mu_);
      if (!HasWork()) {
        auto signalled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !incoming_.empty() || stopping_ || abort_all_;
        };
        mu_.AwaitWithTimeout(absl::Condition(&signalled), absl::Milliseconds(100));
      }
      incoming.swap(incoming_);
      incoming_seqs_ = 0;
      stopping = stopping_;
      abort_all = abort_all_;
      abort_all_ = false;
    }
    double now = options_.now();
    for (auto& r : incoming) Admit(std::move(r));

    // Cancellations (client gone), drain cut-off and shutdown.
    for (auto& [key, r] : requests_) {
      if (r->closed) continue;
      if (abort_all || stopping || r->stream->cancelled()) {
        for (auto& seq : r->seqs) FinishSequence(*seq, "abort", now);
      }
    }
    std::erase_if(requests_, [](const auto& kv) { return kv.second->closed; });
    if (stopping) break;

    if (!PlanSteps(now)) {
      bool work = false;
      for (const auto& w : workers_) work = work || w->scheduler.has_work();
      // Work that cannot be scheduled now (should not happen: a sequence that can never
      // fit is dropped); do not spin.
      if (work) absl::SleepFor(absl::Milliseconds(1));
      UpdateGauges();
      continue;
    }
    UpdateGauges();
    const double t0 = options_.now();
    RunSteps();
    now = options_.now();

    int num_tokens = 0, num_seqs = 0, num_computing = 0, num_failed = 0;
    absl::Status last_error;
    for (size_t wi = 0; wi < workers_.size(); ++wi) {
      Worker& w = *workers_[wi];
      if (!w.stepping) continue;
      w.stepping = false;
      if (w.input.chunks.empty()) continue;  // frees only: errors do not matter
      ++num_computing;
      num_tokens += w.num_batched_tokens;
      num_seqs += static_cast<int>(w.input.chunks.size());
      if (!w.out.ok()) {
        ++num_failed;
        last_error = w.out.status();
        metrics_->step_errors->Inc();
        MOE_LOG(ERROR) << "engine step failed" << common::Kv("worker", wi)
                       << common::Kv("step", w.input.step_id) << ": " << w.out.status().ToString();
        for (const StepInput::Chunk& c : w.input.chunks) {
          auto it = seqs_.find(c.seq_id);
          if (it != seqs_.end()) FailRequest(*it->second->request, w.out.status(), now);
        }
        continue;
      }
      StepUpdate update;
      std::vector<SeqId> finished;
      for (const StepOutput::Token& t : w.out->tokens) {
        auto it = seqs_.find(t.seq_id);
        if (it == seqs_.end()) continue;
        update.tokens.push_back({t.seq_id, t.token_id});
        ProcessToken(*it->second, t, now, &finished);
      }
      w.scheduler.Update(update);
    }
    if (num_computing > 0) {
      metrics_->step->Observe(now - t0);
      metrics_->iteration_tokens->Observe(num_tokens);
      metrics_->iteration_seqs->Observe(num_seqs);
    }
    std::erase_if(requests_, [](const auto& kv) { return kv.second->closed; });
    if (num_computing > 0 && num_failed == num_computing) {
      const int limit = options_.max_consecutive_step_failures;
      if (++consecutive_failures_ >= limit && limit > 0) {
        Die(last_error, now);
        return;
      }
    } else if (num_computing > 0) {
      consecutive_failures_ = 0;
    }
    UpdateGauges();
  }
  UpdateGauges();
}

bool Engine::HasWork() const {
  for (const auto& w : workers_) {
    if (w->scheduler.has_work() || !w->pending_free.empty()) return true;
  }
  return false;
}

bool Engine::PlanSteps(double now) {
  bool any = false;
  // One step id for the whole iteration: expert ranks merge the dispatches of every
  // attention worker for the same (step, layer).
  const uint64_t step_id = next_step_id_;
  for (auto& wp : workers_) {
    Worker& w = *wp;
    w.stepping = false;
    StepPlan plan = w.scheduler.Schedule();
    for (SeqId id : plan.dropped) {
      auto it = seqs_.find(id);
      if (it != seqs_.end()) FinishSequence(*it->second, "length", now);
    }
    if (plan.empty() && w.pending_free.empty()) continue;
    w.input = StepInput{};
    w.input.step_id = step_id;
    w.input.freed_seq_ids.swap(w.pending_free);
    w.num_batched_tokens = plan.num_batched_tokens;
    for (const ScheduledChunk& c : plan.chunks) {
      Sequence& seq = *seqs_.at(c.seq_id);
      if (!seq.sent_to_worker) {
        w.input.new_sequences.push_back({.seq_id = seq.id,
                                         .prompt_token_ids = seq.request->req.prompt,
                                         .output_token_ids = seq.outputs,
                                         .sampling = seq.sampling});
        seq.sent_to_worker = true;
      }
      if (!seq.request->scheduled) {
        seq.request->scheduled = true;
        metrics_->queue->Observe(now - seq.request->arrival);
      }
      w.input.chunks.push_back({.seq_id = c.seq_id,
                                .start_position = c.start_position,
                                .num_tokens = c.num_tokens,
                                .block_table = {c.block_table.begin(), c.block_table.end()},
                                .sample = c.sample});
    }
    w.stepping = true;
    any = true;
  }
  if (any) ++next_step_id_;
  return any;
}

void Engine::RunSteps() {
  std::vector<Worker*> active;
  for (auto& w : workers_) {
    if (w->stepping) active.push_back(w.get());
  }
  // The first runs on this thread, the others each on a thread of their own: a step takes
  // milliseconds at least, far more than starting a thread.
  std::vector<std::thread> threads;
  for (size_t i = 1; i < active.size(); ++i) {
    threads.emplace_back([w = active[i]] { w->out = w->worker->Step(w->input); });
  }
  if (!active.empty()) active[0]->out = active[0]->worker->Step(active[0]->input);
  for (std::thread& t : threads) t.join();
}

void Engine::Die(const absl::Status& status, double now) {
  dead_.store(true);
  MOE_LOG(ERROR) << "engine: the attention workers failed " << consecutive_failures_
                 << " steps in a row; giving up";
  for (auto& [key, r] : requests_) {
    if (!r->closed) FailRequest(*r, status, now);
  }
  std::vector<std::unique_ptr<Request>> rest;
  {
    absl::MutexLock lock(&mu_);
    rest.swap(incoming_);
  }
  for (auto& r : rest) {
    r->stream->Close(absl::UnavailableError("the engine stopped"), {});
    unfinished_.fetch_sub(1);
  }
  std::erase_if(requests_, [](const auto& kv) { return kv.second->closed; });
  UpdateGauges();
  // Keep serving Submit's Unavailable; wait for Stop.
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
  mu_.Await(absl::Condition(&stop));
}

std::vector<int64_t> Engine::sequences_per_worker() const {
  absl::MutexLock lock(&mu_);
  return assigned_;
}

int Engine::PickWorker() const {
  int best = 0;
  auto load = [&](int i) {
    const BatchScheduler& s = workers_[i]->scheduler;
    return std::make_pair(s.num_running() + s.num_waiting(), s.kv_usage());
  };
  for (int i = 1; i < static_cast<int>(workers_.size()); ++i) {
    if (load(i) < load(best)) best = i;
  }
  return best;
}

void Engine::UpdateGauges() {
  int running = 0, waiting = 0;
  int64_t preemptions = 0;
  double kv = 0.0;
  for (const auto& w : workers_) {
    running += w->scheduler.num_running();
    waiting += w->scheduler.num_waiting();
    kv += w->scheduler.kv_usage();
    preemptions += w->scheduler.num_preemptions();
  }
  metrics_->running->Set(running);
  metrics_->waiting->Set(waiting);
  // Mean over the workers: every worker has a cache of the same size.
  metrics_->kv_usage->Set(kv / static_cast<double>(workers_.size()));
  num_waiting_seqs_.store(waiting);
  if (preemptions > reported_preemptions_) {
    metrics_->preemptions->Inc(static_cast<double>(preemptions - reported_preemptions_));
    reported_preemptions_ = preemptions;
  }
}

void Engine::Admit(std::unique_ptr<Request> owned) {
  Request& r = *owned;
  r.key = next_request_key_++;
  requests_[r.key] = std::move(owned);
  const EngineRequest& req = r.req;
  std::vector<int32_t> blocked = req.stop_token_ids;
  if (!req.ignore_eos) blocked.insert(blocked.end(), options_.eos_ids.begin(), options_.eos_ids.end());
  const uint64_t base_seed = req.has_seed ? req.sampling.seed : SplitMix64(seed_state_);
  for (int i = 0; i < req.n; ++i) {
    auto seq = std::make_unique<Sequence>();
    seq->request = &r;
    seq->id = next_seq_id_++;
    seq->index = i;
    seq->sampling = req.sampling;
    seq->sampling.seed = base_seed + static_cast<uint64_t>(i);
    seq->sampling.min_tokens = req.min_tokens;
    seq->sampling.min_tokens_blocked = blocked;
    if (options_.tokenizer != nullptr) {
      seq->decoder =
          std::make_unique<model::IncrementalDecoder>(*options_.tokenizer, req.skip_special_tokens);
    }
    seq->worker = PickWorker();
    absl::Status added = workers_[seq->worker]->scheduler.Add(seq->id, req.prompt);
    if (added.ok()) {
      absl::MutexLock lock(&mu_);
      ++assigned_[seq->worker];
    }
    seqs_[seq->id] = seq.get();
    r.seqs.push_back(std::move(seq));
    if (!added.ok()) {
      FailRequest(r, added, options_.now());
      return;
    }
  }
  metrics_->prompt_tokens->Inc(static_cast<double>(req.prompt.size()));
  int waiting = 0;
  for (const auto& w : workers_) waiting += w->scheduler.num_waiting();
  num_waiting_seqs_.store(waiting);
}

std::string Engine::HoldBackStopPrefix(Sequence& seq, std::string text,
                                      std::optional<std::string>* matched) {
  const EngineRequest& req = seq.request->req;
  size_t best = std::string::npos;
  const std::string* match = nullptr;
  for (const std::string& stop : req.stop) {
    size_t pos = text.find(stop);
    if (pos != std::string::npos && (best == std::string::npos || pos < best)) {
      best = pos;
      match = &stop;
    }
  }
  if (match != nullptr) {
    *matched = *match;
    seq.held.clear();
    return text.substr(0, best) + (req.include_stop_str_in_output ? *match : std::string());
  }
  size_t hold = 0;
  for (const std::string& stop : req.stop) {
    for (size_t k = std::min(stop.size() - 1, text.size()); k > hold; --k) {
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  seq.held = text.substr(text.size() - hold);
  text.resize(text.size() - hold);
  return text;
}

void Engine::ProcessToken(Sequence& seq, const StepOutput::Token& token, double now,
                          std::vector<SeqId>* finished) {
  if (seq.finished) return;
  Request& r = *seq.request;
  const EngineRequest& req = r.req;
  seq.outputs.push_back(token.token_id);
  metrics_->generation_tokens->Inc();
  if (!r.first_token) {
    r.first_token = true;
    metrics_->ttft->Observe(now - r.arrival);
  } else if (seq.outputs.size() > 1) {
    metrics_->itl->Observe(now - seq.last_token_time);
  }
  seq.last_token_time = now;

  ChoiceDelta delta;
  delta.index = seq.index;
  delta.tokens.push_back({token.token_id, token.logprob, token.top_logprobs});
  const int num_out = static_cast<int>(seq.outputs.size());
  const bool past_min = num_out >= req.min_tokens;
  const bool eos = !req.ignore_eos && Contains(options_.eos_ids, token.token_id);
  const bool stop_id = Contains(req.stop_token_ids, token.token_id);
  if (past_min && (eos || stop_id)) {
    if (!eos) delta.stop_token = token.token_id;
    FinishSequence(seq, "stop", now, std::move(delta));
    finished->push_back(seq.id);
    return;
  }
  std::string text = seq.decoder != nullptr ? seq.decoder->Add(token.token_id) : std::string();
  bool stopped = false;
  if (!req.stop.empty() && past_min) {
    text = HoldBackStopPrefix(seq, seq.held + text, &delta.stop_string);
    stopped = delta.stop_string.has_value();
  } else if (!seq.held.empty()) {
    text = seq.held + text;
    seq.held.clear();
  }
  delta.text = std::move(text);
  const int64_t total = static_cast<int64_t>(req.prompt.size()) + num_out;
  const int max_tokens = req.max_tokens.value_or(INT_MAX);
  if (stopped) {
    FinishSequence(seq, "stop", now, std::move(delta));
    finished->push_back(seq.id);
  } else if (num_out >= max_tokens || total >= options_.scheduler.max_model_len) {
    FinishSequence(seq, "length", now, std::move(delta));
    finished->push_back(seq.id);
  } else if (!r.stream->Push(std::move(delta), /*force=*/false)) {
    MOE_LOG(WARNING) << "request " << req.request_id
                     << ": client is not reading its stream; cancelling";
    FailRequest(r, absl::ResourceExhaustedError("the client did not read its stream in time"),
                now);
  }
}

void Engine::FinishSequence(Sequence& seq, const std::string& reason, double now,
                            ChoiceDelta delta) {
  if (seq.finished) return;
  seq.finished = true;
  Request& r = *seq.request;
  if (!delta.stop_string.has_value()) {
    delta.text += seq.held;
    if (seq.decoder != nullptr) delta.text += seq.decoder->Finish();
  }
  seq.held.clear();
  delta.index = seq.index;
  delta.finish_reason = reason;
  r.stream->Push(std::move(delta), /*force=*/true);
  Worker& w = *workers_[seq.worker];
  w.scheduler.Finish(seq.id);
  if (seq.sent_to_worker) w.pending_free.push_back(seq.id);
  seqs_.erase(seq.id);
  auto counter = metrics_->success->WithLabels({reason});
  if (counter.ok()) (*counter)->Inc();
  if (++r.num_finished == static_cast<int>(r.seqs.size())) CloseRequest(r, absl::OkStatus(), now);
}

void Engine::FailRequest(Request& r, const absl::Status& status, double now) {
  if (r.closed) return;
  for (auto& seq : r.seqs) {
    if (seq->finished) continue;
    seq->finished = true;
    Worker& w = *workers_[seq->worker];
    w.scheduler.Finish(seq->id);
    if (seq->sent_to_worker) w.pending_free.push_back(seq->id);
    seqs_.erase(seq->id);
    r.stream->Push({.index = seq->index, .finish_reason = "abort"}, /*force=*/true);
  }
  CloseRequest(r, status, now);
}

void Engine::CloseRequest(Request& r, const absl::Status& status, double now) {
  if (r.closed) return;
  r.closed = true;
  RequestUsage usage;
  usage.prompt_tokens = static_cast<int>(r.req.prompt.size());
  for (const auto& seq : r.seqs) usage.completion_tokens += static_cast<int>(seq->outputs.size());
  // Counters first: a reader may act on them as soon as the stream closes.
  metrics_->e2e->Observe(now - r.arrival);
  unfinished_.fetch_sub(1);
  r.stream->Close(status, usage);
}

}  // namespace moe::server
