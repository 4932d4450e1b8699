// serve, frontend, attention, expert, scheduler and bench: the long-running roles.
#include "cli/commands.h"
#include "common/logging.h"
#include "common/version.h"
#include "config/config.h"

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

int RunRole(const std::string& name, const std::string& usage, const std::string& description,
            const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve " + name + " " + usage, description);
  RoleFlags role;
  role.Register(flags);
  int64_t rank = 0;
  bool has_rank = name == "attention" || name == "expert";
  if (has_rank) flags.AddInt("rank", &rank, "rank within the role");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  config::DeploymentConfig deployment;
  if (int rc = role.LoadOrExit(name, {}, out, err, &deployment); rc >= 0) return rc;
  if (has_rank) {
    size_t ranks = name == "attention" ? deployment.roles.attention_workers.size()
                                       : deployment.roles.expert_workers.size();
    if (rank < 0 || rank >= static_cast<int64_t>(ranks)) {
      err << "moe-serve " << name << ": --rank " << rank << ": roles." << name
          << "_workers has ranks 0.." << ranks - 1 << "\n";
      return 2;
    }
  }
  return NotImplemented(name, "the " + name + " role is not built yet", err);
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
  flags.AddInt("grpc-port", &grpc_port, "gRPC port");
  flags.AddBool("local-cluster", &local_cluster, "spawn every role as its own process on loopback");
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
  return NotImplemented("serve", "the serving frontend is not built yet", err);
}

int RunFrontend(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRole("frontend", "--config FILE [flags]", "Runs the frontend role.", args, out, err);
}
int RunAttention(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRole("attention", "--config FILE --rank N [flags]",
                 "Runs one attention worker rank.", args, out, err);
}
int RunExpert(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRole("expert", "--config FILE --rank N [flags]", "Runs one expert worker rank.",
                 args, out, err);
}
int RunScheduler(const Args& args, std::ostream& out, std::ostream& err) {
  return RunRole("scheduler", "--config FILE [flags]",
                 "Runs the membership and placement scheduler.", args, out, err);
}

int RunBench(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve bench --url URL [flags]",
                        "Load generator against a running moe-serve (or any OpenAI-compatible "
                        "server on loopback).");
  std::string url = "http://127.0.0.1:8000";
  flags.AddString("url", &url, "server base URL");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  return NotImplemented("bench", "the load generator is not built yet", err);
}

int RunVersion(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve version", "Prints the version.");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  out << "moe-serve " << MOE_SERVE_VERSION << "\n";
  return 0;
}

}  // namespace moe::cli
