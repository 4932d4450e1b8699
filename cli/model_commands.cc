// generate and gen-model: the offline model tools.
#include "cli/commands.h"

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
  std::string arch, preset = "tiny", out_dir;
  flags.AddString("arch", &arch, "architecture");
  flags.AddString("preset", &preset, "size preset");
  flags.AddString("out", &out_dir, "output directory");
  if (int rc = ParseFlagsOrExit(flags, args, out, err); rc >= 0) return rc;
  return NotImplemented("gen-model", "the model writer is not built yet", err);
}

}  // namespace moe::cli
