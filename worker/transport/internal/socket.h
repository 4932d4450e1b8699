// Blocking-with-deadline socket helpers for the TCP data plane (poll-based; no call waits
// longer than its deadline). Sends use MSG_NOSIGNAL, so a closed peer is an error and never
// a SIGPIPE. Errors: kUnavailable for refused/reset/closed connections, kDeadlineExceeded for
// timeouts, kInvalidArgument for a malformed address.
// Threads: pure functions over file descriptors; one reader and one writer per fd at a time.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe::worker::internal {

// "host:port" -> (host, port).
absl::Status SplitHostPort(const std::string& address, std::string* host, int* port);

// Connects (TCP_NODELAY) within `timeout`. Returns the fd.
absl::StatusOr<int> ConnectTcp(const std::string& address, absl::Duration timeout);

// Listens on host:port (port 0 = any free port). Returns the fd and the bound port.
struct Listener {
  int fd = -1;
  int port = 0;
};
absl::StatusOr<Listener> ListenTcp(const std::string& host, int port);

// Reads exactly n bytes by `deadline`. `stop` (optional) is checked every 100 ms. A clean EOF
// before the first byte is kUnavailable "closed"; after it, kDataLoss "truncated".
absl::Status ReadFull(int fd, void* buf, size_t n, absl::Time deadline,
                      const std::atomic<bool>* stop = nullptr);

// Writes all of iov[0..iovcnt) by `deadline`.
absl::Status WriteFull(int fd, struct iovec* iov, int iovcnt, absl::Time deadline);

// Waits until fd is readable, `deadline` passes (false) or *stop becomes true (false).
absl::StatusOr<bool> WaitReadable(int fd, absl::Time deadline, const std::atomic<bool>* stop);

void CloseFd(int fd);

}  // namespace moe::worker::internal
