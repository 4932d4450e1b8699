// Test helper: tiny generated checkpoints (model/gen_model.h) in temporary folders, one per
// architecture and dtype per test process, removed when the tests end.
//
//   const std::string& dir = moe::worker::testing::TinyModelDir("qwen3_moe");
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <map>
#include <string>

#include "gtest/gtest.h"
#include "model/gen_model.h"

namespace moe::worker::testing {

inline std::map<std::string, std::string>& TinyModelDirs() {
  static auto* dirs = new std::map<std::string, std::string>();
  return *dirs;
}

class RemoveTinyModels : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    for (const auto& [key, dir] : TinyModelDirs()) std::filesystem::remove_all(dir, ec);
  }
};

inline ::testing::Environment* const kRemoveTinyModels =
    ::testing::AddGlobalTestEnvironment(new RemoveTinyModels);

inline const std::string& TinyModelDir(const std::string& arch, const std::string& dtype = "f32") {
  const std::string key = arch + "/" + dtype;
  auto it = TinyModelDirs().find(key);
  if (it != TinyModelDirs().end()) return it->second;
  std::string pattern =
      (std::filesystem::temp_directory_path() / "moe-worker-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
  auto made = model::GenerateModel(
      {.arch = arch, .preset = "tiny", .dtype = dtype, .seed = 11, .out_dir = pattern, .num_threads = 2});
  if (!made.ok()) ADD_FAILURE() << "gen-model " << arch << ": " << made.status();
  return TinyModelDirs().emplace(key, pattern).first->second;
}

}  // namespace moe::worker::testing
