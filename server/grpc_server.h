// GrpcServer: the public gRPC API (proto/moe/v1/serving.proto, service moe.v1.MoeServe) in
// front of an Engine, next to the standard grpc.health.v1 Health service and server
// reflection on the same port.
//
// Semantics follow the HTTP API (http_server.h): the same parameter checks
// (request_validation.h) and the same errors, as gRPC status codes:
//   INVALID_ARGUMENT    an out-of-range or missing field; the message starts with its path
//                       ("sampling.top_p: must be in (0, 1], got 1.5", "prompt: ...")
//   NOT_FOUND           an unknown model; Abort of a request id that is not running
//   ALREADY_EXISTS      Generate with the request_id of a request still running
//   RESOURCE_EXHAUSTED  the engine's waiting queue is full (HTTP 429)
//   UNAVAILABLE         loading, draining, or the engine died (HTTP 503)
//   UNAUTHENTICATED     server.api_key is set and the `authorization: Bearer <key>`
//                       metadata is missing or wrong (every moe.v1 method; health and
//                       reflection stay open, as /health does)
//   CANCELLED           the client cancelled the call or its deadline passed; the engine
//                       request is cancelled with it
// Generate streams one GenerateResponse per engine delta; the last one carries
// finish_reason ("stop", "length", "abort") and usage. A request that Abort cancels ends
// with finish_reason "abort" and status OK, as HTTP does. Health is SERVING while the
// backend is set, not draining and the engine is healthy; NOT_SERVING otherwise.
//
// Threads: gRPC's callback API. Handlers run on gRPC's threads, do only parsing and a
// Submit (which never blocks), and return. One pump thread owned by the server moves each
// Generate call's events from its RequestStream to the wire, one write in flight per call
// (a client that stops reading leaves the RequestStream full, and the engine cancels the
// request, as for HTTP); it also keeps the health status current. Nothing waits on the
// engine thread, and the engine thread never waits on the network.
//
// Lifecycle (as HttpServer): construct, Start() (binds and serves; UNAVAILABLE until
// SetBackend), SetBackend() once the model is loaded, StartDraining() (UNAVAILABLE for new
// calls, running streams go on), Stop() (cancels what is still running after a grace period
// and waits for every call to finish). The Engine and Tokenizer must outlive Stop().
//
//   GrpcServer grpc({.host = "127.0.0.1", .port = 0, .served_model_name = "tiny"});
//   MOE_ASSIGN_OR_RETURN(int port, grpc.Start());
//   grpc.SetBackend({.engine = engine.get(), .tokenizer = tokenizer.get(), ...});
//   ...
//   grpc.StartDraining();  // wait for the engine to drain
//   grpc.Stop();
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "common/status.h"
#include "model/tokenizer.h"
#include "server/engine.h"

namespace moe::server {

struct GrpcServerOptions {
  std::string host = "127.0.0.1";
  int port = 50051;     // 0: any free port (Start returns it)
  std::string api_key;  // "" = no authentication
  std::string served_model_name = "model";
  int max_message_bytes = 16 << 20;  // largest request accepted
  // How long Stop() lets running calls finish before it cancels them.
  absl::Duration stop_grace = absl::Seconds(1);
};

struct GrpcBackend {
  Engine* engine = nullptr;                     // not owned
  const model::Tokenizer* tokenizer = nullptr;  // not owned
  int max_model_len = 0;
  std::string architecture;  // config.json's, for ListModels
};

class GrpcServer {
 public:
  explicit GrpcServer(GrpcServerOptions options);
  ~GrpcServer();  // Stop()s
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  // Binds host:port and starts serving (UNAVAILABLE until SetBackend). Returns the port
  // (the chosen one when options.port is 0); Unavailable when it cannot be bound. Call once.
  absl::StatusOr<int> Start();
  // Publishes the backend and switches to serving. Call once, after Start.
  void SetBackend(GrpcBackend backend);
  // New calls get UNAVAILABLE and health turns NOT_SERVING; running streams go on.
  void StartDraining();
  // Generate calls not finished yet.
  int num_active() const;
  // Cancels calls still running after options.stop_grace and waits for all. Idempotent.
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::server
