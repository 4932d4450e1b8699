#include "cli/cli.h"

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

TEST(CliTest, VersionPrints) {
  Result r = RunArgs({"version"});
  EXPECT_EQ(r.rc, 0);
  EXPECT_EQ(r.out.rfind("moe-serve ", 0), 0u);
}

}  // namespace
}  // namespace moe::cli
