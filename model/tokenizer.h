// The tokenizer of a checkpoint: Hugging Face `tokenizer.json` with byte-level BPE, read and
// run in C++ so that the frontend turns prompts into token ids and streams text back out.
//
// What is understood (anything else is an error naming the part, never a guess):
//   model         BPE: vocab, merges ("a b" strings or [a, b] pairs), ignore_merges,
//                 unk_token/fuse_unk, continuing_subword_prefix, end_of_word_suffix.
//                 Other model types (Unigram, WordPiece, ...) and byte_fallback: Unimplemented.
//   normalizer    none, NFC/NFKC (and a Sequence of those). NFC/NFKC need ICU at build time;
//                 without it such a tokenizer is refused with Unimplemented naming the normalizer.
//   pre_tokenizer ByteLevel (with or without its GPT-2 regex, add_prefix_space), Split with a
//                 Regex or String pattern (every split behavior, invert), Sequence of those.
//                 Regexes run on PCRE2 with UTF and Unicode properties, JIT-compiled.
//   added_tokens  special or not, matched before pre-tokenization leftmost-longest, with
//                 lstrip, rstrip, single_word and normalized as Hugging Face does.
//   post_processor TemplateProcessing (single), RobertaProcessing, BertProcessing, ByteLevel,
//                 Sequence: applied when Encode is asked to add special tokens.
//   decoder       ByteLevel, or none (tokens joined by spaces).
// From `tokenizer_config.json` (next to tokenizer.json, optional): bos_token, eos_token,
// add_bos_token and chat_template (stored, not rendered here); from `generation_config.json`
// (optional): more end-of-sequence ids. When add_bos_token is true and the post-processor adds
// no BOS, Encode(text, /*add_special_tokens=*/true) puts the BOS in front.
//
// Encode and Decode give the ids and text that the Hugging Face `tokenizers` library gives for
// the same tokenizer.json (tests/tokenizer/ holds the evidence). Input that is not valid UTF-8 is
// first repaired (each invalid sequence becomes U+FFFD), as a caller coming through Python would.
//
// Threads: a Tokenizer is immutable after construction except for an internal word cache that
// is guarded by its own mutexes; any number of threads may call Encode, Decode and the lookups
// at the same time. An IncrementalDecoder belongs to one sequence and one thread at a time; it
// borrows the Tokenizer, which must outlive it.
//
// Example:
//   MOE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromDirectory(model_dir));
//   std::vector<int32_t> ids = tok->Encode("Hello world", /*add_special_tokens=*/true);
//   IncrementalDecoder stream(*tok, /*skip_special_tokens=*/true);
//   for (int32_t id : generated) Send(stream.Add(id));   // never half a character
//   Send(stream.Finish());                              // the rest, U+FFFD if truly cut
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moe::model {

class Tokenizer {
 public:
  // The texts a tokenizer is built from; the config texts may be empty (absent files).
  // The *_source strings name each text in error messages (a path or a test name).
  struct Sources {
    std::string_view tokenizer_json;
    std::string_view tokenizer_config_json;
    std::string_view generation_config_json;
    std::string tokenizer_source = "tokenizer.json";
    std::string tokenizer_config_source = "tokenizer_config.json";
    std::string generation_config_source = "generation_config.json";
  };

  // Reads one tokenizer.json file, and tokenizer_config.json / generation_config.json from the
  // same folder when they exist. Errors: NotFound for a missing file, InvalidArgument naming the
  // file and field for bad content, Unimplemented naming an unsupported component.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  // Reads `model_dir`/tokenizer.json (and the optional config files next to it).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDirectory(const std::string& model_dir);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const Sources& sources);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`; with `add_special_tokens`, the post-processor's BOS/EOS as well.
  // Special tokens written inside `text` always become their ids.
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const;
  // The text of `ids`; unknown ids are dropped (as Hugging Face does), special tokens are
  // dropped when `skip_special_tokens`. Invalid UTF-8 becomes U+FFFD.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const;

  // The token's string as stored in the vocabulary (byte-level alphabet), or nullopt.
  std::optional<std::string_view> IdToToken(int32_t id) const;
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // One past the largest id, added tokens included: the rows an embedding table needs.
  int32_t vocab_size() const;
  bool IsSpecial(int32_t id) const;

  std::optional<int32_t> bos_id() const;
  // End-of-sequence ids: tokenizer_config's eos_token, then generation_config's eos_token_id.
  const std::vector<int32_t>& eos_ids() const;
  bool IsEos(int32_t id) const;
  // tokenizer_config.json's add_bos_token, when it says.
  std::optional<bool> add_bos_token() const;
  // tokenizer_config.json's chat_template ("" when absent; the "default" one of a list).
  const std::string& chat_template() const;

 private:
  friend class IncrementalDecoder;
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

// Streams one sequence's text out token by token. Add returns only whole characters: bytes of
// a character that later tokens may complete are held back, while bytes that can never form a
// character become U+FFFD at once, as Decode does. Finish returns what is held back (as U+FFFD)
// and starts over. For any ids, the concatenation of every Add plus Finish equals
// tokenizer.Decode(ids, skip_special_tokens).
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens);

  // The new text that token `id` completes (possibly empty).
  std::string Add(int32_t id);
  // The held-back tail, each incomplete character as U+FFFD; resets for a new sequence.
  std::string Finish();
  // Bytes held back, waiting for the rest of a character.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tokenizer_;
  const bool skip_special_tokens_;
  bool emitted_any_ = false;
  std::string pending_;
};

}  // namespace moe::model
