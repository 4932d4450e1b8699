// Unit tests of the load generator's pure parts: percentiles, TPOT/ITL, the report, the
// seeded workload and Poisson schedule, SSE framing, URL checks and the /metrics delta. No
// server and no timing.
#include "bench/load_generator.h"

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::bench {
namespace {

using ::testing::ElementsAre;

TEST(PercentileTest, InterpolatesLinearlyLikeNumpy) {
  const std::vector<double> v = {4, 1, 3, 2};  // sorted: 1 2 3 4
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 2.5);
  // numpy.percentile([1, 2, 3, 4], 90) = 3.7; 99 -> 3.97.
  EXPECT_NEAR(Percentile(v, 90), 3.7, 1e-12);
  EXPECT_NEAR(Percentile(v, 99), 3.97, 1e-12);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
}

TEST(SummarizeTest, MeanStdAndPercentiles) {
  std::vector<double> v(101);
  std::iota(v.begin(), v.end(), 0.0);  // 0..100
  const LatencyStats s = Summarize(v);
  EXPECT_EQ(s.count, 101);
  EXPECT_DOUBLE_EQ(s.mean, 50);
  EXPECT_DOUBLE_EQ(s.p50, 50);
  EXPECT_DOUBLE_EQ(s.p90, 90);
  EXPECT_DOUBLE_EQ(s.p99, 99);
  EXPECT_DOUBLE_EQ(s.min, 0);
  EXPECT_DOUBLE_EQ(s.max, 100);
  EXPECT_NEAR(s.std, std::sqrt(850.0), 1e-9);  // population std of 0..100
}

RequestResult Finished(double send, std::vector<double> chunks, int64_t out_tokens) {
  RequestResult r;
  r.success = true;
  r.send_s = send;
  r.first_token_s = chunks.front();
  r.end_s = chunks.back();
  r.chunk_s = std::move(chunks);
  r.prompt_tokens = 10;
  r.output_tokens = out_tokens;
  return r;
}

TEST(TpotTest, ExcludesTheFirstToken) {
  // Sent at 1.0, first token at 1.5, 4 tokens, last at 2.1: TPOT = 0.6 / 3 = 0.2.
  const RequestResult r = Finished(1.0, {1.5, 1.7, 1.9, 2.1}, 4);
  ASSERT_TRUE(Tpot(r).has_value());
  EXPECT_NEAR(*Tpot(r), 0.2, 1e-12);
  const std::vector<double> itl = InterTokenLatencies(r);
  ASSERT_EQ(itl.size(), 3u);
  for (double gap : itl) EXPECT_NEAR(gap, 0.2, 1e-12);
}

TEST(TpotTest, CountsTokensNotChunks) {
  // Two chunks carrying 5 tokens: TPOT divides by the 4 tokens after the first, ITL has one gap.
  const RequestResult r = Finished(0.0, {0.5, 1.3}, 5);
  EXPECT_NEAR(*Tpot(r), 0.2, 1e-12);
  EXPECT_THAT(InterTokenLatencies(r), ElementsAre(::testing::DoubleNear(0.8, 1e-12)));
}

TEST(TpotTest, UndefinedForOneTokenOrFailure) {
  EXPECT_FALSE(Tpot(Finished(0.0, {0.5}, 1)).has_value());
  RequestResult failed = Finished(0.0, {0.5, 0.6}, 2);
  failed.success = false;
  EXPECT_FALSE(Tpot(failed).has_value());
}

TEST(BuildReportTest, CountsThroughputsAndLatencies) {
  LoadOptions o;
  std::vector<RequestResult> results;
  results.push_back(Finished(0.0, {1.0, 1.5, 2.0}, 3));  // TTFT 1, TPOT 0.5, E2E 2
  results.push_back(Finished(1.0, {2.0, 2.5, 4.0}, 3));  // TTFT 1, TPOT 1.0, E2E 3
  RequestResult failed;
  failed.send_s = 0.5;
  failed.end_s = 0.6;
  failed.error = "HTTP 400: prompt: bad";
  results.push_back(failed);
  RequestResult cancelled;
  cancelled.send_s = 1.0;
  cancelled.end_s = 4.0;
  cancelled.cancelled = true;
  cancelled.error = "cancelled";
  results.push_back(cancelled);
  results.push_back(RequestResult{});  // never sent

  const LoadReport r = BuildReport(o, results);
  EXPECT_EQ(r.num_prompts, 5);
  EXPECT_EQ(r.completed, 2);
  EXPECT_EQ(r.failed, 1);
  EXPECT_EQ(r.cancelled, 1);
  EXPECT_EQ(r.not_sent, 1);
  EXPECT_DOUBLE_EQ(r.duration_s, 4.0);
  EXPECT_EQ(r.total_input_tokens, 20);
  EXPECT_EQ(r.total_output_tokens, 6);
  EXPECT_DOUBLE_EQ(r.request_throughput, 0.5);
  EXPECT_DOUBLE_EQ(r.output_throughput, 1.5);
  EXPECT_DOUBLE_EQ(r.total_token_throughput, 6.5);
  EXPECT_DOUBLE_EQ(r.ttft_s.mean, 1.0);
  EXPECT_DOUBLE_EQ(r.tpot_s.mean, 0.75);
  EXPECT_DOUBLE_EQ(r.e2e_s.p50, 2.5);
  EXPECT_EQ(r.itl_s.count, 4);  // gaps 0.5 0.5 | 0.5 1.5
  EXPECT_DOUBLE_EQ(r.itl_s.mean, 0.75);
  ASSERT_EQ(r.errors.size(), 1u);
  EXPECT_EQ(r.errors[0], "HTTP 400: prompt: bad");

  const nlohmann::json j = ReportToJson(r);
  EXPECT_EQ(j["completed"], 2);
  EXPECT_EQ(j["total_output_tokens"], 6);
  EXPECT_DOUBLE_EQ(j["tpot_ms"]["mean"].get<double>(), 750.0);
}

TEST(PoissonArrivalsTest, DeterministicPerSeedWithTheRightMean) {
  const std::vector<double> a = PoissonArrivals(20000, 4.0, 7);
  EXPECT_EQ(a, PoissonArrivals(20000, 4.0, 7));
  EXPECT_NE(a, PoissonArrivals(20000, 4.0, 8));
  for (size_t i = 1; i < a.size(); ++i) ASSERT_GT(a[i], a[i - 1]) << "arrival " << i;
  // Mean gap 1/rate = 0.25 s; the standard error of the mean of 20000 gaps is ~0.0018.
  EXPECT_NEAR(a.back() / static_cast<double>(a.size()), 0.25, 0.01);
  // The same seed gives the same first arrivals whatever n is.
  const std::vector<double> head = PoissonArrivals(5, 4.0, 7);
  EXPECT_EQ(head, std::vector<double>(a.begin(), a.begin() + 5));
}

TEST(PoissonArrivalsTest, NoRateMeansEverythingAtOnce) {
  EXPECT_EQ(PoissonArrivals(3, 0.0, 1), std::vector<double>(3, 0.0));
}

TEST(WorkloadTest, LengthRangeMatchesVllmRandomDataset) {
  using Range = std::pair<int64_t, int64_t>;
  EXPECT_EQ(LengthRange(128, 0.0), Range(128, 128));
  EXPECT_EQ(LengthRange(100, 0.25), Range(75, 125));
  EXPECT_EQ(LengthRange(1, 0.5), Range(1, 2));
}

TEST(WorkloadTest, SeededExactLengthsAndIdsFromThePool) {
  WorkloadArgs a{.num_prompts = 50, .input_len = 32, .output_len = 8, .range_ratio = 0.5,
                 .request_rate = 2.0, .seed = 3, .id_pool = {5, 6, 7}};
  const std::vector<SampledRequest> w = BuildWorkload(a);
  ASSERT_EQ(w.size(), 50u);
  bool varied = false;
  for (const SampledRequest& r : w) {
    EXPECT_GE(r.input_len, 16);
    EXPECT_LE(r.input_len, 48);
    EXPECT_GE(r.output_len, 4);
    EXPECT_LE(r.output_len, 12);
    ASSERT_EQ(static_cast<int64_t>(r.prompt_ids.size()), r.input_len);
    for (int32_t id : r.prompt_ids) EXPECT_TRUE(id >= 5 && id <= 7) << id;
    varied |= r.input_len != w[0].input_len;
  }
  EXPECT_TRUE(varied);
  const std::vector<SampledRequest> again = BuildWorkload(a);
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(w[i].prompt_ids, again[i].prompt_ids) << i;
    EXPECT_EQ(w[i].output_len, again[i].output_len) << i;
    EXPECT_EQ(w[i].arrival_s, again[i].arrival_s) << i;
  }
  EXPECT_EQ(w[9].arrival_s, PoissonArrivals(50, 2.0, 3)[9]);
}

TEST(WorkloadTest, TextPromptsHaveInputLenWords) {
  WorkloadArgs a{.num_prompts = 2, .input_len = 12, .output_len = 4, .text = true,
                 .word_pool = PassageWords()};
  for (const SampledRequest& r : BuildWorkload(a)) {
    EXPECT_TRUE(r.prompt_ids.empty());
    EXPECT_EQ(std::count(r.prompt_text.begin(), r.prompt_text.end(), ' '), 11) << r.prompt_text;
  }
}

TEST(SseParserTest, SplitsEventsAcrossFragments) {
  SseParser p;
  EXPECT_TRUE(p.Feed("data: {\"a\"", 10).empty());
  std::string rest = ":1}\n\ndata: [DONE]\n\n: comment\n\n";
  EXPECT_THAT(p.Feed(rest.data(), rest.size()), ElementsAre("{\"a\":1}", "[DONE]"));
  std::string crlf = "event: x\r\ndata: one\r\ndata:two\r\n\r\n";
  EXPECT_THAT(p.Feed(crlf.data(), crlf.size()), ElementsAre("one\ntwo"));
}

TEST(UrlTest, ParsesAndRefusesRemoteHosts) {
  absl::StatusOr<ParsedUrl> u = ParseBaseUrl("http://127.0.0.1:8000/");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->host, "127.0.0.1");
  EXPECT_EQ(u->port, 8000);
  u = ParseBaseUrl("http://[::1]:9");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, 9);
  EXPECT_FALSE(ParseBaseUrl("https://127.0.0.1:8000").ok());
  EXPECT_FALSE(ParseBaseUrl("http://127.0.0.1:8000/v1").ok());
  EXPECT_FALSE(ParseBaseUrl("http://127.0.0.1:99999").ok());

  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.1.2.3"));
  EXPECT_TRUE(IsLoopbackHost("LOCALHOST"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("127.0.0.1.example.com"));
  EXPECT_FALSE(IsLoopbackHost("example.com"));

  LoadOptions o;
  o.url = "http://10.1.2.3:8000";
  absl::Status s = ValidateLoadOptions(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("--allow-remote"));
  o.allow_remote = true;
  EXPECT_TRUE(ValidateLoadOptions(o).ok());
}

TEST(ValidateTest, NamesTheFlag) {
  LoadOptions o;
  o.concurrency = 129;
  EXPECT_THAT(std::string(ValidateLoadOptions(o).message()), ::testing::HasSubstr("--concurrency"));
  o = LoadOptions{};
  o.range_ratio = 1.0;
  EXPECT_THAT(std::string(ValidateLoadOptions(o).message()), ::testing::HasSubstr("--range-ratio"));
  o = LoadOptions{};
  o.endpoint = "/v1/embeddings";
  EXPECT_THAT(std::string(ValidateLoadOptions(o).message()), ::testing::HasSubstr("--endpoint"));
}

TEST(ServerMetricsTest, StepTimesFromTwoScrapes) {
  const std::string before =
      "# TYPE moe_step_duration_seconds histogram\n"
      "moe_step_duration_seconds_bucket{le=\"0.01\"} 10\n"
      "moe_step_duration_seconds_bucket{le=\"0.1\"} 10\n"
      "moe_step_duration_seconds_bucket{le=\"+Inf\"} 10\n"
      "moe_step_duration_seconds_sum 0.05\n"
      "moe_step_duration_seconds_count 10\n"
      "moe_iteration_num_seqs_sum 10\n"
      "moe_iteration_num_seqs_count 10\n"
      "moe_generation_tokens_total 10\n"
      "moe_request_success_total{finished_reason=\"length\"} 1\n";
  const std::string after =
      "moe_step_duration_seconds_bucket{le=\"0.01\"} 10\n"
      "moe_step_duration_seconds_bucket{le=\"0.1\"} 110\n"
      "moe_step_duration_seconds_bucket{le=\"+Inf\"} 110\n"
      "moe_step_duration_seconds_sum 5.05\n"
      "moe_step_duration_seconds_count 110\n"
      "moe_iteration_num_seqs_sum 810\n"
      "moe_iteration_num_seqs_count 110\n"
      "moe_generation_tokens_total 810 1700000000\n";
  const nlohmann::json d =
      ServerMetricsDelta(ParsePrometheusText(before), ParsePrometheusText(after));
  EXPECT_DOUBLE_EQ(d["steps"].get<double>(), 100);
  EXPECT_DOUBLE_EQ(d["step_mean_s"].get<double>(), 0.05);
  EXPECT_DOUBLE_EQ(d["seqs_per_step"].get<double>(), 8);
  EXPECT_DOUBLE_EQ(d["generation_tokens"].get<double>(), 800);
  // All 100 new steps fall in (0.01, 0.1]: the median interpolates to the middle.
  EXPECT_NEAR(d["step_p50_s"].get<double>(), 0.055, 1e-12);
  EXPECT_NEAR(d["step_p99_s"].get<double>(), 0.0991, 1e-12);
  EXPECT_FALSE(d.contains("preemptions"));
  EXPECT_TRUE(ServerMetricsDelta({}, {}).empty());
}

TEST(HistogramQuantileTest, PrometheusSemantics) {
  const std::vector<std::pair<double, double>> b = {{1, 50}, {2, 100}, {INFINITY, 100}};
  EXPECT_DOUBLE_EQ(HistogramQuantile(b, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(HistogramQuantile(b, 0.25), 0.5);
  EXPECT_DOUBLE_EQ(HistogramQuantile(b, 0.75), 1.5);
  EXPECT_DOUBLE_EQ(HistogramQuantile({{1, 0}, {INFINITY, 4}}, 0.5), 1.0);
}

TEST(FormatTest, ProgressAndTable) {
  EXPECT_EQ(FormatProgress({.total = 10, .done = 5, .failed = 1, .in_flight = 2, .elapsed_s = 3}),
            "[###############               ] 5/10 done, 1 failed, 2 in flight, 3.0 s");
  LoadOptions o;
  std::vector<RequestResult> results = {Finished(0.0, {1.0, 1.5, 2.0}, 3)};
  const std::string table = FormatReport(BuildReport(o, results));
  EXPECT_THAT(table, ::testing::HasSubstr("Successful requests:"));
  EXPECT_THAT(table, ::testing::HasSubstr("Mean TPOT (ms):"));
  EXPECT_THAT(table, ::testing::HasSubstr("P99 ITL (ms):"));
}

}  // namespace
}  // namespace moe::bench
