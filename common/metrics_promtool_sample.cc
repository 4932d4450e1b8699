// Writes the exposition text of a registry shaped like the daemon's (labelled counters,
// plain and callback gauges, histograms, label values that need escaping, a family past its
// cardinality cap) to stdout, for `promtool check metrics` in the metrics_promtool test.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common/metrics.h"
#include "common/status.h"

namespace moe::common {
namespace {

absl::Status Populate(MetricsRegistry& registry) {
  MOE_ASSIGN_OR_RETURN(CounterFamily* requests,
                       registry.AddCounter("moe_requests_total", "Finished requests.",
                                           {"model", "finish_reason"}));
  for (const char* reason : {"stop", "length", "abort"}) {
    MOE_ASSIGN_OR_RETURN(Counter* c, requests->WithLabels({"tiny-moe", reason}));
    c->Inc(7);
  }
  // A model path and an odd name exercise every escape.
  MOE_ASSIGN_OR_RETURN(Counter* odd, requests->WithLabels({"C:\\models\\\"odd\"\nname", "stop"}));
  odd->Inc();
  MOE_ASSIGN_OR_RETURN(CounterFamily* tokens,
                       registry.AddCounter("moe_generation_tokens_total", "Generated tokens."));
  tokens->Get().Inc(123456789);

  MOE_ASSIGN_OR_RETURN(GaugeFamily* running,
                       registry.AddGauge("moe_num_requests_running", "Requests being decoded."));
  running->Get().Set(3);
  MOE_ASSIGN_OR_RETURN(GaugeFamily* usage,
                       registry.AddGauge("moe_kv_cache_usage_perc",
                                         "KV cache blocks in use, 0 to 1.\nBackslash: \\"));
  usage->Get().SetCallback([] { return 0.375; });
  MOE_ASSIGN_OR_RETURN(GaugeFamily* load,
                       registry.AddGauge("moe_expert_load", "Tokens routed per expert, last window.",
                                         {"layer", "expert"}));
  for (int expert = 0; expert < 4; ++expert) {
    MOE_ASSIGN_OR_RETURN(Gauge* g, load->WithLabels({"0", std::to_string(expert)}));
    g->Set(expert * 1.5);
  }
  MOE_ASSIGN_OR_RETURN(GaugeFamily* special,
                       registry.AddGauge("moe_imbalance_ratio", "Max over mean expert load.",
                                         {"layer"}));
  (*special->WithLabels({"nan"}))->Set(std::nan(""));
  (*special->WithLabels({"inf"}))->Set(std::numeric_limits<double>::infinity());
  (*special->WithLabels({"neg_inf"}))->Set(-std::numeric_limits<double>::infinity());
  (*special->WithLabels({"tiny"}))->Set(2.5e-300);

  MOE_ASSIGN_OR_RETURN(std::vector<double> buckets, ExponentialBuckets(0.001, 2, 16));
  MOE_ASSIGN_OR_RETURN(HistogramFamily* ttft,
                       registry.AddHistogram("moe_time_to_first_token_seconds",
                                             "Time to first token.", {"model"}, buckets));
  MOE_ASSIGN_OR_RETURN(Histogram* h, ttft->WithLabels({"tiny-moe"}));
  for (int i = 0; i < 100; ++i) h->Observe(i * 0.013);
  MOE_ASSIGN_OR_RETURN(HistogramFamily* bare,
                       registry.AddHistogram("moe_recovery_seconds", "Time to recover a rank.",
                                             {}, {}));
  bare->Get().Observe(4.2);

  MOE_ASSIGN_OR_RETURN(CounterFamily* capped,
                       registry.AddCounter("moe_capped_total", "Has a cap of two series.",
                                           {"id"}, FamilyOptions{.max_series = 2}));
  for (int i = 0; i < 3; ++i) {
    MOE_ASSIGN_OR_RETURN(Counter* c, capped->WithLabels({std::to_string(i)}));
    c->Inc();
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moe::common

int main() {
  moe::common::MetricsRegistry registry;
  absl::Status status = moe::common::Populate(registry);
  if (!status.ok()) {
    std::fprintf(stderr, "metrics_promtool_sample: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  const std::string text = registry.Render();
  std::fwrite(text.data(), 1, text.size(), stdout);
  return std::fflush(stdout) == 0 ? 0 : 1;
}
