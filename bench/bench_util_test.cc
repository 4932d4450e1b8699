#include "bench/bench_util.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::bench {
namespace {

using ::testing::HasSubstr;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// A fresh directory under the test temp dir, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(std::filesystem::path(::testing::TempDir()) / ("bench_util_test_" + name)) {
    std::filesystem::remove_all(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

TEST(RooflineTest, BandwidthFractionIsAchievedOverLimit) {
  // 30 GB streamed in 1.5 s is 20 GB/s; against a 25 GB/s limit that is 80 %.
  EXPECT_DOUBLE_EQ(BandwidthFraction(30e9, 1.5, 25e9), 0.8);
  // Batch-1 decode: 3 GB of active weights per token, 5 tokens in 1 s, 20 GB/s → 75 %.
  EXPECT_DOUBLE_EQ(BandwidthFraction(3e9 * 5, 1.0, 20e9), 0.75);
}

TEST(RooflineTest, ComputeFractionUsesMatmulFlops) {
  EXPECT_DOUBLE_EQ(MatmulFlops(2048, 2048, 2048), 2.0 * 2048 * 2048 * 2048);
  // 2·1000·1000·1000 = 2e9 FLOPs in 0.01 s is 200 GFLOP/s; of a 400 GFLOP/s peak, 50 %.
  EXPECT_DOUBLE_EQ(ComputeFraction(MatmulFlops(1000, 1000, 1000), 0.01, 400e9), 0.5);
}

TEST(RooflineTest, NothingMeasuredGivesZero) {
  EXPECT_EQ(BandwidthFraction(1e9, 0, 1e9), 0);
  EXPECT_EQ(BandwidthFraction(1e9, 1, 0), 0);
  EXPECT_EQ(ComputeFraction(1e9, -1, 1e9), 0);
  EXPECT_EQ(ComputeFraction(1e9, 1, 0), 0);
}

TEST(FormatTest, NumbersAndPercents) {
  EXPECT_EQ(FormatNumber(12.345, 1), "12.3");
  EXPECT_EQ(FormatNumber(7, 0), "7");
  EXPECT_EQ(FormatPercent(0.415), "41.5 %");
}

TEST(CpuInfoTest, ParsesModelAndFlags) {
  const std::string cpuinfo =
      "processor\t: 0\n"
      "model name\t: AMD EPYC 9R14 96-Core Processor\n"
      "flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni\n"
      "processor\t: 1\n"
      "model name\t: ignored\n";
  EXPECT_EQ(ParseCpuModel(cpuinfo), "AMD EPYC 9R14 96-Core Processor");
  nlohmann::json flags = ParseCpuFlags(cpuinfo);
  EXPECT_TRUE(flags["avx512f"].get<bool>());
  EXPECT_TRUE(flags["avx512_bf16"].get<bool>());
  EXPECT_FALSE(flags["amx_bf16"].get<bool>());
  EXPECT_FALSE(flags["amx_tile"].get<bool>());
  // "avx512f" must not match as a prefix of another flag.
  EXPECT_FALSE(ParseCpuFlags("flags\t: avx512fxyz\n")["avx512f"].get<bool>());
  EXPECT_EQ(ParseCpuModel("no model here\n"), "");
}

TEST(MachineInfoTest, HasTheFieldsBenchmarksReport) {
  nlohmann::json info = CollectMachineInfo();
  EXPECT_TRUE(info.contains("logical_cpus")) << info.dump();
  EXPECT_TRUE(info.contains("compiler")) << info.dump();
  EXPECT_TRUE(info.contains("date")) << info.dump();
  EXPECT_EQ(info["date"].get<std::string>().size(), 10u) << info.dump();
}

MachineLimits SampleLimits() {
  MachineLimits limits;
  limits.read_bw_all_cores_gbs = 40.5;
  limits.read_bw_single_core_gbs = 25.25;
  limits.copy_bw_all_cores_gbs = 30;
  limits.copy_bw_single_core_gbs = 20;
  limits.bf16_peak_gflops = 600;
  limits.bf16_peak_gflops_per_core = 300;
  limits.onednn_bf16_gflops = 400;
  limits.openblas_f32_gflops = 150;
  limits.cores = 2;
  return limits;
}

TEST(MachineLimitsTest, JsonRoundTrip) {
  absl::StatusOr<MachineLimits> back = MachineLimitsFromJson(MachineLimitsToJson(SampleLimits()));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_DOUBLE_EQ(back->read_bw_all_cores_gbs, 40.5);
  EXPECT_DOUBLE_EQ(back->read_bw_single_core_gbs, 25.25);
  EXPECT_DOUBLE_EQ(back->bf16_peak_gflops, 600);
  EXPECT_DOUBLE_EQ(back->onednn_bf16_gflops, 400);
  EXPECT_DOUBLE_EQ(back->openblas_f32_gflops, 150);
  EXPECT_EQ(back->cores, 2);
}

TEST(MachineLimitsTest, MissingFieldIsNamed) {
  nlohmann::json json = MachineLimitsToJson(SampleLimits());
  json.erase("read_bw_all_cores_gbs");
  absl::StatusOr<MachineLimits> limits = MachineLimitsFromJson(json);
  EXPECT_EQ(limits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(limits.status().message()), HasSubstr("read_bw_all_cores_gbs"));
}

TEST(MachineLimitsTest, LoadsTheFileMoeBenchLimitsWrites) {
  TempDir dir("load");
  std::filesystem::create_directories(dir.path());
  std::string path = dir.path() + "/machine_limits.json";
  {
    std::ofstream out(path);
    out << nlohmann::json{{"tool", "moe-bench-limits"}, {"limits", MachineLimitsToJson(SampleLimits())}}
               .dump(2);
  }
  absl::StatusOr<MachineLimits> limits = LoadMachineLimits(path);
  ASSERT_TRUE(limits.ok()) << limits.status();
  EXPECT_DOUBLE_EQ(limits->read_bw_all_cores_gbs, 40.5);

  EXPECT_EQ(LoadMachineLimits(dir.path() + "/absent.json").status().code(),
            absl::StatusCode::kNotFound);
  {
    std::ofstream out(path, std::ios::trunc);
    out << "{not json";
  }
  EXPECT_EQ(LoadMachineLimits(path).status().code(), absl::StatusCode::kInvalidArgument);
}

BenchRecord SampleRecord() {
  BenchRecord record;
  record.name = "decode-tiny";
  record.machine = {{"git_commit", "abc1234"}, {"load_average_1m", 0.125}};
  record.results = {{"tok_per_s", 41.5}, {"roofline_fraction", 0.77}};
  record.summary = {{"tok/s", FormatNumber(41.5, 1)}, {"roofline", FormatPercent(0.77)}};
  return record;
}

TEST(ResultsWriterTest, SummaryRowFormat) {
  EXPECT_EQ(SummaryRow(SampleRecord(), "2026-01-31"),
            "| 2026-01-31 | decode-tiny | abc1234 | 0.12 | tok/s 41.5 · roofline 77.0 % |");
  BenchRecord bare;
  bare.name = "x";
  bare.summary = {{"a", "1|2"}};
  EXPECT_EQ(SummaryRow(bare, "2026-01-31"), "| 2026-01-31 | x | - | - | a 1/2 |");
}

TEST(ResultsWriterTest, WritesJsonAndAppendsSummaryRows) {
  TempDir dir("write");
  WriteOptions options;
  options.results_dir = dir.path();
  options.date = "2026-01-31";
  absl::StatusOr<WrittenRecord> first = WriteBenchRecord(SampleRecord(), options);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->json_path, dir.path() + "/decode-tiny-2026-01-31.json");

  nlohmann::json doc = nlohmann::json::parse(ReadFile(first->json_path));
  EXPECT_EQ(doc["name"], "decode-tiny");
  EXPECT_EQ(doc["date"], "2026-01-31");
  EXPECT_EQ(doc["machine"]["git_commit"], "abc1234");
  EXPECT_DOUBLE_EQ(doc["results"]["tok_per_s"].get<double>(), 41.5);

  ASSERT_TRUE(WriteBenchRecord(SampleRecord(), options).ok());
  std::string summary = ReadFile(first->summary_path);
  EXPECT_THAT(summary, HasSubstr("| date | benchmark | commit | load | results |\n"));
  std::string row = SummaryRow(SampleRecord(), "2026-01-31") + "\n";
  size_t at = summary.find(row);
  ASSERT_NE(at, std::string::npos) << summary;
  EXPECT_NE(summary.find(row, at + row.size()), std::string::npos)
      << "second run should append a second row:\n" << summary;
  EXPECT_EQ(summary.find("| date |"), summary.rfind("| date |")) << "header written twice";
}

TEST(ResultsWriterTest, RejectsUnsafeNames) {
  TempDir dir("names");
  WriteOptions options;
  options.results_dir = dir.path();
  for (const char* name : {"", "../escape", "a/b", ".hidden", "with space"}) {
    BenchRecord record = SampleRecord();
    record.name = name;
    EXPECT_EQ(WriteBenchRecord(record, options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << "name \"" << name << "\"";
  }
}

}  // namespace
}  // namespace moe::bench
