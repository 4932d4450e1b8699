// HttpServer: the OpenAI-compatible HTTP API in front of an Engine (cpp-httplib).
//
// Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE with
// stream: true), GET /v1/models, POST /tokenize, POST /detokenize, GET /health (empty 200
// while serving; 503 while loading, draining or once the engine died), GET /metrics
// (Prometheus text 0.0.4 of the process-wide registry), GET /v1/cluster (the frontend role:
// ranks, slots, placement; see HttpBackend::cluster_status).
// Errors carry OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for bad
// JSON or an out-of-range field (param names it), 401 without the API key (when
// server.api_key is set; /v1/* only), 404 for an unknown model or route, 405 for a known
// route with the wrong method, 413 for a body over max_body_bytes, 429 when the engine's
// waiting queue is full, 503 while loading or draining.
//
// Threads: httplib runs each connection on a handler thread of its pool
// (HttpServerOptions::num_threads). A handler only parses, submits to the Engine (which
// never blocks) and then waits on its RequestStream; the engine thread never waits for a
// handler. A streaming client that disconnects cancels its request (the write fails, the
// stream is cancelled); a non-streaming request runs to its end (cpp-httplib 0.11 cannot
// tell that a waiting connection closed), bounded by max_tokens / max_model_len.
//
// Lifecycle: construct, Bind() (the port, also when 0 was asked), Start() (accepting;
// answers 503 until SetBackend), SetBackend() once the model is loaded, StartDraining()
// (503 for new requests, in-flight ones go on), Stop() once num_active() is 0 (closes the
// listener, waits for the handler threads). The Engine and Tokenizer passed to SetBackend must outlive Stop().
//
//   HttpServer http({.host = "127.0.0.1", .port = 0, .served_model_name = "tiny"});
//   MOE_ASSIGN_OR_RETURN(int port, http.Bind());
//   http.Start();
//   http.SetBackend({.engine = engine.get(), .tokenizer = tokenizer.get(), ...});
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "common/metrics.h"
#include "common/status.h"
#include "model/tokenizer.h"
#include "server/chat_template.h"
#include "server/engine.h"

namespace httplib {
class Server;
}

namespace moe::server {

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;  // 0: any free port (see Bind)
  std::string api_key;  // "" = no authentication
  int64_t max_body_bytes = 16 << 20;
  std::string served_model_name = "model";
  int num_threads = 256;  // connection handler threads
  // Registry rendered on /metrics (null: the process-wide one).
  common::MetricsRegistry* metrics = nullptr;
};

struct HttpBackend {
  Engine* engine = nullptr;                    // not owned
  const model::Tokenizer* tokenizer = nullptr;  // not owned
  std::optional<ChatTemplate> chat_template;   // none: /v1/chat/completions answers 400
  int max_model_len = 0;
  // Expert-parallel cluster (the frontend role). ready: /health is 200 only while it is
  // true; cluster_status: the JSON body of GET /v1/cluster. Null: one process (always ready,
  // /v1/cluster answers 404). Called from handler threads; must not block long.
  std::function<bool()> ready;
  std::function<std::string()> cluster_status;
};

class HttpServer {
 public:
  explicit HttpServer(HttpServerOptions options);
  ~HttpServer();  // Stop()s
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket. Returns the port (the chosen one when options.port is 0).
  // Unavailable when the address cannot be bound.
  absl::StatusOr<int> Bind();
  // Starts accepting on a thread of its own.
  void Start();
  // Publishes the backend and switches to serving. Call once.
  void SetBackend(HttpBackend backend);
  // New requests get 503; requests in flight go on.
  void StartDraining() { state_.store(State::kDraining); }
  // Requests being handled, streaming responses included until their last byte is written.
  int num_active() const { return active_.load(); }
  // Closes the listener and waits for every handler to return. cpp-httplib cuts streaming
  // responses that are still being written, so drain first (num_active() == 0). Idempotent.
  void Stop();

 private:
  enum class State { kLoading, kServing, kDraining };
  class Handlers;

  const HttpServerOptions options_;
  std::unique_ptr<httplib::Server> server_;
  // The listening socket, captured when it is created, so Bind can raise its backlog.
  std::atomic<int> listen_fd_{-1};
  std::unique_ptr<Handlers> handlers_;
  std::atomic<State> state_{State::kLoading};
  std::atomic<int> active_{0};
  HttpBackend backend_;  // written once before state_ becomes kServing
  std::thread listen_thread_;
  bool stopped_ = false;
};

// The HTTP status that goes with a Status code (InvalidArgument 400, NotFound 404,
// ResourceExhausted 429, Unavailable 503, Unauthenticated 401, else 500).
int HttpStatusFor(absl::StatusCode code);

}  // namespace moe::server
