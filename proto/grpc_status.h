// Conversions at the gRPC boundary, shared by every gRPC client and service of moe-serve.
//
// absl::StatusCode and grpc::StatusCode use the same numbers, so codes map one to one and
// messages are carried unchanged. DeadlineAfter turns a timeout into the absolute deadline
// grpc::ClientContext::set_deadline takes. Stateless; any thread.
//
//   grpc::ClientContext ctx;
//   ctx.set_deadline(moe::proto::DeadlineAfter(absl::Milliseconds(500)));
//   MOE_RETURN_IF_ERROR(moe::proto::FromGrpc(stub->Heartbeat(&ctx, req, &resp)));
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace moe::proto {

absl::Status FromGrpc(const grpc::Status& status);
grpc::Status ToGrpc(const absl::Status& status);
std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout);

}  // namespace moe::proto
