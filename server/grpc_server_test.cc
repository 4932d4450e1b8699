// Tests of the gRPC API over a real channel on 127.0.0.1, with an Engine on a scripted
// attention worker: streaming, the status codes of every refusal, Abort, client
// cancellation, the queue limit, authentication, loading and draining.
#include "server/grpc_server.h"

#include <grpcpp/grpcpp.h>

#include <map>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "moe/v1/serving.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace moe::server {
namespace {

namespace pb = ::moe::v1;

// Vocabulary: ids 0..25 are 'a'..'z', 26 "<eos>" (special).
constexpr int32_t kEos = 26;
constexpr int32_t kVocab = 27;

int32_t L(char c) { return c - 'a'; }

std::unique_ptr<model::Tokenizer> MakeTokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (char c = 'a'; c <= 'z'; ++c) vocab[std::string(1, c)] = L(c);
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
  auto t = model::Tokenizer::FromJson(
      {.tokenizer_json = tok.dump(), .tokenizer_config_json = R"({"eos_token": "<eos>"})"});
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

// A sequence whose prompt starts with 'a' produces "hi" then EOS; any other produces 'z'
// forever (until max_tokens), one token per millisecond.
class ScriptedWorker : public AttentionWorker {
 public:
  absl::StatusOr<StepOutput> Step(const StepInput& input) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    StepOutput out;
    for (SeqId id : input.freed_seq_ids) seqs_.erase(id);
    for (const auto& ns : input.new_sequences) {
      seqs_[ns.seq_id] = {ns.prompt_token_ids[0], 0};
      top_[ns.seq_id] = ns.sampling.top_logprobs;
    }
    for (const auto& c : input.chunks) {
      if (!c.sample) continue;
      auto& [first, produced] = seqs_.at(c.seq_id);
      static const std::vector<int32_t> kHi = {L('h'), L('i'), kEos};
      int32_t tok = first == L('a') && produced < 3 ? kHi[produced] : L('z');
      ++produced;
      std::vector<model::CandidateLogprob> top = {{tok, -0.25f}, {L('q'), -2.0f}};
      top.resize(std::min<size_t>(top.size(), top_[c.seq_id]));
      out.tokens.push_back(
          {.seq_id = c.seq_id, .token_id = tok, .logprob = -0.25f, .top_logprobs = top});
    }
    return out;
  }

 private:
  std::map<SeqId, std::pair<int32_t, int>> seqs_;
  std::map<SeqId, int> top_;
};

struct Streamed {
  std::vector<pb::GenerateResponse> responses;
  grpc::Status status;
  std::string text;
  std::vector<int32_t> ids;
};

class GrpcServerTest : public ::testing::Test {
 protected:
  void Start(GrpcServerOptions options = {}, BatchSchedulerOptions sched = {},
             bool set_backend = true) {
    tokenizer_ = MakeTokenizer();
    sched.block_size = 4;
    sched.num_blocks = 256;
    auto e = Engine::Create({.scheduler = sched,
                             .tokenizer = tokenizer_.get(),
                             .eos_ids = {kEos},
                             .vocab_size = kVocab,
                             .metrics = &registry_},
                            std::make_unique<ScriptedWorker>());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
    options.host = "127.0.0.1";
    options.port = 0;
    options.served_model_name = "tiny";
    server_ = std::make_unique<GrpcServer>(options);
    absl::StatusOr<int> port = server_->Start();
    ASSERT_TRUE(port.ok()) << port.status();
    port_ = *port;
    stub_ = pb::MoeServe::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                                                      grpc::InsecureChannelCredentials()));
    if (set_backend) SetBackend();
  }
  void SetBackend() {
    server_->SetBackend({.engine = engine_.get(),
                         .tokenizer = tokenizer_.get(),
                         .max_model_len = 4096,
                         .architecture = "Qwen3MoeForCausalLM"});
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Stop();
    if (engine_ != nullptr) engine_->Stop();
  }

  static void Prepare(grpc::ClientContext* ctx, const std::string& key = "") {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    if (!key.empty()) ctx->AddMetadata("authorization", "Bearer " + key);
  }

  Streamed Generate(const pb::GenerateRequest& req, const std::string& key = "") {
    grpc::ClientContext ctx;
    Prepare(&ctx, key);
    Streamed out;
    auto reader = stub_->Generate(&ctx, req);
    pb::GenerateResponse r;
    while (reader->Read(&r)) {
      for (const pb::GeneratedToken& t : r.tokens()) {
        out.text += t.text();
        out.ids.push_back(t.token_id());
      }
      out.responses.push_back(r);
    }
    out.status = reader->Finish();
    return out;
  }

  static pb::GenerateRequest TextRequest(const std::string& text, uint32_t max_tokens = 16) {
    pb::GenerateRequest req;
    req.set_text(text);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    return req;
  }

  // Waits (bounded) until the engine has no request left and the server no call.
  bool EngineIdle() {
    for (int i = 0; i < 500 && (engine_->num_unfinished() > 0 || server_->num_active() > 0);
         ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return engine_->num_unfinished() == 0 && server_->num_active() == 0;
  }

  common::MetricsRegistry registry_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<GrpcServer> server_;
  int port_ = 0;
  std::unique_ptr<pb::MoeServe::Stub> stub_;
};

TEST_F(GrpcServerTest, GenerateStreamsOneResponsePerTokenThenUsage) {
  Start();
  pb::GenerateRequest req = TextRequest("ab");
  req.set_request_id("r1");
  req.mutable_sampling()->set_logprobs(true);
  req.mutable_sampling()->set_top_logprobs(2);
  Streamed s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.text, "hi");
  EXPECT_EQ(s.ids, (std::vector<int32_t>{L('h'), L('i'), kEos}));
  ASSERT_EQ(s.responses.size(), 3u);
  for (const pb::GenerateResponse& r : s.responses) {
    EXPECT_EQ(r.request_id(), "r1");
    ASSERT_EQ(r.tokens_size(), 1);
    EXPECT_FLOAT_EQ(r.tokens(0).logprob(), -0.25f);
    ASSERT_EQ(r.tokens(0).top_logprobs_size(), 2);
    EXPECT_EQ(r.tokens(0).top_logprobs(1).text(), "q");
  }
  EXPECT_EQ(s.responses[0].finish_reason(), "");
  EXPECT_FALSE(s.responses[0].has_usage());
  const pb::GenerateResponse& last = s.responses.back();
  EXPECT_EQ(last.finish_reason(), "stop");
  EXPECT_EQ(last.usage().prompt_tokens(), 2u);
  EXPECT_EQ(last.usage().completion_tokens(), 3u);
  EXPECT_EQ(last.usage().total_tokens(), 5u);
}

TEST_F(GrpcServerTest, TokenIdPromptAndDefaultMaxTokens) {
  Start();
  pb::GenerateRequest req;
  req.mutable_token_ids()->add_ids(L('b'));
  Streamed s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.text, std::string(16, 'z'));
  EXPECT_EQ(s.responses.back().finish_reason(), "length");
  EXPECT_EQ(s.responses.back().usage().completion_tokens(), 16u);
  // No logprobs asked: none sent.
  EXPECT_EQ(s.responses[0].tokens(0).logprob(), 0.0f);
  EXPECT_EQ(s.responses[0].tokens(0).top_logprobs_size(), 0);
}

TEST_F(GrpcServerTest, InvalidArgumentsNameTheField) {
  Start();
  struct Case {
    std::string name;
    std::function<void(pb::GenerateRequest*)> edit;
    grpc::StatusCode code;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"temperature", [](auto* r) { r->mutable_sampling()->set_temperature(-1); },
       grpc::INVALID_ARGUMENT, "sampling.temperature"},
      {"top_p", [](auto* r) { r->mutable_sampling()->set_top_p(1.5f); },
       grpc::INVALID_ARGUMENT, "sampling.top_p"},
      {"top_k", [](auto* r) { r->mutable_sampling()->set_top_k(-5); },
       grpc::INVALID_ARGUMENT, "sampling.top_k"},
      {"min_p", [](auto* r) { r->mutable_sampling()->set_min_p(2); },
       grpc::INVALID_ARGUMENT, "sampling.min_p"},
      {"presence", [](auto* r) { r->mutable_sampling()->set_presence_penalty(3); },
       grpc::INVALID_ARGUMENT, "sampling.presence_penalty"},
      {"repetition", [](auto* r) { r->mutable_sampling()->set_repetition_penalty(-1); },
       grpc::INVALID_ARGUMENT, "sampling.repetition_penalty"},
      {"top_logprobs range",
       [](auto* r) {
         r->mutable_sampling()->set_logprobs(true);
         r->mutable_sampling()->set_top_logprobs(21);
       },
       grpc::INVALID_ARGUMENT, "sampling.top_logprobs"},
      {"top_logprobs without logprobs", [](auto* r) { r->mutable_sampling()->set_top_logprobs(2); },
       grpc::INVALID_ARGUMENT, "sampling.top_logprobs"},
      {"empty stop", [](auto* r) { r->mutable_sampling()->add_stop(""); },
       grpc::INVALID_ARGUMENT, "sampling.stop"},
      {"max_tokens past the context", [](auto* r) { r->mutable_sampling()->set_max_tokens(5000); },
       grpc::INVALID_ARGUMENT, "sampling.max_tokens"},
      {"min_tokens", [](auto* r) { r->mutable_sampling()->set_min_tokens(100); },
       grpc::INVALID_ARGUMENT, "sampling.min_tokens"},
      {"no prompt", [](auto* r) { r->clear_prompt(); }, grpc::INVALID_ARGUMENT, "prompt"},
      {"empty token ids", [](auto* r) { r->mutable_token_ids(); }, grpc::INVALID_ARGUMENT,
       "prompt"},
      {"token id outside the vocabulary", [](auto* r) { r->mutable_token_ids()->add_ids(kVocab); },
       grpc::INVALID_ARGUMENT, "prompt"},
      {"negative token id", [](auto* r) { r->mutable_token_ids()->add_ids(-1); },
       grpc::INVALID_ARGUMENT, "prompt"},
      {"unknown model", [](auto* r) { r->set_model("gpt-17"); }, grpc::NOT_FOUND, "model"},
  };
  for (const Case& c : cases) {
    pb::GenerateRequest req = TextRequest("ab");
    c.edit(&req);
    Streamed s = Generate(req);
    EXPECT_EQ(s.status.error_code(), c.code) << c.name << ": " << s.status.error_message();
    EXPECT_EQ(s.status.error_message().rfind(c.field + ":", 0), 0u)
        << c.name << ": " << s.status.error_message();
    EXPECT_TRUE(s.responses.empty()) << c.name;
  }
  // Still serving.
  EXPECT_TRUE(Generate(TextRequest("ab")).status.ok());
}

TEST_F(GrpcServerTest, AbortByRequestIdEndsTheStreamWithAbort) {
  Start();
  pb::GenerateRequest req = TextRequest("zz", 4000);
  req.set_request_id("long-1");
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->Generate(&ctx, req);
  pb::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));

  // The same id again while it runs.
  Streamed dup = Generate(req);
  EXPECT_EQ(dup.status.error_code(), grpc::ALREADY_EXISTS) << dup.status.error_message();

  pb::AbortRequest abort;
  abort.set_request_id("long-1");
  pb::AbortResponse abort_resp;
  grpc::ClientContext actx;
  Prepare(&actx);
  ASSERT_TRUE(stub_->Abort(&actx, abort, &abort_resp).ok());
  std::string finish;
  uint32_t completion = 0;
  while (reader->Read(&r)) {
    finish = r.finish_reason();
    completion = r.usage().completion_tokens();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(finish, "abort");
  EXPECT_GT(completion, 0u);
  EXPECT_LT(completion, 4000u);
  EXPECT_TRUE(EngineIdle());

  // Finished ids are unknown; the id can be used again.
  grpc::ClientContext actx2;
  Prepare(&actx2);
  grpc::Status st = stub_->Abort(&actx2, abort, &abort_resp);
  EXPECT_EQ(st.error_code(), grpc::NOT_FOUND) << st.error_message();
  EXPECT_NE(st.error_message().find("request_id"), std::string::npos);
  req.mutable_sampling()->set_max_tokens(2);
  EXPECT_TRUE(Generate(req).status.ok());
}

TEST_F(GrpcServerTest, ClientCancelAndDeadlineCancelTheEngineRequest) {
  Start();
  pb::GenerateRequest req = TextRequest("zz", 4000);
  req.mutable_sampling()->set_ignore_eos(true);
  {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    auto reader = stub_->Generate(&ctx, req);
    pb::GenerateResponse r;
    ASSERT_TRUE(reader->Read(&r));
    ctx.TryCancel();
    while (reader->Read(&r)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::CANCELLED);
  }
  EXPECT_TRUE(EngineIdle());
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    auto reader = stub_->Generate(&ctx, req);
    pb::GenerateResponse r;
    while (reader->Read(&r)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::DEADLINE_EXCEEDED);
  }
  EXPECT_TRUE(EngineIdle());
}

TEST_F(GrpcServerTest, FullQueueIsResourceExhausted) {
  Start({}, {.max_num_seqs = 1, .max_waiting = 1});
  pb::GenerateRequest req = TextRequest("zz", 4000);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext running_ctx, waiting_ctx;
  Prepare(&running_ctx);
  Prepare(&waiting_ctx);
  auto running = stub_->Generate(&running_ctx, req);
  pb::GenerateResponse r;
  ASSERT_TRUE(running->Read(&r));  // running now; the next one waits
  auto waiting = stub_->Generate(&waiting_ctx, req);
  // The call reaches the engine asynchronously.
  for (int i = 0; i < 500 && engine_->num_unfinished() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(engine_->num_unfinished(), 2);
  Streamed refused = Generate(req);
  EXPECT_EQ(refused.status.error_code(), grpc::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  running_ctx.TryCancel();
  waiting_ctx.TryCancel();
  while (running->Read(&r)) {
  }
  while (waiting->Read(&r)) {
  }
  running->Finish();
  waiting->Finish();
  EXPECT_TRUE(EngineIdle());
  // The engine refreshes its waiting count at its next iteration, just after the close.
  Streamed after = Generate(TextRequest("ab"));
  for (int i = 0; i < 100 && after.status.error_code() == grpc::RESOURCE_EXHAUSTED; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    after = Generate(TextRequest("ab"));
  }
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
}

TEST_F(GrpcServerTest, ApiKeyIsRequiredOnEveryMethod) {
  GrpcServerOptions options;
  options.api_key = "sesame";
  Start(options);
  EXPECT_EQ(Generate(TextRequest("ab")).status.error_code(), grpc::UNAUTHENTICATED);
  EXPECT_EQ(Generate(TextRequest("ab"), "wrong").status.error_code(), grpc::UNAUTHENTICATED);
  EXPECT_TRUE(Generate(TextRequest("ab"), "sesame").status.ok());
  pb::ListModelsResponse models;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  EXPECT_EQ(stub_->ListModels(&ctx, {}, &models).error_code(), grpc::UNAUTHENTICATED);
  pb::AbortResponse aresp;
  pb::AbortRequest areq;
  areq.set_request_id("x");
  grpc::ClientContext actx;
  Prepare(&actx);
  EXPECT_EQ(stub_->Abort(&actx, areq, &aresp).error_code(), grpc::UNAUTHENTICATED);
}

TEST_F(GrpcServerTest, TokenizeDetokenizeListModels) {
  Start();
  pb::TokenizeRequest treq;
  treq.set_text("hi");
  pb::TokenizeResponse tresp;
  grpc::ClientContext c1;
  Prepare(&c1);
  ASSERT_TRUE(stub_->Tokenize(&c1, treq, &tresp).ok());
  EXPECT_EQ(std::vector<int32_t>(tresp.token_ids().begin(), tresp.token_ids().end()),
            (std::vector<int32_t>{L('h'), L('i')}));
  EXPECT_EQ(tresp.max_model_len(), 4096u);

  pb::DetokenizeRequest dreq;
  dreq.add_token_ids(L('o'));
  dreq.add_token_ids(L('k'));
  pb::DetokenizeResponse dresp;
  grpc::ClientContext c2;
  Prepare(&c2);
  ASSERT_TRUE(stub_->Detokenize(&c2, dreq, &dresp).ok());
  EXPECT_EQ(dresp.text(), "ok");

  dreq.add_token_ids(99);
  grpc::ClientContext c3;
  Prepare(&c3);
  grpc::Status st = stub_->Detokenize(&c3, dreq, &dresp);
  EXPECT_EQ(st.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(st.error_message().rfind("token_ids:", 0), 0u) << st.error_message();

  treq.set_model("other");
  grpc::ClientContext c4;
  Prepare(&c4);
  EXPECT_EQ(stub_->Tokenize(&c4, treq, &tresp).error_code(), grpc::NOT_FOUND);

  pb::ListModelsResponse models;
  grpc::ClientContext c5;
  Prepare(&c5);
  ASSERT_TRUE(stub_->ListModels(&c5, {}, &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).id(), "tiny");
  EXPECT_EQ(models.models(0).architecture(), "Qwen3MoeForCausalLM");
  EXPECT_EQ(models.models(0).max_model_len(), 4096u);
}

TEST_F(GrpcServerTest, UnavailableWhileLoadingAndDraining) {
  Start({}, {}, /*set_backend=*/false);
  Streamed loading = Generate(TextRequest("ab"));
  EXPECT_EQ(loading.status.error_code(), grpc::UNAVAILABLE);
  SetBackend();

  pb::GenerateRequest req = TextRequest("zz", 50);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->Generate(&ctx, req);
  pb::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  server_->StartDraining();
  Streamed refused = Generate(TextRequest("ab"));
  EXPECT_EQ(refused.status.error_code(), grpc::UNAVAILABLE) << refused.status.error_message();
  // The running stream goes on to its end.
  std::string finish;
  while (reader->Read(&r)) finish = r.finish_reason();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(finish, "length");
}

TEST_F(GrpcServerTest, StopCancelsStreamsStillRunning) {
  GrpcServerOptions options;
  options.stop_grace = absl::Milliseconds(100);
  Start(options);
  pb::GenerateRequest req = TextRequest("zz", 4000);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->Generate(&ctx, req);
  pb::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  std::thread stopper([this] { server_->Stop(); });
  while (reader->Read(&r)) {
  }
  EXPECT_FALSE(reader->Finish().ok());
  stopper.join();
  EXPECT_EQ(server_->num_active(), 0);
  EXPECT_TRUE(EngineIdle());
}

TEST_F(GrpcServerTest, PortInUseIsUnavailable) {
  Start();
  GrpcServer second({.host = "127.0.0.1", .port = port_});
  absl::StatusOr<int> port = second.Start();
  EXPECT_EQ(port.status().code(), absl::StatusCode::kUnavailable) << port.status();
}

}  // namespace
}  // namespace moe::server
