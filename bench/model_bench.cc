// moe-bench-model: end-to-end speed of the CPU model engine (Model::Forward) against this
// machine's limits (bench/results/machine_limits.json, see bench/README.md):
//   - decode at batch B (default 1, 8, 32): B sequences are prefilled with different seeded
//     random prompts of --context-len tokens, then --decode-steps steps are timed, each one
//     token per sequence through Model::Forward with LogitsRows::kLast (LM head included) and
//     a greedy argmax. Bytes touched per step are computed exactly from the model's tensors
//     and the routing of that step (the distinct experts the router picked in each layer,
//     captured through an ExpertExecutor that wraps the local one); the fraction is
//     (bytes / step time) / read bandwidth. KV cache bytes read are reported separately.
//   - prefill: one --prefill-len-token sequence, FLOPs = Σ 2·M·N·K over the matmuls (the LM
//     head for the one row that wants logits) + causal attention (QKᵀ and PV), as a fraction
//     of the bf16 microkernel peak.
// The memory bandwidth is measured in-process right before and after every timed decode run,
// because this VM's bandwidth switches between two levels; fractions are reported against
// both the committed limit and the in-process measurement.
//
// With --profile-steps N (default 8) every batch also runs N instrumented steps that time
// each kernel call (the kernel entry points are wrapped at link time, see
// bench/CMakeLists.txt) and attribute them to attention, router, routed experts, shared
// expert, LM head, norms, and host overhead (the rest of the step).
//
//   moe-bench-model --arch qwen2_moe --preset small --batch 1,8,32 --json out.json
//   moe-bench-model --model /models/small --decode-steps 64 --record
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "bench/bench_util.h"
#include "bench/memory_kernels.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/kernels.h"
#include "model/gen_model.h"
#include "model/kv_cache.h"
#include "model/model.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;
using common::TensorView;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

double Mean(const std::vector<double>& values) {
  if (values.empty()) return 0;
  double sum = 0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

// Targets of the project for the qwen2_moe small preset in bf16 (fractions of the limits).
constexpr double kDecodeBatch1Target = 0.75;   // of the bandwidth limit, active weights
constexpr double kDecodeBatch32Target = 0.50;  // of the bandwidth limit, every expert read
constexpr double kPrefillTarget = 0.40;        // of the bf16 microkernel peak

// --- Per-op timing (link-time wrappers of the kernel entry points) ------------------------

// Seconds and calls per op key ("Linear:router", "PagedAttention", ...), filled while
// g_profile points at it; the wrappers only forward when it is null.
struct OpProfile {
  std::map<std::string, double> seconds;
  std::map<std::string, int64_t> calls;
  // Linear weight data pointer -> what it is (attention, router, shared_gate, lm_head).
  std::unordered_map<const void*, std::string> linear_kind;
  void Add(const std::string& key, double s) {
    seconds[key] += s;
    ++calls[key];
  }
};
OpProfile* g_profile = nullptr;

std::string LinearKey(const kernels::LinearArgs& args) {
  auto it = g_profile->linear_kind.find(args.weight.data());
  return it == g_profile->linear_kind.end() ? "Linear:other" : "Linear:" + it->second;
}

}  // namespace

// The wrappers need external linkage: `ld --wrap` binds the model library's calls to these
// global symbols.
namespace op_timing {

// Declares __real_<sym> (the kernel itself, renamed by `ld --wrap=<sym>`) and defines
// __wrap_<sym>, which every call from the model library reaches instead.
#define MOE_BENCH_WRAP_OP(Op, mangled, key_expr)                                       \
  absl::Status Real##Op(const kernels::Op##Args& args) asm("__real_" mangled);          \
  absl::Status Wrap##Op(const kernels::Op##Args& args) asm("__wrap_" mangled);          \
  absl::Status Wrap##Op(const kernels::Op##Args& args) {                                \
    if (g_profile == nullptr) return Real##Op(args);                                    \
    Clock::time_point start = Clock::now();                                             \
    absl::Status status = Real##Op(args);                                               \
    g_profile->Add(key_expr, SecondsSince(start));                                      \
    return status;                                                                      \
  }

// The ops whose Args struct is named <Op>Args.
#define MOE_BENCH_WRAP_SIMPLE(Op, mangled) MOE_BENCH_WRAP_OP(Op, mangled, #Op)

MOE_BENCH_WRAP_OP(Linear, "_ZN3moe7kernels6LinearERKNS0_10LinearArgsE", LinearKey(args))
MOE_BENCH_WRAP_SIMPLE(Embedding, "_ZN3moe7kernels9EmbeddingERKNS0_13EmbeddingArgsE")
MOE_BENCH_WRAP_SIMPLE(RmsNorm, "_ZN3moe7kernels7RmsNormERKNS0_11RmsNormArgsE")
MOE_BENCH_WRAP_SIMPLE(Add, "_ZN3moe7kernels3AddERKNS0_7AddArgsE")
MOE_BENCH_WRAP_SIMPLE(SigmoidGatedAdd,
                      "_ZN3moe7kernels15SigmoidGatedAddERKNS0_19SigmoidGatedAddArgsE")
MOE_BENCH_WRAP_SIMPLE(Rope, "_ZN3moe7kernels4RopeERKNS0_8RopeArgsE")
MOE_BENCH_WRAP_SIMPLE(ExpertFfn, "_ZN3moe7kernels9ExpertFfnERKNS0_13ExpertFfnArgsE")
MOE_BENCH_WRAP_SIMPLE(Mlp, "_ZN3moe7kernels3MlpERKNS0_7MlpArgsE")

// Ops whose Args struct has another name.
using KvWriteArgs = kernels::KvWriteArgs;
using AttentionArgs = kernels::AttentionArgs;
using RouterArgs = kernels::RouterArgs;
absl::Status RealWriteKvCache(const KvWriteArgs& args) asm(
    "__real__ZN3moe7kernels12WriteKvCacheERKNS0_11KvWriteArgsE");
absl::Status WrapWriteKvCache(const KvWriteArgs& args) asm(
    "__wrap__ZN3moe7kernels12WriteKvCacheERKNS0_11KvWriteArgsE");
absl::Status RealPagedAttention(const AttentionArgs& args) asm(
    "__real__ZN3moe7kernels14PagedAttentionERKNS0_13AttentionArgsE");
absl::Status WrapPagedAttention(const AttentionArgs& args) asm(
    "__wrap__ZN3moe7kernels14PagedAttentionERKNS0_13AttentionArgsE");
absl::Status RealRouterTopK(const RouterArgs& args) asm(
    "__real__ZN3moe7kernels10RouterTopKERKNS0_10RouterArgsE");
absl::Status WrapRouterTopK(const RouterArgs& args) asm(
    "__wrap__ZN3moe7kernels10RouterTopKERKNS0_10RouterArgsE");

template <typename Args>
absl::Status Timed(absl::Status (*real)(const Args&), const Args& args, const char* key) {
  if (g_profile == nullptr) return real(args);
  Clock::time_point start = Clock::now();
  absl::Status status = real(args);
  g_profile->Add(key, SecondsSince(start));
  return status;
}
absl::Status WrapWriteKvCache(const KvWriteArgs& args) {
  return Timed(&RealWriteKvCache, args, "WriteKvCache");
}
absl::Status WrapPagedAttention(const AttentionArgs& args) {
  return Timed(&RealPagedAttention, args, "PagedAttention");
}
absl::Status WrapRouterTopK(const RouterArgs& args) {
  return Timed(&RealRouterTopK, args, "RouterTopK");
}

}  // namespace op_timing

namespace {

// Category of each op key in the breakdown. "routed_experts" is timed around the expert
// executor (ExpertFfn plus the executor's zeroing of the output), so ExpertFfn itself is
// reported but not summed again.
std::string CategoryOf(const std::string& key) {
  if (key == "Linear:attention") return "attention_proj";
  if (key == "Rope" || key == "WriteKvCache" || key == "PagedAttention") return "attention_core";
  if (key == "Linear:router" || key == "RouterTopK") return "router";
  if (key == "Executor:routed") return "routed_experts";
  if (key == "Mlp" || key == "Linear:shared_gate" || key == "SigmoidGatedAdd") {
    return "shared_expert";
  }
  if (key == "Linear:lm_head") return "lm_head";
  if (key == "RmsNorm" || key == "Add" || key == "Embedding") return "norms_elementwise";
  if (key == "ExpertFfn") return "";  // inside Executor:routed
  return "other_kernels";
}

// --- Routing capture ----------------------------------------------------------------------

// Wraps the local executor: records which experts each layer's router picked in this step and
// times the routed-expert part. Not thread-safe (called from the Forward thread only).
class RecordingExecutor : public model::ExpertExecutor {
 public:
  RecordingExecutor(const model::ModelWeights& weights, int num_experts)
      : local_(weights), num_experts_(num_experts), chosen_(weights.num_layers()) {}

  absl::Status RunRoutedExperts(int layer, TensorView x, TensorView topk_ids,
                                TensorView topk_weights, TensorView out) override {
    std::vector<bool>& chosen = chosen_[layer];
    chosen.assign(num_experts_, false);
    const int64_t k = topk_ids.dim(1);
    for (int64_t t = 0; t < topk_ids.dim(0); ++t) {
      for (int64_t j = 0; j < k; ++j) {
        int32_t e = topk_ids.at<int32_t>(t, j);
        if (e >= 0 && e < num_experts_) chosen[e] = true;
      }
    }
    Clock::time_point start = Clock::now();
    absl::Status status = local_.RunRoutedExperts(layer, x, topk_ids, topk_weights, out);
    if (g_profile != nullptr) g_profile->Add("Executor:routed", SecondsSince(start));
    return status;
  }

  // Distinct experts chosen in `layer` by the last Forward (empty before the first).
  const std::vector<bool>& chosen(int layer) const { return chosen_[layer]; }
  void Clear() {
    for (std::vector<bool>& c : chosen_) c.clear();
  }

 private:
  model::LocalExpertExecutor local_;
  int num_experts_;
  std::vector<std::vector<bool>> chosen_;  // [layer][expert]
};

// --- Byte and FLOP accounting from the model's tensors -------------------------------------

size_t Bytes(const TensorView& v) { return v.empty() ? 0 : v.nbytes(); }
double Params(const TensorView& v) { return v.empty() ? 0 : static_cast<double>(v.numel()); }
size_t SwigluBytes(const kernels::SwigluWeights& w) {
  return Bytes(w.gate) + Bytes(w.up) + Bytes(w.down);
}
double SwigluParams(const kernels::SwigluWeights& w) {
  return Params(w.gate) + Params(w.up) + Params(w.down);
}

// Bytes read per step by category, excluding the routed experts (which depend on routing)
// and the embedding rows (which depend on the batch).
struct WeightAccounting {
  double attention = 0;  // q/k/v/o (+ biases, qk-norms; MLA projections)
  double router = 0;     // router (+ correction bias)
  double shared = 0;     // shared expert (+ its gate) or dense MLP
  double norms = 0;      // input/post-attention norms, final norm
  double lm_head = 0;
  double embedding_row = 0;  // one row of the embedding table
  double total = 0;          // ModelWeights::total_bytes (everything, all experts)
  // Routed experts: bytes of expert e of layer l ([l][e], 0 when not loaded / dense layer).
  std::vector<std::vector<double>> expert;
  // Matmul parameters per token (FLOPs = 2 × these): everything but the routed experts and
  // the LM head; routed: top_k × the parameters of one expert, per MoE layer.
  double dense_matmul_params = 0;
  double routed_matmul_params = 0;
  double lm_head_params = 0;
  int top_k = 0;

  double StaticBytes() const { return attention + router + shared + norms + lm_head; }
  // Bytes of the routed experts of a step, from the distinct experts each layer picked.
  double RoutedBytes(const RecordingExecutor& rec, double* distinct_per_layer) const {
    double bytes = 0;
    int64_t distinct = 0, moe_layers = 0;
    for (size_t l = 0; l < expert.size(); ++l) {
      const std::vector<bool>& chosen = rec.chosen(static_cast<int>(l));
      if (chosen.empty()) continue;
      ++moe_layers;
      for (size_t e = 0; e < chosen.size(); ++e) {
        if (chosen[e]) {
          bytes += expert[l][e];
          ++distinct;
        }
      }
    }
    *distinct_per_layer = moe_layers > 0 ? static_cast<double>(distinct) / moe_layers : 0;
    return bytes;
  }
  // Routed bytes if every token's top_k experts were distinct per layer and of average size
  // (the batch-1 active set), and if every expert were read.
  double ActiveRoutedBytes() const {
    double bytes = 0;
    for (const std::vector<double>& layer : expert) {
      if (layer.empty()) continue;
      double sum = 0;
      for (double b : layer) sum += b;
      bytes += sum / static_cast<double>(layer.size()) * top_k;
    }
    return bytes;
  }
  double AllRoutedBytes() const {
    double bytes = 0;
    for (const std::vector<double>& layer : expert) {
      for (double b : layer) bytes += b;
    }
    return bytes;
  }
};

WeightAccounting Account(const model::ModelWeights& w, const model::ModelConfig& c) {
  WeightAccounting a;
  a.top_k = c.moe.top_k;
  a.total = static_cast<double>(w.total_bytes());
  a.expert.resize(w.num_layers());
  for (int l = 0; l < w.num_layers(); ++l) {
    const model::LayerWeights& lw = w.layer(l);
    const model::AttentionWeights& at = lw.attn;
    a.norms += Bytes(lw.input_norm) + Bytes(lw.post_attention_norm);
    for (const TensorView* v : {&at.q_proj, &at.k_proj, &at.v_proj, &at.o_proj, &at.q_a_proj,
                                &at.q_b_proj, &at.kv_a_proj, &at.kv_b_proj}) {
      a.attention += Bytes(*v);
      a.dense_matmul_params += Params(*v);
    }
    for (const TensorView* v : {&at.q_bias, &at.k_bias, &at.v_bias, &at.q_norm, &at.k_norm,
                                &at.q_a_norm, &at.kv_a_norm}) {
      a.attention += Bytes(*v);
    }
    if (!lw.is_moe) {
      a.shared += SwigluBytes(lw.mlp);
      a.dense_matmul_params += SwigluParams(lw.mlp);
      continue;
    }
    const model::MoeWeights& m = lw.moe;
    a.router += Bytes(m.router) + Bytes(m.correction_bias);
    a.dense_matmul_params += Params(m.router);
    a.shared += SwigluBytes(m.shared) + Bytes(m.shared_gate);
    a.dense_matmul_params += SwigluParams(m.shared) + Params(m.shared_gate);
    double params_sum = 0;
    int loaded = 0;
    for (const kernels::SwigluWeights& e : m.experts) {
      a.expert[l].push_back(static_cast<double>(SwigluBytes(e)));
      if (!e.gate.empty()) {
        params_sum += SwigluParams(e);
        ++loaded;
      }
    }
    if (loaded > 0) a.routed_matmul_params += params_sum / loaded * c.moe.top_k;
  }
  a.norms += Bytes(w.final_norm());
  a.lm_head = Bytes(w.lm_head());
  a.lm_head_params = Params(w.lm_head());
  a.embedding_row = w.embedding().empty()
                        ? 0
                        : static_cast<double>(w.embedding().nbytes()) / w.embedding().dim(0);
  return a;
}

// What each Linear weight is, for the per-op profile.
std::unordered_map<const void*, std::string> LinearKinds(const model::ModelWeights& w) {
  std::unordered_map<const void*, std::string> kinds;
  auto put = [&](const TensorView& v, const char* kind) {
    if (!v.empty()) kinds[v.data()] = kind;
  };
  for (int l = 0; l < w.num_layers(); ++l) {
    const model::LayerWeights& lw = w.layer(l);
    const model::AttentionWeights& at = lw.attn;
    for (const TensorView* v : {&at.q_proj, &at.k_proj, &at.v_proj, &at.o_proj, &at.q_a_proj,
                                &at.q_b_proj, &at.kv_a_proj, &at.kv_b_proj}) {
      put(*v, "attention");
    }
    for (const TensorView& v : at.w_uk_t) put(v, "attention");
    for (const TensorView& v : at.w_uv) put(v, "attention");
    for (const TensorView& v : at.q_pe) put(v, "attention");
    put(lw.moe.router, "router");
    put(lw.moe.shared_gate, "shared_gate");
  }
  put(w.lm_head(), "lm_head");
  return kinds;
}

// KV cache bytes read by one decode step of sequences with these context lengths (keys and
// values of every position of every layer).
double KvBytesRead(const model::KvCache& cache, const std::vector<int64_t>& contexts) {
  double per_position = 0;
  for (int l = 0; l < cache.num_layers(); ++l) {
    const TensorView k = cache.k(l);
    per_position += static_cast<double>(k.nbytes()) / (k.dim(0) * k.dim(1));
    if (!cache.is_latent()) {
      const TensorView v = cache.v(l);
      per_position += static_cast<double>(v.nbytes()) / (v.dim(0) * v.dim(1));
    }
  }
  double positions = 0;
  for (int64_t ctx : contexts) positions += static_cast<double>(ctx);
  return per_position * positions;
}

// Causal attention FLOPs of `new_tokens` queries following `start` cached positions:
// query at position p attends p + 1 keys, 2·(D + Dv) FLOPs per key and head (QKᵀ and PV).
double AttentionFlops(const model::ModelConfig& c, int64_t start, int64_t new_tokens) {
  double keys = 0;
  for (int64_t i = 0; i < new_tokens; ++i) keys += static_cast<double>(start + i + 1);
  double d = c.attention == model::AttentionKind::kMla
                 ? c.mla.kv_lora_rank + c.mla.qk_rope_head_dim + c.mla.kv_lora_rank
                 : c.QkHeadDim() + c.VHeadDim();
  return 2.0 * d * c.num_heads * c.num_layers * keys;
}

// --- Memory bandwidth in-process -------------------------------------------------------------

std::atomic<double> g_sink{0};

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

// Runs body(thread) on `threads` pinned threads `runs` times in lock step (after setup once);
// returns the wall time of each run, barrier to barrier. Same method as moe-bench-limits.
std::vector<double> RunPinned(int threads, int runs, const std::function<void(int)>& setup,
                              const std::function<void(int)>& body) {
  std::vector<double> seconds(runs, 0.0);
  std::barrier sync(threads);
  std::vector<std::thread> team;
  const std::vector<int> cpus = AllowedCpus();
  for (int t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpus[t % cpus.size()], &set);
      pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
      setup(t);
      for (int run = 0; run < runs; ++run) {
        sync.arrive_and_wait();
        Clock::time_point start = Clock::now();
        body(t);
        sync.arrive_and_wait();
        if (t == 0) seconds[run] = SecondsSince(start);
      }
    });
  }
  for (std::thread& thread : team) thread.join();
  return seconds;
}

// A read-bandwidth probe: a buffer ≫ L3 read with AVX-512 by all cores (bench/memory_kernels).
class BandwidthProbe {
 public:
  BandwidthProbe(int64_t mib, int threads) : threads_(threads) {
    constexpr int64_t kHugePage = int64_t{2} << 20;
    const int64_t bytes = std::max<int64_t>(kHugePage, (mib << 20) / kHugePage * kHugePage);
    data_ = static_cast<float*>(std::aligned_alloc(kHugePage, bytes));
    MOE_CHECK(data_ != nullptr) << "cannot allocate " << bytes << " bytes";
    floats_ = bytes / static_cast<int64_t>(sizeof(float));
    madvise(data_, bytes, MADV_HUGEPAGE);
    RunPinned(threads_, 1, [&](int t) {
      auto [begin, end] = Share(t);
      for (int64_t i = begin; i < end; ++i) data_[i] = static_cast<float>(i & 0xff);
    }, [](int) {});
  }
  ~BandwidthProbe() { std::free(data_); }
  BandwidthProbe(const BandwidthProbe&) = delete;
  BandwidthProbe& operator=(const BandwidthProbe&) = delete;

  // GB/s of each of `runs` all-core reads of the buffer.
  std::vector<double> Measure(int runs) const {
    std::vector<double> seconds = RunPinned(threads_, runs, [](int) {}, [&](int t) {
      auto [begin, end] = Share(t);
      g_sink.fetch_add(ReadSumAvx512(data_ + begin, end - begin), std::memory_order_relaxed);
    });
    std::vector<double> gbs;
    for (double s : seconds) gbs.push_back(static_cast<double>(floats_) * sizeof(float) / s / 1e9);
    return gbs;
  }
  int64_t bytes() const { return floats_ * static_cast<int64_t>(sizeof(float)); }

 private:
  std::pair<int64_t, int64_t> Share(int t) const {
    const int64_t blocks = floats_ / kFloatsPerBlock;
    return {blocks * t / threads_ * kFloatsPerBlock, blocks * (t + 1) / threads_ * kFloatsPerBlock};
  }
  int threads_;
  float* data_ = nullptr;
  int64_t floats_ = 0;
};

// The memory the model's weight views cover (mapped checkpoint or owned copies), as merged
// [begin, end) ranges.
std::vector<std::pair<const char*, const char*>> WeightRanges(const model::ModelWeights& w) {
  std::vector<std::pair<const char*, const char*>> ranges;
  auto put = [&](const TensorView& v) {
    if (v.empty()) return;
    const char* p = static_cast<const char*>(v.data());
    ranges.push_back({p, p + v.nbytes()});
  };
  for (int l = 0; l < w.num_layers(); ++l) {
    const model::LayerWeights& lw = w.layer(l);
    const model::AttentionWeights& at = lw.attn;
    for (const TensorView* v :
         {&lw.input_norm, &lw.post_attention_norm, &at.q_proj, &at.k_proj, &at.v_proj, &at.o_proj,
          &at.q_bias, &at.k_bias, &at.v_bias, &at.q_norm, &at.k_norm, &at.q_a_proj, &at.q_a_norm,
          &at.q_b_proj, &at.kv_a_proj, &at.kv_a_norm, &at.kv_b_proj, &lw.moe.router,
          &lw.moe.correction_bias, &lw.moe.shared_gate, &lw.mlp.gate, &lw.mlp.up, &lw.mlp.down,
          &lw.moe.shared.gate, &lw.moe.shared.up, &lw.moe.shared.down}) {
      put(*v);
    }
    for (const kernels::SwigluWeights& e : lw.moe.experts) {
      put(e.gate);
      put(e.up);
      put(e.down);
    }
  }
  put(w.embedding());
  put(w.final_norm());
  put(w.lm_head());
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<const char*, const char*>> merged;
  for (const auto& r : ranges) {
    if (!merged.empty() && r.first <= merged.back().second + 4096) {
      merged.back().second = std::max(merged.back().second, r.second);
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

// Reads every weight byte with the bandwidth probe's loop on all cores, `runs` times (the
// first run also faults the mapped pages in). Returns GB/s per run; *bytes the bytes read.
std::vector<double> MeasureWeightRead(const std::vector<std::pair<const char*, const char*>>& ranges,
                                      int threads, int runs, double* bytes) {
  constexpr int64_t kBlockBytes = kFloatsPerBlock * sizeof(float);
  struct Span {
    const float* data;
    int64_t blocks;
  };
  std::vector<Span> spans;
  double total = 0;
  for (const auto& [begin, end] : ranges) {
    const uintptr_t b = (reinterpret_cast<uintptr_t>(begin) + 63) & ~uintptr_t{63};
    const int64_t blocks = (reinterpret_cast<intptr_t>(end) - static_cast<intptr_t>(b)) / kBlockBytes;
    if (blocks <= 0) continue;
    spans.push_back({reinterpret_cast<const float*>(b), blocks});
    total += static_cast<double>(blocks) * kBlockBytes;
  }
  *bytes = total;
  std::vector<double> seconds = RunPinned(threads, runs, [](int) {}, [&](int t) {
    float sum = 0;
    for (const Span& s : spans) {
      const int64_t b0 = s.blocks * t / threads, b1 = s.blocks * (t + 1) / threads;
      if (b1 > b0) sum += ReadSumAvx512(s.data + b0 * kFloatsPerBlock, (b1 - b0) * kFloatsPerBlock);
    }
    g_sink.fetch_add(sum, std::memory_order_relaxed);
  });
  std::vector<double> gbs;
  for (double s : seconds) gbs.push_back(total / s / 1e9);
  return gbs;
}

nlohmann::json BandwidthJson(const std::vector<double>& gbs) {
  return {{"best_gbs", gbs.empty() ? 0.0 : *std::max_element(gbs.begin(), gbs.end())},
          {"median_gbs", Median(gbs)},
          {"runs_gbs", gbs}};
}

// --- Interference ----------------------------------------------------------------------------

struct CpuTimes {
  double busy_seconds = 0;
  double own_seconds = 0;
  Clock::time_point when;
};

CpuTimes ReadCpuTimes() {
  CpuTimes times;
  times.when = Clock::now();
  std::ifstream stat("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  stat >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  times.busy_seconds = (user + nice + system + irq + softirq + steal) / ticks;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  times.own_seconds = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec * 1e-6 +
                      usage.ru_stime.tv_sec + usage.ru_stime.tv_usec * 1e-6;
  return times;
}

// CPUs other processes kept busy on average between two readings.
double OtherProcessesCpus(const CpuTimes& before, const CpuTimes& after) {
  const double wall = std::chrono::duration<double>(after.when - before.when).count();
  if (wall <= 0) return 0;
  const double other = (after.busy_seconds - before.busy_seconds) -
                       (after.own_seconds - before.own_seconds);
  return std::max(0.0, other / wall);
}

std::string SchedulingPolicy() {
  const int policy = sched_getscheduler(0);
  sched_param param{};
  sched_getparam(0, &param);
  if (policy == SCHED_FIFO) return absl::StrCat("SCHED_FIFO ", param.sched_priority);
  if (policy == SCHED_RR) return absl::StrCat("SCHED_RR ", param.sched_priority);
  return absl::StrCat("SCHED_OTHER nice ", getpriority(PRIO_PROCESS, 0));
}

double LoadAverage() {
  double load = -1;
  getloadavg(&load, 1);
  return load;
}

// --- The benchmark -----------------------------------------------------------------------------

struct Options {
  std::string model_dir;
  std::string arch;
  std::string preset = "small";
  std::string dtype = "bf16";
  std::string cache_dir;
  std::string batches = "1,8,32";
  int prefill_len = 512;
  int prefill_runs = 2;
  int context_len = 128;
  int decode_steps = 32;
  int warmup_steps = 2;
  int profile_steps = 8;
  int threads = 0;
  std::string kv_dtype = "f32";
  int64_t bw_mib = 512;
  int bw_runs = 5;
  int64_t seed = 1;
  std::string json_path;
  bool record = false;
  std::string limits_path;
};

// Deterministic prompt tokens (splitmix64), different for every sequence.
std::vector<int32_t> Prompt(uint64_t seed, int64_t seq, int64_t length, int64_t vocab) {
  std::vector<int32_t> tokens(length);
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(seq) * 0xBF58476D1CE4E5B9ull;
  for (int64_t i = 0; i < length; ++i) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    tokens[i] = static_cast<int32_t>(z % static_cast<uint64_t>(vocab));
  }
  return tokens;
}

int32_t ArgMax(const TensorView& row) {
  const float* p = row.data_as<float>();
  return static_cast<int32_t>(std::max_element(p, p + row.dim(0)) - p);
}

absl::StatusOr<std::vector<int>> ParseBatches(const std::string& text) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    long value = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || value < 1 || value > 4096) {
      return absl::InvalidArgumentError(absl::StrCat("--batch: bad batch size \"", item, "\""));
    }
    out.push_back(static_cast<int>(value));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// Profile of the instrumented steps of one batch size, per step.
nlohmann::json ProfileJson(const OpProfile& profile, double step_seconds_total, int steps,
                           const WeightAccounting& acc, double routed_bytes_per_step,
                           double kv_bytes_per_step) {
  std::map<std::string, double> category;
  nlohmann::json ops = nlohmann::json::object();
  double kernels = 0;
  for (const auto& [key, seconds] : profile.seconds) {
    ops[key] = {{"ms_per_step", seconds / steps * 1e3},
                {"calls_per_step", static_cast<double>(profile.calls.at(key)) / steps}};
    const std::string cat = CategoryOf(key);
    if (cat.empty()) continue;
    category[cat] += seconds;
    kernels += seconds;
  }
  category["overhead"] = std::max(0.0, step_seconds_total - kernels);
  // Bytes each category reads per step, for its effective bandwidth.
  std::map<std::string, double> bytes = {{"attention_proj", acc.attention},
                                         {"attention_core", kv_bytes_per_step},
                                         {"router", acc.router},
                                         {"routed_experts", routed_bytes_per_step},
                                         {"shared_expert", acc.shared},
                                         {"lm_head", acc.lm_head}};
  nlohmann::json cats = nlohmann::json::object();
  for (const auto& [cat, seconds] : category) {
    const double per_step = seconds / steps;
    nlohmann::json entry = {{"ms_per_step", per_step * 1e3},
                            {"share", step_seconds_total > 0 ? seconds / step_seconds_total : 0}};
    auto it = bytes.find(cat);
    if (it != bytes.end() && per_step > 0) {
      entry["bytes_per_step"] = it->second;
      entry["effective_gbs"] = it->second / per_step / 1e9;
    }
    cats[cat] = entry;
  }
  return {{"steps", steps},
          {"ms_per_step", step_seconds_total / steps * 1e3},
          {"categories", cats},
          {"ops", ops}};
}

void PrintOps(const nlohmann::json& profile) {
  std::printf("    ops:");
  for (const auto& [key, v] : profile["ops"].items()) {
    std::printf(" %s %.3f ms (%.0f calls);", key.c_str(), v["ms_per_step"].get<double>(),
                v["calls_per_step"].get<double>());
  }
  std::printf("\n");
}

// Tracked files that differ from the commit in the source tree the results describe (the
// binary was built from that tree, so uncommitted edits of kernels or model are part of it).
std::vector<std::string> ModifiedSourceFiles() {
  const std::string src = std::filesystem::path(DefaultResultsDir()).parent_path().parent_path();
  std::vector<std::string> files;
  FILE* pipe = popen(absl::StrCat("git -C '", src, "' status --porcelain --untracked-files=no "
                                  "2>/dev/null").c_str(), "r");
  if (pipe == nullptr) return files;
  char line[4096];
  while (std::fgets(line, sizeof(line), pipe) != nullptr) {
    std::string text(line);
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    if (text.size() > 3) files.push_back(text.substr(3));
  }
  pclose(pipe);
  return files;
}

struct DecodeResult {
  nlohmann::json json;
  double tokens_per_s = 0;
  double fraction_committed = 0;
  double fraction_in_process = 0;
};

class Bench {
 public:
  Bench(const Options& options, model::Model* model, const WeightAccounting& acc,
        const BandwidthProbe* probe, const MachineLimits* limits)
      : o_(options), model_(model), acc_(acc), probe_(probe), limits_(limits),
        recorder_(model->weights(), std::max(1, model->config().moe.num_experts)),
        alloc_(model->kv_cache().num_blocks()) {
    model_->SetExpertExecutor(&recorder_);
    profile_.linear_kind = LinearKinds(model->weights());
  }
  ~Bench() { model_->SetExpertExecutor(nullptr); }

  absl::StatusOr<DecodeResult> Decode(int batch);
  absl::StatusOr<nlohmann::json> Prefill();

 private:
  // Prefills each sequence's prompt, at most ~2048 tokens per Forward. Returns the seconds.
  absl::StatusOr<double> PrefillContexts(const std::vector<std::vector<int32_t>>& prompts,
                                         std::vector<model::SequenceBlocks>& blocks,
                                         std::vector<int32_t>& next);

  const Options& o_;
  model::Model* model_;
  const WeightAccounting& acc_;
  const BandwidthProbe* probe_;
  const MachineLimits* limits_;
  RecordingExecutor recorder_;
  model::BlockAllocator alloc_;
  OpProfile profile_;
};

absl::StatusOr<double> Bench::PrefillContexts(const std::vector<std::vector<int32_t>>& prompts,
                                              std::vector<model::SequenceBlocks>& blocks,
                                              std::vector<int32_t>& next) {
  constexpr int64_t kMaxTokensPerForward = 2048;
  Clock::time_point start = Clock::now();
  size_t i = 0;
  while (i < prompts.size()) {
    model::ForwardBatch fb;
    std::vector<size_t> members;
    int64_t tokens = 0;
    while (i < prompts.size() &&
           (members.empty() ||
            tokens + static_cast<int64_t>(prompts[i].size()) <= kMaxTokensPerForward)) {
      fb.seqs.push_back({.tokens = prompts[i], .start_position = 0,
                         .block_table = blocks[i].table(), .logits = model::LogitsRows::kLast});
      tokens += static_cast<int64_t>(prompts[i].size());
      members.push_back(i++);
    }
    MOE_ASSIGN_OR_RETURN(model::ForwardOutput out, model_->Forward(fb));
    for (size_t m = 0; m < members.size(); ++m) {
      next[members[m]] = ArgMax(out.logits.Row(out.logits_offset[m]));
    }
  }
  return SecondsSince(start);
}

absl::StatusOr<DecodeResult> Bench::Decode(int batch) {
  const model::ModelConfig& c = model_->config();
  const int bs = model_->kv_cache().block_size();
  const int64_t total_len = static_cast<int64_t>(o_.context_len) + o_.warmup_steps +
                            o_.decode_steps + o_.profile_steps;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<model::SequenceBlocks> blocks(batch);
  for (int s = 0; s < batch; ++s) {
    prompts.push_back(Prompt(static_cast<uint64_t>(o_.seed), s, o_.context_len, c.vocab_size));
    MOE_RETURN_IF_ERROR(blocks[s].Reserve(total_len, bs, alloc_));
  }
  std::vector<int32_t> next(batch, 0);
  std::vector<int64_t> position(batch, o_.context_len);
  std::printf("batch %d: prefilling %d x %d tokens\n", batch, batch, o_.context_len);
  std::fflush(stdout);
  MOE_ASSIGN_OR_RETURN(double context_prefill_s, PrefillContexts(prompts, blocks, next));

  // One decode step: every sequence's last token at its position; greedy next token.
  std::vector<int64_t> contexts(batch);
  auto step = [&]() -> absl::Status {
    model::ForwardBatch fb;
    for (int s = 0; s < batch; ++s) {
      fb.seqs.push_back({.tokens = std::span<const int32_t>(&next[s], 1),
                         .start_position = static_cast<int32_t>(position[s]),
                         .block_table = blocks[s].table(),
                         .logits = model::LogitsRows::kLast});
    }
    MOE_ASSIGN_OR_RETURN(model::ForwardOutput out, model_->Forward(fb));
    for (int s = 0; s < batch; ++s) {
      contexts[s] = position[s] + 1;
      next[s] = ArgMax(out.logits.Row(out.logits_offset[s]));
      ++position[s];
    }
    return absl::OkStatus();
  };
  for (int i = 0; i < o_.warmup_steps; ++i) MOE_RETURN_IF_ERROR(step());

  // Timed steps, between two bandwidth measurements.
  const std::vector<double> bw_before = probe_ ? probe_->Measure(o_.bw_runs) : std::vector<double>{};
  const double load_before = LoadAverage();
  const CpuTimes cpu_before = ReadCpuTimes();
  std::vector<double> step_s, step_bytes, step_distinct, step_kv;
  for (int i = 0; i < o_.decode_steps; ++i) {
    recorder_.Clear();
    Clock::time_point start = Clock::now();
    MOE_RETURN_IF_ERROR(step());
    step_s.push_back(SecondsSince(start));
    double distinct = 0;
    const double routed = acc_.RoutedBytes(recorder_, &distinct);
    step_bytes.push_back(acc_.StaticBytes() + routed + batch * acc_.embedding_row);
    step_distinct.push_back(distinct);
    step_kv.push_back(KvBytesRead(model_->kv_cache(), contexts));
  }
  const double other_cpus = OtherProcessesCpus(cpu_before, ReadCpuTimes());
  const std::vector<double> bw_after = probe_ ? probe_->Measure(o_.bw_runs) : std::vector<double>{};

  // Instrumented steps (per-op timing), not part of the numbers above.
  nlohmann::json profile_json;
  if (o_.profile_steps > 0) {
    profile_.seconds.clear();
    profile_.calls.clear();
    double total = 0, routed_bytes = 0, kv_bytes = 0;
    for (int i = 0; i < o_.profile_steps; ++i) {
      recorder_.Clear();
      g_profile = &profile_;
      Clock::time_point start = Clock::now();
      absl::Status status = step();
      total += SecondsSince(start);
      g_profile = nullptr;
      MOE_RETURN_IF_ERROR(status);
      double distinct = 0;
      routed_bytes += acc_.RoutedBytes(recorder_, &distinct);
      kv_bytes += KvBytesRead(model_->kv_cache(), contexts);
    }
    profile_json = ProfileJson(profile_, total, o_.profile_steps, acc_,
                               routed_bytes / o_.profile_steps, kv_bytes / o_.profile_steps);
  }
  for (model::SequenceBlocks& b : blocks) b.Release(alloc_);

  const double seconds = std::accumulate(step_s.begin(), step_s.end(), 0.0);
  const double bytes = std::accumulate(step_bytes.begin(), step_bytes.end(), 0.0);
  const double kv_bytes = std::accumulate(step_kv.begin(), step_kv.end(), 0.0);
  const double steps = static_cast<double>(step_s.size());
  auto best = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  };
  const double bw_in_process = std::max(best(bw_before), best(bw_after));  // GB/s
  const double committed = limits_ ? limits_->read_bw_all_cores_gbs : 0;
  const double experts = std::max(1, c.moe.num_experts);
  const double expected_distinct =
      experts * (1.0 - std::pow(1.0 - static_cast<double>(c.moe.top_k) / experts, batch));
  DecodeResult r;
  r.tokens_per_s = batch * steps / seconds;
  r.fraction_committed = BandwidthFraction(bytes, seconds, committed * 1e9);
  r.fraction_in_process = BandwidthFraction(bytes, seconds, bw_in_process * 1e9);
  const double target = batch == 1 ? kDecodeBatch1Target : batch == 32 ? kDecodeBatch32Target : 0;
  const double effective_gbs = bytes / seconds / 1e9;
  r.json = {
      {"batch", batch},
      {"context_len_start", o_.context_len + o_.warmup_steps},
      {"steps", step_s.size()},
      {"seconds", seconds},
      {"tokens_per_s", r.tokens_per_s},
      {"ms_per_step_mean", seconds / steps * 1e3},
      {"ms_per_step_median", Median(step_s) * 1e3},
      {"ms_per_step_min", *std::min_element(step_s.begin(), step_s.end()) * 1e3},
      {"ms_per_step", [&] {
         std::vector<double> ms;
         for (double s : step_s) ms.push_back(s * 1e3);
         return ms;
       }()},
      {"weight_bytes_per_step", bytes / steps},
      {"distinct_experts_per_layer", Mean(step_distinct)},
      {"expected_distinct_experts_per_layer", expected_distinct},
      {"kv_bytes_per_step", kv_bytes / steps},
      {"effective_gbs", effective_gbs},
      {"effective_gbs_with_kv", (bytes + kv_bytes) / seconds / 1e9},
      {"read_bw_committed_gbs", committed},
      {"read_bw_in_process_gbs", bw_in_process},
      {"bandwidth_before", BandwidthJson(bw_before)},
      {"bandwidth_after", BandwidthJson(bw_after)},
      {"fraction_of_committed_limit", r.fraction_committed},
      {"fraction_of_in_process_limit", r.fraction_in_process},
      {"fraction_of_in_process_limit_with_kv",
       BandwidthFraction(bytes + kv_bytes, seconds, bw_in_process * 1e9)},
      {"roofline_ms_per_step_committed", committed > 0 ? bytes / steps / (committed * 1e9) * 1e3 : 0},
      {"roofline_ms_per_step_in_process",
       bw_in_process > 0 ? bytes / steps / (bw_in_process * 1e9) * 1e3 : 0},
      {"context_prefill_seconds", context_prefill_s},
      {"context_prefill_tokens", static_cast<int64_t>(batch) * o_.context_len},
      {"load_average_1m_before", load_before},
      {"other_processes_cpus", other_cpus},
  };
  if (target > 0) {
    r.json["target"] = target;
    r.json["met_committed"] = r.fraction_committed >= target;
    r.json["met_in_process"] = r.fraction_in_process >= target;
  }
  if (!profile_json.is_null()) r.json["profile"] = profile_json;

  std::printf("batch %3d: %8.1f tok/s  %7.2f ms/step (median %.2f)  %6.1f MB/step  %.1f experts/layer"
              "  %5.1f GB/s  %5.1f %% of committed %.1f GB/s  %5.1f %% of in-process %.1f GB/s"
              "  (other CPUs %.2f)\n",
              batch, r.tokens_per_s, seconds / steps * 1e3, Median(step_s) * 1e3,
              bytes / steps / 1e6, Mean(step_distinct), effective_gbs,
              100 * r.fraction_committed, committed, 100 * r.fraction_in_process, bw_in_process,
              other_cpus);
  if (!profile_json.is_null()) {
    for (const auto& [cat, v] : profile_json["categories"].items()) {
      std::printf("    %-18s %7.3f ms/step  %5.1f %%", cat.c_str(), v["ms_per_step"].get<double>(),
                  100 * v["share"].get<double>());
      if (v.contains("effective_gbs")) {
        std::printf("  %6.1f MB  %5.1f GB/s", v["bytes_per_step"].get<double>() / 1e6,
                    v["effective_gbs"].get<double>());
      }
      std::printf("\n");
    }
    PrintOps(profile_json);
  }
  std::fflush(stdout);
  return r;
}

absl::StatusOr<nlohmann::json> Bench::Prefill() {
  const model::ModelConfig& c = model_->config();
  const int bs = model_->kv_cache().block_size();
  const std::vector<int32_t> prompt = Prompt(static_cast<uint64_t>(o_.seed), 1 << 20,
                                             o_.prefill_len, c.vocab_size);
  model::SequenceBlocks blocks;
  MOE_RETURN_IF_ERROR(blocks.Reserve(o_.prefill_len, bs, alloc_));
  model::ForwardBatch fb;
  fb.seqs.push_back({.tokens = prompt, .start_position = 0, .block_table = blocks.table(),
                     .logits = model::LogitsRows::kLast});
  std::vector<double> runs;
  const double load_before = LoadAverage();
  const CpuTimes cpu_before = ReadCpuTimes();
  for (int i = 0; i < o_.prefill_runs; ++i) {
    Clock::time_point start = Clock::now();
    MOE_ASSIGN_OR_RETURN(model::ForwardOutput out, model_->Forward(fb));
    (void)ArgMax(out.logits.Row(0));
    runs.push_back(SecondsSince(start));
  }
  const double other_cpus = OtherProcessesCpus(cpu_before, ReadCpuTimes());
  // Per-op profile of one more run.
  nlohmann::json profile_json;
  if (o_.profile_steps > 0) {
    profile_.seconds.clear();
    profile_.calls.clear();
    g_profile = &profile_;
    Clock::time_point start = Clock::now();
    absl::StatusOr<model::ForwardOutput> out = model_->Forward(fb);
    const double total = SecondsSince(start);
    g_profile = nullptr;
    MOE_RETURN_IF_ERROR(out.status());
    profile_json = ProfileJson(profile_, total, 1, acc_, 0, 0);
    for (auto& [cat, v] : profile_json["categories"].items()) {  // bytes mean little here
      v.erase("bytes_per_step");
      v.erase("effective_gbs");
    }
  }
  blocks.Release(alloc_);

  const double t = static_cast<double>(o_.prefill_len);
  const double matmul_flops = 2.0 * (acc_.dense_matmul_params + acc_.routed_matmul_params) * t +
                              2.0 * acc_.lm_head_params;  // LM head: the one logits row
  const double attention_flops = AttentionFlops(c, 0, o_.prefill_len);
  const double flops = matmul_flops + attention_flops;
  const double best = *std::min_element(runs.begin(), runs.end());
  const double peak = limits_ ? limits_->bf16_peak_gflops : 0;
  const double onednn = limits_ ? limits_->onednn_bf16_gflops : 0;
  const double fraction = ComputeFraction(flops, best, peak * 1e9);
  nlohmann::json j = {
      {"tokens", o_.prefill_len},
      {"runs_seconds", runs},
      {"best_seconds", best},
      {"median_seconds", Median(runs)},
      {"tokens_per_s", t / best},
      {"matmul_flops", matmul_flops},
      {"attention_flops", attention_flops},
      {"flops", flops},
      {"gflops", flops / best / 1e9},
      {"bf16_peak_gflops", peak},
      {"onednn_bf16_gflops", onednn},
      {"fraction_of_bf16_peak", fraction},
      {"fraction_of_onednn", ComputeFraction(flops, best, onednn * 1e9)},
      {"target", kPrefillTarget},
      {"met", fraction >= kPrefillTarget},
      {"load_average_1m_before", load_before},
      {"other_processes_cpus", other_cpus},
  };
  if (!profile_json.is_null()) j["profile"] = profile_json;
  std::printf("prefill %d: %.3f s (best of %d)  %.1f tok/s  %.1f GFLOP  %.1f GFLOP/s  "
              "%.1f %% of bf16 peak %.0f GFLOP/s  (other CPUs %.2f)\n",
              o_.prefill_len, best, o_.prefill_runs, t / best, flops / 1e9, flops / best / 1e9,
              100 * fraction, peak, other_cpus);
  if (!profile_json.is_null()) {
    for (const auto& [cat, v] : profile_json["categories"].items()) {
      std::printf("    %-18s %8.2f ms  %5.1f %%\n", cat.c_str(), v["ms_per_step"].get<double>(),
                  100 * v["share"].get<double>());
    }
    PrintOps(profile_json);
  }
  std::fflush(stdout);
  return j;
}

absl::StatusOr<std::string> ModelDir(const Options& o) {
  if (!o.model_dir.empty()) return o.model_dir;
  if (o.arch.empty()) return absl::InvalidArgumentError("need --model DIR or --arch ARCH");
  std::string dir = o.cache_dir;
  if (dir.empty()) {
    dir = absl::StrCat("/tmp/moe-bench-models/", o.arch, "-", o.preset, "-", o.dtype);
  }
  if (!std::filesystem::exists(std::filesystem::path(dir) / "config.json")) {
    std::printf("generating %s %s %s into %s\n", o.arch.c_str(), o.preset.c_str(),
                o.dtype.c_str(), dir.c_str());
    std::fflush(stdout);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    MOE_ASSIGN_OR_RETURN(model::GenModelResult gen,
                         model::GenerateModel({.arch = o.arch, .preset = o.preset,
                                               .dtype = o.dtype, .seed = 0, .out_dir = dir}));
    (void)gen;
  }
  return dir;
}

absl::Status Run(const Options& o) {
  MOE_ASSIGN_OR_RETURN(std::vector<int> batches, ParseBatches(o.batches));
  MOE_ASSIGN_OR_RETURN(std::string dir, ModelDir(o));
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(AllowedCpus().size());

  nlohmann::json machine = CollectMachineInfo();
  machine["scheduling"] = SchedulingPolicy();
  machine["source_modified_files"] = ModifiedSourceFiles();
  std::optional<MachineLimits> limits;
  const std::string limits_path = o.limits_path.empty() ? DefaultLimitsPath() : o.limits_path;
  if (absl::StatusOr<MachineLimits> l = LoadMachineLimits(limits_path); l.ok()) {
    limits = *l;
  } else {
    MOE_LOG(WARNING) << "no committed machine limits; fractions use the in-process bandwidth only"
                     << common::Kv("error", l.status().message());
  }

  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t decode_len = static_cast<int64_t>(o.context_len) + o.warmup_steps +
                             o.decode_steps + o.profile_steps;
  model::ModelOptions mopts;
  mopts.threads = threads;
  if (o.kv_dtype == "bf16") {
    mopts.kv.dtype = common::DType::kBF16;
  } else if (o.kv_dtype != "f32") {
    return absl::InvalidArgumentError("--kv-dtype must be f32 or bf16");
  }
  const int bs = mopts.kv.block_size;
  mopts.kv.num_blocks = static_cast<int>(
      std::max<int64_t>(max_batch * ((decode_len + bs - 1) / bs), (o.prefill_len + bs - 1) / bs) + 4);
  mopts.initial_batch_tokens = std::max(o.prefill_len, 256);
  Clock::time_point load_start = Clock::now();
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, model::Model::Load(dir, mopts));
  const model::ModelConfig& c = model->config();
  if (decode_len > c.max_position_embeddings || o.prefill_len > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "context ", decode_len, " / prefill ", o.prefill_len, " exceed max_position_embeddings ",
        c.max_position_embeddings));
  }
  const WeightAccounting acc = Account(model->weights(), c);
  std::printf("model %s (%s): %d layers, hidden %lld, %d experts top-%d; weights %.1f MB, "
              "active per token %.1f MB; loaded in %.1f s; %d threads; %s\n",
              dir.c_str(), c.model_type.c_str(), c.num_layers,
              static_cast<long long>(c.hidden_size), c.moe.num_experts, c.moe.top_k,
              acc.total / 1e6, (acc.StaticBytes() + acc.ActiveRoutedBytes()) / 1e6,
              SecondsSince(load_start), threads, machine["scheduling"].get<std::string>().c_str());
  std::fflush(stdout);

  // Fault the mapped weights in and measure how fast the weight memory itself reads (the
  // checkpoint map has 4 KiB pages; the probe buffer below asks for 2 MiB pages).
  nlohmann::json weight_read;
  if (avx512) {
    double bytes = 0;
    Clock::time_point start = Clock::now();
    const auto ranges = WeightRanges(model->weights());
    std::vector<double> first = MeasureWeightRead(ranges, threads, 1, &bytes);
    const double first_s = SecondsSince(start);
    std::vector<double> gbs =
        o.bw_runs > 0 ? MeasureWeightRead(ranges, threads, std::max(2, o.bw_runs), &bytes)
                      : std::vector<double>{};
    weight_read = BandwidthJson(gbs);
    weight_read["bytes"] = bytes;
    weight_read["ranges"] = ranges.size();
    weight_read["first_touch_seconds"] = first_s;
    weight_read["owned_bytes"] = model->weights().owned_bytes();
    std::printf("weights: %.1f MB in %zu ranges, first touch %.2f s, read on all cores: best "
                "%.1f GB/s, median %.1f GB/s\n",
                bytes / 1e6, ranges.size(), first_s, weight_read["best_gbs"].get<double>(),
                weight_read["median_gbs"].get<double>());
  }

  std::unique_ptr<BandwidthProbe> probe;
  if (avx512 && o.bw_runs > 0) probe = std::make_unique<BandwidthProbe>(o.bw_mib, threads);
  const std::vector<double> bw_start = probe ? probe->Measure(o.bw_runs) : std::vector<double>{};
  if (!bw_start.empty()) {
    std::printf("in-process read bandwidth (%.0f MiB buffer, 2 MiB pages): best %.1f GB/s, "
                "median %.1f GB/s\n", probe->bytes() / 1048576.0,
                *std::max_element(bw_start.begin(), bw_start.end()), Median(bw_start));
  }

  Bench bench(o, model.get(), acc, probe.get(), limits ? &*limits : nullptr);
  nlohmann::json decode = nlohmann::json::array();
  std::vector<std::pair<std::string, std::string>> summary;
  for (int batch : batches) {
    MOE_ASSIGN_OR_RETURN(DecodeResult r, bench.Decode(batch));
    decode.push_back(r.json);
    summary.push_back({absl::StrCat("b", batch, " tok/s"), FormatNumber(r.tokens_per_s, 1)});
    summary.push_back({absl::StrCat("b", batch, " of BW"),
                       absl::StrCat(FormatPercent(r.fraction_committed), " (",
                                    FormatPercent(r.fraction_in_process), " in-process)")});
  }
  nlohmann::json prefill;
  if (o.prefill_len > 0) {
    MOE_ASSIGN_OR_RETURN(prefill, bench.Prefill());
    summary.push_back({absl::StrCat("prefill ", o.prefill_len, " tok/s"),
                       FormatNumber(prefill["tokens_per_s"].get<double>(), 1)});
    summary.push_back({"prefill of bf16 peak",
                       FormatPercent(prefill["fraction_of_bf16_peak"].get<double>())});
  }
  const std::vector<double> bw_end = probe ? probe->Measure(o.bw_runs) : std::vector<double>{};

  const double active_bytes = acc.StaticBytes() + acc.ActiveRoutedBytes() + acc.embedding_row;
  nlohmann::json results = {
      {"tool", "moe-bench-model"},
      {"schema_version", 1},
      {"model",
       {{"dir", dir},
        {"model_type", c.model_type},
        {"arch", o.arch},
        {"preset", o.preset},
        {"weight_dtype", o.model_dir.empty() ? o.dtype : "as stored"},
        {"layers", c.num_layers},
        {"hidden", c.hidden_size},
        {"experts", c.moe.num_experts},
        {"top_k", c.moe.top_k},
        {"vocab", c.vocab_size},
        {"weight_bytes_total", acc.total},
        {"bytes_attention", acc.attention},
        {"bytes_router", acc.router},
        {"bytes_shared_expert", acc.shared},
        {"bytes_norms", acc.norms},
        {"bytes_lm_head", acc.lm_head},
        {"bytes_routed_experts_all", acc.AllRoutedBytes()},
        {"bytes_routed_experts_top_k", acc.ActiveRoutedBytes()},
        {"bytes_active_per_token", active_bytes},
        {"bytes_all_experts_step", acc.StaticBytes() + acc.AllRoutedBytes()},
        {"matmul_params_per_token",
         acc.dense_matmul_params + acc.routed_matmul_params + acc.lm_head_params}}},
      {"settings",
       {{"batches", batches}, {"context_len", o.context_len}, {"decode_steps", o.decode_steps},
        {"warmup_steps", o.warmup_steps}, {"profile_steps", o.profile_steps},
        {"prefill_len", o.prefill_len}, {"prefill_runs", o.prefill_runs}, {"threads", threads},
        {"kv_dtype", o.kv_dtype}, {"bandwidth_buffer_bytes", probe ? probe->bytes() : 0},
        {"bandwidth_runs", o.bw_runs}, {"seed", o.seed}}},
      {"committed_limits", limits ? MachineLimitsToJson(*limits) : nlohmann::json()},
      {"bandwidth_start", BandwidthJson(bw_start)},
      {"weight_memory_read", weight_read},
      {"bandwidth_end", BandwidthJson(bw_end)},
      {"decode", decode},
      {"prefill", prefill},
  };
  BenchRecord record{.name = "model_bench", .machine = machine, .results = results,
                     .summary = summary};
  if (!o.json_path.empty()) {
    const std::string date = TodayUtc();
    nlohmann::json doc = {{"name", record.name}, {"date", date}, {"machine", machine},
                          {"results", results}};
    std::ofstream out(o.json_path);
    out << doc.dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", o.json_path));
    std::printf("wrote %s\n", o.json_path.c_str());
  }
  if (o.record) {
    MOE_ASSIGN_OR_RETURN(WrittenRecord written, WriteBenchRecord(record, {}));
    std::printf("recorded %s and a row in %s\n", written.json_path.c_str(),
                written.summary_path.c_str());
  }
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  Options o;
  common::FlagSet flags(
      "moe-bench-model (--model DIR | --arch ARCH [--preset small]) [--batch 1,8,32] "
      "[--json FILE] [--record]",
      "Times decode and prefill of the model engine against this machine's limits.");
  flags.AddString("model", &o.model_dir, "model directory (config.json + safetensors)");
  flags.AddString("arch", &o.arch, "without --model: generate this architecture (gen-model)");
  flags.AddString("preset", &o.preset, "gen-model preset (tiny | small)");
  flags.AddString("dtype", &o.dtype, "gen-model weight dtype (f32 | bf16)");
  flags.AddString("cache-dir", &o.cache_dir,
                  "where the generated model lives (default /tmp/moe-bench-models/ARCH-PRESET-DTYPE); "
                  "generated when it has no config.json");
  flags.AddString("batch", &o.batches, "decode batch sizes, comma separated");
  flags.AddInt("prefill-len", &o.prefill_len, "prompt tokens of the prefill benchmark (0: skip)");
  flags.AddInt("prefill-runs", &o.prefill_runs, "timed prefill runs (best is reported)");
  flags.AddInt("context-len", &o.context_len, "prompt tokens of each decode sequence");
  flags.AddInt("decode-steps", &o.decode_steps, "timed decode steps per batch size");
  flags.AddInt("warmup-steps", &o.warmup_steps, "untimed decode steps before the timed ones");
  flags.AddInt("profile-steps", &o.profile_steps,
               "instrumented decode steps with per-op timing after the timed ones (0: none)");
  flags.AddInt("threads", &o.threads, "CPU kernel threads (0: every allowed CPU)");
  flags.AddString("kv-dtype", &o.kv_dtype, "KV cache dtype (f32 | bf16)");
  flags.AddInt("bw-mib", &o.bw_mib, "buffer of the in-process bandwidth measurement, MiB");
  flags.AddInt("bw-runs", &o.bw_runs, "runs per in-process bandwidth measurement (0: none)");
  flags.AddInt("seed", &o.seed, "seed of the prompt tokens");
  flags.AddString("json", &o.json_path, "write {name, date, machine, results} here");
  flags.AddBool("record", &o.record,
                "store bench/results/model_bench-<date>.json and a SUMMARY.md row");
  flags.AddString("limits", &o.limits_path,
                  "machine_limits.json to compare with (default bench/results/machine_limits.json)");
  absl::StatusOr<std::vector<std::string>> rest =
      flags.Parse(std::vector<std::string>(argv + 1, argv + argc));
  if (!rest.ok()) {
    std::cerr << "moe-bench-model: " << rest.status().message() << "\n\n" << flags.HelpText();
    return 2;
  }
  if (flags.help_requested()) {
    std::cout << flags.HelpText();
    return 0;
  }
  if (!rest->empty() || o.decode_steps < 1 || o.context_len < 1 || o.prefill_len < 0 ||
      o.prefill_runs < 1 || o.warmup_steps < 0 || o.profile_steps < 0 || o.bw_mib < 2 ||
      o.bw_runs < 0) {
    std::cerr << "moe-bench-model: need --decode-steps >= 1, --context-len >= 1, "
                 "--prefill-runs >= 1, no positionals\n\n"
              << flags.HelpText();
    return 2;
  }
  absl::Status status = Run(o);
  if (!status.ok()) {
    std::cerr << "moe-bench-model: " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) { return moe::bench::Main(argc, argv); }
