// moe-bench-limits: measures the limits this machine puts on inference, which the project's
// performance targets are stated against (see bench/README.md):
//   - memory read bandwidth (read-only sum over a buffer far larger than L3, AVX-512 loads, one
//     pinned thread per core, best of N runs), single-core read bandwidth, copy bandwidth;
//   - the peak of a register-blocked AVX512-BF16 (vdpbf16ps) microkernel on L1-resident data,
//     per core and on all cores, with an f32 FMA microkernel next to it;
//   - achieved bf16×bf16→f32 matmul throughput of oneDNN and f32 sgemm of OpenBLAS, all cores,
//     at 2048³ and at shapes of MoE expert FFNs.
// Prints a table; --json FILE writes the numbers with the machine description, and --record
// also stores a dated copy plus a summary row under bench/results/.
//
//   moe-bench-limits --json bench/results/machine_limits.json
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "bench/memory_kernels.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/status.h"

#if MOE_BENCH_HAVE_DNNL
#include "oneapi/dnnl/dnnl.hpp"
#endif
#if MOE_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif
#if MOE_BENCH_HAVE_OPENMP
#include <omp.h>
#endif

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// Keeps results of timed loops alive so the compiler cannot drop the loops.
std::atomic<double> g_sink{0};

struct Options {
  std::string json_path;
  bool record = false;
  int threads = 0;
  int64_t buffer_mib = 1024;
  int runs = 10;
  bool skip_libraries = false;
};

// --- Pinned threads ----------------------------------------------------------------------

// The CPUs this process may run on, in order.
std::vector<int> AllowedCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
    }
  }
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

// Runs body(thread, run) on `threads` new threads, thread t pinned to the t-th allowed CPU
// (wrapping around when there are more threads than CPUs), `runs` times in
// lock step, after setup(thread) ran once on each. Returns the wall time of each run, from the
// barrier that starts it to the barrier that ends it. The calling thread is not pinned, so
// threads that libraries create later do not inherit a one-CPU affinity.
std::vector<double> RunPinned(int threads, int runs, const std::function<void(int)>& setup,
                              const std::function<void(int, int)>& body) {
  std::vector<double> seconds(runs, 0.0);
  std::barrier sync(threads);
  std::vector<std::thread> team;
  const std::vector<int> cpus = AllowedCpus();
  for (int t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      int cpu = cpus[t % cpus.size()];
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpu, &set);
      if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
        MOE_LOG(WARNING) << "could not pin thread" << common::Kv("cpu", cpu);
      }
      setup(t);
      for (int run = 0; run < runs; ++run) {
        sync.arrive_and_wait();
        Clock::time_point start = Clock::now();
        body(t, run);
        sync.arrive_and_wait();
        if (t == 0) seconds[run] = SecondsSince(start);
      }
    });
  }
  for (std::thread& thread : team) thread.join();
  return seconds;
}

// --- Memory bandwidth --------------------------------------------------------------------

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

struct AlignedBuffer {
  std::unique_ptr<float, FreeDeleter> memory;
  float* data = nullptr;  // memory.get()
  int64_t floats = 0;
};

// GB/s of each run of one measurement, over all rounds.
struct BandwidthSamples {
  std::vector<double> gbs;
  double Best() const { return gbs.empty() ? 0 : *std::max_element(gbs.begin(), gbs.end()); }
  double MedianGbs() const { return Median(gbs); }
};

struct MemoryResults {
  BandwidthSamples read_all, read_single, copy_all, copy_single;
  int64_t buffer_bytes = 0;
  int rounds = 0;
};

// [begin, end) of thread t's share of n floats, in whole blocks.
std::pair<int64_t, int64_t> Share(int64_t n, int threads, int t) {
  int64_t blocks = n / kFloatsPerBlock;
  int64_t begin = blocks * t / threads, end = blocks * (t + 1) / threads;
  return {begin * kFloatsPerBlock, end * kFloatsPerBlock};
}

void AddSamples(const std::vector<double>& seconds, double bytes, BandwidthSamples* out) {
  for (double s : seconds) out->gbs.push_back(bytes / s / 1e9);
}

void ReadRun(const float* data, int64_t n, int threads, int runs, BandwidthSamples* out) {
  std::vector<double> seconds = RunPinned(
      threads, runs, [](int) {},
      [&](int t, int) {
        auto [begin, end] = Share(n, threads, t);
        g_sink.fetch_add(ReadSumAvx512(data + begin, end - begin), std::memory_order_relaxed);
      });
  AddSamples(seconds, static_cast<double>(n) * sizeof(float), out);
}

void CopyRun(const float* src, float* dst, int64_t n, int threads, int runs,
             BandwidthSamples* out) {
  std::vector<double> seconds = RunPinned(threads, runs, [](int) {}, [&](int t, int) {
    auto [begin, end] = Share(n, threads, t);
    CopyAvx512(src + begin, dst + begin, end - begin);
  });
  // STREAM convention: a copy moves each byte twice (read + write); write-allocate traffic
  // is not counted.
  AddSamples(seconds, 2.0 * static_cast<double>(n) * sizeof(float), out);
}

// A buffer of about `mib` MiB in 2 MiB pages, first touched by the threads that will read it.
AlignedBuffer AllocateBuffer(int64_t mib, int threads) {
  constexpr int64_t kHugePage = int64_t{2} << 20;
  int64_t bytes = (mib << 20) / kHugePage * kHugePage;
  AlignedBuffer buffer;
  buffer.memory.reset(static_cast<float*>(std::aligned_alloc(kHugePage, bytes)));
  buffer.data = buffer.memory.get();
  MOE_CHECK(buffer.data != nullptr) << "cannot allocate " << bytes << " bytes";
  buffer.floats = bytes / sizeof(float);
  madvise(buffer.data, bytes, MADV_HUGEPAGE);  // fewer TLB misses; a hint only
  RunPinned(threads, 1, [&](int t) {
    auto [begin, end] = Share(buffer.floats, threads, t);
    for (int64_t i = begin; i < end; ++i) buffer.data[i] = static_cast<float>(i & 0xff);
  }, [](int, int) {});
  return buffer;
}

// One round of every memory measurement. The program runs three rounds seconds apart: on a
// virtual machine the memory bandwidth left by neighbours changes over seconds (30 to 53 GB/s
// on the CI machine), and the best of runs spread over time is closer to the machine's limit
// than the best of one burst.
void MeasureMemoryRound(const AlignedBuffer& buffer, int threads, int runs,
                        MemoryResults* results) {
  results->buffer_bytes = buffer.floats * static_cast<int64_t>(sizeof(float));
  ++results->rounds;
  ReadRun(buffer.data, buffer.floats, threads, runs, &results->read_all);
  ReadRun(buffer.data, buffer.floats, 1, runs, &results->read_single);
  // Copy the first half onto the second: each half is still far larger than L3.
  int64_t half = buffer.floats / 2 / kFloatsPerBlock * kFloatsPerBlock;
  CopyRun(buffer.data, buffer.data + half, half, threads, runs, &results->copy_all);
  CopyRun(buffer.data, buffer.data + half, half, 1, runs, &results->copy_single);
}

// --- Microkernels ------------------------------------------------------------------------

// Register blocking of the microkernels: C is kMr rows × kNrVecs zmm columns, all in
// registers (24 accumulators + 2 B vectors + 1 broadcast of 32 zmm registers). Each k step
// loads kNrVecs vectors of B and broadcasts kMr elements (bf16: pairs) of A.
constexpr int kMr = 12;
constexpr int kNrVecs = 2;
constexpr int kNr = 16 * kNrVecs;
constexpr int kKSteps = 128;  // bf16: K = 256 (A 6 KiB + B 16 KiB); f32: K = 128 (6 + 16 KiB)

// a: [kKSteps][kMr] of bf16 pairs as uint32, b: [kKSteps][kNr] of bf16 pairs, c: [kMr][kNr].
__attribute__((target("avx512f,avx512bf16"))) void Bf16Microkernel(const uint32_t* a,
                                                                   const uint32_t* b,
                                                                   int64_t repeats, float* c) {
  __m512 acc[kMr][kNrVecs];
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kNrVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t rep = 0; rep < repeats; ++rep) {
    for (int k = 0; k < kKSteps; ++k) {
      __m512bh b0 = (__m512bh)_mm512_load_si512(b + k * kNr);
      __m512bh b1 = (__m512bh)_mm512_load_si512(b + k * kNr + 16);
#pragma GCC unroll 12
      for (int r = 0; r < kMr; ++r) {
        __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[k * kMr + r]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
    _mm512_storeu_ps(c + r * kNr, acc[r][0]);
    _mm512_storeu_ps(c + r * kNr + 16, acc[r][1]);
  }
}

// The same blocking with f32 FMAs. a: [kKSteps][kMr], b: [kKSteps][kNr], c: [kMr][kNr].
__attribute__((target("avx512f"))) void F32Microkernel(const float* a, const float* b,
                                                      int64_t repeats, float* c) {
  __m512 acc[kMr][kNrVecs];
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kNrVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t rep = 0; rep < repeats; ++rep) {
    for (int k = 0; k < kKSteps; ++k) {
      __m512 b0 = _mm512_load_ps(b + k * kNr);
      __m512 b1 = _mm512_load_ps(b + k * kNr + 16);
#pragma GCC unroll 12
      for (int r = 0; r < kMr; ++r) {
        __m512 av = _mm512_set1_ps(a[k * kMr + r]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
    _mm512_storeu_ps(c + r * kNr, acc[r][0]);
    _mm512_storeu_ps(c + r * kNr + 16, acc[r][1]);
  }
}

// FLOPs of one repeat: every multiply-add counts 2; a bf16 pair step does 2 multiply-adds.
constexpr double kBf16FlopsPerRepeat = 2.0 * kMr * kNr * 2 * kKSteps;
constexpr double kF32FlopsPerRepeat = 2.0 * kMr * kNr * kKSteps;

struct PeakResult {
  double per_core_gflops = 0;
  double all_cores_gflops = 0;
};

enum class MicrokernelKind { kBf16, kF32 };

// Best-of-runs GFLOP/s of the microkernel on `threads` pinned threads, each on its own panels.
double MicrokernelGflops(MicrokernelKind kind, int threads, int runs) {
  struct Panels {
    alignas(64) uint32_t a[kKSteps * kMr];
    alignas(64) uint32_t b[kKSteps * kNr];
    alignas(64) float c[kMr * kNr];
  };
  std::vector<std::unique_ptr<Panels>> panels(threads);
  for (auto& p : panels) {
    p = std::make_unique<Panels>();
    // Small values keep the accumulators finite: bf16 0.5 pairs, or f32 1e-3.
    for (uint32_t& x : p->a) x = kind == MicrokernelKind::kBf16 ? 0x3f003f00u : 0x3a83126fu;
    for (uint32_t& x : p->b) x = kind == MicrokernelKind::kBf16 ? 0x3f003f00u : 0x3a83126fu;
  }
  double flops_per_repeat =
      kind == MicrokernelKind::kBf16 ? kBf16FlopsPerRepeat : kF32FlopsPerRepeat;
  auto run_kernel = [&](int t, int64_t repeats) {
    Panels& p = *panels[t];
    if (kind == MicrokernelKind::kBf16) {
      Bf16Microkernel(p.a, p.b, repeats, p.c);
    } else {
      F32Microkernel(reinterpret_cast<const float*>(p.a), reinterpret_cast<const float*>(p.b),
                     repeats, p.c);
    }
    g_sink.fetch_add(p.c[0], std::memory_order_relaxed);
  };
  // Calibrate to ~40 ms per run on one core.
  Clock::time_point start = Clock::now();
  run_kernel(0, 1000);
  double per_repeat = SecondsSince(start) / 1000;
  int64_t repeats = std::max<int64_t>(1000, static_cast<int64_t>(0.04 / per_repeat));
  std::vector<double> seconds =
      RunPinned(threads, runs, [&](int t) { run_kernel(t, repeats / 10); },
                [&](int t, int) { run_kernel(t, repeats); });
  double best = *std::min_element(seconds.begin(), seconds.end());
  return flops_per_repeat * repeats * threads / best / 1e9;
}

PeakResult MeasurePeak(MicrokernelKind kind, int threads) {
  PeakResult result;
  result.per_core_gflops = MicrokernelGflops(kind, 1, 5);
  result.all_cores_gflops = MicrokernelGflops(kind, threads, 5);
  return result;
}

// Core clock estimate from a chain of dependent integer adds (one cycle each on every x86
// core of the last decade): cycles = adds. Under turbo or a hypervisor this is the clock the
// loop saw, which is what the per-cycle numbers should be divided by.
double EstimateCoreGhz() {
  constexpr int64_t kIterations = 50'000'000;  // × 8 adds
  double best = 1e9;
  for (int trial = 0; trial < 3; ++trial) {
    int64_t x = 0, n = kIterations;
    Clock::time_point start = Clock::now();
    asm volatile(
        "1:\n\t"
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
        "dec %1\n\tjnz 1b\n\t"
        : "+r"(x), "+r"(n));
    best = std::min(best, SecondsSince(start));
    g_sink.fetch_add(static_cast<double>(x), std::memory_order_relaxed);
  }
  return 8.0 * kIterations / best / 1e9;
}

// --- Library matmuls ---------------------------------------------------------------------

struct MatmulShape {
  const char* name;
  int64_t m, n, k;  // [M,K] × [K,N] → [M,N]
};

// 2048³ is the headline; the others are expert FFN matmuls of a prefill chunk where each
// expert sees M tokens: Qwen3-30B-A3B (hidden 2048, expert intermediate 768, gate and up
// fused) and DeepSeek-V3 (hidden 7168, expert intermediate 2048).
constexpr MatmulShape kShapes[] = {
    {"square-2048", 2048, 2048, 2048},
    {"qwen3-moe-expert-gate_up-m128", 128, 1536, 2048},
    {"qwen3-moe-expert-down-m128", 128, 2048, 768},
    {"deepseek-v3-expert-gate_up-m256", 256, 4096, 7168},
};

struct MatmulResult {
  std::string library;
  std::string dtype;
  std::string shape;
  int64_t m = 0, n = 0, k = 0;
  double best_seconds = 0;
  double gflops = 0;
  std::string impl;
};

// Times fn at least 3 times and until ~0.4 s have passed, after one warm-up call.
double BestSeconds(const std::function<void()>& fn) {
  fn();
  double best = 1e30, total = 0;
  for (int i = 0; i < 3 || (total < 0.4 && i < 200); ++i) {
    Clock::time_point start = Clock::now();
    fn();
    double s = SecondsSince(start);
    best = std::min(best, s);
    total += s;
  }
  return best;
}

uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

#if MOE_BENCH_HAVE_DNNL
// bf16 [M,K] × bf16 [K,N] → f32 [M,N]. Weights are reordered once into the layout the
// primitive asks for (format any), as a server packs expert weights at load time; the timed
// part is the matmul alone.
absl::StatusOr<MatmulResult> OnednnMatmul(const MatmulShape& shape) {
  try {
    using dnnl::memory;
    dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    dnnl::stream stream(engine);
    memory::desc a_md({shape.m, shape.k}, memory::data_type::bf16, memory::format_tag::ab);
    memory::desc b_plain_md({shape.k, shape.n}, memory::data_type::bf16, memory::format_tag::ab);
    memory::desc b_any_md({shape.k, shape.n}, memory::data_type::bf16, memory::format_tag::any);
    memory::desc c_md({shape.m, shape.n}, memory::data_type::f32, memory::format_tag::ab);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_any_md, c_md), engine);

    std::vector<uint16_t> a(shape.m * shape.k), b(shape.k * shape.n);
    for (size_t i = 0; i < a.size(); ++i) a[i] = FloatToBf16(static_cast<float>(i % 7) * 0.01f);
    for (size_t i = 0; i < b.size(); ++i) b[i] = FloatToBf16(static_cast<float>(i % 5) * 0.01f);
    std::vector<float> c(shape.m * shape.n);
    memory a_mem(a_md, engine, a.data());
    memory b_plain_mem(b_plain_md, engine, b.data());
    memory c_mem(c_md, engine, c.data());
    memory b_mem(pd.weights_desc(), engine);
    dnnl::reorder(b_plain_mem, b_mem).execute(stream, b_plain_mem, b_mem);
    stream.wait();

    dnnl::matmul matmul(pd);
    MatmulResult result;
    result.library = "oneDNN";
    result.dtype = "bf16xbf16->f32";
    result.impl = pd.impl_info_str();
    if (result.impl.find("ref") != std::string::npos && shape.m * shape.n * shape.k > (1 << 27)) {
      return absl::UnimplementedError(
          absl::StrCat("oneDNN picked the reference kernel (", result.impl, "); skipped"));
    }
    result.best_seconds = BestSeconds([&] {
      matmul.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem},
                              {DNNL_ARG_DST, c_mem}});
      stream.wait();
    });
    return result;
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN: ", e.what()));
  }
}
#endif

#if MOE_BENCH_HAVE_OPENBLAS
MatmulResult OpenblasSgemm(const MatmulShape& shape) {
  std::vector<float> a(shape.m * shape.k), b(shape.k * shape.n), c(shape.m * shape.n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) * 0.01f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.01f;
  MatmulResult result;
  result.library = "OpenBLAS";
  result.dtype = "f32";
  result.impl = openblas_get_corename();
  result.best_seconds = BestSeconds([&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, shape.m, shape.n, shape.k, 1.0f,
                a.data(), shape.k, b.data(), shape.n, 0.0f, c.data(), shape.n);
  });
  return result;
}
#endif

std::vector<MatmulResult> MeasureMatmuls(int threads) {
  std::vector<MatmulResult> results;
  auto add = [&](MatmulResult result, const MatmulShape& shape) {
    result.shape = shape.name;
    result.m = shape.m;
    result.n = shape.n;
    result.k = shape.k;
    result.gflops = MatmulFlops(shape.m, shape.n, shape.k) / result.best_seconds / 1e9;
    results.push_back(std::move(result));
  };
#if MOE_BENCH_HAVE_OPENMP
  omp_set_num_threads(threads);
#endif
#if MOE_BENCH_HAVE_DNNL
  for (const MatmulShape& shape : kShapes) {
    absl::StatusOr<MatmulResult> result = OnednnMatmul(shape);
    if (!result.ok()) {
      MOE_LOG(WARNING) << "oneDNN matmul skipped" << common::Kv("shape", shape.name)
                       << common::Kv("error", std::string(result.status().message()));
      continue;
    }
    add(*std::move(result), shape);
  }
#endif
  // Let OpenMP workers stop spinning before OpenBLAS starts its own threads.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
#if MOE_BENCH_HAVE_OPENBLAS
  openblas_set_num_threads(threads);
  for (const MatmulShape& shape : kShapes) add(OpenblasSgemm(shape), shape);
#endif
  return results;
}

// --- Interference ------------------------------------------------------------------------

// CPU time of the whole machine (from /proc/stat) and of this process (getrusage), to tell how
// much of the machine other processes used while we measured.
struct CpuTimes {
  double busy_seconds = 0;  // all CPUs, not idle or iowait
  double own_seconds = 0;   // this process, user + system
  Clock::time_point when;
};

CpuTimes ReadCpuTimes() {
  CpuTimes times;
  times.when = Clock::now();
  std::ifstream stat("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  stat >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  times.busy_seconds = (user + nice + system + irq + softirq + steal) / ticks;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  times.own_seconds = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec * 1e-6 +
                      usage.ru_stime.tv_sec + usage.ru_stime.tv_usec * 1e-6;
  return times;
}

// "SCHED_FIFO 10" when run under `chrt -f 10`, else "SCHED_OTHER nice N": real-time priority
// keeps other processes off the CPUs while the limits are measured on a shared machine.
std::string SchedulingPolicy() {
  int policy = sched_getscheduler(0);
  sched_param param{};
  sched_getparam(0, &param);
  if (policy == SCHED_FIFO) return absl::StrCat("SCHED_FIFO ", param.sched_priority);
  if (policy == SCHED_RR) return absl::StrCat("SCHED_RR ", param.sched_priority);
  return absl::StrCat("SCHED_OTHER nice ", getpriority(PRIO_PROCESS, 0));
}

// Average number of CPUs other processes kept busy between two readings (0 on a quiet
// machine; 1.0 means one whole core was taken from the measurement).
double OtherProcessesCpus(const CpuTimes& before, const CpuTimes& after) {
  double wall = std::chrono::duration<double>(after.when - before.when).count();
  if (wall <= 0) return 0;
  double other = (after.busy_seconds - before.busy_seconds) -
                 (after.own_seconds - before.own_seconds);
  return std::max(0.0, other / wall);
}

// --- Report ------------------------------------------------------------------------------

nlohmann::json BandwidthJson(const BandwidthSamples& r) {
  return {{"best_gbs", r.Best()}, {"median_gbs", r.MedianGbs()}, {"runs_gbs", r.gbs}};
}

void PrintTable(const nlohmann::json& machine, const MemoryResults& memory, const PeakResult& bf16,
                const PeakResult& f32, double ghz, const std::vector<MatmulResult>& matmuls,
                int threads, double load_before) {
  std::printf("moe-bench-limits on %s, %d cores, %s\n",
              machine.value("cpu_model", std::string("?")).c_str(), threads,
              machine.value("kernel", std::string("?")).c_str());
  nlohmann::json cpu_flags = machine.value("cpu_flags", nlohmann::json::object());
  std::printf("flags: avx512f=%d avx512_bf16=%d avx512_vnni=%d amx_bf16=%d; ~%.2f GHz (estimate); "
              "load (1 min) before: %.2f; %s\n\n",
              cpu_flags.value("avx512f", false), cpu_flags.value("avx512_bf16", false),
              cpu_flags.value("avx512_vnni", false), cpu_flags.value("amx_bf16", false), ghz,
              load_before, SchedulingPolicy().c_str());
  std::printf("%-46s %12s %12s\n", "memory bandwidth (GB/s)", "best", "median");
  auto row = [](const char* name, const BandwidthSamples& r) {
    std::printf("  %-44s %12.1f %12.1f\n", name, r.Best(), r.MedianGbs());
  };
  std::printf("  (buffer %lld MiB, %d rounds × %zu runs)\n",
              static_cast<long long>(memory.buffer_bytes >> 20), memory.rounds,
              memory.read_all.gbs.size() / std::max(memory.rounds, 1));
  row("read, all cores", memory.read_all);
  row("read, one core", memory.read_single);
  row("copy, all cores (2 bytes per byte copied)", memory.copy_all);
  row("copy, one core", memory.copy_single);
  std::printf("\n%-46s %12s %12s %12s\n", "microkernel peak (GFLOP/s)", "per core", "all cores",
              "FLOP/cycle");
  std::printf("  %-44s %12.1f %12.1f %12.1f\n", "bf16 vdpbf16ps 12x32, L1", bf16.per_core_gflops,
              bf16.all_cores_gflops, bf16.per_core_gflops / ghz);
  std::printf("  %-44s %12.1f %12.1f %12.1f\n", "f32 vfmadd 12x32, L1", f32.per_core_gflops,
              f32.all_cores_gflops, f32.per_core_gflops / ghz);
  std::printf("\n%-46s %12s %12s %12s  %s\n", "matmul, all cores (GFLOP/s)", "M x N x K", "ms",
              "GFLOP/s", "% bf16 peak");
  for (const MatmulResult& r : matmuls) {
    std::string name = r.library + " " + r.dtype + " " + r.shape;
    std::string dims = std::to_string(r.m) + "x" + std::to_string(r.n) + "x" + std::to_string(r.k);
    std::printf("  %-44s %12s %12.2f %12.1f  %5.1f %%  [%s]\n", name.c_str(), dims.c_str(),
                r.best_seconds * 1e3, r.gflops, 100.0 * r.gflops / bf16.all_cores_gflops,
                r.impl.c_str());
  }
}

int Main(int argc, char** argv) {
  Options options;
  common::FlagSet flags("moe-bench-limits [--json FILE] [--record]",
                        "Measures memory bandwidth and matmul peaks of this machine.");
  flags.AddString("json", &options.json_path,
                  "write the results as JSON here (bench/results/machine_limits.json is what "
                  "the model benchmarks load)");
  flags.AddBool("record", &options.record,
                "also store bench/results/machine_limits-<date>.json and a SUMMARY.md row");
  flags.AddInt("threads", &options.threads, "threads for the all-core numbers (0: all CPUs)");
  flags.AddInt("buffer-mib", &options.buffer_mib, "memory bandwidth buffer size in MiB");
  flags.AddInt("runs", &options.runs, "runs per bandwidth measurement (best is reported)");
  flags.AddBool("skip-libraries", &options.skip_libraries, "skip the oneDNN and OpenBLAS matmuls");
  absl::StatusOr<std::vector<std::string>> rest =
      flags.Parse(std::vector<std::string>(argv + 1, argv + argc));
  if (!rest.ok()) {
    std::cerr << "moe-bench-limits: " << rest.status().message() << "\n\n" << flags.HelpText();
    return 2;
  }
  if (flags.help_requested()) {
    std::cout << flags.HelpText();
    return 0;
  }
  if (!rest->empty() || options.runs < 1 || options.buffer_mib < 64) {
    std::cerr << "moe-bench-limits: need --runs >= 1, --buffer-mib >= 64, no positionals\n\n"
              << flags.HelpText();
    return 2;
  }
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) {
    std::cerr << "moe-bench-limits: this CPU lacks AVX-512F or AVX512-BF16\n";
    return 1;
  }
  int threads = options.threads > 0 ? options.threads : static_cast<int>(AllowedCpus().size());

  Clock::time_point start = Clock::now();
  CpuTimes cpu_before = ReadCpuTimes();
  nlohmann::json machine = CollectMachineInfo();
  double load_before = machine.value("load_average_1m", -1.0);
#if MOE_BENCH_HAVE_DNNL
  const dnnl_version_t* version = dnnl_version();
  machine["onednn_version"] =
      absl::StrCat(version->major, ".", version->minor, ".", version->patch);
#endif
#if MOE_BENCH_HAVE_OPENBLAS
  machine["openblas_config"] = openblas_get_config();
#endif

  MemoryResults memory;
  AlignedBuffer buffer = AllocateBuffer(options.buffer_mib, threads);
  MeasureMemoryRound(buffer, threads, options.runs, &memory);
  double ghz = EstimateCoreGhz();
  PeakResult bf16 = MeasurePeak(MicrokernelKind::kBf16, threads);
  PeakResult f32 = MeasurePeak(MicrokernelKind::kF32, threads);
  MeasureMemoryRound(buffer, threads, options.runs, &memory);
  std::vector<MatmulResult> matmuls;
  if (!options.skip_libraries) matmuls = MeasureMatmuls(threads);
  MeasureMemoryRound(buffer, threads, options.runs, &memory);
  buffer = {};
  double load_after = -1;
  getloadavg(&load_after, 1);
  double other_cpus = OtherProcessesCpus(cpu_before, ReadCpuTimes());

  PrintTable(machine, memory, bf16, f32, ghz, matmuls, threads, load_before);
  double total_seconds = SecondsSince(start);
  std::printf("\ntotal %.1f s; load (1 min) after: %.2f (includes this run); CPUs busy with "
              "other processes during the run: %.2f\n",
              total_seconds, load_after, other_cpus);

  MachineLimits limits;
  limits.cores = threads;
  limits.read_bw_all_cores_gbs = memory.read_all.Best();
  limits.read_bw_single_core_gbs = memory.read_single.Best();
  limits.copy_bw_all_cores_gbs = memory.copy_all.Best();
  limits.copy_bw_single_core_gbs = memory.copy_single.Best();
  limits.bf16_peak_gflops = bf16.all_cores_gflops;
  limits.bf16_peak_gflops_per_core = bf16.per_core_gflops;
  nlohmann::json matmul_json = nlohmann::json::array();
  for (const MatmulResult& r : matmuls) {
    if (r.shape == std::string(kShapes[0].name)) {
      if (r.library == "oneDNN") limits.onednn_bf16_gflops = r.gflops;
      if (r.library == "OpenBLAS") limits.openblas_f32_gflops = r.gflops;
    }
    matmul_json.push_back({{"library", r.library}, {"dtype", r.dtype}, {"shape", r.shape},
                           {"m", r.m}, {"n", r.n}, {"k", r.k}, {"best_seconds", r.best_seconds},
                           {"gflops", r.gflops},
                           {"fraction_of_bf16_peak", r.gflops / bf16.all_cores_gflops},
                           {"impl", r.impl}});
  }
  nlohmann::json doc = {
      {"tool", "moe-bench-limits"},
      {"schema_version", 1},
      {"machine", machine},
      {"load_average_1m_before", load_before},
      {"load_average_1m_after", load_after},
      {"other_processes_cpus", other_cpus},
      {"scheduling", SchedulingPolicy()},
      {"total_seconds", total_seconds},
      {"settings", {{"threads", threads}, {"buffer_bytes", memory.buffer_bytes},
                    {"runs", options.runs}, {"memory_rounds", memory.rounds}}},
      {"limits", MachineLimitsToJson(limits)},
      {"memory",
       {{"read_all_cores", BandwidthJson(memory.read_all)},
        {"read_single_core", BandwidthJson(memory.read_single)},
        {"copy_all_cores", BandwidthJson(memory.copy_all)},
        {"copy_single_core", BandwidthJson(memory.copy_single)},
        {"units", "GB/s = 1e9 bytes/s; copy counts read + write bytes"}}},
      {"microkernels",
       {{"estimated_core_ghz", ghz},
        {"bf16_dpbf16",
         {{"mr", kMr}, {"nr", kNr}, {"k", 2 * kKSteps},
          {"per_core_gflops", bf16.per_core_gflops},
          {"all_cores_gflops", bf16.all_cores_gflops},
          {"flops_per_cycle_per_core", bf16.per_core_gflops / ghz}}},
        {"f32_fma",
         {{"mr", kMr}, {"nr", kNr}, {"k", kKSteps},
          {"per_core_gflops", f32.per_core_gflops},
          {"all_cores_gflops", f32.all_cores_gflops},
          {"flops_per_cycle_per_core", f32.per_core_gflops / ghz}}}}},
      {"matmul", matmul_json},
  };

  if (!options.json_path.empty()) {
    std::ofstream out(options.json_path, std::ios::trunc);
    out << doc.dump(2) << "\n";
    if (!out) {
      std::cerr << "moe-bench-limits: cannot write " << options.json_path << "\n";
      return 1;
    }
    std::printf("wrote %s\n", options.json_path.c_str());
  }
  if (options.record) {
    BenchRecord record{
        .name = "machine_limits",
        .machine = machine,
        .results = doc,
        .summary = {{"read", FormatNumber(limits.read_bw_all_cores_gbs, 1) + " GB/s"},
                    {"read 1 core", FormatNumber(limits.read_bw_single_core_gbs, 1) + " GB/s"},
                    {"bf16 peak", FormatNumber(limits.bf16_peak_gflops, 0) + " GFLOP/s"},
                    {"oneDNN bf16", FormatNumber(limits.onednn_bf16_gflops, 0) + " GFLOP/s"},
                    {"OpenBLAS f32", FormatNumber(limits.openblas_f32_gflops, 0) + " GFLOP/s"}}};
    absl::StatusOr<WrittenRecord> written = WriteBenchRecord(record, {});
    if (!written.ok()) {
      std::cerr << "moe-bench-limits: " << written.status().message() << "\n";
      return 1;
    }
    std::printf("wrote %s and a row of %s\n", written->json_path.c_str(),
                written->summary_path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) { return moe::bench::Main(argc, argv); }
