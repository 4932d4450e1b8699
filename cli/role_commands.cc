// serve, frontend, attention, expert, scheduler and bench: the long-running roles.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bench/load_generator.h"
#include "cli/commands.h"
#include "cli/local_cluster.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/version.h"
#include "config/config.h"
#include "model/gen_model.h"
#include "model/model.h"
#include "model/model_config.h"
#include "model/tokenizer.h"
#include "scheduler/scheduler_service.h"
#include "server/chat_template.h"
#include "server/cluster_monitor.h"
#include "server/engine.h"
#include "server/grpc_server.h"
#include "server/http_server.h"
#include "server/remote_attention_worker.h"
#include "worker/attention/attention_service.h"
#include "worker/expert/expert_server.h"
#include "worker/expert/expert_worker.h"
#include "worker/placement.h"

namespace moe::cli {
namespace {

// The flags every role shares: the deployment file, overrides of its keys, --print-config.
struct RoleFlags {
  std::string config_path;
  std::vector<std::string> sets;
  bool print_config = false;

  void Register(common::FlagSet& flags) {
    flags.AddString("config", &config_path, "deployment YAML file (config/examples/local.yaml)");
    flags.AddRepeated("set", &sets, "override a config key, e.g. --set batching.max_num_seqs=64");
    flags.AddBool("print-config", &print_config, "print the effective configuration and exit");
  }

  // Loads --config, then `flag_overrides` (from dedicated flags such as --port), then --set,
  // and checks the result. Returns -1 to go on with *deployment filled, or the exit status:
  // 2 after a bad file or override (the message names file, line and key), 0 after
  // --print-config.
  int LoadOrExit(const std::string& command, std::vector<std::string> flag_overrides,
                 std::ostream& out, std::ostream& err, config::DeploymentConfig* deployment) {
    config::LoadOptions options{.path = config_path, .overrides = std::move(flag_overrides)};
    options.overrides.insert(options.overrides.end(), sets.begin(), sets.end());
    absl::StatusOr<config::DeploymentConfig> loaded = config::LoadDeployment(options);
    if (!loaded.ok()) {
      err << "moe-serve " << command << ": " << loaded.status().message() << "\n";
      return 2;
    }
    if (print_config) {
      out << config::ToYaml(*loaded);
      return 0;
    }
    *deployment = *std::move(loaded);
    common::SetLogLevel(deployment->logging.level);
    return -1;
  }
};

// ---- serve: every role in this process ----

std::string DefaultCacheDir() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    return std::string(xdg) + "/moe-serve";
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return std::string(home) + "/.cache/moe-serve";
  }
  return "/tmp/moe-serve-cache";
}

// The tiny default model, generated once into the cache (written to a temporary folder and
// renamed, so a concurrent or interrupted run never leaves half a model behind).
absl::StatusOr<std::string> DefaultModelDir(const std::string& cache_dir) {
  namespace fs = std::filesystem;
  const std::string dir = (cache_dir.empty() ? DefaultCacheDir() : cache_dir) + "/tiny-qwen3_moe";
  std::error_code ec;
  if (fs::exists(dir + "/config.json", ec)) return dir;
  const std::string tmp = absl::StrCat(dir, ".tmp.", getpid());
  fs::create_directories(tmp, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", tmp, ": ", ec.message()));
  MOE_LOG(INFO) << "generating the tiny default model" << common::Kv("dir", dir);
  absl::StatusOr<model::GenModelResult> made =
      model::GenerateModel({.arch = "qwen3_moe", .preset = "tiny", .seed = 0, .out_dir = tmp});
  if (!made.ok()) {
    fs::remove_all(tmp, ec);
    return common::Annotate(made.status(), "generating the default model");
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp, ec);
    if (!fs::exists(dir + "/config.json")) {
      return absl::InternalError(absl::StrCat("cannot move the model to ", dir));
    }
  }
  return dir;
}

double MemAvailableBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (meminfo >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024.0;
  }
  return 1024.0 * 1024 * 1024;
}

// KV blocks: kv_cache.num_blocks, else as many as fit in memory_bytes (or memory_fraction of
// the available memory) but no more than max_num_seqs full-length sequences need.
absl::StatusOr<int64_t> KvBlocks(const config::DeploymentConfig& d, const model::ModelConfig& mc,
                                 int64_t max_model_len) {
  if (d.kv_cache.num_blocks > 0) return d.kv_cache.num_blocks;
  const int64_t bs = d.kv_cache.block_size;
  MOE_ASSIGN_OR_RETURN(auto one, model::KvCache::Create(mc, {.num_blocks = 1,
                                                              .block_size = static_cast<int>(bs)}));
  const double per_block = static_cast<double>(one->bytes());
  const double budget = d.kv_cache.memory_bytes > 0 ? static_cast<double>(d.kv_cache.memory_bytes)
                                                    : d.kv_cache.memory_fraction * MemAvailableBytes();
  const int64_t needed = d.batching.max_num_seqs * ((max_model_len + bs - 1) / bs);
  const int64_t fit = static_cast<int64_t>(budget / per_block);
  const int64_t blocks = std::min(fit, needed);
  if (blocks < (max_model_len + bs - 1) / bs) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV cache budget (", budget, " bytes) does not hold one sequence of ", max_model_len,
        " tokens; raise kv_cache.memory_bytes or lower model.max_model_len"));
  }
  return blocks;
}

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// `frontend`: the frontend role: no weights, the engine drives the attention workers of
// roles.attention_workers over gRPC (data-parallel), /health waits for the cluster and
// GET /v1/cluster shows it.
absl::Status Serve(const config::DeploymentConfig& d, const std::string& cache_dir,
                   bool frontend = false) {
  // Signals are taken by sigwait below; block them before any thread starts so none of the
  // server's threads is interrupted by them.
  sigset_t signals = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::string served_name = d.model.served_name;
  if (served_name.empty()) {
    served_name = d.model.path.empty()
                      ? "tiny"
                      : std::filesystem::path(d.model.path).lexically_normal().filename().string();
    if (served_name.empty()) {
      served_name = std::filesystem::path(d.model.path).parent_path().filename().string();
    }
  }
  // The HTTP server comes up first and answers 503 on /health while the model loads.
  server::HttpServer http({.host = d.server.host,
                           .port = d.server.http_port,
                           .api_key = d.server.api_key,
                           .max_body_bytes = d.server.max_body_bytes,
                           .served_model_name = served_name,
                           .num_threads = static_cast<int>(
                               std::clamp<int64_t>(d.batching.max_num_seqs + 16, 32, 1024))});
  MOE_ASSIGN_OR_RETURN(int port, http.Bind());
  http.Start();
  MOE_LOG(INFO) << "moe-serve " << MOE_SERVE_VERSION << " listening on http://" << d.server.host
                << ":" << port << " (loading)";
  // gRPC (moe.v1.MoeServe, grpc.health.v1, reflection) likewise: UNAVAILABLE and
  // NOT_SERVING until the model is loaded.
  server::GrpcServer grpc({.host = d.server.host,
                           .port = d.server.grpc_port,
                           .api_key = d.server.api_key,
                           .served_model_name = served_name,
                           .max_message_bytes = static_cast<int>(
                               std::min<int64_t>(d.server.max_body_bytes, INT32_MAX))});
  MOE_ASSIGN_OR_RETURN(int grpc_port, grpc.Start());

  std::string dir = d.model.path;
  if (dir.empty()) {
    MOE_ASSIGN_OR_RETURN(dir, DefaultModelDir(cache_dir));
  }
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer,
                       model::Tokenizer::FromDirectory(dir));
  // Sizing needs the config before the cache exists: load once with a tiny cache to read
  // it, then for real. Loading maps the weights, so the first load is cheap.
  model::ModelOptions mopts;
  mopts.dtype = d.model.dtype;
  mopts.threads = static_cast<int>(d.threads);
  mopts.kv = {.num_blocks = 1, .block_size = static_cast<int>(d.kv_cache.block_size)};
  model::ModelConfig mc;
  if (frontend) {
    // The attention workers hold the weights; the frontend needs the shape only.
    MOE_ASSIGN_OR_RETURN(mc, model::LoadModelConfig(dir));
  } else {
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> probe, model::Model::Load(dir, mopts));
    mc = probe->config();
  }
  int64_t max_model_len = mc.max_position_embeddings;
  if (d.model.max_model_len > 0) max_model_len = std::min(max_model_len, d.model.max_model_len);
  // An attention worker sizes its cache by the same rule (kv_cache.* of the shared file).
  MOE_ASSIGN_OR_RETURN(int64_t num_blocks, KvBlocks(d, mc, max_model_len));
  mopts.kv.num_blocks = static_cast<int>(num_blocks);
  mopts.initial_batch_tokens = static_cast<int>(
      std::min<int64_t>(d.batching.max_num_batched_tokens, 512));
  std::unique_ptr<model::Model> model;
  if (!frontend) {
    MOE_ASSIGN_OR_RETURN(model, model::Model::Load(dir, mopts));
  }

  std::optional<server::ChatTemplate> chat_template;
  if (!tokenizer->chat_template().empty()) {
    absl::StatusOr<server::ChatTemplate> parsed =
        server::ChatTemplate::Parse(tokenizer->chat_template());
    if (parsed.ok()) {
      chat_template = *std::move(parsed);
    } else {
      MOE_LOG(WARNING) << "the model's chat template does not parse; /v1/chat/completions is off: "
                       << parsed.status().message();
    }
  }

  server::EngineOptions eopts;
  eopts.scheduler = {.max_num_seqs = static_cast<int>(d.batching.max_num_seqs),
                     .max_num_batched_tokens = static_cast<int>(d.batching.max_num_batched_tokens),
                     .enable_chunked_prefill = d.batching.enable_chunked_prefill,
                     .max_model_len = static_cast<int>(max_model_len),
                     .max_waiting = static_cast<int>(d.batching.max_waiting_requests),
                     .block_size = static_cast<int>(d.kv_cache.block_size),
                     .num_blocks = static_cast<int>(num_blocks)};
  eopts.tokenizer = tokenizer.get();
  eopts.eos_ids = tokenizer->eos_ids();
  for (int64_t id : mc.eos_token_ids) {
    if (std::find(eopts.eos_ids.begin(), eopts.eos_ids.end(), id) == eopts.eos_ids.end()) {
      eopts.eos_ids.push_back(static_cast<int32_t>(id));
    }
  }
  eopts.vocab_size = static_cast<int32_t>(std::min<int64_t>(mc.vocab_size, tokenizer->vocab_size()));
  std::vector<std::unique_ptr<server::AttentionWorker>> workers;
  std::unique_ptr<server::RemoteAttentionMetrics> worker_metrics;
  std::unique_ptr<server::ClusterMonitor> monitor;
  if (frontend) {
    MOE_ASSIGN_OR_RETURN(worker_metrics, server::RemoteAttentionMetrics::Create(nullptr));
    // A step's forward waits at most dispatch_timeout per MoE layer on the expert ranks.
    const absl::Duration step_timeout =
        std::max(absl::Seconds(60),
                 2 * mc.num_layers * absl::Milliseconds(d.timeouts.dispatch_timeout_ms));
    for (const config::AttentionWorkerSpec& w : d.roles.attention_workers) {
      workers.push_back(std::make_unique<server::RemoteAttentionWorker>(
          server::RemoteAttentionWorkerOptions{.rank = static_cast<int>(w.rank),
                                               .address = w.address,
                                               .step_timeout = step_timeout,
                                               .metrics = worker_metrics.get()}));
    }
    monitor = server::ClusterMonitor::Start(
        {.scheduler_address = d.roles.scheduler.address,
         .rpc_timeout = absl::Milliseconds(d.timeouts.connect_timeout_ms)});
    // A dead expert rank fails the steps that need it; the cluster repairs itself, so the
    // engine never gives up.
    eopts.max_consecutive_step_failures = 0;
  } else {
    workers.push_back(std::make_unique<server::InProcessAttentionWorker>(*model));
  }
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<server::Engine> engine,
                       server::Engine::Create(std::move(eopts), std::move(workers)));
  server::HttpBackend backend{.engine = engine.get(),
                              .tokenizer = tokenizer.get(),
                              .chat_template = std::move(chat_template),
                              .max_model_len = static_cast<int>(max_model_len)};
  if (monitor != nullptr) {
    backend.ready = [m = monitor.get()] { return m->ready(); };
    backend.cluster_status = [m = monitor.get()] { return m->StatusJson(); };
  }
  http.SetBackend(std::move(backend));
  grpc.SetBackend({.engine = engine.get(),
                   .tokenizer = tokenizer.get(),
                   .max_model_len = static_cast<int>(max_model_len),
                   .architecture = mc.architecture});
  MOE_LOG(INFO) << "serving " << served_name << " on http://" << d.server.host << ":" << port
                << common::Kv("grpc_port", grpc_port) << common::Kv("model", dir)
                << common::Kv("max_model_len", max_model_len) << common::Kv("kv_blocks", num_blocks);

  int sig = 0;
  sigwait(&signals, &sig);
  MOE_LOG(INFO) << "signal " << sig << ": draining" << common::Kv("requests", engine->num_unfinished())
                << common::Kv("timeout_s", d.server.drain_timeout_s);
  // New requests get 503 from here on; the running ones finish or are cut at the deadline.
  http.StartDraining();
  grpc.StartDraining();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(d.server.drain_timeout_s);
  while (engine->num_unfinished() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (engine->num_unfinished() > 0) {
    MOE_LOG(WARNING) << "drain timeout: aborting " << engine->num_unfinished() << " requests";
    engine->AbortAll();
  }
  // Let the handlers write the last events ("abort" included) and [DONE] before the
  // listener closes (cpp-httplib cuts streams still being written when it stops).
  const auto flush_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((engine->num_unfinished() > 0 || http.num_active() > 0 || grpc.num_active() > 0) &&
         std::chrono::steady_clock::now() < flush_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  grpc.Stop();
  http.Stop();
  engine->Stop();
  MOE_LOG(INFO) << "stopped";
  return absl::OkStatus();
}

// serve --local-cluster: the roles as processes of this binary (cli/local_cluster.h). The
// model is resolved here (the tiny default generated once), and the KV cache is sized here
// so that the frontend and every attention worker agree on it.
absl::Status ServeLocalCluster(const config::DeploymentConfig& deployment,
                               const std::string& cache_dir, int64_t attention_workers,
                               int64_t expert_ranks, int64_t redundant_slots) {
  if (attention_workers < 1 || attention_workers > 64 || expert_ranks < 1 || expert_ranks > 256) {
    return absl::InvalidArgumentError(
        "--attention-workers must be in [1, 64] and --expert-ranks in [1, 256]");
  }
  LocalClusterOptions options{.attention_workers = static_cast<int>(attention_workers),
                              .expert_ranks = static_cast<int>(expert_ranks),
                              .deployment = deployment};
  config::DeploymentConfig& d = options.deployment;
  if (d.model.path.empty()) {
    MOE_ASSIGN_OR_RETURN(d.model.path, DefaultModelDir(cache_dir));
  }
  d.model.path = std::filesystem::absolute(d.model.path).string();
  if (redundant_slots >= 0) d.placement.redundant_slots = redundant_slots;
  if (d.kv_cache.num_blocks == 0) {
    // One machine: the attention workers share the cache budget.
    MOE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::LoadModelConfig(d.model.path));
    int64_t max_model_len = mc.max_position_embeddings;
    if (d.model.max_model_len > 0) max_model_len = std::min(max_model_len, d.model.max_model_len);
    config::DeploymentConfig share = d;
    if (share.kv_cache.memory_bytes > 0) {
      share.kv_cache.memory_bytes /= attention_workers;
    } else {
      share.kv_cache.memory_fraction /= static_cast<double>(attention_workers);
    }
    MOE_ASSIGN_OR_RETURN(d.kv_cache.num_blocks, KvBlocks(share, mc, max_model_len));
    d.kv_cache.memory_bytes = 0;
  }
  return RunLocalCluster(options);
}

}  // namespace

int RunServe(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve serve [--model DIR] [flags]",
                        "Serves a model over the OpenAI-compatible HTTP API and gRPC. With no\n"
                        "model it generates the tiny default model once and serves that.\n"
                        "--model, --port and --grpc-port override model.path, server.http_port\n"
                        "and server.grpc_port of the deployment file; --set comes after them.");
  RoleFlags role;
  role.Register(flags);
  std::string model;
  int64_t port = 8000, grpc_port = 50051;
  bool local_cluster = false;
  flags.AddString("model", &model, "Hugging Face model directory");
  flags.AddInt("port", &port, "HTTP port");
  flags.AddInt("grpc-port", &grpc_port, "gRPC port (0: any free port, logged as grpc_port=)");
  flags.AddBool("local-cluster", &local_cluster, "spawn every role as its own process on loopback");
  int64_t attention_workers = 1, expert_ranks = 2, redundant_slots = 0;
  flags.AddInt("attention-workers", &attention_workers,
               "with --local-cluster: data-parallel attention worker processes");
  flags.AddInt("expert-ranks", &expert_ranks, "with --local-cluster: expert rank processes");
  flags.AddInt("redundant-slots", &redundant_slots,
               "with --local-cluster: extra expert slots for replicas (placement.redundant_slots)");
  std::string cache_dir;
  flags.AddString("cache-dir", &cache_dir,
                  "where the default model is generated (default $XDG_CACHE_HOME/moe-serve or "
                  "~/.cache/moe-serve)");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  std::vector<std::string> flag_overrides;
  if (flags.WasSet("model")) flag_overrides.push_back("model.path=" + model);
  if (flags.WasSet("port")) flag_overrides.push_back("server.http_port=" + std::to_string(port));
  if (flags.WasSet("grpc-port")) {
    flag_overrides.push_back("server.grpc_port=" + std::to_string(grpc_port));
  }
  config::DeploymentConfig deployment;
  if (int rc = role.LoadOrExit("serve", std::move(flag_overrides), out, err, &deployment);
      rc >= 0) {
    return rc;
  }
  if (local_cluster) {
    absl::Status status =
        ServeLocalCluster(deployment, cache_dir, attention_workers, expert_ranks,
                          flags.WasSet("redundant-slots") ? redundant_slots : -1);
    if (!status.ok()) {
      err << "moe-serve serve --local-cluster: " << status.message() << "\n";
      return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
    }
    return 0;
  }
  absl::Status status = Serve(deployment, cache_dir);
  if (!status.ok()) {
    err << "moe-serve serve: " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

int RunFrontend(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags(
      "moe-serve frontend --config FILE [flags]",
      "Runs the frontend role: the OpenAI HTTP API (server.http_port) and gRPC in front of the\n"
      "engine, which spreads requests over the attention workers of roles.attention_workers\n"
      "(data-parallel, by load) and drives them over gRPC. /health is 503 until the scheduler\n"
      "(roles.scheduler.address) reports the cluster ready; GET /v1/cluster shows ranks, slots\n"
      "and placement. Stops on SIGTERM/SIGINT after draining.");
  RoleFlags role;
  role.Register(flags);
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  config::DeploymentConfig deployment;
  if (int rc = role.LoadOrExit("frontend", {}, out, err, &deployment); rc >= 0) return rc;
  common::SetLogPrefix("frontend");
  std::string bad;
  if (deployment.roles.scheduler.address.find(':') == std::string::npos) {
    bad = "roles.scheduler.address: \"" + deployment.roles.scheduler.address +
          "\" is not host:port; the frontend role needs the scheduler's address";
  }
  for (size_t i = 0; i < deployment.roles.attention_workers.size() && bad.empty(); ++i) {
    const std::string& a = deployment.roles.attention_workers[i].address;
    if (a.find(':') == std::string::npos) {
      bad = absl::StrCat("roles.attention_workers[", i, "].address: \"", a,
                         "\" is not host:port; the frontend role reaches attention workers "
                         "over gRPC");
    }
  }
  if (!bad.empty()) {
    err << "moe-serve frontend: " << bad << "\n";
    return 2;
  }
  absl::Status status = Serve(deployment, "", /*frontend=*/true);
  if (!status.ok()) {
    err << "moe-serve frontend: " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

namespace {

// One attention worker rank: the model without routed experts, the Step service on the port
// of roles.attention_workers[rank].address (on server.host), the routed experts on the
// expert ranks over TCP.
absl::Status ServeAttention(const config::DeploymentConfig& d, int rank) {
  sigset_t signals = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const config::AttentionWorkerSpec& spec = d.roles.attention_workers[rank];
  const size_t colon = spec.address.rfind(':');
  if (spec.address == config::kInProcess || colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "roles.attention_workers[", rank, "].address: \"", spec.address,
        "\" is not host:port; an attention worker runs as its own process"));
  }
  if (d.roles.scheduler.address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "roles.scheduler.address: \"", d.roles.scheduler.address,
        "\" is not host:port; an attention worker gets its placement from the scheduler"));
  }
  std::string dir = d.model.path;
  if (dir.empty()) {
    MOE_ASSIGN_OR_RETURN(dir, DefaultModelDir(""));
  }
  MOE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::LoadModelConfig(dir));
  int64_t max_model_len = mc.max_position_embeddings;
  if (d.model.max_model_len > 0) max_model_len = std::min(max_model_len, d.model.max_model_len);
  MOE_ASSIGN_OR_RETURN(int64_t num_blocks, KvBlocks(d, mc, max_model_len));
  model::ModelOptions mopts;
  mopts.dtype = d.model.dtype;
  mopts.threads = static_cast<int>(d.threads);
  mopts.kv = {.num_blocks = static_cast<int>(num_blocks),
              .block_size = static_cast<int>(d.kv_cache.block_size)};
  mopts.initial_batch_tokens =
      static_cast<int>(std::min<int64_t>(d.batching.max_num_batched_tokens, 512));
  // No routed expert: they live on the expert ranks.
  mopts.experts = worker::NoRoutedExperts;
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, model::Model::Load(dir, mopts));
  MOE_LOG(INFO) << "attention worker weights" << common::Kv("routed_experts_loaded",
                                                            model->weights().num_loaded_experts())
                << common::Kv("weight_bytes", model->weights().total_bytes())
                << common::Kv("kv_cache_bytes", model->kv_cache().bytes())
                << common::Kv("kv_blocks", num_blocks);
  MOE_ASSIGN_OR_RETURN(
      std::unique_ptr<worker::AttentionServer> server,
      worker::AttentionServer::Start(
          {.rank = rank,
           .listen_address = absl::StrCat(d.server.host, spec.address.substr(colon)),
           .advertise_address = spec.address,
           .scheduler_address = d.roles.scheduler.address,
           .version = MOE_SERVE_VERSION,
           .heartbeat_interval = absl::Milliseconds(d.timeouts.heartbeat_ms),
           .rpc_timeout = absl::Milliseconds(d.timeouts.connect_timeout_ms),
           .connect_timeout = absl::Milliseconds(d.timeouts.connect_timeout_ms),
           .dispatch_timeout = absl::Milliseconds(d.timeouts.dispatch_timeout_ms)},
          model.get()));
  MOE_LOG(INFO) << "moe-serve " << MOE_SERVE_VERSION << " attention worker serving"
                << common::Kv("address", server->address())
                << common::Kv("scheduler", d.roles.scheduler.address) << common::Kv("model", dir);
  int sig = 0;
  sigwait(&signals, &sig);
  MOE_LOG(INFO) << "signal " << sig << ": stopping";
  server->Stop();
  MOE_LOG(INFO) << "stopped";
  return absl::OkStatus();
}

}  // namespace

// A worker role with a rank (attention, expert): flags, config, the rank checked against
// its list in the config, the log prefix "role[rank]", then serve until stopped.
struct RankedWorker {
  const char* role;
  const char* description;
  const char* roles_key;
  std::function<size_t(const config::DeploymentConfig&)> num_ranks;
  std::function<absl::Status(const config::DeploymentConfig&, int)> serve;
};

int RunRankedWorker(const RankedWorker& w, const Args& args, std::ostream& out,
                    std::ostream& err) {
  const std::string role = w.role;
  common::FlagSet flags("moe-serve " + role + " --config FILE --rank N [flags]", w.description);
  RoleFlags role_flags;
  role_flags.Register(flags);
  int64_t rank = 0;
  flags.AddInt("rank", &rank, "rank within the role");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  config::DeploymentConfig deployment;
  if (int rc = role_flags.LoadOrExit(role, {}, out, err, &deployment); rc >= 0) return rc;
  const int64_t ranks = static_cast<int64_t>(w.num_ranks(deployment));
  if (rank < 0 || rank >= ranks) {
    err << "moe-serve " << role << ": --rank " << rank << ": " << w.roles_key
        << " has ranks 0.." << ranks - 1 << "\n";
    return 2;
  }
  common::SetLogPrefix(absl::StrCat(role, "[", rank, "]"));
  absl::Status status = w.serve(deployment, static_cast<int>(rank));
  if (!status.ok()) {
    err << "moe-serve " << role << ": " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

int RunAttention(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRankedWorker({.role = "attention",
                          .description =
                              "Runs one attention worker rank: the model without its routed experts and a paged KV\n"
      "cache, serving moe.internal.v1.AttentionWorker.Step (gRPC) on the port of\n"
      "roles.attention_workers[N].address for the frontend. It registers with the scheduler,\n"
      "follows its placement and sends the routed experts' rows to the expert ranks (TCP).\n"
      "Stops on SIGTERM/SIGINT.",
                          .roles_key = "roles.attention_workers",
                          .num_ranks = [](const config::DeploymentConfig& d) {
                            return d.roles.attention_workers.size();
                          },
                          .serve = ServeAttention},
                         args, out, err);
}
namespace {

// One expert rank: its ExpertWorker behind the TCP data plane (the port of
// roles.expert_workers[rank].address) and ExpertControl (that port + 1), both on server.host,
// announced to the scheduler with the host of the configured address.
absl::Status ServeExpert(const config::DeploymentConfig& d, int rank) {
  sigset_t signals = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const config::ExpertWorkerSpec& spec = d.roles.expert_workers[rank];
  std::string host;
  int data_port = 0;
  const size_t colon = spec.address.rfind(':');
  if (spec.address == config::kInProcess || colon == std::string::npos ||
      !absl::SimpleAtoi(spec.address.substr(colon + 1), &data_port)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "roles.expert_workers[", rank, "].address: \"", spec.address,
        "\" is not host:port; an expert rank runs as its own process"));
  }
  host = spec.address.substr(0, colon);
  std::string dir = d.model.path;
  if (dir.empty()) {
    MOE_ASSIGN_OR_RETURN(dir, DefaultModelDir(""));
  }
  if (d.threads > 0) kernels::SetCpuThreads(static_cast<int>(d.threads));
  const int64_t sources = static_cast<int64_t>(d.roles.attention_workers.size());
  MOE_ASSIGN_OR_RETURN(
      std::unique_ptr<worker::ExpertWorker> expert,
      worker::ExpertWorker::Create({.rank = rank,
                                    .model_dir = dir,
                                    .dtype = d.model.dtype,
                                    // Several attention workers: wait briefly for all of
                                    // them, so their rows share one pass over the weights.
                                    .gather_window = sources > 1 ? absl::Microseconds(500)
                                                                 : absl::ZeroDuration(),
                                    .expected_sources = static_cast<int>(sources)}));
  const model::ModelConfig& mc = expert->model_config();
  const int64_t num_ranks = static_cast<int64_t>(d.roles.expert_workers.size());
  const int64_t slots = spec.num_slots > 0 ? spec.num_slots
                                           : (mc.moe.num_experts + d.placement.redundant_slots +
                                              num_ranks - 1) / num_ranks;
  const bool has_scheduler = d.roles.scheduler.address != config::kInProcess;
  if (!has_scheduler) {
    // No scheduler to place the experts: the static round-robin placement, epoch 1.
    MOE_ASSIGN_OR_RETURN(worker::PlacementTable table,
                         worker::RoundRobinPlacement(mc, {.num_ranks = static_cast<int>(num_ranks),
                                                          .slots_per_rank = static_cast<int>(slots),
                                                          .epoch = 1}));
    MOE_RETURN_IF_ERROR(expert->LoadPlacement(table));
  }
  MOE_ASSIGN_OR_RETURN(
      std::unique_ptr<worker::ExpertServer> server,
      worker::ExpertServer::Start(
          {.rank = rank,
           .host = d.server.host,
           .advertise_host = host,
           .data_port = data_port,
           .control_port = data_port == 0 ? 0 : data_port + 1,
           .scheduler_address = has_scheduler ? d.roles.scheduler.address : "",
           .num_slots = static_cast<int32_t>(slots),
           .version = MOE_SERVE_VERSION,
           .heartbeat_interval = absl::Milliseconds(d.timeouts.heartbeat_ms),
           .rpc_timeout = absl::Milliseconds(d.timeouts.connect_timeout_ms),
           .io_timeout = absl::Milliseconds(d.timeouts.dispatch_timeout_ms)},
          expert.get()));
  MOE_LOG(INFO) << "moe-serve " << MOE_SERVE_VERSION << " expert rank serving"
                << common::Kv("data", server->data_address())
                << common::Kv("control", server->control_address())
                << common::Kv("scheduler", d.roles.scheduler.address)
                << common::Kv("slots", slots) << common::Kv("model", dir)
                << common::Kv("epoch", expert->epoch());
  int sig = 0;
  sigwait(&signals, &sig);
  MOE_LOG(INFO) << "signal " << sig << ": stopping";
  server->Stop();
  expert->Stop();
  MOE_LOG(INFO) << "stopped";
  return absl::OkStatus();
}

}  // namespace

int RunExpert(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRankedWorker({.role = "expert",
                          .description =
                              "Runs one expert worker rank: it holds the expert slots the placement gives it, serves\n"
      "dispatches on the port of roles.expert_workers[N].address (framed TCP) and ExpertControl\n"
      "(gRPC) on that port + 1, both on server.host, registers with roles.scheduler.address and\n"
      "heartbeats with load reports. Without a scheduler (inproc) it serves the static\n"
      "round-robin placement. Stops on SIGTERM/SIGINT.",
                          .roles_key = "roles.expert_workers",
                          .num_ranks = [](const config::DeploymentConfig& d) {
                            return d.roles.expert_workers.size();
                          },
                          .serve = ServeExpert},
                         args, out, err);
}
namespace {

// What the scheduler role needs from the deployment file and the model's config.json.
absl::StatusOr<scheduler::SchedulerServerOptions> SchedulerOptions(
    const config::DeploymentConfig& d, int64_t startup_timeout_ms, int64_t prepare_timeout_ms) {
  const std::string& address = d.roles.scheduler.address;
  const size_t colon = address.rfind(':');
  if (address == config::kInProcess || colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "roles.scheduler.address: \"", address,
        "\" is not host:port; the scheduler role runs as its own process"));
  }
  std::string dir = d.model.path;
  if (dir.empty()) {
    MOE_ASSIGN_OR_RETURN(dir, DefaultModelDir(""));
  }
  MOE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::LoadModelConfig(dir));
  scheduler::SchedulerServerOptions o;
  scheduler::MembershipOptions& m = o.membership;
  for (int layer = 0; layer < mc.num_layers; ++layer) {
    if (mc.IsMoeLayer(layer)) m.model.moe_layers.push_back(layer);
  }
  m.model.num_experts = mc.moe.num_experts;
  // gate, up [expert_intermediate, hidden] and down [hidden, expert_intermediate]
  m.model.expert_bytes = {static_cast<uint64_t>(3 * mc.hidden_size *
                                                mc.moe.expert_intermediate_size *
                                                common::DTypeSize(d.model.dtype))};
  const int64_t num_ranks = static_cast<int64_t>(d.roles.expert_workers.size());
  // num_slots 0: an even share of the experts and the redundant replicas.
  const int64_t even_share =
      num_ranks == 0 ? 0 : (mc.moe.num_experts + d.placement.redundant_slots + num_ranks - 1) /
                               num_ranks;
  for (const config::ExpertWorkerSpec& w : d.roles.expert_workers) {
    m.expert_ranks.push_back({.rank = static_cast<int32_t>(w.rank),
                              .num_slots = static_cast<int32_t>(
                                  w.num_slots > 0 ? w.num_slots : even_share)});
  }
  m.num_attention_ranks = static_cast<int32_t>(d.roles.attention_workers.size());
  m.policy = d.placement.policy == config::PlacementPolicy::kEplb
                 ? scheduler::PlacementPolicyKind::kEplb
                 : scheduler::PlacementPolicyKind::kStatic;
  m.redundant_slots = static_cast<int32_t>(d.placement.redundant_slots);
  m.rebalance_interval_steps = d.placement.rebalance_interval_steps;
  m.lease_ms = d.timeouts.lease_ms;
  m.startup_timeout_ms = startup_timeout_ms;
  m.prepare_timeout_ms = prepare_timeout_ms;
  m.version = MOE_SERVE_VERSION;
  o.listen_address = absl::StrCat(d.server.host, address.substr(colon));
  o.prepare_timeout_ms = prepare_timeout_ms;
  o.commit_timeout_ms = d.timeouts.connect_timeout_ms + d.timeouts.dispatch_timeout_ms;
  return o;
}

absl::Status ServeScheduler(const config::DeploymentConfig& d, int64_t startup_timeout_ms,
                            int64_t prepare_timeout_ms) {
  sigset_t signals = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  MOE_ASSIGN_OR_RETURN(scheduler::SchedulerServerOptions options,
                       SchedulerOptions(d, startup_timeout_ms, prepare_timeout_ms));
  const std::string listen = options.listen_address;
  const size_t num_expert_ranks = options.membership.expert_ranks.size();
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<scheduler::SchedulerServer> server,
                       scheduler::SchedulerServer::Start(std::move(options)));
  MOE_LOG(INFO) << "moe-serve " << MOE_SERVE_VERSION << " scheduler listening"
                << common::Kv("address", listen) << common::Kv("port", server->port())
                << common::Kv("expert_ranks", num_expert_ranks);
  int sig = 0;
  sigwait(&signals, &sig);
  MOE_LOG(INFO) << "signal " << sig << ": stopping";
  server->Shutdown();
  MOE_LOG(INFO) << "stopped";
  return absl::OkStatus();
}

}  // namespace

int RunScheduler(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve scheduler --config FILE [flags]",
                        "Runs the membership and placement scheduler: expert ranks and attention\n"
                        "workers register with it, it places the experts (two-phase prepare and\n"
                        "commit), watches leases and rebalances. Listens on server.host at the\n"
                        "port of roles.scheduler.address.");
  RoleFlags role;
  role.Register(flags);
  int64_t startup_timeout_ms = 60000;
  int64_t prepare_timeout_ms = 120000;
  flags.AddInt("startup-timeout-ms", &startup_timeout_ms,
               "report expert ranks that have not registered after this long");
  flags.AddInt("prepare-timeout-ms", &prepare_timeout_ms,
               "longest wait for an expert rank to load a new placement");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  config::DeploymentConfig deployment;
  if (int rc = role.LoadOrExit("scheduler", {}, out, err, &deployment); rc >= 0) return rc;
  common::SetLogPrefix("scheduler");
  absl::Status status = ServeScheduler(deployment, startup_timeout_ms, prepare_timeout_ms);
  if (!status.ok()) {
    err << "moe-serve scheduler: " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

int RunBench(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags(
      "moe-serve bench [--url URL] [flags]",
      "Load generator against a running moe-serve (or any OpenAI-compatible server on\n"
      "loopback), like `vllm bench serve`: synthetic prompts, streamed answers, TTFT, TPOT,\n"
      "ITL and E2E latency. Bounded by --num-prompts, --concurrency <= 128 and\n"
      "--max-duration-s; non-loopback hosts need --allow-remote. See bench/README.md.");
  bench::LoadOptions options;
  std::string json_path;
  bench::AddLoadFlags(flags, &options, &json_path);
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  return bench::RunLoadCommand(options, json_path, isatty(STDOUT_FILENO) != 0, out, err);
}

int RunVersion(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve version", "Prints the version.");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  out << "moe-serve " << MOE_SERVE_VERSION << "\n";
  return 0;
}

}  // namespace moe::cli
