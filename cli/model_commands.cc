// generate and gen-model: the offline model tools.
#include "cli/commands.h"
#include "model/gen_model.h"

namespace moe::cli {

int RunGenerate(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)",
                        "Offline generation from the command line.");
  std::string model, prompt, prompt_ids;
  flags.AddString("model", &model, "Hugging Face model directory");
  flags.AddString("prompt", &prompt, "prompt text");
  flags.AddString("prompt-ids", &prompt_ids, "prompt as comma-separated token ids");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  return NotImplemented("generate", "the model engine is not built yet", err);
}

int RunGenModel(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve gen-model --arch ARCH --preset tiny|small --out DIR",
                        "Writes a seeded random model in Hugging Face layout.");
  std::string arch, preset = "tiny", out_dir, dtype = "f32";
  int64_t seed = 0, shard_mb = 0;
  int threads = 0;
  flags.AddString("arch", &arch,
                  "architecture: qwen3_moe|qwen2_moe|mixtral|deepseek_v3|deepseek_v2|olmoe");
  flags.AddString("preset", &preset, "size preset: tiny (tests) or small (benchmarks)");
  flags.AddString("dtype", &dtype, "weight dtype: f32|bf16");
  flags.AddInt("seed", &seed, "random seed (same seed, same bytes)");
  flags.AddInt("shard-mb", &shard_mb, "write shards of at most this many MiB (0: one file)");
  flags.AddInt("threads", &threads, "threads filling weights (0: all cores)");
  flags.AddString("out", &out_dir, "output directory");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  if (arch.empty() || out_dir.empty()) {
    err << "moe-serve gen-model: --arch and --out are required\n" << flags.HelpText();
    return 2;
  }
  if (seed < 0) {
    err << "moe-serve gen-model: --seed must be >= 0\n";
    return 2;
  }
  model::GenModelOptions options;
  options.arch = arch;
  options.preset = preset;
  options.dtype = dtype;
  options.seed = static_cast<uint64_t>(seed);
  options.out_dir = out_dir;
  options.shard_mb = shard_mb;
  options.num_threads = threads;
  absl::StatusOr<model::GenModelResult> result = model::GenerateModel(options);
  if (!result.ok()) {
    err << "moe-serve gen-model: " << result.status().message() << "\n";
    return result.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  out << "wrote " << result->out_dir << ": " << result->num_parameters << " parameters, "
      << result->weight_bytes << " bytes of weights in " << result->files.size() << " files\n";
  return 0;
}

}  // namespace moe::cli
