#include "worker/transport/internal/socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moe::worker::internal {
namespace {

constexpr absl::Duration kStopPoll = absl::Milliseconds(100);

absl::Status Errno(absl::StatusCode code, const std::string& what, int err) {
  return absl::Status(code, absl::StrCat(what, ": ", strerror(err)));
}

// Milliseconds until `deadline`, capped for stop polling; -1 never (infinite future).
int PollMs(absl::Time deadline, bool has_stop) {
  if (deadline == absl::InfiniteFuture()) return has_stop ? absl::ToInt64Milliseconds(kStopPoll) : -1;
  absl::Duration left = deadline - absl::Now();
  if (has_stop) left = std::min(left, kStopPoll);
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1)))));
}

absl::StatusCode CodeForErrno(int err) {
  switch (err) {
    case ECONNREFUSED:
    case ECONNRESET:
    case EPIPE:
    case ENOTCONN:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ECONNABORTED:
      return absl::StatusCode::kUnavailable;
    default:
      return absl::StatusCode::kUnavailable;
  }
}

}  // namespace

absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\": expected host:port"));
  }
  *host = address.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (!absl::SimpleAtoi(address.substr(colon + 1), port) || *port < 0 || *port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\": bad port"));
  }
  return absl::OkStatus();
}

void CloseFd(int fd) {
  if (fd >= 0) ::close(fd);
}

absl::StatusOr<int> ConnectTcp(const std::string& address, absl::Duration timeout) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(address, &host, &port); !s.ok()) return s;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res); rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolving ", address, ": ", gai_strerror(rc)));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status last = absl::UnavailableError(absl::StrCat("connecting to ", address, ": no address"));
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      last = Errno(absl::StatusCode::kUnavailable, "socket", errno);
      continue;
    }
    int rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno != EINPROGRESS) {
      last = Errno(CodeForErrno(errno), absl::StrCat("connecting to ", address), errno);
      ::close(fd);
      continue;
    }
    if (rc != 0) {
      pollfd p{fd, POLLOUT, 0};
      int n;
      do {
        n = ::poll(&p, 1, PollMs(deadline, false));
      } while (n < 0 && errno == EINTR);
      if (n == 0) {
        ::close(fd);
        last = absl::DeadlineExceededError(absl::StrCat("connecting to ", address, ": timed out after ",
                                                        absl::FormatDuration(timeout)));
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last = Errno(CodeForErrno(err), absl::StrCat("connecting to ", address), err);
        ::close(fd);
        continue;
      }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    freeaddrinfo(res);
    return fd;
  }
  freeaddrinfo(res);
  // A peer that cannot be reached in time is as unavailable as a refused one.
  if (last.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::UnavailableError(last.message());
  }
  return last;
}

absl::StatusOr<Listener> ListenTcp(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("resolving ", host, ": ", gai_strerror(rc)));
  }
  int fd = ::socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, res->ai_protocol);
  if (fd < 0) {
    freeaddrinfo(res);
    return Errno(absl::StatusCode::kInternal, "socket", errno);
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
    const int err = errno;
    freeaddrinfo(res);
    ::close(fd);
    return Errno(absl::StatusCode::kUnavailable, absl::StrCat("listening on ", host, ":", port), err);
  }
  freeaddrinfo(res);
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  Listener l;
  l.fd = fd;
  l.port = addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return l;
}

absl::StatusOr<bool> WaitReadable(int fd, absl::Time deadline, const std::atomic<bool>* stop) {
  while (true) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) return false;
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, PollMs(deadline, stop != nullptr));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno(absl::StatusCode::kUnavailable, "poll", errno);
    }
    if (n > 0) return true;
    if (absl::Now() >= deadline) return false;
  }
}

absl::Status ReadFull(int fd, void* buf, size_t n, absl::Time deadline,
                      const std::atomic<bool>* stop) {
  char* p = static_cast<char*>(buf);
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) {
      return got == 0 ? absl::UnavailableError("connection closed by the peer")
                      : absl::DataLossError(absl::StrCat("truncated frame: connection closed after ",
                                                         got, " of ", n, " bytes"));
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return Errno(CodeForErrno(errno), "recv", errno);
    }
    absl::StatusOr<bool> readable = WaitReadable(fd, deadline, stop);
    if (!readable.ok()) return readable.status();
    if (!*readable) {
      if (stop != nullptr && stop->load()) return absl::CancelledError("stopping");
      return absl::DeadlineExceededError(
          absl::StrCat("read timed out after ", got, " of ", n, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteFull(int fd, struct iovec* iov, int iovcnt, absl::Time deadline) {
  while (iovcnt > 0) {
    if (iov->iov_len == 0) {
      ++iov;
      --iovcnt;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(std::min(iovcnt, 1024));
    ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return Errno(CodeForErrno(errno), "send", errno);
      pollfd p{fd, POLLOUT, 0};
      int n = ::poll(&p, 1, PollMs(deadline, false));
      if (n == 0 && absl::Now() >= deadline) {
        return absl::DeadlineExceededError("send timed out (the peer is not reading)");
      }
      continue;
    }
    size_t left = static_cast<size_t>(w);
    while (left > 0 && iovcnt > 0) {
      if (left >= iov->iov_len) {
        left -= iov->iov_len;
        ++iov;
        --iovcnt;
      } else {
        iov->iov_base = static_cast<char*>(iov->iov_base) + left;
        iov->iov_len -= left;
        left = 0;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::worker::internal
