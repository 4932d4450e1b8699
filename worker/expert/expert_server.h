// ExpertServer: the network face of one expert rank, around an ExpertWorker.
//   - data plane: a TcpServer (frame.h) on data_port serving dispatches;
//   - control plane: a gRPC server on control_port with ExpertControl (PreparePlacement loads
//     the rank's slots of a table beside the served ones, CommitPlacement flips the epoch; a
//     prepare that fails answers ready = false with the error);
//   - membership: when a scheduler address is given, Scheduler.Register (role expert, rank,
//     both addresses, num_slots, version), then a Heartbeat every heartbeat_interval carrying
//     the served epoch and the load report (ExpertWorker::TakeLoadReport). A Register answer
//     that carries a placement listing this rank is loaded at once. A lost lease (or an id the
//     scheduler no longer knows) registers again; an unreachable scheduler is retried every
//     interval, and the rank keeps serving its data plane meanwhile. Every RPC has a deadline
//     (rpc_timeout).
//
// Threads: Start returns once both servers listen; one membership thread runs until Stop.
// Stop (or the destructor) stops membership, the control server and the data server, in that
// order; the ExpertWorker is not owned and must outlive Stop.
//
//   MOE_ASSIGN_OR_RETURN(auto server, ExpertServer::Start({.rank = 0,
//                            .scheduler_address = "127.0.0.1:50060"}, worker.get()));
//   // ... SIGTERM ...
//   server->Stop();
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/expert/expert_worker.h"
#include "worker/transport/tcp.h"

namespace grpc {
class Server;
}

namespace moe::worker {

struct ExpertServerOptions {
  int rank = 0;
  std::string host = "127.0.0.1";  // where both servers listen
  // Host announced to the scheduler (what other processes dial); "" = `host`.
  std::string advertise_host;
  int data_port = 0;     // 0 = any free port
  int control_port = 0;  // 0 = any free port
  // host:port of the scheduler; "" = no scheduler (placements come through ExpertControl or
  // ExpertWorker::LoadPlacement only).
  std::string scheduler_address;
  // Slots this rank offers per MoE layer (RegisterRequest.num_slots; 0 = as configured there).
  int32_t num_slots = 0;
  uint64_t slot_memory_bytes = 0;
  std::string version;
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration rpc_timeout = absl::Seconds(2);
  // Longest a dispatch frame may take to arrive once started (timeouts.dispatch_timeout_ms).
  absl::Duration io_timeout = absl::Seconds(5);
};

class ExpertServer {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Start(const ExpertServerOptions& options,
                                                             ExpertWorker* worker);
  ~ExpertServer();

  // host:port as announced (advertise_host, else host, and the bound port).
  std::string data_address() const;
  std::string control_address() const;
  // True once a Register call succeeded (and the lease has not been lost since).
  bool registered() const { return registered_.load(); }
  void Stop();

 private:
  class ControlService;
  ExpertServer(const ExpertServerOptions& options, ExpertWorker* worker);
  void MembershipLoop();

  const ExpertServerOptions options_;
  ExpertWorker* const worker_;
  std::unique_ptr<TcpServer> data_;
  std::unique_ptr<ControlService> control_service_;
  std::unique_ptr<grpc::Server> control_;
  int control_port_ = 0;
  std::atomic<bool> registered_{false};
  std::thread membership_thread_;
  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
};

}  // namespace moe::worker
