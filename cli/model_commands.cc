// generate and gen-model: the offline model tools.
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/commands.h"
#include "model/gen_model.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"

namespace moe::cli {

int RunGenerate(const Args& args, std::ostream& out, std::ostream& err) {
  common::FlagSet flags("moe-serve generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)",
                        "Offline generation from the command line.");
  std::string model_dir, prompt, prompt_ids, dtype, output = "text";
  int max_tokens = 16, top_k = 0, logprobs = 0, threads = 0, prefill_chunk = 0;
  int64_t seed = 0;
  double temperature = 0.0, top_p = 1.0;
  bool ignore_eos = false;
  flags.AddString("model", &model_dir, "Hugging Face model directory");
  flags.AddString("prompt", &prompt, "prompt text (needs tokenizer.json in the model directory)");
  flags.AddString("prompt-ids", &prompt_ids, "prompt as comma-separated token ids");
  flags.AddInt("max-tokens", &max_tokens, "tokens to generate");
  flags.AddDouble("temperature", &temperature, "sampling temperature (0: greedy)");
  flags.AddDouble("top-p", &top_p, "nucleus sampling mass, (0, 1]");
  flags.AddInt("top-k", &top_k, "sample among the k most likely tokens (0: all)");
  flags.AddInt("seed", &seed, "sampling seed (same seed, same tokens)");
  flags.AddInt("logprobs", &logprobs, "report this many top logprobs per token (json output)");
  flags.AddBool("ignore-eos", &ignore_eos, "keep generating after an end-of-sequence token");
  flags.AddString("dtype", &dtype, "weight dtype in memory: f32|bf16 (default: as stored)");
  flags.AddInt("threads", &threads, "CPU threads (0: all cores)");
  flags.AddInt("prefill-chunk", &prefill_chunk, "prefill in chunks of this many tokens (0: one)");
  flags.AddString("output", &output, "text|json");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  auto usage = [&](const std::string& message) {
    err << "moe-serve generate: " << message << "\n";
    return 2;
  };
  if (model_dir.empty()) return usage("--model is required");
  if (prompt.empty() == prompt_ids.empty()) {
    return usage("give exactly one of --prompt and --prompt-ids");
  }
  if (output != "text" && output != "json") {
    return usage("--output must be text or json, got \"" + output + "\"");
  }
  std::optional<common::DType> weight_dtype;
  if (dtype == "f32") {
    weight_dtype = common::DType::kF32;
  } else if (dtype == "bf16") {
    weight_dtype = common::DType::kBF16;
  } else if (!dtype.empty()) {
    return usage("--dtype must be f32 or bf16, got \"" + dtype + "\"");
  }
  if (max_tokens < 1) return usage("--max-tokens must be >= 1");
  if (seed < 0) return usage("--seed must be >= 0");
  if (prefill_chunk < 0) return usage("--prefill-chunk must be >= 0");
  model::GenerateOptions options;
  options.max_tokens = max_tokens;
  options.ignore_eos = ignore_eos;
  options.prefill_chunk_tokens = prefill_chunk;
  options.sampling = {.temperature = temperature,
                      .top_p = top_p,
                      .top_k = top_k,
                      .seed = static_cast<uint64_t>(seed),
                      .top_logprobs = logprobs};
  if (absl::Status s = model::ValidateSamplingOptions(options.sampling); !s.ok()) {
    return usage(std::string(s.message()));  // names the field (flags use dashes)
  }

  // The tokenizer is needed for --prompt, and optional (text output) with --prompt-ids.
  std::unique_ptr<model::Tokenizer> tokenizer;
  {
    absl::StatusOr<std::unique_ptr<model::Tokenizer>> tok =
        model::Tokenizer::FromDirectory(model_dir);
    if (tok.ok()) {
      tokenizer = std::move(*tok);
    } else if (!prompt.empty() || tok.status().code() != absl::StatusCode::kNotFound) {
      err << "moe-serve generate: " << tok.status().message() << "\n";
      return 1;
    }
  }
  std::vector<int32_t> ids;
  if (!prompt.empty()) {
    ids = tokenizer->Encode(prompt, /*add_special_tokens=*/true);
  } else {
    for (absl::string_view part : absl::StrSplit(prompt_ids, ',')) {
      part = absl::StripAsciiWhitespace(part);
      int32_t id = 0;
      if (!absl::SimpleAtoi(part, &id) || id < 0) {
        return usage("--prompt-ids: \"" + std::string(part) +
                     "\" is not a token id (comma-separated non-negative integers expected)");
      }
      ids.push_back(id);
    }
  }
  if (ids.empty()) return usage("the prompt has no tokens");

  model::ModelOptions model_options;
  model_options.dtype = weight_dtype;
  model_options.threads = threads;
  model_options.kv.block_size = 16;
  model_options.kv.num_blocks =
      static_cast<int>((ids.size() + max_tokens + model_options.kv.block_size - 1) /
                       model_options.kv.block_size);
  model_options.initial_batch_tokens =
      prefill_chunk > 0 ? prefill_chunk : static_cast<int>(ids.size());
  absl::StatusOr<std::unique_ptr<model::Model>> model = model::Model::Load(model_dir, model_options);
  if (!model.ok()) {
    err << "moe-serve generate: loading " << model_dir << ": " << model.status().message() << "\n";
    return 1;
  }
  const bool json = output == "json";
  absl::StatusOr<model::GenerateResult> result = model::Generate(
      **model, tokenizer.get(), ids, options, [&](const model::GeneratedToken& t) {
        if (!json) out << t.text << std::flush;
      });
  if (!result.ok()) {
    err << "moe-serve generate: " << result.status().message() << "\n";
    return result.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  if (!json) {
    out << "\n";
    err << absl::StrFormat(
        "prompt %d tokens, generated %d (%s); prefill %.1f tok/s, decode %.1f tok/s\n",
        result->prompt_tokens, static_cast<int>(result->tokens.size()), result->finish_reason,
        result->PrefillTokensPerSecond(), result->DecodeTokensPerSecond());
    return 0;
  }
  nlohmann::json doc;
  doc["prompt_tokens"] = result->prompt_tokens;
  doc["prompt_ids"] = ids;
  nlohmann::json tokens = nlohmann::json::array();
  for (const model::GeneratedToken& t : result->tokens) {
    nlohmann::json step = {{"id", t.sample.token}, {"text", t.text}, {"logprob", t.sample.logprob}};
    if (logprobs > 0) {
      nlohmann::json top = nlohmann::json::array();
      for (const model::CandidateLogprob& lp : t.sample.top_logprobs) {
        top.push_back({{"id", lp.token}, {"logprob", lp.logprob}});
      }
      step["top_logprobs"] = std::move(top);
    }
    tokens.push_back(std::move(step));
  }
  doc["tokens"] = std::move(tokens);
  doc["text"] = result->text;
  doc["finish_reason"] = result->finish_reason;
  doc["timings"] = {{"prefill_seconds", result->prefill_seconds},
                    {"prefill_tokens_per_second", result->PrefillTokensPerSecond()},
                    {"decode_seconds", result->decode_seconds},
                    {"decode_tokens_per_second", result->DecodeTokensPerSecond()}};
  out << doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return 0;
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
