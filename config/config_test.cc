#include "config/config.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::config {
namespace {

using ::testing::HasSubstr;

std::string ErrorOf(const absl::StatusOr<DeploymentConfig>& result) {
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  return std::string(result.status().message());
}

std::string ErrorOf(const absl::Status& status) {
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  return std::string(status.message());
}

// --- Valid files -------------------------------------------------------------------------

TEST(ConfigTest, EmptyFileIsTheDefaults) {
  for (const char* text : {"", "\n", "# only a comment\n", "---\n"}) {
    absl::StatusOr<DeploymentConfig> config = LoadConfigString(text, "empty.yaml");
    ASSERT_TRUE(config.ok()) << text << ": " << config.status();
    EXPECT_EQ(*config, DeploymentConfig{}) << text;
  }
  DeploymentConfig defaults;
  EXPECT_EQ(defaults.server.http_port, 8000);
  EXPECT_EQ(defaults.batching.max_num_seqs, 256);
  EXPECT_EQ(defaults.kv_cache.block_size, 16);
  ASSERT_EQ(defaults.roles.attention_workers.size(), 1u);
  EXPECT_EQ(defaults.roles.attention_workers[0].address, kInProcess);
  ASSERT_EQ(defaults.roles.expert_workers.size(), 1u);
  EXPECT_TRUE(Validate(defaults).ok());
}

TEST(ConfigTest, EmptySectionKeepsItsDefaults) {
  absl::StatusOr<DeploymentConfig> config =
      LoadConfigString("batching:\n  # max_num_seqs: 4\nserver:\n", "s.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(*config, DeploymentConfig{});
}

TEST(ConfigTest, LocalExampleLoads) {
  absl::StatusOr<DeploymentConfig> config = LoadConfigFile("config/examples/local.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.dtype, common::DType::kF32);
  EXPECT_EQ(config->model.served_name, "tiny");
  EXPECT_EQ(config->device, Device::kCpu);
  EXPECT_EQ(config->batching.max_num_seqs, 16);
  EXPECT_EQ(config->kv_cache.num_blocks, 256);
  EXPECT_EQ(config->placement.policy, PlacementPolicy::kStatic);
  ASSERT_EQ(config->roles.attention_workers.size(), 1u);
  ASSERT_EQ(config->roles.expert_workers.size(), 1u);
  EXPECT_EQ(config->roles.frontend.address, kInProcess);
  EXPECT_EQ(config->roles.expert_workers[0].address, kInProcess);
}

TEST(ConfigTest, ClusterExampleLoads) {
  absl::StatusOr<DeploymentConfig> config = LoadConfigFile("config/examples/cluster.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->device, Device::kCuda);
  EXPECT_EQ(config->model.dtype, common::DType::kBF16);
  EXPECT_EQ(config->server.host, "0.0.0.0");
  EXPECT_EQ(config->server.drain_timeout_s, 60);
  EXPECT_EQ(config->kv_cache.memory_fraction, 0.85);
  EXPECT_EQ(config->roles.scheduler.address, "moe-scheduler:7001");
  ASSERT_EQ(config->roles.attention_workers.size(), 2u);
  EXPECT_EQ(config->roles.attention_workers[1].rank, 1);
  EXPECT_EQ(config->roles.attention_workers[1].address, "moe-attention-1.moe-attention:7100");
  ASSERT_EQ(config->roles.expert_workers.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(config->roles.expert_workers[i].rank, i);
    EXPECT_EQ(config->roles.expert_workers[i].num_slots, 18);
  }
  EXPECT_EQ(config->placement.policy, PlacementPolicy::kEplb);
  EXPECT_EQ(config->placement.redundant_slots, 8);
  EXPECT_EQ(config->logging.format, LogFormat::kJson);
}

TEST(ConfigTest, ListRankDefaultsToIndexAndYamlSpellingsAreAccepted) {
  absl::StatusOr<DeploymentConfig> config = LoadConfigString(
      "roles:\n"
      "  expert_workers:\n"
      "    - address: e0:7200\n"
      "    - address: \"[::1]:7200\"\n"
      "batching:\n"
      "  enable_chunked_prefill: off\n"
      "  max_num_batched_tokens: '4096'\n",
      "l.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->roles.expert_workers.size(), 2u);
  EXPECT_EQ(config->roles.expert_workers[1].rank, 1);
  EXPECT_EQ(config->roles.expert_workers[1].address, "[::1]:7200");
  EXPECT_FALSE(config->batching.enable_chunked_prefill);
  EXPECT_EQ(config->batching.max_num_batched_tokens, 4096);
}

// --- Errors: each names the source, the line and the full key path ----------------------

TEST(ConfigTest, WrongTypeNamesFileLineAndKey) {
  EXPECT_EQ(ErrorOf(LoadConfigString("model:\n  dtype: f32\nbatching:\n  max_num_seqs: lots\n",
                                     "config/examples/local.yaml")),
            "config/examples/local.yaml:4: batching.max_num_seqs: expected an integer, got "
            "\"lots\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("batching:\n  enable_chunked_prefill: maybe\n", "b.yaml")),
            "b.yaml:2: batching.enable_chunked_prefill: expected true or false, got \"maybe\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("server:\n  host: [a, b]\n", "h.yaml")),
            "h.yaml:2: server.host: expected a string, got a list");
  EXPECT_EQ(ErrorOf(LoadConfigString("kv_cache:\n  memory_fraction: half\n", "k.yaml")),
            "k.yaml:2: kv_cache.memory_fraction: expected a number, got \"half\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("batching: 5\n", "s.yaml")),
            "s.yaml:1: batching: expected a mapping, got \"5\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("roles:\n  expert_workers: e0:1\n", "r.yaml")),
            "r.yaml:2: roles.expert_workers: expected a list, got \"e0:1\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("- a\n- b\n", "top.yaml")),
            "top.yaml:1: expected a mapping of sections (model, server, batching, ...), got a "
            "list");
}

TEST(ConfigTest, UnknownKeySuggestsTheClosest) {
  EXPECT_EQ(ErrorOf(LoadConfigString("batching:\n  max_num_seq: 4\n", "u.yaml")),
            "u.yaml:2: batching.max_num_seq: unknown key (did you mean batching.max_num_seqs?)");
  // The right name in the wrong section.
  EXPECT_EQ(ErrorOf(LoadConfigString("batching:\n  block_size: 32\n", "u.yaml")),
            "u.yaml:2: batching.block_size: unknown key (did you mean kv_cache.block_size?)");
  EXPECT_EQ(ErrorOf(LoadConfigString("\nsever:\n  http_port: 1\n", "u.yaml")),
            "u.yaml:2: sever: unknown key (did you mean server?)");
  EXPECT_EQ(ErrorOf(LoadConfigString("frobnicate: 1\n", "u.yaml")),
            "u.yaml:1: frobnicate: unknown key");
  EXPECT_EQ(
      ErrorOf(LoadConfigString("roles:\n  expert_workers:\n    - {rank: 0, num_slot: 4}\n",
                               "u.yaml")),
      "u.yaml:3: roles.expert_workers[0].num_slot: unknown key (did you mean "
      "roles.expert_workers[0].num_slots?)");
}

TEST(ConfigTest, OutOfRangeValues) {
  EXPECT_EQ(ErrorOf(LoadConfigString("server:\n  http_port: 70000\n", "p.yaml")),
            "p.yaml:2: server.http_port: expected an integer in [0, 65535], got 70000");
  EXPECT_EQ(ErrorOf(LoadConfigString("batching:\n  max_num_seqs: 0\n", "p.yaml")),
            "p.yaml:2: batching.max_num_seqs: expected an integer >= 1, got 0");
  EXPECT_EQ(ErrorOf(LoadConfigString("kv_cache:\n  block_size: 24\n", "p.yaml")),
            "p.yaml:2: kv_cache.block_size: expected a power of two in [1, 1024], got 24");
  EXPECT_EQ(ErrorOf(LoadConfigString("kv_cache:\n  memory_fraction: 1.5\n", "p.yaml")),
            "p.yaml:2: kv_cache.memory_fraction: expected a number in (0, 1], got 1.5");
  EXPECT_EQ(ErrorOf(LoadConfigString("roles:\n  scheduler:\n    address: sched\n", "p.yaml")),
            "p.yaml:3: roles.scheduler.address: expected \"inproc\" or host:port with a port in "
            "[1, 65535], got \"sched\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("roles:\n  attention_workers: []\n", "p.yaml")),
            "p.yaml:2: roles.attention_workers: expected a list of at least 1 entries, got 0");
}

TEST(ConfigTest, InvalidEnumListsTheAllowedValues) {
  EXPECT_EQ(ErrorOf(LoadConfigString("model:\n  dtype: fp8\n", "e.yaml")),
            "e.yaml:2: model.dtype: expected one of f32 | bf16 | f16, got \"fp8\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("device: tpu\n", "e.yaml")),
            "e.yaml:1: device: expected one of cpu | cuda, got \"tpu\"");
  EXPECT_EQ(ErrorOf(LoadConfigString("placement:\n  policy: random\n", "e.yaml")),
            "e.yaml:2: placement.policy: expected one of static | eplb, got \"random\"");
}

TEST(ConfigTest, YamlSyntaxErrorHasTheLine) {
  EXPECT_EQ(ErrorOf(LoadConfigString("model:\n  path: x\n  - y\n", "bad.yaml")),
            "bad.yaml:3: invalid YAML: end of map not found");
  EXPECT_EQ(ErrorOf(LoadConfigString("threads: 1\nmodel: a: b\n", "bad.yaml")),
            "bad.yaml:2: invalid YAML: illegal map value");
  EXPECT_THAT(ErrorOf(LoadConfigString("batching: [1, 2\n", "bad.yaml")),
              HasSubstr("bad.yaml:2: invalid YAML: "));
  EXPECT_EQ(ErrorOf(LoadConfigString("a: 1\n---\nb: 2\n", "two.yaml")),
            "two.yaml:3: expected one YAML document, found 2");
}

TEST(ConfigTest, DuplicateKeyIsAnError) {
  EXPECT_EQ(ErrorOf(LoadConfigString("server:\n  http_port: 1\n  http_port: 2\n", "d.yaml")),
            "d.yaml:3: server.http_port: duplicate key");
}

TEST(ConfigTest, EveryBadKeyIsReportedInDocumentOrder) {
  EXPECT_EQ(ErrorOf(LoadConfigString("server:\n  http_port: -1\n"
                                     "batching:\n  max_num_seqs: x\n  max_num_seqs2: 1\n",
                                     "all.yaml")),
            "all.yaml:2: server.http_port: expected an integer in [0, 65535], got -1\n"
            "all.yaml:4: batching.max_num_seqs: expected an integer, got \"x\"\n"
            "all.yaml:5: batching.max_num_seqs2: unknown key (did you mean "
            "batching.max_num_seqs?)");
}

TEST(ConfigTest, MissingFileIsNotFound) {
  absl::StatusOr<DeploymentConfig> config = LoadConfigFile("config/examples/no-such.yaml");
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(std::string(config.status().message()),
            "config/examples/no-such.yaml: cannot open: No such file or directory");
}

TEST(ConfigTest, CrossKeyRulesPointAtTheLine) {
  EXPECT_EQ(ErrorOf(LoadConfigString("timeouts:\n  heartbeat_ms: 1000\n  lease_ms: 900\n",
                                     "x.yaml")),
            "x.yaml:3: timeouts.lease_ms: must be > timeouts.heartbeat_ms (1000), got 900");
  EXPECT_EQ(ErrorOf(LoadConfigString("batching:\n  max_num_batched_tokens: 8\n", "x.yaml")),
            "x.yaml:2: batching.max_num_batched_tokens: must be >= batching.max_num_seqs "
            "(256), got 8");
  EXPECT_EQ(ErrorOf(LoadConfigString("roles:\n  expert_workers:\n"
                                     "    - {rank: 0, address: \"e:1\"}\n"
                                     "    - {rank: 0, address: \"e:2\"}\n"
                                     "    - {rank: 5, address: \"e:1\"}\n",
                                     "x.yaml")),
            "x.yaml:4: roles.expert_workers[1].rank: rank 0 is already used by "
            "roles.expert_workers[0]\n"
            "x.yaml:5: roles.expert_workers[2].rank: expected a rank in [0, 2] (ranks are "
            "0..n-1, one per entry), got 5\n"
            "x.yaml:5: roles.expert_workers[2].address: e:1 is already used by "
            "roles.expert_workers[0].address");
  EXPECT_EQ(ErrorOf(LoadConfigString("kv_cache: {num_blocks: 8, memory_bytes: 1024}\n", "x.yaml")),
            "x.yaml:1: kv_cache.memory_bytes: set either kv_cache.num_blocks or "
            "kv_cache.memory_bytes, not both");
}

// --- Overrides ---------------------------------------------------------------------------

TEST(ConfigTest, OverrideSetsTheKey) {
  DeploymentConfig config;
  ASSERT_TRUE(ApplyOverride(&config, "batching.max_num_seqs=64").ok());
  EXPECT_EQ(config.batching.max_num_seqs, 64);
  ASSERT_TRUE(ApplyOverride(&config, "batching.enable_chunked_prefill=false").ok());
  EXPECT_FALSE(config.batching.enable_chunked_prefill);
  ASSERT_TRUE(ApplyOverride(&config, "model.dtype=f16").ok());
  EXPECT_EQ(config.model.dtype, common::DType::kF16);
  // String keys take the text as written, YAML-looking or not.
  ASSERT_TRUE(ApplyOverride(&config, "server.api_key=s3cr3t: #x").ok());
  EXPECT_EQ(config.server.api_key, "s3cr3t: #x");
  ASSERT_TRUE(ApplyOverride(&config, "model.path=").ok());
  EXPECT_EQ(config.model.path, "");
  // Whole lists, one entry's field, and whole sections.
  ASSERT_TRUE(ApplyOverride(&config,
                            "roles.expert_workers=[{address: \"e0:7200\"}, {address: \"e1:7200\", "
                            "num_slots: 4}]")
                  .ok());
  ASSERT_EQ(config.roles.expert_workers.size(), 2u);
  EXPECT_EQ(config.roles.expert_workers[1].rank, 1);
  EXPECT_EQ(config.roles.expert_workers[1].num_slots, 4);
  absl::Status status = ApplyOverride(&config, "roles.expert_workers[1].address=e9:7300");
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(config.roles.expert_workers[1].address, "e9:7300");
  ASSERT_TRUE(ApplyOverride(&config, "timeouts={heartbeat_ms: 100, lease_ms: 400}").ok());
  EXPECT_EQ(config.timeouts.heartbeat_ms, 100);
  EXPECT_EQ(config.timeouts.lease_ms, 400);
  EXPECT_TRUE(Validate(config).ok()) << Validate(config);
}

TEST(ConfigTest, OverrideErrorsNameTheKey) {
  DeploymentConfig config;
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "batching.max_num_seq=64")),
            "--set: batching.max_num_seq: unknown key (did you mean batching.max_num_seqs?)");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "batchin.max_num_seqs=64")),
            "--set: batchin.max_num_seqs: unknown key (did you mean batching.max_num_seqs?)");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "no.such.key=1")), "--set: no.such.key: unknown key");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "batching.max_num_seqs=lots")),
            "--set: batching.max_num_seqs: expected an integer, got \"lots\"");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "server.http_port=70000")),
            "--set: server.http_port: expected an integer in [0, 65535], got 70000");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "logging.level=loud")),
            "--set: logging.level: expected one of debug | info | warning | error, got \"loud\"");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "batching.max_num_seqs")),
            "--set: expected key.path=value, got \"batching.max_num_seqs\"");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "roles.expert_workers[3].address=e:1")),
            "--set: roles.expert_workers[3].address: no entry 3 (the list has 1; set the whole "
            "list to add entries)");
  EXPECT_EQ(ErrorOf(ApplyOverride(&config, "roles.expert_workers[0].adress=e:1")),
            "--set: roles.expert_workers[0].adress: unknown key (did you mean "
            "roles.expert_workers[0].address?)");
  EXPECT_THAT(ErrorOf(ApplyOverride(&config, "roles.expert_workers=[{rank: 0")),
              HasSubstr("--set: roles.expert_workers: invalid YAML value: "));
  EXPECT_EQ(config, DeploymentConfig{}) << "a failed override leaves the config unchanged";
}

TEST(ConfigTest, LoadDeploymentAppliesOverridesThenChecksRules) {
  absl::StatusOr<DeploymentConfig> config = LoadDeployment(
      {.path = "config/examples/local.yaml", .overrides = {"batching.max_num_seqs=8"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->batching.max_num_seqs, 8);
  EXPECT_EQ(config->model.served_name, "tiny");

  // The rule is checked once every override is in; it points at the file's line of the key
  // it names, or at --set when the key came from there.
  config = LoadDeployment({.path = "config/examples/local.yaml",
                           .overrides = {"batching.max_num_seqs=1024"}});
  EXPECT_EQ(ErrorOf(config),
            "config/examples/local.yaml:20: batching.max_num_batched_tokens: must be >= "
            "batching.max_num_seqs (1024), got 512");
  config = LoadDeployment({.path = "config/examples/local.yaml",
                           .overrides = {"batching.max_num_batched_tokens=8"}});
  EXPECT_EQ(ErrorOf(config),
            "--set: batching.max_num_batched_tokens: must be >= batching.max_num_seqs (16), "
            "got 8");
  // A list replaced by --set no longer points at the file's entries.
  config = LoadDeployment(
      {.path = "config/examples/cluster.yaml",
       .overrides = {"roles.attention_workers=[{rank: 1, address: \"a:1\"}, {rank: 1}]"}});
  EXPECT_EQ(ErrorOf(config),
            "--set: roles.attention_workers[1].rank: rank 1 is already used by "
            "roles.attention_workers[0]");
  config = LoadDeployment({.overrides = {"batching.max_num_seqs=1024",
                                         "batching.max_num_batched_tokens=2048"}});
  EXPECT_TRUE(config.ok()) << config.status();
}

// --- ToYaml ------------------------------------------------------------------------------

TEST(ConfigTest, ToYamlRoundTrips) {
  for (const char* path : {"config/examples/local.yaml", "config/examples/cluster.yaml"}) {
    absl::StatusOr<DeploymentConfig> config = LoadConfigFile(path);
    ASSERT_TRUE(config.ok()) << config.status();
    std::string yaml = ToYaml(*config);
    absl::StatusOr<DeploymentConfig> again = LoadConfigString(yaml, "printed.yaml");
    ASSERT_TRUE(again.ok()) << again.status() << "\n" << yaml;
    EXPECT_EQ(*again, *config) << yaml;
  }
  // Strings YAML would read as something else, and doubles that need every digit.
  DeploymentConfig tricky;
  tricky.model.served_name = "null";
  tricky.model.path = "/models/a: b # c";
  tricky.server.api_key = "123";
  tricky.server.drain_timeout_s = 0.1 + 0.2;
  tricky.kv_cache.memory_fraction = 1.0 / 3;
  std::string yaml = ToYaml(tricky);
  absl::StatusOr<DeploymentConfig> again = LoadConfigString(yaml, "printed.yaml");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << yaml;
  EXPECT_EQ(*again, tricky) << yaml;
  EXPECT_THAT(ToYaml(DeploymentConfig{}), HasSubstr("batching:\n  max_num_seqs: 256\n"));
}

TEST(ConfigTest, ReadmeDocumentsEveryKey) {
  std::ifstream file("config/README.md");
  ASSERT_TRUE(file.good()) << "run from the repository root";
  std::stringstream text;
  text << file.rdbuf();
  for (const KeyInfo& key : Keys()) {
    EXPECT_THAT(text.str(), HasSubstr("`" + key.path + "`")) << "README.md misses " << key.path;
  }
}

}  // namespace
}  // namespace moe::config
