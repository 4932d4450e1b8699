// Transport round trips on both backends (inproc, tcp over 127.0.0.1:0), typed errors, dead
// peers, deadlines, and malformed frames on the TCP server and client.
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "worker/transport/frame.h"
#include "worker/transport/inproc.h"
#include "worker/transport/internal/socket.h"
#include "worker/transport/tcp.h"
#include "worker/transport/transport.h"

namespace moe::worker {
namespace {

using common::Tensor;

// combine[i] = (Σ_j weights[i, j] · (slots[i, j] + 1)) · rows[i]; slot 99 answers an error.
class ScaleEndpoint : public ExpertEndpoint {
 public:
  void Submit(std::shared_ptr<const Dispatch> d, Done done) override {
    ++calls;
    if (hang) {
      absl::MutexLock lock(&mu_);
      hung_.push_back(std::move(done));
      return;
    }
    if (d->meta.epoch != 3) {
      std::move(done)(StaleEpochError(d->meta.epoch, 3));
      return;
    }
    const int64_t n = d->num_rows(), h = d->hidden(), k = d->num_choices();
    Tensor out(common::DType::kF32, {n, h});
    for (int64_t i = 0; i < n; ++i) {
      float scale = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t s = d->slots.data_as<int32_t>()[i * k + j];
        if (s == 99) {
          std::move(done)(absl::NotFoundError("slot 99 is not loaded"));
          return;
        }
        if (s >= 0) scale += d->weights.data_as<float>()[i * k + j] * (s + 1);
      }
      for (int64_t c = 0; c < h; ++c) {
        out.data_as<float>()[i * h + c] = scale * d->rows.data_as<float>()[i * h + c];
      }
    }
    std::move(done)(std::move(out));
  }
  // Answers every hung call with kCancelled (so none is left unanswered at the end).
  void Release() {
    std::vector<Done> hung;
    {
      absl::MutexLock lock(&mu_);
      hung.swap(hung_);
    }
    for (Done& d : hung) std::move(d)(absl::CancelledError("released"));
  }
  ~ScaleEndpoint() override { Release(); }

  std::atomic<int> calls{0};
  std::atomic<bool> hang{false};

 private:
  absl::Mutex mu_;
  std::vector<Done> hung_;
};

std::shared_ptr<Dispatch> MakeDispatch(int64_t n, int64_t h, int64_t k, uint64_t epoch = 3,
                                       int32_t slot_base = 0) {
  auto d = std::make_shared<Dispatch>(
      Dispatch::Allocate({.step_id = 5, .epoch = epoch, .layer = 1, .source_rank = 0}, n, h, k));
  for (int64_t i = 0; i < n * h; ++i) d->rows.data_as<float>()[i] = 0.01f * static_cast<float>(i % 97) - 0.3f;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      if ((i + j) % 3 == 2) continue;  // some unused positions (-1)
      d->slots.data_as<int32_t>()[i * k + j] = slot_base + static_cast<int32_t>(j);
      d->weights.data_as<float>()[i * k + j] = 0.25f * static_cast<float>(j + 1);
    }
  }
  return d;
}

void ExpectScaled(const Dispatch& d, const Tensor& out, float tol = 0.0f) {
  ASSERT_EQ(out.shape(), (std::vector<int64_t>{d.num_rows(), d.hidden()}));
  const int64_t h = d.hidden(), k = d.num_choices();
  for (int64_t i = 0; i < d.num_rows(); ++i) {
    float scale = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = d.slots.data_as<int32_t>()[i * k + j];
      if (s >= 0) scale += d.weights.data_as<float>()[i * k + j] * (s + 1);
    }
    for (int64_t c = 0; c < h; ++c) {
      const float want = scale * d.rows.data_as<float>()[i * h + c];
      ASSERT_NEAR(out.data_as<float>()[i * h + c], want, tol + tol * std::abs(want))
          << "row " << i << " col " << c;
    }
  }
}

// ---- both backends ----

enum class Backend { kInproc, kTcp };

class TransportTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::kInproc) {
      auto t = std::make_unique<InprocTransport>(
          InprocTransportOptions{.dispatch_timeout = absl::Milliseconds(500)});
      t->AddEndpoint(0, &endpoint_);
      transport_ = std::move(t);
    } else {
      auto server = TcpServer::Start({}, &endpoint_);
      ASSERT_TRUE(server.ok()) << server.status();
      server_ = std::move(*server);
      transport_ = std::make_unique<TcpTransport>(TcpTransportOptions{
          .peers = {server_->address()}, .dispatch_timeout = absl::Milliseconds(500)});
    }
  }
  void TearDown() override {
    endpoint_.Release();
    transport_.reset();
    if (server_) server_->Stop();
  }

  ScaleEndpoint endpoint_;
  std::unique_ptr<TcpServer> server_;
  std::unique_ptr<Transport> transport_;
};

TEST_P(TransportTest, RoundTrip) {
  auto d = MakeDispatch(3, 16, 2);
  absl::StatusOr<Tensor> out = transport_->Wait(transport_->Send(0, d));
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectScaled(*d, *out);
}

TEST_P(TransportTest, ManyInFlightAndEmptyDispatch) {
  std::vector<std::shared_ptr<Dispatch>> ds;
  std::vector<CallId> calls;
  for (int i = 0; i < 16; ++i) {
    ds.push_back(MakeDispatch(i, 32, 1 + i % 4));
    calls.push_back(transport_->Send(0, ds.back()));
  }
  for (int i = 15; i >= 0; --i) {  // out of order
    absl::StatusOr<Tensor> out = transport_->Wait(calls[i]);
    ASSERT_TRUE(out.ok()) << "dispatch " << i << ": " << out.status();
    ExpectScaled(*ds[i], *out);
  }
}

TEST_P(TransportTest, WaitConsumesTheCall) {
  CallId call = transport_->Send(0, MakeDispatch(1, 8, 1));
  ASSERT_TRUE(transport_->Wait(call).ok());
  EXPECT_EQ(transport_->Wait(call).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(TransportTest, StaleEpochCarriesTheWorkerEpoch) {
  absl::StatusOr<Tensor> out = transport_->Wait(transport_->Send(0, MakeDispatch(2, 8, 2, /*epoch=*/2)));
  ASSERT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();
  ASSERT_TRUE(WorkerEpochFromStatus(out.status()).has_value()) << out.status();
  EXPECT_EQ(*WorkerEpochFromStatus(out.status()), 3u);
}

TEST_P(TransportTest, UnknownSlotIsNotFound) {
  auto d = MakeDispatch(2, 8, 1);
  d->slots.data_as<int32_t>()[0] = 99;
  absl::StatusOr<Tensor> out = transport_->Wait(transport_->Send(0, d));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kNotFound) << out.status();
  // The next dispatch on the same connection is fine.
  auto ok = MakeDispatch(2, 8, 1);
  absl::StatusOr<Tensor> again = transport_->Wait(transport_->Send(0, ok));
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectScaled(*ok, *again);
}

TEST_P(TransportTest, MalformedDispatchIsRejectedBeforeSending) {
  auto d = MakeDispatch(2, 8, 2);
  d->weights = Tensor(common::DType::kF32, {3, 2});
  EXPECT_EQ(transport_->Wait(transport_->Send(0, d)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(endpoint_.calls.load(), 0);
}

TEST_P(TransportTest, SilentPeerHitsTheDeadline) {
  endpoint_.hang = true;
  const absl::Time start = absl::Now();
  absl::StatusOr<Tensor> out = transport_->Wait(transport_->Send(0, MakeDispatch(1, 8, 1)));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  EXPECT_GE(took, absl::Milliseconds(450));
  EXPECT_LT(took, absl::Seconds(2));
  // An explicit earlier deadline wins.
  const absl::Time start2 = absl::Now();
  out = transport_->Wait(transport_->Send(0, MakeDispatch(1, 8, 1)), absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start2, absl::Milliseconds(450));
}

TEST_P(TransportTest, UnknownRankIsUnavailable) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Tensor> out = transport_->Wait(transport_->Send(7, MakeDispatch(1, 8, 1)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
}

INSTANTIATE_TEST_SUITE_P(Backends, TransportTest, ::testing::Values(Backend::kInproc, Backend::kTcp),
                         [](const auto& info) {
                           return info.param == Backend::kInproc ? "inproc" : "tcp";
                         });

// ---- inproc ----

TEST(InprocTransportTest, RemovedEndpointIsUnavailableAtOnce) {
  ScaleEndpoint endpoint;
  InprocTransport transport({.dispatch_timeout = absl::Seconds(5)});
  transport.AddEndpoint(0, &endpoint);
  transport.RemoveEndpoint(0);
  const absl::Time start = absl::Now();
  EXPECT_EQ(transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1))).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
}

TEST(InprocTransportTest, ZeroCopy) {
  // The endpoint sees the sender's own buffers.
  class Probe : public ExpertEndpoint {
   public:
    void Submit(std::shared_ptr<const Dispatch> d, Done done) override {
      seen = d->rows.data();
      std::move(done)(Tensor(common::DType::kF32, {d->num_rows(), d->hidden()}));
    }
    const void* seen = nullptr;
  } probe;
  InprocTransport transport({});
  transport.AddEndpoint(0, &probe);
  auto d = MakeDispatch(2, 8, 1);
  ASSERT_TRUE(transport.Wait(transport.Send(0, d)).ok());
  EXPECT_EQ(probe.seen, d->rows.data());
}

// ---- tcp ----

TEST(TcpTransportTest, NothingListeningIsUnavailableFast) {
  // Bind a port, close it: nothing listens there.
  auto l = internal::ListenTcp("127.0.0.1", 0);
  ASSERT_TRUE(l.ok());
  const int port = l->port;
  internal::CloseFd(l->fd);
  TcpTransport transport({.peers = {"127.0.0.1:" + std::to_string(port)},
                          .dispatch_timeout = absl::Seconds(5)});
  const absl::Time start = absl::Now();
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST(TcpTransportTest, ServerDeathFailsCallsInFlightAndLaterSends) {
  ScaleEndpoint endpoint;
  auto server = TcpServer::Start({}, &endpoint);
  ASSERT_TRUE(server.ok());
  TcpTransport transport({.peers = {(*server)->address()}, .dispatch_timeout = absl::Seconds(5)});
  ASSERT_TRUE(transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1, 3))).ok());
  endpoint.hang = true;
  CallId in_flight = transport.Send(0, MakeDispatch(1, 8, 1));
  const absl::Time start = absl::Now();
  std::thread killer([&] {
    absl::SleepFor(absl::Milliseconds(50));
    (*server)->Stop();
  });
  absl::StatusOr<Tensor> out = transport.Wait(in_flight);
  killer.join();
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  const absl::Time start2 = absl::Now();
  out = transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_LT(absl::Now() - start2, absl::Seconds(1));
  endpoint.Release();
}

TEST(TcpTransportTest, ReconnectsAfterTheServerComesBack) {
  ScaleEndpoint endpoint;
  auto server = TcpServer::Start({}, &endpoint);
  ASSERT_TRUE(server.ok());
  const int port = (*server)->port();
  TcpTransport transport({.peers = {(*server)->address()}});
  ASSERT_TRUE(transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1))).ok());
  (*server)->Stop();
  EXPECT_EQ(transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1))).status().code(),
            absl::StatusCode::kUnavailable);
  auto again = TcpServer::Start({.port = port}, &endpoint);
  ASSERT_TRUE(again.ok()) << again.status();
  auto d = MakeDispatch(4, 8, 2);
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, d));
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectScaled(*d, *out);
}

TEST(TcpTransportTest, Bf16OnTheWire) {
  ScaleEndpoint endpoint;
  auto server = TcpServer::Start({}, &endpoint);
  ASSERT_TRUE(server.ok());
  TcpTransport transport({.peers = {(*server)->address()}, .wire_dtype = frame::WireDType::kBF16});
  auto d = MakeDispatch(5, 64, 2);
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, d));
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectScaled(*d, *out, /*tol=*/2e-2f);
}

// ---- malformed frames against the server ----

class RawClient {
 public:
  explicit RawClient(const std::string& address) {
    auto fd = internal::ConnectTcp(address, absl::Seconds(2));
    EXPECT_TRUE(fd.ok()) << fd.status();
    fd_ = fd.ok() ? *fd : -1;
  }
  ~RawClient() { internal::CloseFd(fd_); }

  void Write(const void* data, size_t n) {
    iovec iov{const_cast<void*>(data), n};
    ASSERT_TRUE(internal::WriteFull(fd_, &iov, 1, absl::Now() + absl::Seconds(2)).ok());
  }
  // A frame with a correct checksum unless `corrupt`.
  void WriteFrame(frame::FrameHeader h, const std::vector<uint8_t>& payload, bool corrupt = false) {
    uint8_t raw[frame::kHeaderBytes];
    h.checksum = 0;
    frame::EncodeHeader(h, raw);
    frame::Checksum sum;
    sum.Update(raw, frame::kHeaderBytes - 4);
    sum.Update(payload.data(), payload.size());
    h.checksum = sum.Finish() + (corrupt ? 1 : 0);
    frame::EncodeHeader(h, raw);
    Write(raw, sizeof(raw));
    if (!payload.empty()) Write(payload.data(), payload.size());
  }
  // Reads one answer: the status an error frame carries, or OK for a combine.
  absl::Status ReadAnswer(frame::FrameHeader* out = nullptr) {
    uint8_t raw[frame::kHeaderBytes];
    absl::Status s = internal::ReadFull(fd_, raw, sizeof(raw), absl::Now() + absl::Seconds(3));
    if (!s.ok()) return absl::InternalError(absl::StrCat("no answer: ", s.message()));
    absl::StatusOr<frame::FrameHeader> h = frame::DecodeHeader(raw, {});
    if (!h.ok()) return absl::InternalError(absl::StrCat("bad answer: ", h.status().message()));
    if (out) *out = *h;
    std::string payload(h->payload_bytes, '\0');
    s = internal::ReadFull(fd_, payload.data(), payload.size(), absl::Now() + absl::Seconds(3));
    if (!s.ok()) return absl::InternalError("truncated answer");
    if (h->type == frame::FrameType::kError) {
      return absl::Status(static_cast<absl::StatusCode>(h->status_code), payload);
    }
    return absl::OkStatus();
  }
  // True when the server has closed the connection.
  bool Closed() {
    char c;
    absl::Status s = internal::ReadFull(fd_, &c, 1, absl::Now() + absl::Seconds(3));
    return s.code() == absl::StatusCode::kUnavailable;
  }
  void ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }

 private:
  int fd_ = -1;
};

frame::FrameHeader DispatchHeader(int32_t n, int32_t h, int32_t k) {
  frame::FrameHeader f;
  f.type = frame::FrameType::kDispatch;
  f.request_id = 42;
  f.epoch = 3;
  f.layer = 1;
  f.num_rows = n;
  f.hidden = h;
  f.num_choices = k;
  f.payload_bytes = static_cast<uint32_t>(frame::ExpectedPayloadBytes(f));
  return f;
}

std::vector<uint8_t> DispatchPayload(int32_t n, int32_t h, int32_t k) {
  std::vector<uint8_t> p(static_cast<size_t>(n) * h * 4 + static_cast<size_t>(n) * k * 8, 0);
  // slots = 0, weights = 1
  float one = 1.0f;
  for (int32_t i = 0; i < n * k; ++i) {
    std::memcpy(p.data() + static_cast<size_t>(n) * h * 4 + static_cast<size_t>(n) * k * 4 + i * 4, &one, 4);
  }
  return p;
}

class MalformedFrameTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = TcpServer::Start({.io_timeout = absl::Seconds(2)}, &endpoint_);
    ASSERT_TRUE(server.ok());
    server_ = std::move(*server);
  }
  // A well-behaved client is still served.
  void ExpectOthersServed() {
    TcpTransport transport({.peers = {server_->address()}});
    auto d = MakeDispatch(3, 16, 2);
    absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, d));
    ASSERT_TRUE(out.ok()) << out.status();
    ExpectScaled(*d, *out);
  }
  ScaleEndpoint endpoint_;
  std::unique_ptr<TcpServer> server_;
};

TEST_F(MalformedFrameTest, BadMagicIsDataLossAndClosesOnlyThatConnection) {
  RawClient bystander(server_->address());
  RawClient raw(server_->address());
  std::vector<uint8_t> junk(frame::kHeaderBytes, 0xab);
  raw.Write(junk.data(), junk.size());
  EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(raw.Closed());
  // The connection opened before is still served.
  bystander.WriteFrame(DispatchHeader(2, 8, 1), DispatchPayload(2, 8, 1));
  EXPECT_TRUE(bystander.ReadAnswer().ok());
  ExpectOthersServed();
  EXPECT_GE(server_->num_malformed_frames(), 1);
}

TEST_F(MalformedFrameTest, BadVersionIsDataLoss) {
  RawClient raw(server_->address());
  frame::FrameHeader h = DispatchHeader(1, 8, 1);
  h.version = 9;
  raw.WriteFrame(h, DispatchPayload(1, 8, 1));
  EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kDataLoss);
  ExpectOthersServed();
}

TEST_F(MalformedFrameTest, TruncatedPayloadIsDataLoss) {
  RawClient raw(server_->address());
  frame::FrameHeader h = DispatchHeader(4, 16, 2);
  uint8_t header[frame::kHeaderBytes];
  frame::EncodeHeader(h, header);
  raw.Write(header, sizeof(header));
  std::vector<uint8_t> part(10, 0);
  raw.Write(part.data(), part.size());
  raw.ShutdownWrite();
  absl::Status answer = raw.ReadAnswer();
  EXPECT_EQ(answer.code(), absl::StatusCode::kDataLoss) << answer;
  EXPECT_NE(answer.message().find("truncated"), absl::string_view::npos) << answer;
  ExpectOthersServed();
}

TEST_F(MalformedFrameTest, TruncatedHeaderIsDataLoss) {
  RawClient raw(server_->address());
  uint8_t header[frame::kHeaderBytes];
  frame::EncodeHeader(DispatchHeader(1, 8, 1), header);
  raw.Write(header, 20);
  raw.ShutdownWrite();
  EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kDataLoss);
  ExpectOthersServed();
}

TEST_F(MalformedFrameTest, LengthThatDoesNotMatchTheShapeIsInvalidArgumentAndTheStreamGoesOn) {
  RawClient raw(server_->address());
  frame::FrameHeader h = DispatchHeader(2, 8, 1);
  h.payload_bytes += 12;
  std::vector<uint8_t> payload = DispatchPayload(2, 8, 1);
  payload.resize(payload.size() + 12);
  raw.WriteFrame(h, payload);
  absl::Status answer = raw.ReadAnswer();
  EXPECT_EQ(answer.code(), absl::StatusCode::kInvalidArgument) << answer;
  // Same connection, a good frame next.
  raw.WriteFrame(DispatchHeader(2, 8, 1), DispatchPayload(2, 8, 1));
  frame::FrameHeader ok;
  EXPECT_TRUE(raw.ReadAnswer(&ok).ok());
  EXPECT_EQ(ok.type, frame::FrameType::kCombine);
  EXPECT_EQ(ok.num_rows, 2);
}

TEST_F(MalformedFrameTest, HugeLengthsAreRefusedWithoutAllocating) {
  {
    RawClient raw(server_->address());
    frame::FrameHeader h = DispatchHeader(1, 8, 1);
    h.num_rows = 1 << 30;  // beyond max_rows
    raw.WriteFrame(h, {});
    EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    RawClient raw(server_->address());
    frame::FrameHeader h = DispatchHeader(1 << 20, 1 << 16, 1);  // shape within bounds, 256 GiB
    h.payload_bytes = 0xffffffffu;
    raw.WriteFrame(h, {});
    EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(raw.Closed());  // cannot skip 4 GiB: this connection ends
  }
  ExpectOthersServed();
}

TEST_F(MalformedFrameTest, ChecksumMismatchIsDataLossAndTheStreamGoesOn) {
  RawClient raw(server_->address());
  raw.WriteFrame(DispatchHeader(2, 8, 1), DispatchPayload(2, 8, 1), /*corrupt=*/true);
  EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kDataLoss);
  raw.WriteFrame(DispatchHeader(2, 8, 1), DispatchPayload(2, 8, 1));
  EXPECT_TRUE(raw.ReadAnswer().ok());
  EXPECT_EQ(endpoint_.calls.load(), 1);
}

TEST_F(MalformedFrameTest, CombineSentToTheServerIsInvalidArgument) {
  RawClient raw(server_->address());
  frame::FrameHeader h;
  h.type = frame::FrameType::kCombine;
  h.num_rows = 1;
  h.hidden = 4;
  h.payload_bytes = 16;
  raw.WriteFrame(h, std::vector<uint8_t>(16, 0));
  EXPECT_EQ(raw.ReadAnswer().code(), absl::StatusCode::kInvalidArgument);
  raw.WriteFrame(DispatchHeader(1, 8, 1), DispatchPayload(1, 8, 1));
  EXPECT_TRUE(raw.ReadAnswer().ok());
}

// ---- malformed answers against the client ----

TEST(TcpTransportTest, GarbageAnswerIsDataLoss) {
  auto listener = internal::ListenTcp("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok());
  std::thread fake([fd = listener->fd] {
    absl::StatusOr<bool> r = internal::WaitReadable(fd, absl::Now() + absl::Seconds(3), nullptr);
    if (!r.ok() || !*r) return;
    int conn = ::accept(fd, nullptr, nullptr);
    std::vector<uint8_t> buf(frame::kHeaderBytes + 8 * 4 + 8, 0);
    (void)internal::ReadFull(conn, buf.data(), buf.size(), absl::Now() + absl::Seconds(3));
    std::vector<uint8_t> junk(frame::kHeaderBytes, 0x5a);
    iovec iov{junk.data(), junk.size()};
    (void)internal::WriteFull(conn, &iov, 1, absl::Now() + absl::Seconds(3));
    absl::SleepFor(absl::Milliseconds(200));
    ::close(conn);
  });
  TcpTransport transport({.peers = {"127.0.0.1:" + std::to_string(listener->port)},
                          .dispatch_timeout = absl::Seconds(3)});
  const absl::Time start = absl::Now();
  absl::StatusOr<Tensor> out = transport.Wait(transport.Send(0, MakeDispatch(1, 8, 1)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  fake.join();
  internal::CloseFd(listener->fd);
}

// ---- frame codec ----

TEST(FrameTest, HeaderRoundTripAndLimits) {
  frame::FrameHeader h = DispatchHeader(3, 16, 2);
  h.step_id = 77;
  h.source_rank = 2;
  uint8_t raw[frame::kHeaderBytes];
  frame::EncodeHeader(h, raw);
  absl::StatusOr<frame::FrameHeader> back = frame::DecodeHeader(raw, {});
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->step_id, 77u);
  EXPECT_EQ(back->source_rank, 2);
  EXPECT_EQ(back->payload_bytes, 3u * 16 * 4 + 3 * 2 * 8);
  h.num_choices = 0;
  frame::EncodeHeader(h, raw);
  EXPECT_EQ(frame::DecodeHeader(raw, {}).status().code(), absl::StatusCode::kInvalidArgument);
  h = DispatchHeader(3, 16, 2);
  h.type = static_cast<frame::FrameType>(9);
  frame::EncodeHeader(h, raw);
  EXPECT_EQ(frame::DecodeHeader(raw, {}).status().code(), absl::StatusCode::kDataLoss);
}

TEST(FrameTest, ChecksumIsIndependentOfHowTheBytesAreSplit) {
  std::vector<uint8_t> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31);
  frame::Checksum whole;
  whole.Update(data.data(), data.size());
  frame::Checksum parts;
  parts.Update(data.data(), 7);
  parts.Update(data.data() + 7, 60);
  parts.Update(data.data() + 67, data.size() - 67);
  EXPECT_EQ(whole.Finish(), parts.Finish());
  data[500] ^= 1;
  frame::Checksum changed;
  changed.Update(data.data(), data.size());
  EXPECT_NE(whole.Finish(), changed.Finish());
}

}  // namespace
}  // namespace moe::worker
