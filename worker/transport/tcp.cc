#include "worker/transport/tcp.h"

#include <sys/socket.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <iterator>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "worker/transport/internal/socket.h"

namespace moe::worker {

using frame::FrameHeader;
using frame::FrameType;
using frame::WireDType;

namespace {

// Rows [n, H] in the wire dtype: f32 rows go out as they are; bf16 rows are rounded into
// `scratch`. Returns the bytes to send.
std::pair<const void*, size_t> WireRows(const common::Tensor& rows, WireDType dtype,
                                        std::vector<uint16_t>& scratch) {
  const size_t count = static_cast<size_t>(rows.numel());
  if (dtype == WireDType::kF32) return {rows.data(), count * sizeof(float)};
  scratch.resize(count);
  const float* src = rows.data_as<float>();
  for (size_t i = 0; i < count; ++i) scratch[i] = common::F32ToBf16(src[i]);
  return {scratch.data(), count * sizeof(uint16_t)};
}

// Writes header ‖ pieces; the checksum covers header bytes [0, 60) and the pieces.
absl::Status WriteFrame(int fd, FrameHeader h, std::vector<iovec> pieces, absl::Time deadline) {
  uint64_t total = 0;
  for (const iovec& p : pieces) total += p.iov_len;
  h.payload_bytes = static_cast<uint32_t>(total);
  uint8_t header[frame::kHeaderBytes];
  h.checksum = 0;
  frame::EncodeHeader(h, header);
  frame::Checksum sum;
  sum.Update(header, frame::kHeaderBytes - 4);
  for (const iovec& p : pieces) sum.Update(p.iov_base, p.iov_len);
  h.checksum = sum.Finish();
  frame::EncodeHeader(h, header);
  pieces.insert(pieces.begin(), iovec{header, frame::kHeaderBytes});
  return internal::WriteFull(fd, pieces.data(), static_cast<int>(pieces.size()), deadline);
}

uint32_t HeaderChecksumStart(const uint8_t* header, frame::Checksum& sum) {
  sum.Update(header, frame::kHeaderBytes - 4);
  uint32_t stored;
  std::memcpy(&stored, header + frame::kHeaderBytes - 4, 4);
  return stored;
}

// Reads a wire [n, H] block into an f32 buffer.
absl::Status ReadRows(int fd, WireDType dtype, float* out, size_t count, absl::Time deadline,
                      frame::Checksum& sum, const std::atomic<bool>* stop) {
  if (dtype == WireDType::kF32) {
    MOE_RETURN_IF_ERROR(internal::ReadFull(fd, out, count * sizeof(float), deadline, stop));
    sum.Update(out, count * sizeof(float));
    return absl::OkStatus();
  }
  std::vector<uint16_t> tmp(count);
  MOE_RETURN_IF_ERROR(internal::ReadFull(fd, tmp.data(), count * sizeof(uint16_t), deadline, stop));
  sum.Update(tmp.data(), count * sizeof(uint16_t));
  for (size_t i = 0; i < count; ++i) out[i] = common::Bf16ToF32(tmp[i]);
  return absl::OkStatus();
}

// Reads and drops n bytes (a payload nobody waits for).
absl::Status Discard(int fd, size_t n, absl::Time deadline, const std::atomic<bool>* stop) {
  char buf[16384];
  while (n > 0) {
    const size_t take = std::min(n, sizeof(buf));
    MOE_RETURN_IF_ERROR(internal::ReadFull(fd, buf, take, deadline, stop));
    n -= take;
  }
  return absl::OkStatus();
}

absl::Status WriteError(int fd, uint64_t request_id, const absl::Status& status,
                        absl::Time deadline, uint32_t max_bytes) {
  FrameHeader h;
  h.type = FrameType::kError;
  h.request_id = request_id;
  h.status_code = static_cast<uint16_t>(status.code());
  if (std::optional<uint64_t> epoch = WorkerEpochFromStatus(status); epoch.has_value()) {
    h.epoch = *epoch;
    h.flags |= 1;
  }
  std::string message(status.message());
  if (message.size() > max_bytes) message.resize(max_bytes);
  return WriteFrame(fd, h, {iovec{message.data(), message.size()}}, deadline);
}

// Process-wide counters of the TCP data plane (null when registration failed).
common::Counter* TransportCounter(const char* name, const char* help) {
  auto family = common::DefaultMetricsRegistry().AddCounter(name, help);
  return family.ok() ? &(*family)->Get() : nullptr;
}
common::Counter* ConnectionFailures() {
  static common::Counter* c = TransportCounter(
      "moe_transport_connection_failures_total",
      "Data-plane connections to expert ranks that could not be made or were lost.");
  return c;
}
common::Counter* MalformedFrames() {
  static common::Counter* c = TransportCounter(
      "moe_transport_malformed_frames_total", "Data-plane frames rejected as malformed.");
  return c;
}

absl::Status StatusFromErrorFrame(const FrameHeader& h, std::string message) {
  int code = h.status_code;
  if (code <= 0 || code > 16) code = static_cast<int>(absl::StatusCode::kUnknown);
  absl::Status status(static_cast<absl::StatusCode>(code), message);
  if (h.flags & 1) SetWorkerEpoch(status, h.epoch);
  return status;
}

}  // namespace

// ---- client ----

struct TcpTransport::Connection {
  struct PendingCall {
    std::shared_ptr<internal::CallState> state;
    int64_t rows = 0;
    int64_t hidden = 0;
  };
  int rank = 0;
  int fd = -1;
  std::atomic<bool> closing{false};
  std::thread reader;
  absl::Mutex mu;
  bool dead ABSL_GUARDED_BY(mu) = false;
  absl::flat_hash_map<uint64_t, PendingCall> pending ABSL_GUARDED_BY(mu);

  ~Connection() { internal::CloseFd(fd); }

  // Marks the connection dead (no new calls) and fails every pending call with `status`.
  void Fail(const absl::Status& status) {
    absl::flat_hash_map<uint64_t, PendingCall> failed;
    {
      absl::MutexLock lock(&mu);
      dead = true;
      failed.swap(pending);
    }
    ::shutdown(fd, SHUT_RDWR);
    for (auto& [id, call] : failed) call.state->Complete(status);
  }
};

struct TcpTransport::Peer {
  absl::Mutex mu;  // connect + write
  std::string address ABSL_GUARDED_BY(mu);
  std::shared_ptr<Connection> conn ABSL_GUARDED_BY(mu);
  std::vector<std::shared_ptr<Connection>> retired ABSL_GUARDED_BY(mu);
  std::vector<uint16_t> scratch ABSL_GUARDED_BY(mu);
  bool reported_down ABSL_GUARDED_BY(mu) = false;
};

TcpTransport::TcpTransport(TcpTransportOptions options)
    : options_(std::move(options)), calls_(options_.dispatch_timeout) {
  for (size_t r = 0; r < options_.peers.size(); ++r) SetPeer(static_cast<int>(r), options_.peers[r]);
}

TcpTransport::~TcpTransport() {
  std::vector<std::shared_ptr<Connection>> all;
  {
    absl::MutexLock lock(&mu_);
    for (auto& peer : peers_) {
      absl::MutexLock plock(&peer->mu);
      if (peer->conn) all.push_back(std::move(peer->conn));
      for (auto& c : peer->retired) all.push_back(std::move(c));
      peer->retired.clear();
    }
  }
  for (auto& c : all) {
    c->closing = true;
    c->Fail(absl::UnavailableError("transport closed"));
    if (c->reader.joinable()) c->reader.join();
  }
}

TcpTransport::Peer* TcpTransport::GetPeer(int rank) {
  absl::MutexLock lock(&mu_);
  if (rank < 0) return nullptr;
  while (static_cast<int>(peers_.size()) <= rank) peers_.push_back(std::make_unique<Peer>());
  return peers_[rank].get();
}

void TcpTransport::SetPeer(int rank, const std::string& address) {
  Peer* peer = GetPeer(rank);
  if (peer == nullptr) return;
  std::shared_ptr<Connection> old;
  {
    absl::MutexLock lock(&peer->mu);
    if (peer->address == address) return;
    peer->address = address;
    old = std::move(peer->conn);
    if (old) peer->retired.push_back(old);
  }
  if (old) old->Fail(absl::UnavailableError(absl::StrCat("expert rank ", rank, " moved to ", address)));
}

CallId TcpTransport::Send(int rank, std::shared_ptr<const Dispatch> dispatch) {
  auto [id, state] = calls_.Start(rank);
  if (dispatch == nullptr) {
    state->Complete(absl::InvalidArgumentError("null dispatch"));
    return id;
  }
  if (absl::Status valid = dispatch->Validate(); !valid.ok()) {
    state->Complete(valid);
    return id;
  }
  Peer* peer = GetPeer(rank);
  if (peer == nullptr) {
    state->Complete(absl::InvalidArgumentError(absl::StrCat("expert rank ", rank, " is negative")));
    return id;
  }
  absl::MutexLock lock(&peer->mu);
  if (peer->address.empty()) {
    state->Complete(absl::UnavailableError(absl::StrCat("expert rank ", rank, " has no address")));
    return id;
  }
  std::shared_ptr<Connection> conn = peer->conn;
  bool alive = false;
  if (conn) {
    absl::MutexLock clock(&conn->mu);
    alive = !conn->dead;
  }
  if (!alive) {
    if (conn) {
      // Its reader has failed or is failing; join it before replacing it.
      conn->closing = true;
      if (conn->reader.joinable()) conn->reader.join();
      peer->conn.reset();
    }
    for (auto& old : peer->retired) {
      old->closing = true;
      if (old->reader.joinable()) old->reader.join();
    }
    peer->retired.clear();
    absl::StatusOr<int> fd = internal::ConnectTcp(peer->address, options_.connect_timeout);
    if (!fd.ok()) {
      if (ConnectionFailures()) ConnectionFailures()->Inc();
      if (!peer->reported_down) {  // once per outage, not once per dispatch
        peer->reported_down = true;
        MOE_LOG(WARNING) << "expert rank unreachable" << common::Kv("rank", rank)
                         << common::Kv("address", peer->address) << ": " << fd.status().message();
      }
      state->Complete(absl::UnavailableError(
          absl::StrCat("expert rank ", rank, " (", peer->address, "): ", fd.status().message())));
      return id;
    }
    if (peer->reported_down) {
      peer->reported_down = false;
      MOE_LOG(INFO) << "expert rank reachable again" << common::Kv("rank", rank)
                    << common::Kv("address", peer->address);
    }
    conn = std::make_shared<Connection>();
    conn->rank = rank;
    conn->fd = *fd;
    conn->reader = std::thread([this, conn] { ReaderLoop(conn); });
    peer->conn = conn;
  }
  const Dispatch& d = *dispatch;
  {
    absl::MutexLock clock(&conn->mu);
    if (conn->dead) {
      state->Complete(absl::UnavailableError(absl::StrCat("expert rank ", rank, ": connection lost")));
      return id;
    }
    conn->pending[id] = {state, d.num_rows(), d.hidden()};
  }
  FrameHeader h;
  h.type = FrameType::kDispatch;
  h.request_id = id;
  h.step_id = d.meta.step_id;
  h.epoch = d.meta.epoch;
  h.layer = d.meta.layer;
  h.source_rank = d.meta.source_rank;
  h.num_rows = static_cast<int32_t>(d.num_rows());
  h.hidden = static_cast<int32_t>(d.hidden());
  h.num_choices = static_cast<int32_t>(d.num_choices());
  h.row_dtype = options_.wire_dtype;
  auto [rows, rows_bytes] = WireRows(d.rows, options_.wire_dtype, peer->scratch);
  const size_t pairs = static_cast<size_t>(d.num_rows() * d.num_choices());
  absl::Status written =
      WriteFrame(conn->fd, h,
                 {iovec{const_cast<void*>(rows), rows_bytes},
                  iovec{d.slots.data(), pairs * sizeof(int32_t)},
                  iovec{d.weights.data(), pairs * sizeof(float)}},
                 state->deadline());
  if (!written.ok()) {
    conn->Fail(absl::UnavailableError(
        absl::StrCat("expert rank ", rank, " (", peer->address, "): ", written.message())));
  }
  return id;
}

absl::StatusOr<common::Tensor> TcpTransport::Wait(CallId call, absl::Time deadline) {
  return calls_.Wait(call, deadline);
}

void TcpTransport::ReaderLoop(std::shared_ptr<Connection> conn) {
  const std::string who = absl::StrCat("expert rank ", conn->rank);
  while (true) {
    uint8_t raw[frame::kHeaderBytes];
    absl::Status s = internal::ReadFull(conn->fd, raw, sizeof(raw), absl::InfiniteFuture(),
                                        &conn->closing);
    if (!s.ok()) {
      if (!conn->closing.load()) {
        if (ConnectionFailures()) ConnectionFailures()->Inc();
        MOE_LOG(WARNING) << "connection to expert rank lost" << common::Kv("rank", conn->rank)
                         << ": " << s.message();
      }
      conn->Fail(absl::UnavailableError(absl::StrCat(who, ": connection lost: ", s.message())));
      return;
    }
    absl::StatusOr<FrameHeader> h = frame::DecodeHeader(raw, options_.limits);
    if (!h.ok()) {
      if (MalformedFrames()) MalformedFrames()->Inc();
      MOE_LOG(WARNING) << "malformed frame from expert rank" << common::Kv("rank", conn->rank)
                       << ": " << h.status().message();
      conn->Fail(absl::Status(h.status().code(), absl::StrCat(who, " sent a malformed frame: ",
                                                               h.status().message())));
      return;
    }
    frame::Checksum sum;
    const uint32_t stored = HeaderChecksumStart(raw, sum);
    const absl::Time deadline = absl::Now() + options_.dispatch_timeout;
    Connection::PendingCall call;
    bool found = false;
    {
      absl::MutexLock lock(&conn->mu);
      auto it = conn->pending.find(h->request_id);
      if (it != conn->pending.end()) {
        call = std::move(it->second);
        conn->pending.erase(it);
        found = true;
      }
    }
    absl::StatusOr<common::Tensor> result;
    absl::Status read;
    if (h->type == FrameType::kCombine) {
      common::Tensor out(common::DType::kF32, {h->num_rows, h->hidden});
      read = ReadRows(conn->fd, h->row_dtype, out.data_as<float>(),
                      static_cast<size_t>(out.numel()), deadline, sum, &conn->closing);
      if (found && (h->num_rows != call.rows || h->hidden != call.hidden)) {
        result = absl::DataLossError(absl::StrCat(who, " answered [", h->num_rows, ", ", h->hidden,
                                                  "] for a dispatch of [", call.rows, ", ",
                                                  call.hidden, "]"));
      } else {
        result = std::move(out);
      }
    } else if (h->type == FrameType::kError) {
      std::string message(h->payload_bytes, '\0');
      read = internal::ReadFull(conn->fd, message.data(), message.size(), deadline, &conn->closing);
      sum.Update(message.data(), message.size());
      result = StatusFromErrorFrame(*h, absl::StrCat(who, ": ", message));
    } else {
      read = absl::DataLossError("a dispatch frame travelling back to the sender");
    }
    if (!read.ok()) {
      if (found) call.state->Complete(absl::DataLossError(absl::StrCat(who, ": ", read.message())));
      conn->Fail(absl::UnavailableError(absl::StrCat(who, ": connection lost: ", read.message())));
      return;
    }
    if (sum.Finish() != stored) {
      result = absl::DataLossError(absl::StrCat(who, ": frame checksum mismatch"));
    }
    if (found) call.state->Complete(std::move(result));
  }
}

// ---- server ----

struct TcpServer::Conn {
  int fd = -1;
  std::atomic<bool> finished{false};
  absl::Mutex write_mu;
  ~Conn() { internal::CloseFd(fd); }

  // Writes one answer frame; a failure closes the connection (the sender sees it).
  void Answer(const std::function<absl::Status(int)>& write) {
    absl::MutexLock lock(&write_mu);
    if (absl::Status s = write(fd); !s.ok()) ::shutdown(fd, SHUT_RDWR);
  }
};

absl::StatusOr<std::unique_ptr<TcpServer>> TcpServer::Start(const Options& options,
                                                            ExpertEndpoint* endpoint) {
  MOE_ASSIGN_OR_RETURN(internal::Listener l, internal::ListenTcp(options.host, options.port));
  std::unique_ptr<TcpServer> server(new TcpServer(options, endpoint));
  server->listen_fd_ = l.fd;
  server->port_ = l.port;
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  return server;
}

TcpServer::~TcpServer() { Stop(); }

std::string TcpServer::address() const {
  const bool v6 = options_.host.find(':') != std::string::npos;
  return v6 ? absl::StrCat("[", options_.host, "]:", port_) : absl::StrCat(options_.host, ":", port_);
}

void TcpServer::Stop() {
  if (stop_.exchange(true)) return;
  if (accept_thread_.joinable()) accept_thread_.join();
  internal::CloseFd(listen_fd_);
  listen_fd_ = -1;
  std::vector<ConnThread> threads;
  {
    absl::MutexLock lock(&mu_);
    for (auto& c : conns_) ::shutdown(c.conn->fd, SHUT_RDWR);
    threads.swap(conns_);
  }
  for (auto& c : threads) c.thread.join();
}

void TcpServer::AcceptLoop() {
  while (!stop_.load()) {
    absl::StatusOr<bool> readable =
        internal::WaitReadable(listen_fd_, absl::InfiniteFuture(), &stop_);
    if (!readable.ok() || !*readable) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_shared<Conn>();
    conn->fd = fd;
    std::vector<ConnThread> done;
    {
      absl::MutexLock lock(&mu_);
      if (stop_.load()) break;  // the fd closes with the last reference
      // Join the threads of connections that have ended.
      auto split = std::partition(conns_.begin(), conns_.end(),
                                  [](const ConnThread& c) { return !c.conn->finished.load(); });
      std::move(split, conns_.end(), std::back_inserter(done));
      conns_.erase(split, conns_.end());
      conns_.push_back({conn, std::thread([this, conn] { ConnLoop(conn); })});
    }
    for (auto& c : done) c.thread.join();
  }
}

void TcpServer::ConnLoop(std::shared_ptr<Conn> conn) {
  const frame::FrameLimits& limits = options_.limits;
  const absl::Duration io_timeout = options_.io_timeout;
  const uint32_t max_error = limits.max_error_bytes;
  auto malformed = [&](const absl::Status& status) {
    ++num_malformed_;
    if (MalformedFrames()) MalformedFrames()->Inc();
    MOE_LOG(WARNING) << "malformed dispatch frame" << common::Kv("code", common::StatusCodeName(status.code()))
                     << ": " << status.message();
  };
  auto reply_error = [&](uint64_t request_id, const absl::Status& status) {
    conn->Answer([&](int fd) {
      return WriteError(fd, request_id, status, absl::Now() + io_timeout, max_error);
    });
  };
  while (!stop_.load()) {
    uint8_t raw[frame::kHeaderBytes];
    absl::Status s = internal::ReadFull(conn->fd, raw, sizeof(raw), absl::InfiniteFuture(), &stop_);
    if (!s.ok()) {
      if (s.code() == absl::StatusCode::kDataLoss) {
        absl::Status bad = absl::DataLossError(absl::StrCat("truncated frame header: ", s.message()));
        malformed(bad);
        reply_error(0, bad);
      }
      break;
    }
    uint64_t request_id;
    std::memcpy(&request_id, raw + 8, sizeof(request_id));
    uint32_t claimed;
    std::memcpy(&claimed, raw + 56, sizeof(claimed));
    const absl::Time deadline = absl::Now() + io_timeout;
    absl::StatusOr<FrameHeader> h = frame::DecodeHeader(raw, limits);
    if (!h.ok() || h->type != FrameType::kDispatch) {
      absl::Status bad = h.ok() ? absl::InvalidArgumentError(absl::StrCat(
                                      "expected a dispatch frame, got type ",
                                      static_cast<int>(h->type)))
                                : h.status();
      malformed(bad);
      reply_error(request_id, bad);
      // The stream stays in step when the header itself was sound (magic, version, type) and
      // the length it claims is one we are willing to skip.
      if (bad.code() == absl::StatusCode::kInvalidArgument && claimed <= limits.max_payload_bytes &&
          Discard(conn->fd, claimed, deadline, &stop_).ok()) {
        continue;
      }
      break;
    }
    auto dispatch = std::make_shared<Dispatch>(Dispatch::Allocate(
        {.step_id = h->step_id, .epoch = h->epoch, .layer = h->layer, .source_rank = h->source_rank},
        h->num_rows, h->hidden, h->num_choices));
    frame::Checksum sum;
    const uint32_t stored = HeaderChecksumStart(raw, sum);
    const size_t pairs = static_cast<size_t>(h->num_rows) * h->num_choices;
    s = ReadRows(conn->fd, h->row_dtype, dispatch->rows.data_as<float>(),
                 static_cast<size_t>(dispatch->rows.numel()), deadline, sum, &stop_);
    if (s.ok()) s = internal::ReadFull(conn->fd, dispatch->slots.data(), pairs * 4, deadline, &stop_);
    if (s.ok()) {
      sum.Update(dispatch->slots.data(), pairs * 4);
      s = internal::ReadFull(conn->fd, dispatch->weights.data(), pairs * 4, deadline, &stop_);
      sum.Update(dispatch->weights.data(), pairs * 4);
    }
    if (!s.ok()) {
      if (s.code() != absl::StatusCode::kCancelled) {
        absl::Status bad = absl::DataLossError(absl::StrCat("dispatch payload: ", s.message()));
        malformed(bad);
        reply_error(request_id, bad);
      }
      break;
    }
    if (sum.Finish() != stored) {
      absl::Status bad = absl::DataLossError("dispatch frame checksum mismatch");
      malformed(bad);
      reply_error(request_id, bad);
      continue;
    }
    const WireDType dtype = h->row_dtype;
    endpoint_->Submit(std::move(dispatch), [conn, request_id, dtype, io_timeout,
                                            max_error](absl::StatusOr<common::Tensor> result) {
      conn->Answer([&](int fd) {
        const absl::Time deadline = absl::Now() + io_timeout;
        if (!result.ok()) return WriteError(fd, request_id, result.status(), deadline, max_error);
        const common::Tensor& out = *result;
        FrameHeader a;
        a.type = FrameType::kCombine;
        a.request_id = request_id;
        a.num_rows = static_cast<int32_t>(out.shape()[0]);
        a.hidden = static_cast<int32_t>(out.shape()[1]);
        a.row_dtype = dtype;
        std::vector<uint16_t> scratch;
        auto [data, bytes] = WireRows(out, dtype, scratch);
        return WriteFrame(fd, a, {iovec{const_cast<void*>(data), bytes}}, deadline);
      });
    });
  }
  ::shutdown(conn->fd, SHUT_RDWR);
  conn->finished = true;
}

}  // namespace moe::worker
