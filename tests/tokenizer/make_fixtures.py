#!/usr/bin/env python3
"""Regenerates the tokenizer fixtures under tests/tokenizer/.

Model weights (and their tokenizers) are not downloaded, so this script trains small byte-level
BPE tokenizers with the Hugging Face `tokenizers` library on an embedded multilingual text, one
per pre-tokenizer style found in real checkpoints, and records what `tokenizers` answers for
several hundred strings. model/tokenizer_test.cc compares the C++ tokenizer to these answers.

    .venv/bin/python tests/tokenizer/make_fixtures.py

Output, per tokenizer NAME (gpt2, gpt2_prefix, qwen2, llama3):
    tests/tokenizer/NAME/tokenizer.json         the tokenizer itself
    tests/tokenizer/NAME/tokenizer_config.json  bos/eos, add_bos_token, chat_template
    tests/tokenizer/NAME/fixtures.json          {"encode": [...], "decode": [...]}

The output is deterministic for a given `tokenizers` version.
"""

import json
import os
import random
import sys

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))

GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. It's a sentence we've all seen; they'll "
    "keep using it, won't they? I'm sure you'd agree that it's THE classic pangram.",
    "Mixture-of-Experts models route every token to a few experts. Expert parallelism places "
    "the experts on separate workers, and a scheduler replicates the hottest ones.",
    "In 2024, the model processed 1,234,567 requests at 98.6% availability; latency p99 was "
    "123.45 ms and throughput reached 45000 tokens/s on 8 GPUs.",
    "Le cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque ? "
    "L'été dernier, nous sommes allés à la plage près de Nîmes, c'était génial.",
    "Die Straße ist nass, weil es geregnet hat. Übermorgen fahren wir nach München und "
    "besuchen das Schloß. Größe, Höhe und Länge werden gemessen.",
    "¿Dónde está la estación? El niño comió una manzana y luego jugó al fútbol con sus "
    "amigos. ¡Qué día tan bonito! Mañana será otro día.",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела? "
    "Москва — столица России, а Санкт-Петербург — её культурная столица.",
    "我们今天去公园散步，天气非常好。机器学习模型需要大量的数据进行训练。"
    "专家混合模型把每个词元路由到少数专家。北京是中国的首都。",
    "今日はとても良い天気ですね。東京タワーに行きましょう。カタカナとひらがなと漢字を"
    "使って日本語を書きます。ありがとうございました。",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요. 한국어는 재미있어요.",
    "مرحبا بالعالم. كيف حالك اليوم؟ اللغة العربية جميلة جدا.",
    "नमस्ते दुनिया। आप कैसे हैं? मुझे हिंदी पढ़ना पसंद है।",
    "Γειά σου κόσμε. Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "def encode(self, text: str) -> list[int]:\n    ids = []\n    for word in text.split():\n"
    "        ids.extend(self.bpe(word))\n    return ids\n",
    "int main(int argc, char** argv) {\n\treturn argc > 1 ? std::atoi(argv[1]) : 0;\n}\n",
    "Emoji time: 😀 😂 🤖 🚀 ❤️ 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🇯🇵 ✨🔥💯 — great!",
    "Tabs\tand\ttabs, newlines\n\nand   spaces    everywhere.  Trailing spaces   \n",
    "E-mail me at someone@example.com or visit https://example.org/path?q=1&lang=en#top.",
    "Numbers: 0 1 12 123 1234 12345 123456 3.14159 2.71828 -42 +7 1e10 0xFF 0b1010.",
    "Contractions: I'd, you'll, she's, we're, they've, it'd, I'M, YOU'LL, SHE'S, WE'RE.",
]

WORDS = ("model expert token layer router weight attention cache batch request stream server "
         "worker scheduler placement epoch replica shard tensor kernel decode encode prefill "
         "the a of and to in is it that for on with as was at by be this from or have an "
         "maison voiture école français être très déjà naïve café résumé façade über schön "
         "größer Mädchen año señor corazón canción ciudad язык модель эксперт данные "
         "数据 模型 专家 词元 训练 推理 日本語 東京 学習 データ 한국어 데이터 모델").split()


def build_corpus():
    rng = random.Random(1234)
    lines = list(PARAGRAPHS) * 20
    for _ in range(3000):
        n = rng.randint(3, 14)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), str(rng.randint(0, 10**rng.randint(1, 7))))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n", ", "])
        lines.append(sep.join(words) + rng.choice([".", "!", "?", "\n", ""]))
    return lines


# Strings the fixtures cover: edge cases written out, then random mixtures of fragments.
EDGE_CASES = [
    "", " ", "  ", "\t", "\n", "\r\n", " \n ", "a", "A", "Hello", "Hello world", " Hello world",
    "Hello  world", "Hello   world  ", "hello\tworld", "hello\nworld", "hello\n\nworld",
    "line one\r\nline two\r\n", "   leading", "trailing   ", "\n\n\n", "\t\t\tindented",
    "It's", "it's it'S IT'S", "we've we'VE", "they'll THEY'LL", "I'm I'M", "she'd SHE'D",
    "don't", "you're YOU'RE", "'s 're 've", "rock'n'roll", "''", "'",
    "1", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "$100.00",
    "2024-01-15T10:30:00Z", "v1.2.3", "0x7fffffff", "１２３ full-width digits", "٣٤٥ Arabic digits",
    "café", "naïve résumé", "Ünïcödé", "ñandú", "Straße", "œuvre", "ÀÉÎÕÜ",
    "e\u0301", "cafe\u0301", "A\u030a", "n\u0303o", "\u1e9b\u0323",
    "中文", "我爱北京天安门", "日本語のテキスト", "한국어 텍스트", "中文 and English mixed 混合",
    "Привет мир", "Γειά σου", "مرحبا", "नमस्ते", "שלום עולם", "ไทย",
    "😀", "😀😀😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "a😀b", " 😀 ", "🤖 robots 🚀",
    "\u200b", "zero\u200bwidth", "\u00a0nbsp\u00a0", "\u3000ideographic space", "\u2028", "\ufeffBOM",
    "<|endoftext|>", "Hello<|endoftext|>", "Hello <|endoftext|> world", "<|endoftext|><|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|>Hello", "text <|eot_id|> more", "<|start_header_id|>user<|end_header_id|>",
    "<|endoftext", "endoftext|>", "<|unknown|>", "<mask>", "a <mask> b", "a  <mask>  b",
    "x[RSTRIP]   y", "[RSTRIP]", "<tool_call>{}</tool_call>", "say <think>hmm</think> ok",
    "supercalifragilistic", " supercalifragilistic", "<｜begin▁of▁sentence｜>Hi there",
    "zé and ze\u0301 and zé", "Ġhello Ċ", "antidisestablishment is long",
    "wordy", "a wordy b", "awordy", "wordyb", "(wordy)", "wordy_x", "éwordy", "1wordy",
    "!!!", "???", "...", "—", "...!?", "#$%^&*()", "a+b=c", "x<y>z", "[1, 2, 3]", "{\"k\": \"v\"}",
    "    def f(x):\n        return x\n", "if (a && b) { c(); }", "path/to/file.txt",
    "https://example.com/a?b=c", "user@example.com", "C:\\Windows\\System32",
    "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX",
    "Mixture-of-Experts", "expert parallelism", "tokens/s", "\x00", "\x7f", "\x1b[31mred\x1b[0m",
]

FRAGMENTS = [
    "hello", "world", "The", " model", "expert", "routing", "café", "naïve", "Straße", "über",
    "año", "中文", "模型", "专家", "日本", "東京", "한국", "Привет", "мир", "Γειά", "مرحبا", "नमस्ते",
    "😀", "🚀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "🇫🇷", "❤️", "✨", " ", "  ", "   ", "\t", "\n", "\n\n",
    "\r\n", " \n", "0", "7", "42", "123", "2024", "99999", "3.14", "1,000", "'s", "'ll", "'VE",
    "n't", "I'm", "!", "?", ".", ",", ";", ":", "-", "_", "(", ")", "[", "]", "{", "}", "\"", "'",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>", "<mask>",
    "[RSTRIP]", "<tool_call>", "e\u0301", "<｜begin▁of▁sentence｜>", "zé", "\u00a0", "\u200b",
    "supercalifragilistic", "wordy",
]


def test_strings():
    rng = random.Random(42)
    out = list(EDGE_CASES)
    for p in PARAGRAPHS:
        out.append(p)
    while len(out) < 360:
        n = rng.randint(1, 12)
        out.append("".join(rng.choice(FRAGMENTS) for _ in range(n)))
    return out


def train(pre_tokenizer, special_tokens, vocab_size=3000, normalizer=None):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    return tok


def to_json(tok):
    return json.loads(tok.to_str())


def append_vocab(spec, words):
    """Adds whole-word entries with no merge leading to them (reached only with ignore_merges)."""
    vocab = spec["model"]["vocab"]
    next_id = max(max(vocab.values()), max(t["id"] for t in spec["added_tokens"])) + 1
    for w in words:
        vocab[w] = next_id
        next_id += 1


def added(content, id_, special=True, lstrip=False, rstrip=False, normalized=None,
          single_word=False):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": (not special) if normalized is None else normalized,
            "special": special}


def add_tokens(spec, tokens):
    """Appends added tokens (content, special, lstrip, rstrip[, single_word]) after every id."""
    next_id = max(max(spec["model"]["vocab"].values()),
                  max(t["id"] for t in spec["added_tokens"])) + 1
    for content, special, lstrip, rstrip, *single_word in tokens:
        spec["added_tokens"].append(added(content, next_id, special, lstrip, rstrip,
                                          single_word=bool(single_word and single_word[0])))
        next_id += 1


def make_gpt2():
    tok = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    spec = to_json(tok)
    # The original GPT-2 file writes merges as "a b" strings.
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "add_bos_token": False, "model_max_length": 1024}
    return spec, config


def make_gpt2_prefix():
    """ByteLevel with add_prefix_space, lstrip/rstrip added tokens, a BOS template."""
    tok = train(pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
                ["<s>", "</s>", "<pad>"], vocab_size=2500)
    spec = to_json(tok)
    add_tokens(spec, [("<mask>", True, True, False), ("[RSTRIP]", True, False, True),
                      ("<tool_call>", False, False, False), ("</tool_call>", False, False, False),
                      ("wordy", True, False, False, True)])
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "</s>", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
    }
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                            "normalized": True, "rstrip": False, "single_word": False},
              "eos_token": "</s>", "pad_token": "<pad>"}
    return spec, config


def make_qwen2():
    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
    tok = train(pre_tokenizers.Sequence([
        split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    spec = to_json(tok)
    add_tokens(spec, [("<tool_call>", False, False, False), ("</tool_call>", False, False, False),
                      ("<think>", False, False, False), ("</think>", False, False, False),
                      # DeepSeek-style special token outside the byte-level alphabet, and a
                      # normalized non-special one that NFC input can form.
                      ("<｜begin▁of▁sentence｜>", True, False, False), ("zé", False, False, False)])
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
              "model_max_length": 32768}
    return spec, config


def make_llama3():
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = train(pre_tokenizers.Sequence([
        split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), specials)
    spec = to_json(tok)
    spec["model"]["ignore_merges"] = True
    append_vocab(spec, ["supercalifragilistic", "Ġsupercalifragilistic",
                        "antidisestablishment"])
    spec["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {
                 "id": "<|begin_of_text|>", "ids": [0], "tokens": ["<|begin_of_text|>"]}}},
        ],
    }
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": CHAT_TEMPLATE, "model_max_length": 131072}
    return spec, config


def decode_cases(tok, rng, n=120):
    """Random id sequences: split multi-byte characters, invalid UTF-8, special tokens."""
    vocab = tok.get_vocab(with_added_tokens=True)
    size = tok.get_vocab_size(with_added_tokens=True)
    # Single-byte tokens of UTF-8 lead and continuation bytes make partial characters.
    # Both lists are sorted: the library hands out sets and maps in no fixed order.
    byte_tokens = sorted(vocab[t] for t in pre_tokenizers.ByteLevel.alphabet() if t in vocab)
    special = sorted(vocab[c] for c in vocab if c.startswith("<") and c.endswith(">"))
    cases = []
    for _ in range(n):
        length = rng.randint(1, 16)
        ids = []
        for _ in range(length):
            r = rng.random()
            if r < 0.5:
                ids.append(rng.choice(byte_tokens))
            elif r < 0.65 and special:
                ids.append(rng.choice(special))
            else:
                ids.append(rng.randrange(size))
        cases.append(ids)
    return cases


def write(name, spec, config):
    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(spec, ensure_ascii=False, indent=1)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, ensure_ascii=False, indent=2) + "\n")

    # The reference answers come from the file as written, read back by `tokenizers`.
    tok = Tokenizer.from_file(path)
    encode = []
    for text in test_strings():
        with_special = tok.encode(text, add_special_tokens=True).ids
        without = tok.encode(text, add_special_tokens=False).ids
        encode.append({
            "text": text,
            "ids": with_special,
            "ids_no_special": without,
            "decode": tok.decode(with_special, skip_special_tokens=False),
            "decode_skip_special": tok.decode(with_special, skip_special_tokens=True),
        })
    decode = []
    for ids in decode_cases(tok, random.Random(7)):
        decode.append({"ids": ids,
                       "decode": tok.decode(ids, skip_special_tokens=False),
                       "decode_skip_special": tok.decode(ids, skip_special_tokens=True)})
    fixtures = {"tokenizers_version": tokenizers.__version__,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "encode": encode, "decode": decode}
    with open(os.path.join(out_dir, "fixtures.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(fixtures, ensure_ascii=False, indent=0) + "\n")
    print(f"{name}: vocab {fixtures['vocab_size']}, {len(encode)} strings, "
          f"{len(decode)} decode cases", file=sys.stderr)


def main():
    for name, make in [("gpt2", make_gpt2), ("gpt2_prefix", make_gpt2_prefix),
                       ("qwen2", make_qwen2), ("llama3", make_llama3)]:
        spec, config = make()
        write(name, spec, config)


if __name__ == "__main__":
    main()
