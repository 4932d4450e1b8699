// moe-bench-kernels: Google Benchmark micro-benchmarks of single kernels, one thread.
//
// Add a kernel's benchmark next to the ones here: time the kernel alone, set
// SetBytesProcessed (bandwidth-bound kernels) or a "FLOPS" counter (compute-bound ones), and
// sweep the sizes the models use. Compare with bench/results/machine_limits.json.
//
//   moe-bench-kernels --benchmark_filter=ReadBandwidth --benchmark_min_time=0.2
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "bench/memory_kernels.h"
#include "benchmark/benchmark.h"

namespace moe::bench {
namespace {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// Read-only sum over a buffer of state.range(0) bytes: L1, L2, L3 and DRAM sizes. Reported as
// bytes_per_second; the DRAM point is the one-core counterpart of moe-bench-limits' number.
void BM_ReadBandwidth(benchmark::State& state) {
  if (!__builtin_cpu_supports("avx512f")) {
    state.SkipWithError("needs AVX-512F");
    return;
  }
  const int64_t bytes = state.range(0);
  const int64_t n = bytes / sizeof(float) / kFloatsPerBlock * kFloatsPerBlock;
  std::unique_ptr<float, FreeDeleter> data(
      static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))));
  for (int64_t i = 0; i < n; ++i) data.get()[i] = static_cast<float>(i & 0xff);
  for (auto _ : state) {
    benchmark::DoNotOptimize(ReadSumAvx512(data.get(), n));
  }
  state.SetBytesProcessed(state.iterations() * n * static_cast<int64_t>(sizeof(float)));
}
BENCHMARK(BM_ReadBandwidth)
    ->Arg(int64_t{16} << 10)    // L1 (32 KiB per core)
    ->Arg(int64_t{512} << 10)   // L2 (1 MiB per core)
    ->Arg(int64_t{16} << 20)    // L3 (32 MiB shared)
    ->Arg(int64_t{512} << 20);  // DRAM

}  // namespace
}  // namespace moe::bench

BENCHMARK_MAIN();
