#include "worker/attention/remote_expert_executor.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace moe::worker {

namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Frame header plus payload (f32 rows and combines, i32 slots, f32 weights).
constexpr int64_t kFrameHeaderBytes = 64;

}  // namespace

using common::Tensor;
using common::TensorView;

RemoteExpertExecutor::RemoteExpertExecutor(const model::ModelConfig& config,
                                           const RemoteExpertExecutorOptions& options)
    : config_(config),
      hidden_(config.hidden_size),
      num_layers_(config.num_layers),
      options_(options) {
  MOE_CHECK(options.transport != nullptr) << "RemoteExpertExecutor needs a transport";
}

absl::Status RemoteExpertExecutor::SetPlacement(const PlacementTable& table) {
  MOE_ASSIGN_OR_RETURN(PlacementIndex index, PlacementIndex::Build(table, config_));
  auto shared = std::make_shared<const PlacementIndex>(std::move(index));
  absl::MutexLock lock(&mu_);
  placement_ = std::move(shared);
  return absl::OkStatus();
}

uint64_t RemoteExpertExecutor::epoch() const {
  absl::MutexLock lock(&mu_);
  return placement_ ? placement_->epoch() : 0;
}

void RemoteExpertExecutor::SetNextStepId(uint64_t step_id) {
  absl::MutexLock lock(&mu_);
  next_step_id_ = step_id;
}

absl::Status RemoteExpertExecutor::RunRoutedExperts(int layer, TensorView x, TensorView topk_ids,
                                                    TensorView topk_weights, TensorView out) {
  MOE_RETURN_IF_ERROR(BeginRoutedExperts(layer, x, topk_ids, topk_weights, out));
  return FinishRoutedExperts(layer);
}

absl::Status RemoteExpertExecutor::BeginRoutedExperts(int layer, TensorView x,
                                                      TensorView topk_ids,
                                                      TensorView topk_weights, TensorView out) {
  const auto t_begin = std::chrono::steady_clock::now();
  if (in_flight_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "routed experts of layer ", in_flight_layer_, " are still in flight (Finish not called)"));
  }
  // A new step starts at its first MoE layer: fix its placement and id.
  if (!started_ || layer <= last_layer_) {
    absl::MutexLock lock(&mu_);
    step_placement_ = placement_;
    step_id_ = next_step_id_.has_value() ? *next_step_id_ : (started_ ? step_id_ + 1 : 1);
    next_step_id_.reset();
    started_ = true;
  }
  last_layer_ = layer;
  if (step_placement_ == nullptr) {
    return absl::FailedPreconditionError("no expert placement installed");
  }
  const PlacementIndex& placement = *step_placement_;
  if (!placement.is_moe_layer(layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " has no routed experts"));
  }
  const int64_t t_all = x.dim(0), k = topk_ids.dim(1);
  if (x.dim(1) != hidden_ || topk_weights.dim(0) != t_all || topk_weights.dim(1) != k ||
      out.dim(0) != t_all || out.dim(1) != hidden_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routed experts: x ", x.DebugString(), ", topk_ids ", topk_ids.DebugString(),
        ", topk_weights ", topk_weights.DebugString(), ", out ", out.DebugString(),
        " disagree (hidden ", hidden_, ")"));
  }
  const int ranks = placement.num_ranks();
  work_.resize(ranks);
  for (RankWork& w : work_) {
    w.tokens.clear();
    w.pairs.clear();
    w.sent = false;
  }
  rank_load_.assign(ranks, 0);
  if (static_cast<int>(rows_sent_.size()) < ranks) rows_sent_.resize(ranks, 0);
  row_of_.assign(static_cast<size_t>(t_all) * ranks, -1);
  const int num_experts = config_.moe.num_experts;

  // 1-2. Replica choice and grouping by rank.
  for (int64_t t = 0; t < t_all; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = topk_ids.at<int32_t>(t, j);  // [T, k]
      if (e < 0 || e >= num_experts) {
        return absl::InvalidArgumentError(
            absl::StrCat("token ", t, " routes to expert ", e, " outside [0, ", num_experts, ")"));
      }
      const std::vector<Replica>& replicas = placement.replicas(layer, e);
      const Replica* best = &replicas.front();
      for (const Replica& r : replicas) {
        const int64_t load = rank_load_[r.rank], best_load = rank_load_[best->rank];
        const bool visits = row_of_[t * ranks + r.rank] >= 0;
        const bool best_visits = row_of_[t * ranks + best->rank] >= 0;
        if (load < best_load || (load == best_load && visits && !best_visits)) best = &r;
      }
      ++rank_load_[best->rank];
      RankWork& w = work_[best->rank];
      int32_t& row = row_of_[t * ranks + best->rank];
      if (row < 0) {
        row = static_cast<int32_t>(w.tokens.size());
        w.tokens.push_back(static_cast<int32_t>(t));
        w.pairs.emplace_back();
      }
      w.pairs[row].emplace_back(best->slot, topk_weights.at<float>(t, j));
    }
  }

  // 3. One dispatch per rank with work.
  const DispatchMeta meta{.step_id = step_id_,
                          .epoch = placement.epoch(),
                          .layer = layer,
                          .source_rank = options_.source_rank};
  for (int r = 0; r < ranks; ++r) {
    RankWork& w = work_[r];
    const int64_t n = static_cast<int64_t>(w.tokens.size());
    if (n == 0) continue;
    int64_t kr = 1;
    for (const auto& p : w.pairs) kr = std::max<int64_t>(kr, static_cast<int64_t>(p.size()));
    auto d = std::make_shared<Dispatch>(Dispatch::Allocate(meta, n, hidden_, kr));
    float* rows = d->rows.data_as<float>();       // [n, H]
    int32_t* slots = d->slots.data_as<int32_t>();  // [n, kr]
    float* weights = d->weights.data_as<float>();  // [n, kr]
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(rows + i * hidden_, &x.at<float>(w.tokens[i], 0), hidden_ * sizeof(float));
      for (size_t j = 0; j < w.pairs[i].size(); ++j) {
        slots[i * kr + j] = w.pairs[i][j].first;
        weights[i * kr + j] = w.pairs[i][j].second;
      }
    }
    stats_.bytes_sent += kFrameHeaderBytes + n * hidden_ * 4 + 2 * n * kr * 4;
    w.call = options_.transport->Send(r, std::move(d));
    w.sent = true;
    rows_sent_[r] += n;
  }
  layer_seconds_ = Seconds(t_begin);
  in_flight_ = true;
  in_flight_layer_ = layer;
  in_flight_out_ = out;
  return absl::OkStatus();
}

absl::Status RemoteExpertExecutor::FinishRoutedExperts(int layer) {
  if (!in_flight_ || in_flight_layer_ != layer) {
    return absl::FailedPreconditionError(
        absl::StrCat("FinishRoutedExperts(", layer, ") without a matching Begin"));
  }
  const auto t_finish = std::chrono::steady_clock::now();
  in_flight_ = false;
  const TensorView out = in_flight_out_;  // [T, H]
  for (int64_t t = 0; t < out.dim(0); ++t) {
    std::memset(&out.at<float>(t, 0), 0, hidden_ * sizeof(float));
  }
  absl::Status first_error;
  // Every call is waited on (they run concurrently, so this costs the slowest one), so none
  // is left behind in the transport.
  for (int r = 0; r < static_cast<int>(work_.size()); ++r) {
    RankWork& w = work_[r];
    if (!w.sent) continue;
    w.sent = false;
    absl::StatusOr<Tensor> combine = options_.transport->Wait(w.call);
    if (!combine.ok()) {
      if (first_error.ok()) {
        first_error = absl::Status(combine.status().code(),
                                   absl::StrCat("layer ", layer, ", step ", step_id_,
                                                ", expert rank ", r, ": ",
                                                combine.status().message()));
        if (std::optional<uint64_t> e = WorkerEpochFromStatus(combine.status()); e.has_value()) {
          SetWorkerEpoch(first_error, *e);
        }
      }
      continue;
    }
    const int64_t n = static_cast<int64_t>(w.tokens.size());
    if (combine->shape().size() != 2 || combine->shape()[0] != n || combine->shape()[1] != hidden_) {
      if (first_error.ok()) {
        first_error = absl::DataLossError(absl::StrCat("expert rank ", r, " answered ",
                                                       combine->view().DebugString(), " for ",
                                                       n, " rows"));
      }
      continue;
    }
    stats_.bytes_received += kFrameHeaderBytes + n * hidden_ * 4;
    const float* c = combine->data_as<float>();  // [n, H]
    for (int64_t i = 0; i < n; ++i) {
      float* o = &out.at<float>(w.tokens[i], 0);
      const float* src = c + i * hidden_;
      for (int64_t h = 0; h < hidden_; ++h) o[h] += src[h];
    }
  }
  const double seconds = layer_seconds_ + Seconds(t_finish);
  stats_.dispatch_combine_seconds += seconds;
  ++stats_.layers;
  if (options_.dispatch_combine_seconds != nullptr) {
    options_.dispatch_combine_seconds->Observe(seconds);
  }
  return first_error;
}

}  // namespace moe::worker
