// RemoteAttentionWorker: server::AttentionWorker over gRPC, the frontend's client of one
// attention worker rank (moe.internal.v1.AttentionWorker.Step, served by
// worker/attention/attention_service.h). The engine sends it the same StepInput it gives the
// worker inside its process; the proto conversion is the worker's (attention_step.h).
//
// Errors: every Step has a deadline (step_timeout). A worker that cannot be reached, a step
// that fails on the data plane (a dead expert rank: UNAVAILABLE; an expert rank that did not
// answer in time: DEADLINE_EXCEEDED) or a step past its deadline comes back as kUnavailable
// (HTTP 503 for the requests of that step) with a message naming the attention worker and,
// from the worker, the expert rank; other codes keep theirs.
//
// Metrics (RemoteAttentionMetrics, shared by the clients of one frontend): per step the
// worker's forward time (moe_worker_forward_seconds), the part of it spent on dispatch and
// combine (moe_worker_dispatch_combine_seconds) and the bytes moved
// (moe_worker_dispatch_bytes_total), labelled by attention rank.
//
// Threads: Step is called by one thread at a time (the engine runs one step per worker at
// once); the client is otherwise immutable.
//
//   auto metrics = RemoteAttentionMetrics::Create(nullptr);
//   auto worker = std::make_unique<RemoteAttentionWorker>(RemoteAttentionWorkerOptions{
//       .rank = 0, .address = "127.0.0.1:7100", .metrics = metrics->get()});
#pragma once

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "common/metrics.h"
#include "server/engine.h"

namespace moe::server {

struct RemoteAttentionMetrics {
  // Registers the families on `registry` (null: the process-wide one).
  static absl::StatusOr<std::unique_ptr<RemoteAttentionMetrics>> Create(
      common::MetricsRegistry* registry);
  common::HistogramFamily* forward = nullptr;
  common::HistogramFamily* dispatch = nullptr;
  common::CounterFamily* bytes = nullptr;
};

struct RemoteAttentionWorkerOptions {
  int rank = 0;
  std::string address;  // host:port of the worker's Step service
  absl::Duration step_timeout = absl::Seconds(30);
  RemoteAttentionMetrics* metrics = nullptr;  // not owned; may be null
};

class RemoteAttentionWorker : public AttentionWorker {
 public:
  explicit RemoteAttentionWorker(const RemoteAttentionWorkerOptions& options);
  ~RemoteAttentionWorker() override;
  absl::StatusOr<StepOutput> Step(const StepInput& input) override;

 private:
  struct Stub;
  const RemoteAttentionWorkerOptions options_;
  std::unique_ptr<Stub> stub_;
  common::Histogram* forward_ = nullptr;
  common::Histogram* dispatch_ = nullptr;
  common::Counter* bytes_ = nullptr;
};

}  // namespace moe::server
