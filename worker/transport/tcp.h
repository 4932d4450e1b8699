// The TCP data plane: expert ranks as processes, reached over length-prefixed frames
// (frame.h) on one TCP connection per (sender, rank). Chosen over gRPC streams by
// measurement (README.md in this folder: framed sockets are several times faster for small
// dispatches and move 32x1024 f32 round trips at a higher rate).
//
// TcpTransport (the attention-worker side): connects lazily to rank r's address on the first
// Send (within connect_timeout), writes the dispatch frame (header ‖ rows ‖ slots ‖ weights,
// one sendmsg, no copy for f32) and lets one reader thread per connection match combine
// frames to calls by request id, so several dispatches can be in flight on one connection.
// A refused, reset or closed connection fails every call on it at once with kUnavailable (the
// next Send reconnects); a malformed answer fails with kDataLoss/kInvalidArgument. Every Wait
// is bounded by dispatch_timeout.
//
// TcpServer (the expert-rank side): accepts connections, reads and validates each frame
// (magic, version, bounded shapes, payload length equal to what the shapes imply, checksum)
// and hands the Dispatch to an ExpertEndpoint; the answer is written back from the thread
// that completes it. A malformed frame gets an error frame with its typed code; when the
// stream cannot be trusted any more (bad magic/version, truncation, a length beyond the
// limits) that one connection is closed, every other keeps being served.
//
// Every lost connection, unreachable rank (once per outage) and malformed frame is a WARNING
// log line and a counter (moe_transport_connection_failures_total,
// moe_transport_malformed_frames_total).
//
// Threads: every method is thread-safe. TcpTransport runs one reader thread per open
// connection; TcpServer one accept thread and one thread per connection. Stop()/destructors
// shut sockets down and join their threads; no call blocks past its deadline.
//
//   TcpServer::Options so{.host = "127.0.0.1", .port = 0};
//   MOE_ASSIGN_OR_RETURN(auto server, TcpServer::Start(so, worker.get()));
//   TcpTransport transport({.peers = {server->address()}});
//   CallId call = transport.Send(0, dispatch);
//   absl::StatusOr<common::Tensor> combine = transport.Wait(call);
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/transport/frame.h"
#include "worker/transport/internal/call_table.h"
#include "worker/transport/transport.h"

namespace moe::worker {

struct TcpTransportOptions {
  // host:port of each expert rank's data plane, indexed by rank ("" = unknown yet).
  std::vector<std::string> peers;
  absl::Duration connect_timeout = absl::Seconds(2);  // timeouts.connect_timeout_ms
  absl::Duration dispatch_timeout = absl::Seconds(5);  // timeouts.dispatch_timeout_ms
  // Rows and combines on the wire: f32 (exact) or bf16 (half the bytes, rounds the rows).
  frame::WireDType wire_dtype = frame::WireDType::kF32;
  frame::FrameLimits limits;
};

class TcpTransport : public Transport {
 public:
  explicit TcpTransport(TcpTransportOptions options);
  ~TcpTransport() override;

  // Sets (or changes, after a membership change) the address of `rank`; an open connection
  // to the old address is closed.
  void SetPeer(int rank, const std::string& address) ABSL_LOCKS_EXCLUDED(mu_);

  CallId Send(int rank, std::shared_ptr<const Dispatch> dispatch) override;
  absl::StatusOr<common::Tensor> Wait(CallId call, absl::Time deadline) override;
  using Transport::Wait;

 private:
  struct Connection;
  struct Peer;
  Peer* GetPeer(int rank) ABSL_LOCKS_EXCLUDED(mu_);
  void ReaderLoop(std::shared_ptr<Connection> conn);

  const TcpTransportOptions options_;
  internal::CallTable calls_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Peer>> peers_ ABSL_GUARDED_BY(mu_);
};

class TcpServer {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 0;  // 0 = any free port
    // Longest a frame may take to arrive once its header has (a stalled sender is cut off).
    absl::Duration io_timeout = absl::Seconds(5);
    frame::FrameLimits limits;
  };

  // Binds, listens and starts serving `endpoint` (not owned; must outlive Stop()).
  static absl::StatusOr<std::unique_ptr<TcpServer>> Start(const Options& options,
                                                          ExpertEndpoint* endpoint);
  ~TcpServer();

  int port() const { return port_; }
  // host:port clients connect to.
  std::string address() const;
  // Closes the listener and every connection, joins the threads. Idempotent.
  void Stop();
  // Frames rejected as malformed since Start (for tests and metrics).
  int64_t num_malformed_frames() const { return num_malformed_.load(); }

 private:
  struct Conn;
  TcpServer(const Options& options, ExpertEndpoint* endpoint) : options_(options), endpoint_(endpoint) {}
  void AcceptLoop();
  void ConnLoop(std::shared_ptr<Conn> conn);

  const Options options_;
  ExpertEndpoint* const endpoint_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> num_malformed_{0};
  std::thread accept_thread_;

  struct ConnThread {
    std::shared_ptr<Conn> conn;
    std::thread thread;
  };
  absl::Mutex mu_;
  std::vector<ConnThread> conns_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::worker
