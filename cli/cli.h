// The `moe-serve` command line: one binary, one subcommand per role or tool.
//
//   moe-serve serve --model DIR        all roles in one process
//   moe-serve frontend|attention|expert|scheduler --config FILE
//   moe-serve generate --model DIR --prompt "Hello"
//   moe-serve gen-model --arch qwen3_moe --preset tiny --out DIR
//   moe-serve bench ...   moe-serve version
//
// RunCli returns the process exit status: 0 success, 1 runtime failure, 2 usage error or a
// part that is not implemented yet. Output goes to `out`, diagnostics to `err`. main.cc only
// calls it. Called from the main thread only.
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace moe::cli {

struct Command {
  std::string name;
  std::string summary;
  // args excludes the program and subcommand names.
  std::function<int(const std::vector<std::string>& args, std::ostream& out, std::ostream& err)>
      run;
};

// Every subcommand, in the order `moe-serve --help` lists them.
const std::vector<Command>& Commands();

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace moe::cli
