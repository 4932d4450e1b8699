#include "worker/attention/attention_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "proto/grpc_status.h"
#include "moe/v1/internal.grpc.pb.h"

namespace moe::worker {

namespace pb = ::moe::internal::v1;

namespace {

using ::moe::proto::DeadlineAfter;
using ::moe::proto::FromGrpc;
using ::moe::proto::ToGrpc;

// Failures a newer placement can repair (another replica, the rank's new address).
bool Repairable(const absl::Status& s) {
  return s.code() == absl::StatusCode::kFailedPrecondition ||
         s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded;
}

}  // namespace

class AttentionServer::StepService final : public pb::AttentionWorker::Service {
 public:
  explicit StepService(AttentionServer* server) : server_(server) {}

  grpc::Status Step(grpc::ServerContext*, const pb::StepRequest* request,
                    pb::StepResponse* response) override {
    absl::StatusOr<StepInput> input = FromProto(*request);
    if (!input.ok()) return ToGrpc(input.status());
    absl::StatusOr<StepOutput> output = server_->RunStep(*input);
    if (!output.ok()) {
      return ToGrpc(absl::Status(output.status().code(),
                                 absl::StrCat("attention worker ", server_->options_.rank,
                                              ", step ", input->step_id, ": ",
                                              output.status().message())));
    }
    ToProto(*output, response);
    return grpc::Status::OK;
  }

 private:
  AttentionServer* const server_;
};

AttentionServer::AttentionServer(const AttentionServerOptions& options, model::Model* model)
    : options_(options), model_(model), runner_(*model) {}

AttentionServer::~AttentionServer() { Stop(); }

std::string AttentionServer::address() const {
  const size_t colon = options_.listen_address.rfind(':');
  return absl::StrCat(options_.listen_address.substr(0, colon), ":", port_);
}

absl::StatusOr<std::unique_ptr<AttentionServer>> AttentionServer::Start(
    const AttentionServerOptions& options, model::Model* model) {
  if (model == nullptr) return absl::InvalidArgumentError("model: must not be null");
  if (options.scheduler_address.empty()) {
    return absl::InvalidArgumentError("scheduler_address: an attention worker needs a scheduler");
  }
  if (options.listen_address.rfind(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen_address: \"", options.listen_address, "\" is not host:port"));
  }
  std::unique_ptr<AttentionServer> s(new AttentionServer(options, model));
  common::MetricsRegistry& reg =
      options.metrics != nullptr ? *options.metrics : common::DefaultMetricsRegistry();
  auto dc = reg.AddHistogram(
      "moe_dispatch_combine_seconds",
      "Time one MoE layer of a step spends dispatching rows to the expert ranks and waiting "
      "for and summing their combines.",
      {}, {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0});
  auto fwd = reg.AddHistogram("moe_attention_forward_seconds",
                              "Model forward of one step on this attention worker.", {},
                              {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                               2.5, 5.0, 10.0});
  auto bytes = reg.AddCounter("moe_dispatch_bytes_total",
                              "Bytes of dispatch and combine frames moved by this worker.");
  if (dc.ok() && fwd.ok() && bytes.ok()) {
    s->metrics_ = {.dispatch_combine = &(*dc)->Get(),
                   .forward = &(*fwd)->Get(),
                   .bytes = &(*bytes)->Get()};
  } else {
    MOE_LOG(WARNING) << "attention worker metrics are off (registered twice in this process)";
  }
  s->transport_ = std::make_unique<TcpTransport>(TcpTransportOptions{
      .connect_timeout = options.connect_timeout, .dispatch_timeout = options.dispatch_timeout});
  s->executor_ = std::make_unique<RemoteExpertExecutor>(
      model->config(), RemoteExpertExecutorOptions{
                           .transport = s->transport_.get(),
                           .source_rank = options.rank,
                           .dispatch_combine_seconds = s->metrics_.dispatch_combine});
  model->SetExpertExecutor(s->executor_.get());

  s->service_ = std::make_unique<StepService>(s.get());
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->service_.get());
  // Block tables and prompts of a large batch exceed gRPC's 4 MiB default.
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    model->SetExpertExecutor(nullptr);
    return absl::UnavailableError(absl::StrCat("attention worker ", options.rank,
                                               ": cannot listen on ", options.listen_address));
  }
  s->membership_thread_ = std::thread([p = s.get()] { p->MembershipLoop(); });
  return s;
}

void AttentionServer::Stop() {
  {
    absl::MutexLock lock(&stop_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (membership_thread_.joinable()) membership_thread_.join();
  if (server_) server_->Shutdown(DeadlineAfter(options_.dispatch_timeout + absl::Seconds(1)));
  if (model_ != nullptr) model_->SetExpertExecutor(nullptr);
}

absl::StatusOr<StepOutput> AttentionServer::RunStep(const StepInput& input) {
  absl::MutexLock lock(&step_mu_);
  runner_.Apply(input);
  if (input.chunks.empty()) return StepOutput{.step_id = input.step_id};
  if (executor_->epoch() == 0) {
    absl::StatusOr<uint64_t> epoch = RefreshPlacement();
    if (!epoch.ok() || *epoch == 0) {
      absl::MutexLock rlock(&refresh_mu_);
      return absl::UnavailableError(absl::StrCat(
          "no expert placement yet (",
          !epoch.ok() ? std::string(epoch.status().message()) : not_ready_reason_, ")"));
    }
  }
  const RemoteExpertStats before = executor_->stats();
  absl::StatusOr<StepOutput> out;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const uint64_t epoch = executor_->epoch();
    executor_->SetNextStepId(input.step_id);
    out = runner_.Compute(input);
    if (out.ok() || !Repairable(out.status()) || attempt > 0) break;
    absl::StatusOr<uint64_t> fresh = RefreshPlacement();
    if (!fresh.ok() || *fresh == epoch) break;
    MOE_LOG(WARNING) << "step failed on placement epoch " << epoch << "; computing it again on "
                     << *fresh << common::Kv("step", input.step_id) << ": "
                     << out.status().message();
  }
  if (!out.ok()) return out;
  const RemoteExpertStats& after = executor_->stats();
  out->dispatch_seconds = after.dispatch_combine_seconds - before.dispatch_combine_seconds;
  out->dispatch_bytes = static_cast<uint64_t>(after.bytes_sent - before.bytes_sent +
                                              after.bytes_received - before.bytes_received);
  if (metrics_.forward != nullptr) {
    metrics_.forward->Observe(out->forward_seconds);
    metrics_.bytes->Inc(static_cast<double>(out->dispatch_bytes));
  }
  return out;
}

absl::StatusOr<uint64_t> AttentionServer::RefreshPlacement() {
  absl::MutexLock lock(&refresh_mu_);
  auto channel = grpc::CreateChannel(options_.scheduler_address, grpc::InsecureChannelCredentials());
  std::unique_ptr<pb::Scheduler::Stub> stub = pb::Scheduler::NewStub(channel);
  pb::ClusterStatus status;
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(options_.rpc_timeout));
    MOE_RETURN_IF_ERROR(
        FromGrpc(stub->GetClusterStatus(&context, pb::GetClusterStatusRequest(), &status)));
  }
  not_ready_reason_ = status.ready() ? "" : status.reason();
  pb::PlacementTable table;
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineAfter(options_.rpc_timeout));
    MOE_RETURN_IF_ERROR(FromGrpc(stub->GetPlacement(&context, pb::GetPlacementRequest(), &table)));
  }
  for (const pb::MemberStatus& m : status.members()) {
    if (m.role() != pb::ROLE_EXPERT || m.data_address().empty()) continue;
    std::string& known = peers_[m.rank()];
    if (known != m.data_address()) {
      known = m.data_address();
      transport_->SetPeer(m.rank(), known);
      MOE_LOG(INFO) << "expert rank data address" << common::Kv("rank", m.rank())
                    << common::Kv("address", known);
    }
  }
  if (table.epoch() > executor_->epoch()) {
    MOE_RETURN_IF_ERROR(executor_->SetPlacement(table));
    MOE_LOG(INFO) << "placement installed" << common::Kv("epoch", table.epoch())
                  << common::Kv("expert_ranks", table.num_ranks())
                  << common::Kv("slots_per_rank", table.slots_per_rank());
  }
  return executor_->epoch();
}

void AttentionServer::MembershipLoop() {
  auto channel = grpc::CreateChannel(options_.scheduler_address, grpc::InsecureChannelCredentials());
  std::unique_ptr<pb::Scheduler::Stub> stub = pb::Scheduler::NewStub(channel);
  std::string member_id;
  int failures = 0;
  auto stopped_within = [this](absl::Duration d) {
    absl::MutexLock lock(&stop_mu_);
    auto is_stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(stop_mu_) { return stopping_; };
    stop_mu_.AwaitWithTimeout(absl::Condition(&is_stopping), d);
    return stopping_;
  };
  while (true) {
    uint64_t latest = 0;
    if (member_id.empty()) {
      pb::RegisterRequest request;
      request.set_role(pb::ROLE_ATTENTION);
      request.set_rank(options_.rank);
      request.set_control_address(options_.advertise_address.empty() ? address()
                                                                      : options_.advertise_address);
      request.set_version(options_.version);
      pb::RegisterResponse response;
      grpc::ClientContext context;
      context.set_deadline(DeadlineAfter(options_.rpc_timeout));
      absl::Status status = FromGrpc(stub->Register(&context, request, &response));
      if (status.ok()) {
        member_id = response.member_id();
        registered_ = true;
        failures = 0;
        latest = response.placement().epoch();
        MOE_LOG(INFO) << "registered with the scheduler" << common::Kv("member", member_id)
                      << common::Kv("lease_ms", response.lease_ms())
                      << common::Kv("epoch", latest);
      } else if (failures++ % 20 == 0) {
        MOE_LOG(WARNING) << "cannot register with the scheduler"
                         << common::Kv("address", options_.scheduler_address) << ": "
                         << status.message();
      }
    } else {
      pb::HeartbeatRequest request;
      request.set_member_id(member_id);
      request.set_placement_epoch(executor_->epoch());
      pb::HeartbeatResponse response;
      grpc::ClientContext context;
      context.set_deadline(DeadlineAfter(options_.rpc_timeout));
      absl::Status status = FromGrpc(stub->Heartbeat(&context, request, &response));
      if ((status.ok() && !response.lease_valid()) ||
          status.code() == absl::StatusCode::kNotFound ||
          status.code() == absl::StatusCode::kFailedPrecondition) {
        MOE_LOG(WARNING) << "lease lost; registering again" << common::Kv("member", member_id);
        member_id.clear();
        registered_ = false;
        continue;
      }
      if (!status.ok()) {
        if (failures++ % 20 == 0) {
          MOE_LOG(WARNING) << "heartbeat failed"
                           << common::Kv("address", options_.scheduler_address) << ": "
                           << status.message();
        }
      } else {
        failures = 0;
        latest = response.latest_placement_epoch();
      }
    }
    if (latest > executor_->epoch()) {
      if (absl::StatusOr<uint64_t> e = RefreshPlacement(); !e.ok()) {
        MOE_LOG(WARNING) << "cannot fetch placement epoch " << latest << ": "
                         << e.status().message();
      }
    }
    if (stopped_within(options_.heartbeat_interval)) return;
  }
}

}  // namespace moe::worker
