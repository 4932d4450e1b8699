// Chat templates: the Jinja2 subset that Hugging Face `chat_template` strings use.
//
// `/v1/chat/completions` turns `messages` into a prompt by rendering the model's
// `chat_template` (from tokenizer_config.json) the way transformers' `apply_chat_template`
// does: Jinja2 with `trim_blocks=True`, `lstrip_blocks=True`, the `loopcontrols` extension
// (`break`, `continue`), the `{% generation %}` tag (rendered as its body), and the globals
// `raise_exception`, `namespace`, `strftime_now`, `range`, `dict`, plus a `tojson` filter that
// writes like Python's `json.dumps(ensure_ascii=False)`. The aim is byte-for-byte the same
// output as Python jinja2 for the templates of the supported model families (Qwen2/2.5/3,
// Mixtral/Mistral, DeepSeek-V2/V3, OLMoE/Tulu); tests/chat_template/ holds the fixtures.
//
// Contract:
//   - Parse() lexes and parses once; syntax errors, unknown filters and unknown tests are
//     InvalidArgument with "line L, column C". Nesting deeper than the limit is rejected.
//   - Render() evaluates over a JSON context (objects keep their key order when the caller
//     passes nlohmann::ordered_json, which matters for `tojson`). Runtime errors (type errors,
//     undefined attribute chains, division by zero, limits) are InvalidArgument with the
//     position. `raise_exception(msg)` yields InvalidArgument whose message is exactly `msg`
//     (the API returns it as HTTP 400).
//   - Never crashes or hangs on bad input: recursion depth, loop iterations and output size
//     are bounded (ChatTemplateLimits) and exceeding them is an error naming the limit.
//   - No exception escapes.
//   - Python semantics where they show in output: `str()` of values (None, True, 1.0,
//     ['a']), code-point string length and slicing, Jinja's Undefined (renders empty, falsy;
//     using an attribute of it is an error).
//
// Not supported (Parse fails with a message naming the construct): `extends`, `block`,
// `include`, `import`, `call` and `filter` blocks, filters on `{% set %}` blocks, recursive
// loops, `*args`/`**kwargs` in calls. Also: `%`-formatting knows only %s %r %d %i %f,
// `str.format` no format specs, case mapping covers ASCII/Latin-1/Greek/Cyrillic, dict keys
// are strings, integers are 64-bit (overflow is an error).
//
// Threads: a ChatTemplate is immutable after Parse; any number of threads may call Render()
// on the same object concurrently. Copies share the parsed program.
//
// Example:
//   MOE_ASSIGN_OR_RETURN(ChatTemplate tmpl, ChatTemplate::Parse(config["chat_template"]));
//   nlohmann::ordered_json context = {{"messages", messages}, {"add_generation_prompt", true},
//                                     {"bos_token", "<s>"}, {"eos_token", "</s>"}};
//   MOE_ASSIGN_OR_RETURN(std::string prompt, tmpl.Render(context));
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moe::server {

namespace internal {
struct TemplateProgram;
}  // namespace internal

// Bounds that keep hostile templates and inputs from exhausting the stack, CPU or memory.
struct ChatTemplateLimits {
  // Nesting of statements and expressions at parse time, and of macro calls and values
  // (lists in lists) at render time.
  int max_depth = 128;
  // Loop iterations over one render, all loops together (also bounds `range()`).
  int64_t max_loop_iterations = 1'000'000;
  // Size of the rendered prompt and of any string built while rendering.
  size_t max_output_bytes = size_t{64} << 20;
};

class ChatTemplate {
 public:
  static absl::StatusOr<ChatTemplate> Parse(std::string source);
  static absl::StatusOr<ChatTemplate> Parse(std::string source, const ChatTemplateLimits& limits);

  // `context` must be a JSON object; its keys become the template's variables.
  absl::StatusOr<std::string> Render(const nlohmann::json& context) const;
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

  const std::string& source() const;

 private:
  explicit ChatTemplate(std::shared_ptr<const internal::TemplateProgram> program);

  std::shared_ptr<const internal::TemplateProgram> program_;
};

}  // namespace moe::server
