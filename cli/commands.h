// The subcommands behind cli.h, one function each, and the helpers they share.
// Each returns a process exit status (see cli.h).
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "common/flags.h"

namespace moe::cli {

using Args = std::vector<std::string>;

int RunServe(const Args& args, std::ostream& out, std::ostream& err);
int RunFrontend(const Args& args, std::ostream& out, std::ostream& err);
int RunAttention(const Args& args, std::ostream& out, std::ostream& err);
int RunExpert(const Args& args, std::ostream& out, std::ostream& err);
int RunScheduler(const Args& args, std::ostream& out, std::ostream& err);
int RunGenerate(const Args& args, std::ostream& out, std::ostream& err);
int RunGenModel(const Args& args, std::ostream& out, std::ostream& err);
int RunBench(const Args& args, std::ostream& out, std::ostream& err);
int RunVersion(const Args& args, std::ostream& out, std::ostream& err);

// Parses flags. Returns -1 to continue, or the exit status to return now (0 after --help,
// 2 after a bad flag, with the message and help printed). When positionals is null, any
// positional argument is an error.
int ParseFlagsOrExit(common::FlagSet& flags, const Args& args, std::ostream& out,
                     std::ostream& err, std::vector<std::string>* positionals = nullptr);

// Prints "moe-serve <command>: not implemented yet (<what>)" and returns 2.
int NotImplemented(const std::string& command, const std::string& what, std::ostream& err);

}  // namespace moe::cli
