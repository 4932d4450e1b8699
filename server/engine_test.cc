// Tests of the Engine with a scripted AttentionWorker: stop conditions (EOS, stop ids, stop
// strings across token boundaries, max_tokens, max_model_len, min_tokens), n > 1,
// cancellation, admission (queue full) and slow consumers.
#include "server/engine.h"

#include <atomic>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe::server {
namespace {

// Vocabulary: ids 0..25 are 'a'..'z', 26 "st", 27 "op", 28 " " (Ġ), 29 "<eos>" (special).
constexpr int32_t kSt = 26, kOp = 27, kSpace = 28, kEos = 29;

int32_t L(char c) { return c - 'a'; }

std::unique_ptr<model::Tokenizer> MakeTokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (char c = 'a'; c <= 'z'; ++c) vocab[std::string(1, c)] = L(c);
  vocab["st"] = kSt;
  vocab["op"] = kOp;
  vocab["\xC4\xA0"] = kSpace;  // "Ġ"
  vocab["<eos>"] = kEos;
  nlohmann::json tok = {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", kEos}, {"content", "<eos>"}, {"single_word", false}, {"lstrip", false},
         {"rstrip", false}, {"normalized", false}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false},
                         {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
                   {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                 {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                 {"fuse_unk", false}, {"byte_fallback", false}, {"vocab", vocab},
                 {"merges", nlohmann::json::array()}}}};
  std::string json = tok.dump();
  std::string config = R"({"eos_token": "<eos>"})";
  auto t = model::Tokenizer::FromJson({.tokenizer_json = json, .tokenizer_config_json = config});
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

// Produces, for a sequence whose prompt starts with token p, script[p][k] as its k-th output
// (then 'z' forever). Optionally blocks the first step until `gate` is notified.
class ScriptedWorker : public AttentionWorker {
 public:
  explicit ScriptedWorker(std::map<int32_t, std::vector<int32_t>> script)
      : script_(std::move(script)) {}

  absl::StatusOr<StepOutput> Step(const StepInput& input) override {
    if (gate_ != nullptr) gate_->WaitForNotification();
    StepOutput out;
    for (SeqId id : input.freed_seq_ids) seqs_.erase(id);
    for (const auto& ns : input.new_sequences) {
      seqs_[ns.seq_id] = {ns.prompt_token_ids[0], static_cast<int>(ns.output_token_ids.size())};
      seeds_[ns.seq_id] = ns.sampling.seed;
    }
    max_chunks_ = std::max(max_chunks_, static_cast<int>(input.chunks.size()));
    for (const auto& c : input.chunks) {
      if (!c.sample) continue;
      auto& [first, produced] = seqs_.at(c.seq_id);
      const auto& s = script_[first];
      int32_t tok = produced < static_cast<int>(s.size()) ? s[produced] : L('z');
      ++produced;
      out.tokens.push_back({.seq_id = c.seq_id, .token_id = tok, .logprob = -0.5f});
    }
    return out;
  }

  absl::Notification* gate_ = nullptr;
  int max_chunks_ = 0;
  std::map<SeqId, uint64_t> seeds_;

 private:
  std::map<int32_t, std::vector<int32_t>> script_;
  std::map<SeqId, std::pair<int32_t, int>> seqs_;
};

struct Result {
  std::map<int, std::string> text;
  std::map<int, std::string> finish;
  std::map<int, int> tokens;
  std::map<int, std::optional<std::string>> stop_string;
  absl::Status status;
  RequestUsage usage;
};

Result Drain(RequestStream& stream) {
  Result r;
  std::vector<ChoiceDelta> deltas;
  bool more = true;
  while (more) {
    more = stream.Next(&deltas, absl::Milliseconds(50));
    for (ChoiceDelta& d : deltas) {
      r.text[d.index] += d.text;
      r.tokens[d.index] += static_cast<int>(d.tokens.size());
      if (!d.finish_reason.empty()) {
        r.finish[d.index] = d.finish_reason;
        r.stop_string[d.index] = d.stop_string;
      }
    }
    deltas.clear();
  }
  r.status = stream.status();
  r.usage = stream.usage();
  return r;
}

class EngineTest : public ::testing::Test {
 protected:
  void Start(std::map<int32_t, std::vector<int32_t>> script, BatchSchedulerOptions sched = {},
             size_t max_buffered = 4096) {
    tokenizer_ = MakeTokenizer();
    auto worker = std::make_unique<ScriptedWorker>(std::move(script));
    worker_ = worker.get();
    worker_->gate_ = gate_;
    sched.block_size = 4;
    if (sched.num_blocks == 1024) sched.num_blocks = 256;
    auto e = Engine::Create({.scheduler = sched,
                             .max_buffered_events = max_buffered,
                             .tokenizer = tokenizer_.get(),
                             .eos_ids = {kEos},
                             .vocab_size = 30,
                             .metrics = &registry_},
                            std::move(worker));
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
  }

  Result Run(EngineRequest req) {
    auto stream = engine_->Submit(std::move(req));
    EXPECT_TRUE(stream.ok()) << stream.status();
    if (!stream.ok()) return {};
    return Drain(**stream);
  }

  common::MetricsRegistry registry_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  ScriptedWorker* worker_ = nullptr;
  absl::Notification* gate_ = nullptr;
  std::unique_ptr<Engine> engine_;
};

TEST_F(EngineTest, MaxTokensFinishesWithLength) {
  Start({{L('a'), {L('h'), L('e'), L('l'), L('l'), L('o')}}});
  Result r = Run({.prompt = {L('a'), L('b')}, .max_tokens = 3});
  EXPECT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.text[0], "hel");
  EXPECT_EQ(r.finish[0], "length");
  EXPECT_EQ(r.usage.prompt_tokens, 2);
  EXPECT_EQ(r.usage.completion_tokens, 3);
  EXPECT_EQ(r.tokens[0], 3);
}

TEST_F(EngineTest, EosStopsUnlessIgnored) {
  Start({{L('a'), {L('h'), L('i'), kEos, L('x')}}});
  Result r = Run({.prompt = {L('a')}, .max_tokens = 10});
  EXPECT_EQ(r.text[0], "hi");
  EXPECT_EQ(r.finish[0], "stop");
  EXPECT_EQ(r.usage.completion_tokens, 3);  // EOS counts, as in vLLM
  Result ignored = Run({.prompt = {L('a')}, .max_tokens = 4, .ignore_eos = true});
  EXPECT_EQ(ignored.text[0], "hix");  // the special token is skipped in text
  EXPECT_EQ(ignored.finish[0], "length");
}

TEST_F(EngineTest, EosBeforeMinTokensIsNotAStop) {
  Start({{L('a'), {kEos, L('o'), L('k'), kEos}}});
  Result r = Run({.prompt = {L('a')}, .max_tokens = 10, .min_tokens = 2});
  EXPECT_EQ(r.text[0], "ok");
  EXPECT_EQ(r.finish[0], "stop");
  EXPECT_EQ(r.usage.completion_tokens, 4);
}

TEST_F(EngineTest, StopTokenIds) {
  Start({{L('a'), {L('h'), L('q'), L('i')}}});
  Result r = Run({.prompt = {L('a')}, .max_tokens = 10, .stop_token_ids = {L('q')}});
  EXPECT_EQ(r.text[0], "h");
  EXPECT_EQ(r.finish[0], "stop");
}

TEST_F(EngineTest, StopStringAcrossTokenBoundaries) {
  // Text "a" "st" "op" "b": the stop string "top" spans "st" and "op".
  Start({{L('a'), {L('a'), kSt, kOp, L('b')}}});
  auto stream = engine_->Submit({.prompt = {L('a')}, .max_tokens = 10, .stop = {"top", "zzz"}});
  ASSERT_TRUE(stream.ok());
  // Everything streamed before the stop must be a prefix of "as": "t" is held back.
  Result r = Drain(**stream);
  EXPECT_EQ(r.text[0], "as");
  EXPECT_EQ(r.finish[0], "stop");
  EXPECT_EQ(r.stop_string[0], "top");
  EXPECT_EQ(r.usage.completion_tokens, 3);
}

TEST_F(EngineTest, StopStringIncludedWhenAsked) {
  Start({{L('a'), {L('a'), kSt, kOp, L('b')}}});
  Result r = Run({.prompt = {L('a')}, .max_tokens = 10, .stop = {"top"},
                  .include_stop_str_in_output = true});
  EXPECT_EQ(r.text[0], "astop");
}

TEST_F(EngineTest, HeldBackTextIsFlushedAtLength) {
  Start({{L('a'), {L('x'), L('s'), L('t')}}});
  Result r = Run({.prompt = {L('a')}, .max_tokens = 3, .stop = {"stop"}});
  EXPECT_EQ(r.text[0], "xst");
  EXPECT_EQ(r.finish[0], "length");
}

TEST_F(EngineTest, StopsAtMaxModelLen) {
  Start({}, {.max_model_len = 6});
  Result r = Run({.prompt = {L('a'), L('b'), L('c'), L('d')}});
  EXPECT_EQ(r.text[0], "zz");
  EXPECT_EQ(r.finish[0], "length");
}

TEST_F(EngineTest, NGreaterThanOneRunsSeparateSequences) {
  Start({{L('a'), {L('h'), kEos}}});
  Result r = Run({.prompt = {L('a')}, .sampling = {.seed = 10}, .has_seed = true, .n = 3,
                  .max_tokens = 5});
  ASSERT_EQ(r.finish.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(r.text[i], "h") << i;
    EXPECT_EQ(r.finish[i], "stop") << i;
  }
  EXPECT_EQ(r.usage.completion_tokens, 6);
  EXPECT_EQ(r.usage.prompt_tokens, 1);
  std::vector<uint64_t> seeds;
  for (auto& [id, seed] : worker_->seeds_) seeds.push_back(seed);
  EXPECT_EQ(seeds, (std::vector<uint64_t>{10, 11, 12}));
}

TEST_F(EngineTest, ManyRequestsBatchTogether) {
  absl::Notification gate;
  gate_ = &gate;
  Start({});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 8; ++i) {
    auto s = engine_->Submit({.prompt = {L('a'), L('b')}, .max_tokens = 4});
    ASSERT_TRUE(s.ok());
    streams.push_back(*s);
  }
  gate.Notify();
  for (auto& s : streams) {
    Result r = Drain(*s);
    EXPECT_EQ(r.text[0], "zzzz");
  }
  EXPECT_GE(worker_->max_chunks_, 7);  // the first request may have gone alone
}

TEST_F(EngineTest, CancelAbortsTheRequest) {
  Start({});
  auto stream = engine_->Submit({.prompt = {L('a')}});  // runs to max_model_len otherwise
  ASSERT_TRUE(stream.ok());
  std::vector<ChoiceDelta> deltas;
  while (deltas.empty()) (*stream)->Next(&deltas, absl::Milliseconds(50));
  (*stream)->Cancel();
  Result r = Drain(**stream);
  EXPECT_EQ(r.finish[0], "abort");
  EXPECT_EQ(engine_->num_unfinished(), 0);
}

TEST_F(EngineTest, QueueFullIsResourceExhausted) {
  absl::Notification gate;
  gate_ = &gate;
  Start({}, {.max_waiting = 2});
  std::vector<std::shared_ptr<RequestStream>> streams;
  auto first = engine_->Submit({.prompt = {L('a')}, .max_tokens = 2});
  ASSERT_TRUE(first.ok());
  // Wait until the first request is running (its step is blocked on the gate).
  for (int i = 0; i < 200 && registry_.Render().find("moe_num_requests_running 1") ==
                                 std::string::npos; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  auto b = engine_->Submit({.prompt = {L('a')}, .max_tokens = 2});
  auto c = engine_->Submit({.prompt = {L('a')}, .max_tokens = 2});
  auto d = engine_->Submit({.prompt = {L('a')}, .max_tokens = 2});
  EXPECT_TRUE(b.ok());
  EXPECT_TRUE(c.ok());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  auto big = engine_->Submit({.prompt = {L('a')}, .n = 2, .max_tokens = 2});
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  gate.Notify();
  EXPECT_EQ(Drain(**first).finish[0], "length");
  EXPECT_EQ(Drain(**b).finish[0], "length");
  EXPECT_EQ(Drain(**c).finish[0], "length");
  // Served again once the queue drained.
  EXPECT_TRUE(engine_->Submit({.prompt = {L('a')}, .max_tokens = 1}).ok());
}

TEST_F(EngineTest, SlowConsumerIsCancelled) {
  Start({}, {}, /*max_buffered=*/2);
  auto stream = engine_->Submit({.prompt = {L('a')}, .max_tokens = 50});
  ASSERT_TRUE(stream.ok());
  for (int i = 0; i < 400 && engine_->num_unfinished() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  Result r = Drain(**stream);
  EXPECT_EQ(r.status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(r.finish[0], "abort");
  EXPECT_LT(r.tokens[0], 50);
}

TEST_F(EngineTest, InvalidRequestsNameTheField) {
  Start({}, {.max_model_len = 16});
  auto msg = [&](EngineRequest req) {
    auto s = engine_->Submit(std::move(req));
    EXPECT_FALSE(s.ok());
    return s.ok() ? std::string() : std::string(s.status().message());
  };
  EXPECT_NE(msg({}).find("prompt"), std::string::npos);
  EXPECT_NE(msg({.prompt = {99}}).find("prompt"), std::string::npos);
  EXPECT_NE(msg({.prompt = std::vector<int32_t>(16, 1)}).find("prompt"), std::string::npos);
  EXPECT_NE(msg({.prompt = {1}, .n = 0}).find("n:"), std::string::npos);
  EXPECT_NE(msg({.prompt = {1}, .max_tokens = 0}).find("max_tokens"), std::string::npos);
  EXPECT_NE(msg({.prompt = {1}, .max_tokens = 20}).find("max_tokens"), std::string::npos);
  EXPECT_NE(msg({.prompt = {1}, .sampling = {.top_p = 2}}).find("top_p"), std::string::npos);
  EXPECT_NE(msg({.prompt = {1}, .stop = {""}}).find("stop"), std::string::npos);
}

TEST_F(EngineTest, MetricsCountRequestsAndTokens) {
  Start({{L('a'), {L('h'), kEos}}});
  Run({.prompt = {L('a'), L('b')}, .max_tokens = 5});
  std::string text = registry_.Render();
  EXPECT_NE(text.find("moe_request_success_total{finished_reason=\"stop\"} 1"), std::string::npos)
      << text;
  EXPECT_NE(text.find("moe_prompt_tokens_total 2"), std::string::npos);
  EXPECT_NE(text.find("moe_generation_tokens_total 2"), std::string::npos);
  EXPECT_NE(text.find("moe_time_to_first_token_seconds_count 1"), std::string::npos);
  EXPECT_NE(text.find("moe_e2e_request_latency_seconds_count 1"), std::string::npos);
}

// ---- Data-parallel attention workers ----

// A ScriptedWorker that records the step ids it saw and can be told to fail its steps.
class CountingWorker : public ScriptedWorker {
 public:
  using ScriptedWorker::ScriptedWorker;
  absl::StatusOr<StepOutput> Step(const StepInput& input) override {
    if (!input.chunks.empty()) {
      step_ids.push_back(input.step_id);
      if (fail.load()) {
        return absl::UnavailableError("layer 0, step 1, expert rank 3: connection refused");
      }
    }
    return ScriptedWorker::Step(input);
  }
  std::atomic<bool> fail{false};
  std::vector<uint64_t> step_ids;
};

class EngineDataParallelTest : public ::testing::Test {
 protected:
  Result Run2(EngineRequest req) {
    auto stream = engine_->Submit(std::move(req));
    EXPECT_TRUE(stream.ok()) << stream.status();
    if (!stream.ok()) return {};
    return Drain(**stream);
  }

  void Start(int num_workers, int max_failures = 0) {
    tokenizer_ = MakeTokenizer();
    std::vector<std::unique_ptr<AttentionWorker>> workers;
    for (int i = 0; i < num_workers; ++i) {
      auto w = std::make_unique<CountingWorker>(std::map<int32_t, std::vector<int32_t>>{
          {L('a'), {L('h'), L('i'), kEos}}, {L('b'), {L('o'), L('k'), kEos}}});
      workers_.push_back(w.get());
      workers.push_back(std::move(w));
    }
    auto e = Engine::Create({.scheduler = {.block_size = 4, .num_blocks = 64},
                             .tokenizer = tokenizer_.get(),
                             .eos_ids = {kEos},
                             .vocab_size = 30,
                             .metrics = &registry_,
                             .max_consecutive_step_failures = max_failures},
                            std::move(workers));
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
  }

  common::MetricsRegistry registry_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::vector<CountingWorker*> workers_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(EngineDataParallelTest, SpreadsSequencesAcrossWorkersByLoad) {
  Start(2);
  // Nothing finishes before every request is admitted: the choice is by load alone.
  absl::Notification gate;
  workers_[0]->gate_ = &gate;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 6; ++i) {
    auto s = engine_->Submit({.prompt = {i % 2 == 0 ? L('a') : L('b')}, .max_tokens = 10});
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  gate.Notify();
  for (int i = 0; i < 6; ++i) {
    Result r = Drain(*streams[i]);
    EXPECT_TRUE(r.status.ok()) << r.status;
    EXPECT_EQ(r.text[0], i % 2 == 0 ? "hi" : "ok") << "request " << i;
    EXPECT_EQ(r.finish[0], "stop");
  }
  std::vector<int64_t> per_worker = engine_->sequences_per_worker();
  ASSERT_EQ(per_worker.size(), 2u);
  EXPECT_EQ(per_worker[0], 3);
  EXPECT_EQ(per_worker[1], 3);
  engine_->Stop();
  // Workers stepped in the same iteration share its step id (expert ranks merge by it).
  std::set<uint64_t> ids0(workers_[0]->step_ids.begin(), workers_[0]->step_ids.end());
  int shared = 0;
  for (uint64_t id : workers_[1]->step_ids) shared += ids0.count(id) > 0 ? 1 : 0;
  EXPECT_GT(shared, 0);
}

TEST_F(EngineDataParallelTest, AFailingWorkerFailsOnlyItsRequests) {
  Start(2);
  workers_[1]->fail = true;
  absl::Notification gate;
  workers_[0]->gate_ = &gate;
  auto first = engine_->Submit({.prompt = {L('a')}, .max_tokens = 10});
  auto second = engine_->Submit({.prompt = {L('b')}, .max_tokens = 10});
  ASSERT_TRUE(first.ok() && second.ok());
  gate.Notify();
  Result r0 = Drain(**first);
  Result r1 = Drain(**second);
  // The first went to worker 0 (both idle: the lower index), the second to worker 1.
  EXPECT_TRUE(r0.status.ok()) << r0.status;
  EXPECT_EQ(r0.text[0], "hi");
  EXPECT_EQ(r1.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r1.status.message().find("expert rank 3"), std::string::npos) << r1.status;
  EXPECT_EQ(r1.finish[0], "abort");
  // max_consecutive_step_failures = 0: the engine keeps serving after failures.
  for (int i = 0; i < 4; ++i) {
    auto s = engine_->Submit({.prompt = {L('b')}, .max_tokens = 10});
    ASSERT_TRUE(s.ok()) << s.status();
    Drain(**s);
  }
  EXPECT_TRUE(engine_->healthy());
  workers_[1]->fail = false;
  Result ok = Run2({.prompt = {L('b')}, .max_tokens = 10});
  EXPECT_TRUE(ok.status.ok()) << ok.status;
  EXPECT_EQ(ok.text[0], "ok");
}

TEST_F(EngineDataParallelTest, GivesUpAfterConsecutiveFailuresWhenAsked) {
  Start(1, /*max_failures=*/2);
  workers_[0]->fail = true;
  for (int i = 0; i < 2; ++i) {
    auto s = engine_->Submit({.prompt = {L('a')}, .max_tokens = 10});
    ASSERT_TRUE(s.ok());
    Drain(**s);
  }
  for (int i = 0; i < 100 && engine_->healthy(); ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_FALSE(engine_->healthy());
  EXPECT_EQ(engine_->Submit({.prompt = {L('a')}}).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace moe::server
