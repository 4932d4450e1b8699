// serve, frontend, attention, expert, scheduler and bench: the long-running roles.
#include "cli/commands.h"
#include "common/version.h"

namespace moe::cli {
namespace {

// The flags every role shares: the deployment file and overrides of its keys.
struct RoleFlags {
  std::string config;
  std::vector<std::string> sets;
  void Register(common::FlagSet& flags) {
    flags.AddString("config", &config, "deployment YAML file (config/examples/local.yaml)");
    flags.AddRepeated("set", &sets, "override a config key, e.g. --set batching.max_num_seqs=64");
  }
};

int RunRole(const std::string& name, const std::string& usage, const std::string& description,
            const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve " + name + " " + usage, description);
  RoleFlags role;
  role.Register(flags);
  int64_t rank = 0;
  if (name == "attention" || name == "expert") flags.AddInt("rank", &rank, "rank within the role");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  return NotImplemented(name, "the " + name + " role is not built yet", err);
}

}  // namespace

int RunServe(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve serve [--model DIR] [flags]",
                        "Serves a model over the OpenAI-compatible HTTP API and gRPC. With no\n"
                        "model it generates the tiny default model once and serves that.");
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
