#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/dtype.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "gtest/gtest.h"

namespace moe::common {
namespace {

absl::StatusOr<int> ParsePositive(int v) {
  if (v <= 0) return absl::InvalidArgumentError("value must be positive");
  return v;
}

absl::StatusOr<int> Doubled(int v) {
  MOE_ASSIGN_OR_RETURN(int parsed, ParsePositive(v));
  return parsed * 2;
}

absl::Status CheckBoth(int a, int b) {
  MOE_RETURN_IF_ERROR(ParsePositive(a).status());
  MOE_RETURN_IF_ERROR(Annotate(ParsePositive(b).status(), "field b"));
  return absl::OkStatus();
}

TEST(StatusTest, AssignOrReturnPassesValueAndError) {
  ASSERT_TRUE(Doubled(4).ok());
  EXPECT_EQ(*Doubled(4), 8);
  absl::StatusOr<int> bad = Doubled(-1);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "value must be positive");
}

TEST(StatusTest, ReturnIfErrorAndAnnotateKeepCode) {
  EXPECT_TRUE(CheckBoth(1, 2).ok());
  absl::Status s = CheckBoth(1, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "field b: value must be positive");
  EXPECT_TRUE(Annotate(absl::OkStatus(), "ctx").ok());
}

TEST(StatusTest, CodeNames) {
  EXPECT_EQ(StatusCodeName(absl::StatusCode::kResourceExhausted), "resource_exhausted");
  EXPECT_EQ(StatusCodeName(absl::StatusCode::kUnavailable), "unavailable");
}

TEST(LoggingTest, StructuredFieldsAndLevels) {
  std::string sink;
  SetLogSinkForTest(&sink);
  LogLevel old = GetLogLevel();
  SetLogLevel(LogLevel::kInfo);
  MOE_LOG(INFO) << "placement committed" << Kv("epoch", 7) << Kv("note", "two words");
  MOE_LOG(DEBUG) << "hidden";
  SetLogLevel(old);
  SetLogSinkForTest(nullptr);
  EXPECT_NE(sink.find(" I common_test.cc:"), std::string::npos) << sink;
  EXPECT_NE(sink.find("placement committed epoch=7 note=\"two words\"\n"), std::string::npos)
      << sink;
  EXPECT_EQ(sink.find("hidden"), std::string::npos);
}

TEST(LoggingTest, ParseLevel) {
  LogLevel level;
  EXPECT_TRUE(ParseLogLevel("WARNING", &level));
  EXPECT_EQ(level, LogLevel::kWarning);
  EXPECT_FALSE(ParseLogLevel("loud", &level));
}

TEST(LoggingDeathTest, CheckAborts) {
  EXPECT_DEATH({ MOE_CHECK(1 + 1 == 3) << "arithmetic"; }, "Check failed: 1 \\+ 1 == 3 arithmetic");
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.5f)), 1.5f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

TEST(DTypeTest, F16RoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(F16ToF32(F32ToF16(f)), f) << f;
  }
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(1e6f))));
  DType d;
  EXPECT_TRUE(ParseDType("BF16", &d));
  EXPECT_EQ(d, DType::kBF16);
  EXPECT_FALSE(ParseDType("F8_E4M3", &d));
}

TEST(TensorTest, ViewsRowsAndSlices) {
  Tensor t(DType::kF32, {3, 4});
  TensorView v = t.view();
  EXPECT_EQ(v.numel(), 12);
  EXPECT_TRUE(v.is_contiguous());
  v.at<float>(1, 2) = 5.0f;
  EXPECT_EQ(v.Row(1).at<float>(2), 5.0f);
  TensorView s = v.Slice(1, 3);
  EXPECT_EQ(s.dim(0), 2);
  EXPECT_EQ(s.at<float>(0, 2), 5.0f);
  EXPECT_EQ(v.DebugString(), "f32[3, 4]");
  TensorView transposed(t.data(), DType::kF32, {4, 3}, {1, 4});
  EXPECT_FALSE(transposed.is_contiguous());
  EXPECT_EQ(transposed.at<float>(2, 1), 5.0f);
}

TEST(ThreadPoolTest, CoversEveryIndexOnce) {
  ThreadPool pool(3);
  for (int64_t n : {1, 7, 1000, 4097}) {
    std::vector<std::atomic<int>> hits(n);
    pool.ParallelFor(n, 3, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPoolTest, ManyShortLoops) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  for (int iter = 0; iter < 2000; ++iter) {
    pool.ParallelFor(16, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum.fetch_add(i);
    });
  }
  EXPECT_EQ(sum.load(), 2000 * 120);
}

}  // namespace
}  // namespace moe::common

#include "common/flags.h"

namespace moe::common {
namespace {

TEST(FlagSetTest, ParsesTypedFlagsAndPositionals) {
  std::string model;
  int64_t port = 8000;
  double temp = 1.0;
  bool verbose = false;
  std::vector<std::string> sets;
  FlagSet flags("moe-serve x", "test");
  flags.AddString("model", &model, "model dir");
  flags.AddInt("port", &port, "port");
  flags.AddDouble("temperature", &temp, "t");
  flags.AddBool("verbose", &verbose, "v");
  flags.AddRepeated("set", &sets, "override");
  auto rest = flags.Parse({"--model", "/m", "--port=9000", "pos", "--temperature", "0.5",
                           "--verbose", "--set", "a.b=1", "--set=c=2"});
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(model, "/m");
  EXPECT_EQ(port, 9000);
  EXPECT_EQ(temp, 0.5);
  EXPECT_TRUE(verbose);
  EXPECT_EQ(sets, (std::vector<std::string>{"a.b=1", "c=2"}));
  EXPECT_EQ(*rest, std::vector<std::string>{"pos"});
  EXPECT_TRUE(flags.WasSet("port"));
  EXPECT_FALSE(flags.help_requested());
}

TEST(FlagSetTest, ErrorsNameTheFlag) {
  int64_t port = 0;
  bool b = true;
  FlagSet flags("moe-serve x", "test");
  flags.AddInt("port", &port, "port");
  flags.AddBool("b", &b, "b");
  EXPECT_EQ(flags.Parse({"--bogus"}).status().message(), "unknown flag --bogus");
  EXPECT_EQ(flags.Parse({"--port", "abc"}).status().message(),
            "flag --port: expected an integer, got \"abc\"");
  EXPECT_EQ(flags.Parse({"--port"}).status().message(), "flag --port needs a value");
  EXPECT_EQ(flags.Parse({"-x"}).status().message(), "unknown flag -x");
  ASSERT_TRUE(flags.Parse({"--no-b"}).ok());
  EXPECT_FALSE(b);
}

TEST(FlagSetTest, HelpListsFlags) {
  int64_t port = 8000;
  FlagSet flags("moe-serve serve [flags]", "Serve a model.");
  flags.AddInt("port", &port, "HTTP port");
  ASSERT_TRUE(flags.Parse({"--help"}).ok());
  EXPECT_TRUE(flags.help_requested());
  std::string help = flags.HelpText();
  EXPECT_NE(help.find("Usage: moe-serve serve [flags]"), std::string::npos);
  EXPECT_NE(help.find("--port VALUE"), std::string::npos);
  EXPECT_NE(help.find("(default 8000)"), std::string::npos);
}

}  // namespace
}  // namespace moe::common
