#include "cli/cli.h"

#include "cli/commands.h"
#include "common/flags.h"
#include "common/version.h"

namespace moe::cli {
namespace {

std::string TopLevelHelp() {
  std::string text =
      "moe-serve " MOE_SERVE_VERSION " — serves Mixture-of-Experts models with expert parallelism.\n\n"
      "Usage: moe-serve <command> [flags]\n\nCommands:\n";
  for (const Command& c : Commands()) {
    std::string name = "  " + c.name;
    name.resize(14, ' ');
    text += name + c.summary + "\n";
  }
  text += "\nRun `moe-serve <command> --help` for the flags of one command.\n";
  return text;
}

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command>* commands = new std::vector<Command>{
      {"serve", "run the server (all roles in one process, or --local-cluster)", RunServe},
      {"frontend", "run the frontend role (HTTP/gRPC API, batching)", RunFrontend},
      {"attention", "run one attention worker rank", RunAttention},
      {"expert", "run one expert worker rank", RunExpert},
      {"scheduler", "run the placement and membership scheduler", RunScheduler},
      {"generate", "offline generation from the command line", RunGenerate},
      {"gen-model", "write a seeded random model in Hugging Face layout", RunGenModel},
      {"bench", "load generator against a running server", RunBench},
      {"version", "print the version", RunVersion},
  };
  return *commands;
}

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty()) {
    err << TopLevelHelp();
    return 2;
  }
  const std::string& name = args[0];
  if (name == "--help" || name == "-h" || name == "help") {
    out << TopLevelHelp();
    return 0;
  }
  if (name == "--version") return RunVersion({}, out, err);
  for (const Command& c : Commands()) {
    if (c.name == name) {
      return c.run(std::vector<std::string>(args.begin() + 1, args.end()), out, err);
    }
  }
  err << "moe-serve: unknown command \"" << name << "\"\n\n" << TopLevelHelp();
  return 2;
}

int ParseFlagsOrExit(common::FlagSet& flags, const std::vector<std::string>& args,
                     std::ostream& out, std::ostream& err, std::vector<std::string>* positionals) {
  absl::StatusOr<std::vector<std::string>> parsed = flags.Parse(args);
  if (!parsed.ok()) {
    err << "moe-serve: " << parsed.status().message() << "\n\n" << flags.HelpText();
    return 2;
  }
  if (flags.help_requested()) {
    out << flags.HelpText();
    return 0;
  }
  if (positionals != nullptr) {
    *positionals = *std::move(parsed);
  } else if (!parsed->empty()) {
    err << "moe-serve: unexpected argument \"" << parsed->front() << "\"\n\n" << flags.HelpText();
    return 2;
  }
  return -1;
}

int NotImplemented(const std::string& command, const std::string& what, std::ostream& err) {
  err << "moe-serve " << command << ": not implemented yet (" << what << ")\n";
  return 2;
}

}  // namespace moe::cli
