#include "common/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moe::common {

FlagSet::FlagSet(std::string usage, std::string description)
    : usage_(std::move(usage)), description_(std::move(description)) {}

void FlagSet::Add(Flag flag) { flags_.push_back(std::move(flag)); }

void FlagSet::AddString(const std::string& name, std::string* value, const std::string& help) {
  Add({name, help, value->empty() ? "" : "\"" + *value + "\"", false, false,
       [value](const std::string& v) {
         *value = v;
         return absl::OkStatus();
       }});
}

void FlagSet::AddInt(const std::string& name, int64_t* value, const std::string& help) {
  Add({name, help, absl::StrCat(*value), false, false, [name, value](const std::string& v) {
         if (!absl::SimpleAtoi(v, value)) {
           return absl::InvalidArgumentError(
               absl::StrCat("flag --", name, ": expected an integer, got \"", v, "\""));
         }
         return absl::OkStatus();
       }});
}

void FlagSet::AddInt(const std::string& name, int* value, const std::string& help) {
  Add({name, help, absl::StrCat(*value), false, false, [name, value](const std::string& v) {
         if (!absl::SimpleAtoi(v, value)) {
           return absl::InvalidArgumentError(
               absl::StrCat("flag --", name, ": expected an integer, got \"", v, "\""));
         }
         return absl::OkStatus();
       }});
}

void FlagSet::AddDouble(const std::string& name, double* value, const std::string& help) {
  Add({name, help, absl::StrCat(*value), false, false, [name, value](const std::string& v) {
         if (!absl::SimpleAtod(v, value)) {
           return absl::InvalidArgumentError(
               absl::StrCat("flag --", name, ": expected a number, got \"", v, "\""));
         }
         return absl::OkStatus();
       }});
}

void FlagSet::AddBool(const std::string& name, bool* value, const std::string& help) {
  Add({name, help, *value ? "true" : "false", true, false, [name, value](const std::string& v) {
         if (v == "true" || v == "1" || v.empty()) {
           *value = true;
         } else if (v == "false" || v == "0") {
           *value = false;
         } else {
           return absl::InvalidArgumentError(
               absl::StrCat("flag --", name, ": expected true or false, got \"", v, "\""));
         }
         return absl::OkStatus();
       }});
}

void FlagSet::AddRepeated(const std::string& name, std::vector<std::string>* values,
                          const std::string& help) {
  Add({name, help + " (repeatable)", "", false, false, [values](const std::string& v) {
         values->push_back(v);
         return absl::OkStatus();
       }});
}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

bool FlagSet::WasSet(const std::string& name) const {
  for (const Flag& f : flags_) {
    if (f.name == name) return f.seen;
  }
  return false;
}

absl::StatusOr<std::vector<std::string>> FlagSet::Parse(const std::vector<std::string>& args) {
  std::vector<std::string> positionals;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return positionals;
    }
    if (arg == "--") {
      positionals.insert(positionals.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      if (arg.size() > 1 && arg[0] == '-' && !(arg[1] >= '0' && arg[1] <= '9')) {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg));
      }
      positionals.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    Flag* flag = Find(name);
    if (flag == nullptr && !has_value && name.rfind("no-", 0) == 0) {
      Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->is_bool) {
        negated->seen = true;
        MOE_RETURN_IF_ERROR(negated->set("false"));
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (!has_value && !flag->is_bool) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    flag->seen = true;
    MOE_RETURN_IF_ERROR(flag->set(value));
  }
  return positionals;
}

std::string FlagSet::HelpText() const {
  std::string out = absl::StrCat("Usage: ", usage_, "\n\n", description_, "\n");
  if (!flags_.empty()) out += "\nFlags:\n";
  for (const Flag& f : flags_) {
    std::string left = absl::StrCat("  --", f.name, f.is_bool ? "" : " VALUE");
    if (left.size() < 28) left.resize(28, ' ');
    else left += "\n" + std::string(28, ' ');
    out += absl::StrCat(left, f.help);
    if (!f.default_text.empty()) out += absl::StrCat(" (default ", f.default_text, ")");
    out += "\n";
  }
  out += absl::StrCat("  --help", std::string(22, ' '), "show this help\n");
  return out;
}

}  // namespace moe::common
