#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "nlohmann/json.hpp"
#include "server/request_validation.h"

namespace moe::server {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

namespace {

constexpr double kStreamPollSeconds = 0.05;
constexpr int kListenBacklog = 1024;  // connections waiting for accept()

std::string ErrorType(int status) {
  switch (status) {
    case 400: case 405: case 413: return "invalid_request_error";
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable_error";
    default: return "internal_error";
  }
}

// Our messages start with the field they are about ("top_p: must be ..."): that is the param.
std::optional<std::string> ParamOf(const std::string& message) { return FieldOf(message); }

json ErrorBody(int status, const std::string& message, std::optional<std::string> param) {
  return {{"error",
           {{"message", message},
            {"type", ErrorType(status)},
            {"param", param ? json(*param) : json(nullptr)},
            {"code", status}}}};
}

void SendError(httplib::Response& res, int status, const std::string& message,
               std::optional<std::string> param = std::nullopt) {
  res.status = status;
  res.set_content(ErrorBody(status, message, std::move(param)).dump(), "application/json");
}

void SendStatus(httplib::Response& res, const absl::Status& status) {
  std::string message(status.message());
  SendError(res, HttpStatusFor(status.code()), message, ParamOf(message));
}

void SendJson(httplib::Response& res, const json& body) {
  res.status = 200;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

std::string RandomHex() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[33];
  snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(rng()),
           static_cast<unsigned long long>(rng()));
  return buf;
}

absl::Status Bad(const std::string& field, const std::string& what) {
  return InvalidField(field, what);
}

// Typed, optional fields of a JSON object; null counts as absent.
struct Fields {
  const json& body;

  const json* Find(const char* name) const {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
  }
  absl::Status Number(const char* name, double* out) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return Bad(name, "must be a number");
    *out = v->get<double>();
    return absl::OkStatus();
  }
  absl::Status Int(const char* name, int64_t* out, int64_t min, int64_t max) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer()) return Bad(name, "must be an integer");
    int64_t x = v->get<int64_t>();
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      x = INT64_MAX;
    }
    if (x < min || x > max) {
      return Bad(name, absl::StrCat("must be in [", min, ", ", max, "], got ", x));
    }
    *out = x;
    return absl::OkStatus();
  }
  absl::Status Bool(const char* name, bool* out) const {
    const json* v = Find(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return Bad(name, "must be a boolean");
    *out = v->get<bool>();
    return absl::OkStatus();
  }
};

// What completions and chat share: sampling and stop fields.
struct CommonParams {
  EngineRequest base;
  bool stream = false;
  bool include_usage = false;
};

absl::StatusOr<CommonParams> ParseCommon(const json& body) {
  CommonParams p;
  Fields f{body};
  EngineRequest& r = p.base;
  MOE_RETURN_IF_ERROR(f.Number("temperature", &r.sampling.temperature));
  MOE_RETURN_IF_ERROR(f.Number("top_p", &r.sampling.top_p));
  int64_t top_k = 0;
  MOE_RETURN_IF_ERROR(f.Int("top_k", &top_k, -1, INT32_MAX));
  r.sampling.top_k = static_cast<int>(top_k);
  MOE_RETURN_IF_ERROR(f.Number("min_p", &r.sampling.min_p));
  MOE_RETURN_IF_ERROR(f.Number("presence_penalty", &r.sampling.presence_penalty));
  MOE_RETURN_IF_ERROR(f.Number("frequency_penalty", &r.sampling.frequency_penalty));
  MOE_RETURN_IF_ERROR(f.Number("repetition_penalty", &r.sampling.repetition_penalty));
  int64_t n = 1;
  MOE_RETURN_IF_ERROR(f.Int("n", &n, 1, 128));
  r.n = static_cast<int>(n);
  if (const json* seed = f.Find("seed")) {
    if (!seed->is_number_integer()) return Bad("seed", "must be an integer");
    r.has_seed = true;
    r.sampling.seed = seed->is_number_unsigned() ? seed->get<uint64_t>()
                                                 : static_cast<uint64_t>(seed->get<int64_t>());
  }
  int64_t min_tokens = 0;
  MOE_RETURN_IF_ERROR(f.Int("min_tokens", &min_tokens, 0, INT32_MAX));
  r.min_tokens = static_cast<int>(min_tokens);
  MOE_RETURN_IF_ERROR(f.Bool("ignore_eos", &r.ignore_eos));
  MOE_RETURN_IF_ERROR(f.Bool("skip_special_tokens", &r.skip_special_tokens));
  MOE_RETURN_IF_ERROR(f.Bool("include_stop_str_in_output", &r.include_stop_str_in_output));
  if (const json* stop = f.Find("stop")) {
    if (stop->is_string()) {
      r.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& s : *stop) {
        if (!s.is_string()) return Bad("stop", "must be a string or a list of strings");
        r.stop.push_back(s.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or a list of strings");
    }
  }
  if (const json* ids = f.Find("stop_token_ids")) {
    if (!ids->is_array()) return Bad("stop_token_ids", "must be a list of token ids");
    for (const json& id : *ids) {
      if (!id.is_number_integer()) return Bad("stop_token_ids", "must be a list of token ids");
      r.stop_token_ids.push_back(id.get<int32_t>());
    }
  }
  MOE_RETURN_IF_ERROR(f.Bool("stream", &p.stream));
  if (const json* so = f.Find("stream_options")) {
    if (!so->is_object()) return Bad("stream_options", "must be an object");
    Fields sf{*so};
    MOE_RETURN_IF_ERROR(sf.Bool("include_usage", &p.include_usage));
  }
  // Ranges, shared with the gRPC API.
  MOE_RETURN_IF_ERROR(ValidateSampling(r));
  return p;
}

json UsageJson(const RequestUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

json StopReason(const ChoiceDelta& d) {
  if (d.stop_string) return *d.stop_string;
  if (d.stop_token) return *d.stop_token;
  return nullptr;
}

// Streams of one HTTP request (several prompts give several engine requests); choice
// indices are offset per stream: prompt i, sample j is choice i * n + j.
struct StreamGroup {
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<bool> open;
  int n = 1;

  // Waits for events of any stream; returns (global choice index, delta) pairs. Sets *done
  // once every stream finished.
  std::vector<ChoiceDelta> Poll(double timeout_s, bool* done) {
    std::vector<ChoiceDelta> out;
    bool waited = false;
    *done = true;
    for (size_t i = 0; i < streams.size(); ++i) {
      if (!open[i]) continue;
      std::vector<ChoiceDelta> got;
      absl::Duration timeout =
          waited ? absl::ZeroDuration() : absl::Seconds(timeout_s);
      open[i] = streams[i]->Next(&got, timeout);
      waited = true;
      for (ChoiceDelta& d : got) {
        d.index += static_cast<int>(i) * n;
        out.push_back(std::move(d));
      }
      if (open[i]) *done = false;
    }
    return out;
  }
  void CancelAll() {
    for (auto& s : streams) s->Cancel();
  }
  absl::Status Status() const {
    for (const auto& s : streams) {
      absl::Status st = s->status();
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }
  RequestUsage Usage() const {
    RequestUsage u;
    for (const auto& s : streams) {
      RequestUsage x = s->usage();
      u.prompt_tokens += x.prompt_tokens;
      u.completion_tokens += x.completion_tokens;
    }
    return u;
  }
};

// Ends an SSE stream: the error body when a request failed, else the usage chunk when asked
// for (`last_chunk` is the endpoint's chunk with no choices), then `data: [DONE]`.
template <typename Send>
void EndStream(StreamGroup& g, bool include_usage, json last_chunk, const Send& send,
               httplib::DataSink& sink) {
  if (absl::Status st = g.Status(); !st.ok()) {
    std::string message(st.message());
    send(ErrorBody(HttpStatusFor(st.code()), message, ParamOf(message)));
  } else if (include_usage) {
    last_chunk["usage"] = UsageJson(g.Usage());
    send(last_chunk);
  }
  static const std::string kDone = "data: [DONE]\n\n";
  sink.write(kDone.data(), kDone.size());
  sink.done();
}

}  // namespace

// ---------------------------------------------------------------------------------------

class HttpServer::Handlers {
 public:
  explicit Handlers(HttpServer& s) : s_(s) {}

  void Register(httplib::Server& svr);

 private:
  bool Serving(httplib::Response& res) {
    State st = s_.state_.load();
    if (st == State::kLoading) {
      SendError(res, 503, "the model is still loading");
      return false;
    }
    if (st == State::kDraining) {
      SendError(res, 503, "the server is shutting down");
      return false;
    }
    return true;
  }
  const HttpBackend& backend() const { return s_.backend_; }

  // Parses the body as a JSON object; sends 400 and returns nullopt otherwise.
  std::optional<json> ParseBody(const httplib::Request& req, httplib::Response& res) {
    json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (body.is_discarded()) {
      SendError(res, 400, "the request body is not valid JSON");
      return std::nullopt;
    }
    if (!body.is_object()) {
      SendError(res, 400, "the request body must be a JSON object");
      return std::nullopt;
    }
    return body;
  }
  bool CheckModel(const json& body, httplib::Response& res) {
    auto it = body.find("model");
    if (it == body.end() || it->is_null()) return true;
    if (!it->is_string()) {
      SendError(res, 400, "model: must be a string", "model");
      return false;
    }
    if (it->get<std::string>() != s_.options_.served_model_name) {
      SendError(res, 404, absl::StrCat("The model `", it->get<std::string>(),
                                       "` does not exist."), "model");
      return false;
    }
    return true;
  }

  std::string TokenText(int32_t id) const {
    return backend().tokenizer->Decode(std::vector<int32_t>{id}, /*skip_special_tokens=*/false);
  }

  void Health(const httplib::Request&, httplib::Response& res) {
    bool ok = s_.state_.load() == State::kServing && backend().engine->healthy() &&
              (!backend().ready || backend().ready());
    res.status = ok ? 200 : 503;
  }
  void Cluster(const httplib::Request&, httplib::Response& res) {
    if (!backend().cluster_status) {
      SendError(res, 404, "no cluster: this server runs every role in one process");
      return;
    }
    res.set_content(backend().cluster_status(), "application/json");
  }
  void Metrics(const httplib::Request&, httplib::Response& res) {
    common::MetricsRegistry& reg = s_.options_.metrics != nullptr
                                       ? *s_.options_.metrics
                                       : common::DefaultMetricsRegistry();
    res.set_content(reg.Render(), common::kPrometheusContentType);
  }
  void Models(const httplib::Request&, httplib::Response& res) {
    const std::string& name = s_.options_.served_model_name;
    SendJson(res, {{"object", "list"},
                   {"data",
                    {{{"id", name},
                      {"object", "model"},
                      {"created", static_cast<int64_t>(std::time(nullptr))},
                      {"owned_by", "moe-serve"},
                      {"root", name},
                      {"parent", nullptr},
                      {"max_model_len", backend().max_model_len}}}}});
  }
  void Tokenize(const httplib::Request& req, httplib::Response& res);
  void Detokenize(const httplib::Request& req, httplib::Response& res);
  void Completions(const httplib::Request& req, httplib::Response& res);
  void ChatCompletions(const httplib::Request& req, httplib::Response& res);

  absl::StatusOr<std::string> RenderChat(const json& body, bool add_generation_prompt);
  // Submits one engine request per prompt; on failure cancels those already submitted.
  absl::StatusOr<std::shared_ptr<StreamGroup>> SubmitAll(
      const std::vector<std::vector<int32_t>>& prompts, const EngineRequest& base,
      const std::string& request_id);

  HttpServer& s_;
};

absl::StatusOr<std::shared_ptr<StreamGroup>> HttpServer::Handlers::SubmitAll(
    const std::vector<std::vector<int32_t>>& prompts, const EngineRequest& base,
    const std::string& request_id) {
  auto group = std::make_shared<StreamGroup>();
  group->n = base.n;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EngineRequest r = base;
    r.request_id = absl::StrCat(request_id, "-", i);
    r.prompt = prompts[i];
    absl::StatusOr<std::shared_ptr<RequestStream>> stream = backend().engine->Submit(std::move(r));
    if (!stream.ok()) {
      group->CancelAll();
      return stream.status();
    }
    group->streams.push_back(*std::move(stream));
    group->open.push_back(true);
  }
  return group;
}

void HttpServer::Handlers::Tokenize(const httplib::Request& req, httplib::Response& res) {
  if (!Serving(res)) return;
  std::optional<json> body = ParseBody(req, res);
  if (!body || !CheckModel(*body, res)) return;
  Fields f{*body};
  bool add_special = true;
  if (absl::Status s = f.Bool("add_special_tokens", &add_special); !s.ok()) {
    return SendStatus(res, s);
  }
  std::string text;
  if (const json* prompt = f.Find("prompt")) {
    if (!prompt->is_string()) return SendError(res, 400, "prompt: must be a string", "prompt");
    text = prompt->get<std::string>();
  } else if (f.Find("messages") != nullptr) {
    bool add_gen = true;
    if (absl::Status s = f.Bool("add_generation_prompt", &add_gen); !s.ok()) {
      return SendStatus(res, s);
    }
    absl::StatusOr<std::string> rendered = RenderChat(*body, add_gen);
    if (!rendered.ok()) return SendStatus(res, rendered.status());
    text = *rendered;
    if (body->find("add_special_tokens") == body->end()) add_special = false;
  } else {
    return SendError(res, 400, "prompt: give prompt or messages", "prompt");
  }
  std::vector<int32_t> ids = backend().tokenizer->Encode(text, add_special);
  SendJson(res, {{"count", ids.size()}, {"max_model_len", backend().max_model_len},
                 {"tokens", ids}});
}

void HttpServer::Handlers::Detokenize(const httplib::Request& req, httplib::Response& res) {
  if (!Serving(res)) return;
  std::optional<json> body = ParseBody(req, res);
  if (!body || !CheckModel(*body, res)) return;
  auto it = body->find("tokens");
  if (it == body->end() || !it->is_array()) {
    return SendError(res, 400, "tokens: must be a list of token ids", "tokens");
  }
  std::vector<int32_t> ids;
  const int32_t vocab = backend().tokenizer->vocab_size();
  for (const json& id : *it) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab) {
      return SendError(res, 400, absl::StrCat("tokens: token ids must be integers in [0, ",
                                              vocab, ")"), "tokens");
    }
    ids.push_back(id.get<int32_t>());
  }
  SendJson(res, {{"prompt", backend().tokenizer->Decode(ids, /*skip_special_tokens=*/false)}});
}

absl::StatusOr<std::string> HttpServer::Handlers::RenderChat(const json& body,
                                                             bool add_generation_prompt) {
  if (!backend().chat_template.has_value()) {
    return absl::InvalidArgumentError("messages: this model has no chat template");
  }
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return Bad("messages", "must be a non-empty list of messages");
  }
  ordered_json messages = ordered_json::array();
  for (const json& m : *it) {
    if (!m.is_object()) return Bad("messages", "each message must be an object");
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return Bad("messages", "each message needs a string role");
    }
    ordered_json out = ordered_json::object();
    out["role"] = role->get<std::string>();
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      out["content"] = "";
    } else if (content->is_string()) {
      out["content"] = content->get<std::string>();
    } else if (content->is_array()) {
      std::string text;
      for (const json& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad("messages", "only text content parts are supported");
        }
        text += part["text"].get<std::string>();
      }
      out["content"] = text;
    } else {
      return Bad("messages", "content must be a string or a list of text parts");
    }
    if (auto name = m.find("name"); name != m.end() && name->is_string()) out["name"] = *name;
    messages.push_back(std::move(out));
  }
  const model::Tokenizer& tok = *backend().tokenizer;
  auto special = [&](std::optional<int32_t> id) {
    return id ? tok.Decode(std::vector<int32_t>{*id}, false) : std::string();
  };
  ordered_json context = {
      {"messages", messages},
      {"add_generation_prompt", add_generation_prompt},
      {"bos_token", special(tok.bos_id())},
      {"eos_token", tok.eos_ids().empty() ? std::string() : special(tok.eos_ids()[0])}};
  return backend().chat_template->Render(context);
}

void HttpServer::Handlers::Completions(const httplib::Request& req, httplib::Response& res) {
  if (!Serving(res)) return;
  std::optional<json> body_opt = ParseBody(req, res);
  if (!body_opt || !CheckModel(*body_opt, res)) return;
  const json& body = *body_opt;
  absl::StatusOr<CommonParams> common = ParseCommon(body);
  if (!common.ok()) return SendStatus(res, common.status());
  Fields f{body};
  EngineRequest& base = common->base;
  int64_t max_tokens = kDefaultMaxTokens;
  if (absl::Status s = f.Int("max_tokens", &max_tokens, 1, INT32_MAX); !s.ok()) {
    return SendStatus(res, s);
  }
  base.max_tokens = static_cast<int>(max_tokens);
  int64_t logprobs = -1;
  if (absl::Status s = f.Int("logprobs", &logprobs, 0, kMaxTopLogprobs); !s.ok()) {
    return SendStatus(res, s);
  }
  base.sampling.top_logprobs = logprobs > 0 ? static_cast<int>(logprobs) : 0;
  bool echo = false;
  if (absl::Status s = f.Bool("echo", &echo); !s.ok()) return SendStatus(res, s);
  if (echo && logprobs >= 0) {
    return SendError(res, 400, "echo: echo together with logprobs is not supported", "echo");
  }
  if (f.Find("suffix") != nullptr) {
    return SendError(res, 400, "suffix: not supported", "suffix");
  }
  if (const json* best_of = f.Find("best_of")) {
    if (!best_of->is_number_integer() || best_of->get<int64_t>() != base.n) {
      return SendError(res, 400, "best_of: only best_of == n is supported", "best_of");
    }
  }

  // prompt: string | [string] | [int] | [[int]]
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;
  const json* prompt = f.Find("prompt");
  if (prompt == nullptr) return SendError(res, 400, "prompt: is required", "prompt");
  const model::Tokenizer& tok = *backend().tokenizer;
  const int32_t vocab = tok.vocab_size();
  auto ids_of = [&](const json& list, std::vector<int32_t>* out) -> bool {
    for (const json& id : list) {
      if (!id.is_number_integer()) return false;
      out->push_back(static_cast<int32_t>(std::clamp<int64_t>(id.get<int64_t>(), -1, INT32_MAX)));
    }
    return true;
  };
  const char* kPromptShape =
      "prompt: must be a string, a list of strings, a list of token ids or a list of lists of "
      "token ids";
  if (prompt->is_string()) {
    prompt_texts.push_back(prompt->get<std::string>());
  } else if (prompt->is_array() && !prompt->empty()) {
    if ((*prompt)[0].is_string()) {
      for (const json& p : *prompt) {
        if (!p.is_string()) return SendError(res, 400, kPromptShape, "prompt");
        prompt_texts.push_back(p.get<std::string>());
      }
    } else if ((*prompt)[0].is_number_integer()) {
      prompts.emplace_back();
      if (!ids_of(*prompt, &prompts.back())) return SendError(res, 400, kPromptShape, "prompt");
    } else if ((*prompt)[0].is_array()) {
      for (const json& p : *prompt) {
        prompts.emplace_back();
        if (!p.is_array() || p.empty() || !ids_of(p, &prompts.back())) {
          return SendError(res, 400, kPromptShape, "prompt");
        }
      }
    } else {
      return SendError(res, 400, kPromptShape, "prompt");
    }
  } else {
    return SendError(res, 400, kPromptShape, "prompt");
  }
  for (const std::string& text : prompt_texts) {
    prompts.push_back(tok.Encode(text, /*add_special_tokens=*/true));
  }
  if (prompt_texts.empty() && echo) {
    for (const auto& ids : prompts) prompt_texts.push_back(tok.Decode(ids, false));
  }
  for (const auto& ids : prompts) {
    if (absl::Status s = ValidateTokenIds("prompt", ids, vocab); !s.ok()) {
      return SendStatus(res, s);
    }
  }
  if (prompts.size() > 256) return SendError(res, 400, "prompt: at most 256 prompts", "prompt");

  const std::string id = "cmpl-" + RandomHex();
  absl::StatusOr<std::shared_ptr<StreamGroup>> group = SubmitAll(prompts, base, id);
  if (!group.ok()) return SendStatus(res, group.status());
  const int64_t created = std::time(nullptr);
  const std::string model = s_.options_.served_model_name;
  const bool want_logprobs = logprobs >= 0;

  // Completion logprobs of one delta, appended to `lp` (tokens, token_logprobs,
  // top_logprobs, text_offset).
  auto add_logprobs = [this](json& lp, const ChoiceDelta& d, int* offset) {
    for (const TokenInfo& t : d.tokens) {
      std::string text = TokenText(t.id);
      lp["tokens"].push_back(text);
      lp["token_logprobs"].push_back(t.logprob);
      // Distinct tokens can share a text (byte pieces of one character all read U+FFFD);
      // a key keeps its best logprob.
      json top = json::object();
      auto put = [&top](const std::string& key, float logprob) {
        if (!top.contains(key) || top[key].get<float>() < logprob) top[key] = logprob;
      };
      put(text, t.logprob);
      for (const model::CandidateLogprob& c : t.top_logprobs) put(TokenText(c.token), c.logprob);
      lp["top_logprobs"].push_back(std::move(top));
      lp["text_offset"].push_back(*offset);
      *offset += static_cast<int>(text.size());
    }
  };
  auto empty_logprobs = [] {
    return json{{"tokens", json::array()}, {"token_logprobs", json::array()},
                {"top_logprobs", json::array()}, {"text_offset", json::array()}};
  };

  const int num_choices = static_cast<int>(prompts.size()) * base.n;
  if (!common->stream) {
    std::vector<std::string> texts(num_choices);
    std::vector<json> lps(num_choices, want_logprobs ? empty_logprobs() : json(nullptr));
    std::vector<int> offsets(num_choices, 0);
    std::vector<std::string> finish(num_choices);
    std::vector<json> stop_reason(num_choices);
    if (echo) {
      for (int c = 0; c < num_choices; ++c) texts[c] = prompt_texts[c / base.n];
    }
    bool done = false;
    while (!done) {
      for (ChoiceDelta& d : (*group)->Poll(kStreamPollSeconds, &done)) {
        texts[d.index] += d.text;
        if (want_logprobs) add_logprobs(lps[d.index], d, &offsets[d.index]);
        if (!d.finish_reason.empty()) {
          finish[d.index] = d.finish_reason;
          stop_reason[d.index] = StopReason(d);
        }
      }
    }
    if (absl::Status st = (*group)->Status(); !st.ok()) return SendStatus(res, st);
    json choices = json::array();
    for (int c = 0; c < num_choices; ++c) {
      choices.push_back({{"index", c}, {"text", texts[c]}, {"logprobs", lps[c]},
                         {"finish_reason", finish[c].empty() ? json(nullptr) : json(finish[c])},
                         {"stop_reason", stop_reason[c]}});
    }
    SendJson(res, {{"id", id}, {"object", "text_completion"}, {"created", created},
                   {"model", model}, {"choices", std::move(choices)},
                   {"usage", UsageJson((*group)->Usage())}});
    return;
  }

  // Streaming (SSE).
  struct StreamState {
    bool echoed = false;
    bool finished = false;
    std::vector<int> offsets;
  };
  auto state = std::make_shared<StreamState>();
  state->offsets.assign(num_choices, 0);
  std::shared_ptr<StreamGroup> g = *group;
  const bool include_usage = common->include_usage;
  res.set_header("Cache-Control", "no-cache");
  s_.active_.fetch_add(1);  // until the releaser runs
  res.set_chunked_content_provider(
      "text/event-stream",
      [=, this](size_t, httplib::DataSink& sink) {
        auto send = [&](const json& chunk) {
          std::string line = "data: " +
                             chunk.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
          return sink.write(line.data(), line.size());
        };
        auto chunk_of = [&](json choices) {
          return json{{"id", id}, {"object", "text_completion"}, {"created", created},
                      {"model", model}, {"choices", std::move(choices)}};
        };
        if (echo && !state->echoed) {
          state->echoed = true;
          json choices = json::array();
          for (int c = 0; c < num_choices; ++c) {
            choices.push_back({{"index", c}, {"text", prompt_texts[c / base.n]},
                               {"logprobs", nullptr}, {"finish_reason", nullptr},
                               {"stop_reason", nullptr}});
          }
          if (!send(chunk_of(std::move(choices)))) return false;
        }
        bool done = false;
        for (ChoiceDelta& d : g->Poll(kStreamPollSeconds, &done)) {
          json lp = nullptr;
          if (want_logprobs) {
            lp = empty_logprobs();
            add_logprobs(lp, d, &state->offsets[d.index]);
          }
          json choice = {{"index", d.index}, {"text", d.text}, {"logprobs", lp},
                         {"finish_reason", d.finish_reason.empty() ? json(nullptr)
                                                                   : json(d.finish_reason)},
                         {"stop_reason", StopReason(d)}};
          if (!send(chunk_of(json::array({std::move(choice)})))) return false;
        }
        if (!done) return true;
        state->finished = true;
        EndStream(*g, include_usage, chunk_of(json::array()), send, sink);
        return true;
      },
      [this, g, state](bool success) {
        if (!success || !state->finished) g->CancelAll();
        s_.active_.fetch_sub(1);
      });
}

void HttpServer::Handlers::ChatCompletions(const httplib::Request& req,
                                           httplib::Response& res) {
  if (!Serving(res)) return;
  std::optional<json> body_opt = ParseBody(req, res);
  if (!body_opt || !CheckModel(*body_opt, res)) return;
  const json& body = *body_opt;
  absl::StatusOr<CommonParams> common = ParseCommon(body);
  if (!common.ok()) return SendStatus(res, common.status());
  Fields f{body};
  EngineRequest& base = common->base;
  int64_t max_tokens = -1;
  if (absl::Status s = f.Int("max_completion_tokens", &max_tokens, 1, INT32_MAX); !s.ok()) {
    return SendStatus(res, s);
  }
  if (max_tokens < 0) {
    if (absl::Status s = f.Int("max_tokens", &max_tokens, 1, INT32_MAX); !s.ok()) {
      return SendStatus(res, s);
    }
  }
  bool logprobs = false;
  if (absl::Status s = f.Bool("logprobs", &logprobs); !s.ok()) return SendStatus(res, s);
  int64_t top_logprobs = 0;
  if (absl::Status s = f.Int("top_logprobs", &top_logprobs, 0, kMaxTopLogprobs); !s.ok()) {
    return SendStatus(res, s);
  }
  if (top_logprobs > 0 && !logprobs) {
    return SendError(res, 400, "top_logprobs: requires logprobs to be true", "top_logprobs");
  }
  base.sampling.top_logprobs = static_cast<int>(top_logprobs);
  bool add_gen = true;
  if (absl::Status s = f.Bool("add_generation_prompt", &add_gen); !s.ok()) {
    return SendStatus(res, s);
  }
  absl::StatusOr<std::string> rendered = RenderChat(body, add_gen);
  if (!rendered.ok()) return SendStatus(res, rendered.status());
  std::vector<int32_t> prompt = backend().tokenizer->Encode(*rendered, false);
  if (max_tokens > 0) {
    base.max_tokens = static_cast<int>(max_tokens);
  }

  const std::string id = "chatcmpl-" + RandomHex();
  absl::StatusOr<std::shared_ptr<StreamGroup>> group = SubmitAll({prompt}, base, id);
  if (!group.ok()) return SendStatus(res, group.status());
  const int64_t created = std::time(nullptr);
  const std::string model = s_.options_.served_model_name;
  const int num_choices = base.n;

  auto content_logprobs = [this](json& content, const ChoiceDelta& d) {
    auto entry = [this](int32_t token, float logprob) {
      std::string text = TokenText(token);
      std::vector<int> bytes(text.begin(), text.end());
      for (int& b : bytes) b &= 0xff;
      return json{{"token", text}, {"logprob", logprob}, {"bytes", bytes}};
    };
    for (const TokenInfo& t : d.tokens) {
      json e = entry(t.id, t.logprob);
      json top = json::array();
      for (const model::CandidateLogprob& c : t.top_logprobs) top.push_back(entry(c.token, c.logprob));
      e["top_logprobs"] = std::move(top);
      content.push_back(std::move(e));
    }
  };

  if (!common->stream) {
    std::vector<std::string> texts(num_choices);
    std::vector<json> contents(num_choices, json::array());
    std::vector<std::string> finish(num_choices);
    std::vector<json> stop_reason(num_choices);
    bool done = false;
    while (!done) {
      for (ChoiceDelta& d : (*group)->Poll(kStreamPollSeconds, &done)) {
        texts[d.index] += d.text;
        if (logprobs) content_logprobs(contents[d.index], d);
        if (!d.finish_reason.empty()) {
          finish[d.index] = d.finish_reason;
          stop_reason[d.index] = StopReason(d);
        }
      }
    }
    if (absl::Status st = (*group)->Status(); !st.ok()) return SendStatus(res, st);
    json choices = json::array();
    for (int c = 0; c < num_choices; ++c) {
      choices.push_back(
          {{"index", c},
           {"message", {{"role", "assistant"}, {"content", texts[c]}, {"tool_calls", json::array()}}},
           {"logprobs", logprobs ? json{{"content", contents[c]}} : json(nullptr)},
           {"finish_reason", finish[c].empty() ? json(nullptr) : json(finish[c])},
           {"stop_reason", stop_reason[c]}});
    }
    SendJson(res, {{"id", id}, {"object", "chat.completion"}, {"created", created},
                   {"model", model}, {"choices", std::move(choices)},
                   {"usage", UsageJson((*group)->Usage())}});
    return;
  }

  struct StreamState {
    bool role_sent = false;
    bool finished = false;
  };
  auto state = std::make_shared<StreamState>();
  std::shared_ptr<StreamGroup> g = *group;
  const bool include_usage = common->include_usage;
  res.set_header("Cache-Control", "no-cache");
  s_.active_.fetch_add(1);  // until the releaser runs
  res.set_chunked_content_provider(
      "text/event-stream",
      [=, this](size_t, httplib::DataSink& sink) {
        auto send = [&](const json& chunk) {
          std::string line = "data: " +
                             chunk.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
          return sink.write(line.data(), line.size());
        };
        auto chunk_of = [&](json choices) {
          return json{{"id", id}, {"object", "chat.completion.chunk"}, {"created", created},
                      {"model", model}, {"choices", std::move(choices)}};
        };
        if (!state->role_sent) {
          state->role_sent = true;
          for (int c = 0; c < num_choices; ++c) {
            json choice = {{"index", c}, {"delta", {{"role", "assistant"}, {"content", ""}}},
                           {"logprobs", nullptr}, {"finish_reason", nullptr}};
            if (!send(chunk_of(json::array({std::move(choice)})))) return false;
          }
        }
        bool done = false;
        for (ChoiceDelta& d : g->Poll(kStreamPollSeconds, &done)) {
          json lp = nullptr;
          if (logprobs) {
            lp = {{"content", json::array()}};
            content_logprobs(lp["content"], d);
          }
          json delta = json::object();
          if (!d.text.empty() || d.finish_reason.empty()) delta["content"] = d.text;
          json choice = {{"index", d.index}, {"delta", std::move(delta)}, {"logprobs", lp},
                         {"finish_reason", d.finish_reason.empty() ? json(nullptr)
                                                                   : json(d.finish_reason)}};
          if (!d.finish_reason.empty()) choice["stop_reason"] = StopReason(d);
          if (!send(chunk_of(json::array({std::move(choice)})))) return false;
        }
        if (!done) return true;
        state->finished = true;
        EndStream(*g, include_usage, chunk_of(json::array()), send, sink);
        return true;
      },
      [this, g, state](bool success) {
        if (!success || !state->finished) g->CancelAll();
        s_.active_.fetch_sub(1);
      });
}

void HttpServer::Handlers::Register(httplib::Server& svr) {
  using Req = const httplib::Request&;
  using Res = httplib::Response&;
  auto wrap = [this](void (Handlers::*fn)(Req, Res)) {
    return [this, fn](Req req, Res res) {
      s_.active_.fetch_add(1);
      (this->*fn)(req, res);
      s_.active_.fetch_sub(1);
    };
  };
  auto not_allowed = [](Req req, Res res) {
    SendError(res, 405, absl::StrCat("method ", req.method, " is not allowed on ", req.path));
  };
  // GET routes.
  for (const char* path : {"/health", "/metrics", "/v1/models", "/v1/cluster"}) {
    svr.Post(path, not_allowed).Put(path, not_allowed).Delete(path, not_allowed)
        .Patch(path, not_allowed);
  }
  svr.Get("/health", wrap(&Handlers::Health));
  svr.Get("/metrics", wrap(&Handlers::Metrics));
  svr.Get("/v1/models", [this](Req req, Res res) {
    if (Serving(res)) Models(req, res);
  });
  svr.Get("/v1/cluster", [this](Req req, Res res) {
    if (Serving(res)) Cluster(req, res);
  });
  // POST routes.
  for (const char* path :
       {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}) {
    svr.Get(path, not_allowed).Put(path, not_allowed).Delete(path, not_allowed)
        .Patch(path, not_allowed);
  }
  svr.Post("/v1/completions", wrap(&Handlers::Completions));
  svr.Post("/v1/chat/completions", wrap(&Handlers::ChatCompletions));
  svr.Post("/tokenize", wrap(&Handlers::Tokenize));
  svr.Post("/detokenize", wrap(&Handlers::Detokenize));

  svr.set_pre_routing_handler([this](Req req, Res res) {
    const std::string& key = s_.options_.api_key;
    if (key.empty() || !absl::StartsWith(req.path, "/v1/")) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    if (req.get_header_value("Authorization") == "Bearer " + key) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    SendError(res, 401, "missing or invalid API key (send Authorization: Bearer <key>)");
    return httplib::Server::HandlerResponse::Handled;
  });
  svr.set_error_handler([](Req req, Res res) {
    if (!res.body.empty() || res.status == 503) return;
    if (res.status == 404) {
      SendError(res, 404, absl::StrCat("no route ", req.method, " ", req.path));
    } else if (res.status == 413) {
      SendError(res, 413, "the request body is too large");
    } else {
      SendError(res, res.status, absl::StrCat("HTTP ", res.status));
    }
  });
  svr.set_exception_handler([](Req, Res res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    SendError(res, 500, what);
  });
}

// ---------------------------------------------------------------------------------------

HttpServer::HttpServer(HttpServerOptions options)
    : options_(std::move(options)), server_(std::make_unique<httplib::Server>()) {
  handlers_ = std::make_unique<Handlers>(*this);
  const int threads = std::max(4, options_.num_threads);
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));
  server_->set_keep_alive_timeout(5);
  server_->set_read_timeout(30);
  server_->set_write_timeout(30);
  // cpp-httplib (Debian's 0.11 library) listens with a backlog of 5, fixed when the library
  // was built: a burst of connections that arrives while the engine thread holds the CPUs
  // overflows it and clients see "connection reset". Keep the socket to raise it in Bind.
  server_->set_socket_options([this](socket_t sock) {
    httplib::default_socket_options(sock);
    listen_fd_.store(static_cast<int>(sock));
  });
  handlers_->Register(*server_);
}

HttpServer::~HttpServer() { Stop(); }

absl::StatusOr<int> HttpServer::Bind() {
  int port = options_.port;
  if (options_.port == 0) {
    port = server_->bind_to_any_port(options_.host);
    if (port < 0) {
      return absl::UnavailableError(absl::StrCat("cannot bind ", options_.host, " (any port)"));
    }
  } else if (!server_->bind_to_port(options_.host, options_.port)) {
    return absl::UnavailableError(
        absl::StrCat("cannot bind ", options_.host, ":", options_.port, " (in use?)"));
  }
  // listen() on a listening socket only changes its backlog (the kernel caps it at somaxconn).
  if (int fd = listen_fd_.load(); fd >= 0 && ::listen(fd, kListenBacklog) != 0) {
    MOE_LOG(WARNING) << "could not raise the HTTP listen backlog" << common::Kv("errno", errno);
  }
  return port;
}

void HttpServer::Start() {
  listen_thread_ = std::thread([this] { server_->listen_after_bind(); });
}

void HttpServer::SetBackend(HttpBackend backend) {
  backend_ = std::move(backend);
  state_.store(State::kServing);
}

void HttpServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  server_->stop();
  if (listen_thread_.joinable()) listen_thread_.join();
}

}  // namespace moe::server
