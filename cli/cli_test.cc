#include "cli/cli.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

namespace moe::cli {
namespace {

struct Result {
  int rc;
  std::string out, err;
};

Result RunArgs(std::vector<std::string> args) {
  std::ostringstream out, err;
  int rc = RunCli(args, out, err);
  return {rc, out.str(), err.str()};
}

TEST(CliTest, TopLevelHelpListsEveryCommand) {
  Result r = RunArgs({"--help"});
  EXPECT_EQ(r.rc, 0);
  for (const Command& c : Commands()) {
    EXPECT_NE(r.out.find("  " + c.name), std::string::npos) << c.name;
  }
}

TEST(CliTest, EverySubcommandHasHelp) {
  for (const Command& c : Commands()) {
    Result r = RunArgs({c.name, "--help"});
    EXPECT_EQ(r.rc, 0) << c.name << ": " << r.err;
    EXPECT_NE(r.out.find("Usage: moe-serve " + c.name), std::string::npos) << c.name << r.out;
  }
}

TEST(CliTest, UnknownCommandIsUsageError) {
  Result r = RunArgs({"frobnicate"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("unknown command \"frobnicate\""), std::string::npos) << r.err;
}

TEST(CliTest, NoCommandPrintsHelpAndFails) {
  Result r = RunArgs({});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("Usage: moe-serve <command>"), std::string::npos);
}

TEST(CliTest, BadFlagNamesTheFlag) {
  Result r = RunArgs({"serve", "--no-such-flag"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("unknown flag --no-such-flag"), std::string::npos) << r.err;
  r = RunArgs({"serve", "--port", "eighty"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("flag --port: expected an integer"), std::string::npos) << r.err;
}

std::string WriteTempFile(const std::string& name, const std::string& text) {
  std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

TEST(CliTest, BadConfigFileExitsTwoNamingFileLineAndKey) {
  std::string path = WriteTempFile("cli_test_bad.yaml", "server:\n  http_port: 8000\n"
                                                        "batching:\n  max_num_seqs: lots\n");
  for (const char* command : {"serve", "frontend", "expert"}) {
    Result r = RunArgs({command, "--config", path});
    EXPECT_EQ(r.rc, 2) << command;
    EXPECT_EQ(r.err, "moe-serve " + std::string(command) + ": " + path +
                         ":4: batching.max_num_seqs: expected an integer, got \"lots\"\n")
        << command;
  }
  std::remove(path.c_str());
  Result r = RunArgs({"serve", "--config", path});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find(path + ": cannot open: No such file or directory"), std::string::npos)
      << r.err;
}

TEST(CliTest, SetWithUnknownKeyExitsTwo) {
  Result r = RunArgs({"serve", "--config", "config/examples/local.yaml", "--set",
                      "batching.max_num_seq=64"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.err,
            "moe-serve serve: --set: batching.max_num_seq: unknown key (did you mean "
            "batching.max_num_seqs?)\n");
  r = RunArgs({"scheduler", "--set", "timeouts.lease_ms=soon"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.err,
            "moe-serve scheduler: --set: timeouts.lease_ms: expected an integer, got \"soon\"\n");
}

TEST(CliTest, PrintConfigShowsTheEffectiveYaml) {
  Result r = RunArgs({"serve", "--config", "config/examples/local.yaml", "--set",
                      "batching.max_num_seqs=8", "--port", "9000", "--print-config"});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("  max_num_seqs: 8\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  http_port: 9000\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  served_name: \"tiny\"\n"), std::string::npos) << r.out;
  r = RunArgs({"expert", "--rank", "0", "--print-config"});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("expert_workers:"), std::string::npos) << r.out;
}

TEST(CliTest, RankMustBeInTheConfig) {
  Result r = RunArgs({"attention", "--config", "config/examples/cluster.yaml", "--rank", "2"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.err, "moe-serve attention: --rank 2: roles.attention_workers has ranks 0..1\n");
}

TEST(CliTest, VersionPrints) {
  Result r = RunArgs({"version"});
  EXPECT_EQ(r.rc, 0);
  EXPECT_EQ(r.out.rfind("moe-serve ", 0), 0u);
}

}  // namespace
}  // namespace moe::cli
