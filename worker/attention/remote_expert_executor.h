// RemoteExpertExecutor: the routed experts of an attention worker, computed by expert ranks
// over a Transport (model::ExpertExecutor; Model::SetExpertExecutor installs it).
//
// Per MoE layer (T tokens, top-k choices):
//   1. For every (token t, choice j) with expert e = topk_ids[t, j], pick one replica of e
//      from the placement table: the replica whose rank has been given the fewest (token,
//      choice) pairs so far in this layer of this step; ties go to a rank the token already
//      visits, then to the earlier replica in the table. Deterministic for a given batch.
//   2. Group by rank: a token that goes to a rank for several experts is sent once, with
//      several (slot, gate weight) pairs. One Dispatch per rank with work.
//   3. Send all (BeginRoutedExperts returns here, so Model::FeedForward computes the shared
//      expert while the dispatches are in flight), then FinishRoutedExperts waits for every
//      combine (each bounded by the transport's dispatch timeout) and writes
//      out[t] = Σ over ranks (ascending) of the combine rows of t.
// The placement snapshot and the step id are fixed at the first MoE layer of a step, so one
// step never mixes two placements. A failed rank fails the layer with its typed error (code
// and, for a stale epoch, the worker's epoch kept; the message names the rank); failover to
// other replicas is the caller's decision (refetch the placement, retry the step).
//
// Cost: stats() counts the time the Forward thread spends in Begin (choice, packing, send)
// and Finish (waiting for the combines, summing them) per layer — the time the step is held
// up by the expert ranks — and the bytes of dispatches and combines (payload plus frame
// headers). options.dispatch_combine_seconds, when set, observes that time per MoE layer.
//
// Threads: one thread (the one running Model::Forward) calls the ExpertExecutor methods;
// SetPlacement, SetNextStepId and epoch() may be called from any thread; rows_sent_per_rank,
// stats and step_id from the Forward thread (or once it is idle).
//
//   RemoteExpertExecutor executor(model->config(), {.transport = &transport, .source_rank = 0});
//   MOE_RETURN_IF_ERROR(executor.SetPlacement(table));
//   model->SetExpertExecutor(&executor);
//   executor.SetNextStepId(step_id);
//   MOE_ASSIGN_OR_RETURN(auto out, model->Forward(batch));
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "model/model.h"
#include "model/model_config.h"
#include "worker/placement.h"
#include "worker/transport/transport.h"

namespace moe::worker {

struct RemoteExpertExecutorOptions {
  Transport* transport = nullptr;  // not owned
  int source_rank = 0;             // this attention worker's rank
  // Observes Begin + Finish time per MoE layer (moe_dispatch_combine_seconds); may be null.
  common::Histogram* dispatch_combine_seconds = nullptr;
};

// Totals since construction.
struct RemoteExpertStats {
  double dispatch_combine_seconds = 0.0;  // Begin + Finish, every layer
  int64_t bytes_sent = 0;                 // dispatch frames
  int64_t bytes_received = 0;             // combine frames
  int64_t layers = 0;                     // MoE layers dispatched
};

class RemoteExpertExecutor : public model::ExpertExecutor {
 public:
  RemoteExpertExecutor(const model::ModelConfig& config, const RemoteExpertExecutorOptions& options);

  // Validates and installs a placement; used from the next step on.
  absl::Status SetPlacement(const PlacementTable& table) ABSL_LOCKS_EXCLUDED(mu_);
  // Epoch of the installed placement (0 = none).
  uint64_t epoch() const ABSL_LOCKS_EXCLUDED(mu_);
  // Step id of the next Forward (otherwise the previous step id + 1).
  void SetNextStepId(uint64_t step_id) ABSL_LOCKS_EXCLUDED(mu_);

  absl::Status RunRoutedExperts(int layer, common::TensorView x, common::TensorView topk_ids,
                                common::TensorView topk_weights, common::TensorView out) override;
  absl::Status BeginRoutedExperts(int layer, common::TensorView x, common::TensorView topk_ids,
                                  common::TensorView topk_weights,
                                  common::TensorView out) override;
  absl::Status FinishRoutedExperts(int layer) override;

  // Rows (token, rank) dispatched to each rank since construction, indexed by rank.
  std::vector<int64_t> rows_sent_per_rank() const { return rows_sent_; }
  // Step id of the current (or last) step.
  uint64_t step_id() const { return step_id_; }
  const RemoteExpertStats& stats() const { return stats_; }

 private:
  struct RankWork {
    std::vector<int32_t> tokens;                       // [n]: token of each row
    std::vector<std::vector<std::pair<int32_t, float>>> pairs;  // [n][<= k]: (slot, weight)
    CallId call = 0;
    bool sent = false;
  };

  // Set at construction.
  model::ModelConfig config_;
  const int64_t hidden_;
  const int num_layers_;
  const RemoteExpertExecutorOptions options_;

  mutable absl::Mutex mu_;
  std::shared_ptr<const PlacementIndex> placement_ ABSL_GUARDED_BY(mu_);
  std::optional<uint64_t> next_step_id_ ABSL_GUARDED_BY(mu_);

  // Forward thread only.
  std::shared_ptr<const PlacementIndex> step_placement_;
  uint64_t step_id_ = 0;
  bool started_ = false;
  int last_layer_ = -1;
  bool in_flight_ = false;
  int in_flight_layer_ = -1;
  common::TensorView in_flight_out_;
  std::vector<RankWork> work_;           // [num_ranks]
  std::vector<int64_t> rank_load_;       // [num_ranks]: pairs given this layer
  std::vector<int32_t> row_of_;          // [T * num_ranks]: row of token t on rank r, -1
  std::vector<int64_t> rows_sent_;       // [num_ranks]
  RemoteExpertStats stats_;
  double layer_seconds_ = 0.0;           // Begin's share of the layer in flight
};

}  // namespace moe::worker
