// ExpertWorker: one expert rank. It holds *expert slots* (each the weights of one
// (layer, logical expert) replica), serves dispatches by slot with kernels::ExpertFfn and
// counts tokens per slot for the scheduler's load reports. It keeps no per-request state:
// losing a rank loses no request, only the rows in flight (the sender sees kUnavailable).
//
// Placement (two-phase, driven by the scheduler through ExpertControl, expert_service.h):
//   Prepare(table)  loads the slots `table` assigns to this rank from the checkpoint
//                   (ModelWeights with an experts filter and load_non_expert = false: the
//                   rank's resident memory follows its slot count) next to the served ones;
//                   they are not served yet.
//   Commit(epoch)   flips to the prepared epoch between two batches of the compute thread.
//                   Every dispatch names its epoch and is computed entirely with that epoch's
//                   slots, so old and new never mix inside one layer of one step. After the
//                   flip the previous epoch keeps serving the steps that had already reached
//                   this rank (step id <= the highest seen before the flip), so a step in
//                   flight finishes on the placement it started with; a later step naming it
//                   is stale.
//   LoadPlacement(table) = Prepare + Commit (the first placement, from Register).
//
// Serving: Submit (the ExpertEndpoint side of the transports) only queues. One compute
// thread drains the queue: it takes every queued dispatch, groups them by (epoch, layer,
// step) and runs one ExpertFfn per group over the concatenated rows, so the rows that
// several attention workers send for the same layer of the same step are computed in one
// pass over each expert's weights. With gather_window > 0 the thread first waits up to that
// long for dispatches from `expected_sources` distinct sources for the (step, layer) at the
// head of the queue (it never waits once they are all there). Each dispatch is checked on its
// own: a stale or prepared-but-uncommitted epoch is kFailedPrecondition carrying the current
// epoch (WorkerEpochFromStatus), a layer that is not a MoE layer or a slot outside
// [0, slots_per_rank) is kInvalidArgument, an empty slot kNotFound, a wrong hidden size
// kInvalidArgument; a bad dispatch fails alone, the rest of its group is still computed.
//
// Metrics (DefaultMetricsRegistry, label rank): moe_expert_dispatches_total{result},
// moe_expert_rows_total, moe_expert_ffn_calls_total, moe_expert_placement_commits_total,
// moe_expert_placement_epoch, moe_expert_slots_loaded.
//
// Threads: every public method may be called from any thread. Submit never blocks; `done`
// runs on the compute thread (or on the caller's thread for an immediate rejection).
// Prepare blocks while it maps weights (never the compute thread). Stop (or the destructor)
// fails queued dispatches with kUnavailable and joins the compute thread.
//
//   MOE_ASSIGN_OR_RETURN(auto worker, ExpertWorker::Create({.rank = 1, .model_dir = dir}));
//   MOE_RETURN_IF_ERROR(worker->LoadPlacement(table));
//   InprocTransport transport({});
//   transport.AddEndpoint(1, worker.get());
//   // ... Send/Wait dispatches for rank 1 ...
//   moe::internal::v1::LoadReport report = worker->TakeLoadReport();
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "kernels/kernels.h"
#include "model/model_config.h"
#include "model/weights.h"
#include "moe/v1/internal.pb.h"
#include "worker/placement.h"
#include "worker/transport/transport.h"

namespace moe::worker {

struct ExpertWorkerOptions {
  int rank = 0;
  // Hugging Face checkpoint directory.
  std::string model_dir;
  // Weight dtype in memory (nullopt: as stored). See model::WeightsOptions::dtype.
  std::optional<common::DType> dtype;
  // How long the compute thread waits for more sources of the same (step, layer) before
  // computing (0 = merge only what is already queued).
  absl::Duration gather_window = absl::ZeroDuration();
  // Attention workers that dispatch to this rank (closes the gather window early).
  int expected_sources = 1;
};

class ExpertWorker : public ExpertEndpoint {
 public:
  // Reads the model config; loads no slot until a placement arrives.
  static absl::StatusOr<std::unique_ptr<ExpertWorker>> Create(const ExpertWorkerOptions& options);
  ~ExpertWorker() override;

  // Loads this rank's slots of `table` beside the served ones (replacing an older prepared
  // table). kInvalidArgument for a table that does not fit the model or an epoch not newer
  // than the served one; checkpoint errors pass through.
  absl::Status Prepare(const PlacementTable& table);
  // Serves the prepared `epoch` from the next batch on. kFailedPrecondition when `epoch` is
  // not the prepared one (committing the served epoch again is OK).
  absl::Status Commit(uint64_t epoch);
  // Prepare + Commit.
  absl::Status LoadPlacement(const PlacementTable& table);

  // ExpertEndpoint.
  void Submit(std::shared_ptr<const Dispatch> dispatch, Done done) override;

  // Served epoch, 0 before the first placement.
  uint64_t epoch() const;
  // Epoch prepared and not committed, 0 when none.
  uint64_t prepared_epoch() const;
  // Slots holding an expert in the served epoch, over all layers.
  int64_t num_loaded_slots() const;
  // Bytes of expert weights the served epoch exposes (mapped or owned).
  size_t slot_bytes() const;
  int rank() const { return options_.rank; }
  const model::ModelConfig& model_config() const { return model_config_; }

  // Token counts per slot since the previous call, flattened as PlacementIndex::
  // SlotTokenIndex, and the steps seen; resets the counts.
  moe::internal::v1::LoadReport TakeLoadReport();
  // ExpertFfn calls made (one per merged group), for tests of the batching policy.
  int64_t num_ffn_calls() const { return num_ffn_calls_.load(); }

  // Fails queued dispatches with kUnavailable and stops the compute thread. Idempotent.
  void Stop();

 private:
  struct EpochState;
  struct Metrics;
  struct Pending {
    std::shared_ptr<const Dispatch> dispatch;
    Done done;
  };

  explicit ExpertWorker(const ExpertWorkerOptions& options, model::ModelConfig config);
  absl::StatusOr<std::shared_ptr<EpochState>> LoadEpoch(const PlacementTable& table);
  void ComputeLoop();
  // Runs one (epoch, layer, step) group; calls every `done`.
  void RunGroup(std::vector<Pending> group);
  // The state that serves `meta`, or the typed error.
  absl::StatusOr<std::shared_ptr<EpochState>> StateFor(const DispatchMeta& meta)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Set at construction.
  const ExpertWorkerOptions options_;
  const model::ModelConfig model_config_;

  const std::unique_ptr<Metrics> metrics_;
  std::atomic<int64_t> num_ffn_calls_{0};
  absl::Mutex prepare_mu_;  // one Prepare at a time (it maps weights outside mu_)

  mutable absl::Mutex mu_;
  std::shared_ptr<EpochState> current_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<EpochState> previous_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<EpochState> prepared_ ABSL_GUARDED_BY(mu_);
  // Highest step id seen under the previous epoch when it was replaced.
  uint64_t previous_last_step_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t max_step_seen_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t steps_since_report_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_counted_step_ ABSL_GUARDED_BY(mu_) = UINT64_MAX;
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  std::thread compute_thread_;
};

}  // namespace moe::worker
