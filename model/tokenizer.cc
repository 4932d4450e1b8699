#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#ifdef MOE_TOKENIZER_HAVE_ICU
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#endif

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"

namespace moe::model {
namespace {

using Json = nlohmann::json;

absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// ------------------------------------------------------------------------------------------
// UTF-8

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8Kind { kValid, kInvalid, kIncomplete };
struct Utf8Step {
  size_t length;  // bytes of the character, of the invalid subpart, or of the incomplete tail
  Utf8Kind kind;
};

// Classifies the character starting at s[0] (n > 0 bytes available) by Unicode's table of
// well-formed byte sequences. An invalid result covers the maximal subpart to replace.
Utf8Step NextUtf8(const unsigned char* s, size_t n) {
  const unsigned char b = s[0];
  if (b < 0x80) return {1, Utf8Kind::kValid};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return {1, Utf8Kind::kInvalid};
  }
  for (size_t k = 1; k <= need; ++k) {
    if (k >= n) return {k, Utf8Kind::kIncomplete};
    if (s[k] < lo || s[k] > hi) return {k, Utf8Kind::kInvalid};
    lo = 0x80, hi = 0xBF;
  }
  return {need + 1, Utf8Kind::kValid};
}

// Appends `bytes` to `out` as valid UTF-8 with each maximal invalid subpart replaced by U+FFFD,
// which is what Rust's String::from_utf8_lossy (and so Hugging Face) does. Unless `final`, an
// incomplete character at the end is left alone. Returns how many bytes were consumed.
size_t AppendUtf8Lossy(std::string_view bytes, bool final, std::string* out) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    if (s[i] < 0x80) {
      size_t j = i + 1;
      while (j < n && s[j] < 0x80) ++j;
      out->append(bytes.data() + i, j - i);
      i = j;
      continue;
    }
    const Utf8Step step = NextUtf8(s + i, n - i);
    if (step.kind == Utf8Kind::kValid) {
      out->append(bytes.data() + i, step.length);
    } else if (step.kind == Utf8Kind::kInvalid || final) {
      out->append(kReplacementChar);
    } else {
      return i;
    }
    i += step.length;
  }
  return n;
}

bool IsValidUtf8(std::string_view bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    if (s[i] < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = NextUtf8(s + i, bytes.size() - i);
    if (step.kind != Utf8Kind::kValid) return false;
    i += step.length;
  }
  return true;
}

// Decodes the (valid) character at text[*pos] and advances *pos past it.
uint32_t DecodeUtf8(std::string_view text, size_t* pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + *pos;
  const Utf8Step step = NextUtf8(s, text.size() - *pos);
  if (step.kind != Utf8Kind::kValid) {
    *pos += step.length;
    return 0xFFFD;
  }
  *pos += step.length;
  switch (step.length) {
    case 1: return s[0];
    case 2: return ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu);
    case 3: return ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
    default:
      return ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) |
             (s[3] & 0x3Fu);
  }
}

void AppendCodepoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Unicode White_Space, what Rust's `\s` (used for lstrip/rstrip) matches.
bool IsUnicodeSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Byte offset where the trailing run of white space of `text` starts.
size_t TrailingSpaceStart(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    size_t pos = start;
    if (!IsUnicodeSpace(DecodeUtf8(text, &pos))) break;
    end = start;
  }
  return end;
}

// Length of the leading run of white space of `text`.
size_t LeadingSpaceLength(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = pos;
    if (!IsUnicodeSpace(DecodeUtf8(text, &next))) break;
    pos = next;
  }
  return pos;
}

// ------------------------------------------------------------------------------------------
// GPT-2's byte-level alphabet: every byte is shown as a printable character.

struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_char;  // UTF-8 of the character standing for a byte
  std::array<int16_t, 512> char_to_byte;      // code point -> byte, -1 when none

  ByteLevelAlphabet() {
    char_to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : 256u + extra++;
      AppendCodepoint(cp, &byte_to_char[b]);
      char_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelAlphabet& Alphabet() {
  static const ByteLevelAlphabet* const alphabet = new ByteLevelAlphabet();
  return *alphabet;
}

// What the ByteLevel decoder makes of one token: the bytes its characters stand for, or the
// token's own text when any character is outside the alphabet (as Hugging Face does).
std::string ByteLevelTokenBytes(std::string_view token) {
  const ByteLevelAlphabet& alphabet = Alphabet();
  std::string bytes;
  size_t pos = 0;
  while (pos < token.size()) {
    const uint32_t cp = DecodeUtf8(token, &pos);
    if (cp >= alphabet.char_to_byte.size() || alphabet.char_to_byte[cp] < 0) {
      return std::string(token);
    }
    bytes.push_back(static_cast<char>(alphabet.char_to_byte[cp]));
  }
  return bytes;
}

// ------------------------------------------------------------------------------------------
// PCRE2

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Per-thread match buffers, so that one compiled pattern serves every thread.
struct MatchScratch {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;

  MatchScratch() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (context != nullptr && jit_stack != nullptr) {
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
    }
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

MatchScratch& Scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

class Regex {
 public:
  // `field` names the pattern's place in the file for error messages.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern, bool literal,
                                                        std::string_view field) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()),
                                     pattern.size(), options, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(
          absl::StrCat(Av(field), ": regex does not compile at offset ", offset, ": ",
                       reinterpret_cast<const char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // Without JIT the interpreter still works.
    return std::unique_ptr<Regex>(new Regex(code));
  }

  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends [begin, end) of each non-overlapping match, left to right. `subject` must be valid
  // UTF-8. On a matcher error (a resource limit) stops, logs, and returns what it found.
  void FindAll(std::string_view subject, std::vector<std::pair<size_t, size_t>>* matches) const {
    MatchScratch& scratch = Scratch();
    const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
    size_t offset = 0;
    while (offset <= subject.size()) {
      const int rc = pcre2_match(code_, data, subject.size(), offset, PCRE2_NO_UTF_CHECK,
                                 scratch.data, scratch.context);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        MOE_LOG(WARNING) << "tokenizer regex stopped early: "
                         << reinterpret_cast<const char*>(message);
        return;
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
      const size_t begin = ovector[0], end = ovector[1];
      matches->emplace_back(begin, end);
      if (end > begin) {
        offset = end;
      } else {  // An empty match: step over one character.
        if (end >= subject.size()) return;
        size_t next = end;
        DecodeUtf8(subject, &next);
        offset = next;
      }
    }
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// ------------------------------------------------------------------------------------------
// JSON helpers: every access is checked, so nlohmann never throws past them.

const Json* Member(const Json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::Status FieldError(std::string_view source, std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(Av(source), ": ", Av(field), ": ", Av(what)));
}

absl::StatusOr<bool> GetBool(const Json& object, const char* key, bool fallback,
                             std::string_view source, std::string_view field) {
  const Json* value = Member(object, key);
  if (value == nullptr) return fallback;
  if (!value->is_boolean()) {
    return FieldError(source, absl::StrCat(Av(field), ".", key), "expected true or false");
  }
  return value->get<bool>();
}

absl::StatusOr<std::string> GetString(const Json& object, const char* key,
                                      std::string_view source, std::string_view field) {
  const Json* value = Member(object, key);
  if (value == nullptr || !value->is_string()) {
    return FieldError(source, absl::StrCat(Av(field), ".", key), "expected a string");
  }
  return value->get<std::string>();
}

absl::StatusOr<int32_t> ToId(const Json& value, std::string_view source, std::string_view field) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
      value.get<int64_t>() > INT32_MAX) {
    return FieldError(source, field, "expected a token id (a non-negative integer)");
  }
  return static_cast<int32_t>(value.get<int64_t>());
}

absl::StatusOr<Json> ParseJson(std::string_view text, std::string_view source) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": not valid JSON: ", e.what()));
  }
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return text.str();
}

// ------------------------------------------------------------------------------------------
// Pipeline pieces

struct AddedToken {
  int32_t id = 0;
  std::string content;
  std::string match_text;  // content, normalized when `normalized`
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

// A piece of input: text to pre-tokenize, or an added token already recognised.
struct Segment {
  size_t begin;
  size_t end;
  int32_t added_id;  // -1 for text
};

// Rust's Unicode `\w` (Alphabetic, marks, decimal digits, connectors, joiners), which Hugging
// Face uses for single_word; PCRE2's `\w` leaves out marks such as U+FE0F.
#define MOE_RUST_WORD_CHAR R"([\p{L}\p{Nl}\p{Nd}\p{M}\p{Pc}\x{200C}\x{200D}])"
const Regex& WordStartRegex() {
  static const Regex* const regex =
      Regex::Compile(R"(\A)" MOE_RUST_WORD_CHAR, false, "word").value().release();
  return *regex;
}
const Regex& WordEndRegex() {
  static const Regex* const regex =
      Regex::Compile(MOE_RUST_WORD_CHAR R"(\z)", false, "word").value().release();
  return *regex;
}
#undef MOE_RUST_WORD_CHAR
bool StartsWithWord(std::string_view text) {
  std::vector<std::pair<size_t, size_t>> m;
  WordStartRegex().FindAll(text, &m);
  return !m.empty();
}
bool EndsWithWord(std::string_view text) {
  std::vector<std::pair<size_t, size_t>> m;
  WordEndRegex().FindAll(text, &m);
  return !m.empty();
}

// Finds added tokens in text, leftmost first and longest among those starting at one place,
// as Hugging Face's Aho-Corasick (LeftmostLongest) matcher does.
class AddedTokenMatcher {
 public:
  void Add(const AddedToken* token) {
    if (token->match_text.empty()) return;
    auto& bucket = by_first_byte_[static_cast<unsigned char>(token->match_text[0])];
    bucket.push_back(token);
    std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* a, const AddedToken* b) {
      return a->match_text.size() > b->match_text.size();
    });
    empty_ = false;
  }

  // Splits `text` into segments covering it in order (empty text segments left out).
  void Split(std::string_view text, std::vector<Segment>* out) const {
    size_t start_offset = 0;
    if (!empty_) {
      size_t pos = 0;
      while (pos < text.size()) {
        const AddedToken* token = MatchAt(text, pos);
        if (token == nullptr) {
          ++pos;
          continue;
        }
        size_t start = pos, stop = pos + token->match_text.size();
        pos = stop;
        if (start < start_offset) continue;  // Inside whitespace a previous rstrip took.
        if (token->single_word) {
          const bool start_space = start == 0 || !EndsWithWord(text.substr(0, start));
          const bool stop_space = stop == text.size() || !StartsWithWord(text.substr(stop));
          if (!start_space || !stop_space) continue;
        }
        if (token->lstrip) {
          start = std::max(TrailingSpaceStart(text.substr(0, start)), start_offset);
        }
        if (token->rstrip) stop += LeadingSpaceLength(text.substr(stop));
        if (start > start_offset) out->push_back({start_offset, start, -1});
        out->push_back({start, stop, token->id});
        start_offset = stop;
      }
    }
    if (start_offset < text.size()) out->push_back({start_offset, text.size(), -1});
  }

 private:
  const AddedToken* MatchAt(std::string_view text, size_t pos) const {
    const auto& bucket = by_first_byte_[static_cast<unsigned char>(text[pos])];
    for (const AddedToken* token : bucket) {
      const std::string& m = token->match_text;
      if (text.size() - pos >= m.size() && text.compare(pos, m.size(), m) == 0) {
        return token;
      }
    }
    return nullptr;
  }

  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;
  bool empty_ = true;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel };
  Kind kind = Kind::kSplit;
  std::unique_ptr<Regex> regex;  // kSplit
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // kByteLevel
  bool use_regex = false;         // kByteLevel
};

struct Span {
  size_t begin;
  size_t end;
  bool is_match;
};

// Hugging Face's NormalizedString::split: the pieces of `text` around `regex`'s matches.
void SplitByRegex(std::string_view text, const Regex& regex, SplitBehavior behavior, bool invert,
                  std::vector<std::string>* out) {
  std::vector<std::pair<size_t, size_t>> matches;
  regex.FindAll(text, &matches);
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (prev != begin) spans.push_back({prev, begin, invert});
    spans.push_back({begin, end, !invert});
    prev = end;
  }
  if (prev != text.size()) spans.push_back({prev, text.size(), invert});

  std::vector<Span> pieces;
  pieces.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      pieces = std::move(spans);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) pieces.push_back(s);
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !pieces.empty()) {
          pieces.back().end = s.end;
        } else {
          pieces.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !pieces.empty()) {
          pieces.back().begin = it->begin;
        } else {
          pieces.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !pieces.empty()) {
          pieces.back().end = s.end;
        } else {
          pieces.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
  }
  for (const Span& s : pieces) {
    if (s.end > s.begin) out->emplace_back(text.substr(s.begin, s.end - s.begin));
  }
}

struct BpeMerge {
  int32_t rank;
  int32_t new_id;
};

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// A bounded cache of recent words and their ids, split into shards so that threads encoding at
// the same time rarely wait on each other. A full shard is emptied and starts over.
class WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 256;

  bool Lookup(std::string_view word, std::vector<int32_t>* out) {
    Shard& shard = ShardFor(word);
    absl::MutexLock lock(&shard.mu);
    auto it = shard.map.find(Av(word));
    if (it == shard.map.end()) return false;
    out->insert(out->end(), it->second.begin(), it->second.end());
    return true;
  }

  void Insert(std::string_view word, const int32_t* ids, size_t count) {
    Shard& shard = ShardFor(word);
    absl::MutexLock lock(&shard.mu);
    if (shard.map.size() >= kEntriesPerShard) shard.map.clear();
    shard.map.try_emplace(std::string(word), ids, ids + count);
  }

 private:
  static constexpr size_t kShards = 16;
  static constexpr size_t kEntriesPerShard = 4096;
  struct Shard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> map ABSL_GUARDED_BY(mu);
  };
  Shard& ShardFor(std::string_view word) {
    return shards_[absl::Hash<absl::string_view>{}(Av(word)) % kShards];
  }
  std::array<Shard, kShards> shards_;
};

enum class NormalizerKind { kNfc, kNfkc };
enum class DecoderKind { kByteLevel, kJoinWithSpace };

}  // namespace

// ------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  // Set at construction, read-only afterwards.
  std::string source;
  absl::flat_hash_map<std::string, int32_t> vocab;
  absl::flat_hash_map<uint64_t, BpeMerge> merges;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;

  std::vector<NormalizerKind> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::unique_ptr<Regex> byte_level_regex;

  std::vector<std::unique_ptr<AddedToken>> added_tokens;
  absl::flat_hash_map<std::string, int32_t> added_by_content;
  AddedTokenMatcher raw_matcher;         // normalized == false: matched on the input
  AddedTokenMatcher normalized_matcher;  // normalized == true: matched after normalization

  std::vector<int32_t> post_prefix;  // ids the post-processor puts before / after the text
  std::vector<int32_t> post_suffix;
  DecoderKind decoder = DecoderKind::kJoinWithSpace;

  std::vector<std::string> id_to_token;  // "" where no token has the id
  std::vector<std::string> token_bytes;  // what each id decodes to
  std::vector<uint8_t> id_flags;
  static constexpr uint8_t kKnown = 1, kSpecial = 2;

  std::optional<int32_t> bos_id;
  std::vector<int32_t> eos_ids;
  std::optional<bool> add_bos_token;
  std::string chat_template;

  // Guarded by its own mutexes.
  mutable WordCache cache;

  bool Known(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < id_flags.size() && (id_flags[id] & kKnown);
  }
  bool Special(int32_t id) const { return Known(id) && (id_flags[id] & kSpecial); }

  std::string Normalize(std::string_view text) const;
  void EncodeText(std::string_view text, std::vector<int32_t>* ids) const;
  void PreTokenize(std::string_view text, std::vector<std::string>* words) const;
  void Bpe(std::string_view word, std::vector<int32_t>* ids) const;
};

std::string Tokenizer::Impl::Normalize(std::string_view text) const {
  if (normalizers.empty()) return std::string(text);
  bool ascii = true;
  for (char c : text) ascii &= static_cast<unsigned char>(c) < 0x80;
  if (ascii) return std::string(text);  // NFC and NFKC leave ASCII as it is.
#ifdef MOE_TOKENIZER_HAVE_ICU
  std::string current(text);
  for (NormalizerKind kind : normalizers) {
    UErrorCode status = U_ZERO_ERROR;
    const UNormalizer2* normalizer =
        kind == NormalizerKind::kNfc ? unorm2_getNFCInstance(&status)
                                     : unorm2_getNFKCInstance(&status);
    std::vector<UChar> utf16(current.size() + 1);
    int32_t utf16_len = 0;
    u_strFromUTF8(utf16.data(), static_cast<int32_t>(utf16.size()), &utf16_len, current.data(),
                  static_cast<int32_t>(current.size()), &status);
    std::vector<UChar> normalized(static_cast<size_t>(utf16_len) * 4 + 16);
    int32_t normalized_len =
        unorm2_normalize(normalizer, utf16.data(), utf16_len, normalized.data(),
                         static_cast<int32_t>(normalized.size()), &status);
    if (status == U_BUFFER_OVERFLOW_ERROR) {
      status = U_ZERO_ERROR;
      normalized.resize(static_cast<size_t>(normalized_len) + 1);
      normalized_len = unorm2_normalize(normalizer, utf16.data(), utf16_len, normalized.data(),
                                        static_cast<int32_t>(normalized.size()), &status);
    }
    std::string utf8(static_cast<size_t>(normalized_len) * 3 + 4, '\0');
    int32_t utf8_len = 0;
    u_strToUTF8(utf8.data(), static_cast<int32_t>(utf8.size()), &utf8_len, normalized.data(),
                normalized_len, &status);
    if (U_FAILURE(status)) {
      MOE_LOG(WARNING) << "tokenizer: normalization failed, text left as is: "
                       << u_errorName(status);
      return current;
    }
    utf8.resize(static_cast<size_t>(utf8_len));
    current = std::move(utf8);
  }
  return current;
#else
  return std::string(text);  // Unreachable: loading refuses normalizers without ICU.
#endif
}

void Tokenizer::Impl::PreTokenize(std::string_view text, std::vector<std::string>* words) const {
  std::vector<std::string> pieces;
  pieces.emplace_back(text);
  std::vector<std::string> next;
  for (const PreTokenizerStep& step : pre_tokenizers) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.kind == PreTokenizerStep::Kind::kSplit) {
        SplitByRegex(piece, *step.regex, step.behavior, step.invert, &next);
        continue;
      }
      if (step.add_prefix_space && piece[0] != ' ') piece.insert(0, 1, ' ');
      if (step.use_regex) {
        std::vector<std::string> split;
        SplitByRegex(piece, *byte_level_regex, SplitBehavior::kIsolated, false, &split);
        for (const std::string& s : split) {
          std::string mapped;
          mapped.reserve(s.size() * 2);
          for (unsigned char c : s) mapped += Alphabet().byte_to_char[c];
          next.push_back(std::move(mapped));
        }
      } else {
        std::string mapped;
        mapped.reserve(piece.size() * 2);
        for (unsigned char c : piece) mapped += Alphabet().byte_to_char[c];
        next.push_back(std::move(mapped));
      }
    }
    pieces.swap(next);
  }
  for (std::string& piece : pieces) words->push_back(std::move(piece));
}

void Tokenizer::Impl::Bpe(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges) {
    auto it = vocab.find(Av(word));
    if (it != vocab.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= WordCache::kMaxWordBytes;
  if (cacheable && cache.Lookup(word, ids)) return;

  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  std::string piece;
  bool last_was_unk = false;
  for (size_t pos = 0; pos < word.size();) {
    const size_t begin = pos;
    DecodeUtf8(word, &pos);
    piece.clear();
    if (begin > 0) piece += continuing_subword_prefix;
    piece.append(word.data() + begin, pos - begin);
    if (pos == word.size()) piece += end_of_word_suffix;
    auto it = vocab.find(Av(piece));
    int32_t id;
    if (it != vocab.end()) {
      id = it->second;
      last_was_unk = false;
    } else if (unk_id.has_value()) {
      if (fuse_unk && last_was_unk) continue;
      id = *unk_id;
      last_was_unk = true;
    } else {
      continue;  // Hugging Face drops characters it cannot represent.
    }
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, true});
  }
  if (!symbols.empty()) symbols.back().next = -1;

  // Merge the lowest-ranked pair first, the leftmost among equals (Hugging Face's word.rs).
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push_pair = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges.find(PairKey(left.id, right.id));
    if (it == merges.end() || it->second.new_id != top.new_id) continue;  // Stale entry.
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }

  const size_t first = ids->size();
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    ids->push_back(symbols[i].id);
  }
  if (cacheable) cache.Insert(word, ids->data() + first, ids->size() - first);
}

void Tokenizer::Impl::EncodeText(std::string_view text, std::vector<int32_t>* ids) const {
  std::vector<Segment> raw;
  raw_matcher.Split(text, &raw);
  std::vector<Segment> normalized_segments;
  std::vector<std::string> words;
  for (const Segment& segment : raw) {
    if (segment.added_id >= 0) {
      ids->push_back(segment.added_id);
      continue;
    }
    const std::string normalized =
        Normalize(text.substr(segment.begin, segment.end - segment.begin));
    normalized_segments.clear();
    normalized_matcher.Split(normalized, &normalized_segments);
    for (const Segment& piece : normalized_segments) {
      if (piece.added_id >= 0) {
        ids->push_back(piece.added_id);
        continue;
      }
      words.clear();
      PreTokenize(std::string_view(normalized).substr(piece.begin, piece.end - piece.begin),
                  &words);
      for (const std::string& word : words) Bpe(word, ids);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Loading

namespace {

absl::Status ParseNormalizer(const Json& spec, std::string_view source, std::string_view field,
                             std::vector<NormalizerKind>* out) {
  MOE_ASSIGN_OR_RETURN(std::string type, GetString(spec, "type", source, field));
  if (type == "Sequence") {
    const Json* list = Member(spec, "normalizers");
    if (list == nullptr || !list->is_array()) {
      return FieldError(source, absl::StrCat(Av(field), ".normalizers"), "expected an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      MOE_RETURN_IF_ERROR(ParseNormalizer((*list)[i], source,
                                          absl::StrCat(Av(field), ".normalizers[", i, "]"), out));
    }
    return absl::OkStatus();
  }
  if (type == "NFC" || type == "NFKC") {
#ifdef MOE_TOKENIZER_HAVE_ICU
    out->push_back(type == "NFC" ? NormalizerKind::kNfc : NormalizerKind::kNfkc);
    return absl::OkStatus();
#else
    return absl::UnimplementedError(absl::StrCat(
        Av(source), ": ", Av(field), ": normalizer ", type,
        " needs Unicode normalization, and this build has no ICU (install libicu-dev)"));
#endif
  }
  return absl::UnimplementedError(
      absl::StrCat(Av(source), ": ", Av(field), ": normalizer type \"", type,
                   "\" is not supported (supported: NFC, NFKC, Sequence)"));
}

absl::Status ParsePreTokenizer(const Json& spec, std::string_view source, std::string_view field,
                               std::vector<PreTokenizerStep>* out) {
  MOE_ASSIGN_OR_RETURN(std::string type, GetString(spec, "type", source, field));
  if (type == "Sequence") {
    const Json* list = Member(spec, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return FieldError(source, absl::StrCat(Av(field), ".pretokenizers"), "expected an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      MOE_RETURN_IF_ERROR(ParsePreTokenizer(
          (*list)[i], source, absl::StrCat(Av(field), ".pretokenizers[", i, "]"), out));
    }
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    MOE_ASSIGN_OR_RETURN(step.add_prefix_space,
                         GetBool(spec, "add_prefix_space", true, source, field));
    MOE_ASSIGN_OR_RETURN(step.use_regex, GetBool(spec, "use_regex", true, source, field));
    out->push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "Split") {
    const std::string pattern_field = absl::StrCat(Av(field), ".pattern");
    const Json* pattern = Member(spec, "pattern");
    if (pattern == nullptr || !pattern->is_object()) {
      return FieldError(source, pattern_field, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    const Json* regex = Member(*pattern, "Regex");
    const Json* literal = Member(*pattern, "String");
    const Json* text = regex != nullptr ? regex : literal;
    if (text == nullptr || !text->is_string()) {
      return FieldError(source, pattern_field, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    MOE_ASSIGN_OR_RETURN(step.regex, Regex::Compile(text->get<std::string>(), regex == nullptr,
                                                    absl::StrCat(Av(source), ": ", pattern_field)));
    MOE_ASSIGN_OR_RETURN(std::string behavior, GetString(spec, "behavior", source, field));
    static const std::pair<const char*, SplitBehavior> kBehaviors[] = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    bool found = false;
    for (const auto& [name, value] : kBehaviors) {
      if (behavior == name) step.behavior = value, found = true;
    }
    if (!found) {
      return FieldError(source, absl::StrCat(Av(field), ".behavior"),
                        absl::StrCat("unknown split behavior \"", behavior, "\""));
    }
    MOE_ASSIGN_OR_RETURN(step.invert, GetBool(spec, "invert", false, source, field));
    out->push_back(std::move(step));
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat(Av(source), ": ", Av(field), ": pre-tokenizer type \"", type,
                   "\" is not supported (supported: ByteLevel, Split, Sequence)"));
}

// The ids a post-processor puts around the text of a single sequence.
struct PostProcessing {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
};

absl::StatusOr<int32_t> NamedId(const Json& pair, std::string_view source, std::string_view field) {
  // Roberta/Bert write special tokens as ["<s>", 0].
  if (!pair.is_array() || pair.size() != 2) {
    return FieldError(source, field, "expected [token, id]");
  }
  return ToId(pair[1], source, field);
}

absl::Status ParsePostProcessor(const Json& spec, std::string_view source, std::string_view field,
                                PostProcessing* post) {
  MOE_ASSIGN_OR_RETURN(std::string type, GetString(spec, "type", source, field));
  if (type == "ByteLevel") return absl::OkStatus();  // Only moves offsets.
  if (type == "Sequence") {
    const Json* list = Member(spec, "processors");
    if (list == nullptr || !list->is_array()) {
      return FieldError(source, absl::StrCat(Av(field), ".processors"), "expected an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      PostProcessing inner;
      MOE_RETURN_IF_ERROR(ParsePostProcessor(
          (*list)[i], source, absl::StrCat(Av(field), ".processors[", i, "]"), &inner));
      // Each processor wraps the output of the ones before it.
      post->prefix.insert(post->prefix.begin(), inner.prefix.begin(), inner.prefix.end());
      post->suffix.insert(post->suffix.end(), inner.suffix.begin(), inner.suffix.end());
    }
    return absl::OkStatus();
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    const Json* cls = Member(spec, "cls");
    const Json* sep = Member(spec, "sep");
    if (cls == nullptr || sep == nullptr) {
      return FieldError(source, field, "expected cls and sep");
    }
    MOE_ASSIGN_OR_RETURN(int32_t cls_id, NamedId(*cls, source, absl::StrCat(Av(field), ".cls")));
    MOE_ASSIGN_OR_RETURN(int32_t sep_id, NamedId(*sep, source, absl::StrCat(Av(field), ".sep")));
    post->prefix.push_back(cls_id);
    post->suffix.push_back(sep_id);
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return absl::UnimplementedError(absl::StrCat(
        Av(source), ": ", Av(field), ": post-processor type \"", type,
        "\" is not supported (supported: TemplateProcessing, ByteLevel, RobertaProcessing, "
        "BertProcessing, Sequence)"));
  }
  const std::string single_field = absl::StrCat(Av(field), ".single");
  const Json* single = Member(spec, "single");
  if (single == nullptr || !single->is_array()) {
    return FieldError(source, single_field, "expected an array");
  }
  const Json* special_tokens = Member(spec, "special_tokens");
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const std::string piece_field = absl::StrCat(single_field, "[", i, "]");
    if (const Json* sequence = Member(piece, "Sequence")) {
      const Json* id = Member(*sequence, "id");
      if (id == nullptr || *id != "A" || seen_sequence) {
        return FieldError(source, piece_field, "a single-sequence template holds $A once");
      }
      seen_sequence = true;
      continue;
    }
    const Json* special = Member(piece, "SpecialToken");
    const Json* name = special != nullptr ? Member(*special, "id") : nullptr;
    if (name == nullptr || !name->is_string()) {
      return FieldError(source, piece_field, "expected Sequence or SpecialToken");
    }
    const Json* entry =
        special_tokens != nullptr ? Member(*special_tokens, name->get<std::string>().c_str())
                                  : nullptr;
    const Json* ids = entry != nullptr ? Member(*entry, "ids") : nullptr;
    if (ids == nullptr || !ids->is_array()) {
      return FieldError(source, absl::StrCat(Av(field), ".special_tokens"),
                        absl::StrCat("no ids for \"", name->get<std::string>(), "\""));
    }
    for (const Json& id : *ids) {
      MOE_ASSIGN_OR_RETURN(int32_t value,
                           ToId(id, source, absl::StrCat(Av(field), ".special_tokens")));
      (seen_sequence ? post->suffix : post->prefix).push_back(value);
    }
  }
  if (!seen_sequence) return FieldError(source, single_field, "has no $A");
  return absl::OkStatus();
}

absl::StatusOr<DecoderKind> ParseDecoder(const Json* spec, std::string_view source) {
  if (spec == nullptr) return DecoderKind::kJoinWithSpace;
  MOE_ASSIGN_OR_RETURN(std::string type, GetString(*spec, "type", source, "decoder"));
  if (type == "ByteLevel") return DecoderKind::kByteLevel;
  if (type == "Sequence") {
    const Json* list = Member(*spec, "decoders");
    if (list != nullptr && list->is_array() && !list->empty()) {
      bool all_byte_level = true;
      for (const Json& d : *list) all_byte_level &= Member(d, "type") && d["type"] == "ByteLevel";
      if (all_byte_level) return DecoderKind::kByteLevel;
    }
  }
  return absl::UnimplementedError(
      absl::StrCat(Av(source), ": decoder: decoder type \"", type,
                   "\" is not supported (supported: ByteLevel)"));
}

// A token named in tokenizer_config.json: "<s>", {"content": "<s>", ...} or null.
absl::StatusOr<std::optional<std::string>> ConfigToken(const Json& config, const char* key,
                                                       std::string_view source) {
  const Json* value = Member(config, key);
  if (value == nullptr) return std::optional<std::string>();
  if (value->is_string()) return std::optional<std::string>(value->get<std::string>());
  if (const Json* content = Member(*value, "content"); content && content->is_string()) {
    return std::optional<std::string>(content->get<std::string>());
  }
  return FieldError(source, key, "expected a string or an object with \"content\"");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const Sources& sources) {
  try {
    auto impl = std::make_unique<Impl>();
    const std::string& source = sources.tokenizer_source;
    impl->source = source;
    MOE_ASSIGN_OR_RETURN(Json root, ParseJson(sources.tokenizer_json, source));
    if (!root.is_object()) return FieldError(source, "(root)", "expected a JSON object");

    // model
    const Json* model = Member(root, "model");
    if (model == nullptr || !model->is_object()) {
      return FieldError(source, "model", "missing or not an object");
    }
    std::string type = "BPE";
    if (const Json* t = Member(*model, "type")) {
      if (!t->is_string()) return FieldError(source, "model.type", "expected a string");
      type = t->get<std::string>();
    } else if (Member(*model, "merges") == nullptr) {
      return FieldError(source, "model.type", "missing, and the model has no merges");
    }
    if (type != "BPE") {
      return absl::UnimplementedError(absl::StrCat(
          source, ": model.type: \"", type, "\" models are not supported (only BPE)"));
    }
    MOE_ASSIGN_OR_RETURN(bool byte_fallback,
                         GetBool(*model, "byte_fallback", false, source, "model"));
    if (byte_fallback) {
      return absl::UnimplementedError(
          absl::StrCat(source, ": model.byte_fallback: byte fallback is not supported"));
    }
    MOE_ASSIGN_OR_RETURN(impl->ignore_merges,
                         GetBool(*model, "ignore_merges", false, source, "model"));
    MOE_ASSIGN_OR_RETURN(impl->fuse_unk, GetBool(*model, "fuse_unk", false, source, "model"));
    if (const Json* p = Member(*model, "continuing_subword_prefix"); p && p->is_string()) {
      impl->continuing_subword_prefix = p->get<std::string>();
    }
    if (const Json* s = Member(*model, "end_of_word_suffix"); s && s->is_string()) {
      impl->end_of_word_suffix = s->get<std::string>();
    }
    const Json* vocab = Member(*model, "vocab");
    if (vocab == nullptr || !vocab->is_object()) {
      return FieldError(source, "model.vocab", "missing or not an object");
    }
    int32_t max_id = -1;
    impl->vocab.reserve(vocab->size());
    for (auto it = vocab->begin(); it != vocab->end(); ++it) {
      MOE_ASSIGN_OR_RETURN(int32_t id,
                           ToId(it.value(), source, absl::StrCat("model.vocab[\"", it.key(), "\"]")));
      impl->vocab[it.key()] = id;
      max_id = std::max(max_id, id);
    }
    if (const Json* unk = Member(*model, "unk_token"); unk && unk->is_string()) {
      auto it = impl->vocab.find(unk->get<std::string>());
      if (it == impl->vocab.end()) {
        return FieldError(source, "model.unk_token",
                          absl::StrCat("\"", unk->get<std::string>(), "\" is not in the vocab"));
      }
      impl->unk_id = it->second;
    }
    const Json* merges = Member(*model, "merges");
    if (merges == nullptr || !merges->is_array()) {
      return FieldError(source, "model.merges", "missing or not an array");
    }
    impl->merges.reserve(merges->size());
    for (size_t i = 0; i < merges->size(); ++i) {
      const Json& merge = (*merges)[i];
      const std::string field = absl::StrCat("model.merges[", i, "]");
      std::string left, right;
      if (merge.is_string()) {
        const std::string& text = merge.get_ref<const std::string&>();
        const size_t space = text.find(' ');
        if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
          return FieldError(source, field, absl::StrCat("\"", text, "\" is not \"a b\""));
        }
        left = text.substr(0, space);
        right = text.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        return FieldError(source, field, "expected \"a b\" or [\"a\", \"b\"]");
      }
      auto left_it = impl->vocab.find(left);
      auto right_it = impl->vocab.find(right);
      if (left_it == impl->vocab.end() || right_it == impl->vocab.end()) {
        return FieldError(source, field,
                          absl::StrCat("token \"", left_it == impl->vocab.end() ? left : right,
                                       "\" is not in model.vocab"));
      }
      std::string merged = left;
      const std::string& prefix = impl->continuing_subword_prefix;
      merged += right.compare(0, prefix.size(), prefix) == 0 ? right.substr(prefix.size()) : right;
      auto merged_it = impl->vocab.find(merged);
      if (merged_it == impl->vocab.end()) {
        return FieldError(source, field,
                          absl::StrCat("merged token \"", merged, "\" is not in model.vocab"));
      }
      impl->merges[PairKey(left_it->second, right_it->second)] = {static_cast<int32_t>(i),
                                                                  merged_it->second};
    }

    // added_tokens
    if (const Json* added = Member(root, "added_tokens")) {
      if (!added->is_array()) return FieldError(source, "added_tokens", "expected an array");
      for (size_t i = 0; i < added->size(); ++i) {
        const Json& spec = (*added)[i];
        const std::string field = absl::StrCat("added_tokens[", i, "]");
        auto token = std::make_unique<AddedToken>();
        const Json* id = Member(spec, "id");
        if (id == nullptr) return FieldError(source, field, "missing id");
        MOE_ASSIGN_OR_RETURN(token->id, ToId(*id, source, absl::StrCat(field, ".id")));
        MOE_ASSIGN_OR_RETURN(token->content, GetString(spec, "content", source, field));
        if (token->content.empty()) continue;  // Hugging Face ignores empty added tokens.
        if (!IsValidUtf8(token->content)) {
          return FieldError(source, absl::StrCat(field, ".content"), "not valid UTF-8");
        }
        MOE_ASSIGN_OR_RETURN(token->special, GetBool(spec, "special", false, source, field));
        MOE_ASSIGN_OR_RETURN(token->lstrip, GetBool(spec, "lstrip", false, source, field));
        MOE_ASSIGN_OR_RETURN(token->rstrip, GetBool(spec, "rstrip", false, source, field));
        MOE_ASSIGN_OR_RETURN(token->single_word,
                             GetBool(spec, "single_word", false, source, field));
        MOE_ASSIGN_OR_RETURN(token->normalized,
                             GetBool(spec, "normalized", !token->special, source, field));
        max_id = std::max(max_id, token->id);
        impl->added_by_content[token->content] = token->id;
        impl->added_tokens.push_back(std::move(token));
      }
    }
    if (const Json* normalizer = Member(root, "normalizer")) {
      MOE_RETURN_IF_ERROR(ParseNormalizer(*normalizer, source, "normalizer", &impl->normalizers));
    }
    for (const auto& token : impl->added_tokens) {
      // As Hugging Face does: first the tokens to find in the input as it is, then, in the
      // normalized text between them, the normalized form of the others.
      if (token->normalized) {
        token->match_text = impl->Normalize(token->content);
        impl->normalized_matcher.Add(token.get());
      } else {
        token->match_text = token->content;
        impl->raw_matcher.Add(token.get());
      }
    }
    if (const Json* pre = Member(root, "pre_tokenizer")) {
      MOE_RETURN_IF_ERROR(ParsePreTokenizer(*pre, source, "pre_tokenizer", &impl->pre_tokenizers));
    }
    for (const PreTokenizerStep& step : impl->pre_tokenizers) {
      if (step.kind == PreTokenizerStep::Kind::kByteLevel && step.use_regex &&
          impl->byte_level_regex == nullptr) {
        MOE_ASSIGN_OR_RETURN(impl->byte_level_regex,
                             Regex::Compile(kGpt2Pattern, false, "ByteLevel regex"));
      }
    }
    if (const Json* post = Member(root, "post_processor")) {
      PostProcessing processing;
      MOE_RETURN_IF_ERROR(ParsePostProcessor(*post, source, "post_processor", &processing));
      impl->post_prefix = std::move(processing.prefix);
      impl->post_suffix = std::move(processing.suffix);
    }
    MOE_ASSIGN_OR_RETURN(impl->decoder, ParseDecoder(Member(root, "decoder"), source));

    // Id tables; added tokens take precedence, as in Hugging Face's id_to_token.
    const size_t size = static_cast<size_t>(max_id + 1);
    impl->id_to_token.assign(size, std::string());
    impl->id_flags.assign(size, 0);
    for (const auto& [token, id] : impl->vocab) {
      impl->id_to_token[id] = token;
      impl->id_flags[id] = Impl::kKnown;
    }
    for (const auto& token : impl->added_tokens) {
      impl->id_to_token[token->id] = token->content;
      impl->id_flags[token->id] = Impl::kKnown | (token->special ? Impl::kSpecial : 0);
    }
    for (int32_t id : impl->post_prefix) {
      if (!impl->Known(id)) return FieldError(source, "post_processor", "names an unknown id");
    }
    for (int32_t id : impl->post_suffix) {
      if (!impl->Known(id)) return FieldError(source, "post_processor", "names an unknown id");
    }
    impl->token_bytes.resize(size);
    if (impl->decoder == DecoderKind::kByteLevel) {
      for (size_t id = 0; id < size; ++id) {
        impl->token_bytes[id] = ByteLevelTokenBytes(impl->id_to_token[id]);
      }
    }

    std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(std::move(impl)));
    Impl& t = *tokenizer->impl_;

    // tokenizer_config.json
    if (!sources.tokenizer_config_json.empty()) {
      const std::string& config_source = sources.tokenizer_config_source;
      MOE_ASSIGN_OR_RETURN(Json config, ParseJson(sources.tokenizer_config_json, config_source));
      if (!config.is_object()) {
        return FieldError(config_source, "(root)", "expected a JSON object");
      }
      auto lookup = [&](const char* key) -> absl::StatusOr<std::optional<int32_t>> {
        MOE_ASSIGN_OR_RETURN(std::optional<std::string> name,
                             ConfigToken(config, key, config_source));
        if (!name.has_value()) return std::optional<int32_t>();
        std::optional<int32_t> id = tokenizer->TokenToId(*name);
        if (!id.has_value()) {
          return FieldError(config_source, key,
                            absl::StrCat("\"", *name, "\" is not a token of ", source));
        }
        return id;
      };
      MOE_ASSIGN_OR_RETURN(t.bos_id, lookup("bos_token"));
      MOE_ASSIGN_OR_RETURN(std::optional<int32_t> eos, lookup("eos_token"));
      if (eos.has_value()) t.eos_ids.push_back(*eos);
      if (const Json* add_bos = Member(config, "add_bos_token")) {
        if (!add_bos->is_boolean()) {
          return FieldError(config_source, "add_bos_token", "expected true or false");
        }
        t.add_bos_token = add_bos->get<bool>();
      }
      if (const Json* chat = Member(config, "chat_template")) {
        if (chat->is_string()) {
          t.chat_template = chat->get<std::string>();
        } else if (chat->is_array()) {
          for (const Json& entry : *chat) {  // [{"name": "default", "template": "..."}, ...]
            const Json* name = Member(entry, "name");
            const Json* text = Member(entry, "template");
            if (name && text && text->is_string() && *name == "default") {
              t.chat_template = text->get<std::string>();
            }
          }
        } else {
          return FieldError(config_source, "chat_template", "expected a string or a list");
        }
      }
    }
    // generation_config.json
    if (!sources.generation_config_json.empty()) {
      const std::string& gen_source = sources.generation_config_source;
      MOE_ASSIGN_OR_RETURN(Json gen, ParseJson(sources.generation_config_json, gen_source));
      if (const Json* eos = Member(gen, "eos_token_id")) {
        std::vector<Json> values = eos->is_array() ? eos->get<std::vector<Json>>()
                                                   : std::vector<Json>{*eos};
        for (const Json& value : values) {
          MOE_ASSIGN_OR_RETURN(int32_t id, ToId(value, gen_source, "eos_token_id"));
          if (!t.Known(id)) return FieldError(gen_source, "eos_token_id", "unknown token id");
          if (std::find(t.eos_ids.begin(), t.eos_ids.end(), id) == t.eos_ids.end()) {
            t.eos_ids.push_back(id);
          }
        }
      }
      if (const Json* bos = Member(gen, "bos_token_id"); bos && !t.bos_id.has_value()) {
        MOE_ASSIGN_OR_RETURN(int32_t id, ToId(*bos, gen_source, "bos_token_id"));
        if (!t.Known(id)) return FieldError(gen_source, "bos_token_id", "unknown token id");
        t.bos_id = id;
      }
    }
    if (!t.bos_id.has_value() && !t.post_prefix.empty()) t.bos_id = t.post_prefix.front();
    return tokenizer;
  } catch (const std::exception& e) {
    // Every access above is checked; this is the boundary nlohmann must not cross regardless.
    return absl::InvalidArgumentError(
        absl::StrCat(sources.tokenizer_source, ": malformed tokenizer: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(std::string tokenizer_json, ReadFile(path));
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  Sources sources;
  sources.tokenizer_json = tokenizer_json;
  sources.tokenizer_source = path;
  sources.tokenizer_config_source = (dir / "tokenizer_config.json").string();
  sources.generation_config_source = (dir / "generation_config.json").string();
  std::string config, generation;
  std::error_code ec;
  if (std::filesystem::exists(sources.tokenizer_config_source, ec)) {
    MOE_ASSIGN_OR_RETURN(config, ReadFile(sources.tokenizer_config_source));
    sources.tokenizer_config_json = config;
  }
  if (std::filesystem::exists(sources.generation_config_source, ec)) {
    MOE_ASSIGN_OR_RETURN(generation, ReadFile(sources.generation_config_source));
    sources.generation_config_json = generation;
  }
  return FromJson(sources);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDirectory(const std::string& model_dir) {
  return FromFile((std::filesystem::path(model_dir) / "tokenizer.json").string());
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  const Impl& t = *impl_;
  std::string repaired;
  if (!IsValidUtf8(text)) {
    AppendUtf8Lossy(text, /*final=*/true, &repaired);
    text = repaired;
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) {
    const bool template_adds_bos =
        !t.post_prefix.empty() && t.bos_id.has_value() && t.post_prefix.front() == *t.bos_id;
    if (t.add_bos_token.value_or(false) && t.bos_id.has_value() && !template_adds_bos) {
      ids.push_back(*t.bos_id);
    }
    ids.insert(ids.end(), t.post_prefix.begin(), t.post_prefix.end());
  }
  t.EncodeText(text, &ids);
  if (add_special_tokens) ids.insert(ids.end(), t.post_suffix.begin(), t.post_suffix.end());
  return ids;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& t = *impl_;
  std::string out;
  if (t.decoder == DecoderKind::kJoinWithSpace) {
    bool first = true;
    for (int32_t id : ids) {
      if (!t.Known(id) || (skip_special_tokens && t.Special(id))) continue;
      if (!first) out.push_back(' ');
      out += t.id_to_token[id];
      first = false;
    }
    return out;
  }
  std::string bytes;
  for (int32_t id : ids) {
    if (!t.Known(id) || (skip_special_tokens && t.Special(id))) continue;
    bytes += t.token_bytes[id];
  }
  AppendUtf8Lossy(bytes, /*final=*/true, &out);
  return out;
}

std::optional<std::string_view> Tokenizer::IdToToken(int32_t id) const {
  if (!impl_->Known(id)) return std::nullopt;
  return std::string_view(impl_->id_to_token[id]);
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(Av(token)); it != impl_->added_by_content.end()) {
    return it->second;
  }
  if (auto it = impl_->vocab.find(Av(token)); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_flags.size()); }
bool Tokenizer::IsSpecial(int32_t id) const { return impl_->Special(id); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
const std::vector<int32_t>& Tokenizer::eos_ids() const { return impl_->eos_ids; }
bool Tokenizer::IsEos(int32_t id) const {
  return std::find(impl_->eos_ids.begin(), impl_->eos_ids.end(), id) != impl_->eos_ids.end();
}
std::optional<bool> Tokenizer::add_bos_token() const { return impl_->add_bos_token; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

// ------------------------------------------------------------------------------------------

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDecoder::Add(int32_t id) {
  const Tokenizer::Impl& t = *tokenizer_.impl_;
  if (!t.Known(id) || (skip_special_tokens_ && t.Special(id))) return std::string();
  std::string out;
  if (t.decoder == DecoderKind::kJoinWithSpace) {
    if (emitted_any_) out.push_back(' ');
    out += t.id_to_token[id];
    emitted_any_ = true;
    return out;
  }
  pending_ += t.token_bytes[id];
  const size_t used = AppendUtf8Lossy(pending_, /*final=*/false, &out);
  pending_.erase(0, used);
  return out;
}

std::string IncrementalDecoder::Finish() {
  std::string out;
  AppendUtf8Lossy(pending_, /*final=*/true, &out);
  pending_.clear();
  emitted_any_ = false;
  return out;
}

}  // namespace moe::model
