#include "worker/expert/expert_server.h"

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

}  // namespace

class ExpertServer::ControlService final : public pb::ExpertControl::Service {
 public:
  explicit ControlService(ExpertWorker* worker) : worker_(worker) {}

  grpc::Status PreparePlacement(grpc::ServerContext*, const pb::PlacementTable* table,
                                pb::PrepareResponse* response) override {
    response->set_epoch(table->epoch());
    absl::Status status = worker_->Prepare(*table);
    response->set_ready(status.ok());
    if (!status.ok()) {
      response->set_error(std::string(status.message()));
      MOE_LOG(WARNING) << "prepare failed" << common::Kv("epoch", table->epoch()) << ": "
                       << status.message();
    }
    return grpc::Status::OK;
  }

  grpc::Status CommitPlacement(grpc::ServerContext*, const pb::CommitRequest* request,
                               pb::CommitResponse* response) override {
    absl::Status status = worker_->Commit(request->epoch());
    response->set_epoch(worker_->epoch());
    if (!status.ok()) {
      return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                          std::string(status.message()));
    }
    return grpc::Status::OK;
  }

 private:
  ExpertWorker* const worker_;
};

ExpertServer::ExpertServer(const ExpertServerOptions& options, ExpertWorker* worker)
    : options_(options), worker_(worker) {}

ExpertServer::~ExpertServer() { Stop(); }

std::string ExpertServer::control_address() const {
  return absl::StrCat(options_.advertise_host.empty() ? options_.host : options_.advertise_host,
                      ":", control_port_);
}

std::string ExpertServer::data_address() const {
  return absl::StrCat(options_.advertise_host.empty() ? options_.host : options_.advertise_host,
                      ":", data_->port());
}

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Start(
    const ExpertServerOptions& options, ExpertWorker* worker) {
  std::unique_ptr<ExpertServer> s(new ExpertServer(options, worker));
  MOE_ASSIGN_OR_RETURN(s->data_, TcpServer::Start({.host = options.host,
                                                   .port = options.data_port,
                                                   .io_timeout = options.io_timeout},
                                                  worker));
  s->control_service_ = std::make_unique<ControlService>(worker);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.control_port),
                           grpc::InsecureServerCredentials(), &s->control_port_);
  builder.RegisterService(s->control_service_.get());
  s->control_ = builder.BuildAndStart();
  if (s->control_ == nullptr || s->control_port_ == 0) {
    s->data_->Stop();
    return absl::UnavailableError(absl::StrCat("expert rank ", options.rank,
                                               ": cannot listen for ExpertControl on ",
                                               options.host, ":", options.control_port));
  }
  if (!options.scheduler_address.empty()) {
    s->membership_thread_ = std::thread([p = s.get()] { p->MembershipLoop(); });
  }
  return s;
}

void ExpertServer::Stop() {
  {
    absl::MutexLock lock(&stop_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (membership_thread_.joinable()) membership_thread_.join();
  if (control_) control_->Shutdown(DeadlineAfter(absl::Seconds(1)));
  if (data_) data_->Stop();
}

void ExpertServer::MembershipLoop() {
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
    if (member_id.empty()) {
      pb::RegisterRequest request;
      request.set_role(pb::ROLE_EXPERT);
      request.set_rank(options_.rank);
      request.set_control_address(control_address());
      request.set_data_address(data_address());
      request.set_num_slots(options_.num_slots);
      request.set_version(options_.version);
      request.set_slot_memory_bytes(options_.slot_memory_bytes);
      pb::RegisterResponse response;
      grpc::ClientContext context;
      context.set_deadline(DeadlineAfter(options_.rpc_timeout));
      absl::Status status = FromGrpc(stub->Register(&context, request, &response));
      if (status.ok()) {
        member_id = response.member_id();
        registered_ = true;
        failures = 0;
        MOE_LOG(INFO) << "registered with the scheduler" << common::Kv("member", member_id)
                      << common::Kv("lease_ms", response.lease_ms())
                      << common::Kv("epoch", response.placement().epoch());
        const pb::PlacementTable& table = response.placement();
        if (table.epoch() > worker_->epoch() && options_.rank < table.num_ranks()) {
          if (absl::Status loaded = worker_->LoadPlacement(table); !loaded.ok()) {
            MOE_LOG(WARNING) << "cannot load the placement of the registration"
                             << common::Kv("epoch", table.epoch()) << ": " << loaded.message();
          }
        }
      } else if (failures++ % 20 == 0) {
        MOE_LOG(WARNING) << "cannot register with the scheduler"
                         << common::Kv("address", options_.scheduler_address) << ": "
                         << status.message();
      }
    } else {
      pb::HeartbeatRequest request;
      request.set_member_id(member_id);
      request.set_placement_epoch(worker_->epoch());
      *request.mutable_load() = worker_->TakeLoadReport();
      pb::HeartbeatResponse response;
      grpc::ClientContext context;
      context.set_deadline(DeadlineAfter(options_.rpc_timeout));
      absl::Status status = FromGrpc(stub->Heartbeat(&context, request, &response));
      if (status.ok() && !response.lease_valid()) {
        MOE_LOG(WARNING) << "lease lost; registering again" << common::Kv("member", member_id);
        member_id.clear();
        registered_ = false;
        continue;
      }
      if (status.code() == absl::StatusCode::kNotFound ||
          status.code() == absl::StatusCode::kFailedPrecondition) {
        MOE_LOG(WARNING) << "the scheduler does not know this member; registering again: "
                         << status.message();
        member_id.clear();
        registered_ = false;
        continue;
      }
      if (!status.ok()) {
        if (failures++ % 20 == 0) {
          MOE_LOG(WARNING) << "heartbeat failed" << common::Kv("address", options_.scheduler_address)
                           << ": " << status.message();
        }
      } else {
        failures = 0;
        if (response.latest_placement_epoch() > worker_->epoch() &&
            response.latest_placement_epoch() > worker_->prepared_epoch()) {
          MOE_LOG(DEBUG) << "a newer placement exists"
                         << common::Kv("latest", response.latest_placement_epoch())
                         << common::Kv("served", worker_->epoch());
        }
      }
    }
    if (stopped_within(options_.heartbeat_interval)) return;
  }
}

}  // namespace moe::worker
