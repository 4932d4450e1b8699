// Load generator behind `moe-serve bench`: sends synthetic completion requests to an
// OpenAI-compatible server, streams every answer (SSE) and reports throughput and latency
// the way `vllm bench serve` does (TTFT, TPOT, ITL, E2E latency; mean, p50, p90, p99).
//
// Contract:
// - Requests are built up front from `seed`: input and output lengths uniform in
//   [len·(1 − range_ratio), len·(1 + range_ratio)] (vLLM's random dataset), prompts as token-id
//   lists (exact input length; ids drawn from the server's own /tokenize of a fixed English
//   passage, or uniformly from [0, vocab_size) when vocab_size is given) or as text (words of
//   the passage; the input length is then approximate and the server's count is reported).
//   Every request asks for `ignore_eos: true` and `max_tokens` = its output length, so output
//   lengths are exact, and for `stream_options.include_usage` so the token counts come from
//   the server.
// - Arrivals: with request_rate > 0 request i is sent at the i-th point of a seeded Poisson
//   process (exponential gaps of mean 1/rate); otherwise as fast as slots free up. At most
//   `concurrency` requests are in flight (0: num_prompts, capped at kMaxConcurrency).
// - Bounded: at most kMaxConcurrency sending threads, at most kMaxPrompts requests, and a hard
//   wall-clock bound (max_duration_s) after which nothing new is sent and the requests in
//   flight are cancelled (their connections are shut down); those count as `cancelled`.
// - Targets loopback only (127.0.0.0/8, localhost, ::1) unless allow_remote is set: load tests
//   in this project must not leave the machine.
//
// Statistics, as in vLLM: TTFT = first streamed chunk − send; TPOT = (E2E − TTFT) ÷ (output
// tokens − 1) per request with more than one output token; ITL = the gaps between consecutive
// streamed chunks (a chunk that carries several tokens counts once); E2E = last byte − send.
// Throughputs divide by the benchmark duration (first send to last completion).
//
// Threads: RunLoad blocks its caller and runs one thread per slot; every function here is
// otherwise pure and may be called from any thread.
//
//   LoadOptions o{.url = "http://127.0.0.1:8000", .num_prompts = 64, .concurrency = 8};
//   MOE_ASSIGN_OR_RETURN(LoadReport report, RunLoad(o, /*progress=*/nullptr));
//   std::cout << FormatReport(report);
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace moe::bench {

inline constexpr int kMaxConcurrency = 128;
inline constexpr int64_t kMaxPrompts = 100000;

struct LoadOptions {
  std::string url = "http://127.0.0.1:8000";
  bool allow_remote = false;
  std::string endpoint = "/v1/completions";  // or /v1/chat/completions
  std::string model;        // "" = the first model of GET /v1/models
  std::string api_key;      // sent as a bearer token when not empty
  int64_t num_prompts = 100;
  int concurrency = 0;      // most requests in flight; 0 = num_prompts (≤ kMaxConcurrency)
  double request_rate = 0;  // requests/s of a Poisson process; 0 = no pacing
  int64_t input_len = 128;
  int64_t output_len = 64;
  double range_ratio = 0;   // in [0, 1)
  std::string prompt_kind = "token-ids";  // token-ids | text (chat always sends text)
  int64_t vocab_size = 0;   // > 0: token ids uniform in [0, vocab_size) instead of /tokenize
  int64_t seed = 0;
  double max_duration_s = 600;  // hard bound on the whole run
  double temperature = 0;
  // Scrape GET /metrics before and after the run and report the server's own step times
  // (moe-serve's histograms; absent elsewhere, which is not an error).
  bool server_metrics = true;
};

// Registers the flags of `moe-serve bench` bound to *options and *json_path (which must
// outlive flags).
void AddLoadFlags(common::FlagSet& flags, LoadOptions* options, std::string* json_path);
// InvalidArgument naming the flag when a value is out of range or the host is not loopback
// without allow_remote.
absl::Status ValidateLoadOptions(const LoadOptions& options);

// --- URL -----------------------------------------------------------------------------------

struct ParsedUrl {
  std::string scheme;  // http | https
  std::string host;    // without brackets for IPv6
  int port = 0;
};
// "http://127.0.0.1:8000" (a trailing "/" is accepted, no other path). InvalidArgument else.
absl::StatusOr<ParsedUrl> ParseBaseUrl(const std::string& url);
// 127.0.0.0/8, "localhost", "::1".
bool IsLoopbackHost(const std::string& host);

// --- Workload --------------------------------------------------------------------------------

// One request of the workload, drawn before the run starts.
struct SampledRequest {
  int64_t input_len = 0;
  int64_t output_len = 0;
  std::vector<int32_t> prompt_ids;  // token-ids prompts
  std::string prompt_text;          // text prompts
  double arrival_s = 0;             // offset from the start of the run
};

struct WorkloadArgs {
  int64_t num_prompts = 0;
  int64_t input_len = 0;
  int64_t output_len = 0;
  double range_ratio = 0;
  double request_rate = 0;      // 0: every arrival at 0
  int64_t seed = 0;
  bool text = false;            // prompt_text instead of prompt_ids
  std::vector<int32_t> id_pool;  // ids to draw from (token-ids); must not be empty then
  std::vector<std::string> word_pool;  // words to draw from (text)
};
// Deterministic for the same args: mt19937_64 is specified bit-exactly by the standard and the
// mappings to lengths, ids and gaps are our own, not the standard library's distributions.
std::vector<SampledRequest> BuildWorkload(const WorkloadArgs& args);

// Arrival offsets of `n` requests of a Poisson process of `rate` per second (exponential gaps,
// the first one included), the same for the same seed. rate <= 0: all zeros.
std::vector<double> PoissonArrivals(int64_t n, double rate, int64_t seed);
// The [low, high] range vLLM's random dataset uses for `len` and `range_ratio` (low >= 1).
std::pair<int64_t, int64_t> LengthRange(int64_t len, double range_ratio);

// The words of the built-in English passage that text prompts and the id pool come from.
std::vector<std::string> PassageWords();

// --- SSE -------------------------------------------------------------------------------------

// Splits a byte stream of server-sent events into the payloads of their `data:` lines.
// Feed it any fragments; it returns the complete events so far (multi-line data joined by
// "\n"). Comments and other fields are skipped.
class SseParser {
 public:
  std::vector<std::string> Feed(const char* data, size_t size);

 private:
  std::string buffer_;
};

// --- Statistics --------------------------------------------------------------------------------

// Linear-interpolated percentile (numpy's default) of `values`, p in [0, 100]; 0 for none.
double Percentile(std::vector<double> values, double p);

struct LatencyStats {
  int64_t count = 0;
  double mean = 0, std = 0, p50 = 0, p90 = 0, p99 = 0, min = 0, max = 0;
};
LatencyStats Summarize(const std::vector<double>& values);

// What happened to one request. Times are seconds from the start of the run.
struct RequestResult {
  bool success = false;
  bool cancelled = false;   // cut by max_duration_s
  std::string error;        // failure: HTTP status and message
  double send_s = 0;
  double first_token_s = -1;  // first streamed chunk with a choice
  double end_s = 0;
  std::vector<double> chunk_s;  // arrival of every streamed chunk with a choice
  int64_t prompt_tokens = 0;    // from usage (else the sampled length)
  int64_t output_tokens = 0;    // from usage (else the number of chunks)
};

// TPOT of one request: (E2E − TTFT) / (output_tokens − 1); nullopt for ≤ 1 output token or a
// failed request.
std::optional<double> Tpot(const RequestResult& r);
// The gaps between consecutive chunks of one request.
std::vector<double> InterTokenLatencies(const RequestResult& r);

struct LoadReport {
  LoadOptions options;
  std::string model;
  int64_t num_prompts = 0;
  int64_t completed = 0, failed = 0, cancelled = 0, not_sent = 0;
  double duration_s = 0;
  int64_t total_input_tokens = 0, total_output_tokens = 0;
  double request_throughput = 0;      // completed / duration
  double output_throughput = 0;       // output tokens of completed requests / duration
  double total_token_throughput = 0;  // (input + output) / duration
  LatencyStats ttft_s, tpot_s, itl_s, e2e_s;
  int max_in_flight = 0;              // most requests in flight at once
  bool hit_max_duration = false;
  std::vector<std::string> errors;    // the first few distinct failures
  nlohmann::json server_metrics;      // ServerMetricsDelta of the run; null when not scraped
  // Per request, in workload order: {"send_s", "ttft_s", "e2e_s", "input_tokens",
  // "output_tokens", "chunks", "error"} (times in seconds from the start of the run).
  nlohmann::json requests = nlohmann::json::array();
};

// Folds per-request results into a report. duration_s = last end − first send.
LoadReport BuildReport(const LoadOptions& options, const std::vector<RequestResult>& results);

// {"config": {...}, "completed", ..., "ttft_ms": {"mean", "p50", "p90", "p99", ...}, ...}.
nlohmann::json ReportToJson(const LoadReport& report);
// The table printed at the end of a run.
std::string FormatReport(const LoadReport& report);

// --- Server metrics ------------------------------------------------------------------------

// The samples of a Prometheus text exposition: series ("name" or "name{labels}" as written)
// -> value. Comments and malformed lines are skipped.
std::map<std::string, double> ParsePrometheusText(const std::string& text);

// The server's side of a run from two scrapes of moe-serve's /metrics:
//   {"steps", "step_mean_s", "step_p50_s", "step_p99_s" (histogram_quantile of the bucket
//    deltas), "step_busy_s", "seqs_per_step", "tokens_per_step", "generation_tokens",
//    "prompt_tokens", "preemptions"}
// Fields whose series are missing are left out; an empty object when there was no step.
nlohmann::json ServerMetricsDelta(const std::map<std::string, double>& before,
                                  const std::map<std::string, double>& after);
// Prometheus' histogram_quantile over cumulative bucket counts (upper bound, count), sorted by
// bound, the last one +Inf: linear within the bucket, the lower edge of the first bucket 0.
double HistogramQuantile(const std::vector<std::pair<double, double>>& buckets, double q);

// --- Running -------------------------------------------------------------------------------

struct Progress {
  int64_t total = 0, done = 0, failed = 0, in_flight = 0;
  double elapsed_s = 0;
};
// A progress line such as "[#####     ] 12/24 done, 0 failed, 4 in flight, 3.1 s".
std::string FormatProgress(const Progress& p);

// Runs the benchmark against options.url (validated first). `on_progress`, when set, is called
// from the calling thread about five times a second and once at the end. Returns the report;
// an error only when the run could not start (bad options, no server, no model).
absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options,
                                   const std::function<void(const Progress&)>& on_progress);

// `moe-serve bench` after its flags are parsed: runs, prints the table to `out` (a progress bar
// too when `progress_bar`), writes `json_path` when not empty. Exit status 0 when no request
// failed, 1 when any failed or the run could not start, 2 for invalid options.
int RunLoadCommand(const LoadOptions& options, const std::string& json_path, bool progress_bar,
                   std::ostream& out, std::ostream& err);

}  // namespace moe::bench
