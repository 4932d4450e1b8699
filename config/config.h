// The deployment configuration: one YAML file describes a whole moe-serve deployment (model,
// device, API server, batching limits, KV cache, the roles and their ranks, expert placement,
// timeouts, logging), read into the typed DeploymentConfig below.
//
// Contract
// - Every key has a default, so an empty file is a valid deployment (all roles in one process,
//   the tiny generated model on the CPU). Unknown keys are errors.
// - One table of keys (config.cc) parses, validates and writes every key; the file loader,
//   ApplyOverride and ToYaml all go through it, so a key behaves the same wherever it is set.
// - Errors are absl::Status values, never exceptions. A bad value is InvalidArgument and names
//   where it came from, the line and the full key path:
//     config/examples/local.yaml:12: batching.max_num_seqs: expected an integer, got "lots"
//     config/examples/local.yaml:7: batching.max_num_seq: unknown key (did you mean
//       batching.max_num_seqs?)
//     --set: server.http_port: expected an integer in [0, 65535], got 70000
//   The loader reports every bad key of a document, one per line, in document order. A file
//   that cannot be read is NotFound (or PermissionDenied); a YAML syntax error is
//   InvalidArgument with the line.
// - Rules that span keys (ranks unique and contiguous, lease longer than the heartbeat, ...)
//   are checked by Validate(). LoadConfigFile/LoadConfigString run it; after ApplyOverride
//   the caller runs it once all overrides are in (LoadDeployment does the three steps).
//
// Threads: every function is thread-compatible and keeps no global mutable state; a
// DeploymentConfig is a plain value.
//
//   absl::StatusOr<DeploymentConfig> config =
//       LoadDeployment({.path = "config/examples/local.yaml",
//                       .overrides = {"batching.max_num_seqs=64"}});
//   if (!config.ok()) { std::cerr << config.status().message() << "\n"; return 2; }
//   std::cout << ToYaml(*config);  // --print-config
//
// The keys, their defaults and limits (also in config/README.md, which a test keeps in step):
//
// model:                      the checkpoint to serve
//   path: ""                  Hugging Face model directory; "" = generate the tiny default model
//   dtype: bf16               weight and activation dtype: f32 | bf16 | f16
//   served_name: ""           model name in the API (/v1/models); "" = last part of model.path
//   max_model_len: 0          longest prompt + output in tokens; 0 = the model's own limit
// device: cpu                 where kernels run: cpu | cuda
// threads: 0                  CPU worker threads per process; 0 = one per core
// server:                     the public API of the frontend
//   host: 127.0.0.1           address the HTTP and gRPC servers listen on
//   http_port: 8000           OpenAI-compatible HTTP port, 0..65535 (0 = any free port)
//   grpc_port: 50051          gRPC Generate port, 0..65535 (0 = any free port)
//   api_key: ""               bearer token clients must send; "" = no authentication
//   max_body_bytes: 16777216  largest request body accepted, > 0
//   drain_timeout_s: 30       seconds to finish running requests on shutdown, >= 0
// batching:                   the frontend's continuous batching
//   max_num_seqs: 256         most sequences in one step, > 0
//   max_num_batched_tokens: 8192  token budget of one step, >= max_num_seqs
//   enable_chunked_prefill: true  split long prompts across steps; when false the budget
//                             must hold a whole prompt (>= model.max_model_len)
//   max_waiting_requests: 1024    admission queue length; beyond it requests get 429, > 0
// kv_cache:                   paged KV cache of each attention worker
//   block_size: 16            tokens per KV block, a power of two in [1, 1024]
//   num_blocks: 0             blocks per attention worker; 0 = size from memory
//   memory_bytes: 0           bytes for the cache when num_blocks is 0; 0 = use memory_fraction
//   memory_fraction: 0.9      share of free device memory for the cache, in (0, 1]
// roles:                      who runs where; "inproc" = inside this process
//   frontend.address: inproc  control-plane address of the frontend (host:port or inproc)
//   scheduler.address: inproc address of the scheduler
//   attention_workers: [{rank: 0, address: inproc}]   data-parallel attention ranks; ranks
//                             are 0..n-1, each once; rank defaults to the list index
//   expert_workers: [{rank: 0, address: inproc, num_slots: 0}]   expert ranks; num_slots =
//                             expert slots per MoE layer (0 = an even share of the experts
//                             plus placement.redundant_slots)
// placement:                  expert placement by the scheduler
//   policy: eplb              static (round robin, never moves) | eplb (replicate hot experts
//                             and balance ranks from load statistics)
//   redundant_slots: 0        extra slots per MoE layer, over all expert ranks, for replicas
//   rebalance_interval_steps: 1000  steps between rebalances; 0 = never rebalance
//   rebalance_window_steps: 1000    steps of load statistics a rebalance looks at, > 0
// timeouts:                   control and data plane, in milliseconds, all > 0
//   heartbeat_ms: 500         how often workers send a heartbeat to the scheduler
//   lease_ms: 3000            a worker silent this long is dead; > heartbeat_ms
//   dispatch_timeout_ms: 5000 longest wait for an expert rank's combine
//   connect_timeout_ms: 2000  longest wait to connect to a peer
// logging:
//   level: info               debug | info | warning | error
//   format: text              text (key=value lines) | json
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/logging.h"

namespace moe::config {

enum class Device { kCpu, kCuda };
enum class PlacementPolicy { kStatic, kEplb };
enum class LogFormat { kText, kJson };

// The address of a role that runs inside this process.
inline constexpr char kInProcess[] = "inproc";

struct ModelSection {
  std::string path;
  common::DType dtype = common::DType::kBF16;  // only kF32, kBF16, kF16
  std::string served_name;
  int64_t max_model_len = 0;

  bool operator==(const ModelSection&) const = default;
};

struct ServerSection {
  std::string host = "127.0.0.1";
  int http_port = 8000;
  int grpc_port = 50051;
  std::string api_key;
  int64_t max_body_bytes = 16 << 20;
  double drain_timeout_s = 30;

  bool operator==(const ServerSection&) const = default;
};

struct BatchingSection {
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 8192;
  bool enable_chunked_prefill = true;
  int64_t max_waiting_requests = 1024;

  bool operator==(const BatchingSection&) const = default;
};

struct KvCacheSection {
  int64_t block_size = 16;
  int64_t num_blocks = 0;
  int64_t memory_bytes = 0;
  double memory_fraction = 0.9;

  bool operator==(const KvCacheSection&) const = default;
};

struct RoleAddress {
  std::string address = kInProcess;

  bool operator==(const RoleAddress&) const = default;
};

struct AttentionWorkerSpec {
  int64_t rank = 0;
  std::string address = kInProcess;

  bool operator==(const AttentionWorkerSpec&) const = default;
};

struct ExpertWorkerSpec {
  int64_t rank = 0;
  std::string address = kInProcess;
  int64_t num_slots = 0;

  bool operator==(const ExpertWorkerSpec&) const = default;
};

struct RolesSection {
  RoleAddress frontend;
  RoleAddress scheduler;
  std::vector<AttentionWorkerSpec> attention_workers = {AttentionWorkerSpec{}};
  std::vector<ExpertWorkerSpec> expert_workers = {ExpertWorkerSpec{}};

  bool operator==(const RolesSection&) const = default;
};

struct PlacementSection {
  PlacementPolicy policy = PlacementPolicy::kEplb;
  int64_t redundant_slots = 0;
  int64_t rebalance_interval_steps = 1000;
  int64_t rebalance_window_steps = 1000;

  bool operator==(const PlacementSection&) const = default;
};

struct TimeoutsSection {
  int64_t heartbeat_ms = 500;
  int64_t lease_ms = 3000;
  int64_t dispatch_timeout_ms = 5000;
  int64_t connect_timeout_ms = 2000;

  bool operator==(const TimeoutsSection&) const = default;
};

struct LoggingSection {
  common::LogLevel level = common::LogLevel::kInfo;  // kDebug..kError
  LogFormat format = LogFormat::kText;

  bool operator==(const LoggingSection&) const = default;
};

// One deployment. Member paths are the YAML key paths: `batching.max_num_seqs` in the file is
// `config.batching.max_num_seqs` here. The defaults are the defaults of the file.
struct DeploymentConfig {
  ModelSection model;
  Device device = Device::kCpu;
  int64_t threads = 0;
  ServerSection server;
  BatchingSection batching;
  KvCacheSection kv_cache;
  RolesSection roles;
  PlacementSection placement;
  TimeoutsSection timeouts;
  LoggingSection logging;

  bool operator==(const DeploymentConfig&) const = default;
};

// Reads and validates a deployment file. `path` is used as written in error messages.
absl::StatusOr<DeploymentConfig> LoadConfigFile(const std::string& path);

// Same, from text; `source_name` stands for the file in error messages.
absl::StatusOr<DeploymentConfig> LoadConfigString(const std::string& text,
                                                  const std::string& source_name);

// Applies one `key.path=value` override (the argument of `--set`). The value is read as YAML,
// so `batching.enable_chunked_prefill=false`, `roles.expert_workers=[{address: "e0:7100"}]`
// (a whole list), `roles.expert_workers[1].address=e1:7100` (one field of an existing entry)
// and `timeouts={lease_ms: 5000}` (keys of a section) work; the value of a string key is taken
// literally. Checks the key alone (errors name the source "--set"); call Validate() once every
// override is applied. On error *config is unchanged.
absl::Status ApplyOverride(DeploymentConfig* config, const std::string& assignment);

// The rules that span several keys. Errors name the keys, one per line.
absl::Status Validate(const DeploymentConfig& config);

struct LoadOptions {
  // Deployment file; empty = the defaults.
  std::string path;
  // `key.path=value` assignments applied in order after the file.
  std::vector<std::string> overrides;
};

// File, then overrides, then Validate(): what a command line with --config and --set means.
absl::StatusOr<DeploymentConfig> LoadDeployment(const LoadOptions& options);

// The whole config as YAML, every key written, in the order above. The text loads back into an
// equal config (LoadConfigString(ToYaml(c)) == c).
std::string ToYaml(const DeploymentConfig& config);

// One key of the schema, for documentation and tests.
struct KeyInfo {
  std::string path;           // "batching.max_num_seqs"
  std::string default_value;  // as YAML: "256"
};

// Every leaf key (lists count as one key; their element keys are listed as "list[].key").
std::vector<KeyInfo> Keys();

}  // namespace moe::config
