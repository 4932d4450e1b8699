#include "bench/load_generator.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <mutex>
#include <ostream>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"

namespace moe::bench {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// Text prompts and the token-id pool come from this passage (plain English words, which every
// BPE vocabulary, the generated test models' included, tokenizes into ordinary tokens).
constexpr char kPassage[] =
    "The river ran high after three days of rain and the old bridge at the edge of the town "
    "groaned under the weight of carts coming back from the market. Children watched from the "
    "bank as the water carried branches, leaves and once a small wooden boat past the mill. "
    "Their grandmother said the river had been this high only twice before, in the year the "
    "school was built and in the winter the baker's son went away to sea. By evening the clouds "
    "broke, the light turned gold over the fields, and people walked out to look at the water, "
    "talking quietly about harvests, roofs that needed mending, letters from far away cities and "
    "the price of grain. A teacher counted the stones of the wall, a farmer mended a fence, and a "
    "young clerk wrote down numbers in a book that nobody would read for a hundred years.";

// Uniform double in [0, 1) from 53 random bits.
double UnitUniform(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

// Uniform integer in [low, high].
int64_t UniformInt(std::mt19937_64& rng, int64_t low, int64_t high) {
  const uint64_t span = static_cast<uint64_t>(high - low) + 1;
  return low + static_cast<int64_t>(UnitUniform(rng) * static_cast<double>(span)) %
                   static_cast<int64_t>(span);
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

json StatsJson(const LatencyStats& s, double scale) {
  return {{"count", s.count},      {"mean", s.mean * scale}, {"std", s.std * scale},
          {"p50", s.p50 * scale},  {"p90", s.p90 * scale},   {"p99", s.p99 * scale},
          {"min", s.min * scale},  {"max", s.max * scale}};
}

// The error message of an OpenAI error body, or the body itself (shortened).
std::string ErrorMessage(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("error")) {
    const json& e = j["error"];
    if (e.is_object() && e.contains("message") && e["message"].is_string()) {
      return e["message"].get<std::string>();
    }
    if (e.is_string()) return e.get<std::string>();
  }
  return body.substr(0, 200);
}

std::unique_ptr<httplib::ClientImpl> MakeClient(const ParsedUrl& url, double read_timeout_s) {
  auto client = std::make_unique<httplib::ClientImpl>(url.host, url.port);
  client->set_connection_timeout(std::chrono::seconds(5));
  client->set_write_timeout(std::chrono::seconds(30));
  client->set_read_timeout(std::chrono::duration<double>(std::max(1.0, read_timeout_s)));
  client->set_keep_alive(false);
  client->set_compress(false);
  client->set_decompress(false);
  return client;
}

httplib::Headers BaseHeaders(const LoadOptions& o) {
  // identity: a compressing proxy or server would buffer the event stream and hide latency.
  httplib::Headers h = {{"Accept-Encoding", "identity"}};
  if (!o.api_key.empty()) h.emplace("Authorization", "Bearer " + o.api_key);
  return h;
}

absl::StatusOr<std::string> DiscoverModel(const ParsedUrl& url, const LoadOptions& o) {
  auto client = MakeClient(url, 30);
  httplib::Result res = client->Get("/v1/models", BaseHeaders(o));
  if (!res) {
    return absl::UnavailableError(absl::StrCat("GET ", o.url, "/v1/models: ",
                                               httplib::to_string(res.error())));
  }
  if (res->status != 200) {
    return absl::UnavailableError(absl::StrCat("GET /v1/models: HTTP ", res->status, ": ",
                                               ErrorMessage(res->body)));
  }
  json j = json::parse(res->body, nullptr, false);
  if (!j.is_object() || !j.contains("data") || !j["data"].is_array() || j["data"].empty() ||
      !j["data"][0].contains("id") || !j["data"][0]["id"].is_string()) {
    return absl::UnavailableError("GET /v1/models: no model in the answer; pass --model");
  }
  return j["data"][0]["id"].get<std::string>();
}

// GET /metrics as series -> value; empty when the server has none.
std::map<std::string, double> ScrapeMetrics(const ParsedUrl& url, const LoadOptions& o) {
  auto client = MakeClient(url, 10);
  httplib::Result res = client->Get("/metrics", BaseHeaders(o));
  if (!res || res->status != 200) return {};
  return ParsePrometheusText(res->body);
}

// The distinct token ids of the passage as the server's tokenizer encodes it.
absl::StatusOr<std::vector<int32_t>> TokenPool(const ParsedUrl& url, const LoadOptions& o,
                                               const std::string& model) {
  auto client = MakeClient(url, 30);
  const json body = {{"model", model}, {"prompt", kPassage}, {"add_special_tokens", false}};
  httplib::Result res = client->Post("/tokenize", BaseHeaders(o), body.dump(), "application/json");
  if (!res || res->status != 200) {
    return absl::UnavailableError(absl::StrCat(
        "POST /tokenize failed (",
        res ? absl::StrCat("HTTP ", res->status, ": ", ErrorMessage(res->body))
            : httplib::to_string(res.error()),
        "); token-id prompts need it, or pass --vocab-size, or --prompt-kind text"));
  }
  json j = json::parse(res->body, nullptr, false);
  if (!j.is_object() || !j.contains("tokens") || !j["tokens"].is_array()) {
    return absl::UnavailableError("POST /tokenize: no \"tokens\" in the answer");
  }
  std::vector<int32_t> ids;
  for (const json& t : j["tokens"]) {
    if (t.is_number_integer()) ids.push_back(t.get<int32_t>());
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  if (ids.empty()) return absl::UnavailableError("POST /tokenize: the passage gave no tokens");
  return ids;
}

json RequestBody(const LoadOptions& o, const std::string& model, const SampledRequest& r) {
  json body = {{"model", model},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}},
               {"ignore_eos", true},
               {"temperature", o.temperature}};
  if (o.endpoint == "/v1/chat/completions") {
    body["messages"] = json::array({{{"role", "user"}, {"content", r.prompt_text}}});
    body["max_completion_tokens"] = r.output_len;
  } else {
    if (r.prompt_ids.empty()) {
      body["prompt"] = r.prompt_text;
    } else {
      body["prompt"] = r.prompt_ids;
    }
    body["max_tokens"] = r.output_len;
  }
  return body;
}

// Whether a streamed choice carries generated tokens. Chat streams open with a chunk that
// only announces the role ({"role": "assistant", "content": ""}); it is not a token.
bool IsTokenChunk(const json& choice) {
  if (!choice.is_object()) return false;
  auto delta = choice.find("delta");
  if (delta == choice.end() || !delta->is_object() || !delta->contains("role")) return true;
  auto content = delta->find("content");
  return content != delta->end() && content->is_string() && !content->get<std::string>().empty();
}

// The in-flight requests' clients, so the deadline can cut their connections.
class InFlight {
 public:
  explicit InFlight(int slots) : clients_(slots, nullptr) {}
  void Set(int slot, httplib::ClientImpl* c) {
    std::lock_guard<std::mutex> lock(mu_);
    clients_[slot] = c;
  }
  void StopAll() {
    std::lock_guard<std::mutex> lock(mu_);
    for (httplib::ClientImpl* c : clients_) {
      if (c != nullptr) c->stop();
    }
  }

 private:
  std::mutex mu_;
  std::vector<httplib::ClientImpl*> clients_;
};

// Sends one request and streams its answer into *r. `stop` cuts it short.
void SendOne(const ParsedUrl& url, const LoadOptions& o, const std::string& model,
             const SampledRequest& req, Clock::time_point start, const std::atomic<bool>& stop,
             InFlight& in_flight, int slot, RequestResult* r) {
  auto client = MakeClient(url, o.max_duration_s + 5);
  in_flight.Set(slot, client.get());
  httplib::Request http;
  http.method = "POST";
  http.path = o.endpoint;
  http.headers = BaseHeaders(o);
  http.headers.emplace("Accept", "text/event-stream");
  http.body = RequestBody(o, model, req).dump();
  http.set_header("Content-Type", "application/json");

  SseParser sse;
  int status = 0;
  std::string error_body;
  bool saw_done = false;
  http.response_handler = [&](const httplib::Response& res) {
    status = res.status;
    return !stop.load();
  };
  http.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
    const double now = Seconds(Clock::now() - start);
    if (status != 200) {
      if (error_body.size() < 65536) error_body.append(data, size);
      return true;
    }
    for (const std::string& event : sse.Feed(data, size)) {
      if (event == "[DONE]") {
        saw_done = true;
        continue;
      }
      json j = json::parse(event, nullptr, false);
      if (!j.is_object()) continue;
      if (j.contains("error")) {
        r->error = "stream error: " + ErrorMessage(event);
        continue;
      }
      if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty() &&
          IsTokenChunk(j["choices"][0])) {
        if (r->first_token_s < 0) r->first_token_s = now;
        r->chunk_s.push_back(now);
      }
      if (j.contains("usage") && j["usage"].is_object()) {
        const json& u = j["usage"];
        if (u.contains("prompt_tokens") && u["prompt_tokens"].is_number_integer()) {
          r->prompt_tokens = u["prompt_tokens"].get<int64_t>();
        }
        if (u.contains("completion_tokens") && u["completion_tokens"].is_number_integer()) {
          r->output_tokens = u["completion_tokens"].get<int64_t>();
        }
      }
    }
    return !stop.load();
  };

  r->send_s = Seconds(Clock::now() - start);
  httplib::Result res = client->send(http);
  r->end_s = Seconds(Clock::now() - start);
  in_flight.Set(slot, nullptr);

  if (stop.load() && !saw_done) {
    r->cancelled = true;
    r->error = "cancelled at --max-duration-s";
    return;
  }
  if (!res) {
    r->error = absl::StrCat("HTTP client: ", httplib::to_string(res.error()));
    return;
  }
  if (status != 200) {
    r->error = absl::StrCat("HTTP ", status, ": ", ErrorMessage(error_body));
    return;
  }
  if (!r->error.empty()) return;
  if (!saw_done) {
    r->error = "the stream ended without [DONE]";
    return;
  }
  if (r->prompt_tokens == 0) r->prompt_tokens = req.input_len;
  if (r->output_tokens == 0) r->output_tokens = static_cast<int64_t>(r->chunk_s.size());
  r->success = true;
}

}  // namespace

// --- Flags -------------------------------------------------------------------------------------

void AddLoadFlags(common::FlagSet& flags, LoadOptions* o, std::string* json_path) {
  flags.AddString("url", &o->url,
                  "server base URL, http only; must be loopback unless --allow-remote");
  flags.AddBool("allow-remote", &o->allow_remote,
                "allow a non-loopback --url (load tests in this project target 127.0.0.1)");
  flags.AddString("endpoint", &o->endpoint, "/v1/completions | /v1/chat/completions");
  flags.AddString("model", &o->model, "model name in the requests (default: GET /v1/models)");
  flags.AddString("api-key", &o->api_key, "bearer token, when the server wants one");
  flags.AddInt("num-prompts", &o->num_prompts, "requests to send");
  flags.AddInt("concurrency", &o->concurrency,
               "most requests in flight (0: all of them, at most 128)");
  flags.AddDouble("request-rate", &o->request_rate,
                  "Poisson arrivals at this many requests/s (0: send as slots free up)");
  flags.AddInt("input-len", &o->input_len, "prompt tokens per request");
  flags.AddInt("output-len", &o->output_len, "output tokens per request (ignore_eos)");
  flags.AddDouble("range-ratio", &o->range_ratio,
                  "lengths uniform in [len*(1-r), len*(1+r)], r in [0, 1)");
  flags.AddString("prompt-kind", &o->prompt_kind,
                  "token-ids (exact input length) | text (approximate)");
  flags.AddInt("vocab-size", &o->vocab_size,
               "draw token ids uniformly from [0, N) instead of the server's /tokenize");
  flags.AddInt("seed", &o->seed, "seed of lengths, prompts and arrivals");
  flags.AddDouble("temperature", &o->temperature, "sampling temperature of the requests");
  flags.AddDouble("max-duration-s", &o->max_duration_s,
                  "hard bound: stop sending and cancel what is in flight after this many s");
  flags.AddBool("server-metrics", &o->server_metrics,
                "scrape /metrics before and after and report the server's step times");
  flags.AddString("json", json_path, "write the results as JSON to this file");
}

absl::Status ValidateLoadOptions(const LoadOptions& o) {
  MOE_ASSIGN_OR_RETURN(ParsedUrl url, ParseBaseUrl(o.url));
  if (!o.allow_remote && !IsLoopbackHost(url.host)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--url: host \"", url.host,
        "\" is not loopback; load tests target 127.0.0.1 (pass --allow-remote to override)"));
  }
  if (o.endpoint != "/v1/completions" && o.endpoint != "/v1/chat/completions") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--endpoint: \"", o.endpoint, "\" is not /v1/completions or /v1/chat/completions"));
  }
  if (o.num_prompts < 1 || o.num_prompts > kMaxPrompts) {
    return absl::InvalidArgumentError(
        absl::StrCat("--num-prompts: must be in [1, ", kMaxPrompts, "], got ", o.num_prompts));
  }
  if (o.concurrency < 0 || o.concurrency > kMaxConcurrency) {
    return absl::InvalidArgumentError(absl::StrCat("--concurrency: must be in [0, ",
                                                   kMaxConcurrency, "], got ", o.concurrency));
  }
  if (!(o.request_rate >= 0) || std::isinf(o.request_rate)) {
    return absl::InvalidArgumentError("--request-rate: must be a finite number >= 0");
  }
  if (o.input_len < 1 || o.output_len < 1) {
    return absl::InvalidArgumentError("--input-len, --output-len: must be >= 1");
  }
  if (!(o.range_ratio >= 0 && o.range_ratio < 1)) {
    return absl::InvalidArgumentError("--range-ratio: must be in [0, 1)");
  }
  if (o.prompt_kind != "token-ids" && o.prompt_kind != "text") {
    return absl::InvalidArgumentError(
        absl::StrCat("--prompt-kind: \"", o.prompt_kind, "\" is not token-ids or text"));
  }
  if (o.vocab_size < 0 || o.vocab_size > INT32_MAX) {
    return absl::InvalidArgumentError("--vocab-size: must be in [0, 2^31)");
  }
  if (!(o.max_duration_s > 0) || o.max_duration_s > 86400) {
    return absl::InvalidArgumentError("--max-duration-s: must be in (0, 86400]");
  }
  if (!(o.temperature >= 0)) return absl::InvalidArgumentError("--temperature: must be >= 0");
  return absl::OkStatus();
}

// --- URL ---------------------------------------------------------------------------------------

absl::StatusOr<ParsedUrl> ParseBaseUrl(const std::string& url) {
  ParsedUrl p;
  std::string rest;
  if (absl::StartsWith(url, "http://")) {
    p.scheme = "http";
    rest = url.substr(7);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--url: \"", url, "\" must start with http://"));
  }
  if (absl::EndsWith(rest, "/")) rest.pop_back();
  if (rest.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--url: \"", url, "\" must have no path (the endpoint is --endpoint)"));
  }
  std::string port_text;
  if (absl::StartsWith(rest, "[")) {
    const size_t close = rest.find(']');
    if (close == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--url: \"", url, "\": unclosed ["));
    }
    p.host = rest.substr(1, close - 1);
    std::string after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') {
        return absl::InvalidArgumentError(absl::StrCat("--url: \"", url, "\": bad port"));
      }
      port_text = after.substr(1);
    }
  } else {
    const size_t colon = rest.rfind(':');
    if (colon == std::string::npos) {
      p.host = rest;
    } else {
      p.host = rest.substr(0, colon);
      port_text = rest.substr(colon + 1);
    }
  }
  if (p.host.empty()) return absl::InvalidArgumentError(absl::StrCat("--url: \"", url, "\": no host"));
  p.port = 80;
  if (!port_text.empty()) {
    int port = 0;
    if (!absl::SimpleAtoi(port_text, &port) || port < 1 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--url: \"", url, "\": port must be in [1, 65535]"));
    }
    p.port = port;
  }
  return p;
}

bool IsLoopbackHost(const std::string& host) {
  const std::string h = absl::AsciiStrToLower(host);
  if (h == "localhost" || h == "::1") return true;
  std::vector<std::string> parts = absl::StrSplit(h, '.');
  if (parts.size() != 4) return false;
  for (const std::string& part : parts) {
    int v = 0;
    if (part.empty() || part.size() > 3 || !absl::SimpleAtoi(part, &v) || v < 0 || v > 255) {
      return false;
    }
  }
  return parts[0] == "127";
}

// --- Workload ----------------------------------------------------------------------------------

std::vector<std::string> PassageWords() {
  return absl::StrSplit(kPassage, ' ', absl::SkipEmpty());
}

std::vector<double> PoissonArrivals(int64_t n, double rate, int64_t seed) {
  std::vector<double> out(std::max<int64_t>(n, 0), 0.0);
  if (rate <= 0) return out;
  // A stream of its own, so the arrivals do not change when the lengths do.
  std::mt19937_64 rng(static_cast<uint64_t>(seed) ^ 0x9e3779b97f4a7c15ULL);
  double t = 0;
  for (double& a : out) {
    t += -std::log1p(-UnitUniform(rng)) / rate;
    a = t;
  }
  return out;
}

std::pair<int64_t, int64_t> LengthRange(int64_t len, double range_ratio) {
  const int64_t low = std::max<int64_t>(
      1, static_cast<int64_t>(std::floor(static_cast<double>(len) * (1 - range_ratio))));
  const int64_t high = std::max<int64_t>(
      low, static_cast<int64_t>(std::ceil(static_cast<double>(len) * (1 + range_ratio))));
  return {low, high};
}

std::vector<SampledRequest> BuildWorkload(const WorkloadArgs& a) {
  std::vector<SampledRequest> out(std::max<int64_t>(a.num_prompts, 0));
  std::mt19937_64 rng(static_cast<uint64_t>(a.seed));
  const auto [in_low, in_high] = LengthRange(a.input_len, a.range_ratio);
  const auto [out_low, out_high] = LengthRange(a.output_len, a.range_ratio);
  const std::vector<double> arrivals = PoissonArrivals(a.num_prompts, a.request_rate, a.seed);
  for (size_t i = 0; i < out.size(); ++i) {
    SampledRequest& r = out[i];
    r.input_len = UniformInt(rng, in_low, in_high);
    r.output_len = UniformInt(rng, out_low, out_high);
    r.arrival_s = arrivals[i];
    if (a.text) {
      std::string text;
      for (int64_t k = 0; k < r.input_len && !a.word_pool.empty(); ++k) {
        if (k > 0) text += ' ';
        text += a.word_pool[UniformInt(rng, 0, static_cast<int64_t>(a.word_pool.size()) - 1)];
      }
      r.prompt_text = std::move(text);
    } else if (!a.id_pool.empty()) {
      r.prompt_ids.resize(r.input_len);
      for (int32_t& id : r.prompt_ids) {
        id = a.id_pool[UniformInt(rng, 0, static_cast<int64_t>(a.id_pool.size()) - 1)];
      }
    }
  }
  return out;
}

// --- SSE ---------------------------------------------------------------------------------------

std::vector<std::string> SseParser::Feed(const char* data, size_t size) {
  buffer_.append(data, size);
  std::vector<std::string> events;
  for (;;) {
    // An event ends at a blank line; tolerate \r\n line ends.
    size_t end = std::string::npos, skip = 0;
    const size_t lf = buffer_.find("\n\n");
    const size_t crlf = buffer_.find("\r\n\r\n");
    if (lf != std::string::npos && (crlf == std::string::npos || lf < crlf)) {
      end = lf;
      skip = 2;
    } else if (crlf != std::string::npos) {
      end = crlf;
      skip = 4;
    }
    if (end == std::string::npos) break;
    const std::string block = buffer_.substr(0, end);
    buffer_.erase(0, end + skip);
    std::string payload;
    bool has_data = false;
    for (absl::string_view line : absl::StrSplit(block, '\n')) {
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (!absl::StartsWith(line, "data:")) continue;
      line.remove_prefix(5);
      if (!line.empty() && line.front() == ' ') line.remove_prefix(1);
      if (has_data) payload += '\n';
      payload.append(line.data(), line.size());
      has_data = true;
    }
    if (has_data) events.push_back(std::move(payload));
  }
  return events;
}

// --- Statistics --------------------------------------------------------------------------------

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (rank - static_cast<double>(lo));
}

LatencyStats Summarize(const std::vector<double>& values) {
  LatencyStats s;
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  double sq = 0;
  for (double v : values) sq += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(sq / static_cast<double>(values.size()));
  std::vector<double> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  s.min = sorted.front();
  s.max = sorted.back();
  s.p50 = Percentile(sorted, 50);
  s.p90 = Percentile(sorted, 90);
  s.p99 = Percentile(sorted, 99);
  return s;
}

std::optional<double> Tpot(const RequestResult& r) {
  if (!r.success || r.output_tokens <= 1 || r.first_token_s < 0) return std::nullopt;
  return (r.end_s - r.first_token_s) / static_cast<double>(r.output_tokens - 1);
}

std::vector<double> InterTokenLatencies(const RequestResult& r) {
  std::vector<double> out;
  for (size_t i = 1; i < r.chunk_s.size(); ++i) out.push_back(r.chunk_s[i] - r.chunk_s[i - 1]);
  return out;
}

LoadReport BuildReport(const LoadOptions& options, const std::vector<RequestResult>& results) {
  LoadReport rep;
  rep.options = options;
  rep.num_prompts = static_cast<int64_t>(results.size());
  std::vector<double> ttft, tpot, itl, e2e;
  double first_send = -1, last_end = 0;
  std::map<std::string, int> error_counts;
  for (const RequestResult& r : results) {
    const bool sent = r.end_s > 0 || r.success || !r.error.empty();
    if (!sent) {
      ++rep.not_sent;
      continue;
    }
    if (first_send < 0 || r.send_s < first_send) first_send = r.send_s;
    last_end = std::max(last_end, r.end_s);
    if (r.cancelled) {
      ++rep.cancelled;
      continue;
    }
    if (!r.success) {
      ++rep.failed;
      if (error_counts.size() < 10) ++error_counts[r.error];
      continue;
    }
    ++rep.completed;
    rep.total_input_tokens += r.prompt_tokens;
    rep.total_output_tokens += r.output_tokens;
    if (r.first_token_s >= 0) ttft.push_back(r.first_token_s - r.send_s);
    if (std::optional<double> t = Tpot(r)) tpot.push_back(*t);
    for (double gap : InterTokenLatencies(r)) itl.push_back(gap);
    e2e.push_back(r.end_s - r.send_s);
  }
  for (const RequestResult& r : results) {
    json q = {{"send_s", r.send_s},
              {"ttft_s", r.first_token_s >= 0 ? json(r.first_token_s - r.send_s) : json(nullptr)},
              {"e2e_s", r.end_s - r.send_s},
              {"input_tokens", r.prompt_tokens},
              {"output_tokens", r.output_tokens},
              {"chunks", r.chunk_s.size()}};
    if (!r.error.empty()) q["error"] = r.error;
    rep.requests.push_back(std::move(q));
  }
  for (const auto& [message, count] : error_counts) {
    rep.errors.push_back(count > 1 ? absl::StrCat(message, " (x", count, ")") : message);
  }
  rep.duration_s = first_send < 0 ? 0 : last_end - first_send;
  if (rep.duration_s > 0) {
    rep.request_throughput = static_cast<double>(rep.completed) / rep.duration_s;
    rep.output_throughput = static_cast<double>(rep.total_output_tokens) / rep.duration_s;
    rep.total_token_throughput =
        static_cast<double>(rep.total_input_tokens + rep.total_output_tokens) / rep.duration_s;
  }
  rep.ttft_s = Summarize(ttft);
  rep.tpot_s = Summarize(tpot);
  rep.itl_s = Summarize(itl);
  rep.e2e_s = Summarize(e2e);
  return rep;
}

json ReportToJson(const LoadReport& r) {
  const LoadOptions& o = r.options;
  json config = {{"url", o.url},
                 {"endpoint", o.endpoint},
                 {"model", r.model},
                 {"num_prompts", o.num_prompts},
                 {"concurrency", o.concurrency},
                 {"request_rate", o.request_rate},
                 {"input_len", o.input_len},
                 {"output_len", o.output_len},
                 {"range_ratio", o.range_ratio},
                 {"prompt_kind", o.prompt_kind},
                 {"seed", o.seed},
                 {"temperature", o.temperature},
                 {"max_duration_s", o.max_duration_s}};
  return {{"config", config},
          {"completed", r.completed},
          {"failed", r.failed},
          {"cancelled", r.cancelled},
          {"not_sent", r.not_sent},
          {"hit_max_duration", r.hit_max_duration},
          {"max_in_flight", r.max_in_flight},
          {"duration_s", r.duration_s},
          {"total_input_tokens", r.total_input_tokens},
          {"total_output_tokens", r.total_output_tokens},
          {"request_throughput", r.request_throughput},
          {"output_throughput", r.output_throughput},
          {"total_token_throughput", r.total_token_throughput},
          {"ttft_ms", StatsJson(r.ttft_s, 1e3)},
          {"tpot_ms", StatsJson(r.tpot_s, 1e3)},
          {"itl_ms", StatsJson(r.itl_s, 1e3)},
          {"e2el_ms", StatsJson(r.e2e_s, 1e3)},
          {"errors", r.errors},
          {"server_metrics", r.server_metrics},
          {"requests", r.requests}};
}

std::string FormatReport(const LoadReport& r) {
  std::ostringstream s;
  auto line = [&](const std::string& label, const std::string& value) {
    s << std::left << std::setw(40) << label << value << "\n";
  };
  auto num = [](double v, int digits) { return FormatNumber(v, digits); };
  auto header = [&](const std::string& title) {
    const int width = 50;
    const int pad = std::max(0, width - static_cast<int>(title.size()) - 2);
    s << std::string(pad / 2, '-') << " " << title << " " << std::string(pad - pad / 2, '-')
      << "\n";
  };
  s << std::string(18, '=') << " Serving Benchmark Result " << std::string(18, '=') << "\n";
  line("Model:", r.model);
  line("Endpoint:", r.options.endpoint);
  line("Concurrency (max in flight):", absl::StrCat(r.options.concurrency, " (", r.max_in_flight,
                                                    ")"));
  line("Request rate (req/s):",
       r.options.request_rate > 0 ? num(r.options.request_rate, 2) : std::string("unpaced"));
  line("Successful requests:", absl::StrCat(r.completed, " / ", r.num_prompts));
  line("Failed requests:", absl::StrCat(r.failed));
  if (r.cancelled > 0 || r.not_sent > 0) {
    line("Cancelled / not sent (max duration):", absl::StrCat(r.cancelled, " / ", r.not_sent));
  }
  line("Benchmark duration (s):", num(r.duration_s, 2));
  line("Total input tokens:", absl::StrCat(r.total_input_tokens));
  line("Total generated tokens:", absl::StrCat(r.total_output_tokens));
  line("Request throughput (req/s):", num(r.request_throughput, 2));
  line("Output token throughput (tok/s):", num(r.output_throughput, 2));
  line("Total token throughput (tok/s):", num(r.total_token_throughput, 2));
  auto block = [&](const std::string& title, const std::string& tag, const LatencyStats& st) {
    header(title);
    line("Mean " + tag + " (ms):", num(st.mean * 1e3, 2));
    line("Median " + tag + " (ms):", num(st.p50 * 1e3, 2));
    line("P90 " + tag + " (ms):", num(st.p90 * 1e3, 2));
    line("P99 " + tag + " (ms):", num(st.p99 * 1e3, 2));
  };
  block("Time to First Token", "TTFT", r.ttft_s);
  block("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_s);
  block("Inter-token Latency", "ITL", r.itl_s);
  block("End-to-end Latency", "E2EL", r.e2e_s);
  const json& m = r.server_metrics;
  if (m.is_object() && m.contains("steps")) {
    header("Server (from /metrics)");
    line("Engine steps:", absl::StrCat(m["steps"].get<double>()));
    line("Mean step time (ms):", num(m["step_mean_s"].get<double>() * 1e3, 2));
    if (m.contains("step_p99_s")) {
      line("P50 / P99 step time (ms, buckets):",
           absl::StrCat(num(m["step_p50_s"].get<double>() * 1e3, 1), " / ",
                        num(m["step_p99_s"].get<double>() * 1e3, 1)));
    }
    if (m.contains("seqs_per_step")) {
      line("Mean sequences per step:", num(m["seqs_per_step"].get<double>(), 2));
    }
    if (r.duration_s > 0) {
      line("Engine busy (step time / duration):",
           FormatPercent(m["step_busy_s"].get<double>() / r.duration_s));
    }
  }
  s << std::string(62, '=') << "\n";
  for (const std::string& e : r.errors) s << "error: " << e << "\n";
  return s.str();
}

std::string FormatProgress(const Progress& p) {
  const int width = 30;
  const int64_t total = std::max<int64_t>(p.total, 1);
  const int filled = static_cast<int>(std::min<int64_t>(width, p.done * width / total));
  return absl::StrCat("[", std::string(filled, '#'), std::string(width - filled, ' '), "] ",
                      p.done, "/", p.total, " done, ", p.failed, " failed, ", p.in_flight,
                      " in flight, ", FormatNumber(p.elapsed_s, 1), " s");
}

// --- Server metrics ----------------------------------------------------------------------------

std::map<std::string, double> ParsePrometheusText(const std::string& text) {
  std::map<std::string, double> out;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    // The value follows the last space outside the label set.
    const size_t brace = line.rfind('}');
    const size_t space = line.find(' ', brace == absl::string_view::npos ? 0 : brace);
    if (space == absl::string_view::npos) continue;
    absl::string_view value_text = absl::StripAsciiWhitespace(line.substr(space + 1));
    // A timestamp may follow the value.
    value_text = value_text.substr(0, value_text.find(' '));
    double value = 0;
    if (value_text == "+Inf") {
      value = INFINITY;
    } else if (!absl::SimpleAtod(value_text, &value)) {
      continue;
    }
    out[std::string(line.substr(0, space))] = value;
  }
  return out;
}

double HistogramQuantile(const std::vector<std::pair<double, double>>& buckets, double q) {
  if (buckets.empty()) return 0;
  const double total = buckets.back().second;
  if (total <= 0) return 0;
  const double rank = q * total;
  double prev_bound = 0, prev_count = 0;
  for (const auto& [bound, count] : buckets) {
    if (count >= rank) {
      if (std::isinf(bound)) return prev_bound;  // beyond the last finite bound
      if (count == prev_count) return bound;
      return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count);
    }
    prev_bound = bound;
    prev_count = count;
  }
  return prev_bound;
}

json ServerMetricsDelta(const std::map<std::string, double>& before,
                        const std::map<std::string, double>& after) {
  // Sum over every label set of a series name (counters with labels, e.g. finished_reason).
  auto total = [](const std::map<std::string, double>& m, const std::string& name,
                  bool* found) {
    double sum = 0;
    for (auto it = m.lower_bound(name); it != m.end() && absl::StartsWith(it->first, name);
         ++it) {
      const std::string& key = it->first;
      if (key.size() == name.size() || key[name.size()] == '{') {
        sum += it->second;
        *found = true;
      }
    }
    return sum;
  };
  auto delta = [&](const std::string& name, bool* found) {
    bool in_after = false, unused = false;
    const double d = total(after, name, &in_after) - total(before, name, &unused);
    *found = in_after;
    return d;
  };
  json out = json::object();
  bool found = false;
  const double steps = delta("moe_step_duration_seconds_count", &found);
  if (!found || steps <= 0) return out;
  const double busy = delta("moe_step_duration_seconds_sum", &found);
  out["steps"] = steps;
  out["step_busy_s"] = busy;
  out["step_mean_s"] = busy / steps;
  // Buckets: moe_step_duration_seconds_bucket{le="0.1"}.
  const std::string prefix = "moe_step_duration_seconds_bucket{";
  std::vector<std::pair<double, double>> buckets;
  for (auto it = after.lower_bound(prefix); it != after.end() && absl::StartsWith(it->first, prefix);
       ++it) {
    const size_t le = it->first.find("le=\"");
    if (le == std::string::npos) continue;
    const size_t end = it->first.find('"', le + 4);
    const std::string bound_text = it->first.substr(le + 4, end - le - 4);
    double bound = 0;
    if (bound_text == "+Inf") {
      bound = INFINITY;
    } else if (!absl::SimpleAtod(bound_text, &bound)) {
      continue;
    }
    auto b = before.find(it->first);
    buckets.emplace_back(bound, it->second - (b == before.end() ? 0 : b->second));
  }
  std::sort(buckets.begin(), buckets.end());
  if (!buckets.empty()) {
    out["step_p50_s"] = HistogramQuantile(buckets, 0.5);
    out["step_p99_s"] = HistogramQuantile(buckets, 0.99);
  }
  const double seq_count = delta("moe_iteration_num_seqs_count", &found);
  if (found && seq_count > 0) {
    out["seqs_per_step"] = delta("moe_iteration_num_seqs_sum", &found) / seq_count;
  }
  const double tok_count = delta("moe_iteration_tokens_count", &found);
  if (found && tok_count > 0) {
    out["tokens_per_step"] = delta("moe_iteration_tokens_sum", &found) / tok_count;
  }
  for (const auto& [key, name] :
       std::vector<std::pair<std::string, std::string>>{
           {"generation_tokens", "moe_generation_tokens_total"},
           {"prompt_tokens", "moe_prompt_tokens_total"},
           {"preemptions", "moe_num_preemptions_total"}}) {
    const double d = delta(name, &found);
    if (found) out[key] = d;
  }
  return out;
}

// --- Running -----------------------------------------------------------------------------------

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options,
                                   const std::function<void(const Progress&)>& on_progress) {
  MOE_RETURN_IF_ERROR(ValidateLoadOptions(options));
  MOE_ASSIGN_OR_RETURN(ParsedUrl url, ParseBaseUrl(options.url));
  LoadOptions o = options;
  const int slots = static_cast<int>(std::min<int64_t>(
      o.concurrency > 0 ? o.concurrency : kMaxConcurrency, o.num_prompts));
  if (o.concurrency == 0) o.concurrency = slots;

  std::string model = o.model;
  if (model.empty()) {
    MOE_ASSIGN_OR_RETURN(model, DiscoverModel(url, o));
  }
  WorkloadArgs w{.num_prompts = o.num_prompts,
                 .input_len = o.input_len,
                 .output_len = o.output_len,
                 .range_ratio = o.range_ratio,
                 .request_rate = o.request_rate,
                 .seed = o.seed,
                 .text = o.prompt_kind == "text" || o.endpoint == "/v1/chat/completions"};
  if (w.text) {
    w.word_pool = PassageWords();
  } else if (o.vocab_size > 0) {
    w.id_pool.resize(o.vocab_size);
    for (int32_t i = 0; i < static_cast<int32_t>(o.vocab_size); ++i) w.id_pool[i] = i;
  } else {
    MOE_ASSIGN_OR_RETURN(w.id_pool, TokenPool(url, o, model));
  }
  const std::vector<SampledRequest> workload = BuildWorkload(w);

  std::map<std::string, double> metrics_before;
  if (o.server_metrics) metrics_before = ScrapeMetrics(url, o);

  std::vector<RequestResult> results(workload.size());
  std::atomic<bool> stop{false};
  std::atomic<int64_t> next{0}, done{0}, failed{0};
  std::atomic<int> in_flight{0}, max_in_flight{0};
  std::mutex mu;
  std::condition_variable cv;  // wakes sleepers at the deadline and the watcher at the end
  InFlight clients(slots);
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline =
      start + std::chrono::duration_cast<Clock::duration>(
                  std::chrono::duration<double>(o.max_duration_s));

  auto worker = [&](int slot) {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= static_cast<int64_t>(workload.size())) return;
      const Clock::time_point at =
          start + std::chrono::duration_cast<Clock::duration>(
                      std::chrono::duration<double>(workload[i].arrival_s));
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_until(lock, std::min(at, deadline), [&] { return stop.load(); });
      }
      if (stop.load() || Clock::now() >= deadline) return;
      const int now_in_flight = in_flight.fetch_add(1) + 1;
      int seen = max_in_flight.load();
      while (now_in_flight > seen && !max_in_flight.compare_exchange_weak(seen, now_in_flight)) {
      }
      SendOne(url, o, model, workload[i], start, stop, clients, slot, &results[i]);
      in_flight.fetch_sub(1);
      if (!results[i].success && !results[i].cancelled) failed.fetch_add(1);
      done.fetch_add(1);
      cv.notify_all();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(slots);
  for (int s = 0; s < slots; ++s) threads.emplace_back(worker, s);

  auto report_progress = [&] {
    if (!on_progress) return;
    on_progress({.total = o.num_prompts,
                 .done = done.load(),
                 .failed = failed.load(),
                 .in_flight = in_flight.load(),
                 .elapsed_s = Seconds(Clock::now() - start)});
  };
  bool hit_deadline = false;
  Clock::time_point last_progress = start;
  {
    std::unique_lock<std::mutex> lock(mu);
    while (done.load() < o.num_prompts) {
      if (Clock::now() >= deadline) {
        hit_deadline = true;
        break;
      }
      cv.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(200)));
      if (Clock::now() - last_progress >= std::chrono::milliseconds(200)) {
        last_progress = Clock::now();
        lock.unlock();
        report_progress();
        lock.lock();
      }
    }
  }
  if (hit_deadline) {
    stop.store(true);
    cv.notify_all();
    // A request may be between creating its client and opening the socket: cut again until
    // every worker has left.
    while (in_flight.load() > 0) {
      clients.StopAll();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  for (std::thread& t : threads) t.join();
  report_progress();

  LoadReport report = BuildReport(o, results);
  if (o.server_metrics && !metrics_before.empty()) {
    report.server_metrics = ServerMetricsDelta(metrics_before, ScrapeMetrics(url, o));
  }
  report.model = model;
  report.max_in_flight = max_in_flight.load();
  report.hit_max_duration = hit_deadline;
  return report;
}

int RunLoadCommand(const LoadOptions& options, const std::string& json_path, bool progress_bar,
                   std::ostream& out, std::ostream& err) {
  if (absl::Status s = ValidateLoadOptions(options); !s.ok()) {
    err << "moe-serve bench: " << s.message() << "\n";
    return 2;
  }
  std::function<void(const Progress&)> on_progress;
  if (progress_bar) {
    on_progress = [&out](const Progress& p) { out << "\r" << FormatProgress(p) << std::flush; };
  }
  absl::StatusOr<LoadReport> report = RunLoad(options, on_progress);
  if (progress_bar) out << "\n";
  if (!report.ok()) {
    err << "moe-serve bench: " << report.status().message() << "\n";
    return report.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  out << FormatReport(*report);
  if (!json_path.empty()) {
    json j = ReportToJson(*report);
    j["date"] = TodayUtc();
    j["machine"] = CollectMachineInfo();
    std::ofstream f(json_path);
    f << j.dump(2) << "\n";
    if (!f) {
      err << "moe-serve bench: cannot write " << json_path << "\n";
      return 1;
    }
  }
  if (report->hit_max_duration) {
    err << "moe-serve bench: stopped at --max-duration-s " << options.max_duration_s << " ("
        << report->cancelled << " cancelled, " << report->not_sent << " not sent)\n";
  }
  return report->failed > 0 || report->completed == 0 ? 1 : 0;
}

}  // namespace moe::bench
