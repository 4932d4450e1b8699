#include "common/metrics.h"

#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::common {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kDroppedHeader[] =
    "# HELP moe_metrics_dropped_series_total Label combinations not created because their "
    "metric reached its cardinality cap; updates to them are discarded.\n"
    "# TYPE moe_metrics_dropped_series_total counter\n";

TEST(MetricsRender, SmallRegistryExactText) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> requests =
      registry.AddCounter("moe_requests_total", "Finished requests.", {"finish_reason"});
  ASSERT_TRUE(requests.ok()) << requests.status();
  absl::StatusOr<GaugeFamily*> running =
      registry.AddGauge("moe_num_requests_running", "Requests in the running batch.");
  ASSERT_TRUE(running.ok()) << running.status();
  absl::StatusOr<HistogramFamily*> latency = registry.AddHistogram(
      "moe_e2e_request_latency_seconds", "End-to-end latency.\nIncludes queueing \\ prefill.",
      {"model"}, {0.1, 1, 10});
  ASSERT_TRUE(latency.ok()) << latency.status();

  // Created out of order on purpose: children render sorted by label values.
  (*(*requests)->WithLabels({"stop"}))->Inc(3);
  (*(*requests)->WithLabels({"length"}))->Inc();
  (*running)->Get().Set(2.5);
  Histogram* h = *(*latency)->WithLabels({"tiny"});
  h->Observe(0.05);
  h->Observe(1);
  h->Observe(20);

  const std::string expected =
      "# HELP moe_e2e_request_latency_seconds End-to-end latency.\\nIncludes queueing \\\\ "
      "prefill.\n"
      "# TYPE moe_e2e_request_latency_seconds histogram\n"
      "moe_e2e_request_latency_seconds_bucket{model=\"tiny\",le=\"0.1\"} 1\n"
      "moe_e2e_request_latency_seconds_bucket{model=\"tiny\",le=\"1\"} 2\n"
      "moe_e2e_request_latency_seconds_bucket{model=\"tiny\",le=\"10\"} 2\n"
      "moe_e2e_request_latency_seconds_bucket{model=\"tiny\",le=\"+Inf\"} 3\n"
      "moe_e2e_request_latency_seconds_sum{model=\"tiny\"} 21.05\n"
      "moe_e2e_request_latency_seconds_count{model=\"tiny\"} 3\n" +
      std::string(kDroppedHeader) +
      "# HELP moe_num_requests_running Requests in the running batch.\n"
      "# TYPE moe_num_requests_running gauge\n"
      "moe_num_requests_running 2.5\n"
      "# HELP moe_requests_total Finished requests.\n"
      "# TYPE moe_requests_total counter\n"
      "moe_requests_total{finish_reason=\"length\"} 1\n"
      "moe_requests_total{finish_reason=\"stop\"} 3\n";
  EXPECT_EQ(registry.Render(), expected);
}

TEST(MetricsRender, UnlabelledFamiliesStartAtZero) {
  MetricsRegistry registry;
  ASSERT_TRUE(registry.AddCounter("a_total", "A.").ok());
  ASSERT_TRUE(registry.AddHistogram("b_seconds", "B.", {}, {1}).ok());
  EXPECT_EQ(registry.Render(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n"
            "# HELP b_seconds B.\n# TYPE b_seconds histogram\n"
            "b_seconds_bucket{le=\"1\"} 0\nb_seconds_bucket{le=\"+Inf\"} 0\n"
            "b_seconds_sum 0\nb_seconds_count 0\n" +
                std::string(kDroppedHeader));
}

TEST(MetricsRender, LabelValuesAreEscaped) {
  MetricsRegistry registry;
  absl::StatusOr<GaugeFamily*> family = registry.AddGauge("g", "G.", {"path", "model"});
  ASSERT_TRUE(family.ok()) << family.status();
  (*(*family)->WithLabels({"C:\\models\\x", "say \"hi\"\nbye"}))->Set(1);
  EXPECT_THAT(registry.Render(),
              HasSubstr("g{path=\"C:\\\\models\\\\x\",model=\"say \\\"hi\\\"\\nbye\"} 1\n"));
  EXPECT_EQ(EscapeLabelValue("plain ünïcode"), "plain ünïcode");
  EXPECT_EQ(EscapeHelp("a\\b\"c\nd"), "a\\\\b\"c\\nd");
}

TEST(MetricsRender, FloatFormatting) {
  EXPECT_EQ(FormatMetricValue(0), "0");
  EXPECT_EQ(FormatMetricValue(1), "1");
  EXPECT_EQ(FormatMetricValue(-2.5), "-2.5");
  EXPECT_EQ(FormatMetricValue(0.1), "0.1");
  EXPECT_EQ(FormatMetricValue(1234567), "1234567");
  EXPECT_EQ(FormatMetricValue(1e20), "1e+20");
  EXPECT_EQ(FormatMetricValue(2.5e-7), "2.5e-07");
  EXPECT_EQ(FormatMetricValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatMetricValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatMetricValue(std::nan("")), "NaN");
  // Round-trips exactly.
  const double third = 1.0 / 3.0;
  EXPECT_EQ(std::stod(FormatMetricValue(third)), third);
}

TEST(MetricsRender, GaugeSpecialValues) {
  MetricsRegistry registry;
  absl::StatusOr<GaugeFamily*> family = registry.AddGauge("g", "G.", {"k"});
  ASSERT_TRUE(family.ok());
  (*(*family)->WithLabels({"inf"}))->Set(std::numeric_limits<double>::infinity());
  (*(*family)->WithLabels({"nan"}))->Set(std::nan(""));
  (*(*family)->WithLabels({"neg"}))->Set(-std::numeric_limits<double>::infinity());
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("g{k=\"inf\"} +Inf\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"nan\"} NaN\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"neg\"} -Inf\n"));
}

TEST(MetricsHistogram, BucketsAreCumulativeAndInclusive) {
  const std::vector<double> bounds = {1, 2, 5};
  Histogram h(bounds);
  for (double v : {0.5, 1.0, 1.5, 3.0, 10.0}) h.Observe(v);
  Histogram::Snapshot s = h.Collect();
  // 0.5 and 1 (bounds are inclusive) in le=1; 1.5 in le=2; 3 in le=5; 10 only in +Inf.
  EXPECT_THAT(s.cumulative_counts, ElementsAre(2, 3, 4, 5));
  EXPECT_EQ(s.count, 5u);
  EXPECT_DOUBLE_EQ(s.sum, 16.0);

  h.Observe(std::nan(""));  // only in +Inf, as the Prometheus clients do
  s = h.Collect();
  EXPECT_THAT(s.cumulative_counts, ElementsAre(2, 3, 4, 6));
  EXPECT_EQ(s.count, 6u);
}

TEST(MetricsHistogram, RenderedBucketsNeverDecrease) {
  MetricsRegistry registry;
  absl::StatusOr<std::vector<double>> bounds = ExponentialBuckets(0.001, 2, 12);
  ASSERT_TRUE(bounds.ok());
  absl::StatusOr<HistogramFamily*> family = registry.AddHistogram("lat_seconds", "L.", {}, *bounds);
  ASSERT_TRUE(family.ok());
  for (int i = 0; i < 1000; ++i) (*family)->Get().Observe(i * 0.0037);
  const std::string text = registry.Render();
  uint64_t previous = 0;
  int buckets = 0;
  size_t pos = 0;
  while ((pos = text.find("lat_seconds_bucket{", pos)) != std::string::npos) {
    const size_t end = text.find('\n', pos);
    const uint64_t value = std::stoull(text.substr(text.rfind(' ', end) + 1, end));
    EXPECT_GE(value, previous) << text.substr(pos, end - pos);
    previous = value;
    ++buckets;
    pos = end;
  }
  EXPECT_EQ(buckets, 13);
  EXPECT_EQ(previous, 1000u);
  EXPECT_THAT(text, HasSubstr("lat_seconds_bucket{le=\"+Inf\"} 1000\nlat_seconds_sum"));
  EXPECT_THAT(text, HasSubstr("lat_seconds_count 1000\n"));
}

TEST(MetricsHistogram, BucketHelpers) {
  absl::StatusOr<std::vector<double>> exp = ExponentialBuckets(1, 2, 4);
  ASSERT_TRUE(exp.ok());
  EXPECT_THAT(*exp, ElementsAre(1, 2, 4, 8));
  absl::StatusOr<std::vector<double>> lin = LinearBuckets(0.5, 0.5, 3);
  ASSERT_TRUE(lin.ok());
  EXPECT_THAT(*lin, ElementsAre(0.5, 1.0, 1.5));
  EXPECT_EQ(ExponentialBuckets(0, 2, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExponentialBuckets(1, 1, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExponentialBuckets(1, 2, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExponentialBuckets(1e300, 1e10, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LinearBuckets(0, 0, 3).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MetricsHistogram, BoundsValidation) {
  MetricsRegistry registry;
  EXPECT_EQ(registry.AddHistogram("h1", "H.", {}, {1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddHistogram("h2", "H.", {}, {2, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.AddHistogram("h3", "H.", {}, {1, std::nan("")}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A trailing +Inf is accepted and folded into the implicit +Inf bucket.
  absl::StatusOr<HistogramFamily*> h4 =
      registry.AddHistogram("h4", "H.", {}, {1, std::numeric_limits<double>::infinity()});
  ASSERT_TRUE(h4.ok()) << h4.status();
  EXPECT_THAT((*h4)->bounds(), ElementsAre(1));
  // No bounds at all: just +Inf.
  EXPECT_TRUE(registry.AddHistogram("h5", "H.", {}, {}).ok());
}

TEST(MetricsCounter, IgnoresNegativeAndNaN) {
  Counter c;
  c.Inc(2);
  c.Inc(-1);
  c.Inc(std::nan(""));
  EXPECT_EQ(c.Value(), 2);
}

TEST(MetricsGauge, SetIncDecAndCallback) {
  MetricsRegistry registry;
  absl::StatusOr<GaugeFamily*> family = registry.AddGauge("queue_depth", "Q.");
  ASSERT_TRUE(family.ok());
  Gauge& g = (*family)->Get();
  g.Set(5);
  g.Inc();
  g.Dec(2.5);
  EXPECT_EQ(g.Value(), 3.5);

  int calls = 0;
  g.SetCallback([&calls] { return static_cast<double>(++calls * 10); });
  EXPECT_THAT(registry.Render(), HasSubstr("queue_depth 10\n"));
  EXPECT_THAT(registry.Render(), HasSubstr("queue_depth 20\n"));
  g.ClearCallback();
  EXPECT_THAT(registry.Render(), HasSubstr("queue_depth 3.5\n"));
  EXPECT_EQ(calls, 2);
}

TEST(MetricsGauge, CallbackMayRegisterMetrics) {
  MetricsRegistry registry;
  absl::StatusOr<GaugeFamily*> family = registry.AddGauge("lazy", "L.");
  ASSERT_TRUE(family.ok());
  (*family)->Get().SetCallback([&registry] {
    return registry.AddCounter("created_in_callback_total", "C.").ok() ? 1.0 : 0.0;
  });
  EXPECT_THAT(registry.Render(), HasSubstr("lazy 1\n"));
  EXPECT_THAT(registry.Render(), HasSubstr("created_in_callback_total 0\n"));
}

TEST(MetricsRegistry, SameSpecReturnsSameFamily) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> a = registry.AddCounter("x_total", "X.", {"k"});
  absl::StatusOr<CounterFamily*> b = registry.AddCounter("x_total", "X.", {"k"});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(*(*a)->WithLabels({"v"}), *(*b)->WithLabels({"v"}));
}

TEST(MetricsRegistry, DuplicateWithDifferencesIsAlreadyExists) {
  MetricsRegistry registry;
  ASSERT_TRUE(registry.AddGauge("dup", "D.", {"k"}).ok());
  ASSERT_TRUE(registry.AddHistogram("hist", "H.", {}, {1, 2}).ok());
  EXPECT_EQ(registry.AddHistogram("dup", "D.", {"k"}, {1}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.AddGauge("dup", "D.", {"other"}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.AddGauge("dup", "D.", {}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.AddGauge("dup", "Different help.", {"k"}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.AddHistogram("hist", "H.", {}, {1, 3}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.AddCounter(MetricsRegistry::kDroppedSeriesName, "Mine.").status().code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(MetricsRegistry, BadNamesAreInvalidArgument) {
  MetricsRegistry registry;
  const auto code = [](const auto& result) { return result.status().code(); };
  constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(code(registry.AddGauge("", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("1abc", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe:rate", "H.")), kInvalid);  // ':' is for recording rules
  EXPECT_EQ(code(registry.AddGauge("moe-x", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe x", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddCounter("moe_requests", "H.")), kInvalid);  // no _total
  EXPECT_EQ(code(registry.AddGauge("moe_requests_total", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x_count", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x_sum", "H.")), kInvalid);
  EXPECT_EQ(code(registry.AddHistogram("moe_x_bucket", "H.", {}, {1})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "")), kInvalid);  // help is required
  EXPECT_EQ(code(registry.AddGauge("moe_x", "bad \xff help")), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"__reserved"})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"le"})), kInvalid);
  EXPECT_EQ(code(registry.AddHistogram("moe_x", "H.", {"le"}, {1})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"quantile"})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"a:b"})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"9a"})), kInvalid);
  EXPECT_EQ(code(registry.AddGauge("moe_x", "H.", {"a", "a"})), kInvalid);
  // Nothing failed half-way into the registry.
  EXPECT_THAT(registry.Render(), Not(HasSubstr("moe_x")));

  EXPECT_TRUE(registry.AddGauge("_private", "H.", {"_k", "Camel9"}).ok());
  EXPECT_TRUE(IsValidMetricName("__x"));
  EXPECT_FALSE(IsValidLabelName("__x"));
}

TEST(MetricsRegistry, LabelArityAndUtf8) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> family = registry.AddCounter("x_total", "X.", {"a", "b"});
  ASSERT_TRUE(family.ok());
  EXPECT_EQ((*family)->WithLabels({"1"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*family)->WithLabels({"1", "2", "3"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*family)->WithLabels({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*family)->WithLabels({"1", "2"}).ok());
  EXPECT_TRUE((*family)->WithLabels({"", ""}).ok());  // empty values are legal
  EXPECT_TRUE((*family)->WithLabels({"模型", "ü"}).ok());
  EXPECT_EQ((*family)->WithLabels({"\xc3", "x"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*family)->series_count(), 3u);

  EXPECT_TRUE(IsValidUtf8("abc \xe2\x82\xac \xf0\x9f\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\xe2\x82"));          // truncated
}

TEST(MetricsRegistryDeathTest, GetOnLabelledFamilyIsABug) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> family = registry.AddCounter("x_total", "X.", {"a"});
  ASSERT_TRUE(family.ok());
  EXPECT_DEATH((*family)->Get(), "has labels");
}

TEST(MetricsRegistry, CardinalityCapCountsDroppedSeries) {
  MetricsRegistry registry(MetricsRegistry::Options{.max_series_per_family = 2});
  absl::StatusOr<CounterFamily*> family = registry.AddCounter("tokens_total", "T.", {"expert"});
  ASSERT_TRUE(family.ok());
  Counter* e0 = *(*family)->WithLabels({"0"});
  Counter* e1 = *(*family)->WithLabels({"1"});
  Counter* e2 = *(*family)->WithLabels({"2"});
  Counter* e3 = *(*family)->WithLabels({"3"});
  ASSERT_NE(e0, e1);
  EXPECT_EQ(e2, e3);  // both the overflow child
  e0->Inc();
  e2->Inc(100);
  e3->Inc(100);
  EXPECT_EQ(*(*family)->WithLabels({"0"}), e0);  // existing children are still found
  EXPECT_EQ((*family)->series_count(), 2u);

  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("tokens_total{expert=\"0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tokens_total{expert=\"1\"} 0\n"));
  EXPECT_THAT(text, Not(HasSubstr("expert=\"2\"")));
  EXPECT_THAT(text, Not(HasSubstr("100")));
  EXPECT_THAT(text, HasSubstr("moe_metrics_dropped_series_total{metric=\"tokens_total\"} 2\n"));

  // A per-family cap overrides the registry default.
  absl::StatusOr<GaugeFamily*> wide =
      registry.AddGauge("wide", "W.", {"k"}, FamilyOptions{.max_series = 5});
  ASSERT_TRUE(wide.ok());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE((*wide)->WithLabels({std::to_string(i)}).ok());
  EXPECT_EQ((*wide)->series_count(), 5u);
  EXPECT_THAT(registry.Render(), HasSubstr("moe_metrics_dropped_series_total{metric=\"wide\"} 5\n"));
}

TEST(MetricsRegistry, DefaultCapIsTenThousand) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> family = registry.AddCounter("many_total", "M.", {"id"});
  ASSERT_TRUE(family.ok());
  for (int i = 0; i < 10001; ++i) ASSERT_TRUE((*family)->WithLabels({std::to_string(i)}).ok());
  EXPECT_EQ((*family)->series_count(), kDefaultMaxSeriesPerFamily);
  EXPECT_THAT(registry.Render(),
              HasSubstr("moe_metrics_dropped_series_total{metric=\"many_total\"} 1\n"));
}

TEST(MetricsConcurrency, ThreadsUpdatingTotalsAreExact) {
  MetricsRegistry registry;
  absl::StatusOr<CounterFamily*> counters = registry.AddCounter("ops_total", "O.", {"kind"});
  absl::StatusOr<GaugeFamily*> gauges = registry.AddGauge("inflight", "I.");
  absl::StatusOr<HistogramFamily*> hists =
      registry.AddHistogram("op_seconds", "S.", {"kind"}, {0.5, 1.5});
  ASSERT_TRUE(counters.ok() && gauges.ok() && hists.ok());

  constexpr int kThreads = 4;
  constexpr int kIterations = 50000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Every thread looks up the same shared child and one of its own, concurrently.
      Counter* shared = *(*counters)->WithLabels({"shared"});
      Counter* own = *(*counters)->WithLabels({"t" + std::to_string(t)});
      Histogram* hist = *(*hists)->WithLabels({"shared"});
      Gauge& inflight = (*gauges)->Get();
      for (int i = 0; i < kIterations; ++i) {
        shared->Inc();
        own->Inc(2);
        inflight.Inc();
        hist->Observe(i % 2 == 0 ? 1.0 : 2.0);
        inflight.Dec();
      }
    });
  }
  // Scrapes race with the updates; they must not crash or block them.
  for (int i = 0; i < 20; ++i) EXPECT_THAT(registry.Render(), HasSubstr("ops_total"));
  for (std::thread& thread : threads) thread.join();

  EXPECT_EQ((*(*counters)->WithLabels({"shared"}))->Value(), kThreads * kIterations);
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ((*(*counters)->WithLabels({"t" + std::to_string(t)}))->Value(), 2 * kIterations);
  }
  EXPECT_EQ((*gauges)->Get().Value(), 0);
  const Histogram::Snapshot s = (*(*hists)->WithLabels({"shared"}))->Collect();
  constexpr uint64_t kTotal = kThreads * kIterations;
  EXPECT_THAT(s.cumulative_counts, ElementsAre(0, kTotal / 2, kTotal));
  EXPECT_EQ(s.sum, 1.5 * kTotal);
  EXPECT_EQ((*counters)->series_count(), 1u + kThreads);
}

TEST(MetricsRegistry, DefaultRegistryIsOneInstance) {
  EXPECT_EQ(&DefaultMetricsRegistry(), &DefaultMetricsRegistry());
  EXPECT_THAT(DefaultMetricsRegistry().Render(), HasSubstr(kDroppedHeader));
}

}  // namespace
}  // namespace moe::common
