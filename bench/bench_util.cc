#include "bench/bench_util.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

#ifndef MOE_BENCH_SOURCE_DIR
#define MOE_BENCH_SOURCE_DIR "."
#endif

namespace moe::bench {
namespace {

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// The first line of a command's stdout, or "" when it fails.
std::string FirstLineOfCommand(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return "";
  char buffer[256] = {};
  std::string line;
  if (fgets(buffer, sizeof(buffer), pipe) != nullptr) line = buffer;
  if (pclose(pipe) != 0) return "";
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  return line;
}

std::string SourceDir() {
  const char* env = std::getenv("MOE_SOURCE_DIR");
  if (env != nullptr && *env != '\0') return env;
  return MOE_BENCH_SOURCE_DIR;
}

std::string CompilerVersion() {
#if defined(__clang__)
  return absl::StrCat("clang ", __clang_version__);
#elif defined(__GNUC__)
  return absl::StrCat("GCC ", __VERSION__);
#else
  return "unknown";
#endif
}

bool IsSafeName(const std::string& name) {
  if (name.empty() || name[0] == '.') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

// Reads json[key] as a number into *out; InvalidArgument naming the field otherwise.
absl::Status ReadNumber(const nlohmann::json& json, const char* key, double* out) {
  auto it = json.find(key);
  if (it == json.end() || !it->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat("limits.", key, ": missing or not a number"));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

}  // namespace

std::string ParseCpuModel(const std::string& cpuinfo) {
  for (absl::string_view line : absl::StrSplit(cpuinfo, '\n')) {
    if (!absl::ConsumePrefix(&line, "model name")) continue;
    size_t colon = line.find(':');
    if (colon == absl::string_view::npos) continue;
    return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return "";
}

nlohmann::json ParseCpuFlags(const std::string& cpuinfo) {
  static constexpr const char* kFlagsOfInterest[] = {
      "avx2",        "fma",         "avx512f",  "avx512bw", "avx512vl", "avx512_bf16",
      "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"};
  std::vector<std::string> present;
  for (absl::string_view line : absl::StrSplit(cpuinfo, '\n')) {
    if (!absl::ConsumePrefix(&line, "flags")) continue;
    size_t colon = line.find(':');
    if (colon == absl::string_view::npos) continue;
    for (absl::string_view flag : absl::StrSplit(line.substr(colon + 1), ' ', absl::SkipEmpty())) {
      present.emplace_back(flag);
    }
    break;  // every CPU lists the same flags
  }
  nlohmann::json flags = nlohmann::json::object();
  for (const char* name : kFlagsOfInterest) {
    flags[name] = std::find(present.begin(), present.end(), name) != present.end();
  }
  return flags;
}

std::string TodayUtc() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buffer[16];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%d", &tm);
  return buffer;
}

nlohmann::json CollectMachineInfo() {
  nlohmann::json info = nlohmann::json::object();
  std::string cpuinfo = ReadWholeFile("/proc/cpuinfo");
  if (!cpuinfo.empty()) {
    info["cpu_model"] = ParseCpuModel(cpuinfo);
    info["cpu_flags"] = ParseCpuFlags(cpuinfo);
  }
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (cpus > 0) info["logical_cpus"] = cpus;
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) {
    info["mem_total_bytes"] = static_cast<int64_t>(pages) * page_size;
  }
  utsname uts{};
  if (uname(&uts) == 0) {
    info["kernel"] = absl::StrCat(uts.sysname, " ", uts.release, " ", uts.machine);
  }
  info["compiler"] = CompilerVersion();

  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &tm);
  info["date"] = TodayUtc();
  info["time_utc"] = stamp;

  std::string commit =
      FirstLineOfCommand(absl::StrCat("git -C '", SourceDir(), "' rev-parse --short HEAD 2>/dev/null"));
  if (!commit.empty()) info["git_commit"] = commit;

  double load[1] = {0};
  if (getloadavg(load, 1) == 1) info["load_average_1m"] = load[0];
  return info;
}

double BandwidthFraction(double bytes, double seconds, double bytes_per_second_limit) {
  if (seconds <= 0 || bytes_per_second_limit <= 0) return 0;
  return bytes / seconds / bytes_per_second_limit;
}

double ComputeFraction(double flops, double seconds, double flops_per_second_limit) {
  if (seconds <= 0 || flops_per_second_limit <= 0) return 0;
  return flops / seconds / flops_per_second_limit;
}

double MatmulFlops(double m, double n, double k) { return 2.0 * m * n * k; }

nlohmann::json MachineLimitsToJson(const MachineLimits& limits) {
  return {
      {"read_bw_all_cores_gbs", limits.read_bw_all_cores_gbs},
      {"read_bw_single_core_gbs", limits.read_bw_single_core_gbs},
      {"copy_bw_all_cores_gbs", limits.copy_bw_all_cores_gbs},
      {"copy_bw_single_core_gbs", limits.copy_bw_single_core_gbs},
      {"bf16_peak_gflops", limits.bf16_peak_gflops},
      {"bf16_peak_gflops_per_core", limits.bf16_peak_gflops_per_core},
      {"onednn_bf16_gflops", limits.onednn_bf16_gflops},
      {"openblas_f32_gflops", limits.openblas_f32_gflops},
      {"cores", limits.cores},
  };
}

absl::StatusOr<MachineLimits> MachineLimitsFromJson(const nlohmann::json& json) {
  if (!json.is_object()) return absl::InvalidArgumentError("limits: not an object");
  MachineLimits limits;
  MOE_RETURN_IF_ERROR(ReadNumber(json, "read_bw_all_cores_gbs", &limits.read_bw_all_cores_gbs));
  MOE_RETURN_IF_ERROR(
      ReadNumber(json, "read_bw_single_core_gbs", &limits.read_bw_single_core_gbs));
  MOE_RETURN_IF_ERROR(ReadNumber(json, "copy_bw_all_cores_gbs", &limits.copy_bw_all_cores_gbs));
  MOE_RETURN_IF_ERROR(
      ReadNumber(json, "copy_bw_single_core_gbs", &limits.copy_bw_single_core_gbs));
  MOE_RETURN_IF_ERROR(ReadNumber(json, "bf16_peak_gflops", &limits.bf16_peak_gflops));
  MOE_RETURN_IF_ERROR(
      ReadNumber(json, "bf16_peak_gflops_per_core", &limits.bf16_peak_gflops_per_core));
  // The library numbers are absent (0) when moe-bench-limits ran without oneDNN/OpenBLAS.
  limits.onednn_bf16_gflops = json.value("onednn_bf16_gflops", 0.0);
  limits.openblas_f32_gflops = json.value("openblas_f32_gflops", 0.0);
  double cores = 0;
  MOE_RETURN_IF_ERROR(ReadNumber(json, "cores", &cores));
  limits.cores = static_cast<int>(cores);
  return limits;
}

absl::StatusOr<MachineLimits> LoadMachineLimits(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot open (run moe-bench-limits --json ", path, " first)"));
  }
  nlohmann::json json = nlohmann::json::parse(in, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not JSON"));
  if (!json.contains("limits")) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no \"limits\" object"));
  }
  absl::StatusOr<MachineLimits> limits = MachineLimitsFromJson(json["limits"]);
  if (!limits.ok()) return common::Annotate(limits.status(), path);
  return limits;
}

std::string DefaultResultsDir() { return SourceDir() + "/bench/results"; }

std::string DefaultLimitsPath() { return DefaultResultsDir() + "/machine_limits.json"; }

std::string FormatNumber(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", digits, value);
  return buffer;
}

std::string FormatPercent(double fraction) { return FormatNumber(fraction * 100.0, 1) + " %"; }

std::string SummaryRow(const BenchRecord& record, const std::string& date) {
  std::vector<std::string> cells;
  for (const auto& [label, value] : record.summary) cells.push_back(label + " " + value);
  std::string commit = "-", load = "-";
  if (record.machine.is_object()) {
    commit = record.machine.value("git_commit", commit);
    auto it = record.machine.find("load_average_1m");
    if (it != record.machine.end() && it->is_number()) load = FormatNumber(it->get<double>(), 2);
  }
  std::string results = absl::StrJoin(cells, " · ");
  // A '|' inside a cell would split the Markdown table.
  for (char& c : results) {
    if (c == '|') c = '/';
  }
  return absl::StrCat("| ", date, " | ", record.name, " | ", commit, " | ", load, " | ", results,
                      " |");
}

absl::StatusOr<WrittenRecord> WriteBenchRecord(const BenchRecord& record,
                                               const WriteOptions& options) {
  if (!IsSafeName(record.name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("record.name: \"", record.name,
                     "\" must be non-empty letters, digits, '-', '_' or '.'"));
  }
  std::string dir = options.results_dir.empty() ? DefaultResultsDir() : options.results_dir;
  std::string date = options.date.empty() ? TodayUtc() : options.date;
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat(dir, ": cannot create: ", error.message()));
  }

  WrittenRecord written;
  written.json_path = absl::StrCat(dir, "/", record.name, "-", date, ".json");
  written.summary_path = absl::StrCat(dir, "/", options.summary_file);

  nlohmann::json doc = {{"name", record.name},
                        {"date", date},
                        {"machine", record.machine},
                        {"results", record.results}};
  {
    std::ofstream out(written.json_path, std::ios::trunc);
    out << doc.dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat(written.json_path, ": write failed"));
  }

  bool fresh = !std::filesystem::exists(written.summary_path);
  std::ofstream out(written.summary_path, std::ios::app);
  if (fresh) {
    out << "# Benchmark results\n\n"
        << "One row per run, appended by the benchmarks (bench/bench_util.h). The full numbers "
           "are in the JSON file named after the benchmark and the date.\n\n"
        << "| date | benchmark | commit | load | results |\n"
        << "|---|---|---|---|---|\n";
  }
  out << SummaryRow(record, date) << "\n";
  if (!out) return absl::InternalError(absl::StrCat(written.summary_path, ": write failed"));
  return written;
}

}  // namespace moe::bench
