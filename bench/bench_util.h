// Helpers shared by the benchmarks under bench/: what machine a number was taken on, where
// results are stored, and how a measured time becomes a fraction of the machine's limits.
//
// The project states its performance targets as fractions of limits measured on the machine
// itself by `moe-bench-limits` (bench/machine_limits.cc), which writes
// bench/results/machine_limits.json. A model benchmark loads those limits, times its own work
// and reports, for example, the decode roofline fraction:
//
//   MOE_ASSIGN_OR_RETURN(MachineLimits limits, LoadMachineLimits(DefaultLimitsPath()));
//   double fraction = BandwidthFraction(active_weight_bytes * tokens, seconds,
//                                       limits.read_bw_all_cores_gbs * 1e9);
//   BenchRecord record{.name = "decode-olmoe", .machine = CollectMachineInfo(),
//                      .results = {{"tok_per_s", tps}, {"roofline_fraction", fraction}},
//                      .summary = {{"tok/s", FormatNumber(tps, 1)},
//                                  {"roofline", FormatPercent(fraction)}}};
//   MOE_ASSIGN_OR_RETURN(std::string path, WriteBenchRecord(record, {}));
//
// Units: bandwidth in GB/s and throughput in GFLOP/s (powers of ten) in the JSON files; the
// fraction functions take base units (bytes, FLOPs, seconds, per second).
//
// Every function here may be called from any thread; WriteBenchRecord appends to a shared
// Markdown file, so two processes writing at once may interleave rows (benchmarks run one at a
// time).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "nlohmann/json.hpp"

namespace moe::bench {

// --- Machine information ---------------------------------------------------------------

// CPU model, CPU flags of interest, logical CPUs, memory, kernel, compiler, UTC date and time,
// git commit of the source tree and the 1-minute load average at the time of the call (library
// versions are added by the binaries that use the libraries):
//   {"cpu_model": "AMD EPYC", "cpu_flags": {"avx512f": true, "avx512_bf16": true,
//    "amx_bf16": false, ...}, "logical_cpus": 2, "mem_total_bytes": ..., "kernel": "Linux 6.1 ...",
//    "compiler": "GCC 12.2.0", "date": "2026-01-31", "time_utc": "2026-01-31T15:04:05Z",
//    "git_commit": "8992b46", "load_average_1m": 0.12}
// Fields that cannot be read are left out rather than failing.
nlohmann::json CollectMachineInfo();

// Parses the flags line of /proc/cpuinfo (text of the whole file) into the flags of interest
// (avx512f, avx512bw, avx512vl, avx512_bf16, avx512_vnni, avx512_fp16, amx_tile, amx_bf16,
// amx_int8, avx2, fma), each true or false. Exposed for tests.
nlohmann::json ParseCpuFlags(const std::string& cpuinfo);
// The first "model name" of /proc/cpuinfo, or "" when absent. Exposed for tests.
std::string ParseCpuModel(const std::string& cpuinfo);

// Today's date in UTC as YYYY-MM-DD.
std::string TodayUtc();

// --- Roofline fractions ------------------------------------------------------------------

// Achieved fraction of a bandwidth limit: (bytes / seconds) / bytes_per_second_limit.
// For batch-1 decode, bytes = active weight bytes per token × tokens; a fraction of 1 means
// the step ran as fast as streaming those bytes from memory once allows. Returns 0 when
// seconds or the limit are not positive (nothing measured).
double BandwidthFraction(double bytes, double seconds, double bytes_per_second_limit);

// Achieved fraction of a compute limit: (flops / seconds) / flops_per_second_limit.
// A matmul [M,K]×[K,N] counts 2·M·N·K FLOPs. Returns 0 when seconds or the limit are not
// positive.
double ComputeFraction(double flops, double seconds, double flops_per_second_limit);

// 2·M·N·K.
double MatmulFlops(double m, double n, double k);

// --- Machine limits (written by moe-bench-limits) ----------------------------------------

// The headline limits the targets refer to. All-core numbers use every logical CPU.
struct MachineLimits {
  double read_bw_all_cores_gbs = 0;     // read-only sum over a buffer ≫ L3, all cores
  double read_bw_single_core_gbs = 0;   // the same on one core
  double copy_bw_all_cores_gbs = 0;     // STREAM copy, counted as 2 bytes per byte copied
  double copy_bw_single_core_gbs = 0;
  double bf16_peak_gflops = 0;          // dpbf16 microkernel on L1-resident data, all cores
  double bf16_peak_gflops_per_core = 0;
  double onednn_bf16_gflops = 0;        // oneDNN bf16×bf16→f32 matmul at 2048³, all cores
  double openblas_f32_gflops = 0;       // OpenBLAS sgemm at 2048³, all cores
  int cores = 0;                        // threads the all-core numbers used
};

// The limits object stored under "limits" in machine_limits.json, and back. Parsing fails
// with InvalidArgument naming the missing or mistyped field.
nlohmann::json MachineLimitsToJson(const MachineLimits& limits);
absl::StatusOr<MachineLimits> MachineLimitsFromJson(const nlohmann::json& json);

// Reads a machine_limits.json written by moe-bench-limits (its "limits" object). NotFound when
// the file is missing (run moe-bench-limits first), InvalidArgument when it does not parse.
absl::StatusOr<MachineLimits> LoadMachineLimits(const std::string& path);

// The repository's bench/results directory: $MOE_SOURCE_DIR/bench/results when that variable
// is set, else the source directory this binary was built from.
std::string DefaultResultsDir();
// DefaultResultsDir() + "/machine_limits.json".
std::string DefaultLimitsPath();

// --- Results writer ---------------------------------------------------------------------

// One benchmark run to store.
struct BenchRecord {
  std::string name;         // file-name safe: letters, digits, '-', '_', '.'
  nlohmann::json machine;   // usually CollectMachineInfo()
  nlohmann::json results;   // the benchmark's own numbers
  // Columns of the Markdown summary row, in order: (label, formatted value).
  std::vector<std::pair<std::string, std::string>> summary;
};

struct WriteOptions {
  std::string results_dir;  // empty: DefaultResultsDir()
  std::string date;         // YYYY-MM-DD; empty: TodayUtc()
  std::string summary_file = "SUMMARY.md";  // inside results_dir
};

// What WriteBenchRecord wrote.
struct WrittenRecord {
  std::string json_path;     // <results_dir>/<name>-<date>.json
  std::string summary_path;  // <results_dir>/<summary_file>
};

// Writes {"name", "date", "machine", "results"} to <results_dir>/<name>-<date>.json
// (replacing a file of the same day) and appends one row to the Markdown summary, creating it
// with a header when missing:
//   | date | benchmark | commit | load | results |
//   | 2026-01-31 | decode-olmoe | 8992b46 | 0.12 | tok/s 41.2 · roofline 77.0 % |
// InvalidArgument for an empty or unsafe name, Internal when a file cannot be written.
absl::StatusOr<WrittenRecord> WriteBenchRecord(const BenchRecord& record,
                                               const WriteOptions& options);

// The summary row WriteBenchRecord appends, without the trailing newline. Exposed for tests.
std::string SummaryRow(const BenchRecord& record, const std::string& date);

// "12.3" with `digits` decimals; "41.5 %" for a fraction of 0.415.
std::string FormatNumber(double value, int digits);
std::string FormatPercent(double fraction);

}  // namespace moe::bench
