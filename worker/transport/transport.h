// The data plane between attention workers and expert ranks: dispatch rows to the rank that
// holds their experts, get back the combine (the gate-weighted sum of those experts' outputs).
//
// One MoE layer of one step, seen from an attention worker:
//   for each expert rank r with work:  call[r] = transport.Send(r, dispatch[r]);
//   ... compute the shared expert meanwhile ...
//   for each r:  combine[r] = transport.Wait(call[r], deadline);   // [n_r, H] f32
//   out[token] += combine[r][row]   for every row of every rank
//
// A Dispatch carries (step id, layer, placement epoch, source rank), rows [n, H] f32 and per
// row up to k (slot, gate weight) pairs naming the slots *of that rank* the row goes through
// (slot -1 = unused position). The expert rank answers with [n, H] f32, row i =
// Σ_j weights[i, j] · expert_{slots[i, j]}(rows[i]): combining on the expert side sends back
// one row per dispatched row, whatever k is.
//
// Errors (what Wait returns, codes as gRPC means them):
//   kUnavailable        the peer is dead or unreachable (connection refused, reset, closed,
//                       no endpoint registered); fails fast, never waits for the deadline.
//   kDeadlineExceeded   no combine before the deadline (at most the transport's
//                       dispatch_timeout after Send; every Wait is bounded).
//   kFailedPrecondition the dispatch names a placement epoch the rank does not serve; the
//                       rank's current epoch travels in the status (WorkerEpochFromStatus),
//                       so the caller can refetch the placement.
//   kNotFound           a slot that is not loaded on the rank; kInvalidArgument for a slot
//                       or layer outside the rank's table or a shape the rank cannot take.
//   kDataLoss           a malformed frame (bad magic, checksum, truncated); kInvalidArgument
//                       for lengths that do not match the shapes. Only that call (and, for a
//                       stream that cannot be resynchronised, that one connection) fails.
//
// Ownership: a Dispatch is shared (std::shared_ptr<const Dispatch>) between the caller and
// the transport, so the in-process backend hands the very same buffers to the expert rank
// (zero copy) and an abandoned call never leaves a dangling pointer. The combine is a Tensor
// owned by whoever Wait returns it to.
//
// Threads: Send and Wait may be called from any thread; each call id is waited on at most
// once (Wait consumes it). ExpertEndpoint::Submit must not block: it queues the work and
// calls `done` exactly once, later, from any thread.
//
//   auto d = std::make_shared<Dispatch>(Dispatch::Allocate(
//       {.step_id = 7, .epoch = 3, .layer = 1, .source_rank = 0}, /*rows=*/2, hidden, /*k=*/2));
//   // fill d->rows [2, H], d->slots [2, 2] (-1 = none), d->weights [2, 2]
//   CallId call = transport.Send(/*rank=*/1, d);
//   absl::StatusOr<common::Tensor> combine = transport.Wait(call, absl::Now() + absl::Seconds(1));
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/tensor.h"

namespace moe::worker {

// Identifies the step, layer and placement a dispatch belongs to.
struct DispatchMeta {
  uint64_t step_id = 0;
  uint64_t epoch = 0;       // placement epoch the sender routed with
  int32_t layer = 0;        // decoder layer index
  int32_t source_rank = 0;  // attention worker rank
};

// Rows for one expert rank, one layer, one step.
struct Dispatch {
  DispatchMeta meta;
  common::Tensor rows;     // [n, H] f32
  common::Tensor slots;    // [n, k] i32: slot on the receiving rank, -1 = unused
  common::Tensor weights;  // [n, k] f32: gate weight of each (row, slot)

  // Buffers for n rows of width `hidden` with k pairs each; slots start at -1, weights at 0.
  static Dispatch Allocate(const DispatchMeta& meta, int64_t num_rows, int64_t hidden,
                           int64_t num_choices);

  int64_t num_rows() const { return rows.shape().empty() ? 0 : rows.shape()[0]; }
  int64_t hidden() const { return rows.shape().size() < 2 ? 0 : rows.shape()[1]; }
  int64_t num_choices() const { return slots.shape().size() < 2 ? 0 : slots.shape()[1]; }

  // Shapes and dtypes agree (rows f32 [n, H], slots i32 [n, k], weights f32 [n, k], n >= 0,
  // H > 0, k > 0). kInvalidArgument naming the field otherwise.
  absl::Status Validate() const;
};

using CallId = uint64_t;

// Dispatch/combine towards expert ranks. Implementations: InprocTransport (inproc.h),
// TcpTransport (tcp.h).
class Transport {
 public:
  virtual ~Transport() = default;

  // Starts sending `dispatch` to expert rank `rank` and returns at once (a socket backend may
  // spend up to its connect timeout connecting). Errors are reported by Wait.
  virtual CallId Send(int rank, std::shared_ptr<const Dispatch> dispatch) = 0;

  // The combine of `call`, [n, H] f32, or the typed error above. Returns by `deadline` or by
  // the transport's dispatch timeout after Send, whichever comes first. Consumes the call id:
  // a second Wait on it is kInvalidArgument.
  virtual absl::StatusOr<common::Tensor> Wait(CallId call, absl::Time deadline) = 0;
  // Wait bounded by the dispatch timeout alone.
  absl::StatusOr<common::Tensor> Wait(CallId call) { return Wait(call, absl::InfiniteFuture()); }
};

// The serving side: an expert rank (or a test double) that turns dispatches into combines.
class ExpertEndpoint {
 public:
  using Done = absl::AnyInvocable<void(absl::StatusOr<common::Tensor>) &&>;

  virtual ~ExpertEndpoint() = default;

  // Takes one dispatch (already shape-validated by the transport). Must not block; calls
  // `done` exactly once with the combine [n, H] f32 or a typed error, from any thread,
  // possibly before returning.
  virtual void Submit(std::shared_ptr<const Dispatch> dispatch, Done done) = 0;
};

// kFailedPrecondition for a dispatch routed with `request_epoch` to a rank serving
// `worker_epoch`; the worker's epoch rides along as a status payload (and in the message).
absl::Status StaleEpochError(uint64_t request_epoch, uint64_t worker_epoch,
                             std::string_view detail = {});
// The epoch a StaleEpochError carries; nullopt for any other status.
std::optional<uint64_t> WorkerEpochFromStatus(const absl::Status& status);
// Adds the worker-epoch payload to `status` (used when a status is rebuilt from a frame).
void SetWorkerEpoch(absl::Status& status, uint64_t worker_epoch);

}  // namespace moe::worker
