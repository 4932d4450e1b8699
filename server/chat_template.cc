// Jinja2 subset for chat templates: lexer -> parser -> AST -> tree-walking evaluator.
//
// The lexer follows jinja2/lexer.py (Jinja 3.1) closely, because whitespace handling is where
// prompts most often differ by a byte: `{%-`/`-%}`, trim_blocks (drop the first newline after
// a block or comment tag), lstrip_blocks (drop spaces and tabs before a block or comment tag
// that starts a line), and the dropped trailing newline of the source (keep_trailing_newline
// is off). Values behave like their Python counterparts where the difference reaches the
// output: str() and repr(), float formatting, code-point strings, None/True/False.
#include "server/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace moe::server {
namespace internal {
struct Node;
}  // namespace internal

namespace {

using internal::Node;

// ---------------------------------------------------------------------------------------------
// UTF-8 and Python string helpers.

void AppendUtf8(std::string* out, char32_t c) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Decodes one code point at s[*i] and advances *i. Invalid bytes decode to U+FFFD.
char32_t NextCodePoint(std::string_view s, size_t* i) {
  unsigned char c = static_cast<unsigned char>(s[*i]);
  int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || *i + len > s.size()) {
    ++*i;
    return 0xFFFD;
  }
  if (len == 1) {
    ++*i;
    return c;
  }
  char32_t cp = c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    unsigned char cc = static_cast<unsigned char>(s[*i + k]);
    if ((cc & 0xC0) != 0x80) {
      ++*i;
      return 0xFFFD;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  *i += len;
  return cp;
}

std::u32string Decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out.push_back(NextCodePoint(s, &i));
  return out;
}

std::string Encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) AppendUtf8(&out, c);
  return out;
}

bool IsAscii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

int64_t CodePointCount(std::string_view s) {
  int64_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Python's str.isspace() for the code points that occur in practice.
bool IsPySpace(char32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// str.strip / lstrip / rstrip. `chars` null means whitespace.
std::string PyStrip(std::string_view s, const std::string* chars, bool left, bool right) {
  std::u32string u = Decode(s);
  std::u32string set = chars ? Decode(*chars) : std::u32string();
  auto strip = [&](char32_t c) {
    return chars ? set.find(c) != std::u32string::npos : IsPySpace(c);
  };
  size_t b = 0, e = u.size();
  if (left) {
    while (b < e && strip(u[b])) ++b;
  }
  if (right) {
    while (e > b && strip(u[e - 1])) --e;
  }
  return Encode(std::u32string_view(u).substr(b, e - b));
}

char32_t AsciiLower(char32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }
char32_t AsciiUpper(char32_t c) { return (c >= 'a' && c <= 'z') ? c - 32 : c; }

// Case mapping covers ASCII and Latin-1/Greek/Cyrillic letters with a fixed offset; other
// scripts are left unchanged (as Python does for scripts without case).
char32_t ToLowerCp(char32_t c) {
  if (c < 0x80) return AsciiLower(c);
  if ((c >= 0xC0 && c <= 0xDE && c != 0xD7)) return c + 32;
  if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return c + 32;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
char32_t ToUpperCp(char32_t c) {
  if (c < 0x80) return AsciiUpper(c);
  if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
  if (c >= 0x3B1 && c <= 0x3CB && c != 0x3C2) return c - 32;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
bool IsAlphaCp(char32_t c) { return ToLowerCp(c) != ToUpperCp(c) || (c >= 0x80 && c != 0xFFFD && !IsPySpace(c) && c > 0x2E80); }

std::string MapCase(std::string_view s, char32_t (*f)(char32_t)) {
  if (IsAscii(s)) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(f(static_cast<unsigned char>(c)));
    return out;
  }
  std::u32string u = Decode(s);
  for (char32_t& c : u) c = f(c);
  return Encode(u);
}

// Python float.__repr__: shortest round-trip digits, scientific below 1e-4 and from 1e16.
std::string PyFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  size_t epos = sci.find('e');
  int exp = std::stoi(sci.substr(epos + 1));
  std::string digits;
  for (size_t i = 0; i < epos; ++i) {
    if (sci[i] != '.') digits.push_back(sci[i]);
  }
  std::string out = neg ? "-" : "";
  if (exp >= -5 + 1 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(-exp - 1, '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp + 1) {
      out += digits + std::string(exp + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return out;
}

// Python slice index resolution: the selected indices of a sequence of length n.
std::vector<int64_t> SliceIndices(int64_t n, const int64_t* start, const int64_t* stop,
                                  int64_t step) {
  std::vector<int64_t> out;
  int64_t lower = step > 0 ? 0 : -1, upper = step > 0 ? n : n - 1;
  auto clamp = [&](const int64_t* v, int64_t dflt) {
    if (v == nullptr) return dflt;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < lower) x = lower;
    } else if (x > upper) {
      x = upper;
    }
    return x;
  };
  int64_t b = clamp(start, step > 0 ? lower : upper);
  int64_t e = clamp(stop, step > 0 ? upper : lower);
  // Indices stay within [-1, n], so `i + step` can only overflow when the next one is out.
  if (step > 0) {
    for (int64_t i = b; i < e; i = i > e - step ? e : i + step) out.push_back(i);
  } else {
    for (int64_t i = b; i > e; i = i < e - step ? e : i + step) out.push_back(i);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Values.

enum class Kind : uint8_t {
  kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kFunction
};

class Value;
struct Array;
struct Object;
struct Function;

class Value {
 public:
  Value() = default;
  static Value Undefined(std::string why) {
    Value v;
    v.p_ = std::make_shared<std::string>(std::move(why));
    return v;
  }
  static Value None() { return Value(Kind::kNone); }
  static Value Bool(bool b) {
    Value v(Kind::kBool);
    v.i_ = b;
    return v;
  }
  static Value Int(int64_t i) {
    Value v(Kind::kInt);
    v.i_ = i;
    return v;
  }
  static Value Float(double f) {
    Value v(Kind::kFloat);
    v.f_ = f;
    return v;
  }
  static Value Str(std::string s) {
    Value v(Kind::kString);
    v.p_ = std::make_shared<std::string>(std::move(s));
    return v;
  }
  static Value List(std::vector<Value> items, bool tuple = false);
  static Value Dict(std::shared_ptr<Object> object);
  static Value Namespace(std::shared_ptr<Object> object);
  static Value Func(std::shared_ptr<Function> fn) {
    Value v(Kind::kFunction);
    v.p_ = std::move(fn);
    return v;
  }

  Kind kind() const { return kind_; }
  bool is(Kind k) const { return kind_ == k; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_number() const {
    return kind_ == Kind::kBool || kind_ == Kind::kInt || kind_ == Kind::kFloat;
  }
  bool is_integral() const { return kind_ == Kind::kBool || kind_ == Kind::kInt; }
  int64_t int_value() const { return i_; }
  double number() const { return kind_ == Kind::kFloat ? f_ : static_cast<double>(i_); }
  const std::string& str() const { return *static_cast<const std::string*>(p_.get()); }
  // The reason an Undefined is undefined, as Jinja's UndefinedError words it.
  std::string undefined_reason() const {
    return p_ ? str() : std::string("value is undefined");
  }
  const Array& list() const { return *static_cast<const Array*>(p_.get()); }
  const Object& dict() const { return *static_cast<const Object*>(p_.get()); }
  Object& ns() const { return *static_cast<Object*>(p_.get()); }
  const Function& fn() const { return *static_cast<const Function*>(p_.get()); }
  const void* identity() const { return p_.get(); }
  int depth() const;

 private:
  explicit Value(Kind k) : kind_(k) {}

  Kind kind_ = Kind::kUndefined;
  int64_t i_ = 0;
  double f_ = 0;
  std::shared_ptr<void> p_;
};

struct Array {
  std::vector<Value> items;
  bool tuple = false;
  int depth = 1;
};

// A dict that keeps insertion order, as Python's does.
struct Object {
  std::vector<std::pair<std::string, Value>> items;
  int depth = 1;

  const Value* Find(std::string_view key) const {
    for (const auto& [k, v] : items) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void Set(std::string key, Value value) {
    for (auto& [k, v] : items) {
      if (k == key) {
        v = std::move(value);
        return;
      }
    }
    items.emplace_back(std::move(key), std::move(value));
  }
};

class Renderer;
struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;

  // The argument at `index` or named `name`; nullptr when absent.
  const Value* Get(size_t index, std::string_view name) const {
    if (index < pos.size()) return &pos[index];
    for (const auto& [k, v] : kw) {
      if (k == name) return &v;
    }
    return nullptr;
  }
};
using NativeFn = absl::StatusOr<Value> (*)(Renderer&, const Node&, const CallArgs&);

struct Function {
  std::string name;
  NativeFn native = nullptr;
  const Node* macro = nullptr;
};

Value Value::List(std::vector<Value> items, bool tuple) {
  auto a = std::make_shared<Array>();
  for (const Value& v : items) a->depth = std::max(a->depth, v.depth() + 1);
  a->items = std::move(items);
  a->tuple = tuple;
  Value v(Kind::kList);
  v.p_ = std::move(a);
  return v;
}
Value Value::Dict(std::shared_ptr<Object> object) {
  object->depth = 1;
  for (const auto& [k, item] : object->items) {
    object->depth = std::max(object->depth, item.depth() + 1);
  }
  Value v(Kind::kDict);
  v.p_ = std::move(object);
  return v;
}
Value Value::Namespace(std::shared_ptr<Object> object) {
  Value v(Kind::kNamespace);
  v.p_ = std::move(object);
  return v;
}
int Value::depth() const {
  if (kind_ == Kind::kList) return list().depth;
  if (kind_ == Kind::kDict) return dict().depth;
  return 0;
}

const char* TypeName(const Value& v) {
  switch (v.kind()) {
    case Kind::kUndefined: return "Undefined";
    case Kind::kNone: return "NoneType";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "str";
    case Kind::kList: return v.list().tuple ? "tuple" : "list";
    case Kind::kDict: return "dict";
    case Kind::kNamespace: return "Namespace";
    case Kind::kFunction: return "function";
  }
  return "object";
}

bool Truthy(const Value& v) {
  switch (v.kind()) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool:
    case Kind::kInt: return v.int_value() != 0;
    case Kind::kFloat: return v.number() != 0;
    case Kind::kString: return !v.str().empty();
    case Kind::kList: return !v.list().items.empty();
    case Kind::kDict: return !v.dict().items.empty();
    default: return true;
  }
}

void PyRepr(const Value& v, std::string* out, int depth);

void PyReprString(std::string_view s, std::string* out) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  out->push_back(quote);
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    char32_t c = NextCodePoint(s, &i);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned>(c));
      out->append(buf);
    } else {
      out->append(s.substr(start, i - start));
    }
  }
  out->push_back(quote);
}

// Python str(): what `{{ value }}` prints.
void PyStr(const Value& v, std::string* out) {
  switch (v.kind()) {
    case Kind::kUndefined: return;
    case Kind::kNone: out->append("None"); return;
    case Kind::kBool: out->append(v.int_value() ? "True" : "False"); return;
    case Kind::kInt: out->append(std::to_string(v.int_value())); return;
    case Kind::kFloat: out->append(PyFloat(v.number())); return;
    case Kind::kString: out->append(v.str()); return;
    default: PyRepr(v, out, 0); return;
  }
}

std::string PyStr(const Value& v) {
  if (v.is(Kind::kString)) return v.str();
  std::string out;
  PyStr(v, &out);
  return out;
}

void PyRepr(const Value& v, std::string* out, int depth) {
  if (depth > 256) {
    out->append("...");
    return;
  }
  switch (v.kind()) {
    case Kind::kString: PyReprString(v.str(), out); return;
    case Kind::kList: {
      const Array& a = v.list();
      out->push_back(a.tuple ? '(' : '[');
      for (size_t i = 0; i < a.items.size(); ++i) {
        if (i) out->append(", ");
        PyRepr(a.items[i], out, depth + 1);
      }
      if (a.tuple && a.items.size() == 1) out->push_back(',');
      out->push_back(a.tuple ? ')' : ']');
      return;
    }
    case Kind::kDict:
    case Kind::kNamespace: {
      const Object& o = v.is(Kind::kDict) ? v.dict() : v.ns();
      if (v.is(Kind::kNamespace)) out->append("<Namespace ");
      out->push_back('{');
      bool first = true;
      for (const auto& [k, item] : o.items) {
        if (!first) out->append(", ");
        first = false;
        PyReprString(k, out);
        out->append(": ");
        PyRepr(item, out, depth + 1);
      }
      out->push_back('}');
      if (v.is(Kind::kNamespace)) out->push_back('>');
      return;
    }
    case Kind::kFunction: absl::StrAppend(out, "<function ", v.fn().name, ">"); return;
    case Kind::kUndefined: return;
    default: PyStr(v, out); return;
  }
}

// Python json.dumps(value, ensure_ascii, indent, separators, sort_keys).
struct JsonOptions {
  bool ensure_ascii = false;
  bool pretty = false;
  std::string indent;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

void JsonString(std::string_view s, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    char32_t c = NextCodePoint(s, &i);
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      case '\b': out->append("\\b"); break;
      case '\f': out->append("\\f"); break;
      default: {
        char buf[16];
        if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
          if (c >= 0x10000) {
            char32_t v = c - 0x10000;
            std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x",
                          static_cast<unsigned>(0xD800 | (v >> 10)),
                          static_cast<unsigned>(0xDC00 | (v & 0x3FF)));
          } else {
            std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
          }
          out->append(buf);
        } else {
          out->append(s.substr(start, i - start));
        }
      }
    }
  }
  out->push_back('"');
}

absl::Status JsonDump(const Value& v, const JsonOptions& opt, int level, std::string* out) {
  if (level > 256) return absl::InvalidArgumentError("tojson: value nested too deeply");
  auto newline = [&](int lvl) {
    if (!opt.pretty) return;
    out->push_back('\n');
    for (int i = 0; i < lvl; ++i) out->append(opt.indent);
  };
  switch (v.kind()) {
    case Kind::kNone: out->append("null"); return absl::OkStatus();
    case Kind::kBool: out->append(v.int_value() ? "true" : "false"); return absl::OkStatus();
    case Kind::kInt: out->append(std::to_string(v.int_value())); return absl::OkStatus();
    case Kind::kFloat: {
      double d = v.number();
      if (std::isnan(d)) {
        out->append("NaN");
      } else if (std::isinf(d)) {
        out->append(d > 0 ? "Infinity" : "-Infinity");
      } else {
        out->append(PyFloat(d));
      }
      return absl::OkStatus();
    }
    case Kind::kString: JsonString(v.str(), opt.ensure_ascii, out); return absl::OkStatus();
    case Kind::kList: {
      const auto& items = v.list().items;
      if (items.empty()) {
        out->append("[]");
        return absl::OkStatus();
      }
      out->push_back('[');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out->append(opt.item_sep);
        newline(level + 1);
        MOE_RETURN_IF_ERROR(JsonDump(items[i], opt, level + 1, out));
      }
      newline(level);
      out->push_back(']');
      return absl::OkStatus();
    }
    case Kind::kDict: {
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& item : v.dict().items) items.push_back(&item);
      if (items.empty()) {
        out->append("{}");
        return absl::OkStatus();
      }
      if (opt.sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](auto* a, auto* b) { return a->first < b->first; });
      }
      out->push_back('{');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out->append(opt.item_sep);
        newline(level + 1);
        JsonString(items[i]->first, opt.ensure_ascii, out);
        out->append(opt.key_sep);
        MOE_RETURN_IF_ERROR(JsonDump(items[i]->second, opt, level + 1, out));
      }
      newline(level);
      out->push_back('}');
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("Object of type ", TypeName(v), " is not JSON serializable"));
  }
}

bool PyEquals(const Value& a, const Value& b, int depth = 0) {
  if (depth > 256) return false;
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) return a.int_value() == b.int_value();
    return a.number() == b.number();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Kind::kUndefined:
    case Kind::kNone: return true;
    case Kind::kString: return a.str() == b.str();
    case Kind::kList: {
      const auto& x = a.list().items;
      const auto& y = b.list().items;
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i) {
        if (!PyEquals(x[i], y[i], depth + 1)) return false;
      }
      return true;
    }
    case Kind::kDict: {
      const Object& x = a.dict();
      const Object& y = b.dict();
      if (x.items.size() != y.items.size()) return false;
      for (const auto& [k, v] : x.items) {
        const Value* w = y.Find(k);
        if (w == nullptr || !PyEquals(v, *w, depth + 1)) return false;
      }
      return true;
    }
    default: return a.identity() == b.identity();
  }
}

template <typename Json>
absl::StatusOr<Value> FromJson(const Json& j, int depth, int max_depth) {
  if (depth > max_depth) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template context nested deeper than ", max_depth, " levels"));
  }
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::None();
    case nlohmann::json::value_t::boolean: return Value::Bool(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Value::Int(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Value::Float(static_cast<double>(u));
      }
      return Value::Int(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float: return Value::Float(j.template get<double>());
    case nlohmann::json::value_t::string:
      return Value::Str(j.template get_ref<const std::string&>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) {
        MOE_ASSIGN_OR_RETURN(Value v, FromJson(e, depth + 1, max_depth));
        items.push_back(std::move(v));
      }
      return Value::List(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      auto o = std::make_shared<Object>();
      o->items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) {
        MOE_ASSIGN_OR_RETURN(Value v, FromJson(it.value(), depth + 1, max_depth));
        o->items.emplace_back(it.key(), std::move(v));
      }
      return Value::Dict(std::move(o));
    }
    default: return Value::None();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokens and AST.

namespace internal {

enum class NodeKind : uint8_t {
  // Statements.
  kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kScope,
  // Expressions.
  kLiteral, kName, kListLit, kTupleLit, kDictLit, kAttr, kSubscript, kSlice, kCall, kFilter,
  kTest, kNot, kNeg, kPos, kAnd, kOr, kBinary, kCompare, kCondExpr,
};

using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  NodeKind kind;
  size_t pos = 0;  // offset in the normalised source, for error positions
  int depth = 1;
  std::string str;                 // name, operator, attribute, filter or test name, text
  Value literal;                   // kLiteral
  std::vector<NodePtr> kids;       // operands / arguments (may hold nullptr for absent parts)
  std::vector<std::string> names;  // keyword argument names (parallel to the last kids), for
                                   // targets, macro parameters, comparison operators
  std::vector<Body> bodies;        // statement bodies
  size_t num_positional = 0;       // kCall/kFilter/kTest: kids[1..num_positional] positional
  bool negated = false;            // kTest: `is not`
};

struct TemplateProgram {
  std::string source;        // as given
  std::string normalized;    // newlines normalised, trailing newline dropped
  std::vector<size_t> line_starts;
  Body body;
  ChatTemplateLimits limits;

  std::string Where(size_t pos) const {
    auto it = std::upper_bound(line_starts.begin(), line_starts.end(), pos);
    size_t line = static_cast<size_t>(it - line_starts.begin());
    size_t col = pos - line_starts[line - 1] + 1;
    return absl::StrCat("line ", line, ", column ", col);
  }
  absl::Status Error(size_t pos, std::string_view message) const {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template: ", Where(pos), ": ", absl::string_view(message.data(),
                                                                            message.size())));
  }
};

}  // namespace internal

namespace {

using internal::Body;
using internal::NodeKind;
using internal::NodePtr;
using internal::TemplateProgram;

// ---------------------------------------------------------------------------------------------
// Lexer.

enum class Tok : uint8_t {
  kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof
};

struct Token {
  Tok type;
  size_t pos;
  std::string text;  // data, name, operator, or the decoded string literal
  int64_t ival = 0;
  double fval = 0;
};

bool IsRegexSpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsNameStart(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool IsNameChar(char c) { return IsNameStart(c) || IsDigit(c); }

// Python's str.rstrip() (all Unicode whitespace).
std::string_view RstripAll(std::string_view s) {
  std::u32string u = Decode(s);
  size_t e = u.size();
  while (e > 0 && IsPySpace(u[e - 1])) --e;
  size_t bytes = 0;
  for (size_t i = 0; i < e; ++i) {
    char32_t c = u[i];
    bytes += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
  }
  // Invalid bytes decode to U+FFFD (3 bytes) and would miscount; keep the input then.
  return bytes <= s.size() ? s.substr(0, bytes) : s;
}

class Lexer {
 public:
  explicit Lexer(const TemplateProgram& program) : prog_(program), src_(program.normalized) {}

  absl::StatusOr<std::vector<Token>> Run() {
    size_t pos = 0;
    bool line_starting = true;
    const size_t n = src_.size();
    while (pos < n) {
      size_t t = FindTagStart(pos);
      if (t == std::string::npos) {
        Emit(Tok::kData, pos, std::string(src_.substr(pos)));
        break;
      }
      char kind = src_[t + 1];
      char sign = t + 2 < n && (src_[t + 2] == '-' || src_[t + 2] == '+') ? src_[t + 2] : 0;
      size_t raw_body = 0;
      bool raw = kind == '%' && MatchRawBegin(t + 2 + (sign ? 1 : 0), &raw_body);
      std::string_view text = StripBefore(src_.substr(pos, t - pos), sign, kind != '{',
                                          line_starting);
      if (!text.empty()) Emit(Tok::kData, pos, std::string(text));
      size_t p = t + 2 + (sign ? 1 : 0);
      if (raw) {
        MOE_RETURN_IF_ERROR(LexRaw(t, raw_body, &pos, &line_starting));
        continue;
      }
      if (kind == '#') {
        size_t k = src_.find("#}", p);
        if (k == std::string::npos) return prog_.Error(t, "missing end of comment tag");
        pos = EndOfTag(k, k > p ? src_[k - 1] : 0, /*block=*/true);
        line_starting = src_[pos - 1] == '\n';
        continue;
      }
      Emit(kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, t, "");
      MOE_RETURN_IF_ERROR(LexTag(kind == '%', p, &pos));
      line_starting = src_[pos - 1] == '\n';
    }
    Emit(Tok::kEof, n, "");
    return std::move(tokens_);
  }

 private:
  void Emit(Tok type, size_t pos, std::string text) {
    tokens_.push_back(Token{type, pos, std::move(text)});
  }

  size_t FindTagStart(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) {
        return i;
      }
    }
    return std::string::npos;
  }

  // Whitespace control for the data before a tag (OptionalLStrip in jinja2/lexer.py).
  std::string_view StripBefore(std::string_view text, char sign, bool lstrip_applies,
                               bool line_starting) const {
    if (sign == '-') return RstripAll(text);
    if (sign == '+' || !lstrip_applies) return text;
    size_t l_pos = text.rfind('\n');
    l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
    if (l_pos == 0 && !line_starting) return text;
    std::string_view tail = text.substr(l_pos);
    if (tail.empty()) return text;
    std::u32string u = Decode(tail);
    for (char32_t c : u) {
      if (!IsPySpace(c)) return text;
    }
    return text.substr(0, l_pos);
  }

  // Position after a closing `%}`/`#}` found at k (`-` strips what follows, `+` keeps the
  // newline, otherwise trim_blocks drops one newline).
  size_t EndOfTag(size_t k, char before, bool block) const {
    size_t end = k + 2;
    if (before == '-') {
      while (end < src_.size() && IsRegexSpace(src_[end])) ++end;
    } else if (before != '+' && block && end < src_.size() && src_[end] == '\n') {
      ++end;
    }
    return end;
  }

  // `{% raw %}` at p (after `{%` and sign): on success *body is where the raw text starts.
  bool MatchRawBegin(size_t p, size_t* body) const {
    while (p < src_.size() && IsRegexSpace(src_[p])) ++p;
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    while (p < src_.size() && IsRegexSpace(src_[p])) ++p;
    if (src_.compare(p, 3, "-%}") == 0) {
      p += 3;
      while (p < src_.size() && IsRegexSpace(src_[p])) ++p;
    } else if (src_.compare(p, 2, "%}") == 0) {
      p += 2;
    } else {
      return false;
    }
    *body = p;
    return true;
  }

  absl::Status LexRaw(size_t begin, size_t body, size_t* pos, bool* line_starting) {
    bool body_line_starting = src_[body - 1] == '\n';
    for (size_t t = src_.find("{%", body); t != std::string::npos; t = src_.find("{%", t + 1)) {
      size_t p = t + 2;
      char sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0;
      if (sign) ++p;
      while (p < src_.size() && IsRegexSpace(src_[p])) ++p;
      if (src_.compare(p, 6, "endraw") != 0) continue;
      p += 6;
      while (p < src_.size() && IsRegexSpace(src_[p])) ++p;
      size_t end;
      if (src_.compare(p, 3, "+%}") == 0 || src_.compare(p, 3, "-%}") == 0) {
        end = EndOfTag(p + 1, src_[p], true);
      } else if (src_.compare(p, 2, "%}") == 0) {
        end = EndOfTag(p, 0, true);
      } else {
        continue;
      }
      std::string_view text = StripBefore(src_.substr(body, t - body), sign, true,
                                          body_line_starting);
      if (!text.empty()) Emit(Tok::kData, body, std::string(text));
      *pos = end;
      *line_starting = src_[end - 1] == '\n';
      return absl::OkStatus();
    }
    return prog_.Error(begin, "missing end of raw directive");
  }

  absl::Status LexTag(bool block, size_t p, size_t* out_pos) {
    std::vector<char> brackets;
    const size_t n = src_.size();
    while (true) {
      if (p >= n) {
        return prog_.Error(p, block ? "unexpected end of template, expected '%}'"
                                    : "unexpected end of template, expected '}}'");
      }
      if (brackets.empty()) {
        if (block) {
          if (src_.compare(p, 3, "+%}") == 0 || src_.compare(p, 3, "-%}") == 0) {
            Emit(Tok::kBlockEnd, p, "");
            *out_pos = EndOfTag(p + 1, src_[p], true);
            return absl::OkStatus();
          }
          if (src_.compare(p, 2, "%}") == 0) {
            Emit(Tok::kBlockEnd, p, "");
            *out_pos = EndOfTag(p, 0, true);
            return absl::OkStatus();
          }
        } else {
          if (src_.compare(p, 3, "-}}") == 0) {
            Emit(Tok::kVarEnd, p, "");
            *out_pos = EndOfTag(p + 1, '-', false);
            return absl::OkStatus();
          }
          if (src_.compare(p, 2, "}}") == 0) {
            Emit(Tok::kVarEnd, p, "");
            *out_pos = p + 2;
            return absl::OkStatus();
          }
        }
      }
      char c = src_[p];
      if (IsRegexSpace(c)) {
        ++p;
        continue;
      }
      if (IsDigit(c)) {
        MOE_RETURN_IF_ERROR(LexNumber(&p));
        continue;
      }
      if (IsNameStart(c)) {
        size_t b = p;
        while (p < n && IsNameChar(src_[p])) ++p;
        Emit(Tok::kName, b, std::string(src_.substr(b, p - b)));
        continue;
      }
      if (c == '\'' || c == '"') {
        MOE_RETURN_IF_ERROR(LexString(&p));
        continue;
      }
      static constexpr std::string_view kTwo[] = {"//", "**", "==", "!=", ">=", "<="};
      bool matched = false;
      for (std::string_view op : kTwo) {
        if (src_.compare(p, 2, op) == 0) {
          Emit(Tok::kOp, p, std::string(op));
          p += 2;
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (std::string_view("+-/*%~[](){}<>=.:|,;").find(c) == std::string_view::npos) {
        return prog_.Error(p, absl::StrCat("unexpected char '", std::string(1, c), "'"));
      }
      if (c == '(' || c == '[' || c == '{') {
        brackets.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
      } else if (c == ')' || c == ']' || c == '}') {
        if (brackets.empty()) {
          return prog_.Error(p, absl::StrCat("unexpected '", std::string(1, c), "'"));
        }
        if (brackets.back() != c) {
          return prog_.Error(p, absl::StrCat("unexpected '", std::string(1, c), "', expected '",
                                             std::string(1, brackets.back()), "'"));
        }
        brackets.pop_back();
      }
      Emit(Tok::kOp, p, std::string(1, c));
      ++p;
    }
  }

  absl::Status LexNumber(size_t* p) {
    const size_t n = src_.size();
    size_t b = *p;
    std::string digits;
    auto take_digits = [&](std::string* out) {
      size_t start = *p;
      while (*p < n && (IsDigit(src_[*p]) || (src_[*p] == '_' && *p + 1 < n &&
                                               IsDigit(src_[*p + 1]) && *p > start))) {
        if (src_[*p] != '_') out->push_back(src_[*p]);
        ++*p;
      }
    };
    if (src_[b] == '0' && b + 1 < n && std::strchr("xXoObB", src_[b + 1]) != nullptr &&
        src_[b + 1] != '\0') {
      int base = (src_[b + 1] | 0x20) == 'x' ? 16 : (src_[b + 1] | 0x20) == 'o' ? 8 : 2;
      *p = b + 2;
      while (*p < n && (std::isxdigit(static_cast<unsigned char>(src_[*p])) || src_[*p] == '_')) {
        if (src_[*p] != '_') digits.push_back(src_[*p]);
        ++*p;
      }
      int64_t v = 0;
      auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v, base);
      if (digits.empty() || r.ec != std::errc() || r.ptr != digits.data() + digits.size()) {
        return prog_.Error(b, "invalid integer literal");
      }
      tokens_.push_back(Token{Tok::kInt, b, "", v});
      return absl::OkStatus();
    }
    take_digits(&digits);
    bool is_float = false;
    std::string text = digits;
    if (*p + 1 < n && src_[*p] == '.' && IsDigit(src_[*p + 1])) {
      ++*p;
      text.push_back('.');
      take_digits(&text);
      is_float = true;
    }
    if (*p < n && (src_[*p] == 'e' || src_[*p] == 'E')) {
      size_t q = *p + 1;
      if (q < n && (src_[q] == '+' || src_[q] == '-')) ++q;
      if (q < n && IsDigit(src_[q])) {
        text.push_back('e');
        text.append(src_.substr(*p + 1, q - *p - 1));
        *p = q;
        take_digits(&text);
        is_float = true;
      }
    }
    Token tok{is_float ? Tok::kFloat : Tok::kInt, b, ""};
    if (is_float) {
      tok.fval = std::strtod(text.c_str(), nullptr);
    } else {
      auto r = std::from_chars(text.data(), text.data() + text.size(), tok.ival);
      if (r.ec != std::errc()) return prog_.Error(b, "integer literal out of range");
    }
    tokens_.push_back(std::move(tok));
    return absl::OkStatus();
  }

  // Python string literal with the escapes of `unicode-escape` decoding.
  absl::Status LexString(size_t* p) {
    const size_t n = src_.size();
    size_t b = *p;
    char quote = src_[b];
    std::string out;
    size_t i = b + 1;
    while (true) {
      if (i >= n) return prog_.Error(b, "unterminated string literal");
      char c = src_[i];
      if (c == quote) break;
      if (c != '\\') {
        out.push_back(c);
        ++i;
        continue;
      }
      if (i + 1 >= n) return prog_.Error(b, "unterminated string literal");
      char e = src_[i + 1];
      i += 2;
      auto hex = [&](int count) -> absl::Status {
        if (i + count > n) return prog_.Error(b, "truncated \\x, \\u or \\U escape");
        uint32_t v = 0;
        for (int k = 0; k < count; ++k) {
          char h = src_[i + k];
          if (!std::isxdigit(static_cast<unsigned char>(h))) {
            return prog_.Error(b, "truncated \\x, \\u or \\U escape");
          }
          v = v * 16 + (IsDigit(h) ? h - '0' : (h | 0x20) - 'a' + 10);
        }
        i += count;
        AppendUtf8(&out, v > 0x10FFFF ? 0xFFFD : v);
        return absl::OkStatus();
      };
      switch (e) {
        case 'n': out.push_back('\n'); break;
        case 't': out.push_back('\t'); break;
        case 'r': out.push_back('\r'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'v': out.push_back('\v'); break;
        case 'a': out.push_back('\a'); break;
        case '\\': out.push_back('\\'); break;
        case '\'': out.push_back('\''); break;
        case '"': out.push_back('"'); break;
        case '\n': break;
        case 'x': MOE_RETURN_IF_ERROR(hex(2)); break;
        case 'u': MOE_RETURN_IF_ERROR(hex(4)); break;
        case 'U': MOE_RETURN_IF_ERROR(hex(8)); break;
        default:
          if (e >= '0' && e <= '7') {
            uint32_t v = e - '0';
            for (int k = 0; k < 2 && i < n && src_[i] >= '0' && src_[i] <= '7'; ++k, ++i) {
              v = v * 8 + (src_[i] - '0');
            }
            AppendUtf8(&out, v);
          } else {
            out.push_back('\\');
            out.push_back(e);
          }
      }
    }
    Emit(Tok::kString, b, std::move(out));
    *p = i + 1;
    return absl::OkStatus();
  }

  const TemplateProgram& prog_;
  std::string_view src_;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------------------
// Parser: recursive descent with Jinja's operator precedence (jinja2/parser.py).

constexpr std::string_view kFilters[] = {
    "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first",
    "float", "format", "indent", "int", "items", "join", "last", "length", "list", "lower",
    "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "safe",
    "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim", "unique",
    "upper", "wordcount"};
constexpr std::string_view kTests[] = {
    "!=", "<", "<=", "==", ">", ">=", "boolean", "callable", "defined", "divisibleby", "eq",
    "equalto", "escaped", "even", "false", "filter", "float", "ge", "greaterthan", "gt", "in",
    "integer", "iterable", "le", "lessthan", "lower", "lt", "mapping", "ne", "none", "number",
    "odd", "sameas", "sequence", "string", "test", "true", "undefined", "upper"};

bool Known(std::string_view name, const std::string_view* list, size_t n) {
  return std::find(list, list + n, name) != list + n;
}
bool KnownFilter(std::string_view name) {
  return Known(name, kFilters, std::size(kFilters));
}
bool KnownTest(std::string_view name) { return Known(name, kTests, std::size(kTests)); }

class Parser {
 public:
  Parser(const TemplateProgram& program, std::vector<Token> tokens)
      : prog_(program), toks_(std::move(tokens)) {}

  absl::StatusOr<Body> ParseTemplate() {
    std::string which;
    return ParseBody({}, &which, "", 0);
  }

 private:
  // Tracks recursion of the parser itself, which a long run of `(` or `not` drives.
  class DepthGuard {
   public:
    explicit DepthGuard(Parser* p) : p_(p) { ++p_->depth_; }
    ~DepthGuard() { --p_->depth_; }
    bool exceeded() const { return p_->depth_ > p_->prog_.limits.max_depth; }

   private:
    Parser* p_;
  };

  const Token& Peek(size_t ahead = 0) const {
    size_t i = std::min(idx_ + ahead, toks_.size() - 1);
    return toks_[i];
  }
  const Token& Next() {
    const Token& t = toks_[idx_];
    if (idx_ + 1 < toks_.size()) ++idx_;
    return t;
  }
  bool IsName(std::string_view s, size_t ahead = 0) const {
    const Token& t = Peek(ahead);
    return t.type == Tok::kName && t.text == s;
  }
  bool IsOp(std::string_view s, size_t ahead = 0) const {
    const Token& t = Peek(ahead);
    return t.type == Tok::kOp && t.text == s;
  }
  static std::string Describe(const Token& t) {
    switch (t.type) {
      case Tok::kData: return "template data";
      case Tok::kVarBegin: return "'{{'";
      case Tok::kVarEnd: return "'}}'";
      case Tok::kBlockBegin: return "'{%'";
      case Tok::kBlockEnd: return "'%}'";
      case Tok::kEof: return "end of template";
      case Tok::kString: return "string literal";
      case Tok::kInt:
      case Tok::kFloat: return "number";
      default: return absl::StrCat("'", t.text, "'");
    }
  }
  absl::Status Unexpected(std::string_view expected) const {
    return prog_.Error(Peek().pos, absl::StrCat("unexpected ", Describe(Peek()), ", expected ",
                                                absl::string_view(expected.data(),
                                                                  expected.size())));
  }
  absl::Status ExpectOp(std::string_view s) {
    if (!IsOp(s)) return Unexpected(absl::StrCat("'", absl::string_view(s.data(), s.size()), "'"));
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectBlockEnd() {
    if (Peek().type != Tok::kBlockEnd) return Unexpected("end of statement '%}'");
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().type != Tok::kName) return Unexpected("a name");
    return Next().text;
  }

  NodePtr Make(NodeKind kind, size_t pos) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->pos = pos;
    return n;
  }
  // Computes the node's depth; the evaluator recurses that deep, so it is bounded.
  absl::StatusOr<NodePtr> Finish(NodePtr n) {
    int d = 0;
    for (const NodePtr& k : n->kids) {
      if (k) d = std::max(d, k->depth);
    }
    for (const Body& b : n->bodies) {
      for (const NodePtr& k : b) d = std::max(d, k->depth);
    }
    n->depth = d + 1;
    if (n->depth > prog_.limits.max_depth) {
      return prog_.Error(n->pos, absl::StrCat("template nested too deeply (more than ",
                                              prog_.limits.max_depth, " levels)"));
    }
    return n;
  }

  absl::StatusOr<Body> ParseBody(std::initializer_list<std::string_view> ends, std::string* which,
                                 std::string_view opener, size_t opener_pos) {
    DepthGuard guard(this);
    if (guard.exceeded()) return prog_.Error(Peek().pos, "template nested too deeply");
    Body body;
    while (true) {
      const Token& t = Peek();
      switch (t.type) {
        case Tok::kData: {
          NodePtr n = Make(NodeKind::kText, t.pos);
          n->str = t.text;
          body.push_back(std::move(n));
          Next();
          break;
        }
        case Tok::kVarBegin: {
          size_t pos = Next().pos;
          NodePtr n = Make(NodeKind::kOutput, pos);
          MOE_ASSIGN_OR_RETURN(NodePtr e, ParseTuple(true));
          if (Peek().type != Tok::kVarEnd) return Unexpected("end of print statement '}}'");
          Next();
          n->kids.push_back(std::move(e));
          MOE_ASSIGN_OR_RETURN(n, Finish(std::move(n)));
          body.push_back(std::move(n));
          break;
        }
        case Tok::kBlockBegin: {
          const Token& name = Peek(1);
          if (name.type == Tok::kName &&
              std::find(ends.begin(), ends.end(), name.text) != ends.end()) {
            Next();
            *which = Next().text;
            return body;
          }
          if (ends.size() > 0 && name.type == Tok::kName &&
              (name.text.rfind("end", 0) == 0 || name.text == "else" || name.text == "elif")) {
            std::string want;
            for (std::string_view e : ends) {
              absl::StrAppend(&want, want.empty() ? "" : " or ", "'",
                              absl::string_view(e.data(), e.size()), "'");
            }
            return prog_.Error(name.pos, absl::StrCat(
                "unexpected '", name.text, "' tag: expected ", want, " to close the '",
                absl::string_view(opener.data(), opener.size()), "' tag at ",
                prog_.Where(opener_pos)));
          }
          Next();
          MOE_ASSIGN_OR_RETURN(NodePtr n, ParseStatement());
          body.push_back(std::move(n));
          break;
        }
        case Tok::kEof: {
          if (ends.size() == 0) return body;
          std::string want;
          for (std::string_view e : ends) {
            absl::StrAppend(&want, want.empty() ? "" : " or ", "'",
                            absl::string_view(e.data(), e.size()), "'");
          }
          return prog_.Error(opener_pos, absl::StrCat(
              "unclosed '", absl::string_view(opener.data(), opener.size()),
              "' tag: reached the end of the template looking for ", want));
        }
        default: return Unexpected("template data or a tag");
      }
    }
  }

  absl::StatusOr<NodePtr> ParseStatement() {
    const Token& t = Peek();
    if (t.type != Tok::kName) return Unexpected("a tag name");
    const std::string name = t.text;
    size_t pos = t.pos;
    if (name == "if") return ParseIf();
    if (name == "for") return ParseFor();
    if (name == "set") return ParseSet();
    if (name == "macro") return ParseMacro();
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) {
        return prog_.Error(pos, absl::StrCat("'", name, "' outside of a loop"));
      }
      Next();
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      return Make(name == "break" ? NodeKind::kBreak : NodeKind::kContinue, pos);
    }
    if (name == "generation") {
      // transformers' AssistantTracker tag: only marks assistant spans, renders its body.
      Next();
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      NodePtr n = Make(NodeKind::kScope, pos);
      std::string which;
      MOE_ASSIGN_OR_RETURN(Body body, ParseBody({"endgeneration"}, &which, "generation", pos));
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      n->bodies.push_back(std::move(body));
      return Finish(std::move(n));
    }
    static constexpr std::string_view kUnsupported[] = {
        "extends", "block", "include", "import", "from", "call", "filter", "with",
        "autoescape", "do", "trans"};
    if (Known(name, kUnsupported, std::size(kUnsupported))) {
      return prog_.Error(pos, absl::StrCat("unsupported tag '", name, "'"));
    }
    if (name.rfind("end", 0) == 0 || name == "else" || name == "elif") {
      return prog_.Error(pos, absl::StrCat("unexpected '", name, "' tag"));
    }
    return prog_.Error(pos, absl::StrCat("unknown tag '", name, "'"));
  }

  absl::StatusOr<NodePtr> ParseIf() {
    size_t pos = Next().pos;
    NodePtr n = Make(NodeKind::kIf, pos);
    MOE_ASSIGN_OR_RETURN(NodePtr cond, ParseTuple(true));
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    while (true) {
      std::string which;
      MOE_ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}, &which, "if", pos));
      n->kids.push_back(std::move(cond));
      n->bodies.push_back(std::move(body));
      if (which == "elif") {
        MOE_ASSIGN_OR_RETURN(cond, ParseTuple(true));
        MOE_RETURN_IF_ERROR(ExpectBlockEnd());
        continue;
      }
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      if (which == "else") {
        MOE_ASSIGN_OR_RETURN(Body else_body, ParseBody({"endif"}, &which, "if", pos));
        MOE_RETURN_IF_ERROR(ExpectBlockEnd());
        n->bodies.push_back(std::move(else_body));
      }
      break;
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<std::vector<std::string>> ParseTargets() {
    std::vector<std::string> names;
    bool paren = IsOp("(");
    if (paren) Next();
    while (true) {
      MOE_ASSIGN_OR_RETURN(std::string name, ExpectName());
      names.push_back(std::move(name));
      if (!IsOp(",")) break;
      Next();
    }
    if (paren) MOE_RETURN_IF_ERROR(ExpectOp(")"));
    return names;
  }

  absl::StatusOr<NodePtr> ParseFor() {
    size_t pos = Next().pos;
    NodePtr n = Make(NodeKind::kFor, pos);
    MOE_ASSIGN_OR_RETURN(n->names, ParseTargets());
    if (!IsName("in")) return Unexpected("'in'");
    Next();
    MOE_ASSIGN_OR_RETURN(NodePtr iter, ParseTuple(false));
    n->kids.push_back(std::move(iter));
    NodePtr filter;
    if (IsName("if")) {
      Next();
      MOE_ASSIGN_OR_RETURN(filter, ParseTuple(true));
    }
    n->kids.push_back(std::move(filter));
    if (IsName("recursive")) return prog_.Error(Peek().pos, "recursive loops are not supported");
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    std::string which;
    ++loop_depth_;
    auto body = ParseBody({"endfor", "else"}, &which, "for", pos);
    --loop_depth_;
    if (!body.ok()) return body.status();
    n->bodies.push_back(*std::move(body));
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    if (which == "else") {
      MOE_ASSIGN_OR_RETURN(Body else_body, ParseBody({"endfor"}, &which, "for", pos));
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      n->bodies.push_back(std::move(else_body));
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseSet() {
    size_t pos = Next().pos;
    NodePtr n = Make(NodeKind::kSet, pos);
    if (Peek().type == Tok::kName && IsOp(".", 1)) {
      n->names.push_back(Next().text);
      Next();
      MOE_ASSIGN_OR_RETURN(n->str, ExpectName());
    } else {
      MOE_ASSIGN_OR_RETURN(n->names, ParseTargets());
    }
    if (IsOp("=")) {
      Next();
      MOE_ASSIGN_OR_RETURN(NodePtr value, ParseTuple(true));
      n->kids.push_back(std::move(value));
      MOE_RETURN_IF_ERROR(ExpectBlockEnd());
      return Finish(std::move(n));
    }
    if (n->names.size() != 1 || !n->str.empty()) return Unexpected("'='");
    if (IsOp("|")) return prog_.Error(Peek().pos, "filters on block set are not supported");
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    n->kind = NodeKind::kSetBlock;
    std::string which;
    MOE_ASSIGN_OR_RETURN(Body body, ParseBody({"endset"}, &which, "set", pos));
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    n->bodies.push_back(std::move(body));
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseMacro() {
    size_t pos = Next().pos;
    NodePtr n = Make(NodeKind::kMacro, pos);
    MOE_ASSIGN_OR_RETURN(n->str, ExpectName());
    MOE_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      MOE_ASSIGN_OR_RETURN(std::string param, ExpectName());
      n->names.push_back(std::move(param));
      NodePtr dflt;
      if (IsOp("=")) {
        Next();
        MOE_ASSIGN_OR_RETURN(dflt, ParseExpression());
      }
      n->kids.push_back(std::move(dflt));
      if (!IsOp(")")) MOE_RETURN_IF_ERROR(ExpectOp(","));
    }
    Next();
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    int saved_loop_depth = loop_depth_;
    loop_depth_ = 0;
    std::string which;
    auto body = ParseBody({"endmacro"}, &which, "macro", pos);
    loop_depth_ = saved_loop_depth;
    if (!body.ok()) return body.status();
    MOE_RETURN_IF_ERROR(ExpectBlockEnd());
    n->bodies.push_back(*std::move(body));
    return Finish(std::move(n));
  }

  // Expressions ------------------------------------------------------------------------------

  bool AtTupleEnd() const {
    const Token& t = Peek();
    return t.type == Tok::kVarEnd || t.type == Tok::kBlockEnd || IsOp(")") || IsName("if") ||
           IsName("recursive");
  }

  absl::StatusOr<NodePtr> ParseTuple(bool with_condexpr) {
    size_t pos = Peek().pos;
    auto parse_one = [&]() { return with_condexpr ? ParseExpression() : ParseOr(); };
    MOE_ASSIGN_OR_RETURN(NodePtr first, parse_one());
    if (!IsOp(",")) return first;
    NodePtr n = Make(NodeKind::kTupleLit, pos);
    n->kids.push_back(std::move(first));
    while (IsOp(",")) {
      Next();
      if (AtTupleEnd()) break;
      MOE_ASSIGN_OR_RETURN(NodePtr item, parse_one());
      n->kids.push_back(std::move(item));
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseExpression() {
    DepthGuard guard(this);
    if (guard.exceeded()) return prog_.Error(Peek().pos, "expression nested too deeply");
    size_t pos = Peek().pos;
    MOE_ASSIGN_OR_RETURN(NodePtr expr, ParseOr());
    while (IsName("if")) {
      Next();
      NodePtr n = Make(NodeKind::kCondExpr, pos);
      MOE_ASSIGN_OR_RETURN(NodePtr cond, ParseOr());
      NodePtr otherwise;
      if (IsName("else")) {
        Next();
        MOE_ASSIGN_OR_RETURN(otherwise, ParseExpression());
      }
      n->kids.push_back(std::move(cond));
      n->kids.push_back(std::move(expr));
      n->kids.push_back(std::move(otherwise));
      MOE_ASSIGN_OR_RETURN(expr, Finish(std::move(n)));
    }
    return expr;
  }

  absl::StatusOr<NodePtr> Binary(NodeKind kind, std::string op, size_t pos, NodePtr l,
                                 NodePtr r) {
    NodePtr n = Make(kind, pos);
    n->str = std::move(op);
    n->kids.push_back(std::move(l));
    n->kids.push_back(std::move(r));
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseOr() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParseAnd());
    while (IsName("or")) {
      size_t pos = Next().pos;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParseAnd());
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kOr, "or", pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseAnd() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParseNot());
    while (IsName("and")) {
      size_t pos = Next().pos;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParseNot());
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kAnd, "and", pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseNot() {
    if (IsName("not")) {
      DepthGuard guard(this);
      if (guard.exceeded()) return prog_.Error(Peek().pos, "expression nested too deeply");
      NodePtr n = Make(NodeKind::kNot, Next().pos);
      MOE_ASSIGN_OR_RETURN(NodePtr operand, ParseNot());
      n->kids.push_back(std::move(operand));
      return Finish(std::move(n));
    }
    return ParseCompare();
  }

  absl::StatusOr<NodePtr> ParseCompare() {
    size_t pos = Peek().pos;
    MOE_ASSIGN_OR_RETURN(NodePtr expr, ParseMath1());
    NodePtr n;
    while (true) {
      std::string op;
      const Token& t = Peek();
      if (t.type == Tok::kOp && (t.text == "==" || t.text == "!=" || t.text == "<" ||
                                 t.text == ">" || t.text == "<=" || t.text == ">=")) {
        op = t.text;
        Next();
      } else if (IsName("in")) {
        op = "in";
        Next();
      } else if (IsName("not") && IsName("in", 1)) {
        op = "not in";
        Next();
        Next();
      } else {
        break;
      }
      if (!n) {
        n = Make(NodeKind::kCompare, pos);
        n->kids.push_back(std::move(expr));
      }
      MOE_ASSIGN_OR_RETURN(NodePtr operand, ParseMath1());
      n->names.push_back(std::move(op));
      n->kids.push_back(std::move(operand));
    }
    if (!n) return expr;
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseMath1() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      const Token& t = Next();
      std::string op = t.text;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParseConcat());
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kBinary, op, t.pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseConcat() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParseMath2());
    while (IsOp("~")) {
      size_t pos = Next().pos;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParseMath2());
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kBinary, "~", pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseMath2() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token& t = Next();
      std::string op = t.text;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParsePow());
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kBinary, op, t.pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParsePow() {
    MOE_ASSIGN_OR_RETURN(NodePtr left, ParseUnary(true));
    while (IsOp("**")) {
      size_t pos = Next().pos;
      MOE_ASSIGN_OR_RETURN(NodePtr right, ParseUnary(true));
      MOE_ASSIGN_OR_RETURN(left, Binary(NodeKind::kBinary, "**", pos, std::move(left),
                                        std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseUnary(bool with_filter) {
    DepthGuard guard(this);
    if (guard.exceeded()) return prog_.Error(Peek().pos, "expression nested too deeply");
    NodePtr node;
    if (IsOp("-") || IsOp("+")) {
      const Token& t = Next();
      NodePtr n = Make(t.text == "-" ? NodeKind::kNeg : NodeKind::kPos, t.pos);
      MOE_ASSIGN_OR_RETURN(NodePtr operand, ParseUnary(false));
      n->kids.push_back(std::move(operand));
      MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
    } else {
      MOE_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    MOE_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      MOE_ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    const Token& t = Peek();
    size_t pos = t.pos;
    switch (t.type) {
      case Tok::kName: {
        NodePtr n = Make(NodeKind::kLiteral, pos);
        if (t.text == "true" || t.text == "True") {
          n->literal = Value::Bool(true);
        } else if (t.text == "false" || t.text == "False") {
          n->literal = Value::Bool(false);
        } else if (t.text == "none" || t.text == "None") {
          n->literal = Value::None();
        } else {
          n->kind = NodeKind::kName;
          n->str = t.text;
        }
        Next();
        return n;
      }
      case Tok::kString: {
        std::string s;
        while (Peek().type == Tok::kString) s += Next().text;
        NodePtr n = Make(NodeKind::kLiteral, pos);
        n->literal = Value::Str(std::move(s));
        return n;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        NodePtr n = Make(NodeKind::kLiteral, pos);
        n->literal = t.type == Tok::kInt ? Value::Int(t.ival) : Value::Float(t.fval);
        Next();
        return n;
      }
      case Tok::kOp: {
        if (t.text == "(") {
          Next();
          if (IsOp(")")) {
            Next();
            NodePtr n = Make(NodeKind::kTupleLit, pos);
            return n;
          }
          MOE_ASSIGN_OR_RETURN(NodePtr inner, ParseTuple(true));
          MOE_RETURN_IF_ERROR(ExpectOp(")"));
          return inner;
        }
        if (t.text == "[" || t.text == "{") {
          bool is_list = t.text == "[";
          Next();
          NodePtr n = Make(is_list ? NodeKind::kListLit : NodeKind::kDictLit, pos);
          std::string_view close = is_list ? "]" : "}";
          while (!IsOp(close)) {
            MOE_ASSIGN_OR_RETURN(NodePtr item, ParseExpression());
            n->kids.push_back(std::move(item));
            if (!is_list) {
              MOE_RETURN_IF_ERROR(ExpectOp(":"));
              MOE_ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
              n->kids.push_back(std::move(value));
            }
            if (!IsOp(close)) MOE_RETURN_IF_ERROR(ExpectOp(","));
          }
          Next();
          return Finish(std::move(n));
        }
        break;
      }
      default: break;
    }
    return Unexpected("an expression");
  }

  absl::Status ParseCallArgs(Node* n) {
    MOE_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (IsOp("*") || IsOp("**")) {
        return prog_.Error(Peek().pos, "*args and **kwargs in calls are not supported");
      }
      if (Peek().type == Tok::kName && IsOp("=", 1)) {
        n->names.push_back(Next().text);
        Next();
      } else if (!n->names.empty()) {
        return prog_.Error(Peek().pos, "positional argument follows keyword argument");
      } else {
        ++n->num_positional;
      }
      MOE_ASSIGN_OR_RETURN(NodePtr arg, ParseExpression());
      n->kids.push_back(std::move(arg));
      if (!IsOp(")")) MOE_RETURN_IF_ERROR(ExpectOp(","));
    }
    Next();
    return absl::OkStatus();
  }

  absl::StatusOr<NodePtr> ParsePostfix(NodePtr node) {
    while (true) {
      size_t pos = Peek().pos;
      if (IsOp(".")) {
        Next();
        const Token& t = Peek();
        if (t.type == Tok::kName) {
          NodePtr n = Make(NodeKind::kAttr, pos);
          n->str = Next().text;
          n->kids.push_back(std::move(node));
          MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
        } else if (t.type == Tok::kInt) {
          NodePtr n = Make(NodeKind::kSubscript, pos);
          NodePtr index = Make(NodeKind::kLiteral, t.pos);
          index->literal = Value::Int(Next().ival);
          n->kids.push_back(std::move(node));
          n->kids.push_back(std::move(index));
          MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
        } else {
          return Unexpected("an attribute name");
        }
      } else if (IsOp("[")) {
        Next();
        NodePtr start, stop, step;
        if (!IsOp(":")) {
          MOE_ASSIGN_OR_RETURN(start, ParseExpression());
        }
        if (!IsOp(":")) {
          MOE_RETURN_IF_ERROR(ExpectOp("]"));
          NodePtr n = Make(NodeKind::kSubscript, pos);
          n->kids.push_back(std::move(node));
          n->kids.push_back(std::move(start));
          MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
          continue;
        }
        Next();
        if (!IsOp("]") && !IsOp(":")) {
          MOE_ASSIGN_OR_RETURN(stop, ParseExpression());
        }
        if (IsOp(":")) {
          Next();
          if (!IsOp("]")) {
            MOE_ASSIGN_OR_RETURN(step, ParseExpression());
          }
        }
        MOE_RETURN_IF_ERROR(ExpectOp("]"));
        NodePtr n = Make(NodeKind::kSlice, pos);
        n->kids.push_back(std::move(node));
        n->kids.push_back(std::move(start));
        n->kids.push_back(std::move(stop));
        n->kids.push_back(std::move(step));
        MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
      } else if (IsOp("(")) {
        NodePtr n = Make(NodeKind::kCall, pos);
        n->kids.push_back(std::move(node));
        MOE_RETURN_IF_ERROR(ParseCallArgs(n.get()));
        MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<NodePtr> ParseFilterExpr(NodePtr node) {
    while (true) {
      if (IsOp("|")) {
        Next();
        size_t pos = Peek().pos;
        MOE_ASSIGN_OR_RETURN(std::string name, ExpectName());
        if (!KnownFilter(name)) return prog_.Error(pos, absl::StrCat("unknown filter '", name, "'"));
        NodePtr n = Make(NodeKind::kFilter, pos);
        n->str = std::move(name);
        n->kids.push_back(std::move(node));
        if (IsOp("(")) MOE_RETURN_IF_ERROR(ParseCallArgs(n.get()));
        MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
      } else if (IsName("is")) {
        Next();
        NodePtr n = Make(NodeKind::kTest, Peek().pos);
        if (IsName("not")) {
          Next();
          n->negated = true;
        }
        size_t pos = Peek().pos;
        MOE_ASSIGN_OR_RETURN(n->str, ExpectName());
        if (!KnownTest(n->str)) return prog_.Error(pos, absl::StrCat("unknown test '", n->str, "'"));
        n->kids.push_back(std::move(node));
        const Token& t = Peek();
        if (IsOp("(")) {
          MOE_RETURN_IF_ERROR(ParseCallArgs(n.get()));
        } else if ((t.type == Tok::kName || t.type == Tok::kString || t.type == Tok::kInt ||
                    t.type == Tok::kFloat || IsOp("[") || IsOp("{")) &&
                   !IsName("else") && !IsName("or") && !IsName("and")) {
          if (IsName("is")) return prog_.Error(t.pos, "you cannot chain multiple tests with is");
          MOE_ASSIGN_OR_RETURN(NodePtr arg, ParsePrimary());
          MOE_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
          n->kids.push_back(std::move(arg));
          n->num_positional = 1;
        }
        MOE_ASSIGN_OR_RETURN(node, Finish(std::move(n)));
      } else {
        return node;
      }
    }
  }

  const TemplateProgram& prog_;
  std::vector<Token> toks_;
  size_t idx_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Evaluator.

enum class Flow { kNormal, kBreak, kContinue };
using Scope = std::vector<std::pair<std::string, Value>>;

void SetInScope(Scope* scope, const std::string& name, Value value) {
  for (auto& [k, v] : *scope) {
    if (k == name) {
      v = std::move(value);
      return;
    }
  }
  scope->emplace_back(name, std::move(value));
}

// Appends to a string while keeping it under a size bound.
class Builder {
 public:
  explicit Builder(size_t max) : max_(max) {}
  bool Add(std::string_view s) {
    if (out_.size() + s.size() > max_) return false;
    out_.append(s);
    return true;
  }
  std::string Take() { return std::move(out_); }

 private:
  size_t max_;
  std::string out_;
};

class Renderer {
 public:
  explicit Renderer(const TemplateProgram& program)
      : prog_(program), limits_(program.limits) {}
  ~Renderer() {
    // A namespace may hold itself (`set ns.me = [ns]`); clearing them breaks such cycles.
    for (auto& ns : namespaces_) ns->items.clear();
  }

  absl::StatusOr<std::string> Run(const Value& context);

  absl::Status Error(const Node& n, std::string_view message) const {
    return prog_.Error(n.pos, message);
  }
  absl::Status TooLarge(const Node& n) const {
    return Error(n, absl::StrCat("string exceeds the limit of ", limits_.max_output_bytes,
                                 " bytes"));
  }
  absl::Status UndefinedError(const Node& n, const Value& v) const {
    return Error(n, v.undefined_reason());
  }
  size_t max_bytes() const { return limits_.max_output_bytes; }
  int64_t max_iterations() const { return limits_.max_loop_iterations; }

  absl::StatusOr<Value> MakeList(std::vector<Value> items, const Node& n, bool tuple = false) {
    Value v = Value::List(std::move(items), tuple);
    if (v.depth() > limits_.max_depth) {
      return Error(n, absl::StrCat("value nested deeper than ", limits_.max_depth, " levels"));
    }
    return v;
  }
  absl::StatusOr<Value> MakeDict(std::shared_ptr<Object> o, const Node& n) {
    Value v = Value::Dict(std::move(o));
    if (v.depth() > limits_.max_depth) {
      return Error(n, absl::StrCat("value nested deeper than ", limits_.max_depth, " levels"));
    }
    return v;
  }
  Value MakeNamespace() {
    auto o = std::make_shared<Object>();
    namespaces_.push_back(o);
    return Value::Namespace(std::move(o));
  }

  absl::StatusOr<Value> GetAttr(const Value& obj, const std::string& name, const Node& n);
  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key, const Node& n);
  absl::Status Iterate(const Value& v, const Node& n, std::vector<Value>* items);
  absl::StatusOr<bool> Contains(const Value& container, const Value& item, const Node& n);
  absl::StatusOr<int> Compare(const Value& a, const Value& b, const Node& n, int depth = 0);
  absl::StatusOr<Value> ApplyFilter(const std::string& name, const Value& subject,
                                    const CallArgs& args, const Node& n);
  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& subject,
                                 const CallArgs& args, const Node& n);
  absl::StatusOr<Value> CallValue(const Value& fn, const CallArgs& args, const Node& n);

 private:
  class ScopeGuard {
   public:
    ScopeGuard(Renderer* r, Scope* s) : r_(r) { r_->scopes_.push_back(s); }
    ~ScopeGuard() { r_->scopes_.pop_back(); }

   private:
    Renderer* r_;
  };

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      for (const auto& [k, v] : **it) {
        if (k == name) return v;
      }
    }
    return Value::Undefined(absl::StrCat("'", name, "' is undefined"));
  }

  absl::Status Append(std::string* out, std::string_view s, const Node& n) {
    if (out->size() + s.size() > limits_.max_output_bytes) {
      return Error(n, absl::StrCat("rendered output exceeds the limit of ",
                                   limits_.max_output_bytes, " bytes"));
    }
    out->append(s);
    return absl::OkStatus();
  }

  absl::Status Assign(const std::vector<std::string>& names, Value value, const Node& n) {
    if (names.size() == 1) {
      SetInScope(scopes_.back(), names[0], std::move(value));
      return absl::OkStatus();
    }
    std::vector<Value> parts;
    MOE_RETURN_IF_ERROR(Iterate(value, n, &parts));
    if (parts.size() != names.size()) {
      return Error(n, absl::StrCat(parts.size() > names.size() ? "too many" : "not enough",
                                   " values to unpack (expected ", names.size(), ", got ",
                                   parts.size(), ")"));
    }
    for (size_t i = 0; i < names.size(); ++i) SetInScope(scopes_.back(), names[i], parts[i]);
    return absl::OkStatus();
  }

  absl::StatusOr<Flow> Exec(const Body& body, std::string* out) {
    for (const NodePtr& n : body) {
      MOE_ASSIGN_OR_RETURN(Flow f, ExecNode(*n, out));
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  absl::StatusOr<Flow> ExecNode(const Node& n, std::string* out);
  absl::StatusOr<Flow> ExecFor(const Node& n, std::string* out);
  absl::StatusOr<Value> Eval(const Node& n);
  absl::StatusOr<CallArgs> EvalArgs(const Node& n);
  absl::StatusOr<Value> EvalCall(const Node& n);
  absl::StatusOr<Value> CallMethod(const Value& obj, const std::string& name,
                                   const CallArgs& args, const Node& n);
  absl::StatusOr<Value> CallMacro(const Node& macro, const CallArgs& args, const Node& n);
  absl::StatusOr<Value> BinaryOp(const std::string& op, const Value& l, const Value& r,
                                 const Node& n);
  absl::StatusOr<Value> Slice(const Value& obj, const Node& n);

  const TemplateProgram& prog_;
  const ChatTemplateLimits& limits_;
  Scope root_;
  std::vector<Scope*> scopes_;
  int64_t iterations_ = 0;
  int call_depth_ = 0;
  std::vector<std::shared_ptr<Object>> namespaces_;
};

// Globals ------------------------------------------------------------------------------------

absl::StatusOr<Value> RaiseException(Renderer& r, const Node& n, const CallArgs& args) {
  const Value* msg = args.Get(0, "message");
  // The message is the template author's, verbatim: the API shows it to the client.
  return absl::InvalidArgumentError(msg ? PyStr(*msg) : std::string("raise_exception called"));
}

absl::StatusOr<Value> MakeNamespaceFn(Renderer& r, const Node& n, const CallArgs& args) {
  Value ns = r.MakeNamespace();
  for (const Value& p : args.pos) {
    if (!p.is(Kind::kDict)) return r.Error(n, "namespace() takes keyword arguments or a dict");
    for (const auto& [k, v] : p.dict().items) ns.ns().Set(k, v);
  }
  for (const auto& [k, v] : args.kw) ns.ns().Set(k, v);
  return ns;
}

absl::StatusOr<Value> DictFn(Renderer& r, const Node& n, const CallArgs& args) {
  auto o = std::make_shared<Object>();
  for (const Value& p : args.pos) {
    if (!p.is(Kind::kDict)) return r.Error(n, "dict() takes keyword arguments or a dict");
    for (const auto& [k, v] : p.dict().items) o->Set(k, v);
  }
  for (const auto& [k, v] : args.kw) o->Set(k, v);
  return r.MakeDict(std::move(o), n);
}

absl::StatusOr<Value> RangeFn(Renderer& r, const Node& n, const CallArgs& args) {
  if (args.pos.empty() || args.pos.size() > 3 || !args.kw.empty()) {
    return r.Error(n, "range() takes 1 to 3 integer arguments");
  }
  int64_t v[3] = {0, 0, 1};
  for (size_t i = 0; i < args.pos.size(); ++i) {
    if (!args.pos[i].is_integral()) {
      return r.Error(n, absl::StrCat("'", TypeName(args.pos[i]),
                                     "' object cannot be interpreted as an integer"));
    }
  }
  if (args.pos.size() == 1) {
    v[1] = args.pos[0].int_value();
  } else {
    v[0] = args.pos[0].int_value();
    v[1] = args.pos[1].int_value();
    if (args.pos.size() == 3) v[2] = args.pos[2].int_value();
  }
  if (v[2] == 0) return r.Error(n, "range() arg 3 must not be zero");
  std::vector<Value> items;
  for (int64_t i = v[0]; v[2] > 0 ? i < v[1] : i > v[1]; i += v[2]) {
    if (static_cast<int64_t>(items.size()) >= r.max_iterations()) {
      return r.Error(n, absl::StrCat("range() longer than the loop limit of ",
                                     r.max_iterations()));
    }
    items.push_back(Value::Int(i));
    if ((v[2] > 0 && i > std::numeric_limits<int64_t>::max() - v[2]) ||
        (v[2] < 0 && i < std::numeric_limits<int64_t>::min() - v[2])) {
      break;
    }
  }
  return r.MakeList(std::move(items), n);
}

absl::StatusOr<Value> StrftimeNow(Renderer& r, const Node& n, const CallArgs& args) {
  const Value* fmt = args.Get(0, "format");
  if (fmt == nullptr || !fmt->is(Kind::kString)) {
    return r.Error(n, "strftime_now() takes a format string");
  }
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[512];
  size_t len = std::strftime(buf, sizeof(buf), fmt->str().c_str(), &tm);
  return Value::Str(std::string(buf, len));
}

Value Native(const char* name, NativeFn fn) {
  auto f = std::make_shared<Function>();
  f->name = name;
  f->native = fn;
  return Value::Func(std::move(f));
}

absl::StatusOr<std::string> Renderer::Run(const Value& context) {
  root_.emplace_back("raise_exception", Native("raise_exception", RaiseException));
  root_.emplace_back("namespace", Native("namespace", MakeNamespaceFn));
  root_.emplace_back("dict", Native("dict", DictFn));
  root_.emplace_back("range", Native("range", RangeFn));
  root_.emplace_back("strftime_now", Native("strftime_now", StrftimeNow));
  for (const auto& [k, v] : context.dict().items) SetInScope(&root_, k, v);
  scopes_.push_back(&root_);
  std::string out;
  MOE_ASSIGN_OR_RETURN(Flow flow, Exec(prog_.body, &out));
  (void)flow;
  return out;
}

// Statements ---------------------------------------------------------------------------------

absl::StatusOr<Flow> Renderer::ExecNode(const Node& n, std::string* out) {
  switch (n.kind) {
    case NodeKind::kText:
      MOE_RETURN_IF_ERROR(Append(out, n.str, n));
      return Flow::kNormal;
    case NodeKind::kOutput: {
      MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
      if (v.is(Kind::kString)) {
        MOE_RETURN_IF_ERROR(Append(out, v.str(), n));
      } else {
        MOE_RETURN_IF_ERROR(Append(out, PyStr(v), n));
      }
      return Flow::kNormal;
    }
    case NodeKind::kIf:
      for (size_t i = 0; i < n.kids.size(); ++i) {
        MOE_ASSIGN_OR_RETURN(Value c, Eval(*n.kids[i]));
        if (Truthy(c)) return Exec(n.bodies[i], out);
      }
      if (n.bodies.size() > n.kids.size()) return Exec(n.bodies.back(), out);
      return Flow::kNormal;
    case NodeKind::kFor: return ExecFor(n, out);
    case NodeKind::kSet: {
      MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
      if (!n.str.empty()) {
        Value target = Lookup(n.names[0]);
        if (!target.is(Kind::kNamespace)) {
          return Error(n, "cannot assign attribute on non-namespace object");
        }
        if (!n.str.empty() && n.str[0] == '_') {
          return Error(n, "chat templates cannot store underscore-prefixed attributes on a "
                          "namespace");
        }
        target.ns().Set(n.str, std::move(v));
        return Flow::kNormal;
      }
      MOE_RETURN_IF_ERROR(Assign(n.names, std::move(v), n));
      return Flow::kNormal;
    }
    case NodeKind::kSetBlock: {
      std::string s;
      MOE_ASSIGN_OR_RETURN(Flow f, Exec(n.bodies[0], &s));
      MOE_RETURN_IF_ERROR(Assign(n.names, Value::Str(std::move(s)), n));
      return f;
    }
    case NodeKind::kMacro: {
      auto f = std::make_shared<Function>();
      f->name = n.str;
      f->macro = &n;
      SetInScope(scopes_.back(), n.str, Value::Func(std::move(f)));
      return Flow::kNormal;
    }
    case NodeKind::kBreak: return Flow::kBreak;
    case NodeKind::kContinue: return Flow::kContinue;
    case NodeKind::kScope: return Exec(n.bodies[0], out);
    default: return Error(n, "internal error: expression used as a statement");
  }
}

absl::StatusOr<Flow> Renderer::ExecFor(const Node& n, std::string* out) {
  MOE_ASSIGN_OR_RETURN(Value seq, Eval(*n.kids[0]));
  std::vector<Value> items;
  MOE_RETURN_IF_ERROR(Iterate(seq, *n.kids[0], &items));
  auto count = [&]() -> absl::Status {
    if (++iterations_ > limits_.max_loop_iterations) {
      return Error(n, absl::StrCat("loop iterations exceed the limit of ",
                                   limits_.max_loop_iterations));
    }
    return absl::OkStatus();
  };
  if (n.kids[1]) {
    std::vector<Value> kept;
    for (Value& item : items) {
      MOE_RETURN_IF_ERROR(count());
      Scope scope;
      ScopeGuard guard(this, &scope);
      MOE_RETURN_IF_ERROR(Assign(n.names, item, n));
      MOE_ASSIGN_OR_RETURN(Value keep, Eval(*n.kids[1]));
      if (Truthy(keep)) kept.push_back(std::move(item));
    }
    items = std::move(kept);
  }
  if (items.empty()) {
    if (n.bodies.size() > 1) {
      MOE_ASSIGN_OR_RETURN(Flow f, Exec(n.bodies[1], out));
      (void)f;
    }
    return Flow::kNormal;
  }
  const int64_t len = static_cast<int64_t>(items.size());
  for (int64_t i = 0; i < len; ++i) {
    MOE_RETURN_IF_ERROR(count());
    auto loop = std::make_shared<Object>();
    loop->items = {{"index", Value::Int(i + 1)},       {"index0", Value::Int(i)},
                   {"revindex", Value::Int(len - i)},  {"revindex0", Value::Int(len - i - 1)},
                   {"first", Value::Bool(i == 0)},     {"last", Value::Bool(i == len - 1)},
                   {"length", Value::Int(len)},        {"depth", Value::Int(1)},
                   {"depth0", Value::Int(0)}};
    if (i > 0) loop->items.emplace_back("previtem", items[i - 1]);
    if (i + 1 < len) loop->items.emplace_back("nextitem", items[i + 1]);
    Scope scope;
    ScopeGuard guard(this, &scope);
    MOE_RETURN_IF_ERROR(Assign(n.names, items[i], n));
    scope.emplace_back("loop", Value::Dict(std::move(loop)));
    MOE_ASSIGN_OR_RETURN(Flow f, Exec(n.bodies[0], out));
    if (f == Flow::kBreak) break;
  }
  return Flow::kNormal;
}

// Expressions --------------------------------------------------------------------------------

absl::StatusOr<CallArgs> Renderer::EvalArgs(const Node& n) {
  CallArgs args;
  size_t first_kw = 1 + n.num_positional;
  for (size_t i = 1; i < n.kids.size(); ++i) {
    MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[i]));
    if (i < first_kw) {
      args.pos.push_back(std::move(v));
    } else {
      args.kw.emplace_back(n.names[i - first_kw], std::move(v));
    }
  }
  return args;
}

absl::StatusOr<Value> Renderer::Eval(const Node& n) {
  switch (n.kind) {
    case NodeKind::kLiteral: return n.literal;
    case NodeKind::kName: return Lookup(n.str);
    case NodeKind::kListLit:
    case NodeKind::kTupleLit: {
      std::vector<Value> items;
      items.reserve(n.kids.size());
      for (const NodePtr& k : n.kids) {
        MOE_ASSIGN_OR_RETURN(Value v, Eval(*k));
        items.push_back(std::move(v));
      }
      return MakeList(std::move(items), n, n.kind == NodeKind::kTupleLit);
    }
    case NodeKind::kDictLit: {
      auto o = std::make_shared<Object>();
      for (size_t i = 0; i + 1 < n.kids.size(); i += 2) {
        MOE_ASSIGN_OR_RETURN(Value k, Eval(*n.kids[i]));
        MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[i + 1]));
        if (!k.is(Kind::kString)) return Error(*n.kids[i], "dict keys must be strings");
        o->Set(k.str(), std::move(v));
      }
      return MakeDict(std::move(o), n);
    }
    case NodeKind::kAttr: {
      MOE_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
      return GetAttr(obj, n.str, n);
    }
    case NodeKind::kSubscript: {
      MOE_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
      MOE_ASSIGN_OR_RETURN(Value key, Eval(*n.kids[1]));
      return GetItem(obj, key, n);
    }
    case NodeKind::kSlice: {
      MOE_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
      return Slice(obj, n);
    }
    case NodeKind::kCall: return EvalCall(n);
    case NodeKind::kFilter: {
      MOE_ASSIGN_OR_RETURN(Value subject, Eval(*n.kids[0]));
      MOE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(n));
      return ApplyFilter(n.str, subject, args, n);
    }
    case NodeKind::kTest: {
      MOE_ASSIGN_OR_RETURN(Value subject, Eval(*n.kids[0]));
      MOE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(n));
      MOE_ASSIGN_OR_RETURN(bool ok, ApplyTest(n.str, subject, args, n));
      return Value::Bool(ok != n.negated);
    }
    case NodeKind::kNot: {
      MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
      return Value::Bool(!Truthy(v));
    }
    case NodeKind::kNeg:
    case NodeKind::kPos: {
      MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
      if (v.is_undefined()) return UndefinedError(n, v);
      bool neg = n.kind == NodeKind::kNeg;
      if (v.is_integral()) {
        if (neg && v.int_value() == std::numeric_limits<int64_t>::min()) {
          return Error(n, "integer overflow");
        }
        return Value::Int(neg ? -v.int_value() : v.int_value());
      }
      if (v.is(Kind::kFloat)) return Value::Float(neg ? -v.number() : v.number());
      return Error(n, absl::StrCat("bad operand type for unary ", neg ? "-" : "+", ": '",
                                   TypeName(v), "'"));
    }
    case NodeKind::kAnd:
    case NodeKind::kOr: {
      MOE_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
      if (Truthy(l) == (n.kind == NodeKind::kOr)) return l;
      return Eval(*n.kids[1]);
    }
    case NodeKind::kBinary: {
      MOE_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
      MOE_ASSIGN_OR_RETURN(Value r, Eval(*n.kids[1]));
      return BinaryOp(n.str, l, r, n);
    }
    case NodeKind::kCompare: {
      MOE_ASSIGN_OR_RETURN(Value left, Eval(*n.kids[0]));
      for (size_t i = 0; i < n.names.size(); ++i) {
        MOE_ASSIGN_OR_RETURN(Value right, Eval(*n.kids[i + 1]));
        const std::string& op = n.names[i];
        bool ok;
        if (op == "==" || op == "!=") {
          ok = PyEquals(left, right) == (op == "==");
        } else if (op == "in" || op == "not in") {
          MOE_ASSIGN_OR_RETURN(bool in, Contains(right, left, n));
          ok = in == (op == "in");
        } else {
          MOE_ASSIGN_OR_RETURN(int c, Compare(left, right, n));
          ok = op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
        }
        if (!ok) return Value::Bool(false);
        left = std::move(right);
      }
      return Value::Bool(true);
    }
    case NodeKind::kCondExpr: {
      MOE_ASSIGN_OR_RETURN(Value c, Eval(*n.kids[0]));
      if (Truthy(c)) return Eval(*n.kids[1]);
      if (n.kids[2]) return Eval(*n.kids[2]);
      return Value::Undefined(
          "the inline if-expression evaluated to false and no else section was defined");
    }
    default: return Error(n, "internal error: statement used as an expression");
  }
}

absl::StatusOr<Value> Renderer::GetAttr(const Value& obj, const std::string& name,
                                        const Node& n) {
  if (obj.is_undefined()) return UndefinedError(n, obj);
  if (obj.is(Kind::kDict) || obj.is(Kind::kNamespace)) {
    const Object& o = obj.is(Kind::kDict) ? obj.dict() : obj.ns();
    if (const Value* v = o.Find(name)) return *v;
  }
  return Value::Undefined(absl::StrCat("'", TypeName(obj), " object' has no attribute '", name,
                                       "'"));
}

absl::StatusOr<Value> Renderer::GetItem(const Value& obj, const Value& key, const Node& n) {
  if (obj.is_undefined()) return UndefinedError(n, obj);
  if (key.is(Kind::kString)) return GetAttr(obj, key.str(), n);
  if (key.is_integral() && (obj.is(Kind::kList) || obj.is(Kind::kString))) {
    int64_t i = key.int_value();
    if (obj.is(Kind::kList)) {
      const auto& items = obj.list().items;
      int64_t size = static_cast<int64_t>(items.size());
      if (i < 0) i += size;
      if (i >= 0 && i < size) return items[i];
    } else if (IsAscii(obj.str())) {
      int64_t size = static_cast<int64_t>(obj.str().size());
      if (i < 0) i += size;
      if (i >= 0 && i < size) return Value::Str(obj.str().substr(i, 1));
    } else {
      std::u32string u = Decode(obj.str());
      int64_t size = static_cast<int64_t>(u.size());
      if (i < 0) i += size;
      if (i >= 0 && i < size) return Value::Str(Encode(u.substr(i, 1)));
    }
  }
  std::string k;
  PyRepr(key, &k, 0);
  return Value::Undefined(absl::StrCat("'", TypeName(obj), " object' has no attribute ", k));
}

absl::StatusOr<Value> Renderer::Slice(const Value& obj, const Node& n) {
  if (obj.is_undefined()) return UndefinedError(n, obj);
  int64_t bounds[3];
  const int64_t* ptr[3] = {nullptr, nullptr, nullptr};
  for (int i = 0; i < 3; ++i) {
    if (!n.kids[i + 1]) continue;
    MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[i + 1]));
    if (v.is(Kind::kNone)) continue;
    if (!v.is_integral()) {
      return Error(n, "slice indices must be integers or None");
    }
    bounds[i] = v.int_value();
    ptr[i] = &bounds[i];
  }
  int64_t step = ptr[2] ? bounds[2] : 1;
  if (step == 0) return Error(n, "slice step cannot be zero");
  if (obj.is(Kind::kList)) {
    const auto& items = obj.list().items;
    std::vector<Value> out;
    for (int64_t i : SliceIndices(static_cast<int64_t>(items.size()), ptr[0], ptr[1], step)) {
      out.push_back(items[i]);
    }
    return Value::List(std::move(out), obj.list().tuple);
  }
  if (obj.is(Kind::kString)) {
    std::u32string u = Decode(obj.str());
    std::u32string out;
    for (int64_t i : SliceIndices(static_cast<int64_t>(u.size()), ptr[0], ptr[1], step)) {
      out.push_back(u[i]);
    }
    return Value::Str(Encode(out));
  }
  return Value::Undefined(absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
}

absl::Status Renderer::Iterate(const Value& v, const Node& n, std::vector<Value>* items) {
  switch (v.kind()) {
    case Kind::kUndefined: return absl::OkStatus();
    case Kind::kList: *items = v.list().items; return absl::OkStatus();
    case Kind::kDict:
      for (const auto& [k, item] : v.dict().items) items->push_back(Value::Str(k));
      return absl::OkStatus();
    case Kind::kString: {
      const std::string& s = v.str();
      for (size_t i = 0; i < s.size();) {
        size_t start = i;
        NextCodePoint(s, &i);
        items->push_back(Value::Str(s.substr(start, i - start)));
      }
      return absl::OkStatus();
    }
    default: return Error(n, absl::StrCat("'", TypeName(v), "' object is not iterable"));
  }
}

absl::StatusOr<bool> Renderer::Contains(const Value& container, const Value& item,
                                        const Node& n) {
  switch (container.kind()) {
    case Kind::kUndefined: return false;
    case Kind::kString:
      if (!item.is(Kind::kString)) {
        return Error(n, absl::StrCat("'in <string>' requires string as left operand, not ",
                                     TypeName(item)));
      }
      return container.str().find(item.str()) != std::string::npos;
    case Kind::kList:
      for (const Value& v : container.list().items) {
        if (PyEquals(v, item)) return true;
      }
      return false;
    case Kind::kDict:
      return item.is(Kind::kString) && container.dict().Find(item.str()) != nullptr;
    default:
      return Error(n, absl::StrCat("argument of type '", TypeName(container),
                                   "' is not iterable"));
  }
}

absl::StatusOr<int> Renderer::Compare(const Value& a, const Value& b, const Node& n,
                                      int depth) {
  if (a.is_undefined()) return UndefinedError(n, a);
  if (b.is_undefined()) return UndefinedError(n, b);
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) {
      return a.int_value() < b.int_value() ? -1 : a.int_value() > b.int_value() ? 1 : 0;
    }
    double x = a.number(), y = b.number();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is(Kind::kString) && b.is(Kind::kString)) {
    int c = a.str().compare(b.str());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is(Kind::kList) && b.is(Kind::kList) && depth < 256) {
    const auto& x = a.list().items;
    const auto& y = b.list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (PyEquals(x[i], y[i])) continue;
      return Compare(x[i], y[i], n, depth + 1);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  return Error(n, absl::StrCat("'<' not supported between instances of '", TypeName(a),
                               "' and '", TypeName(b), "'"));
}

bool CheckedMul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

absl::StatusOr<Value> Renderer::BinaryOp(const std::string& op, const Value& l, const Value& r,
                                         const Node& n) {
  if (op == "~") {
    std::string s = PyStr(l);
    if (s.size() + PyStr(r).size() > limits_.max_output_bytes) return TooLarge(n);
    PyStr(r, &s);
    return Value::Str(std::move(s));
  }
  if (l.is_undefined()) return UndefinedError(n, l);
  if (r.is_undefined()) return UndefinedError(n, r);
  auto type_error = [&]() {
    return Error(n, absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(l),
                                 "' and '", TypeName(r), "'"));
  };
  if (l.is_number() && r.is_number()) {
    bool ints = l.is_integral() && r.is_integral();
    int64_t a = l.int_value(), b = r.int_value(), c = 0;
    double x = l.number(), y = r.number();
    if (op == "+") {
      if (!ints) return Value::Float(x + y);
      if (__builtin_add_overflow(a, b, &c)) return Error(n, "integer overflow");
      return Value::Int(c);
    }
    if (op == "-") {
      if (!ints) return Value::Float(x - y);
      if (__builtin_sub_overflow(a, b, &c)) return Error(n, "integer overflow");
      return Value::Int(c);
    }
    if (op == "*") {
      if (!ints) return Value::Float(x * y);
      if (!CheckedMul(a, b, &c)) return Error(n, "integer overflow");
      return Value::Int(c);
    }
    if (op == "/") {
      if (y == 0) return Error(n, "division by zero");
      return Value::Float(x / y);
    }
    if (op == "//" || op == "%") {
      if (ints ? b == 0 : y == 0) {
        return Error(n, op == "%" ? "integer modulo by zero" : "integer division by zero");
      }
      if (ints) {
        if (a == std::numeric_limits<int64_t>::min() && b == -1) {
          if (op == "%") return Value::Int(0);
          return Error(n, "integer overflow");
        }
        int64_t q = a / b, m = a % b;
        if (m != 0 && ((m < 0) != (b < 0))) {
          --q;
          m += b;
        }
        return Value::Int(op == "//" ? q : m);
      }
      double m = std::fmod(x, y);
      if (m != 0 && ((m < 0) != (y < 0))) m += y;
      if (op == "%") return Value::Float(m);
      return Value::Float(std::floor(x / y));
    }
    if (op == "**") {
      if (ints && b >= 0) {
        int64_t result = 1, base = a;
        for (int64_t e = b; e > 0; e >>= 1) {
          if ((e & 1) && !CheckedMul(result, base, &result)) return Error(n, "integer overflow");
          if (e > 1 && !CheckedMul(base, base, &base)) return Error(n, "integer overflow");
        }
        return Value::Int(result);
      }
      if (x == 0 && y < 0) return Error(n, "0.0 cannot be raised to a negative power");
      return Value::Float(std::pow(x, y));
    }
    return type_error();
  }
  if (op == "+") {
    if (l.is(Kind::kString) && r.is(Kind::kString)) {
      if (l.str().size() + r.str().size() > limits_.max_output_bytes) return TooLarge(n);
      return Value::Str(l.str() + r.str());
    }
    if (l.is(Kind::kList) && r.is(Kind::kList)) {
      std::vector<Value> items = l.list().items;
      items.insert(items.end(), r.list().items.begin(), r.list().items.end());
      return MakeList(std::move(items), n, l.list().tuple);
    }
    if (l.is(Kind::kString)) {
      return Error(n, absl::StrCat("can only concatenate str (not \"", TypeName(r),
                                   "\") to str"));
    }
    return type_error();
  }
  if (op == "*") {
    const Value* seq = l.is_integral() ? &r : &l;
    const Value* times = l.is_integral() ? &l : &r;
    if (times->is_integral() && (seq->is(Kind::kString) || seq->is(Kind::kList))) {
      int64_t k = std::max<int64_t>(0, times->int_value());
      size_t unit = seq->is(Kind::kString) ? seq->str().size() : seq->list().items.size();
      if (unit == 0) k = 0;
      if (unit != 0 && static_cast<uint64_t>(k) > limits_.max_output_bytes / unit) {
        return TooLarge(n);
      }
      if (seq->is(Kind::kString)) {
        std::string s;
        s.reserve(unit * k);
        for (int64_t i = 0; i < k; ++i) s += seq->str();
        return Value::Str(std::move(s));
      }
      std::vector<Value> items;
      for (int64_t i = 0; i < k; ++i) {
        items.insert(items.end(), seq->list().items.begin(), seq->list().items.end());
      }
      return MakeList(std::move(items), n, seq->list().tuple);
    }
    return type_error();
  }
  if (op == "%" && l.is(Kind::kString)) {
    CallArgs args;
    if (r.is(Kind::kList) && r.list().tuple) {
      args.pos = r.list().items;
    } else {
      args.pos.push_back(r);
    }
    return ApplyFilter("format", l, args, n);
  }
  return type_error();
}

absl::StatusOr<Value> Renderer::EvalCall(const Node& n) {
  const Node& callee = *n.kids[0];
  if (callee.kind == NodeKind::kAttr) {
    MOE_ASSIGN_OR_RETURN(Value obj, Eval(*callee.kids[0]));
    MOE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(n));
    return CallMethod(obj, callee.str, args, n);
  }
  MOE_ASSIGN_OR_RETURN(Value fn, Eval(callee));
  MOE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(n));
  return CallValue(fn, args, n);
}

absl::StatusOr<Value> Renderer::CallValue(const Value& fn, const CallArgs& args, const Node& n) {
  if (fn.is_undefined()) return UndefinedError(n, fn);
  if (!fn.is(Kind::kFunction)) {
    return Error(n, absl::StrCat("'", TypeName(fn), "' object is not callable"));
  }
  if (fn.fn().native) return fn.fn().native(*this, n, args);
  return CallMacro(*fn.fn().macro, args, n);
}

absl::StatusOr<Value> Renderer::CallMacro(const Node& macro, const CallArgs& args,
                                          const Node& n) {
  const size_t num_params = macro.names.size();
  if (args.pos.size() > num_params) {
    return Error(n, absl::StrCat("macro '", macro.str, "' takes not more than ", num_params,
                                 " argument(s)"));
  }
  for (const auto& [k, v] : args.kw) {
    if (std::find(macro.names.begin(), macro.names.end(), k) == macro.names.end()) {
      return Error(n, absl::StrCat("macro '", macro.str, "' takes no keyword argument '", k,
                                   "'"));
    }
  }
  if (call_depth_ >= limits_.max_depth / 4) {
    return Error(n, absl::StrCat("macro calls nested deeper than ", limits_.max_depth / 4,
                                 " levels"));
  }
  Scope scope;
  for (size_t i = 0; i < num_params; ++i) {
    const Value* v = args.Get(i, macro.names[i]);
    if (v) {
      scope.emplace_back(macro.names[i], *v);
    } else if (macro.kids[i]) {
      MOE_ASSIGN_OR_RETURN(Value d, Eval(*macro.kids[i]));
      scope.emplace_back(macro.names[i], std::move(d));
    } else {
      scope.emplace_back(macro.names[i], Value::Undefined(absl::StrCat(
                                             "parameter '", macro.names[i],
                                             "' was not provided")));
    }
  }
  std::vector<Scope*> saved = std::move(scopes_);
  scopes_ = {&root_, &scope};
  ++call_depth_;
  std::string out;
  absl::StatusOr<Flow> flow = Exec(macro.bodies[0], &out);
  --call_depth_;
  scopes_ = std::move(saved);
  if (!flow.ok()) return flow.status();
  return Value::Str(std::move(out));
}

// Filters, tests and methods -----------------------------------------------------------------

bool ArgBool(const CallArgs& args, size_t i, std::string_view name, bool dflt) {
  const Value* v = args.Get(i, name);
  return v ? Truthy(*v) : dflt;
}

std::vector<std::string> SplitDots(const std::string& path) {
  std::vector<std::string> parts;
  size_t b = 0;
  while (true) {
    size_t e = path.find('.', b);
    parts.push_back(path.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return parts;
}

// Jinja's make_attrgetter: "a.b.0" looks up a, then b, then index 0.
absl::StatusOr<Value> GetPath(Renderer& r, const Value& obj, const std::string& path,
                              const Node& n) {
  Value cur = obj;
  for (const std::string& part : SplitDots(path)) {
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), IsDigit);
    Value key = digits ? Value::Int(std::strtoll(part.c_str(), nullptr, 10)) : Value::Str(part);
    MOE_ASSIGN_OR_RETURN(cur, r.GetItem(cur, key, n));
  }
  return cur;
}

std::string Capitalize(std::string_view s) {
  std::u32string u = Decode(s);
  for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? ToUpperCp(u[i]) : ToLowerCp(u[i]);
  return Encode(u);
}

// Jinja's do_title: capitalise each run that follows one of "-", whitespace, "(", "{", "[", "<".
std::string Title(std::string_view s) {
  std::u32string u = Decode(s);
  bool start = true;
  for (char32_t& c : u) {
    bool sep = IsPySpace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      start = true;
    } else {
      c = start ? ToUpperCp(c) : ToLowerCp(c);
      start = false;
    }
  }
  return Encode(u);
}

// Python str.replace; an empty `old` inserts `new` between code points.
bool PyReplace(std::string_view s, std::string_view old, std::string_view repl, int64_t count,
               size_t max, std::string* out) {
  Builder b(max);
  if (old.empty()) {
    int64_t done = 0;
    for (size_t i = 0; i <= s.size();) {
      if ((count < 0 || done < count)) {
        if (!b.Add(repl)) return false;
        ++done;
      }
      if (i == s.size()) break;
      size_t start = i;
      NextCodePoint(s, &i);
      if (!b.Add(s.substr(start, i - start))) return false;
    }
    *out = b.Take();
    return true;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t f = s.find(old, pos);
    if (f == std::string_view::npos) break;
    if (!b.Add(s.substr(pos, f - pos)) || !b.Add(repl)) return false;
    pos = f + old.size();
    ++done;
  }
  if (!b.Add(s.substr(pos))) return false;
  *out = b.Take();
  return true;
}

// Python str.split / str.rsplit.
std::vector<std::string> PySplit(const std::string& s, const std::string* sep, int64_t maxsplit,
                                 bool from_right) {
  std::vector<std::string> parts;
  if (sep == nullptr) {
    std::u32string u = Decode(s);
    std::vector<std::u32string> words;
    if (!from_right) {
      size_t i = 0;
      while (i < u.size()) {
        while (i < u.size() && IsPySpace(u[i])) ++i;
        if (i == u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          size_t e = u.size();
          while (e > i && IsPySpace(u[e - 1])) --e;
          words.push_back(u.substr(i, e - i));
          break;
        }
        size_t b = i;
        while (i < u.size() && !IsPySpace(u[i])) ++i;
        words.push_back(u.substr(b, i - b));
      }
    } else {
      size_t i = u.size();
      while (i > 0) {
        while (i > 0 && IsPySpace(u[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          size_t b = 0;
          while (b < i && IsPySpace(u[b])) ++b;
          words.push_back(u.substr(b, i - b));
          break;
        }
        size_t e = i;
        while (i > 0 && !IsPySpace(u[i - 1])) --i;
        words.push_back(u.substr(i, e - i));
      }
      std::reverse(words.begin(), words.end());
    }
    for (const auto& w : words) parts.push_back(Encode(w));
    return parts;
  }
  if (!from_right) {
    size_t pos = 0;
    while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
      size_t f = s.find(*sep, pos);
      if (f == std::string::npos) break;
      parts.push_back(s.substr(pos, f - pos));
      pos = f + sep->size();
    }
    parts.push_back(s.substr(pos));
    return parts;
  }
  size_t end = s.size();
  while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
    if (end < sep->size()) break;
    size_t f = s.rfind(*sep, end - sep->size());
    if (f == std::string::npos) break;
    parts.push_back(s.substr(f + sep->size(), end - f - sep->size()));
    end = f;
  }
  parts.push_back(s.substr(0, end));
  std::reverse(parts.begin(), parts.end());
  return parts;
}

std::vector<std::string> PySplitLines(std::string_view s, bool keepends) {
  std::vector<std::string> lines;
  size_t b = 0, i = 0;
  while (i < s.size()) {
    size_t start = i;
    char32_t c = NextCodePoint(s, &i);
    bool brk = c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= 0x1C && c <= 0x1E) ||
               c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) continue;
    size_t end = i;
    if (c == '\r' && i < s.size() && s[i] == '\n') end = ++i;
    lines.emplace_back(s.substr(b, (keepends ? end : start) - b));
    b = i;
  }
  if (b < s.size()) lines.emplace_back(s.substr(b));
  return lines;
}

absl::StatusOr<std::string> NeedString(Renderer& r, const Value* v, const char* what,
                                       const Node& n) {
  if (v == nullptr || !v->is(Kind::kString)) {
    return r.Error(n, absl::StrCat(what, " must be a string"));
  }
  return v->str();
}

// Python str.format with automatic/positional/named fields and !r/!s; no format specs.
absl::StatusOr<Value> PyFormat(Renderer& r, const std::string& fmt, const CallArgs& args,
                               const Node& n) {
  Builder b(r.max_bytes());
  size_t auto_index = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '}' ) {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') ++i;
      else return r.Error(n, "format(): single '}' encountered in format string");
      if (!b.Add("}")) return r.TooLarge(n);
      continue;
    }
    if (c != '{') {
      if (!b.Add(std::string_view(&fmt[i], 1))) return r.TooLarge(n);
      continue;
    }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
      ++i;
      if (!b.Add("{")) return r.TooLarge(n);
      continue;
    }
    size_t close = fmt.find('}', i);
    if (close == std::string::npos) return r.Error(n, "format(): unmatched '{'");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    bool repr = false;
    if (field.size() >= 2 && field[field.size() - 2] == '!') {
      repr = field.back() == 'r';
      field.resize(field.size() - 2);
    }
    if (field.find(':') != std::string::npos) {
      return r.Error(n, "format(): format specifications are not supported");
    }
    const Value* v = nullptr;
    if (field.empty()) {
      v = auto_index < args.pos.size() ? &args.pos[auto_index] : nullptr;
      ++auto_index;
    } else if (std::all_of(field.begin(), field.end(), IsDigit)) {
      size_t k = std::strtoull(field.c_str(), nullptr, 10);
      v = k < args.pos.size() ? &args.pos[k] : nullptr;
    } else {
      for (const auto& [name, val] : args.kw) {
        if (name == field) v = &val;
      }
    }
    if (v == nullptr) return r.Error(n, absl::StrCat("format(): no argument for '{", field, "}'"));
    std::string s;
    if (repr) {
      PyRepr(*v, &s, 0);
    } else {
      PyStr(*v, &s);
    }
    if (!b.Add(s)) return r.TooLarge(n);
  }
  return Value::Str(b.Take());
}

// printf-style formatting for the `format` filter and `str % args`: %s %r %d %i %f %%.
absl::StatusOr<Value> PercentFormat(Renderer& r, const std::string& fmt, const CallArgs& args,
                                    const Node& n) {
  Builder b(r.max_bytes());
  size_t next = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      if (!b.Add(std::string_view(&fmt[i], 1))) return r.TooLarge(n);
      continue;
    }
    if (++i >= fmt.size()) return r.Error(n, "format: incomplete format");
    char spec = fmt[i];
    if (spec == '%') {
      if (!b.Add("%")) return r.TooLarge(n);
      continue;
    }
    if (next >= args.pos.size()) return r.Error(n, "format: not enough arguments for format string");
    const Value& v = args.pos[next++];
    std::string s;
    if (spec == 's') {
      PyStr(v, &s);
    } else if (spec == 'r') {
      PyRepr(v, &s, 0);
    } else if (spec == 'd' || spec == 'i') {
      if (!v.is_number()) return r.Error(n, "format: %d format: a number is required");
      s = std::to_string(v.is_integral() ? v.int_value() : static_cast<int64_t>(v.number()));
    } else if (spec == 'f') {
      if (!v.is_number()) return r.Error(n, "format: %f format: a number is required");
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%f", v.number());
      s = buf;
    } else {
      return r.Error(n, absl::StrCat("format: unsupported format character '",
                                     std::string(1, spec), "'"));
    }
    if (!b.Add(s)) return r.TooLarge(n);
  }
  return Value::Str(b.Take());
}

bool ParsePyInt(std::string s, int base, int64_t* out) {
  s = PyStrip(s, nullptr, true, true);
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  if (s.empty()) return false;
  size_t i = s[0] == '+' || s[0] == '-' ? 1 : 0;
  if (base == 16 && s.size() > i + 1 && s[i] == '0' && (s[i + 1] | 0x20) == 'x') {
    s.erase(i, 2);
  }
  if (s[0] == '+') s.erase(0, 1);
  auto res = std::from_chars(s.data(), s.data() + s.size(), *out, base);
  return res.ec == std::errc() && res.ptr == s.data() + s.size();
}

bool ParsePyFloat(const std::string& text, double* out) {
  std::string s = PyStrip(text, nullptr, true, true);
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size();
}

std::string HtmlEscape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out.push_back(c);
    }
  }
  return out;
}

// Sorting needs one ordering over all keys: all numbers, all strings or all lists.
absl::Status CheckComparable(const std::vector<Value>& keys, const Node& n) {
  auto cls = [](const Value& v) {
    return v.is_number() ? 0 : v.is(Kind::kString) ? 1 : v.is(Kind::kList) ? 2 : 3;
  };
  for (const Value& k : keys) {
    if (cls(k) == 3 || cls(k) != cls(keys[0])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'<' not supported between instances of '", TypeName(keys[0]), "' and '",
          TypeName(k), "'"));
    }
  }
  return absl::OkStatus();
}

// Sort key for sort/min/max/unique/dictsort: strings fold case unless case-sensitive.
Value SortKey(const Value& v, bool case_sensitive) {
  if (!case_sensitive && v.is(Kind::kString)) return Value::Str(MapCase(v.str(), ToLowerCp));
  return v;
}

absl::StatusOr<Value> Renderer::ApplyFilter(const std::string& name, const Value& v,
                                            const CallArgs& args, const Node& n) {
  auto str_arg = [&](size_t i, std::string_view arg_name, const char* what) {
    return NeedString(*this, args.Get(i, arg_name), what, n);
  };
  if (name == "length" || name == "count") {
    switch (v.kind()) {
      case Kind::kUndefined: return Value::Int(0);
      case Kind::kString: return Value::Int(CodePointCount(v.str()));
      case Kind::kList: return Value::Int(static_cast<int64_t>(v.list().items.size()));
      case Kind::kDict: return Value::Int(static_cast<int64_t>(v.dict().items.size()));
      default: return Error(n, absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
  }
  if (name == "tojson") {
    JsonOptions opt;
    opt.ensure_ascii = ArgBool(args, 0, "ensure_ascii", false);
    const Value* indent = args.Get(1, "indent");
    if (indent && !indent->is(Kind::kNone)) {
      opt.pretty = true;
      opt.item_sep = ",";
      if (indent->is_integral()) {
        opt.indent = std::string(std::clamp<int64_t>(indent->int_value(), 0, 64), ' ');
      } else if (indent->is(Kind::kString)) {
        opt.indent = indent->str();
      } else {
        return Error(n, "tojson: indent must be an integer or a string");
      }
    }
    const Value* seps = args.Get(2, "separators");
    if (seps && !seps->is(Kind::kNone)) {
      if (!seps->is(Kind::kList) || seps->list().items.size() != 2 ||
          !seps->list().items[0].is(Kind::kString) || !seps->list().items[1].is(Kind::kString)) {
        return Error(n, "tojson: separators must be a pair of strings");
      }
      opt.item_sep = seps->list().items[0].str();
      opt.key_sep = seps->list().items[1].str();
    }
    opt.sort_keys = ArgBool(args, 3, "sort_keys", false);
    std::string out;
    absl::Status st = JsonDump(v, opt, 0, &out);
    if (!st.ok()) return Error(n, std::string(st.message()));
    if (out.size() > limits_.max_output_bytes) return TooLarge(n);
    return Value::Str(std::move(out));
  }
  if (name == "string") return v.is(Kind::kString) ? v : Value::Str(PyStr(v));
  if (name == "safe") return v.is(Kind::kString) ? v : Value::Str(PyStr(v));
  if (name == "e" || name == "escape") return Value::Str(HtmlEscape(PyStr(v)));
  if (name == "trim") {
    const Value* chars = args.Get(0, "chars");
    std::string set = chars && chars->is(Kind::kString) ? chars->str() : "";
    bool use_set = chars && chars->is(Kind::kString);
    return Value::Str(PyStrip(PyStr(v), use_set ? &set : nullptr, true, true));
  }
  if (name == "lower") return Value::Str(MapCase(PyStr(v), ToLowerCp));
  if (name == "upper") return Value::Str(MapCase(PyStr(v), ToUpperCp));
  if (name == "capitalize") return Value::Str(Capitalize(PyStr(v)));
  if (name == "title") return Value::Str(Title(PyStr(v)));
  if (name == "replace") {
    MOE_ASSIGN_OR_RETURN(std::string old, str_arg(0, "old", "replace: old"));
    MOE_ASSIGN_OR_RETURN(std::string repl, str_arg(1, "new", "replace: new"));
    const Value* count = args.Get(2, "count");
    int64_t k = count && count->is_integral() ? count->int_value() : -1;
    std::string out;
    if (!PyReplace(PyStr(v), old, repl, k, limits_.max_output_bytes, &out)) return TooLarge(n);
    return Value::Str(std::move(out));
  }
  if (name == "d" || name == "default") {
    const Value* dflt = args.Get(0, "default_value");
    bool boolean = ArgBool(args, 1, "boolean", false);
    if (v.is_undefined() || (boolean && !Truthy(v))) return dflt ? *dflt : Value::Str("");
    return v;
  }
  if (name == "first" || name == "last") {
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    if (items.empty()) return Value::Undefined("No first item, sequence was empty.");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") {
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    return Value::List(std::move(items));
  }
  if (name == "reverse") {
    if (v.is(Kind::kString)) {
      std::u32string u = Decode(v.str());
      std::reverse(u.begin(), u.end());
      return Value::Str(Encode(u));
    }
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    std::reverse(items.begin(), items.end());
    return Value::List(std::move(items));
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::List({});
    if (!v.is(Kind::kDict)) return Error(n, "can only get item pairs from a mapping.");
    std::vector<Value> items;
    for (const auto& [k, item] : v.dict().items) {
      items.push_back(Value::List({Value::Str(k), item}, /*tuple=*/true));
    }
    return MakeList(std::move(items), n);
  }
  if (name == "dictsort") {
    if (!v.is(Kind::kDict)) return Error(n, "dictsort: can only sort a mapping");
    bool case_sensitive = ArgBool(args, 0, "case_sensitive", false);
    const Value* by = args.Get(1, "by");
    bool by_value = by && by->is(Kind::kString) && by->str() == "value";
    bool reverse = ArgBool(args, 2, "reverse", false);
    std::vector<Value> items;
    for (const auto& [k, item] : v.dict().items) {
      items.push_back(Value::List({Value::Str(k), item}, true));
    }
    std::vector<Value> keys;
    for (const Value& item : items) keys.push_back(item.list().items[by_value ? 1 : 0]);
    MOE_RETURN_IF_ERROR(CheckComparable(keys, n));
    absl::Status error;
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      const Value& x = a.list().items[by_value ? 1 : 0];
      const Value& y = b.list().items[by_value ? 1 : 0];
      auto c = Compare(SortKey(x, case_sensitive), SortKey(y, case_sensitive), n);
      if (!c.ok()) {
        error = c.status();
        return false;
      }
      return reverse ? *c > 0 : *c < 0;
    });
    MOE_RETURN_IF_ERROR(error);
    return MakeList(std::move(items), n);
  }
  if (name == "join") {
    const Value* sep_v = args.Get(0, "d");
    std::string sep = sep_v ? PyStr(*sep_v) : "";
    const Value* attr = args.Get(1, "attribute");
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    Builder b(limits_.max_output_bytes);
    for (size_t i = 0; i < items.size(); ++i) {
      Value item = items[i];
      if (attr && !attr->is(Kind::kNone)) {
        MOE_ASSIGN_OR_RETURN(item, GetPath(*this, item, PyStr(*attr), n));
      }
      if ((i > 0 && !b.Add(sep)) || !b.Add(PyStr(item))) return TooLarge(n);
    }
    return Value::Str(b.Take());
  }
  if (name == "map") {
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    const Value* attr = nullptr;
    const Value* dflt = nullptr;
    for (const auto& [k, val] : args.kw) {
      if (k == "attribute") attr = &val;
      if (k == "default") dflt = &val;
    }
    std::vector<Value> out;
    if (attr) {
      for (const Value& item : items) {
        MOE_ASSIGN_OR_RETURN(Value x, GetPath(*this, item, PyStr(*attr), n));
        out.push_back(x.is_undefined() && dflt ? *dflt : x);
      }
      return MakeList(std::move(out), n);
    }
    if (args.pos.empty() || !args.pos[0].is(Kind::kString)) {
      return Error(n, "map: expected a filter name or attribute=");
    }
    const std::string& filter = args.pos[0].str();
    if (!KnownFilter(filter)) return Error(n, absl::StrCat("unknown filter '", filter, "'"));
    CallArgs rest;
    rest.pos.assign(args.pos.begin() + 1, args.pos.end());
    rest.kw = args.kw;
    for (const Value& item : items) {
      MOE_ASSIGN_OR_RETURN(Value x, ApplyFilter(filter, item, rest, n));
      out.push_back(std::move(x));
    }
    return MakeList(std::move(out), n);
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    bool by_attr = name == "selectattr" || name == "rejectattr";
    bool keep_if = name == "select" || name == "selectattr";
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    size_t first = 0;
    std::string attr;
    if (by_attr) {
      if (args.pos.empty()) return Error(n, absl::StrCat(name, ": missing attribute name"));
      attr = PyStr(args.pos[0]);
      first = 1;
    }
    std::string test;
    if (args.pos.size() > first) {
      if (!args.pos[first].is(Kind::kString)) return Error(n, "test name must be a string");
      test = args.pos[first].str();
      if (!KnownTest(test)) return Error(n, absl::StrCat("unknown test '", test, "'"));
    }
    CallArgs test_args;
    if (args.pos.size() > first + 1) test_args.pos.assign(args.pos.begin() + first + 1, args.pos.end());
    std::vector<Value> out;
    for (const Value& item : items) {
      Value x = item;
      if (by_attr) {
        MOE_ASSIGN_OR_RETURN(x, GetPath(*this, item, attr, n));
      }
      bool ok;
      if (test.empty()) {
        ok = Truthy(x);
      } else {
        MOE_ASSIGN_OR_RETURN(ok, ApplyTest(test, x, test_args, n));
      }
      if (ok == keep_if) out.push_back(item);
    }
    return MakeList(std::move(out), n);
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    bool reverse = name == "sort" && ArgBool(args, 0, "reverse", false);
    size_t base = name == "sort" ? 1 : 0;
    bool case_sensitive = ArgBool(args, base, "case_sensitive", false);
    const Value* attr = args.Get(base + 1, "attribute");
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    std::vector<Value> keys;
    for (const Value& item : items) {
      Value k = item;
      if (attr && !attr->is(Kind::kNone)) {
        MOE_ASSIGN_OR_RETURN(k, GetPath(*this, item, PyStr(*attr), n));
      }
      keys.push_back(SortKey(k, case_sensitive));
    }
    if (name == "unique") {
      std::vector<Value> out, seen;
      for (size_t i = 0; i < items.size(); ++i) {
        bool dup = false;
        for (const Value& s : seen) dup = dup || PyEquals(s, keys[i]);
        if (dup) continue;
        seen.push_back(keys[i]);
        out.push_back(items[i]);
      }
      return MakeList(std::move(out), n);
    }
    MOE_RETURN_IF_ERROR(CheckComparable(keys, n));
    std::vector<size_t> order(items.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    absl::Status error;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      auto c = Compare(keys[a], keys[b], n);
      if (!c.ok()) {
        error = c.status();
        return false;
      }
      return reverse ? *c > 0 : *c < 0;
    });
    MOE_RETURN_IF_ERROR(error);
    if (name == "min" || name == "max") {
      if (items.empty()) return Value::Undefined("No aggregated item, sequence was empty.");
      return name == "min" ? items[order.front()] : items[order.back()];
    }
    std::vector<Value> out;
    for (size_t i : order) out.push_back(items[i]);
    return MakeList(std::move(out), n);
  }
  if (name == "sum") {
    const Value* attr = args.Get(0, "attribute");
    const Value* start = args.Get(1, "start");
    Value total = start ? *start : Value::Int(0);
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(Iterate(v, n, &items));
    for (const Value& item : items) {
      Value x = item;
      if (attr && !attr->is(Kind::kNone)) {
        MOE_ASSIGN_OR_RETURN(x, GetPath(*this, item, PyStr(*attr), n));
      }
      MOE_ASSIGN_OR_RETURN(total, BinaryOp("+", total, x, n));
    }
    return total;
  }
  if (name == "int") {
    const Value* dflt_v = args.Get(0, "default");
    Value dflt = dflt_v ? *dflt_v : Value::Int(0);
    const Value* base_v = args.Get(1, "base");
    int base = base_v && base_v->is_integral() ? static_cast<int>(base_v->int_value()) : 10;
    if (v.is_integral()) return Value::Int(v.int_value());
    if (v.is(Kind::kFloat)) {
      double d = v.number();
      if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return dflt;
      return Value::Int(static_cast<int64_t>(d));
    }
    if (v.is(Kind::kString)) {
      int64_t i;
      if (ParsePyInt(v.str(), base, &i)) return Value::Int(i);
      double d;
      if (base == 10 && ParsePyFloat(v.str(), &d) && std::isfinite(d) && std::fabs(d) < 9.2e18) {
        return Value::Int(static_cast<int64_t>(d));
      }
    }
    return dflt;
  }
  if (name == "float") {
    const Value* dflt_v = args.Get(0, "default");
    Value dflt = dflt_v ? *dflt_v : Value::Float(0.0);
    if (v.is_number()) return Value::Float(v.number());
    double d;
    if (v.is(Kind::kString) && ParsePyFloat(v.str(), &d)) return Value::Float(d);
    return dflt;
  }
  if (name == "abs") {
    if (v.is_integral()) {
      if (v.int_value() == std::numeric_limits<int64_t>::min()) return Error(n, "integer overflow");
      return Value::Int(v.int_value() < 0 ? -v.int_value() : v.int_value());
    }
    if (v.is(Kind::kFloat)) return Value::Float(std::fabs(v.number()));
    return Error(n, absl::StrCat("bad operand type for abs(): '", TypeName(v), "'"));
  }
  if (name == "round") {
    if (!v.is_number()) return Error(n, "round: a number is required");
    const Value* p = args.Get(0, "precision");
    int64_t precision = p && p->is_integral() ? std::clamp<int64_t>(p->int_value(), -20, 20) : 0;
    const Value* m = args.Get(1, "method");
    std::string method = m ? PyStr(*m) : "common";
    double scale = std::pow(10.0, static_cast<double>(precision));
    double x = v.number() * scale;
    if (method == "common") {
      x = std::nearbyint(x);
    } else if (method == "ceil") {
      x = std::ceil(x);
    } else if (method == "floor") {
      x = std::floor(x);
    } else {
      return Error(n, "round: method must be common, ceil or floor");
    }
    return Value::Float(x / scale);
  }
  if (name == "attr") {
    MOE_ASSIGN_OR_RETURN(std::string attr, str_arg(0, "name", "attr: name"));
    return GetAttr(v, attr, n);
  }
  if (name == "indent") {
    const Value* width = args.Get(0, "width");
    std::string pad = width && width->is(Kind::kString)
                          ? width->str()
                          : std::string(width && width->is_integral()
                                            ? std::clamp<int64_t>(width->int_value(), 0, 256)
                                            : 4,
                                        ' ');
    bool first = ArgBool(args, 1, "first", false);
    bool blank = ArgBool(args, 2, "blank", false);
    std::vector<std::string> lines = PySplitLines(PyStr(v) + "\n", false);
    Builder b(limits_.max_output_bytes);
    bool ok = true;
    if (first) ok = b.Add(pad);
    for (size_t i = 0; i < lines.size() && ok; ++i) {
      if (i > 0) {
        ok = b.Add("\n") && ((blank || !lines[i].empty()) ? b.Add(pad) : true);
      }
      ok = ok && b.Add(lines[i]);
    }
    if (!ok) return TooLarge(n);
    return Value::Str(b.Take());
  }
  if (name == "format") {
    if (!v.is(Kind::kString)) return Error(n, "format: the value must be a string");
    return PercentFormat(*this, v.str(), args, n);
  }
  if (name == "wordcount") {
    std::u32string u = Decode(PyStr(v));
    int64_t words = 0;
    bool in_word = false;
    for (char32_t c : u) {
      bool w = c == '_' || (c < 0x80 ? std::isalnum(static_cast<int>(c)) != 0 : !IsPySpace(c));
      if (w && !in_word) ++words;
      in_word = w;
    }
    return Value::Int(words);
  }
  return Error(n, absl::StrCat("unknown filter '", name, "'"));
}

absl::StatusOr<bool> Renderer::ApplyTest(const std::string& name, const Value& v,
                                         const CallArgs& args, const Node& n) {
  const Value* arg = args.Get(0, "");
  auto need_arg = [&]() -> absl::Status {
    if (arg == nullptr) return Error(n, absl::StrCat("test '", name, "' needs an argument"));
    return absl::OkStatus();
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is(Kind::kNone);
  if (name == "boolean") return v.is(Kind::kBool);
  if (name == "true") return v.is(Kind::kBool) && v.int_value() != 0;
  if (name == "false") return v.is(Kind::kBool) && v.int_value() == 0;
  if (name == "string") return v.is(Kind::kString);
  if (name == "number") return v.is_number();
  if (name == "integer") return v.is(Kind::kInt);
  if (name == "float") return v.is(Kind::kFloat);
  if (name == "mapping") return v.is(Kind::kDict);
  if (name == "iterable" || name == "sequence") {
    return v.is_undefined() || v.is(Kind::kString) || v.is(Kind::kList) || v.is(Kind::kDict);
  }
  if (name == "callable") return v.is(Kind::kFunction);
  if (name == "escaped") return false;
  if (name == "filter") return v.is(Kind::kString) && KnownFilter(v.str());
  if (name == "test") return v.is(Kind::kString) && KnownTest(v.str());
  if (name == "lower" || name == "upper") {
    std::string s = PyStr(v);
    bool cased = false;
    for (char32_t c : Decode(s)) {
      bool lower = ToUpperCp(c) != c, upper = ToLowerCp(c) != c;
      if ((name == "lower" && upper) || (name == "upper" && lower)) return false;
      cased = cased || lower || upper;
    }
    return cased;
  }
  if (name == "odd" || name == "even") {
    if (!v.is_integral()) return Error(n, absl::StrCat("test '", name, "' needs an integer"));
    bool odd = (v.int_value() % 2) != 0;
    return name == "odd" ? odd : !odd;
  }
  if (name == "divisibleby") {
    MOE_RETURN_IF_ERROR(need_arg());
    if (!v.is_integral() || !arg->is_integral() || arg->int_value() == 0) {
      return Error(n, "divisibleby needs integers and a non-zero divisor");
    }
    return v.int_value() % arg->int_value() == 0;
  }
  if (name == "in") {
    MOE_RETURN_IF_ERROR(need_arg());
    return Contains(*arg, v, n);
  }
  if (name == "sameas") {
    MOE_RETURN_IF_ERROR(need_arg());
    if (v.kind() != arg->kind()) return false;
    if (v.is(Kind::kList) || v.is(Kind::kDict) || v.is(Kind::kNamespace) ||
        v.is(Kind::kFunction)) {
      return v.identity() == arg->identity();
    }
    return PyEquals(v, *arg);
  }
  if (name == "eq" || name == "equalto" || name == "==") {
    MOE_RETURN_IF_ERROR(need_arg());
    return PyEquals(v, *arg);
  }
  if (name == "ne" || name == "!=") {
    MOE_RETURN_IF_ERROR(need_arg());
    return !PyEquals(v, *arg);
  }
  MOE_RETURN_IF_ERROR(need_arg());
  MOE_ASSIGN_OR_RETURN(int c, Compare(v, *arg, n));
  if (name == "lt" || name == "lessthan" || name == "<") return c < 0;
  if (name == "le" || name == "<=") return c <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return c > 0;
  if (name == "ge" || name == ">=") return c >= 0;
  return Error(n, absl::StrCat("unknown test '", name, "'"));
}

absl::StatusOr<Value> StringMethod(Renderer& r, const std::string& s, const std::string& name,
                                   const CallArgs& args, const Node& n, bool* found) {
  *found = true;
  const Value* a0 = args.Get(0, "");
  auto opt_chars = [&](const Value* v, std::string* buf) -> const std::string* {
    if (v == nullptr || v->is(Kind::kNone)) return nullptr;
    *buf = PyStr(*v);
    return buf;
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    std::string buf;
    const std::string* chars = opt_chars(args.Get(0, "chars"), &buf);
    return Value::Str(PyStrip(s, chars, name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    std::string buf;
    const std::string* sep = opt_chars(args.Get(0, "sep"), &buf);
    if (sep && sep->empty()) return r.Error(n, "empty separator");
    const Value* m = args.Get(1, "maxsplit");
    int64_t maxsplit = m && m->is_integral() ? m->int_value() : -1;
    std::vector<Value> out;
    for (std::string& part : PySplit(s, sep, maxsplit, name == "rsplit")) {
      out.push_back(Value::Str(std::move(part)));
    }
    return Value::List(std::move(out));
  }
  if (name == "splitlines") {
    std::vector<Value> out;
    for (std::string& line : PySplitLines(s, ArgBool(args, 0, "keepends", false))) {
      out.push_back(Value::Str(std::move(line)));
    }
    return Value::List(std::move(out));
  }
  if (name == "startswith" || name == "endswith") {
    if (a0 == nullptr) return r.Error(n, absl::StrCat(name, "() takes at least 1 argument"));
    std::vector<Value> options;
    if (a0->is(Kind::kList)) {
      options = a0->list().items;
    } else {
      options.push_back(*a0);
    }
    for (const Value& o : options) {
      if (!o.is(Kind::kString)) {
        return r.Error(n, absl::StrCat(name, " first arg must be str or a tuple of str, not ",
                                       TypeName(o)));
      }
      const std::string& p = o.str();
      bool hit = name == "startswith"
                     ? s.compare(0, p.size(), p) == 0
                     : s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
      if (hit) return Value::Bool(true);
    }
    return Value::Bool(false);
  }
  if (name == "lower") return Value::Str(MapCase(s, ToLowerCp));
  if (name == "upper") return Value::Str(MapCase(s, ToUpperCp));
  if (name == "capitalize") return Value::Str(Capitalize(s));
  if (name == "title") return Value::Str(Title(s));
  if (name == "replace") {
    const Value* old = args.Get(0, "old");
    const Value* repl = args.Get(1, "new");
    if (!old || !repl || !old->is(Kind::kString) || !repl->is(Kind::kString)) {
      return r.Error(n, "replace() takes two strings");
    }
    const Value* c = args.Get(2, "count");
    std::string out;
    if (!PyReplace(s, old->str(), repl->str(), c && c->is_integral() ? c->int_value() : -1,
                   r.max_bytes(), &out)) {
      return r.TooLarge(n);
    }
    return Value::Str(std::move(out));
  }
  if (name == "format") return PyFormat(r, s, args, n);
  if (name == "find" || name == "rfind" || name == "count" || name == "index") {
    if (a0 == nullptr || !a0->is(Kind::kString)) {
      return r.Error(n, absl::StrCat(name, "() takes a string"));
    }
    const std::string& sub = a0->str();
    if (name == "count") {
      if (sub.empty()) return Value::Int(CodePointCount(s) + 1);
      int64_t k = 0;
      for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++k;
      return Value::Int(k);
    }
    size_t p = name == "rfind" ? s.rfind(sub) : s.find(sub);
    if (p == std::string::npos) {
      if (name == "index") return r.Error(n, "substring not found");
      return Value::Int(-1);
    }
    return Value::Int(CodePointCount(std::string_view(s).substr(0, p)));
  }
  if (name == "join") {
    if (a0 == nullptr) return r.Error(n, "join() takes exactly one argument");
    std::vector<Value> items;
    MOE_RETURN_IF_ERROR(r.Iterate(*a0, n, &items));
    Builder b(r.max_bytes());
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].is(Kind::kString)) {
        return r.Error(n, absl::StrCat("sequence item ", i, ": expected str instance, ",
                                       TypeName(items[i]), " found"));
      }
      if ((i > 0 && !b.Add(s)) || !b.Add(items[i].str())) return r.TooLarge(n);
    }
    return Value::Str(b.Take());
  }
  if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") {
    return Value::Bool(!s.empty() && std::all_of(s.begin(), s.end(), IsDigit));
  }
  if (name == "isspace") {
    std::u32string u = Decode(s);
    return Value::Bool(!u.empty() && std::all_of(u.begin(), u.end(), IsPySpace));
  }
  if (name == "isalpha" || name == "isalnum") {
    std::u32string u = Decode(s);
    bool alnum = name == "isalnum";
    return Value::Bool(!u.empty() && std::all_of(u.begin(), u.end(), [&](char32_t c) {
      return IsAlphaCp(c) || (alnum && c >= '0' && c <= '9');
    }));
  }
  if (name == "islower" || name == "isupper") {
    CallArgs none;
    return r.ApplyTest(name == "islower" ? "lower" : "upper", Value::Str(s), none, n)
        .value_or(false) ? Value::Bool(true) : Value::Bool(false);
  }
  *found = false;
  return Value::None();
}

absl::StatusOr<Value> Renderer::CallMethod(const Value& obj, const std::string& name,
                                           const CallArgs& args, const Node& n) {
  if (obj.is_undefined()) return UndefinedError(n, obj);
  if (obj.is(Kind::kString)) {
    bool found = false;
    absl::StatusOr<Value> v = StringMethod(*this, obj.str(), name, args, n, &found);
    if (found) return v;
  } else if (obj.is(Kind::kDict)) {
    const Object& o = obj.dict();
    if (name == "items" || name == "keys" || name == "values") {
      std::vector<Value> out;
      for (const auto& [k, v] : o.items) {
        if (name == "items") {
          out.push_back(Value::List({Value::Str(k), v}, true));
        } else {
          out.push_back(name == "keys" ? Value::Str(k) : v);
        }
      }
      return MakeList(std::move(out), n);
    }
    if (name == "get") {
      const Value* key = args.Get(0, "key");
      if (key == nullptr) return Error(n, "get expected at least 1 argument, got 0");
      const Value* dflt = args.Get(1, "default");
      if (key->is(Kind::kString)) {
        if (const Value* v = o.Find(key->str())) return *v;
      }
      return dflt ? *dflt : Value::None();
    }
    if (name == "cycle" && o.Find("index0") && o.Find("revindex0")) {
      if (args.pos.empty()) return Error(n, "no items for cycling given");
      int64_t i = o.Find("index0")->int_value();
      return args.pos[static_cast<size_t>(i) % args.pos.size()];
    }
    if (const Value* v = o.Find(name)) return CallValue(*v, args, n);
  } else if (obj.is(Kind::kList)) {
    const auto& items = obj.list().items;
    if (name == "index" || name == "count") {
      const Value* x = args.Get(0, "value");
      if (x == nullptr) return Error(n, absl::StrCat(name, "() takes exactly one argument"));
      int64_t k = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!PyEquals(items[i], *x)) continue;
        if (name == "index") return Value::Int(static_cast<int64_t>(i));
        ++k;
      }
      if (name == "index") return Error(n, "value is not in list");
      return Value::Int(k);
    }
  } else if (obj.is(Kind::kNamespace)) {
    if (const Value* v = obj.ns().Find(name)) return CallValue(*v, args, n);
  }
  static constexpr std::string_view kMutators[] = {
      "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update",
      "setdefault", "popitem", "add", "discard"};
  if ((obj.is(Kind::kList) || obj.is(Kind::kDict)) &&
      Known(name, kMutators, std::size(kMutators))) {
    return Error(n, absl::StrCat("access to attribute '", name, "' of '", TypeName(obj),
                                 "' object is unsafe."));
  }
  return Error(n, absl::StrCat("'", TypeName(obj), " object' has no attribute '", name, "'"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API.

ChatTemplate::ChatTemplate(std::shared_ptr<const internal::TemplateProgram> program)
    : program_(std::move(program)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string source) {
  return Parse(std::move(source), ChatTemplateLimits());
}

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string source,
                                                 const ChatTemplateLimits& limits) {
  auto program = std::make_shared<internal::TemplateProgram>();
  program->limits = limits;
  // As Jinja's lexer: every newline sequence becomes "\n", and one trailing newline goes.
  std::string& norm = program->normalized;
  norm.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      norm.push_back('\n');
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      norm.push_back(source[i]);
    }
  }
  if (!norm.empty() && norm.back() == '\n') norm.pop_back();
  program->source = std::move(source);
  program->line_starts.push_back(0);
  for (size_t i = 0; i < norm.size(); ++i) {
    if (norm[i] == '\n') program->line_starts.push_back(i + 1);
  }
  try {
    Lexer lexer(*program);
    MOE_ASSIGN_OR_RETURN(std::vector<Token> tokens, lexer.Run());
    Parser parser(*program, std::move(tokens));
    MOE_ASSIGN_OR_RETURN(program->body, parser.ParseTemplate());
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("chat template: parse failed: ", e.what()));
  }
  return ChatTemplate(std::move(program));
}

namespace {

template <typename Json>
absl::StatusOr<std::string> RenderJson(const internal::TemplateProgram& program,
                                       const Json& context) {
  if (!context.is_object()) {
    return absl::InvalidArgumentError("chat template: the context must be a JSON object");
  }
  try {
    MOE_ASSIGN_OR_RETURN(Value ctx, FromJson(context, 0, program.limits.max_depth));
    Renderer renderer(program);
    return renderer.Run(ctx);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("chat template: render failed: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& context) const {
  return RenderJson(*program_, context);
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  return RenderJson(*program_, context);
}

const std::string& ChatTemplate::source() const { return program_->source; }

}  // namespace moe::server
