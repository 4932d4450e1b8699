// Microbenchmarks of the CPU matmul kernels through the public API (kernels/kernels.h).
//
//   cpu_kernels_bench --benchmark_filter=Linear
//   MOE_CPU_THREADS=1 cpu_kernels_bench    # one core: the CPU-time column is then the
//                                          # kernel's own time even on a busy machine
//
// Weights are cycled through enough copies (≥ 256 MiB) that every iteration reads them from
// memory, not the 32 MiB L3, as a decode step does (each layer has its own weights).
// Counters: weight_GB/s = weight bytes touched per second (compare with the measured read
// bandwidth, bench/results/machine_limits.json); GFLOP/s = 2·M·N·K per second (compare
// with the bf16 matmul peak).
#include <algorithm>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include <immintrin.h>

#include "benchmark/benchmark.h"
#include "common/dtype.h"
#include "common/thread_pool.h"
#include "common/tensor.h"
#include "kernels/kernels.h"

namespace moe::kernels {
namespace {

using common::DType;
using common::Tensor;

constexpr int64_t kRotateBytes = int64_t{256} << 20;

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor t(dtype, std::move(shape));
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == DType::kBF16) {
      t.data_as<uint16_t>()[i] = common::F32ToBf16(dist(gen) * 0.05f);
    } else {
      t.data_as<float>()[i] = dist(gen);
    }
  }
  return t;
}

void SetCounters(benchmark::State& state, double bytes, double flops) {
  state.counters["weight_GB/s"] = benchmark::Counter(
      bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Baseline: a plain AVX-512 read of the same rotating 8 MiB buffers on the kernels' thread pool
// (64 KiB chunks), i.e. what streaming weights can reach under the current conditions. The
// kernels' weight_GB/s divided by this is their fraction of achievable bandwidth even when
// the machine is not idle; machine_limits.json has the quiet-machine limit.
__attribute__((target("avx512f"))) float ReadSum(const float* p, int64_t n) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 128) {
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(p + i + 16 * j));
  }
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc[0]);
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}

void BM_ReadBaseline(benchmark::State& state) {
  if (!__builtin_cpu_supports("avx512f")) {
    state.SkipWithError("no AVX-512");
    return;
  }
  const int64_t bytes = int64_t{8} << 20, chunk = int64_t{64} << 10;
  const int copies = static_cast<int>(kRotateBytes / bytes);
  std::vector<Tensor> buffers;
  for (int i = 0; i < copies; ++i) buffers.push_back(RandomTensor(DType::kF32, {bytes / 4}, i));
  int next = 0;
  std::vector<float> sums(bytes / chunk);
  for (auto _ : state) {
    const float* data = buffers[next].data_as<float>();
    common::ThreadPool::Default().ParallelFor(bytes / chunk, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) sums[c] = ReadSum(data + c * chunk / 4, chunk / 4);
    });
    benchmark::DoNotOptimize(sums.data());
    next = (next + 1) % copies;
  }
  SetCounters(state, static_cast<double>(bytes), 0.0);
}
BENCHMARK(BM_ReadBaseline)->UseRealTime()->MinTime(0.5);

// Linear bf16: args M, N (K = 1024).
void BM_LinearBf16(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = 1024;
  const int64_t weight_bytes = n * k * 2;
  const int copies = static_cast<int>(std::max<int64_t>(1, kRotateBytes / weight_bytes));
  std::vector<Tensor> weights;
  for (int i = 0; i < copies; ++i) weights.push_back(RandomTensor(DType::kBF16, {n, k}, i));
  Tensor in = RandomTensor(DType::kF32, {m, k}, 99), out(DType::kF32, {m, n});
  int next = 0;
  for (auto _ : state) {
    absl::Status s = Linear({.in = in.view(), .weight = weights[next].view(), .out = out.view()});
    if (!s.ok()) state.SkipWithError(std::string(s.message()).c_str());
    next = (next + 1) % copies;
    benchmark::DoNotOptimize(out.data());
  }
  SetCounters(state, static_cast<double>(weight_bytes), 2.0 * m * n * k);
}
BENCHMARK(BM_LinearBf16)
    ->ArgNames({"M", "N"})
    ->ArgsProduct({{1, 8, 32, 512}, {1024, 4096}})
    ->UseRealTime()
    ->MinTime(0.5);

// ExpertFfn bf16 with the qwen2_moe `small` shapes: hidden 1024, 64 experts, FF 256, top-8,
// uniform random routing. Arg: T tokens.
void BM_ExpertFfnBf16(benchmark::State& state) {
  const int64_t t = state.range(0), h = 1024, f = 256, e = 64, k = 8;
  const int64_t expert_bytes = 3 * h * f * 2;
  const int layers = static_cast<int>(std::max<int64_t>(1, kRotateBytes / (e * expert_bytes)));
  std::vector<std::vector<Tensor>> storage(layers);
  std::vector<std::vector<SwigluWeights>> experts(layers);
  for (int l = 0; l < layers; ++l) {
    for (int i = 0; i < e; ++i) {
      uint32_t seed = static_cast<uint32_t>(l * 1000 + i * 3);
      storage[l].push_back(RandomTensor(DType::kBF16, {f, h}, seed));
      storage[l].push_back(RandomTensor(DType::kBF16, {f, h}, seed + 1));
      storage[l].push_back(RandomTensor(DType::kBF16, {h, f}, seed + 2));
      experts[l].push_back({storage[l][3 * i].view(), storage[l][3 * i + 1].view(),
                            storage[l][3 * i + 2].view()});
    }
  }
  Tensor x = RandomTensor(DType::kF32, {t, h}, 7), out(DType::kF32, {t, h});
  Tensor ids(DType::kI32, {t, k}), weights(DType::kF32, {t, k});
  std::mt19937 gen(5);
  std::set<int> touched;
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int> pool(e);
    for (int j = 0; j < e; ++j) pool[j] = j;
    std::shuffle(pool.begin(), pool.end(), gen);
    for (int j = 0; j < k; ++j) {
      ids.data_as<int32_t>()[i * k + j] = pool[j];
      weights.data_as<float>()[i * k + j] = 1.0f / k;
      touched.insert(pool[j]);
    }
  }
  int next = 0;
  for (auto _ : state) {
    absl::Status s = ExpertFfn({.x = x.view(), .topk_ids = ids.view(),
                                .topk_weights = weights.view(), .experts = &experts[next],
                                .out = out.view()});
    if (!s.ok()) state.SkipWithError(std::string(s.message()).c_str());
    next = (next + 1) % layers;
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["experts_touched"] = static_cast<double>(touched.size());
  SetCounters(state, static_cast<double>(touched.size() * expert_bytes),
              2.0 * t * k * 3 * h * f);
}
BENCHMARK(BM_ExpertFfnBf16)->ArgName("T")->Arg(1)->Arg(8)->Arg(32)->Arg(512)->UseRealTime()
    ->MinTime(0.5);

}  // namespace
}  // namespace moe::kernels

// MOE_CPU_THREADS=N sets the kernel thread pool size (default: all CPUs).
int main(int argc, char** argv) {
  if (const char* threads = std::getenv("MOE_CPU_THREADS")) {
    moe::kernels::SetCpuThreads(std::atoi(threads));
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
