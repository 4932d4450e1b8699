#include "common/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "common/logging.h"
#include "common/status.h"

namespace moe::common {
namespace {

bool EndsWith(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() &&
         text.substr(text.size() - suffix.size()) == suffix;
}

std::string Quoted(std::string_view text) {
  return "\"" + std::string(text) + "\"";
}

absl::Status ValidateName(std::string_view name, MetricType type) {
  if (!IsValidMetricName(name)) {
    return absl::InvalidArgumentError(
        "metric name " + Quoted(name) + " must match [a-zA-Z_][a-zA-Z0-9_]*");
  }
  if (type == MetricType::kCounter) {
    if (!EndsWith(name, "_total")) {
      return absl::InvalidArgumentError("counter name " + Quoted(name) +
                                        " must end in \"_total\"");
    }
    return absl::OkStatus();
  }
  for (std::string_view suffix : {"_total", "_bucket", "_sum", "_count"}) {
    if (EndsWith(name, suffix)) {
      return absl::InvalidArgumentError(
          std::string(MetricTypeName(type)) + " name " + Quoted(name) + " must not end in " +
          Quoted(suffix) + " (reserved for counters and histogram series)");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateLabelNames(std::string_view metric, const std::vector<std::string>& names) {
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& label = names[i];
    if (!IsValidLabelName(label)) {
      return absl::InvalidArgumentError(
          "label name " + Quoted(label) + " of metric " + Quoted(metric) +
          " must match [a-zA-Z_][a-zA-Z0-9_]* and not start with \"__\"");
    }
    if (label == "le" || label == "quantile") {
      return absl::InvalidArgumentError("label name " + Quoted(label) + " of metric " +
                                        Quoted(metric) +
                                        " is reserved for histogram and summary series");
    }
    if (std::find(names.begin(), names.begin() + i, label) != names.begin() + i) {
      return absl::InvalidArgumentError("label name " + Quoted(label) + " of metric " +
                                        Quoted(metric) + " is repeated");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<double>> ValidateBounds(std::string_view metric,
                                                   std::vector<double> bounds) {
  if (!bounds.empty() && bounds.back() == std::numeric_limits<double>::infinity()) {
    bounds.pop_back();
  }
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i])) {
      return absl::InvalidArgumentError("bucket bound " + FormatMetricValue(bounds[i]) +
                                        " of histogram " + Quoted(metric) +
                                        " is not finite");
    }
    if (i > 0 && !(bounds[i - 1] < bounds[i])) {
      return absl::InvalidArgumentError("bucket bounds of histogram " + Quoted(metric) +
                                        " must be strictly increasing, got " +
                                        FormatMetricValue(bounds[i - 1]) + " then " +
                                        FormatMetricValue(bounds[i]));
    }
  }
  return bounds;
}

// `{a="x",b="y"}`, with `le` appended when given; nothing at all when there are no pairs.
void AppendLabels(const std::vector<std::string>& names, const std::vector<std::string>& values,
                  const std::string* le, std::string* out) {
  if (names.empty() && le == nullptr) return;
  out->push_back('{');
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out->push_back(',');
    out->append(names[i]);
    out->append("=\"");
    out->append(EscapeLabelValue(values[i]));
    out->push_back('"');
  }
  if (le != nullptr) {
    if (!names.empty()) out->push_back(',');
    out->append("le=\"");
    out->append(*le);
    out->push_back('"');
  }
  out->push_back('}');
}

void AppendSample(std::string_view name, std::string_view suffix,
                  const std::vector<std::string>& names, const std::vector<std::string>& values,
                  const std::string* le, const std::string& value, std::string* out) {
  out->append(name);
  out->append(suffix);
  AppendLabels(names, values, le, out);
  out->push_back(' ');
  out->append(value);
  out->push_back('\n');
}

void AppendChild(const MetricFamilyBase& family, const std::vector<std::string>& values,
                 const Counter& child, std::string* out) {
  AppendSample(family.name(), "", family.label_names(), values, nullptr,
               FormatMetricValue(child.Value()), out);
}

void AppendChild(const MetricFamilyBase& family, const std::vector<std::string>& values,
                 const Gauge& child, std::string* out) {
  AppendSample(family.name(), "", family.label_names(), values, nullptr,
               FormatMetricValue(child.Value()), out);
}

void AppendChild(const MetricFamilyBase& family, const std::vector<std::string>& values,
                 const Histogram& child, std::string* out) {
  const Histogram::Snapshot snapshot = child.Collect();
  const std::vector<double>& bounds = family.bounds();
  for (size_t i = 0; i <= bounds.size(); ++i) {
    const std::string le = i < bounds.size() ? FormatMetricValue(bounds[i]) : "+Inf";
    AppendSample(family.name(), "_bucket", family.label_names(), values, &le,
                 std::to_string(snapshot.cumulative_counts[i]), out);
  }
  AppendSample(family.name(), "_sum", family.label_names(), values, nullptr,
               FormatMetricValue(snapshot.sum), out);
  AppendSample(family.name(), "_count", family.label_names(), values, nullptr,
               std::to_string(snapshot.count), out);
}

template <typename T>
constexpr MetricType TypeOf() {
  if constexpr (std::is_same_v<T, Counter>) {
    return MetricType::kCounter;
  } else if constexpr (std::is_same_v<T, Gauge>) {
    return MetricType::kGauge;
  } else {
    static_assert(std::is_same_v<T, Histogram>);
    return MetricType::kHistogram;
  }
}

}  // namespace

std::string_view MetricTypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

// ---- Formatting and validation helpers ------------------------------------------------

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buffer[64];
  const std::to_chars_result result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  MOE_CHECK(result.ec == std::errc()) << "to_chars failed for a finite double";
  return std::string(buffer, result.ptr);
}

std::string EscapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out.append("\\\\");
        break;
      case '"':
        out.append("\\\"");
        break;
      case '\n':
        out.append("\\n");
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

std::string EscapeHelp(std::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    switch (c) {
      case '\\':
        out.append("\\\\");
        break;
      case '\n':
        out.append("\\n");
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

bool IsValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool digit = c >= '0' && c <= '9';
    if (!(letter || (i > 0 && digit))) return false;
  }
  return true;
}

bool IsValidLabelName(std::string_view name) {
  return IsValidMetricName(name) && name.substr(0, 2) != "__";
}

bool IsValidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char lead = byte(i);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t length;
    uint32_t code_point;
    uint32_t min_code_point;
    if ((lead & 0xE0) == 0xC0) {
      length = 2, code_point = lead & 0x1F, min_code_point = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, code_point = lead & 0x0F, min_code_point = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, code_point = lead & 0x07, min_code_point = 0x10000;
    } else {
      return false;
    }
    if (text.size() - i < length) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return false;
      code_point = (code_point << 6) | (byte(i + k) & 0x3F);
    }
    if (code_point < min_code_point || code_point > 0x10FFFF ||
        (code_point >= 0xD800 && code_point <= 0xDFFF)) {
      return false;
    }
    i += length;
  }
  return true;
}

absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !std::isfinite(start)) {
    return absl::InvalidArgumentError("exponential buckets: start must be > 0, got " +
                                      FormatMetricValue(start));
  }
  if (!(factor > 1) || !std::isfinite(factor)) {
    return absl::InvalidArgumentError("exponential buckets: factor must be > 1, got " +
                                      FormatMetricValue(factor));
  }
  if (count < 1) {
    return absl::InvalidArgumentError("exponential buckets: count must be >= 1, got " +
                                      std::to_string(count));
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  double bound = start;
  for (int i = 0; i < count; ++i) {
    if (!std::isfinite(bound)) {
      return absl::InvalidArgumentError("exponential buckets: bound " + std::to_string(i) +
                                        " overflows");
    }
    bounds.push_back(bound);
    bound *= factor;
  }
  return bounds;
}

absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count) {
  if (!std::isfinite(start)) {
    return absl::InvalidArgumentError("linear buckets: start must be finite");
  }
  if (!(width > 0) || !std::isfinite(width)) {
    return absl::InvalidArgumentError("linear buckets: width must be > 0, got " +
                                      FormatMetricValue(width));
  }
  if (count < 1) {
    return absl::InvalidArgumentError("linear buckets: count must be >= 1, got " +
                                      std::to_string(count));
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  for (int i = 0; i < count; ++i) bounds.push_back(start + width * i);
  return bounds;
}

// ---- Children ---------------------------------------------------------------------------

void Counter::Inc(double delta) {
  if (!(delta >= 0)) return;  // also rejects NaN
  value_.fetch_add(delta, std::memory_order_relaxed);
}

void Gauge::SetCallback(std::function<double()> fn) {
  absl::MutexLock lock(&callback_mu_);
  callback_ = std::move(fn);
  has_callback_.store(static_cast<bool>(callback_), std::memory_order_release);
}

void Gauge::ClearCallback() {
  absl::MutexLock lock(&callback_mu_);
  callback_ = nullptr;
  has_callback_.store(false, std::memory_order_release);
}

double Gauge::Value() const {
  if (has_callback_.load(std::memory_order_acquire)) {
    absl::MutexLock lock(&callback_mu_);
    if (callback_) return callback_();
  }
  return value_.load(std::memory_order_relaxed);
}

Histogram::Histogram(const std::vector<double>& bounds)
    : bounds_(bounds), counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds.size() + 1)) {}

void Histogram::Observe(double value) {
  // lower_bound finds the first bound >= value: buckets are inclusive of their bound.
  const size_t bucket =
      std::isnan(value)
          ? bounds_.size()
          : static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                bounds_.begin());
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Collect() const {
  Snapshot snapshot;
  snapshot.cumulative_counts.resize(bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    snapshot.cumulative_counts[i] = running;
  }
  snapshot.count = running;
  snapshot.sum = sum_.load(std::memory_order_relaxed);
  return snapshot;
}

// ---- Families ---------------------------------------------------------------------------

MetricFamilyBase::MetricFamilyBase(Args args)
    : name_(std::move(args.name)),
      help_(std::move(args.help)),
      type_(args.type),
      label_names_(std::move(args.label_names)),
      bounds_(std::move(args.bounds)),
      max_series_(args.max_series),
      dropped_series_(args.dropped_series) {}

template <typename T>
MetricFamily<T>::MetricFamily(Args args)
    : MetricFamilyBase(std::move(args)), overflow_(NewChild()) {
  if (label_names_.empty()) {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = children_.emplace(std::vector<std::string>(), NewChild());
    unlabelled_ = it->second.get();
  }
}

template <typename T>
std::unique_ptr<T> MetricFamily<T>::NewChild() const {
  if constexpr (std::is_same_v<T, Histogram>) {
    return std::make_unique<Histogram>(bounds_);
  } else {
    return std::make_unique<T>();
  }
}

template <typename T>
absl::StatusOr<T*> MetricFamily<T>::WithLabels(const std::vector<std::string>& label_values) {
  if (label_values.size() != label_names_.size()) {
    return absl::InvalidArgumentError(
        "metric " + Quoted(name_) + " takes " + std::to_string(label_names_.size()) +
        " label values, got " + std::to_string(label_values.size()));
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = children_.find(label_values);
    if (it != children_.end()) return it->second.get();
  }
  for (size_t i = 0; i < label_values.size(); ++i) {
    if (!IsValidUtf8(label_values[i])) {
      return absl::InvalidArgumentError("value of label " + Quoted(label_names_[i]) +
                                        " of metric " + Quoted(name_) +
                                        " is not valid UTF-8");
    }
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = children_.find(label_values);
    if (it != children_.end()) return it->second.get();
    if (children_.size() < max_series_) {
      it = children_.emplace(label_values, NewChild()).first;
      return it->second.get();
    }
  }
  // Counted outside mu_: the dropped-series family has its own lock.
  if (dropped_series_ != nullptr) {
    absl::StatusOr<Counter*> dropped = dropped_series_->WithLabels({name_});
    if (dropped.ok()) (*dropped)->Inc();
  }
  return overflow_.get();
}

template <typename T>
T& MetricFamily<T>::Get() {
  MOE_CHECK(unlabelled_ != nullptr) << "metric " << name_
                                    << " has labels; use WithLabels() instead of Get()";
  return *unlabelled_;
}

template <typename T>
size_t MetricFamily<T>::series_count() const {
  absl::ReaderMutexLock lock(&mu_);
  return children_.size();
}

template <typename T>
void MetricFamily<T>::AppendTo(std::string* out) const {
  // Children are never removed, so these pointers outlive the lock; gauge callbacks then
  // run without any family lock held.
  std::vector<std::pair<const std::vector<std::string>*, const T*>> children;
  {
    absl::ReaderMutexLock lock(&mu_);
    children.reserve(children_.size());
    for (const auto& [values, child] : children_) children.emplace_back(&values, child.get());
  }
  out->append("# HELP ");
  out->append(name_);
  out->push_back(' ');
  out->append(EscapeHelp(help_));
  out->append("\n# TYPE ");
  out->append(name_);
  out->push_back(' ');
  out->append(MetricTypeName(type_));
  out->push_back('\n');
  for (const auto& [values, child] : children) AppendChild(*this, *values, *child, out);
}

template class MetricFamily<Counter>;
template class MetricFamily<Gauge>;
template class MetricFamily<Histogram>;

// ---- Registry ---------------------------------------------------------------------------

MetricsRegistry::MetricsRegistry(Options options) : options_(options) {
  absl::StatusOr<CounterFamily*> dropped =
      AddCounter(kDroppedSeriesName,
                 "Label combinations not created because their metric reached its "
                 "cardinality cap; updates to them are discarded.",
                 {"metric"}, FamilyOptions{.max_series = std::numeric_limits<size_t>::max()});
  MOE_CHECK(dropped.ok()) << std::string(dropped.status().message());
  dropped_series_ = *dropped;
}

template <typename T>
absl::StatusOr<MetricFamily<T>*> MetricsRegistry::Add(Spec spec) {
  MOE_RETURN_IF_ERROR(ValidateName(spec.name, spec.type));
  if (spec.help.empty()) {
    return absl::InvalidArgumentError("metric " + Quoted(spec.name) + " needs help text");
  }
  if (!IsValidUtf8(spec.help)) {
    return absl::InvalidArgumentError("help of metric " + Quoted(spec.name) +
                                      " is not valid UTF-8");
  }
  MOE_RETURN_IF_ERROR(ValidateLabelNames(spec.name, spec.label_names));
  if (spec.type == MetricType::kHistogram) {
    MOE_ASSIGN_OR_RETURN(spec.bounds, ValidateBounds(spec.name, std::move(spec.bounds)));
  }

  absl::MutexLock lock(&mu_);
  const std::string name(spec.name);
  auto it = families_.find(name);
  if (it != families_.end()) {
    const MetricFamilyBase& existing = *it->second;
    if (existing.type() != spec.type || existing.help() != spec.help ||
        existing.label_names() != spec.label_names || existing.bounds() != spec.bounds) {
      return absl::AlreadyExistsError(
          "metric " + Quoted(name) + " is already registered as a " +
          std::string(MetricTypeName(existing.type())) +
          " with different type, help, label names or buckets");
    }
    return static_cast<MetricFamily<T>*>(it->second.get());
  }
  MetricFamilyBase::Args args;
  args.name = name;
  args.help = std::string(spec.help);
  args.type = spec.type;
  args.label_names = std::move(spec.label_names);
  args.bounds = std::move(spec.bounds);
  args.max_series = spec.options.max_series != 0 ? spec.options.max_series
                                                 : options_.max_series_per_family;
  args.dropped_series = dropped_series_;
  auto* family = new MetricFamily<T>(std::move(args));
  families_.emplace(name, std::unique_ptr<MetricFamilyBase>(family));
  return family;
}

absl::StatusOr<CounterFamily*> MetricsRegistry::AddCounter(std::string_view name,
                                                           std::string_view help,
                                                           std::vector<std::string> label_names,
                                                           FamilyOptions options) {
  return Add<Counter>(Spec{name, help, TypeOf<Counter>(), std::move(label_names), {}, options});
}

absl::StatusOr<GaugeFamily*> MetricsRegistry::AddGauge(std::string_view name,
                                                       std::string_view help,
                                                       std::vector<std::string> label_names,
                                                       FamilyOptions options) {
  return Add<Gauge>(Spec{name, help, TypeOf<Gauge>(), std::move(label_names), {}, options});
}

absl::StatusOr<HistogramFamily*> MetricsRegistry::AddHistogram(
    std::string_view name, std::string_view help, std::vector<std::string> label_names,
    std::vector<double> bounds, FamilyOptions options) {
  return Add<Histogram>(Spec{name, help, TypeOf<Histogram>(), std::move(label_names),
                             std::move(bounds), options});
}

std::string MetricsRegistry::Render() const {
  // Families are never removed; render them without holding mu_ so that gauge callbacks
  // may register metrics of their own.
  std::vector<const MetricFamilyBase*> families;
  {
    absl::ReaderMutexLock lock(&mu_);
    families.reserve(families_.size());
    for (const auto& [name, family] : families_) families.push_back(family.get());
  }
  std::string out;
  for (const MetricFamilyBase* family : families) family->AppendTo(&out);
  return out;
}

MetricsRegistry& DefaultMetricsRegistry() {
  static MetricsRegistry* const registry = new MetricsRegistry();
  return *registry;
}

}  // namespace moe::common
