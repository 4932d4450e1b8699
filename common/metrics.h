// Prometheus metrics: counters, gauges and histograms with labels, rendered in the text
// exposition format 0.0.4 for the `/metrics` endpoint.
//
// A MetricsRegistry owns metric families; a family owns one child (time series) per
// combination of label values. Families and children are never removed, so the pointers
// the registry hands out stay valid for the registry's lifetime: look a child up once, keep
// the pointer, and update it on the hot path with a few atomic operations and no lock.
//
//   MetricsRegistry& registry = DefaultMetricsRegistry();
//   MOE_ASSIGN_OR_RETURN(CounterFamily* requests,
//                        registry.AddCounter("moe_requests_total", "Finished requests.",
//                                            {"finish_reason"}));
//   MOE_ASSIGN_OR_RETURN(Counter* stopped, requests->WithLabels({"stop"}));
//   stopped->Inc();
//
//   MOE_ASSIGN_OR_RETURN(std::vector<double> buckets, ExponentialBuckets(0.001, 2, 16));
//   MOE_ASSIGN_OR_RETURN(HistogramFamily* ttft,
//                        registry.AddHistogram("moe_time_to_first_token_seconds",
//                                              "Time to first token.", {}, buckets));
//   ttft->Get().Observe(0.042);
//
//   MOE_ASSIGN_OR_RETURN(GaugeFamily* waiting,
//                        registry.AddGauge("moe_num_requests_waiting", "Queued requests."));
//   waiting->Get().SetCallback([&queue] { return static_cast<double>(queue.size()); });
//
//   std::string body = registry.Render();   // serve with kPrometheusContentType
//
// Contract:
// - Names follow Prometheus rules: metric and label names match [a-zA-Z_][a-zA-Z0-9_]*
//   (no ':', which Prometheus reserves for recording rules); label names do not start with
//   "__" and are not "le" or "quantile"; counter names end in "_total"; gauge and histogram
//   names do not end in "_total", "_bucket", "_sum" or "_count" (which also keeps a
//   family's series from colliding with another's); help is not empty; help and label
//   values are valid UTF-8. Violations are kInvalidArgument.
// - Registering a name again with the same type, help, label names (and buckets) returns
//   the existing family, so independent modules may each register what they use. Any
//   difference is kAlreadyExists.
// - WithLabels with the wrong number of label values, or a value that is not valid UTF-8
//   (which would make Prometheus reject the whole scrape), is kInvalidArgument.
// - Cardinality cap: a family holds at most `max_series` children (FamilyOptions, else
//   Options::max_series_per_family, default 10,000). A lookup of a new label combination
//   beyond the cap creates nothing: it increments
//   moe_metrics_dropped_series_total{metric="<family>"} and returns an overflow child that
//   accepts updates but is never rendered, so callers need no special case.
// - Counters only go up: Inc with a negative or NaN delta is ignored.
// - Render() sorts families by name and children by label values, so equal state renders
//   to equal text. Floats are written in the shortest form that reads back exactly, plus
//   "+Inf", "-Inf" and "NaN". Histogram buckets are cumulative, "+Inf" comes last and
//   _count equals the "+Inf" bucket.
//
// Threads: every method of every class here may be called from any thread. Counter, Gauge
// and Histogram updates are lock-free. Add*, WithLabels and Render take short locks;
// Render holds no registry or family lock while it calls gauge callbacks, but it does hold
// the callback's gauge lock, which is what lets ClearCallback() guarantee that the callback
// is not running once it returns. A callback therefore must not call SetCallback or
// ClearCallback on its own gauge; it should be cheap and must not block.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace moe::common {

// The Content-Type header value that goes with Render()'s output.
inline constexpr char kPrometheusContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// Default per-family cap on children.
inline constexpr size_t kDefaultMaxSeriesPerFamily = 10000;

enum class MetricType { kCounter, kGauge, kHistogram };

// "counter", "gauge", "histogram": the word used on the TYPE line.
std::string_view MetricTypeName(MetricType type);

// A monotonically increasing value.
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // Adds `delta`; a negative or NaN delta is ignored.
  void Inc(double delta = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down, or is computed by a callback at scrape time.
class Gauge {
 public:
  Gauge() = default;
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Inc(double delta = 1.0) { value_.fetch_add(delta, std::memory_order_relaxed); }
  void Dec(double delta = 1.0) { value_.fetch_sub(delta, std::memory_order_relaxed); }

  // While a callback is set, Value() and Render() report fn() instead of the stored value.
  // `fn` runs on the scraping thread; see the header comment for what it must not do.
  void SetCallback(std::function<double()> fn) ABSL_LOCKS_EXCLUDED(callback_mu_);
  // Removes the callback; once this returns the callback is not running and will not run
  // again, so whatever it captured may be destroyed.
  void ClearCallback() ABSL_LOCKS_EXCLUDED(callback_mu_);

  double Value() const ABSL_LOCKS_EXCLUDED(callback_mu_);

 private:
  std::atomic<double> value_{0.0};
  // Lets Value() skip the lock in the common case of a gauge without callback.
  std::atomic<bool> has_callback_{false};
  mutable absl::Mutex callback_mu_;
  std::function<double()> callback_ ABSL_GUARDED_BY(callback_mu_);
};

// Observations counted into buckets with fixed upper bounds (inclusive, as Prometheus'
// "le"), plus their sum and count.
class Histogram {
 public:
  // `bounds` are strictly increasing and finite; they must outlive the histogram (the
  // family owns them). The implicit "+Inf" bucket follows them.
  explicit Histogram(const std::vector<double>& bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // NaN lands only in the "+Inf" bucket, as in the Prometheus client libraries.
  void Observe(double value);

  struct Snapshot {
    std::vector<uint64_t> cumulative_counts;  // [bounds.size() + 1]; last is "+Inf"
    double sum = 0.0;
    uint64_t count = 0;                       // == cumulative_counts.back()
  };
  // Consistent between buckets and count; the sum may miss observations that race with it.
  Snapshot Collect() const;

  const std::vector<double>& bounds() const { return bounds_; }

 private:
  const std::vector<double>& bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // [bounds_.size() + 1], per bucket
  std::atomic<double> sum_{0.0};
};

// `count` bounds start, start*factor, start*factor^2, ...; start > 0, factor > 1, count >= 1.
absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count);
// `count` bounds start, start+width, ...; width > 0, count >= 1.
absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count);

// Per-family settings.
struct FamilyOptions {
  // Most children the family creates; 0 means the registry's max_series_per_family.
  size_t max_series = 0;
};

class MetricsRegistry;
template <typename T>
class MetricFamily;
using CounterFamily = MetricFamily<Counter>;

// What all families share: name, help, type, label names. Immutable after construction.
class MetricFamilyBase {
 public:
  virtual ~MetricFamilyBase() = default;
  MetricFamilyBase(const MetricFamilyBase&) = delete;
  MetricFamilyBase& operator=(const MetricFamilyBase&) = delete;

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  // Bucket bounds of a histogram family, empty otherwise.
  const std::vector<double>& bounds() const { return bounds_; }

 protected:
  struct Args {
    std::string name;
    std::string help;
    MetricType type = MetricType::kGauge;
    std::vector<std::string> label_names;
    std::vector<double> bounds;
    size_t max_series = kDefaultMaxSeriesPerFamily;
    // Where rejected lookups are counted; null for that family itself.
    CounterFamily* dropped_series = nullptr;
  };
  explicit MetricFamilyBase(Args args);

  // Appends HELP, TYPE and the sample lines.
  virtual void AppendTo(std::string* out) const = 0;

  // Set at construction.
  const std::string name_;
  const std::string help_;
  const MetricType type_;
  const std::vector<std::string> label_names_;
  const std::vector<double> bounds_;
  const size_t max_series_;
  CounterFamily* const dropped_series_;

 private:
  friend class MetricsRegistry;
};

// A family of children of type T (Counter, Gauge or Histogram), one per label combination.
template <typename T>
class MetricFamily final : public MetricFamilyBase {
 public:
  // The child for `label_values` (one per label name, in order), created on first use.
  // kInvalidArgument on a wrong count. Beyond the cardinality cap returns the overflow
  // child (see header comment). The pointer is valid for the registry's lifetime.
  absl::StatusOr<T*> WithLabels(const std::vector<std::string>& label_values)
      ABSL_LOCKS_EXCLUDED(mu_);

  // The only child of a family without labels. Calling it on a labelled family is a bug
  // (checked).
  T& Get();

  // Number of rendered children.
  size_t series_count() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class MetricsRegistry;
  explicit MetricFamily(Args args);
  std::unique_ptr<T> NewChild() const;
  void AppendTo(std::string* out) const override ABSL_LOCKS_EXCLUDED(mu_);

  // Set at construction.
  T* unlabelled_ = nullptr;        // the child of a family without labels, else null
  const std::unique_ptr<T> overflow_;  // updated beyond the cap, never rendered

  mutable absl::Mutex mu_;
  // Ordered so Render is deterministic; node-based so keys and children never move.
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_ ABSL_GUARDED_BY(mu_);
};

using GaugeFamily = MetricFamily<Gauge>;
using HistogramFamily = MetricFamily<Histogram>;

// Owns metric families and renders them. See the header comment.
class MetricsRegistry {
 public:
  struct Options {
    size_t max_series_per_family = kDefaultMaxSeriesPerFamily;
  };

  // The registry's own counter of label combinations refused by the cardinality cap.
  static constexpr char kDroppedSeriesName[] = "moe_metrics_dropped_series_total";

  MetricsRegistry() : MetricsRegistry(Options()) {}
  explicit MetricsRegistry(Options options);
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  absl::StatusOr<CounterFamily*> AddCounter(std::string_view name, std::string_view help,
                                            std::vector<std::string> label_names = {},
                                            FamilyOptions options = {})
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<GaugeFamily*> AddGauge(std::string_view name, std::string_view help,
                                        std::vector<std::string> label_names = {},
                                        FamilyOptions options = {}) ABSL_LOCKS_EXCLUDED(mu_);
  // `bounds`: strictly increasing finite upper bounds; a trailing +Inf is accepted and
  // dropped (the "+Inf" bucket is always there).
  absl::StatusOr<HistogramFamily*> AddHistogram(std::string_view name, std::string_view help,
                                                std::vector<std::string> label_names,
                                                std::vector<double> bounds,
                                                FamilyOptions options = {})
      ABSL_LOCKS_EXCLUDED(mu_);

  // The exposition text of every family, sorted by name.
  std::string Render() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Spec {
    std::string_view name;
    std::string_view help;
    MetricType type;
    std::vector<std::string> label_names;
    std::vector<double> bounds;
    FamilyOptions options;
  };
  template <typename T>
  absl::StatusOr<MetricFamily<T>*> Add(Spec spec) ABSL_LOCKS_EXCLUDED(mu_);

  // Set at construction.
  const Options options_;
  CounterFamily* dropped_series_ = nullptr;

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<MetricFamilyBase>> families_ ABSL_GUARDED_BY(mu_);
};

// The process-wide registry served on `/metrics`. Never destroyed.
MetricsRegistry& DefaultMetricsRegistry();

// Exposition-format helpers, exposed for tests and for other exporters.
// Shortest exact decimal form; "+Inf", "-Inf", "NaN".
std::string FormatMetricValue(double value);
// Escapes '\\', '"' and newline for a label value.
std::string EscapeLabelValue(std::string_view value);
// Escapes '\\' and newline for a HELP line.
std::string EscapeHelp(std::string_view help);
// [a-zA-Z_][a-zA-Z0-9_]*
bool IsValidMetricName(std::string_view name);
// As IsValidMetricName, and not starting with "__".
bool IsValidLabelName(std::string_view name);
// Well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool IsValidUtf8(std::string_view text);

}  // namespace moe::common
