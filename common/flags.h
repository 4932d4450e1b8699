// FlagSet: the command-line flags of one subcommand, with typed values and --help text.
//
// Accepts `--name=value`, `--name value`, and `--name` alone for booleans (`--no-name` sets
// false). Repeated flags (AddRepeated) collect every occurrence, e.g. `--set a.b=1 --set c=2`.
// Arguments that are not flags are returned as positionals. Unknown flags, missing values and
// values of the wrong type are InvalidArgument errors that name the flag.
//
//   FlagSet flags("moe-serve generate", "Offline generation.");
//   std::string model; int max_tokens = 16;
//   flags.AddString("model", &model, "model directory");
//   flags.AddInt("max-tokens", &max_tokens, "new tokens to generate");
//   absl::StatusOr<std::vector<std::string>> rest = flags.Parse(args);
//
// Not thread-safe; the bound variables must outlive the FlagSet.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"

namespace moe::common {

class FlagSet {
 public:
  FlagSet(std::string usage, std::string description);

  void AddString(const std::string& name, std::string* value, const std::string& help);
  void AddInt(const std::string& name, int64_t* value, const std::string& help);
  void AddInt(const std::string& name, int* value, const std::string& help);
  void AddDouble(const std::string& name, double* value, const std::string& help);
  void AddBool(const std::string& name, bool* value, const std::string& help);
  void AddRepeated(const std::string& name, std::vector<std::string>* values,
                   const std::string& help);

  // Parses args (without the program and subcommand names). Sets help_requested() on
  // --help / -h and stops there. Returns the positional arguments.
  absl::StatusOr<std::vector<std::string>> Parse(const std::vector<std::string>& args);

  bool help_requested() const { return help_requested_; }
  // Whether the flag appeared on the command line.
  bool WasSet(const std::string& name) const;
  std::string HelpText() const;

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string default_text;
    bool is_bool = false;
    bool seen = false;
    std::function<absl::Status(const std::string&)> set;
  };
  Flag* Find(const std::string& name);
  void Add(Flag flag);

  std::string usage_;
  std::string description_;
  std::vector<Flag> flags_;
  bool help_requested_ = false;
};

}  // namespace moe::common
