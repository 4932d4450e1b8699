// worker_transport_bench: framed TCP (TcpTransport/TcpServer) against a gRPC bidirectional
// stream on loopback, for the same dispatch/combine exchange. The expert side only copies the
// rows into the combine, so the numbers are the data plane's own cost.
//
//   worker_transport_bench [--iters N]
// Prints one line per (transport, shape): median and p99 round-trip time, round trips per
// second and payload GB/s (dispatch + combine bytes). Results: worker/transport/README.md.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "dispatch_bench.grpc.pb.h"
#include "worker/transport/tcp.h"

namespace moe::worker {
namespace {

namespace bpb = ::moe::worker::bench;

class CopyEndpoint : public ExpertEndpoint {
 public:
  void Submit(std::shared_ptr<const Dispatch> d, Done done) override {
    common::Tensor out(common::DType::kF32, {d->num_rows(), d->hidden()});
    std::memcpy(out.data(), d->rows.data(), d->rows.numel() * sizeof(float));
    std::move(done)(std::move(out));
  }
};

class GrpcEcho final : public bpb::DispatchBench::Service {
 public:
  grpc::Status Stream(grpc::ServerContext*,
                      grpc::ServerReaderWriter<bpb::BenchCombine, bpb::BenchDispatch>* stream) override {
    bpb::BenchDispatch d;
    bpb::BenchCombine c;
    while (stream->Read(&d)) {
      c.set_num_rows(d.num_rows());
      c.set_hidden(d.hidden());
      c.set_rows(d.rows());
      if (!stream->Write(c)) break;
    }
    return grpc::Status::OK;
  }
};

struct Shape {
  const char* name;
  int64_t rows, hidden, k;
};

struct Result {
  double median_us, p99_us, per_s, gbps;
};

Result Summarise(std::vector<double> us, double bytes_per_trip) {
  std::sort(us.begin(), us.end());
  double total = 0;
  for (double v : us) total += v;
  Result r;
  r.median_us = us[us.size() / 2];
  r.p99_us = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  r.per_s = 1e6 * us.size() / total;
  r.gbps = bytes_per_trip * r.per_s / 1e9;
  return r;
}

std::shared_ptr<Dispatch> MakeDispatch(const Shape& s) {
  auto d = std::make_shared<Dispatch>(
      Dispatch::Allocate({.step_id = 1, .epoch = 1, .layer = 1}, s.rows, s.hidden, s.k));
  for (int64_t i = 0; i < d->rows.numel(); ++i) d->rows.data_as<float>()[i] = 0.001f * (i % 1000);
  for (int64_t i = 0; i < s.rows * s.k; ++i) {
    d->slots.data_as<int32_t>()[i] = static_cast<int32_t>(i % 8);
    d->weights.data_as<float>()[i] = 0.125f;
  }
  return d;
}

double TripBytes(const Shape& s, double elem) {
  return s.rows * s.hidden * elem * 2 + s.rows * s.k * 8.0;
}

Result RunFramed(const Shape& s, int iters, frame::WireDType dtype) {
  CopyEndpoint endpoint;
  auto server = TcpServer::Start({}, &endpoint);
  if (!server.ok()) std::abort();
  TcpTransport transport({.peers = {(*server)->address()}, .wire_dtype = dtype});
  auto d = MakeDispatch(s);
  for (int i = 0; i < 200; ++i) (void)transport.Wait(transport.Send(0, d));
  std::vector<double> us;
  us.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<common::Tensor> out = transport.Wait(transport.Send(0, d));
    us.push_back(absl::ToDoubleMicroseconds(absl::Now() - t0));
    if (!out.ok()) std::abort();
  }
  (*server)->Stop();
  return Summarise(us, TripBytes(s, dtype == frame::WireDType::kBF16 ? 2 : 4));
}

Result RunGrpc(const Shape& s, int iters) {
  GrpcEcho service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = bpb::DispatchBench::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->Stream(&ctx);
  auto d = MakeDispatch(s);
  bpb::BenchDispatch msg;
  bpb::BenchCombine reply;
  auto trip = [&] {
    // What a gRPC data plane does per dispatch: fill the message from the tensors.
    msg.set_step_id(1);
    msg.set_epoch(1);
    msg.set_layer(1);
    msg.set_num_rows(static_cast<int32_t>(s.rows));
    msg.set_hidden(static_cast<int32_t>(s.hidden));
    msg.set_num_choices(static_cast<int32_t>(s.k));
    msg.set_rows(d->rows.data(), d->rows.numel() * 4);
    msg.set_slots(d->slots.data(), d->slots.numel() * 4);
    msg.set_weights(d->weights.data(), d->weights.numel() * 4);
    if (!stream->Write(msg) || !stream->Read(&reply)) std::abort();
    common::Tensor out(common::DType::kF32, {s.rows, s.hidden});
    std::memcpy(out.data(), reply.rows().data(), reply.rows().size());
  };
  for (int i = 0; i < 200; ++i) trip();
  std::vector<double> us;
  us.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    const absl::Time t0 = absl::Now();
    trip();
    us.push_back(absl::ToDoubleMicroseconds(absl::Now() - t0));
  }
  stream->WritesDone();
  (void)stream->Finish();
  server->Shutdown();
  return Summarise(us, TripBytes(s, 4));
}

void Print(const char* transport, const Shape& s, const Result& r) {
  std::printf("%-14s %-22s median %8.1f us  p99 %8.1f us  %9.0f trips/s  %6.3f GB/s\n", transport,
              s.name, r.median_us, r.p99_us, r.per_s, r.gbps);
}

}  // namespace
}  // namespace moe::worker

int main(int argc, char** argv) {
  using namespace moe::worker;
  int iters = 3000;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iters") iters = std::atoi(argv[i + 1]);
  }
  const Shape shapes[] = {{"small 1x1024 k8", 1, 1024, 8}, {"32x1024 k8", 32, 1024, 8},
                          {"256x1024 k8", 256, 1024, 8}};
  for (const Shape& s : shapes) {
    Print("framed-f32", s, RunFramed(s, iters, frame::WireDType::kF32));
    Print("framed-bf16", s, RunFramed(s, iters, frame::WireDType::kBF16));
    Print("grpc-stream", s, RunGrpc(s, iters));
  }
  return 0;
}
