#include "config/config.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string_view>
#include <type_traits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace moe::config {
namespace {

// ---------------------------------------------------------------------------------------------
// Where values come from, and the errors found there.

// The key path and line of one value; line 0 when the source has no lines (--set).
struct Place {
  std::string path;
  int line = 0;
};

// One pass over one source (a file, or one --set). Collects errors in the order they are found
// and remembers where each key was set, so that rules spanning keys can point at a line.
class Context {
 public:
  Context(std::string source, bool has_lines, std::map<std::string, std::string>* origins)
      : source_(std::move(source)), has_lines_(has_lines), origins_(origins) {}

  std::string Where(int line) const {
    return has_lines_ && line > 0 ? absl::StrCat(source_, ":", line) : source_;
  }
  void Error(const Place& place, const std::string& message) {
    errors_.push_back(place.path.empty()
                          ? absl::StrCat(Where(place.line), ": ", message)
                          : absl::StrCat(Where(place.line), ": ", place.path, ": ", message));
  }
  void Seen(const Place& place) {
    if (origins_ != nullptr) (*origins_)[place.path] = Where(place.line);
  }
  int LineOf(const YAML::Node& node) const {
    return has_lines_ && !node.Mark().is_null() ? node.Mark().line + 1 : 0;
  }
  size_t error_count() const { return errors_.size(); }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  bool has_lines_;
  std::map<std::string, std::string>* origins_;
  std::vector<std::string> errors_;
};

// How a value that is not what a key wants reads in a message: `"lots"`, `a mapping`.
std::string Describe(const YAML::Node& node) {
  if (node.IsMap()) return "a mapping";
  if (node.IsSequence()) return "a list";
  if (node.IsNull()) return "an empty value";
  return absl::StrCat("\"", node.Scalar(), "\"");
}

// Edit distance with adjacent transpositions (optimal string alignment).
size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

bool CloseEnough(std::string_view typed, size_t distance) {
  return distance <= std::max<size_t>(1, std::min<size_t>(3, typed.size() / 3));
}

// ---------------------------------------------------------------------------------------------
// The key table. A Key<T> reads one YAML value into a T (the deployment, or one entry of a
// worker list) and writes it back; the loader, overrides and ToYaml all use the same keys.

template <typename T>
struct Key {
  std::string path;  // relative to T: "batching.max_num_seqs", or "rank" inside a list entry
  std::function<void(const YAML::Node& value, T& target, const Place& place, Context& ctx)>
      parse;
  std::function<void(const T& source, YAML::Emitter& out)> emit;
  // --set takes the text of string keys literally instead of reading it as YAML.
  bool literal_override = false;
  // Lists only: applies `path[index].rest=value` to one existing entry.
  std::function<void(T& target, size_t index, const std::string& rest, const std::string& text,
                     const Place& place, Context& ctx)>
      set_entry;
};

template <typename T>
class KeyTable {
 public:
  explicit KeyTable(std::vector<Key<T>> keys) : keys_(std::move(keys)) {
    for (const Key<T>& key : keys_) {
      for (size_t dot = key.path.find('.'); dot != std::string::npos;
           dot = key.path.find('.', dot + 1)) {
        sections_.insert(key.path.substr(0, dot));
      }
    }
  }

  const std::vector<Key<T>>& keys() const { return keys_; }

  const Key<T>* Find(std::string_view path) const {
    for (const Key<T>& key : keys_) {
      if (key.path == path) return &key;
    }
    return nullptr;
  }
  bool IsSection(const std::string& path) const { return sections_.count(path) > 0; }

  // The known key closest to `path` (relative), or "" when none is close. Tries the siblings
  // first, then a key of that name in another section, then whole paths.
  std::string Suggest(const std::string& path) const {
    size_t dot = path.rfind('.');
    std::string parent = dot == std::string::npos ? "" : path.substr(0, dot);
    std::string name = absl::AsciiStrToLower(dot == std::string::npos ? path : path.substr(dot + 1));
    std::string prefix = parent.empty() ? "" : parent + ".";
    if (parent.empty() || IsSection(parent)) {
      std::string best;
      size_t best_distance = std::numeric_limits<size_t>::max();
      for (const std::string& child : Children(prefix)) {
        size_t distance = EditDistance(name, child);
        if (distance < best_distance) {
          best = child;
          best_distance = distance;
        }
      }
      if (!best.empty() && CloseEnough(name, best_distance)) return prefix + best;
    }
    for (const Key<T>& key : keys_) {
      size_t key_dot = key.path.rfind('.');
      if (key_dot != std::string::npos && key.path.substr(key_dot + 1) == name) return key.path;
    }
    std::string best;
    size_t best_distance = std::numeric_limits<size_t>::max();
    std::string lower = absl::AsciiStrToLower(path);
    for (const Key<T>& key : keys_) {
      size_t distance = EditDistance(lower, key.path);
      if (distance < best_distance) {
        best = key.path;
        best_distance = distance;
      }
    }
    return CloseEnough(path, best_distance) ? best : "";
  }

 private:
  // Names of the keys and sections directly under `prefix` ("" or "batching.").
  std::vector<std::string> Children(const std::string& prefix) const {
    std::vector<std::string> children;
    for (const Key<T>& key : keys_) {
      if (key.path.compare(0, prefix.size(), prefix) != 0) continue;
      std::string rest = key.path.substr(prefix.size());
      std::string child = rest.substr(0, rest.find('.'));
      if (std::find(children.begin(), children.end(), child) == children.end()) {
        children.push_back(child);
      }
    }
    return children;
  }

  std::vector<Key<T>> keys_;
  std::set<std::string> sections_;
};

std::string UnknownKeyMessage(const std::string& suggestion) {
  return suggestion.empty() ? "unknown key"
                            : absl::StrCat("unknown key (did you mean ", suggestion, "?)");
}

// Reads the mapping `map` into `target`. `table_prefix` is the mapping's path within the table
// ("" or "batching."), `display_prefix` what comes before that path in messages ("" or
// "roles.expert_workers[1].").
template <typename T>
void ParseMapping(const YAML::Node& map, const KeyTable<T>& table, const std::string& table_prefix,
                  const std::string& display_prefix, T& target, Context& ctx) {
  std::set<std::string> seen;
  for (YAML::const_iterator it = map.begin(); it != map.end(); ++it) {
    YAML::Node name_node = it->first;  // copies: `it->` returns a temporary proxy
    YAML::Node value = it->second;
    Place place{display_prefix + table_prefix, ctx.LineOf(name_node)};
    if (!name_node.IsScalar()) {
      place.path = place.path.empty() ? "" : place.path.substr(0, place.path.size() - 1);
      ctx.Error(place, absl::StrCat("expected a key name, got ", Describe(name_node)));
      continue;
    }
    std::string relative = table_prefix + name_node.Scalar();
    place.path = display_prefix + relative;
    if (!seen.insert(name_node.Scalar()).second) {
      ctx.Error(place, "duplicate key");
      continue;
    }
    if (const Key<T>* key = table.Find(relative)) {
      ctx.Seen(place);
      key->parse(value, target, place, ctx);
    } else if (table.IsSection(relative)) {
      if (value.IsMap()) {
        ParseMapping(value, table, relative + ".", display_prefix, target, ctx);
      } else if (!value.IsNull()) {  // `batching:` with every key commented out is fine
        ctx.Error(place, absl::StrCat("expected a mapping, got ", Describe(value)));
      }
    } else {
      std::string suggestion = table.Suggest(relative);
      ctx.Error(place, UnknownKeyMessage(suggestion.empty() ? "" : display_prefix + suggestion));
    }
  }
}

// Member access by path: MOE_CONFIG_KEY(batching.max_num_seqs) gives the key's name and a
// getter for config.batching.max_num_seqs, so YAML paths and C++ members cannot drift apart.
#define MOE_CONFIG_KEY(member) #member, [](auto& c) -> auto& { return c.member; }

template <typename T, typename Get>
using MemberType = std::remove_cvref_t<decltype(std::declval<Get>()(std::declval<T&>()))>;

// --- Scalars -------------------------------------------------------------------------------

struct IntLimits {
  int64_t min = 0;
  int64_t max = std::numeric_limits<int64_t>::max();
  bool power_of_two = false;
};

std::string ExpectedInt(const IntLimits& limits) {
  std::string what = limits.power_of_two ? "a power of two" : "an integer";
  if (limits.max == std::numeric_limits<int64_t>::max()) {
    return absl::StrCat("expected ", what, " >= ", limits.min);
  }
  return absl::StrCat("expected ", what, " in [", limits.min, ", ", limits.max, "]");
}

template <typename T, typename Get>
Key<T> IntKey(const char* path, Get get, IntLimits limits) {
  using V = MemberType<T, Get>;
  Key<T> key;
  key.path = path;
  key.parse = [get, limits](const YAML::Node& value, T& target, const Place& place,
                            Context& ctx) {
    int64_t parsed = 0;
    if (!value.IsScalar() || !absl::SimpleAtoi(value.Scalar(), &parsed)) {
      ctx.Error(place, absl::StrCat("expected an integer, got ", Describe(value)));
      return;
    }
    bool power_ok = !limits.power_of_two || (parsed > 0 && (parsed & (parsed - 1)) == 0);
    if (parsed < limits.min || parsed > limits.max || !power_ok) {
      ctx.Error(place, absl::StrCat(ExpectedInt(limits), ", got ", parsed));
      return;
    }
    get(target) = static_cast<V>(parsed);
  };
  key.emit = [get](const T& source, YAML::Emitter& out) {
    out << static_cast<int64_t>(get(source));
  };
  return key;
}

struct DoubleLimits {
  double min = 0;
  bool min_exclusive = false;
  double max = std::numeric_limits<double>::infinity();
};

// Shortest text that reads back as the same double.
std::string FormatDouble(double value) {
  char buffer[64];
  auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, result.ptr);
}

template <typename T, typename Get>
Key<T> DoubleKey(const char* path, Get get, DoubleLimits limits) {
  Key<T> key;
  key.path = path;
  key.parse = [get, limits](const YAML::Node& value, T& target, const Place& place,
                            Context& ctx) {
    double parsed = 0;
    if (!value.IsScalar() || !absl::SimpleAtod(value.Scalar(), &parsed) || !std::isfinite(parsed)) {
      ctx.Error(place, absl::StrCat("expected a number, got ", Describe(value)));
      return;
    }
    bool below = limits.min_exclusive ? parsed <= limits.min : parsed < limits.min;
    if (below || parsed > limits.max) {
      std::string expected =
          std::isinf(limits.max)
              ? absl::StrCat("expected a number ", limits.min_exclusive ? "> " : ">= ",
                             FormatDouble(limits.min))
              : absl::StrCat("expected a number in ", limits.min_exclusive ? "(" : "[",
                             FormatDouble(limits.min), ", ", FormatDouble(limits.max), "]");
      ctx.Error(place, absl::StrCat(expected, ", got ", value.Scalar()));
      return;
    }
    get(target) = parsed;
  };
  key.emit = [get](const T& source, YAML::Emitter& out) { out << FormatDouble(get(source)); };
  return key;
}

template <typename T, typename Get>
Key<T> BoolKey(const char* path, Get get) {
  Key<T> key;
  key.path = path;
  key.parse = [get](const YAML::Node& value, T& target, const Place& place, Context& ctx) {
    std::string text = value.IsScalar() ? absl::AsciiStrToLower(value.Scalar()) : "";
    if (text == "true" || text == "yes" || text == "on") {
      get(target) = true;
    } else if (text == "false" || text == "no" || text == "off") {
      get(target) = false;
    } else {
      ctx.Error(place, absl::StrCat("expected true or false, got ", Describe(value)));
    }
  };
  key.emit = [get](const T& source, YAML::Emitter& out) { out << (get(source) ? "true" : "false"); };
  return key;
}

// A string check returns "" when the value is fine, else what was expected.
using StringCheck = std::function<std::string(const std::string&)>;

template <typename T, typename Get>
Key<T> StringKey(const char* path, Get get, StringCheck check = nullptr) {
  Key<T> key;
  key.path = path;
  key.literal_override = true;
  key.parse = [get, check](const YAML::Node& value, T& target, const Place& place,
                           Context& ctx) {
    if (!value.IsScalar() && !value.IsNull()) {
      ctx.Error(place, absl::StrCat("expected a string, got ", Describe(value)));
      return;
    }
    std::string text = value.IsNull() ? "" : value.Scalar();
    if (check) {
      if (std::string expected = check(text); !expected.empty()) {
        ctx.Error(place, absl::StrCat("expected ", expected, ", got \"", text, "\""));
        return;
      }
    }
    get(target) = text;
  };
  key.emit = [get](const T& source, YAML::Emitter& out) {
    out << YAML::DoubleQuoted << get(source);
  };
  return key;
}

template <typename E>
using EnumNames = std::vector<std::pair<std::string, E>>;

template <typename T, typename Get, typename E = MemberType<T, Get>>
Key<T> EnumKey(const char* path, Get get, EnumNames<E> names) {
  Key<T> key;
  key.path = path;
  key.parse = [get, names](const YAML::Node& value, T& target, const Place& place,
                           Context& ctx) {
    if (value.IsScalar()) {
      for (const auto& [name, e] : names) {
        if (name == value.Scalar()) {
          get(target) = e;
          return;
        }
      }
    }
    std::vector<std::string> allowed;
    for (const auto& entry : names) allowed.push_back(entry.first);
    ctx.Error(place, absl::StrCat("expected one of ", absl::StrJoin(allowed, " | "), ", got ",
                                  Describe(value)));
  };
  key.emit = [get, names](const T& source, YAML::Emitter& out) {
    for (const auto& [name, e] : names) {
      if (e == get(source)) {
        out << name;
        return;
      }
    }
    out << YAML::Null;  // unreachable for values the loader produced
  };
  return key;
}

// --- Lists of entries (worker ranks) -------------------------------------------------------

// make_entry(index) gives the defaults of the entry at `index`.
template <typename T, typename Get, typename MakeEntry,
          typename Entry = typename MemberType<T, Get>::value_type>
Key<T> ListKey(const char* path, Get get, const KeyTable<Entry>* entry_table, size_t min_size,
               MakeEntry make_entry) {
  Key<T> key;
  key.path = path;
  key.parse = [get, entry_table, min_size, make_entry](const YAML::Node& value, T& target,
                                                       const Place& place, Context& ctx) {
    if (!value.IsSequence() && !value.IsNull()) {
      ctx.Error(place, absl::StrCat("expected a list, got ", Describe(value)));
      return;
    }
    size_t size = value.IsNull() ? 0 : value.size();
    if (size < min_size) {
      ctx.Error(place, absl::StrCat("expected a list of at least ", min_size, " entries, got ",
                                    size));
      return;
    }
    std::vector<Entry> entries;
    size_t errors_before = ctx.error_count();
    for (size_t i = 0; i < size; ++i) {
      YAML::Node item = value[i];
      std::string item_path = absl::StrCat(place.path, "[", i, "]");
      Entry entry = make_entry(i);
      if (!item.IsMap()) {
        int line = ctx.LineOf(item);
        ctx.Error({item_path, line > 0 ? line : place.line},
                  absl::StrCat("expected a mapping, got ", Describe(item)));
        continue;
      }
      ParseMapping(item, *entry_table, "", item_path + ".", entry, ctx);
      entries.push_back(std::move(entry));
    }
    if (ctx.error_count() == errors_before) get(target) = std::move(entries);
  };
  key.emit = [get, entry_table](const T& source, YAML::Emitter& out) {
    out << YAML::BeginSeq;
    for (const Entry& entry : get(source)) {
      out << YAML::Flow << YAML::BeginMap;
      for (const Key<Entry>& entry_key : entry_table->keys()) {
        out << YAML::Key << entry_key.path << YAML::Value;
        entry_key.emit(entry, out);
      }
      out << YAML::EndMap;
    }
    out << YAML::EndSeq;
  };
  key.set_entry = [get, entry_table](T& target, size_t index, const std::string& rest,
                                     const std::string& text, const Place& place, Context& ctx) {
    auto& entries = get(target);
    if (index >= entries.size()) {
      ctx.Error(place, absl::StrCat("no entry ", index, " (the list has ", entries.size(),
                                    "; set the whole list to add entries)"));
      return;
    }
    const Key<Entry>* entry_key = entry_table->Find(rest);
    if (entry_key == nullptr) {
      std::string suggestion = entry_table->Suggest(rest);
      std::string prefix = place.path.substr(0, place.path.size() - rest.size());
      ctx.Error(place, UnknownKeyMessage(suggestion.empty() ? "" : prefix + suggestion));
      return;
    }
    YAML::Node value = entry_key->literal_override ? YAML::Node(text) : YAML::Load(text);
    entry_key->parse(value, entries[index], place, ctx);
  };
  return key;
}

// --- Checks for string keys ----------------------------------------------------------------

bool ParsePort(const std::string& text, int* port) {
  if (text.empty() || text.size() > 5) return false;
  for (char c : text) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  int value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < 1 || value > 65535) return false;
  *port = value;
  return true;
}

// "inproc", "host:port" or "[ipv6]:port".
std::string CheckAddress(const std::string& text) {
  static const char* kExpected = "\"inproc\" or host:port with a port in [1, 65535]";
  if (text == kInProcess) return "";
  size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) return kExpected;
  std::string host = text.substr(0, colon);
  if (host.front() == '[' ? host.back() != ']' || host.size() < 3
                          : host.find_first_of("[]:") != std::string::npos) {
    return kExpected;
  }
  for (char c : host) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) return kExpected;
  }
  int port = 0;
  return ParsePort(text.substr(colon + 1), &port) ? "" : kExpected;
}

std::string CheckHost(const std::string& text) {
  if (text.empty()) return "a host name or IP address";
  for (char c : text) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) return "a host name or IP address";
  }
  return "";
}

// --- The tables ----------------------------------------------------------------------------

const KeyTable<AttentionWorkerSpec>& AttentionWorkerTable() {
  using W = AttentionWorkerSpec;
  static const auto* table = new KeyTable<W>({
      IntKey<W>(MOE_CONFIG_KEY(rank), {.min = 0}),
      StringKey<W>(MOE_CONFIG_KEY(address), CheckAddress),
  });
  return *table;
}

const KeyTable<ExpertWorkerSpec>& ExpertWorkerTable() {
  using W = ExpertWorkerSpec;
  static const auto* table = new KeyTable<W>({
      IntKey<W>(MOE_CONFIG_KEY(rank), {.min = 0}),
      StringKey<W>(MOE_CONFIG_KEY(address), CheckAddress),
      IntKey<W>(MOE_CONFIG_KEY(num_slots), {.min = 0}),
  });
  return *table;
}

// Every key of the file, in the order ToYaml writes them. Keep config.h and README.md in step.
const KeyTable<DeploymentConfig>& DeploymentTable() {
  using C = DeploymentConfig;
  static const auto* table = new KeyTable<C>({
      StringKey<C>(MOE_CONFIG_KEY(model.path)),
      EnumKey<C>(MOE_CONFIG_KEY(model.dtype), EnumNames<common::DType>{
                                                  {"f32", common::DType::kF32},
                                                  {"bf16", common::DType::kBF16},
                                                  {"f16", common::DType::kF16}}),
      StringKey<C>(MOE_CONFIG_KEY(model.served_name)),
      IntKey<C>(MOE_CONFIG_KEY(model.max_model_len), {.min = 0}),

      EnumKey<C>(MOE_CONFIG_KEY(device),
                 EnumNames<Device>{{"cpu", Device::kCpu}, {"cuda", Device::kCuda}}),
      IntKey<C>(MOE_CONFIG_KEY(threads), {.min = 0, .max = 4096}),

      StringKey<C>(MOE_CONFIG_KEY(server.host), CheckHost),
      IntKey<C>(MOE_CONFIG_KEY(server.http_port), {.min = 0, .max = 65535}),
      IntKey<C>(MOE_CONFIG_KEY(server.grpc_port), {.min = 0, .max = 65535}),
      StringKey<C>(MOE_CONFIG_KEY(server.api_key)),
      IntKey<C>(MOE_CONFIG_KEY(server.max_body_bytes), {.min = 1}),
      DoubleKey<C>(MOE_CONFIG_KEY(server.drain_timeout_s), {.min = 0}),

      IntKey<C>(MOE_CONFIG_KEY(batching.max_num_seqs), {.min = 1}),
      IntKey<C>(MOE_CONFIG_KEY(batching.max_num_batched_tokens), {.min = 1}),
      BoolKey<C>(MOE_CONFIG_KEY(batching.enable_chunked_prefill)),
      IntKey<C>(MOE_CONFIG_KEY(batching.max_waiting_requests), {.min = 1}),

      IntKey<C>(MOE_CONFIG_KEY(kv_cache.block_size), {.min = 1, .max = 1024, .power_of_two = true}),
      IntKey<C>(MOE_CONFIG_KEY(kv_cache.num_blocks), {.min = 0}),
      IntKey<C>(MOE_CONFIG_KEY(kv_cache.memory_bytes), {.min = 0}),
      DoubleKey<C>(MOE_CONFIG_KEY(kv_cache.memory_fraction),
                   {.min = 0, .min_exclusive = true, .max = 1}),

      StringKey<C>(MOE_CONFIG_KEY(roles.frontend.address), CheckAddress),
      StringKey<C>(MOE_CONFIG_KEY(roles.scheduler.address), CheckAddress),
      ListKey<C>(MOE_CONFIG_KEY(roles.attention_workers), &AttentionWorkerTable(), 1,
                 [](size_t i) { return AttentionWorkerSpec{.rank = static_cast<int64_t>(i)}; }),
      ListKey<C>(MOE_CONFIG_KEY(roles.expert_workers), &ExpertWorkerTable(), 1,
                 [](size_t i) { return ExpertWorkerSpec{.rank = static_cast<int64_t>(i)}; }),

      EnumKey<C>(MOE_CONFIG_KEY(placement.policy),
                 EnumNames<PlacementPolicy>{{"static", PlacementPolicy::kStatic},
                                            {"eplb", PlacementPolicy::kEplb}}),
      IntKey<C>(MOE_CONFIG_KEY(placement.redundant_slots), {.min = 0}),
      IntKey<C>(MOE_CONFIG_KEY(placement.rebalance_interval_steps), {.min = 0}),
      IntKey<C>(MOE_CONFIG_KEY(placement.rebalance_window_steps), {.min = 1}),

      IntKey<C>(MOE_CONFIG_KEY(timeouts.heartbeat_ms), {.min = 1}),
      IntKey<C>(MOE_CONFIG_KEY(timeouts.lease_ms), {.min = 1}),
      IntKey<C>(MOE_CONFIG_KEY(timeouts.dispatch_timeout_ms), {.min = 1}),
      IntKey<C>(MOE_CONFIG_KEY(timeouts.connect_timeout_ms), {.min = 1}),

      EnumKey<C>(MOE_CONFIG_KEY(logging.level),
                 EnumNames<common::LogLevel>{{"debug", common::LogLevel::kDebug},
                                             {"info", common::LogLevel::kInfo},
                                             {"warning", common::LogLevel::kWarning},
                                             {"error", common::LogLevel::kError}}),
      EnumKey<C>(MOE_CONFIG_KEY(logging.format),
                 EnumNames<LogFormat>{{"text", LogFormat::kText}, {"json", LogFormat::kJson}}),
  });
  return *table;
}

#undef MOE_CONFIG_KEY

// ---------------------------------------------------------------------------------------------
// Rules that span keys.

using Origins = std::map<std::string, std::string>;

class CrossChecker {
 public:
  explicit CrossChecker(const Origins* origins) : origins_(origins) {}

  // Reports `message` against `path`, placed where `path` (or else `also`) was set.
  void Error(const std::string& path, const std::string& message, const std::string& also = "") {
    std::string where;
    for (const std::string& p : {path, also}) {
      if (origins_ == nullptr || p.empty()) continue;
      auto it = origins_->find(p);
      if (it == origins_->end()) it = origins_->find(p.substr(0, p.find('[')));
      if (it != origins_->end()) {
        where = it->second + ": ";
        break;
      }
    }
    errors_.push_back(absl::StrCat(where, path, ": ", message));
  }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  const Origins* origins_;
  std::vector<std::string> errors_;
};

template <typename Spec>
void CheckRanks(const std::vector<Spec>& workers, const std::string& list, CrossChecker& check) {
  std::map<int64_t, size_t> first_with_rank;
  for (size_t i = 0; i < workers.size(); ++i) {
    std::string path = absl::StrCat(list, "[", i, "].rank");
    int64_t rank = workers[i].rank;
    if (rank >= static_cast<int64_t>(workers.size())) {
      check.Error(path, absl::StrCat("expected a rank in [0, ", workers.size() - 1,
                                     "] (ranks are 0..n-1, one per entry), got ", rank));
    } else if (auto [it, inserted] = first_with_rank.emplace(rank, i); !inserted) {
      check.Error(path, absl::StrCat("rank ", rank, " is already used by ", list, "[",
                                     it->second, "]"));
    }
  }
}

std::vector<std::string> CheckCrossKeyRules(const DeploymentConfig& c, const Origins* origins) {
  CrossChecker check(origins);
  if (c.batching.max_num_batched_tokens < c.batching.max_num_seqs) {
    check.Error("batching.max_num_batched_tokens",
                absl::StrCat("must be >= batching.max_num_seqs (", c.batching.max_num_seqs,
                             "), got ", c.batching.max_num_batched_tokens),
                "batching.max_num_seqs");
  }
  if (!c.batching.enable_chunked_prefill && c.model.max_model_len > 0 &&
      c.batching.max_num_batched_tokens < c.model.max_model_len) {
    check.Error("batching.max_num_batched_tokens",
                absl::StrCat("must be >= model.max_model_len (", c.model.max_model_len,
                             ") when batching.enable_chunked_prefill is false, got ",
                             c.batching.max_num_batched_tokens),
                "batching.enable_chunked_prefill");
  }
  if (c.server.http_port != 0 && c.server.http_port == c.server.grpc_port) {
    check.Error("server.grpc_port",
                absl::StrCat("must differ from server.http_port, both are ", c.server.http_port),
                "server.http_port");
  }
  if (c.kv_cache.num_blocks > 0 && c.kv_cache.memory_bytes > 0) {
    check.Error("kv_cache.memory_bytes",
                "set either kv_cache.num_blocks or kv_cache.memory_bytes, not both",
                "kv_cache.num_blocks");
  }
  if (c.timeouts.lease_ms <= c.timeouts.heartbeat_ms) {
    check.Error("timeouts.lease_ms",
                absl::StrCat("must be > timeouts.heartbeat_ms (", c.timeouts.heartbeat_ms,
                             "), got ", c.timeouts.lease_ms),
                "timeouts.heartbeat_ms");
  }
  CheckRanks(c.roles.attention_workers, "roles.attention_workers", check);
  CheckRanks(c.roles.expert_workers, "roles.expert_workers", check);

  // Two roles cannot listen on one address ("inproc" roles share the process instead).
  std::map<std::string, std::string> owner;
  auto claim = [&](const std::string& address, const std::string& path) {
    if (address == kInProcess) return;
    auto [it, inserted] = owner.emplace(address, path);
    if (!inserted) check.Error(path, absl::StrCat(address, " is already used by ", it->second));
  };
  claim(c.roles.frontend.address, "roles.frontend.address");
  claim(c.roles.scheduler.address, "roles.scheduler.address");
  for (size_t i = 0; i < c.roles.attention_workers.size(); ++i) {
    claim(c.roles.attention_workers[i].address,
          absl::StrCat("roles.attention_workers[", i, "].address"));
  }
  for (size_t i = 0; i < c.roles.expert_workers.size(); ++i) {
    claim(c.roles.expert_workers[i].address,
          absl::StrCat("roles.expert_workers[", i, "].address"));
  }
  return check.errors();
}

absl::Status ErrorsToStatus(const std::vector<std::string>& errors) {
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
}

// ---------------------------------------------------------------------------------------------
// Loading and overriding. yaml-cpp reports problems by throwing; nothing thrown leaves here.

absl::Status ParseDocument(const std::string& text, const std::string& source,
                           DeploymentConfig* config, Origins* origins) {
  Context ctx(source, /*has_lines=*/true, origins);
  try {
    std::vector<YAML::Node> documents = YAML::LoadAll(text);
    if (documents.size() > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx.Where(ctx.LineOf(documents[1])), ": expected one YAML document, found ",
                       documents.size()));
    }
    YAML::Node root = documents.empty() ? YAML::Node() : documents[0];
    if (root.IsNull()) return absl::OkStatus();  // empty file: every default
    if (!root.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx.Where(ctx.LineOf(root)),
                       ": expected a mapping of sections (model, server, batching, ...), got ",
                       Describe(root)));
    }
    DeploymentConfig parsed = *config;
    ParseMapping(root, DeploymentTable(), "", "", parsed, ctx);
    if (ctx.error_count() > 0) return ErrorsToStatus(ctx.errors());
    *config = std::move(parsed);
    return absl::OkStatus();
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx.Where(e.mark.is_null() ? 0 : e.mark.line + 1), ": invalid YAML: ", e.msg));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": cannot read YAML: ", e.what()));
  }
}

absl::Status ApplyOverrideTo(DeploymentConfig* config, const std::string& assignment,
                             Origins* origins) {
  static const std::string kSource = "--set";
  Context ctx(kSource, /*has_lines=*/false, origins);
  size_t equals = assignment.find('=');
  std::string path(absl::StripAsciiWhitespace(assignment.substr(0, equals)));
  if (equals == std::string::npos || path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kSource, ": expected key.path=value, got \"", assignment, "\""));
  }
  std::string text = assignment.substr(equals + 1);
  const KeyTable<DeploymentConfig>& table = DeploymentTable();

  // `roles.expert_workers[2].address`: one field of one list entry.
  std::string list_path = path;
  size_t index = 0;
  std::string rest;
  if (size_t open = path.find('['); open != std::string::npos) {
    size_t close = path.find(']', open);
    list_path = path.substr(0, open);
    if (close == std::string::npos || close + 1 >= path.size() || path[close + 1] != '.' ||
        !absl::SimpleAtoi(path.substr(open + 1, close - open - 1), &index)) {
      return absl::InvalidArgumentError(absl::StrCat(
          kSource, ": ", path, ": expected list[index].key, e.g. roles.expert_workers[0].address"));
    }
    rest = path.substr(close + 2);
  }
  const Key<DeploymentConfig>* key = table.Find(list_path);
  bool is_section = key == nullptr && rest.empty() && table.IsSection(path);
  if ((key == nullptr && !is_section) || (!rest.empty() && !key->set_entry)) {
    std::string suggestion = table.Suggest(list_path);
    return absl::InvalidArgumentError(
        absl::StrCat(kSource, ": ", path, ": ", UnknownKeyMessage(suggestion)));
  }

  if (origins != nullptr) {  // the override replaces what the file said about this subtree
    for (auto it = origins->lower_bound(path);
         it != origins->end() && it->first.compare(0, path.size(), path) == 0;) {
      char next = it->first.size() > path.size() ? it->first[path.size()] : '.';
      it = next == '.' || next == '[' ? origins->erase(it) : std::next(it);
    }
  }
  try {
    DeploymentConfig updated = *config;
    Place place{path, 0};
    if (!rest.empty()) {
      key->set_entry(updated, index, rest, text, place, ctx);
    } else if (key != nullptr) {
      YAML::Node value = key->literal_override ? YAML::Node(text) : YAML::Load(text);
      key->parse(value, updated, place, ctx);
    } else if (YAML::Node value = YAML::Load(text); value.IsMap()) {
      ParseMapping(value, table, path + ".", "", updated, ctx);
    } else {
      ctx.Error(place, absl::StrCat("expected a mapping, got ", Describe(value)));
    }
    if (ctx.error_count() > 0) return ErrorsToStatus(ctx.errors());
    ctx.Seen(place);
    *config = std::move(updated);
    return absl::OkStatus();
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(kSource, ": ", path, ": invalid YAML value: ", e.msg));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(kSource, ": ", path, ": ", e.what()));
  }
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (file == nullptr) {
    int error = errno;
    std::string message = absl::StrCat(path, ": cannot open: ", std::strerror(error));
    if (error == ENOENT) return absl::NotFoundError(message);
    if (error == EACCES) return absl::PermissionDeniedError(message);
    return absl::InvalidArgumentError(message);
  }
  std::string text;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file.get())) > 0) text.append(buffer, n);
  if (std::ferror(file.get())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot read: ", std::strerror(errno)));
  }
  return text;
}

absl::StatusOr<DeploymentConfig> LoadFileInto(const std::string& path, Origins* origins) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  DeploymentConfig config;
  MOE_RETURN_IF_ERROR(ParseDocument(text, path, &config, origins));
  return config;
}

}  // namespace

absl::StatusOr<DeploymentConfig> LoadConfigString(const std::string& text,
                                                  const std::string& source_name) {
  Origins origins;
  DeploymentConfig config;
  MOE_RETURN_IF_ERROR(ParseDocument(text, source_name, &config, &origins));
  MOE_RETURN_IF_ERROR(ErrorsToStatus(CheckCrossKeyRules(config, &origins)));
  return config;
}

absl::StatusOr<DeploymentConfig> LoadConfigFile(const std::string& path) {
  Origins origins;
  MOE_ASSIGN_OR_RETURN(DeploymentConfig config, LoadFileInto(path, &origins));
  MOE_RETURN_IF_ERROR(ErrorsToStatus(CheckCrossKeyRules(config, &origins)));
  return config;
}

absl::Status ApplyOverride(DeploymentConfig* config, const std::string& assignment) {
  return ApplyOverrideTo(config, assignment, /*origins=*/nullptr);
}

absl::Status Validate(const DeploymentConfig& config) {
  return ErrorsToStatus(CheckCrossKeyRules(config, /*origins=*/nullptr));
}

absl::StatusOr<DeploymentConfig> LoadDeployment(const LoadOptions& options) {
  Origins origins;
  DeploymentConfig config;
  if (!options.path.empty()) {
    MOE_ASSIGN_OR_RETURN(config, LoadFileInto(options.path, &origins));
  }
  for (const std::string& assignment : options.overrides) {
    MOE_RETURN_IF_ERROR(ApplyOverrideTo(&config, assignment, &origins));
  }
  MOE_RETURN_IF_ERROR(ErrorsToStatus(CheckCrossKeyRules(config, &origins)));
  return config;
}

std::string ToYaml(const DeploymentConfig& config) {
  try {
    YAML::Emitter out;
    out << YAML::Comment("moe-serve deployment (every key; see config/README.md)");
    out << YAML::BeginMap;
    std::vector<std::string> open;  // sections currently open, outermost first
    for (const Key<DeploymentConfig>& key : DeploymentTable().keys()) {
      std::vector<std::string> parts;
      for (size_t start = 0;;) {
        size_t dot = key.path.find('.', start);
        parts.push_back(key.path.substr(start, dot - start));
        if (dot == std::string::npos) break;
        start = dot + 1;
      }
      size_t common = 0;
      while (common < open.size() && common + 1 < parts.size() && open[common] == parts[common]) {
        ++common;
      }
      while (open.size() > common) {
        out << YAML::EndMap;
        open.pop_back();
      }
      for (size_t i = common; i + 1 < parts.size(); ++i) {
        out << YAML::Key << parts[i] << YAML::Value << YAML::BeginMap;
        open.push_back(parts[i]);
      }
      out << YAML::Key << parts.back() << YAML::Value;
      key.emit(config, out);
    }
    while (!open.empty()) {
      out << YAML::EndMap;
      open.pop_back();
    }
    out << YAML::EndMap;
    return std::string(out.c_str()) + "\n";
  } catch (const std::exception& e) {
    return absl::StrCat("# cannot write the configuration: ", e.what(), "\n");
  }
}

std::vector<KeyInfo> Keys() {
  std::vector<KeyInfo> keys;
  DeploymentConfig defaults;
  for (const Key<DeploymentConfig>& key : DeploymentTable().keys()) {
    YAML::Emitter out;
    key.emit(defaults, out);
    keys.push_back({key.path, out.c_str()});
  }
  for (const Key<AttentionWorkerSpec>& key : AttentionWorkerTable().keys()) {
    YAML::Emitter out;
    key.emit(AttentionWorkerSpec{}, out);
    keys.push_back({"roles.attention_workers[]." + key.path, out.c_str()});
  }
  for (const Key<ExpertWorkerSpec>& key : ExpertWorkerTable().keys()) {
    YAML::Emitter out;
    key.emit(ExpertWorkerSpec{}, out);
    keys.push_back({"roles.expert_workers[]." + key.path, out.c_str()});
  }
  return keys;
}

}  // namespace moe::config
