#include "model/gen_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "model/safetensors.h"
#include "model/tensor_names.h"
#include "nlohmann/json.hpp"

namespace moe::model {
namespace {

using OJson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers: a counter-based hash (SplitMix64 finaliser) of
// (seed, FNV-1a of the tensor name, element index).

uint64_t Mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

uint64_t StreamKey(uint64_t seed, const std::string& name) { return Mix64(seed ^ Mix64(Fnv1a(name))); }

// Uniform in [-1, 1) on a 2^-23 grid: exact in f32.
inline float UniformAt(uint64_t key, uint64_t index) {
  uint64_t r = Mix64(key + index * 0xd1b54a32d192ed03ULL);
  int32_t v = static_cast<int32_t>(r >> 40) - (1 << 23);  // [-2^23, 2^23)
  return static_cast<float>(v) * (1.0f / 8388608.0f);
}

// How a tensor is initialised: value = offset + scale * u, u ~ U[-1, 1). `offset` is only used
// with power-of-two scales so that the product is exact and FMA contraction cannot change it.
struct Init {
  float scale = 1.0f;
  float offset = 0.0f;
};

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Init InitFor(const TensorSpec& spec) {
  const std::string& n = spec.name;
  if (spec.shape.size() == 1) {
    if (EndsWith(n, "e_score_correction_bias")) return {0.125f, 0.0f};
    if (EndsWith(n, ".bias")) return {0.5f, 0.0f};
    return {0.25f, 1.0f};  // RMSNorm weights: 1 + U(-1/4, 1/4)
  }
  if (n == "model.embed_tokens.weight") return {1.0f, 0.0f};
  // [out, in]: std = gain / sqrt(in); U(-1, 1) has std 1/sqrt(3).
  const double in = static_cast<double>(spec.shape.back());
  double gain = 1.0;
  if (EndsWith(n, "o_proj.weight") || EndsWith(n, "down_proj.weight") || EndsWith(n, "w2.weight")) {
    gain = 0.5;
  } else if (EndsWith(n, "gate.weight") && n.find("experts") == std::string::npos) {
    gain = 2.0;  // routers (and Qwen2-MoE's shared_expert_gate): spread the logits
  } else if (n == "lm_head.weight") {
    gain = 2.0;
  }
  return {static_cast<float>(gain * std::sqrt(3.0 / in)), 0.0f};
}

// ---------------------------------------------------------------------------------------------
// Presets

struct ArchPreset {
  const char* arch;
  const char* architecture;
};

constexpr ArchPreset kArchs[] = {
    {"qwen3_moe", "Qwen3MoeForCausalLM"},   {"qwen2_moe", "Qwen2MoeForCausalLM"},
    {"mixtral", "MixtralForCausalLM"},      {"deepseek_v3", "DeepseekV3ForCausalLM"},
    {"deepseek_v2", "DeepseekV2ForCausalLM"}, {"olmoe", "OlmoeForCausalLM"},
};

// Token ids of the special tokens: families with the specials first (Llama/DeepSeek style)
// and families with them after the BPE vocabulary (Qwen, OLMoE).
struct SpecialLayout {
  std::vector<std::string> front;  // ids 0..front.size()-1
  std::vector<std::string> back;   // after the BPE tokens
  std::string bos;                 // "" = none
  std::string eos;
  std::string pad;
  std::string unk;
  bool add_bos = false;
  std::string chat_template;
  std::string pre_tokenizer;  // "qwen", "llama3", "gpt2"
};

const char kChatMlTemplate[] =
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const char kMistralTemplate[] =
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}";

const char kDeepseekV3Template[] =
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<\xef\xbd\x9c" "User\xef\xbd\x9c>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>' }}{% endif %}";

const char kDeepseekV2Template[] =
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

const char kOlmoeTemplate[] =
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}";

const char kDeepseekBos[] = "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";
const char kDeepseekEos[] = "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";

SpecialLayout SpecialsFor(ModelFamily family) {
  SpecialLayout s;
  switch (family) {
    case ModelFamily::kQwen3Moe:
      s.back = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
      s.eos = "<|im_end|>";
      s.pad = "<|endoftext|>";
      s.chat_template = kChatMlTemplate;
      s.pre_tokenizer = "qwen";
      break;
    case ModelFamily::kQwen2Moe:
      s.back = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
      s.eos = "<|endoftext|>";
      s.pad = "<|endoftext|>";
      s.chat_template = kChatMlTemplate;
      s.pre_tokenizer = "qwen";
      break;
    case ModelFamily::kMixtral:
      s.front = {"<unk>", "<s>", "</s>"};
      s.bos = "<s>";
      s.eos = "</s>";
      s.unk = "<unk>";
      s.add_bos = true;
      s.chat_template = kMistralTemplate;
      s.pre_tokenizer = "gpt2";
      break;
    case ModelFamily::kDeepseekV3:
      s.front = {kDeepseekBos, kDeepseekEos};
      s.back = {"<\xef\xbd\x9c" "User\xef\xbd\x9c>", "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>"};
      s.bos = kDeepseekBos;
      s.eos = kDeepseekEos;
      s.pad = kDeepseekEos;
      s.add_bos = true;
      s.chat_template = kDeepseekV3Template;
      s.pre_tokenizer = "llama3";
      break;
    case ModelFamily::kDeepseekV2:
      s.front = {kDeepseekBos, kDeepseekEos};
      s.bos = kDeepseekBos;
      s.eos = kDeepseekEos;
      s.pad = kDeepseekEos;
      s.add_bos = true;
      s.chat_template = kDeepseekV2Template;
      s.pre_tokenizer = "llama3";
      break;
    case ModelFamily::kOlmoe:
      s.back = {"<|padding|>", "<|endoftext|>"};
      s.bos = "<|endoftext|>";
      s.eos = "<|endoftext|>";
      s.pad = "<|padding|>";
      s.chat_template = kOlmoeTemplate;
      s.pre_tokenizer = "gpt2";
      break;
  }
  return s;
}

// A few KB of varied text (prose, code, numbers, punctuation, accents, CJK, emoji) from which
// the BPE merges are learned.
const char kCorpus[] = R"CORPUS(
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many; the router scores each expert, keeps the top k, and the chosen experts'
outputs are weighted and summed. Shared experts see every token. When the load is uneven, the
scheduler replicates the hottest experts and packs the replicas so that every rank carries an
even share of the work. If a rank dies, its experts are served by the surviving replicas at once.
Attention workers keep the key-value cache in pages of sixteen tokens; when the cache is full, a
sequence is preempted and recomputed later. The frontend batches requests continuously: each
step it picks the running sequences and a chunk of the waiting prompts under a token budget.
In the beginning was the word, and the word was split into bytes, and the bytes were merged by
frequency until the vocabulary was full. Rain fell on the hills all night; by morning the river
had risen over the stones, and the children watched it from the bridge, counting the leaves.
She said: "It's not the size of the model, it's what you do with it!" -- and he didn't disagree.
We'll see; they're here; I'm sure you've heard that they'd come back. What's the time? 10:45.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 4096 65536 3.14159 2.71828 1e-6 -273.15
Dates and prices: 2024-03-15, 1999-12-31, $19.99, EUR 45,00, 50% off, #1, @user, 7 * 8 = 56.
def route(scores, k):
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    total = sum(scores[i] for i in top)
    return [(i, scores[i] / total) for i in top]

for (int layer = 0; layer < num_layers; ++layer) {
  if (config.IsMoeLayer(layer)) { hidden = moe(hidden); } else { hidden = mlp(hidden); }
}
{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine."}
<html><body><p class="note">Hello &amp; welcome</p></body></html>
SELECT name, count(*) FROM experts WHERE load > 0.5 GROUP BY name ORDER BY 2 DESC;
Français: l'été dernier, nous sommes allés à la mer; c'était très agréable. Où est la gare?
Deutsch: Die Straße ist naß, und die Bäume sind grün. Schöne Grüße aus München!
Español: ¿Dónde está la biblioteca? El niño comió una manzana. ¡Qué día tan bonito!
Русский: Привет, мир! Как дела? Сегодня хорошая погода.
中文：今天天气很好。我们去公园散步吧。模型的专家路由。
日本語：こんにちは、世界。東京は晴れです。
한국어: 안녕하세요, 세계. 오늘은 좋은 날입니다.
Emoji: 🙂 🚀 🔥 ✅ — and a few symbols: © ® ™ € £ ¥ ° ± × ÷ → ← ≤ ≥ ∞ ∑ √.
Tabs	and	spaces    and
newlines

and trailing spaces   
The end of one line is the beginning of the next. Again and again, the same words return:
the model, the expert, the router, the token, the layer, the head, the cache, the batch.
Training a tokenizer on a small text learns the frequent pairs first: "th", "he", "in", "er",
"an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it", "al", "ar".
)CORPUS";

// GPT-2's reversible byte -> printable unicode mapping, as UTF-8 strings.
std::vector<std::string> ByteToUnicode() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<int> cp(256, -1);
  for (int b : bs) cp[b] = b;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (cp[b] < 0) cp[b] = 256 + n++;
  }
  std::vector<std::string> out(256);
  for (int b = 0; b < 256; ++b) {
    int c = cp[b];
    std::string s;
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else {  // < 0x800 here
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    out[b] = s;
  }
  return out;
}

// Splits text roughly as GPT-2's pre-tokenizer does (an optional space followed by a run of
// one character class); merges learned within these pieces are valid for any of the
// pre-tokenizers the families use.
std::map<std::string, int64_t> PreTokenize(const std::string& text) {
  auto cls = [](unsigned char c) {
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') return 0;
    if (std::isalpha(c) || c >= 0x80 || c == '\'') return 1;
    if (std::isdigit(c)) return 2;
    return 3;
  };
  std::map<std::string, int64_t> words;
  size_t i = 0;
  while (i < text.size()) {
    size_t start = i;
    if (text[i] == ' ' && i + 1 < text.size() && cls(text[i + 1]) != 0) ++i;
    int c = cls(static_cast<unsigned char>(text[i]));
    while (i < text.size() && cls(static_cast<unsigned char>(text[i])) == c) ++i;
    ++words[text.substr(start, i - start)];
  }
  return words;
}

struct Bpe {
  std::vector<std::string> tokens;                 // id -> bytes
  std::vector<std::pair<int, int>> merges;         // in rank order
};

Bpe LearnBpeUncached(int64_t max_tokens);

// Learns up to `max_tokens` tokens (256 bytes + merges) from the corpus, deterministically.
// Cached: config and tokenizer generation both need it.
Bpe LearnBpe(int64_t max_tokens) {
  static std::mutex mu;
  static std::map<int64_t, Bpe>* cache = new std::map<int64_t, Bpe>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(max_tokens);
  if (it == cache->end()) it = cache->emplace(max_tokens, LearnBpeUncached(max_tokens)).first;
  return it->second;
}

Bpe LearnBpeUncached(int64_t max_tokens) {
  Bpe bpe;
  for (int b = 0; b < 256; ++b) bpe.tokens.push_back(std::string(1, static_cast<char>(b)));
  std::map<std::string, int> id_of;
  for (int b = 0; b < 256; ++b) id_of[bpe.tokens[b]] = b;
  std::vector<std::pair<std::vector<int>, int64_t>> words;
  for (const auto& [w, count] : PreTokenize(kCorpus)) {
    std::vector<int> ids;
    for (unsigned char c : w) ids.push_back(c);
    words.push_back({std::move(ids), count});
  }
  while (static_cast<int64_t>(bpe.tokens.size()) < max_tokens) {
    std::map<std::pair<int, int>, int64_t> pairs;
    for (const auto& [ids, count] : words) {
      for (size_t k = 0; k + 1 < ids.size(); ++k) pairs[{ids[k], ids[k + 1]}] += count;
    }
    std::pair<int, int> best{-1, -1};
    int64_t best_count = 1;
    for (const auto& [pair, count] : pairs) {  // ties: the smallest pair (map order)
      if (count > best_count) {
        best = pair;
        best_count = count;
      }
    }
    if (best.first < 0) break;  // no pair occurs twice
    std::string merged = bpe.tokens[best.first] + bpe.tokens[best.second];
    int new_id;
    auto it = id_of.find(merged);
    if (it != id_of.end()) {
      new_id = it->second;  // same bytes reached by another pair, as HF's trainer does
    } else {
      new_id = static_cast<int>(bpe.tokens.size());
      bpe.tokens.push_back(merged);
      id_of[merged] = new_id;
    }
    bpe.merges.push_back(best);
    for (auto& [ids, count] : words) {
      std::vector<int> out;
      out.reserve(ids.size());
      for (size_t k = 0; k < ids.size(); ++k) {
        if (k + 1 < ids.size() && ids[k] == best.first && ids[k + 1] == best.second) {
          out.push_back(new_id);
          ++k;
        } else {
          out.push_back(ids[k]);
        }
      }
      ids.swap(out);
    }
  }
  return bpe;
}

const char kQwenSplit[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kLlama3Split[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

OJson PreTokenizerJson(const std::string& kind) {
  if (kind == "gpt2") {
    return OJson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                 {"use_regex", true}};
  }
  OJson split = {{"type", "Split"},
                 {"pattern", {{"Regex", kind == "qwen" ? kQwenSplit : kLlama3Split}}},
                 {"behavior", "Isolated"},
                 {"invert", false}};
  OJson byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false},
                      {"use_regex", false}};
  return OJson{{"type", "Sequence"}, {"pretokenizers", OJson::array({split, byte_level})}};
}

// ---------------------------------------------------------------------------------------------
// config.json

absl::StatusOr<OJson> ConfigJson(const GenModelOptions& o) {
  const ArchPreset* arch = nullptr;
  for (const ArchPreset& a : kArchs) {
    if (o.arch == a.arch) arch = &a;
  }
  if (arch == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--arch \"", o.arch, "\" is not one of ",
                                                   absl::StrJoin(GenModelArchitectures(), "|")));
  }
  if (o.preset != "tiny" && o.preset != "small") {
    return absl::InvalidArgumentError(absl::StrCat("--preset \"", o.preset, "\" is not tiny|small"));
  }
  if (o.dtype != "f32" && o.dtype != "bf16") {
    return absl::InvalidArgumentError(absl::StrCat("--dtype \"", o.dtype, "\" is not f32|bf16"));
  }
  const bool tiny = o.preset == "tiny";
  const std::string a = o.arch;
  OJson c;
  c["architectures"] = {arch->architecture};
  c["model_type"] = a;
  c["vocab_size"] = tiny ? 512 : 32000;
  c["hidden_size"] = tiny ? 64 : 1024;
  c["num_hidden_layers"] = tiny ? 3 : 16;
  c["num_attention_heads"] = tiny ? 4 : 16;
  c["max_position_embeddings"] = tiny ? 512 : 4096;
  c["rms_norm_eps"] = 1e-6;
  c["hidden_act"] = "silu";
  c["initializer_range"] = 0.02;
  c["tie_word_embeddings"] = false;
  c["use_cache"] = true;
  c["attention_dropout"] = 0.0;

  if (a == "qwen3_moe") {
    c["num_key_value_heads"] = tiny ? 2 : 4;
    c["head_dim"] = tiny ? 32 : 64;  // tiny: != hidden / heads, as in Qwen3-30B-A3B
    c["rope_theta"] = 1000000.0;
    c["attention_bias"] = false;
    c["intermediate_size"] = tiny ? 128 : 2048;
    c["moe_intermediate_size"] = tiny ? 32 : 256;
    c["num_experts"] = tiny ? 8 : 64;
    c["num_experts_per_tok"] = tiny ? 2 : 8;
    c["norm_topk_prob"] = true;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = tiny ? OJson::array({1}) : OJson::array();
    c["use_sliding_window"] = false;
    c["sliding_window"] = nullptr;
  } else if (a == "qwen2_moe") {
    c["num_key_value_heads"] = tiny ? 2 : 4;
    c["rope_theta"] = 1000000.0;
    c["qkv_bias"] = true;
    c["intermediate_size"] = tiny ? 128 : 2048;
    c["moe_intermediate_size"] = tiny ? 32 : 256;
    c["shared_expert_intermediate_size"] = tiny ? 96 : 512;
    c["num_experts"] = tiny ? 8 : 64;
    c["num_experts_per_tok"] = tiny ? 2 : 8;
    c["norm_topk_prob"] = false;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = OJson::array();
    c["use_sliding_window"] = false;
    c["sliding_window"] = nullptr;
    c["max_window_layers"] = tiny ? 3 : 16;
  } else if (a == "mixtral") {
    c["num_key_value_heads"] = tiny ? 2 : 4;
    c["rope_theta"] = 1000000.0;
    c["intermediate_size"] = tiny ? 64 : 2048;
    c["num_local_experts"] = 8;
    c["num_experts_per_tok"] = 2;
    c["sliding_window"] = nullptr;
    c["router_jitter_noise"] = 0.0;
  } else if (a == "olmoe") {
    c["num_key_value_heads"] = tiny ? 4 : 16;
    c["rope_theta"] = 10000.0;
    c["attention_bias"] = false;
    c["clip_qkv"] = nullptr;
    c["intermediate_size"] = tiny ? 32 : 256;
    c["num_experts"] = tiny ? 16 : 64;
    c["num_experts_per_tok"] = tiny ? 4 : 8;
    c["norm_topk_prob"] = false;
  } else {  // deepseek_v3, deepseek_v2
    const bool v3 = a == "deepseek_v3";
    c["num_key_value_heads"] = tiny ? 4 : 16;
    c["q_lora_rank"] = v3 ? OJson(tiny ? 32 : 384) : OJson(nullptr);
    c["kv_lora_rank"] = tiny ? 32 : 256;
    c["qk_nope_head_dim"] = tiny ? 16 : 64;
    c["qk_rope_head_dim"] = tiny ? 16 : 32;
    c["v_head_dim"] = tiny ? 16 : 64;
    c["attention_bias"] = false;
    c["intermediate_size"] = tiny ? 128 : 2048;
    c["moe_intermediate_size"] = tiny ? 32 : 256;
    c["n_routed_experts"] = tiny ? 16 : 64;
    c["num_experts_per_tok"] = tiny ? 4 : 8;
    c["n_shared_experts"] = v3 ? 1 : 2;
    c["first_k_dense_replace"] = 1;
    c["moe_layer_freq"] = 1;
    if (v3) {
      c["n_group"] = tiny ? 4 : 8;
      c["topk_group"] = tiny ? 2 : 4;
      c["topk_method"] = "noaux_tc";
      c["scoring_func"] = "sigmoid";
      c["norm_topk_prob"] = true;
      c["routed_scaling_factor"] = 2.5;
      c["rope_interleave"] = true;
    } else {
      c["n_group"] = tiny ? 4 : 8;
      c["topk_group"] = tiny ? 2 : 4;
      c["topk_method"] = tiny ? "group_limited_greedy" : "greedy";
      c["scoring_func"] = "softmax";
      c["norm_topk_prob"] = false;
      c["routed_scaling_factor"] = tiny ? 1.5 : 1.0;
    }
    c["rope_theta"] = 10000.0;
    const int64_t original = tiny ? 128 : 1024;
    c["rope_scaling"] = {{"type", "yarn"},
                         {"factor", 4.0},
                         {"original_max_position_embeddings", original},
                         {"beta_fast", 32},
                         {"beta_slow", 1},
                         {"mscale", 1.0},
                         {"mscale_all_dim", v3 ? 0.8 : 1.0}};
  }
  c["torch_dtype"] = o.dtype == "bf16" ? "bfloat16" : "float32";
  return c;
}

// Adds the token ids to the config once the tokenizer layout is known.
void AddTokenIds(OJson& c, const SpecialLayout& s, int64_t bpe_size) {
  auto id_of = [&](const std::string& tok) -> OJson {
    if (tok.empty()) return nullptr;
    for (size_t i = 0; i < s.front.size(); ++i) {
      if (s.front[i] == tok) return static_cast<int64_t>(i);
    }
    for (size_t i = 0; i < s.back.size(); ++i) {
      if (s.back[i] == tok) return static_cast<int64_t>(s.front.size()) + bpe_size + static_cast<int64_t>(i);
    }
    return nullptr;
  };
  c["bos_token_id"] = id_of(s.bos);
  c["eos_token_id"] = id_of(s.eos);
  c["pad_token_id"] = id_of(s.pad);
}

int64_t BpeBudget(int64_t vocab_size, const SpecialLayout& s) {
  return vocab_size - static_cast<int64_t>(s.front.size() + s.back.size());
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

const std::vector<std::string>& GenModelArchitectures() {
  static const std::vector<std::string>* names = [] {
    auto* v = new std::vector<std::string>();
    for (const ArchPreset& a : kArchs) v->push_back(a.arch);
    return v;
  }();
  return *names;
}

float GenModelUniformForTest(uint64_t seed, const std::string& name, uint64_t index) {
  return UniformAt(StreamKey(seed, name), index);
}

absl::StatusOr<std::string> GenModelConfigJson(const GenModelOptions& options) {
  MOE_ASSIGN_OR_RETURN(OJson c, ConfigJson(options));
  MOE_ASSIGN_OR_RETURN(ModelConfig parsed, ParseModelConfig(c.dump(), "generated config.json"));
  SpecialLayout s = SpecialsFor(parsed.family);
  Bpe bpe = LearnBpe(BpeBudget(parsed.vocab_size, s));
  AddTokenIds(c, s, static_cast<int64_t>(bpe.tokens.size()));
  return c.dump(2) + "\n";
}

absl::StatusOr<GenTokenizerFiles> GenTokenizer(const ModelConfig& config) {
  SpecialLayout s = SpecialsFor(config.family);
  const int64_t budget = BpeBudget(config.vocab_size, s);
  if (budget < 256) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", config.vocab_size,
                                                   " leaves no room for the 256 byte tokens"));
  }
  Bpe bpe = LearnBpe(budget);
  const std::vector<std::string> byte_str = ByteToUnicode();
  auto encode = [&byte_str](const std::string& bytes) {
    std::string out;
    for (unsigned char c : bytes) out += byte_str[c];
    return out;
  };
  const int64_t offset = static_cast<int64_t>(s.front.size());
  const int64_t bpe_size = static_cast<int64_t>(bpe.tokens.size());
  auto special_id = [&](const std::string& tok) -> int64_t {
    for (size_t i = 0; i < s.front.size(); ++i) {
      if (s.front[i] == tok) return static_cast<int64_t>(i);
    }
    for (size_t i = 0; i < s.back.size(); ++i) {
      if (s.back[i] == tok) return offset + bpe_size + static_cast<int64_t>(i);
    }
    return -1;
  };

  OJson vocab = OJson::object();
  for (size_t i = 0; i < s.front.size(); ++i) vocab[s.front[i]] = static_cast<int64_t>(i);
  for (int64_t i = 0; i < bpe_size; ++i) vocab[encode(bpe.tokens[i])] = offset + i;
  OJson merges = OJson::array();
  for (const auto& [l, r] : bpe.merges) {
    merges.push_back(OJson::array({encode(bpe.tokens[l]), encode(bpe.tokens[r])}));
  }
  OJson added = OJson::array();
  std::vector<std::string> all_specials = s.front;
  all_specials.insert(all_specials.end(), s.back.begin(), s.back.end());
  for (const std::string& tok : all_specials) {
    added.push_back({{"id", special_id(tok)}, {"content", tok}, {"single_word", false},
                     {"lstrip", false}, {"rstrip", false}, {"normalized", false},
                     {"special", true}});
  }
  OJson post = OJson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false},
                     {"use_regex", false}};
  if (s.add_bos) {
    const int64_t bos = special_id(s.bos);
    post = {{"type", "TemplateProcessing"},
            {"single", OJson::array({{{"SpecialToken", {{"id", s.bos}, {"type_id", 0}}}},
                                     {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
            {"pair", OJson::array({{{"SpecialToken", {{"id", s.bos}, {"type_id", 0}}}},
                                   {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                   {{"SpecialToken", {{"id", s.bos}, {"type_id", 1}}}},
                                   {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
            {"special_tokens", {{s.bos, {{"id", s.bos}, {"ids", {bos}}, {"tokens", {s.bos}}}}}}};
  }
  OJson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = added;
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = PreTokenizerJson(s.pre_tokenizer);
  tok["post_processor"] = post;
  tok["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
                    {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},           {"dropout", nullptr},
                  {"unk_token", nullptr},     {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                  {"byte_fallback", false},   {"ignore_merges", false},
                  {"vocab", vocab},           {"merges", merges}};

  auto tok_or_null = [](const std::string& t) -> OJson {
    return t.empty() ? OJson(nullptr) : OJson(t);
  };
  OJson tc;
  tc["add_bos_token"] = s.add_bos;
  tc["add_eos_token"] = false;
  OJson decoder = OJson::object();
  for (const std::string& t : all_specials) {
    decoder[std::to_string(special_id(t))] = {{"content", t}, {"lstrip", false},
                                              {"normalized", false}, {"rstrip", false},
                                              {"single_word", false}, {"special", true}};
  }
  tc["added_tokens_decoder"] = decoder;
  tc["bos_token"] = tok_or_null(s.bos);
  tc["eos_token"] = tok_or_null(s.eos);
  tc["pad_token"] = tok_or_null(s.pad);
  tc["unk_token"] = tok_or_null(s.unk);
  tc["chat_template"] = s.chat_template;
  tc["clean_up_tokenization_spaces"] = false;
  tc["model_max_length"] = config.max_position_embeddings;
  tc["tokenizer_class"] = "PreTrainedTokenizerFast";

  OJson gc;
  if (!s.bos.empty()) gc["bos_token_id"] = special_id(s.bos);
  gc["eos_token_id"] = special_id(s.eos);
  if (!s.pad.empty()) gc["pad_token_id"] = special_id(s.pad);
  gc["do_sample"] = false;

  GenTokenizerFiles files;
  files.tokenizer_json = tok.dump(2) + "\n";
  files.tokenizer_config_json = tc.dump(2) + "\n";
  files.generation_config_json = gc.dump(2) + "\n";
  return files;
}

absl::StatusOr<GenModelResult> GenerateModel(const GenModelOptions& options) {
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out is required");
  if (options.shard_mb < 0) return absl::InvalidArgumentError("--shard-mb must be >= 0");
  MOE_ASSIGN_OR_RETURN(std::string config_text, GenModelConfigJson(options));
  MOE_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(config_text, "generated config.json"));
  MOE_ASSIGN_OR_RETURN(GenTokenizerFiles tok, GenTokenizer(config));

  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", options.out_dir, ": ", ec.message()));
  }
  GenModelResult result;
  result.out_dir = options.out_dir;
  const std::string dir = options.out_dir + "/";
  MOE_RETURN_IF_ERROR(WriteText(dir + "config.json", config_text));
  MOE_RETURN_IF_ERROR(WriteText(dir + "tokenizer.json", tok.tokenizer_json));
  MOE_RETURN_IF_ERROR(WriteText(dir + "tokenizer_config.json", tok.tokenizer_config_json));
  MOE_RETURN_IF_ERROR(WriteText(dir + "generation_config.json", tok.generation_config_json));
  // A previous run with another sharding must not leave files that a reader would pick up.
  for (const auto& entry : std::filesystem::directory_iterator(options.out_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (EndsWith(name, ".safetensors") || name == "model.safetensors.index.json") {
      std::filesystem::remove(entry.path(), ec);
    }
  }

  const bool bf16 = options.dtype == "bf16";
  const uint64_t seed = options.seed;
  std::vector<TensorToWrite> tensors;
  for (const TensorSpec& spec : TensorNames(config).AllTensors()) {
    TensorToWrite t;
    t.name = spec.name;
    t.shape = spec.shape;
    t.dtype = (bf16 && !spec.keep_f32) ? common::DType::kBF16 : common::DType::kF32;
    const Init init = InitFor(spec);
    const uint64_t key = StreamKey(seed, spec.name);
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    result.num_parameters += n;
    const common::DType dtype = t.dtype;
    t.fill = [key, init, n, dtype](uint8_t* dst) {
      if (dtype == common::DType::kBF16) {
        uint16_t* out = reinterpret_cast<uint16_t*>(dst);  // [numel]
        for (int64_t i = 0; i < n; ++i) {
          float v = UniformAt(key, static_cast<uint64_t>(i)) * init.scale;
          out[i] = common::F32ToBf16(v + init.offset);
        }
      } else {
        float* out = reinterpret_cast<float*>(dst);  // [numel]
        for (int64_t i = 0; i < n; ++i) {
          float v = UniformAt(key, static_cast<uint64_t>(i)) * init.scale;
          out[i] = v + init.offset;
        }
      }
    };
    result.weight_bytes += static_cast<int64_t>(t.nbytes());
    tensors.push_back(std::move(t));
  }
  WriteSafetensorsOptions wo;
  wo.shard_bytes = options.shard_mb * (int64_t{1} << 20);
  wo.num_threads = options.num_threads > 0
                       ? options.num_threads
                       : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  wo.metadata = {{"format", "pt"},
                 {"moe_serve_gen_model",
                  absl::StrCat("--arch ", options.arch, " --preset ", options.preset, " --dtype ",
                               options.dtype, " --seed ", options.seed)}};
  MOE_ASSIGN_OR_RETURN(std::vector<std::string> written,
                       WriteSafetensors(options.out_dir, tensors, wo));
  result.files = {"config.json", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json"};
  result.files.insert(result.files.end(), written.begin(), written.end());
  return result;
}

}  // namespace moe::model
