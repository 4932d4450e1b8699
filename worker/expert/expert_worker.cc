#include "worker/expert/expert_worker.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/status.h"

namespace moe::worker {

using common::DType;
using common::Tensor;
using common::TensorView;

// Prometheus series of one rank (DefaultMetricsRegistry; label rank). Registration errors
// leave a series null: metrics never fail the data plane.
struct ExpertWorker::Metrics {
  explicit Metrics(int rank) : rank_label(std::to_string(rank)) {
    common::MetricsRegistry& r = common::DefaultMetricsRegistry();
    if (auto f = r.AddCounter("moe_expert_dispatches_total",
                              "Dispatches an expert rank answered, by result (status code).",
                              {"rank", "result"});
        f.ok()) {
      dispatches = *f;
    }
    rows = CounterFor(r.AddCounter("moe_expert_rows_total", "Rows computed by an expert rank.", {"rank"}));
    ffn_calls = CounterFor(r.AddCounter("moe_expert_ffn_calls_total",
                                        "Grouped expert FFN calls (one per merged (step, layer)).",
                                        {"rank"}));
    commits = CounterFor(r.AddCounter("moe_expert_placement_commits_total",
                                      "Placement epochs an expert rank switched to.", {"rank"}));
    epoch = GaugeFor(r.AddGauge("moe_expert_placement_epoch",
                                "Placement epoch an expert rank serves.", {"rank"}));
    slots = GaugeFor(r.AddGauge("moe_expert_slots_loaded",
                                "Expert slots holding weights in the served epoch.", {"rank"}));
  }
  common::Counter* CounterFor(absl::StatusOr<common::CounterFamily*> f) {
    if (!f.ok()) return nullptr;
    auto c = (*f)->WithLabels({rank_label});
    return c.ok() ? *c : nullptr;
  }
  common::Gauge* GaugeFor(absl::StatusOr<common::GaugeFamily*> f) {
    if (!f.ok()) return nullptr;
    auto g = (*f)->WithLabels({rank_label});
    return g.ok() ? *g : nullptr;
  }
  void Answered(absl::StatusCode code, int64_t n = 1) {
    if (dispatches == nullptr) return;
    auto c = dispatches->WithLabels({rank_label, std::string(common::StatusCodeName(code))});
    if (c.ok()) (*c)->Inc(static_cast<double>(n));
  }

  const std::string rank_label;
  common::CounterFamily* dispatches = nullptr;
  common::Counter* rows = nullptr;
  common::Counter* ffn_calls = nullptr;
  common::Counter* commits = nullptr;
  common::Gauge* epoch = nullptr;
  common::Gauge* slots = nullptr;
};

// The slots of one placement epoch on this rank. Immutable after LoadEpoch except the
// token counters; shared by the compute thread while a group runs on it.
struct ExpertWorker::EpochState {
  uint64_t epoch = 0;
  PlacementIndex index;
  std::unique_ptr<model::ModelWeights> weights;
  // [num_layers][slots_per_rank]: slot -> weights (empty views for an empty slot or a dense
  // layer), the table kernels::ExpertFfn indexes by slot id.
  std::vector<std::vector<kernels::SwigluWeights>> slots;
  // [num_moe_layers * slots_per_rank], PlacementIndex::SlotTokenIndex.
  std::unique_ptr<std::atomic<uint64_t>[]> tokens;
  size_t num_tokens_entries = 0;
  int64_t num_loaded = 0;
  size_t bytes = 0;
};

ExpertWorker::ExpertWorker(const ExpertWorkerOptions& options, model::ModelConfig config)
    : options_(options),
      model_config_(std::move(config)),
      metrics_(std::make_unique<Metrics>(options.rank)) {
  compute_thread_ = std::thread([this] { ComputeLoop(); });
}

ExpertWorker::~ExpertWorker() { Stop(); }

absl::StatusOr<std::unique_ptr<ExpertWorker>> ExpertWorker::Create(
    const ExpertWorkerOptions& options) {
  if (options.rank < 0) return absl::InvalidArgumentError("expert worker: rank must be >= 0");
  MOE_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(options.model_dir));
  if (config.moe.num_experts <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert worker: ", options.model_dir, " has no routed experts"));
  }
  return std::unique_ptr<ExpertWorker>(new ExpertWorker(options, std::move(config)));
}

absl::StatusOr<std::shared_ptr<ExpertWorker::EpochState>> ExpertWorker::LoadEpoch(
    const PlacementTable& table) {
  MOE_ASSIGN_OR_RETURN(PlacementIndex index, PlacementIndex::Build(table, model_config_));
  const int rank = options_.rank;
  if (rank >= index.num_ranks()) {
    return absl::InvalidArgumentError(absl::StrCat("placement epoch ", table.epoch(), " has ",
                                                   index.num_ranks(), " ranks; this is rank ", rank));
  }
  auto state = std::make_shared<EpochState>();
  state->epoch = table.epoch();
  state->index = std::move(index);
  const PlacementIndex& idx = state->index;
  model::WeightsOptions wopts;
  wopts.dtype = options_.dtype;
  wopts.load_non_expert = false;
  wopts.experts = [&idx, rank](int layer, int expert) {
    if (!idx.is_moe_layer(layer)) return false;
    const std::vector<int32_t>& held = idx.rank_slots(rank, layer);
    return std::find(held.begin(), held.end(), expert) != held.end();
  };
  MOE_ASSIGN_OR_RETURN(state->weights,
                       model::ModelWeights::Load(options_.model_dir, model_config_, wopts));
  const int spr = idx.slots_per_rank();
  state->slots.assign(model_config_.num_layers, {});
  for (int layer : idx.moe_layers()) {
    std::vector<kernels::SwigluWeights>& table_l = state->slots[layer];
    table_l.assign(spr, {});
    const std::vector<int32_t>& held = idx.rank_slots(rank, layer);  // [slots_per_rank]
    const model::LayerWeights& lw = state->weights->layer(layer);
    for (int s = 0; s < spr; ++s) {
      if (held[s] < 0) continue;
      table_l[s] = lw.moe.experts[held[s]];
      if (table_l[s].gate.empty()) {
        return absl::InternalError(absl::StrCat("layer ", layer, " expert ", held[s],
                                                " was selected but not loaded"));
      }
      ++state->num_loaded;
      state->bytes += table_l[s].gate.nbytes() + table_l[s].up.nbytes() + table_l[s].down.nbytes();
    }
  }
  state->num_tokens_entries = idx.moe_layers().size() * static_cast<size_t>(spr);
  state->tokens = std::make_unique<std::atomic<uint64_t>[]>(state->num_tokens_entries);
  for (size_t i = 0; i < state->num_tokens_entries; ++i) state->tokens[i] = 0;
  return state;
}

absl::Status ExpertWorker::Prepare(const PlacementTable& table) {
  absl::MutexLock prepare_lock(&prepare_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (current_ != nullptr && table.epoch() <= current_->epoch) {
      return absl::InvalidArgumentError(absl::StrCat("prepare: epoch ", table.epoch(),
                                                     " is not newer than the served epoch ",
                                                     current_->epoch));
    }
    if (prepared_ != nullptr && table.epoch() < prepared_->epoch) {
      return absl::InvalidArgumentError(absl::StrCat("prepare: epoch ", table.epoch(),
                                                     " is older than the prepared epoch ",
                                                     prepared_->epoch));
    }
    // At most two sets of slots stay resident while the new one loads: drop the set kept
    // for steps in flight during the previous flip, and any older prepared one.
    previous_.reset();
    prepared_.reset();
  }
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<EpochState> state, LoadEpoch(table));
  MOE_LOG(INFO) << "placement prepared" << common::Kv("epoch", state->epoch)
                << common::Kv("slots", state->num_loaded) << common::Kv("bytes", state->bytes);
  absl::MutexLock lock(&mu_);
  prepared_ = std::move(state);
  return absl::OkStatus();
}

absl::Status ExpertWorker::Commit(uint64_t epoch) {
  absl::MutexLock lock(&mu_);
  if (current_ != nullptr && current_->epoch == epoch) return absl::OkStatus();
  if (prepared_ == nullptr || prepared_->epoch != epoch) {
    absl::Status status = absl::FailedPreconditionError(absl::StrCat(
        "commit: epoch ", epoch, " is not prepared (prepared: ",
        prepared_ ? prepared_->epoch : 0, ", served: ", current_ ? current_->epoch : 0, ")"));
    SetWorkerEpoch(status, current_ ? current_->epoch : 0);
    return status;
  }
  previous_ = std::move(current_);
  previous_last_step_ = max_step_seen_;
  current_ = std::move(prepared_);
  if (metrics_->commits) metrics_->commits->Inc();
  if (metrics_->epoch) metrics_->epoch->Set(static_cast<double>(epoch));
  if (metrics_->slots) metrics_->slots->Set(static_cast<double>(current_->num_loaded));
  MOE_LOG(INFO) << "placement committed" << common::Kv("epoch", epoch)
                << common::Kv("previous", previous_ ? previous_->epoch : 0)
                << common::Kv("slots", current_->num_loaded);
  return absl::OkStatus();
}

absl::Status ExpertWorker::LoadPlacement(const PlacementTable& table) {
  MOE_RETURN_IF_ERROR(Prepare(table));
  return Commit(table.epoch());
}

uint64_t ExpertWorker::epoch() const {
  absl::MutexLock lock(&mu_);
  return current_ ? current_->epoch : 0;
}

uint64_t ExpertWorker::prepared_epoch() const {
  absl::MutexLock lock(&mu_);
  return prepared_ ? prepared_->epoch : 0;
}

int64_t ExpertWorker::num_loaded_slots() const {
  absl::MutexLock lock(&mu_);
  return current_ ? current_->num_loaded : 0;
}

size_t ExpertWorker::slot_bytes() const {
  absl::MutexLock lock(&mu_);
  return current_ ? current_->bytes : 0;
}

moe::internal::v1::LoadReport ExpertWorker::TakeLoadReport() {
  moe::internal::v1::LoadReport report;
  std::shared_ptr<EpochState> state;
  {
    absl::MutexLock lock(&mu_);
    state = current_;
    report.set_steps(steps_since_report_);
    steps_since_report_ = 0;
  }
  if (state == nullptr) return report;
  report.set_placement_epoch(state->epoch);
  for (size_t i = 0; i < state->num_tokens_entries; ++i) {
    report.add_slot_tokens(state->tokens[i].exchange(0));
  }
  return report;
}

void ExpertWorker::Submit(std::shared_ptr<const Dispatch> dispatch, Done done) {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      queue_.push_back({std::move(dispatch), std::move(done)});
      return;
    }
  }
  std::move(done)(absl::UnavailableError(
      absl::StrCat("expert rank ", options_.rank, " is shutting down")));
}

void ExpertWorker::Stop() {
  std::deque<Pending> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && !compute_thread_.joinable()) return;
    stopping_ = true;
    dropped.swap(queue_);
  }
  for (Pending& p : dropped) {
    std::move(p.done)(absl::UnavailableError(
        absl::StrCat("expert rank ", options_.rank, " is shutting down")));
  }
  if (compute_thread_.joinable()) compute_thread_.join();
}

absl::StatusOr<std::shared_ptr<ExpertWorker::EpochState>> ExpertWorker::StateFor(
    const DispatchMeta& meta) {
  const uint64_t served = current_ ? current_->epoch : 0;
  if (current_ != nullptr && meta.epoch == current_->epoch) return current_;
  if (previous_ != nullptr && meta.epoch == previous_->epoch &&
      meta.step_id <= previous_last_step_) {
    return previous_;  // a step that reached this rank before the flip finishes on it
  }
  if (current_ == nullptr) return StaleEpochError(meta.epoch, 0, "no placement loaded yet");
  if (prepared_ != nullptr && meta.epoch == prepared_->epoch) {
    return StaleEpochError(meta.epoch, served, "prepared, not committed yet");
  }
  return StaleEpochError(meta.epoch, served);
}

void ExpertWorker::ComputeLoop() {
  while (true) {
    std::vector<Pending> batch;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;  // Stop() fails what is queued
      if (options_.gather_window > absl::ZeroDuration() && options_.expected_sources > 1) {
        const DispatchMeta head = queue_.front().dispatch->meta;
        auto all_sources = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          if (stopping_) return true;
          std::vector<int32_t> sources;
          for (const Pending& p : queue_) {
            const DispatchMeta& m = p.dispatch->meta;
            if (m.step_id == head.step_id && m.layer == head.layer &&
                std::find(sources.begin(), sources.end(), m.source_rank) == sources.end()) {
              sources.push_back(m.source_rank);
            }
          }
          return static_cast<int>(sources.size()) >= options_.expected_sources;
        };
        mu_.AwaitWithTimeout(absl::Condition(&all_sources), options_.gather_window);
        if (stopping_) return;
      }
      batch.reserve(queue_.size());
      for (Pending& p : queue_) batch.push_back(std::move(p));
      queue_.clear();
    }
    // Groups by (epoch, layer, step), in order of first arrival.
    std::vector<std::vector<Pending>> groups;
    std::map<std::tuple<uint64_t, int32_t, uint64_t>, size_t> group_of;
    for (Pending& p : batch) {
      const DispatchMeta& m = p.dispatch->meta;
      auto [it, inserted] = group_of.emplace(std::make_tuple(m.epoch, m.layer, m.step_id),
                                             groups.size());
      if (inserted) groups.emplace_back();
      groups[it->second].push_back(std::move(p));
    }
    for (std::vector<Pending>& group : groups) RunGroup(std::move(group));
  }
}

void ExpertWorker::RunGroup(std::vector<Pending> group) {
  const DispatchMeta meta = group.front().dispatch->meta;
  absl::StatusOr<std::shared_ptr<EpochState>> state_or;
  {
    absl::MutexLock lock(&mu_);
    state_or = StateFor(meta);
    if (state_or.ok()) {
      if (meta.step_id != last_counted_step_) {
        ++steps_since_report_;
        last_counted_step_ = meta.step_id;
      }
      max_step_seen_ = std::max(max_step_seen_, meta.step_id);
    }
  }
  if (!state_or.ok()) {
    metrics_->Answered(state_or.status().code(), static_cast<int64_t>(group.size()));
    for (Pending& p : group) std::move(p.done)(state_or.status());
    return;
  }
  const EpochState& state = **state_or;
  const int layer = meta.layer;
  const int64_t hidden = model_config_.hidden_size;
  if (!state.index.is_moe_layer(layer)) {
    metrics_->Answered(absl::StatusCode::kInvalidArgument, static_cast<int64_t>(group.size()));
    for (Pending& p : group) {
      std::move(p.done)(absl::InvalidArgumentError(
          absl::StrCat("expert rank ", options_.rank, ": layer ", layer, " is not a MoE layer")));
    }
    return;
  }
  const std::vector<kernels::SwigluWeights>& slots = state.slots[layer];  // [slots_per_rank]
  const int64_t spr = static_cast<int64_t>(slots.size());
  // Per-dispatch checks; the bad ones fail alone.
  std::vector<Pending> valid;
  valid.reserve(group.size());
  for (Pending& p : group) {
    const Dispatch& d = *p.dispatch;
    absl::Status bad;
    if (d.hidden() != hidden) {
      bad = absl::InvalidArgumentError(absl::StrCat("dispatch rows have hidden size ", d.hidden(),
                                                    ", the model's is ", hidden));
    }
    const int64_t n = d.num_rows(), k = d.num_choices();
    const int32_t* ids = d.slots.data_as<int32_t>();  // [n, k]
    for (int64_t i = 0; bad.ok() && i < n * k; ++i) {
      const int32_t s = ids[i];
      if (s == -1) continue;
      if (s < 0 || s >= spr) {
        bad = absl::InvalidArgumentError(absl::StrCat("slot ", s, " of layer ", layer,
                                                      " is outside [0, ", spr, ") on expert rank ",
                                                      options_.rank));
      } else if (slots[s].gate.empty()) {
        bad = absl::NotFoundError(absl::StrCat("slot ", s, " of layer ", layer,
                                               " is not loaded on expert rank ", options_.rank,
                                               " (epoch ", state.epoch, ")"));
      }
    }
    if (bad.ok()) {
      valid.push_back(std::move(p));
    } else {
      metrics_->Answered(bad.code());
      std::move(p.done)(bad);
    }
  }
  if (valid.empty()) return;

  // One ExpertFfn over the rows of every valid dispatch: x [N, H], ids/weights [N, K].
  int64_t total = 0, kmax = 0;
  for (const Pending& p : valid) {
    total += p.dispatch->num_rows();
    kmax = std::max(kmax, p.dispatch->num_choices());
  }
  Tensor merged_x, merged_ids, merged_w;
  TensorView x, ids, w;
  if (valid.size() == 1) {
    const Dispatch& d = *valid.front().dispatch;
    x = d.rows.view();
    ids = d.slots.view();
    w = d.weights.view();
  } else {
    merged_x = Tensor(DType::kF32, {total, hidden});
    merged_ids = Tensor(DType::kI32, {total, kmax});
    merged_w = Tensor(DType::kF32, {total, kmax});
    std::fill_n(merged_ids.data_as<int32_t>(), total * kmax, -1);
    int64_t row = 0;
    for (const Pending& p : valid) {
      const Dispatch& d = *p.dispatch;
      const int64_t n = d.num_rows(), k = d.num_choices();
      std::memcpy(merged_x.data_as<float>() + row * hidden, d.rows.data(), n * hidden * sizeof(float));
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(merged_ids.data_as<int32_t>() + (row + i) * kmax,
                    d.slots.data_as<int32_t>() + i * k, k * sizeof(int32_t));
        std::memcpy(merged_w.data_as<float>() + (row + i) * kmax,
                    d.weights.data_as<float>() + i * k, k * sizeof(float));
      }
      row += n;
    }
    x = merged_x.view();
    ids = merged_ids.view();
    w = merged_w.view();
  }
  Tensor out(DType::kF32, {total, hidden});  // zeroed; ExpertFfn accumulates
  absl::Status ran = total == 0 ? absl::OkStatus()
                                : kernels::ExpertFfn({.x = x,
                                                      .topk_ids = ids,
                                                      .topk_weights = w,
                                                      .experts = &slots,
                                                      .out = out.view()});
  num_ffn_calls_.fetch_add(1);
  if (metrics_->ffn_calls) metrics_->ffn_calls->Inc();
  metrics_->Answered(ran.code(), static_cast<int64_t>(valid.size()));
  if (!ran.ok()) {
    MOE_LOG(ERROR) << "expert FFN failed" << common::Kv("layer", layer)
                   << common::Kv("step", meta.step_id) << ": " << ran.message();
    for (Pending& p : valid) std::move(p.done)(ran);
    return;
  }
  if (metrics_->rows) metrics_->rows->Inc(static_cast<double>(total));
  // Per-slot token counts.
  const int32_t* id_data = ids.data_as<int32_t>();
  const int64_t kk = ids.dim(1);
  for (int64_t i = 0; i < total * kk; ++i) {
    if (id_data[i] >= 0) {
      state.tokens[state.index.SlotTokenIndex(layer, id_data[i])].fetch_add(
          1, std::memory_order_relaxed);
    }
  }
  if (valid.size() == 1) {
    std::move(valid.front().done)(std::move(out));
    return;
  }
  int64_t row = 0;
  for (Pending& p : valid) {
    const int64_t n = p.dispatch->num_rows();
    Tensor part(DType::kF32, {n, hidden});
    std::memcpy(part.data(), out.data_as<float>() + row * hidden, n * hidden * sizeof(float));
    row += n;
    std::move(p.done)(std::move(part));
  }
}

}  // namespace moe::worker
