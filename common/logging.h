// A small structured logger: one line per record, `key=value` fields, a global level.
//
//   MOE_LOG(INFO) << "placement committed" << moe::common::Kv("epoch", 7) << Kv("rank", 2);
//   // 2026-11-23T15:04:05.123Z I placement.cc:42] placement committed epoch=7 rank=2
//
//   MOE_CHECK(ptr != nullptr) << "slot table missing";   // broken invariant of our own: abort
//   MOE_DCHECK(n > 0);                                   // debug builds only
//
// Records go to stderr (or a sink set with SetLogSinkForTest); a record is written with one
// write call under a mutex, so lines from several threads never interleave. Any thread may log.
// Values that contain spaces, quotes or '=' are quoted.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace moe::common {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
// Parses "debug", "info", "warning", "error" (case-insensitive); false when unknown.
bool ParseLogLevel(std::string_view text, LogLevel* level);
// Prefix put before every record of this process, e.g. "expert[2]".
void SetLogPrefix(std::string prefix);
// When set, records are appended to *sink instead of stderr. Pass nullptr to restore.
void SetLogSinkForTest(std::string* sink);

// A structured field. Kv("k", v) streams as " k=v".
template <typename T>
struct KvField {
  std::string_view key;
  const T& value;
};
template <typename T>
KvField<T> Kv(std::string_view key, const T& value) { return {key, value}; }

std::string QuoteLogValue(std::string_view value);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;

  template <typename T>
  LogMessage& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  template <typename T>
  LogMessage& operator<<(const KvField<T>& field) {
    std::ostringstream value;
    value << field.value;
    stream_ << ' ' << field.key << '=' << QuoteLogValue(value.str());
    return *this;
  }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

// Swallows a stream expression when a record is disabled.
struct LogVoidify {
  void operator&(LogMessage&) {}
};

}  // namespace moe::common

#define MOE_LOG_LEVEL_DEBUG ::moe::common::LogLevel::kDebug
#define MOE_LOG_LEVEL_INFO ::moe::common::LogLevel::kInfo
#define MOE_LOG_LEVEL_WARNING ::moe::common::LogLevel::kWarning
#define MOE_LOG_LEVEL_ERROR ::moe::common::LogLevel::kError
#define MOE_LOG_LEVEL_FATAL ::moe::common::LogLevel::kFatal

#define MOE_LOG(severity)                                                   \
  (MOE_LOG_LEVEL_##severity < ::moe::common::GetLogLevel())                 \
      ? (void)0                                                             \
      : ::moe::common::LogVoidify() &                                       \
            ::moe::common::LogMessage(MOE_LOG_LEVEL_##severity, __FILE__, __LINE__)

#define MOE_CHECK(cond)                                                     \
  (cond) ? (void)0                                                          \
         : ::moe::common::LogVoidify() &                                    \
               ::moe::common::LogMessage(::moe::common::LogLevel::kFatal,   \
                                         __FILE__, __LINE__)                \
                   << "Check failed: " #cond " "

#ifdef NDEBUG
#define MOE_DCHECK(cond) \
  while (false) MOE_CHECK(cond)
#else
#define MOE_DCHECK(cond) MOE_CHECK(cond)
#endif
