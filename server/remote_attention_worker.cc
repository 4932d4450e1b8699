#include "server/remote_attention_worker.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "moe/v1/internal.grpc.pb.h"

namespace moe::server {

namespace pb = ::moe::internal::v1;

absl::StatusOr<std::unique_ptr<RemoteAttentionMetrics>> RemoteAttentionMetrics::Create(
    common::MetricsRegistry* registry) {
  common::MetricsRegistry& reg = registry != nullptr ? *registry : common::DefaultMetricsRegistry();
  auto m = std::make_unique<RemoteAttentionMetrics>();
  const std::vector<double> bounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                      0.1,    0.25,  0.5,    1.0,   2.5,  5.0,   10.0};
  MOE_ASSIGN_OR_RETURN(m->forward,
                       reg.AddHistogram("moe_worker_forward_seconds",
                                        "Model forward of one step on an attention worker.",
                                        {"rank"}, bounds));
  MOE_ASSIGN_OR_RETURN(
      m->dispatch,
      reg.AddHistogram("moe_worker_dispatch_combine_seconds",
                       "Part of a step's forward an attention worker spent dispatching to and "
                       "waiting on expert ranks (all MoE layers).",
                       {"rank"}, bounds));
  MOE_ASSIGN_OR_RETURN(m->bytes, reg.AddCounter("moe_worker_dispatch_bytes_total",
                                                "Dispatch and combine bytes an attention "
                                                "worker moved.",
                                                {"rank"}));
  return m;
}

struct RemoteAttentionWorker::Stub {
  std::unique_ptr<pb::AttentionWorker::Stub> stub;
};

RemoteAttentionWorker::RemoteAttentionWorker(const RemoteAttentionWorkerOptions& options)
    : options_(options), stub_(std::make_unique<Stub>()) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  stub_->stub = pb::AttentionWorker::NewStub(
      grpc::CreateCustomChannel(options.address, grpc::InsecureChannelCredentials(), args));
  if (options.metrics != nullptr) {
    const std::string rank = std::to_string(options.rank);
    if (auto h = options.metrics->forward->WithLabels({rank}); h.ok()) forward_ = *h;
    if (auto h = options.metrics->dispatch->WithLabels({rank}); h.ok()) dispatch_ = *h;
    if (auto c = options.metrics->bytes->WithLabels({rank}); c.ok()) bytes_ = *c;
  }
}

RemoteAttentionWorker::~RemoteAttentionWorker() = default;

absl::StatusOr<StepOutput> RemoteAttentionWorker::Step(const StepInput& input) {
  pb::StepRequest request;
  worker::ToProto(input, &request);
  pb::StepResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.step_timeout)));
  grpc::Status status = stub_->stub->Step(&context, request, &response);
  if (!status.ok()) {
    absl::StatusCode code = static_cast<absl::StatusCode>(status.error_code());
    std::string message = status.error_message();
    if (code == absl::StatusCode::kDeadlineExceeded || code == absl::StatusCode::kUnavailable) {
      // The worker or an expert rank behind it is gone or too slow: the request may succeed
      // later (HTTP 503).
      if (code == absl::StatusCode::kDeadlineExceeded) message += " (deadline exceeded)";
      code = absl::StatusCode::kUnavailable;
    }
    if (message.rfind("attention worker", 0) != 0) {
      message = absl::StrCat("attention worker ", options_.rank, " (", options_.address,
                             "): ", message);
    }
    return absl::Status(code, message);
  }
  MOE_ASSIGN_OR_RETURN(StepOutput out, worker::FromProto(response));
  if (!input.chunks.empty()) {
    if (forward_ != nullptr) forward_->Observe(out.forward_seconds);
    if (dispatch_ != nullptr) dispatch_->Observe(out.dispatch_seconds);
    if (bytes_ != nullptr) bytes_->Inc(static_cast<double>(out.dispatch_bytes));
  }
  return out;
}

}  // namespace moe::server
