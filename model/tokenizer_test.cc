#include "model/tokenizer.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::model {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

std::string SourceDir() {
  const char* dir = std::getenv("MOE_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string FixtureDir(const std::string& name) {
  return SourceDir() + "/tests/tokenizer/" + name;
}

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return Json::parse(text.str());
}

std::string Printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20) {
      out += "\\x" + std::string(1, "0123456789abcdef"[c >> 4]) + "0123456789abcdef"[c & 15];
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return "\"" + out + "\"";
}

std::string IdsString(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out + "]";
}

bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

// The GPT-2 byte-level alphabet: the vocabulary string that stands for one byte.
std::string ByteToken(unsigned char b) {
  int extra = 0;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
    const uint32_t cp = printable ? x : 256 + extra++;
    if (x == b) {
      std::string out;
      if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
      } else {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      return out;
    }
  }
  return "";
}

// ------------------------------------------------------------------------------------------
// Agreement with Hugging Face `tokenizers` on the committed fixtures.

class HuggingFaceFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto tokenizer = Tokenizer::FromDirectory(FixtureDir(GetParam()));
    if (tokenizer.status().code() == absl::StatusCode::kUnimplemented &&
        std::string(tokenizer.status().message()).find("ICU") != std::string::npos) {
      GTEST_SKIP() << GetParam() << " asks for NFC, and this build has no ICU (libicu-dev)";
    }
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(tokenizer).value();
    fixtures_ = ReadJson(FixtureDir(GetParam()) + "/fixtures.json");
    ASSERT_TRUE(fixtures_.contains("encode"));
  }

  std::unique_ptr<Tokenizer> tokenizer_;
  Json fixtures_;
};

TEST_P(HuggingFaceFixtureTest, EncodeMatches) {
  int failures = 0;
  const int cases = static_cast<int>(fixtures_["encode"].size());
  for (const Json& c : fixtures_["encode"]) {
    const std::string text = c["text"];
    const auto expected = c["ids"].get<std::vector<int32_t>>();
    const auto expected_plain = c["ids_no_special"].get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tokenizer_->Encode(text, /*add_special_tokens=*/true);
    const std::vector<int32_t> plain = tokenizer_->Encode(text, /*add_special_tokens=*/false);
    if (ids != expected || plain != expected_plain) {
      if (++failures <= 10) {
        ADD_FAILURE() << GetParam() << " text " << Printable(text) << "\n  got      "
                      << IdsString(ids) << " / " << IdsString(plain) << "\n  expected "
                      << IdsString(expected) << " / " << IdsString(expected_plain);
      }
    }
  }
  EXPECT_EQ(failures, 0) << failures << " of " << cases << " strings differ";
  EXPECT_GE(cases, 300);
}

TEST_P(HuggingFaceFixtureTest, DecodeMatches) {
  int failures = 0;
  for (const char* list : {"encode", "decode"}) {
    for (const Json& c : fixtures_[list]) {
      const auto ids = c["ids"].get<std::vector<int32_t>>();
      const std::string expected = c["decode"];
      const std::string expected_skip = c["decode_skip_special"];
      const std::string got = tokenizer_->Decode(ids, /*skip_special_tokens=*/false);
      const std::string got_skip = tokenizer_->Decode(ids, /*skip_special_tokens=*/true);
      if (got != expected || got_skip != expected_skip) {
        if (++failures <= 10) {
          ADD_FAILURE() << GetParam() << " ids " << IdsString(ids) << "\n  got      "
                        << Printable(got) << " / " << Printable(got_skip) << "\n  expected "
                        << Printable(expected) << " / " << Printable(expected_skip);
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

// Feeding ids one at a time emits only valid UTF-8, and after every prefix the emitted text
// plus what Finish would flush equals Decode of that prefix.
TEST_P(HuggingFaceFixtureTest, IncrementalDecodeMatchesDecodeAtEveryPrefix) {
  int failures = 0;
  for (const char* list : {"encode", "decode"}) {
    for (const Json& c : fixtures_[list]) {
      const auto ids = c["ids"].get<std::vector<int32_t>>();
      for (bool skip : {false, true}) {
        IncrementalDecoder stream(*tokenizer_, skip);
        std::string emitted;
        for (size_t k = 0; k < ids.size(); ++k) {
          const std::string piece = stream.Add(ids[k]);
          emitted += piece;
          IncrementalDecoder copy = stream;
          const std::string flushed = emitted + copy.Finish();
          const std::vector<int32_t> prefix(ids.begin(), ids.begin() + k + 1);
          const std::string expected = tokenizer_->Decode(prefix, skip);
          if (!IsValidUtf8(piece) || flushed != expected) {
            if (++failures <= 10) {
              ADD_FAILURE() << GetParam() << " ids " << IdsString(prefix) << " skip " << skip
                            << "\n  streamed " << Printable(flushed) << "\n  decoded  "
                            << Printable(expected);
            }
          }
        }
        emitted += stream.Finish();
        EXPECT_EQ(stream.pending_bytes(), 0u);
        if (emitted != tokenizer_->Decode(ids, skip) && ++failures <= 10) {
          ADD_FAILURE() << GetParam() << " whole sequence " << IdsString(ids);
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(HuggingFaceFixtureTest, VocabSizeCoversEveryId) {
  EXPECT_EQ(tokenizer_->vocab_size(), fixtures_["vocab_size"].get<int32_t>());
  for (int32_t id = 0; id < tokenizer_->vocab_size(); ++id) {
    auto token = tokenizer_->IdToToken(id);
    ASSERT_TRUE(token.has_value()) << id;
    EXPECT_EQ(tokenizer_->TokenToId(*token), id) << Printable(std::string(*token));
  }
  EXPECT_FALSE(tokenizer_->IdToToken(tokenizer_->vocab_size()).has_value());
  EXPECT_FALSE(tokenizer_->IdToToken(-1).has_value());
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, HuggingFaceFixtureTest,
                         ::testing::Values("gpt2", "gpt2_prefix", "qwen2", "llama3"),
                         [](const auto& info) { return info.param; });

// ------------------------------------------------------------------------------------------
// Configuration read next to tokenizer.json.

TEST(TokenizerConfigTest, Qwen2StyleHasEosAndChatTemplateButNoBos) {
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("qwen2"));
  if (tokenizer.status().code() == absl::StatusCode::kUnimplemented) {
    GTEST_SKIP() << tokenizer.status();  // NFC without ICU
  }
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  EXPECT_FALSE(t.bos_id().has_value());
  ASSERT_EQ(t.eos_ids().size(), 1u);
  EXPECT_EQ(t.eos_ids()[0], t.TokenToId("<|im_end|>"));
  EXPECT_TRUE(t.IsEos(*t.TokenToId("<|im_end|>")));
  EXPECT_THAT(t.chat_template(), HasSubstr("<|im_start|>"));
  EXPECT_EQ(t.add_bos_token(), false);
  EXPECT_TRUE(t.IsSpecial(*t.TokenToId("<|endoftext|>")));
  EXPECT_FALSE(t.IsSpecial(*t.TokenToId("<tool_call>")));
}

TEST(TokenizerConfigTest, Llama3StyleTemplateAddsBos) {
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("llama3"));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  const int32_t bos = *t.TokenToId("<|begin_of_text|>");
  EXPECT_EQ(t.bos_id(), bos);
  EXPECT_EQ(t.eos_ids(), std::vector<int32_t>{*t.TokenToId("<|eot_id|>")});
  std::vector<int32_t> ids = t.Encode("Hi", /*add_special_tokens=*/true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), bos);
  EXPECT_NE(t.Encode("Hi", /*add_special_tokens=*/false).front(), bos);
}

TEST(TokenizerConfigTest, BosTokenWrittenAsAnObject) {
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("gpt2_prefix"));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->bos_id(), (*tokenizer)->TokenToId("<s>"));
  EXPECT_EQ((*tokenizer)->eos_ids(), std::vector<int32_t>{*(*tokenizer)->TokenToId("</s>")});
}

// A tiny byte-level tokenizer written inline for the cases the fixtures do not reach.
std::string TinyTokenizerJson(const std::string& model_extra = "",
                              const std::string& merges = R"(["h e", "l l", "he ll", "hell o"])",
                              const std::string& model_type = "BPE",
                              const std::string& extra = "") {
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    vocab += Json(ByteToken(static_cast<unsigned char>(b))).dump() + ": " + std::to_string(b) +
             ", ";
  }
  vocab += R"("he": 256, "ll": 257, "hell": 258, "hello": 259, "<s>": 260, "</s>": 261)";
  return R"({"version": "1.0", )" + extra + R"(
    "added_tokens": [
      {"id": 260, "content": "<s>", "special": true, "lstrip": false, "rstrip": false,
       "single_word": false, "normalized": false},
      {"id": 261, "content": "</s>", "special": true, "lstrip": false, "rstrip": false,
       "single_word": false, "normalized": false}],
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": ")" + model_type + R"(", )" + model_extra + R"( "vocab": {)" + vocab +
         R"(}, "merges": )" + merges + "}}";
}

absl::StatusOr<std::unique_ptr<Tokenizer>> FromText(const std::string& json,
                                                    const std::string& config = "",
                                                    const std::string& generation = "") {
  Tokenizer::Sources sources;
  sources.tokenizer_json = json;
  sources.tokenizer_config_json = config;
  sources.generation_config_json = generation;
  sources.tokenizer_source = "tiny/tokenizer.json";
  sources.tokenizer_config_source = "tiny/tokenizer_config.json";
  sources.generation_config_source = "tiny/generation_config.json";
  return Tokenizer::FromJson(sources);
}

TEST(TokenizerConfigTest, AddBosTokenPrependsBosWhenThePostProcessorDoesNot) {
  auto tokenizer = FromText(TinyTokenizerJson(),
                            R"({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true,
                                "chat_template": [{"name": "tool_use", "template": "x"},
                                                  {"name": "default", "template": "y"}]})",
                            R"({"eos_token_id": [261, 0]})");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  EXPECT_EQ(t.Encode("hello", true), (std::vector<int32_t>{260, 259}));
  EXPECT_EQ(t.Encode("hello", false), (std::vector<int32_t>{259}));
  EXPECT_EQ(t.eos_ids(), (std::vector<int32_t>{261, 0}));
  EXPECT_EQ(t.chat_template(), "y");
}

TEST(TokenizerTest, MergesAsPairsAndStringsGiveTheSameIds) {
  auto strings = FromText(TinyTokenizerJson());
  auto pairs = FromText(TinyTokenizerJson(
      "", R"([["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"]])"));
  ASSERT_TRUE(strings.ok()) << strings.status();
  ASSERT_TRUE(pairs.ok()) << pairs.status();
  EXPECT_EQ((*strings)->Encode("hello hello", false), (*pairs)->Encode("hello hello", false));
  EXPECT_EQ((*strings)->Encode("hello", false), (std::vector<int32_t>{259}));
}

// ------------------------------------------------------------------------------------------
// Streaming: partial characters are held back, invalid bytes become U+FFFD.

class IncrementalDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tokenizer = FromText(TinyTokenizerJson());
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(tokenizer).value();
  }
  int32_t Byte(unsigned char b) { return *tokenizer_->TokenToId(ByteToken(b)); }

  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(IncrementalDecoderTest, TwoByteCharacterSplitAcrossTokens) {
  IncrementalDecoder stream(*tokenizer_, true);
  EXPECT_EQ(stream.Add(Byte('a')), "a");
  EXPECT_EQ(stream.Add(Byte(0xC3)), "");  // first half of "é"
  EXPECT_EQ(stream.pending_bytes(), 1u);
  EXPECT_EQ(stream.Add(Byte(0xA9)), "\xC3\xA9");
  EXPECT_EQ(stream.pending_bytes(), 0u);
  EXPECT_EQ(stream.Finish(), "");
}

TEST_F(IncrementalDecoderTest, EmojiWithZwjSplitIntoSingleBytes) {
  const std::string family = "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9";  // 👨‍👩
  IncrementalDecoder stream(*tokenizer_, true);
  std::vector<std::string> pieces;
  for (unsigned char b : family) pieces.push_back(stream.Add(Byte(b)));
  EXPECT_EQ(pieces, (std::vector<std::string>{"", "", "", "\xF0\x9F\x91\xA8", "", "",
                                              "\xE2\x80\x8D", "", "", "",
                                              "\xF0\x9F\x91\xA9"}));
  std::vector<int32_t> ids = tokenizer_->Encode(family, false);
  EXPECT_EQ(tokenizer_->Decode(ids, true), family);
}

TEST_F(IncrementalDecoderTest, InvalidBytesBecomeReplacementAtOnce) {
  IncrementalDecoder stream(*tokenizer_, true);
  EXPECT_EQ(stream.Add(Byte(0x80)), "\xEF\xBF\xBD");  // a continuation byte with no lead
  EXPECT_EQ(stream.Add(Byte(0xE2)), "");
  EXPECT_EQ(stream.Add(Byte('x')), "\xEF\xBF\xBDx");  // a lead byte cut short by ASCII
  EXPECT_EQ(stream.Add(Byte(0xF0)), "");
  EXPECT_EQ(stream.Add(Byte(0x9F)), "");
  EXPECT_EQ(stream.Finish(), "\xEF\xBF\xBD");  // one replacement for the cut-off tail
  EXPECT_EQ(tokenizer_->Decode({Byte(0x80), Byte(0xE2), Byte('x'), Byte(0xF0), Byte(0x9F)},
                               true),
            "\xEF\xBF\xBD\xEF\xBF\xBDx\xEF\xBF\xBD");
}

TEST_F(IncrementalDecoderTest, SpecialTokensKeptOrSkipped) {
  const std::vector<int32_t> ids = {260, 259, 261};
  EXPECT_EQ(tokenizer_->Decode(ids, false), "<s>hello</s>");
  EXPECT_EQ(tokenizer_->Decode(ids, true), "hello");
  IncrementalDecoder keep(*tokenizer_, false);
  IncrementalDecoder skip(*tokenizer_, true);
  std::string kept, skipped;
  for (int32_t id : ids) {
    kept += keep.Add(id);
    skipped += skip.Add(id);
  }
  EXPECT_EQ(kept, "<s>hello</s>");
  EXPECT_EQ(skipped, "hello");
  EXPECT_EQ(keep.Add(123456), "");  // unknown ids are dropped, as Decode does
}

TEST_F(IncrementalDecoderTest, EncodeRepairsInvalidUtf8AndHandlesEmpty) {
  EXPECT_TRUE(tokenizer_->Encode("", false).empty());
  const std::vector<int32_t> ids = tokenizer_->Encode(std::string("a\xFF" "b", 3), false);
  EXPECT_EQ(tokenizer_->Decode(ids, true), "a\xEF\xBF\xBD" "b");
}

// ------------------------------------------------------------------------------------------
// Errors: a Status naming the file and field, never a crash.

TEST(TokenizerErrorTest, MissingFile) {
  auto tokenizer = Tokenizer::FromFile("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("/nonexistent/dir"));
  EXPECT_FALSE(Tokenizer::FromDirectory("/nonexistent/dir").ok());
}

TEST(TokenizerErrorTest, BadJson) {
  for (const char* text : {"", "{", "[1, 2]", "{\"model\": 3}", "null", "{\"model\": {}}"}) {
    auto tokenizer = FromText(text);
    ASSERT_FALSE(tokenizer.ok()) << text;
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("tiny/tokenizer.json"));
  }
  auto config = FromText(TinyTokenizerJson(), "{not json");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("tiny/tokenizer_config.json"));
}

TEST(TokenizerErrorTest, UnsupportedModelTypesNameThemselves) {
  for (const char* type : {"Unigram", "WordPiece", "WordLevel"}) {
    auto tokenizer = FromText(TinyTokenizerJson("", "[]", type));
    ASSERT_FALSE(tokenizer.ok()) << type;
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr(type));
    EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("model.type"));
  }
  auto fallback = FromText(TinyTokenizerJson(R"("byte_fallback": true,)"));
  ASSERT_FALSE(fallback.ok());
  EXPECT_EQ(fallback.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(fallback.status().message()), HasSubstr("byte_fallback"));
}

TEST(TokenizerErrorTest, MergeNamingAnUnknownToken) {
  auto tokenizer = FromText(TinyTokenizerJson("", R"(["h e", "q zz"])"));
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("model.merges[1]"));
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("\"zz\""));

  auto bad_format = FromText(TinyTokenizerJson("", R"(["h e", "nospace"])"));
  ASSERT_FALSE(bad_format.ok());
  EXPECT_THAT(std::string(bad_format.status().message()), HasSubstr("model.merges[1]"));

  auto not_in_vocab = FromText(TinyTokenizerJson("", R"(["o o"])"));
  ASSERT_FALSE(not_in_vocab.ok());
  EXPECT_THAT(std::string(not_in_vocab.status().message()), HasSubstr("\"oo\""));
}

TEST(TokenizerErrorTest, UnsupportedComponentsNameThemselves) {
  struct Case {
    std::string extra;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {R"("normalizer": {"type": "Lowercase"},)", "Lowercase"},
      {R"("normalizer": {"type": "Sequence", "normalizers": [{"type": "NFD"}]},)", "NFD"},
      {R"("post_processor": {"type": "Fancy"},)", "Fancy"},
      {R"("post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken":
          {"id": "<x>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
          "special_tokens": {}},)", "<x>"},
  };
  for (const Case& c : cases) {
    auto tokenizer = FromText(TinyTokenizerJson("", R"(["h e"])", "BPE", c.extra));
    ASSERT_FALSE(tokenizer.ok()) << c.extra;
    EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr(c.needle));
  }
  std::string metaspace = TinyTokenizerJson();
  const std::string byte_level =
      R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";
  metaspace.replace(metaspace.find(byte_level), byte_level.size(),
                    R"({"type": "Metaspace", "replacement": "_"})");
  auto tokenizer = FromText(metaspace);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("Metaspace"));
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("pre_tokenizer"));
}

TEST(TokenizerErrorTest, WrongTypesAndBadRegexAreInvalidArguments) {
  std::string bad_id = TinyTokenizerJson();
  bad_id.replace(bad_id.find("\"hello\": 259"), 12, "\"hello\": \"x\"");
  auto tokenizer = FromText(bad_id);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("model.vocab[\"hello\"]"));

  std::string bad_regex = TinyTokenizerJson();
  const std::string byte_level =
      R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";
  bad_regex.replace(bad_regex.find(byte_level), byte_level.size(),
                    R"({"type": "Split", "pattern": {"Regex": "(unclosed"},
                        "behavior": "Isolated", "invert": false})");
  tokenizer = FromText(bad_regex);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tokenizer.status().message()), HasSubstr("pre_tokenizer.pattern"));

  auto bad_bos = FromText(TinyTokenizerJson(), R"({"bos_token": "<nope>"})");
  ASSERT_FALSE(bad_bos.ok());
  EXPECT_THAT(std::string(bad_bos.status().message()), HasSubstr("bos_token"));
  EXPECT_THAT(std::string(bad_bos.status().message()), HasSubstr("tiny/tokenizer_config.json"));
}

// ------------------------------------------------------------------------------------------
// Concurrency and speed.

std::string BenchmarkText() {
  const Json fixtures = ReadJson(FixtureDir("qwen2") + "/fixtures.json");
  std::string text;
  for (const Json& c : fixtures["encode"]) text += c["text"].get<std::string>() + "\n";
  return text;
}

TEST(TokenizerConcurrencyTest, ThreadsEncodeAndDecodeTheSameAnswers) {
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("llama3"));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  const std::string text = BenchmarkText();
  const std::vector<int32_t> expected = t.Encode(text, true);
  const std::string expected_text = t.Decode(expected, false);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int round = 0; round < 5; ++round) {
        if (t.Encode(text, true) != expected) ++mismatches[i];
        if (t.Decode(expected, false) != expected_text) ++mismatches[i];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// Inputs that defeat the word cache or stress the regexes still finish quickly and round-trip.
TEST(TokenizerSpeedTest, LongAndDegenerateInputs) {
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("llama3"));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& t = **tokenizer;
  std::string emoji;
  for (int i = 0; i < 20000; ++i) emoji += "\xF0\x9F\x98\x80";
  for (const std::string& text :
       {std::string(1 << 20, ' '), std::string(1 << 20, 'a'), std::string(1 << 18, '\n') + "x",
        emoji}) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = t.Encode(text, false);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(t.Decode(ids, false), text);
    EXPECT_LT(seconds, 5.0) << text.size() << " bytes";
  }
}

// Prints encode throughput; the assertion only guards against a pathological slowdown.
TEST(TokenizerSpeedTest, EncodeThroughput) {
  for (const char* name : {"gpt2", "qwen2", "llama3"}) {
    auto tokenizer = Tokenizer::FromDirectory(FixtureDir(name));
    if (tokenizer.status().code() == absl::StatusCode::kUnimplemented) continue;  // no ICU
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    const std::string text = BenchmarkText();
    size_t tokens = 0;
    const auto start = std::chrono::steady_clock::now();
    int rounds = 0;
    double seconds = 0;
    do {
      tokens += (*tokenizer)->Encode(text, false).size();
      ++rounds;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    } while (seconds < 0.5);
    const double rate = tokens / seconds;
    std::printf("[tokenizer] %-7s encode: %.0f tokens/s, %.1f MB/s (%zu bytes x %d rounds)\n",
                name, rate, text.size() * rounds / seconds / 1e6, text.size(), rounds);
    EXPECT_GT(rate, 10000.0);
  }
  // Distinct random words: nearly every word misses the cache and runs BPE.
  auto tokenizer = Tokenizer::FromDirectory(FixtureDir("llama3"));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  std::string text;
  uint32_t state = 12345;
  while (text.size() < (1 << 20)) {
    const int length = 3 + (state >> 28) % 8;
    for (int i = 0; i < length; ++i) {
      state = state * 1664525u + 1013904223u;
      text.push_back(static_cast<char>('a' + (state >> 24) % 26));
    }
    text.push_back(' ');
  }
  const auto start = std::chrono::steady_clock::now();
  const size_t tokens = (*tokenizer)->Encode(text, false).size();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[tokenizer] llama3  encode, distinct words (cache misses): %.0f tokens/s, "
              "%.1f MB/s\n", tokens / seconds, text.size() / seconds / 1e6);
}

}  // namespace
}  // namespace moe::model
