#include "server/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "moe/v1/serving.grpc.pb.h"
#include "proto/grpc_status.h"
#include "server/request_validation.h"

namespace moe::server {
namespace {

namespace pb = ::moe::v1;

// How often the pump looks at streams whose engine request has nothing new, and at the
// engine's health when no call is running.
constexpr absl::Duration kPollInterval = absl::Milliseconds(2);
constexpr absl::Duration kIdleInterval = absl::Milliseconds(100);

std::string_view View(absl::string_view s) { return std::string_view(s.data(), s.size()); }

using ::moe::proto::ToGrpc;

// The shared checks name fields as HTTP has them ("top_p"); in GenerateRequest they live
// under `sampling`.
absl::Status WithFieldPath(const absl::Status& s) {
  static constexpr std::string_view kSamplingFields[] = {
      "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
      "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
      "ignore_eos", "top_logprobs", "logprobs"};
  std::optional<std::string> field = FieldOf(View(s.message()));
  if (!field || std::find(std::begin(kSamplingFields), std::end(kSamplingFields), *field) ==
                    std::end(kSamplingFields)) {
    return s;
  }
  return absl::Status(s.code(), absl::StrCat("sampling.", s.message()));
}

// proto3 strings must be UTF-8; token pieces need not be. Invalid sequences become U+FFFD,
// as the HTTP API's JSON writer does.
std::string ValidUtf8(std::string s) {
  auto valid_at = [&s](size_t i) -> size_t {  // length of the valid sequence at i, or 0
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return 0;
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 0x2) return 0;
      cp = (cp << 6) | (d & 0x3f);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return n;
  };
  std::string out;
  bool changed = false;
  size_t i = 0;
  while (i < s.size()) {
    const size_t n = valid_at(i);
    if (n == 0) {
      if (!changed) out.assign(s, 0, i);
      changed = true;
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      if (changed) out.append(s, i, n);
      i += n;
    }
  }
  return changed ? out : s;
}

std::string RandomHex() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[33];
  snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(rng()),
           static_cast<unsigned long long>(rng()));
  return buf;
}

// GenerateRequest -> EngineRequest with the HTTP API's checks. Proto3 zeros mean "unset":
// top_p 0 and repetition_penalty 0 are off, max_tokens 0 is kDefaultMaxTokens.
absl::StatusOr<EngineRequest> ToEngineRequest(const pb::GenerateRequest& req,
                                              const model::Tokenizer& tokenizer) {
  EngineRequest r;
  const pb::SamplingParams& s = req.sampling();
  r.sampling.temperature = s.temperature();
  r.sampling.top_p = s.top_p() == 0.0f ? 1.0 : s.top_p();
  r.sampling.top_k = s.top_k();
  r.sampling.min_p = s.min_p();
  r.sampling.presence_penalty = s.presence_penalty();
  r.sampling.frequency_penalty = s.frequency_penalty();
  r.sampling.repetition_penalty = s.repetition_penalty() == 0.0f ? 1.0 : s.repetition_penalty();
  if (s.has_seed()) {
    r.has_seed = true;
    r.sampling.seed = s.seed();
  }
  auto to_int = [](uint32_t v) { return static_cast<int>(std::min<uint32_t>(v, INT32_MAX)); };
  r.max_tokens = s.max_tokens() == 0 ? kDefaultMaxTokens : to_int(s.max_tokens());
  r.min_tokens = to_int(s.min_tokens());
  r.ignore_eos = s.ignore_eos();
  r.stop.assign(s.stop().begin(), s.stop().end());
  r.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  r.sampling.top_logprobs = to_int(s.top_logprobs());
  if (r.sampling.top_logprobs > 0 && !s.logprobs()) {
    return InvalidField("sampling.top_logprobs", "requires logprobs to be true");
  }
  if (absl::Status st = ValidateSampling(r); !st.ok()) return WithFieldPath(st);

  switch (req.prompt_case()) {
    case pb::GenerateRequest::kText:
      r.prompt = tokenizer.Encode(req.text(), /*add_special_tokens=*/true);
      break;
    case pb::GenerateRequest::kTokenIds:
      r.prompt.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      MOE_RETURN_IF_ERROR(ValidateTokenIds("prompt", r.prompt, tokenizer.vocab_size()));
      break;
    case pb::GenerateRequest::PROMPT_NOT_SET:
      return InvalidField("prompt", "is required (text or token_ids)");
  }
  if (r.prompt.empty()) return InvalidField("prompt", "must contain at least one token");
  return r;
}

// A Generate call refused before it started.
class FailedGenerate final : public grpc::ServerWriteReactor<pb::GenerateResponse> {
 public:
  explicit FailedGenerate(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

// ---------------------------------------------------------------------------------------

class GrpcServer::Impl final : public pb::MoeServe::CallbackService {
 public:
  explicit Impl(GrpcServerOptions options) : options_(std::move(options)) {}

  absl::StatusOr<int> Start();
  void SetBackend(GrpcBackend backend);
  void StartDraining();
  int num_active() const { return active_.load(); }
  void Stop();

  grpc::ServerWriteReactor<pb::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const pb::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const pb::AbortRequest* req,
                                  pb::AbortResponse* resp) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const pb::TokenizeRequest* req,
                                     pb::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const pb::DetokenizeRequest* req,
                                       pb::DetokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const pb::ListModelsRequest* req,
                                       pb::ListModelsResponse* resp) override;

 private:
  class GenerateCall;
  enum class State { kLoading, kServing, kDraining };

  // Authentication, then loading / draining.
  absl::Status CheckCall(grpc::CallbackServerContext* ctx) const;
  absl::Status CheckAuth(grpc::CallbackServerContext* ctx) const;
  absl::Status CheckModel(const std::string& model) const;
  absl::StatusOr<GenerateCall*> StartGenerate(grpc::CallbackServerContext* ctx,
                                              const pb::GenerateRequest& req);
  std::string TokenText(int32_t id) const {
    return ValidUtf8(backend_.tokenizer->Decode(std::vector<int32_t>{id}, false));
  }
  // Forgets `stream` under its id (Abort no longer finds it).
  void Unregister(const std::string& id, const RequestStream* stream) ABSL_LOCKS_EXCLUDED(mu_);
  void Wake() ABSL_LOCKS_EXCLUDED(mu_);
  void PumpLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void UpdateHealth() ABSL_LOCKS_EXCLUDED(health_mu_);
  void SetHealth(bool serving) ABSL_EXCLUSIVE_LOCKS_REQUIRED(health_mu_);

  template <typename Fn>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, Fn fn) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(ToGrpc(fn()));
    return reactor;
  }

  // Set at construction / Start.
  const GrpcServerOptions options_;
  std::unique_ptr<grpc::Server> server_;
  std::thread pump_;

  std::atomic<State> state_{State::kLoading};
  GrpcBackend backend_;  // written once before state_ becomes kServing
  std::atomic<int> active_{0};
  bool stopped_ = false;  // Start/Stop caller only

  absl::Mutex mu_;
  std::vector<GenerateCall*> incoming_ ABSL_GUARDED_BY(mu_);  // for the pump to adopt
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_pump_ ABSL_GUARDED_BY(mu_) = false;
  // Running Generate calls by request id, for Abort.
  std::map<std::string, std::shared_ptr<RequestStream>> running_ ABSL_GUARDED_BY(mu_);

  absl::Mutex health_mu_;
  std::optional<bool> serving_ ABSL_GUARDED_BY(health_mu_);
};

// One Generate call: the reactor gRPC drives plus the state the pump thread moves along.
// gRPC threads only set the atomics (OnWriteDone, OnCancel) and delete it (OnDone, which
// comes only after Finish); everything else runs on the pump thread.
class GrpcServer::Impl::GenerateCall final : public grpc::ServerWriteReactor<pb::GenerateResponse> {
 public:
  enum class Progress { kIdle, kBusy, kFinished };

  GenerateCall(Impl& server, std::string request_id, std::shared_ptr<RequestStream> stream,
               bool logprobs)
      : server_(server), request_id_(std::move(request_id)), stream_(std::move(stream)),
        logprobs_(logprobs) {
    server_.active_.fetch_add(1);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) write_failed_.store(true);
    write_pending_.store(false);
    server_.Wake();
  }
  void OnCancel() override {
    stream_->Cancel();
    cancelled_.store(true);
    server_.Wake();
  }
  void OnDone() override {
    server_.active_.fetch_sub(1);
    delete this;
  }

  // Pump thread only: starts the next write or finishes the call. After kFinished the call
  // may already be deleted.
  Progress Pump() {
    if (write_pending_.load()) return Progress::kIdle;
    if (write_failed_.load() || cancelled_.load()) {
      stream_->Cancel();
      return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
    }
    bool progress = false;
    if (!closed_ && queue_.empty()) {
      std::vector<ChoiceDelta> deltas;
      const bool open = stream_->Next(&deltas, absl::ZeroDuration());
      progress = !deltas.empty() || !open;
      for (ChoiceDelta& d : deltas) {
        // The finishing delta waits for the usage, which comes with the close.
        if (d.finish_reason.empty()) {
          queue_.push_back(ToResponse(d));
        } else {
          last_ = ToResponse(d);
        }
      }
      if (!open) Close();
    }
    if (!queue_.empty()) {
      writing_ = std::move(queue_.front());
      queue_.pop_front();
      write_pending_.store(true);
      StartWrite(&writing_);
      return Progress::kBusy;
    }
    if (closed_) return Finish(final_status_);
    return progress ? Progress::kBusy : Progress::kIdle;
  }

 private:
  void Close() {
    closed_ = true;
    absl::Status status = stream_->status();
    if (!status.ok()) {
      // Tokens already produced still go out; the status tells why the stream ended.
      final_status_ = ToGrpc(status);
      return;
    }
    pb::GenerateResponse last = last_.value_or(pb::GenerateResponse());
    last.set_request_id(request_id_);
    if (last.finish_reason().empty()) last.set_finish_reason("abort");
    const RequestUsage u = stream_->usage();
    pb::Usage* usage = last.mutable_usage();
    usage->set_prompt_tokens(u.prompt_tokens);
    usage->set_completion_tokens(u.completion_tokens);
    usage->set_total_tokens(u.prompt_tokens + u.completion_tokens);
    usage->set_cached_tokens(u.cached_tokens);
    queue_.push_back(std::move(last));
  }

  Progress Finish(grpc::Status status) {
    server_.Unregister(request_id_, stream_.get());
    // Last touch of `this`: OnDone may run (and delete it) as soon as Finish is called.
    grpc::ServerWriteReactor<pb::GenerateResponse>::Finish(std::move(status));
    return Progress::kFinished;
  }

  // One response per delta. The delta's text goes with its last token. A delta without a
  // token (held-back text flushed when a request is aborted or cut) has no field to carry
  // its text; the token ids sent before are the complete output.
  pb::GenerateResponse ToResponse(const ChoiceDelta& d) const {
    pb::GenerateResponse r;
    r.set_request_id(request_id_);
    for (const TokenInfo& t : d.tokens) {
      pb::GeneratedToken* g = r.add_tokens();
      g->set_token_id(t.id);
      if (logprobs_) g->set_logprob(t.logprob);
      for (const model::CandidateLogprob& c : t.top_logprobs) {
        pb::TopLogprob* top = g->add_top_logprobs();
        top->set_token_id(c.token);
        top->set_text(server_.TokenText(c.token));
        top->set_logprob(c.logprob);
      }
    }
    if (r.tokens_size() > 0) r.mutable_tokens(r.tokens_size() - 1)->set_text(ValidUtf8(d.text));
    r.set_finish_reason(d.finish_reason);
    return r;
  }

  Impl& server_;
  const std::string request_id_;
  const std::shared_ptr<RequestStream> stream_;
  const bool logprobs_;

  // Written by gRPC threads.
  std::atomic<bool> write_pending_{false};
  std::atomic<bool> write_failed_{false};
  std::atomic<bool> cancelled_{false};

  // Pump thread only.
  std::deque<pb::GenerateResponse> queue_;
  std::optional<pb::GenerateResponse> last_;  // the finishing delta, until the close
  bool closed_ = false;                        // the stream ended; queue_ holds the rest
  grpc::Status final_status_;
  pb::GenerateResponse writing_;  // the write in flight
};

// ---- Handlers (gRPC threads; never block) ----

absl::Status GrpcServer::Impl::CheckAuth(grpc::CallbackServerContext* ctx) const {
  if (options_.api_key.empty()) return absl::OkStatus();
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  const std::string want = "Bearer " + options_.api_key;
  if (it != md.end() && std::string_view(it->second.data(), it->second.size()) == want) {
    return absl::OkStatus();
  }
  return absl::UnauthenticatedError(
      "missing or invalid API key (send the metadata authorization: Bearer <key>)");
}

absl::Status GrpcServer::Impl::CheckCall(grpc::CallbackServerContext* ctx) const {
  MOE_RETURN_IF_ERROR(CheckAuth(ctx));
  switch (state_.load()) {
    case State::kLoading:
      return absl::UnavailableError("the model is still loading");
    case State::kDraining:
      return absl::UnavailableError("the server is shutting down");
    case State::kServing:
      break;
  }
  if (!backend_.engine->healthy()) {
    return absl::UnavailableError("the engine stopped after worker failures");
  }
  return absl::OkStatus();
}

absl::Status GrpcServer::Impl::CheckModel(const std::string& model) const {
  if (model.empty() || model == options_.served_model_name) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("model: `", model, "` is not served here (ListModels: `",
                                          options_.served_model_name, "`)"));
}

absl::StatusOr<GrpcServer::Impl::GenerateCall*> GrpcServer::Impl::StartGenerate(
    grpc::CallbackServerContext* ctx, const pb::GenerateRequest& req) {
  MOE_RETURN_IF_ERROR(CheckCall(ctx));
  MOE_RETURN_IF_ERROR(CheckModel(req.model()));
  MOE_ASSIGN_OR_RETURN(EngineRequest request, ToEngineRequest(req, *backend_.tokenizer));
  const std::string id = req.request_id().empty() ? "gen-" + RandomHex() : req.request_id();
  request.request_id = id;
  absl::MutexLock lock(&mu_);
  if (running_.contains(id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("request_id: a request with id `", id, "` is already running"));
  }
  absl::StatusOr<std::shared_ptr<RequestStream>> stream =
      backend_.engine->Submit(std::move(request));
  if (!stream.ok()) return WithFieldPath(stream.status());
  running_[id] = *stream;
  auto* call = new GenerateCall(*this, id, *std::move(stream), req.sampling().logprobs());
  incoming_.push_back(call);
  wake_ = true;
  return call;
}

grpc::ServerWriteReactor<pb::GenerateResponse>* GrpcServer::Impl::Generate(
    grpc::CallbackServerContext* ctx, const pb::GenerateRequest* req) {
  absl::StatusOr<GenerateCall*> call = StartGenerate(ctx, *req);
  if (!call.ok()) return new FailedGenerate(ToGrpc(call.status()));
  return *call;
}

grpc::ServerUnaryReactor* GrpcServer::Impl::Abort(grpc::CallbackServerContext* ctx,
                                                  const pb::AbortRequest* req,
                                                  pb::AbortResponse*) {
  return Unary(ctx, [&]() -> absl::Status {
    // Allowed while draining: it helps a drain finish.
    MOE_RETURN_IF_ERROR(CheckAuth(ctx));
    if (req->request_id().empty()) return InvalidField("request_id", "is required");
    absl::MutexLock lock(&mu_);
    auto it = running_.find(req->request_id());
    if (it == running_.end()) {
      return absl::NotFoundError(
          absl::StrCat("request_id: no running request with id `", req->request_id(), "`"));
    }
    it->second->Cancel();
    MOE_LOG(INFO) << "abort" << common::Kv("request_id", req->request_id());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcServer::Impl::Tokenize(grpc::CallbackServerContext* ctx,
                                                     const pb::TokenizeRequest* req,
                                                     pb::TokenizeResponse* resp) {
  return Unary(ctx, [&]() -> absl::Status {
    MOE_RETURN_IF_ERROR(CheckCall(ctx));
    MOE_RETURN_IF_ERROR(CheckModel(req->model()));
    for (int32_t id : backend_.tokenizer->Encode(req->text(), req->add_special_tokens())) {
      resp->add_token_ids(id);
    }
    resp->set_max_model_len(backend_.max_model_len);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcServer::Impl::Detokenize(grpc::CallbackServerContext* ctx,
                                                       const pb::DetokenizeRequest* req,
                                                       pb::DetokenizeResponse* resp) {
  return Unary(ctx, [&]() -> absl::Status {
    MOE_RETURN_IF_ERROR(CheckCall(ctx));
    MOE_RETURN_IF_ERROR(CheckModel(req->model()));
    std::vector<int32_t> ids(req->token_ids().begin(), req->token_ids().end());
    MOE_RETURN_IF_ERROR(ValidateTokenIds("token_ids", ids, backend_.tokenizer->vocab_size()));
    resp->set_text(ValidUtf8(backend_.tokenizer->Decode(ids, /*skip_special_tokens=*/false)));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GrpcServer::Impl::ListModels(grpc::CallbackServerContext* ctx,
                                                       const pb::ListModelsRequest*,
                                                       pb::ListModelsResponse* resp) {
  return Unary(ctx, [&]() -> absl::Status {
    MOE_RETURN_IF_ERROR(CheckCall(ctx));
    pb::ModelInfo* m = resp->add_models();
    m->set_id(options_.served_model_name);
    m->set_architecture(backend_.architecture);
    m->set_max_model_len(backend_.max_model_len);
    return absl::OkStatus();
  });
}

// ---- The pump ----

void GrpcServer::Impl::Wake() {
  absl::MutexLock lock(&mu_);
  wake_ = true;
}

void GrpcServer::Impl::Unregister(const std::string& id, const RequestStream* stream) {
  absl::MutexLock lock(&mu_);
  auto it = running_.find(id);
  if (it != running_.end() && it->second.get() == stream) running_.erase(it);
}

void GrpcServer::Impl::PumpLoop() {
  std::vector<GenerateCall*> calls;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      calls.insert(calls.end(), incoming_.begin(), incoming_.end());
      incoming_.clear();
      if (stop_pump_ && calls.empty()) return;
    }
    bool progress = false;
    for (size_t i = 0; i < calls.size();) {
      GenerateCall::Progress p = calls[i]->Pump();
      if (p == GenerateCall::Progress::kFinished) {
        calls[i] = calls.back();
        calls.pop_back();
        progress = true;
        continue;
      }
      progress |= p == GenerateCall::Progress::kBusy;
      ++i;
    }
    UpdateHealth();
    if (progress) continue;
    // Nothing to do: sleep until a call arrives or a write completes, and poll streams
    // waiting on the engine (RequestStream has no notification) every kPollInterval.
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&wake_), calls.empty() ? kIdleInterval : kPollInterval);
    wake_ = false;
  }
}

void GrpcServer::Impl::UpdateHealth() {
  const bool serving = state_.load() == State::kServing && backend_.engine->healthy();
  absl::MutexLock lock(&health_mu_);
  if (serving_ == serving || server_ == nullptr) return;
  serving_ = serving;
  SetHealth(serving);
}

void GrpcServer::Impl::SetHealth(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  // The overall status ("") and the service's own name, as health checkers ask for either.
  health->SetServingStatus(pb::MoeServe::service_full_name(), serving);
  health->SetServingStatus(serving);
}

// ---- Lifecycle ----

absl::StatusOr<int> GrpcServer::Impl::Start() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string host = options_.host.find(':') != std::string::npos && options_.host[0] != '['
                               ? absl::StrCat("[", options_.host, "]")
                               : options_.host;
  const std::string address = absl::StrCat(host, ":", options_.port);
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  // Without this a second server could share the port (SO_REUSEPORT) instead of failing.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot bind gRPC ", address, " (in use?)"));
  }
  {
    absl::MutexLock lock(&health_mu_);
    serving_ = false;
    SetHealth(false);
  }
  pump_ = std::thread([this] { PumpLoop(); });
  return port;
}

void GrpcServer::Impl::SetBackend(GrpcBackend backend) {
  backend_ = std::move(backend);
  state_.store(State::kServing);
  UpdateHealth();
}

void GrpcServer::Impl::StartDraining() {
  state_.store(State::kDraining);
  UpdateHealth();
}

void GrpcServer::Impl::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (server_ != nullptr) {
    // Waits for every call; those still running at the deadline are cancelled (OnCancel)
    // and the pump, still running, finishes them.
    const auto grace = std::chrono::microseconds(absl::ToInt64Microseconds(options_.stop_grace));
    server_->Shutdown(std::chrono::system_clock::now() + grace);
  }
  {
    absl::MutexLock lock(&mu_);
    stop_pump_ = true;
    wake_ = true;
  }
  if (pump_.joinable()) pump_.join();
}

// ---------------------------------------------------------------------------------------

GrpcServer::GrpcServer(GrpcServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
GrpcServer::~GrpcServer() { Stop(); }
absl::StatusOr<int> GrpcServer::Start() { return impl_->Start(); }
void GrpcServer::SetBackend(GrpcBackend backend) { impl_->SetBackend(std::move(backend)); }
void GrpcServer::StartDraining() { impl_->StartDraining(); }
int GrpcServer::num_active() const { return impl_->num_active(); }
void GrpcServer::Stop() { impl_->Stop(); }

}  // namespace moe::server
