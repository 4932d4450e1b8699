// The CUDA backend against the CPU reference: every op of kernels/kernels.h runs through
// the public moe::kernels API once with Device::kCuda views and once with Device::kCpu
// views of the same random inputs (odd sizes, strided rows, f32 and bf16 weights), and the
// results must agree within the tolerance stated at each check.
//
// Without a CUDA device every GPU test skips ("no CUDA device"); the no-device test checks
// that the backend then answers kUnavailable. When the CPU reference of an op is not
// implemented yet, the test reports that (skip with the CPU status) after checking that the
// CUDA op itself ran.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/tensor.h"
#include "kernels/cuda/device.h"
#include "kernels/kernels.h"

namespace moe::kernels {
namespace {

using common::Device;
using common::DType;
using common::Tensor;
using common::TensorView;

// ---- helpers ------------------------------------------------------------------------------

Tensor Random(DType dtype, std::vector<int64_t> shape, std::mt19937& rng, float lo = -1.f,
              float hi = 1.f) {
  Tensor t(dtype, std::move(shape));
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == DType::kBF16) {
      t.data_as<uint16_t>()[i] = common::F32ToBf16(dist(rng));
    } else {
      t.data_as<float>()[i] = dist(rng);
    }
  }
  return t;
}

// A device copy of a host tensor; Dev(v) maps any view into the host tensor to the same
// view of the device copy (same offset, shape and strides).
class Mirror {
 public:
  explicit Mirror(const Tensor& host) : host_(host.view()) {
    auto buf = cuda::DeviceBuffer::Allocate(host_.nbytes());
    EXPECT_TRUE(buf.ok()) << buf.status();
    buffer_ = std::move(*buf);
    EXPECT_TRUE(cuda::CopyToDevice(buffer_.data(), host_.data(), host_.nbytes()).ok());
  }
  TensorView Dev(const TensorView& host_view) const {
    const ptrdiff_t offset =
        static_cast<const char*>(host_view.data()) - static_cast<const char*>(host_.data());
    return TensorView(static_cast<char*>(buffer_.data()) + offset, host_view.dtype(),
                      host_view.shape(), host_view.strides(), Device::kCuda);
  }
  TensorView Dev() const { return Dev(host_); }
  // The device contents as a new host tensor.
  Tensor Download() const {
    Tensor t(host_.dtype(), host_.shape());
    EXPECT_TRUE(cuda::SynchronizeDevice().ok());
    EXPECT_TRUE(cuda::CopyToHost(t.data(), buffer_.data(), host_.nbytes()).ok());
    return t;
  }

 private:
  TensorView host_;
  cuda::DeviceBuffer buffer_;
};

float Get(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::kBF16: return common::Bf16ToF32(t.data_as<uint16_t>()[i]);
    case DType::kI32: return static_cast<float>(t.data_as<int32_t>()[i]);
    case DType::kI64: return static_cast<float>(t.data_as<int64_t>()[i]);
    default: return t.data_as<float>()[i];
  }
}

// |got - want| <= atol + rtol * |want| elementwise; reports the first few mismatches.
void ExpectNear(const Tensor& want, const Tensor& got, float atol, float rtol,
                const std::string& what) {
  ASSERT_EQ(want.numel(), got.numel()) << what;
  int bad = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const float w = Get(want, i), g = Get(got, i);
    if (!(std::fabs(w - g) <= atol + rtol * std::fabs(w))) {
      if (++bad <= 5) ADD_FAILURE() << what << ": element " << i << " cpu " << w << " cuda " << g;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel() << " elements differ";
}

void ExpectEqual(const Tensor& want, const Tensor& got, const std::string& what) {
  ExpectNear(want, got, 0.f, 0.f, what);
}

// The CPU reference may still be missing an op: report it instead of failing.
#define RUN_CPU_REFERENCE(expr)                                                    \
  do {                                                                             \
    absl::Status cpu_status_ = (expr);                                             \
    if (absl::IsUnimplemented(cpu_status_)) {                                      \
      GTEST_SKIP() << "CUDA op ran; CPU reference unimplemented: " << cpu_status_; \
    }                                                                              \
    ASSERT_TRUE(cpu_status_.ok()) << cpu_status_;                                  \
  } while (0)

class CudaKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  }
  std::mt19937 rng_{1234};
};

// ---- without a device ---------------------------------------------------------------------

TEST(CudaKernelsNoDeviceTest, ReportsUnavailable) {
  if (cuda::CudaAvailable()) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_EQ(cuda::DeviceCount(), 0);
  float a[4] = {}, b[4] = {};
  TensorView va(a, DType::kF32, {2, 2}, Device::kCuda), vb(b, DType::kF32, {2, 2}, Device::kCuda);
  absl::Status status = Add({.a = va, .b = vb, .out = va});
  EXPECT_TRUE(absl::IsUnavailable(status)) << status;
  EXPECT_TRUE(absl::IsUnavailable(cuda::Malloc(16).status()));
  EXPECT_TRUE(absl::IsUnavailable(cuda::CreateStream().status()));
}

// ---- elementwise --------------------------------------------------------------------------

TEST_F(CudaKernelsTest, RejectsHostViews) {
  Tensor a = Random(DType::kF32, {3, 5}, rng_);
  Mirror d(a);
  absl::Status status = Add({.a = a.view(), .b = d.Dev(), .out = d.Dev()});
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
}

TEST_F(CudaKernelsTest, Embedding) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    Tensor table = Random(dtype, {37, 45}, rng_);
    Tensor ids(DType::kI32, {13});
    for (int i = 0; i < 13; ++i) ids.data_as<int32_t>()[i] = (i * 11) % 37;
    Tensor out(DType::kF32, {13, 45}), ref(DType::kF32, {13, 45});
    Mirror d_table(table), d_ids(ids), d_out(out);
    ASSERT_TRUE(Embedding({.ids = d_ids.Dev(), .table = d_table.Dev(), .out = d_out.Dev()}).ok());
    RUN_CPU_REFERENCE(Embedding({.ids = ids.view(), .table = table.view(), .out = ref.view()}));
    ExpectEqual(ref, d_out.Download(), "Embedding exact");

    ids.data_as<int32_t>()[3] = 37;
    Mirror d_bad(ids);
    absl::Status status =
        Embedding({.ids = d_bad.Dev(), .table = d_table.Dev(), .out = d_out.Dev()});
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  }
}

TEST_F(CudaKernelsTest, RmsNormWithAndWithoutResidual) {
  constexpr int64_t kRows = 7, kDim = 257, kLd = 300;
  for (DType wtype : {DType::kF32, DType::kBF16}) {
    for (bool residual : {false, true}) {
      Tensor in_buf = Random(DType::kF32, {kRows, kLd}, rng_);
      TensorView in(in_buf.data(), DType::kF32, {kRows, kDim}, {kLd, 1});  // strided rows
      Tensor weight = Random(wtype, {kDim}, rng_, 0.5f, 1.5f);
      Tensor res = Random(DType::kF32, {kRows, kDim}, rng_);
      Tensor out(DType::kF32, {kRows, kDim});
      Mirror d_in(in_buf), d_w(weight), d_res(res), d_out(out);
      RmsNormArgs dev{.in = d_in.Dev(in), .weight = d_w.Dev(), .eps = 1e-6, .out = d_out.Dev()};
      if (residual) dev.residual = d_res.Dev();
      ASSERT_TRUE(RmsNorm(dev).ok());
      RmsNormArgs cpu{.in = in, .weight = weight.view(), .eps = 1e-6, .out = out.view()};
      if (residual) cpu.residual = res.view();
      RUN_CPU_REFERENCE(RmsNorm(cpu));
      // f32 sums in a different order: 1e-5 relative.
      ExpectNear(out, d_out.Download(), 1e-5f, 1e-5f, "RmsNorm out");
      if (residual) ExpectNear(res, d_res.Download(), 1e-6f, 1e-6f, "RmsNorm residual");
    }
  }
}

TEST_F(CudaKernelsTest, AddSiluMulSigmoidGatedAdd) {
  constexpr int64_t kRows = 9, kCols = 131;
  Tensor a = Random(DType::kF32, {kRows, kCols}, rng_), b = Random(DType::kF32, {kRows, kCols}, rng_);
  Tensor sum(DType::kF32, {kRows, kCols});
  Mirror da(a), db(b), dsum(sum);
  ASSERT_TRUE(Add({.a = da.Dev(), .b = db.Dev(), .out = dsum.Dev()}).ok());
  Tensor gate_up = Random(DType::kF32, {kRows, 2 * kCols}, rng_, -4.f, 4.f);
  Tensor act(DType::kF32, {kRows, kCols});
  Mirror dgu(gate_up), dact(act);
  ASSERT_TRUE(SiluMul({.gate_up = dgu.Dev(), .out = dact.Dev()}).ok());
  Tensor gate = Random(DType::kF32, {kRows, 1}, rng_, -3.f, 3.f);
  Tensor acc = Random(DType::kF32, {kRows, kCols}, rng_);
  Mirror dgate(gate), dacc(acc);
  ASSERT_TRUE(SigmoidGatedAdd({.in = da.Dev(), .gate_logit = dgate.Dev(), .out = dacc.Dev()}).ok());

  RUN_CPU_REFERENCE(Add({.a = a.view(), .b = b.view(), .out = sum.view()}));
  ExpectEqual(sum, dsum.Download(), "Add exact");
  RUN_CPU_REFERENCE(SiluMul({.gate_up = gate_up.view(), .out = act.view()}));
  ExpectNear(act, dact.Download(), 1e-6f, 1e-5f, "SiluMul (expf ulps)");
  RUN_CPU_REFERENCE(SigmoidGatedAdd({.in = a.view(), .gate_logit = gate.view(), .out = acc.view()}));
  ExpectNear(acc, dacc.Download(), 1e-6f, 1e-5f, "SigmoidGatedAdd");
}

RopeTable MakeRopeTable(int rotary_dim, int max_positions) {
  RopeTable table{.rotary_dim = rotary_dim, .max_positions = max_positions};
  const int half = rotary_dim / 2;
  for (int p = 0; p < max_positions; ++p) {
    for (int i = 0; i < half; ++i) {
      const double angle = p * std::pow(10000.0, -2.0 * i / rotary_dim);
      table.cos.push_back(static_cast<float>(std::cos(angle)));
      table.sin.push_back(static_cast<float>(std::sin(angle)));
    }
  }
  return table;
}

TEST_F(CudaKernelsTest, RopeBothStyles) {
  constexpr int64_t kTokens = 5, kHeads = 3, kHeadDim = 24, kRowLd = 80;  // strided tokens
  const RopeTable table = MakeRopeTable(16, 64);
  for (RopeStyle style : {RopeStyle::kHalf, RopeStyle::kInterleaved}) {
    Tensor buf = Random(DType::kF32, {kTokens, kRowLd}, rng_);
    TensorView x(buf.data(), DType::kF32, {kTokens, kHeads, kHeadDim}, {kRowLd, kHeadDim, 1});
    Tensor pos(DType::kI32, {kTokens});
    for (int t = 0; t < kTokens; ++t) pos.data_as<int32_t>()[t] = 7 * t + 3;
    Mirror dbuf(buf), dpos(pos);
    ASSERT_TRUE(Rope({.x = dbuf.Dev(x), .positions = dpos.Dev(), .table = &table, .style = style}).ok());
    ASSERT_TRUE(Rope({.x = dbuf.Dev(x), .positions = dpos.Dev(), .table = &table, .style = style}).ok())
        << "second call (cached table)";
    RUN_CPU_REFERENCE(Rope({.x = x, .positions = pos.view(), .table = &table, .style = style}));
    RUN_CPU_REFERENCE(Rope({.x = x, .positions = pos.view(), .table = &table, .style = style}));
    ExpectNear(buf, dbuf.Download(), 1e-5f, 1e-5f,
               style == RopeStyle::kHalf ? "Rope half" : "Rope interleaved");
  }
}

// ---- KV cache and attention ---------------------------------------------------------------

TEST_F(CudaKernelsTest, WriteKvCache) {
  constexpr int64_t kTokens = 6, kKvHeads = 2, kD = 20, kDv = 12, kBlocks = 5, kBlockSize = 4;
  for (DType ctype : {DType::kF32, DType::kBF16}) {
    Tensor k = Random(DType::kF32, {kTokens, kKvHeads, kD}, rng_);
    Tensor v = Random(DType::kF32, {kTokens, kKvHeads, kDv}, rng_);
    Tensor slots(DType::kI64, {kTokens});
    const int64_t chosen[kTokens] = {17, 0, 3, 19, 8, 9};
    std::copy(chosen, chosen + kTokens, slots.data_as<int64_t>());
    Tensor kc = Random(ctype, {kBlocks, kBlockSize, kKvHeads, kD}, rng_);
    Tensor vc = Random(ctype, {kBlocks, kBlockSize, kKvHeads, kDv}, rng_);
    Mirror dk(k), dv(v), ds(slots), dkc(kc), dvc(vc);
    ASSERT_TRUE(WriteKvCache({.k = dk.Dev(), .v = dv.Dev(), .slots = ds.Dev(),
                              .k_cache = dkc.Dev(), .v_cache = dvc.Dev()}).ok());
    RUN_CPU_REFERENCE(WriteKvCache({.k = k.view(), .v = v.view(), .slots = slots.view(),
                                    .k_cache = kc.view(), .v_cache = vc.view()}));
    ExpectEqual(kc, dkc.Download(), "k_cache (same rounding)");
    ExpectEqual(vc, dvc.Download(), "v_cache (same rounding)");
  }
}

struct AttentionCase {
  int64_t heads, kv_heads, d, dv;
  bool mla;  // v is a strided view of the first dv features of k
};

void RunAttention(const AttentionCase& c, DType ctype, std::mt19937& rng) {
  constexpr int64_t kBlockSize = 4, kBlocks = 16;
  // A mixed batch: a decode row, a full prefill, a prefill chunk over a cached prefix.
  std::vector<AttentionSeq> seqs = {{.q_start = 0, .q_len = 1, .context_len = 19},
                                    {.q_start = 1, .q_len = 7, .context_len = 7},
                                    {.q_start = 8, .q_len = 3, .context_len = 13}};
  const int64_t tokens = 11;
  std::vector<int32_t> order(kBlocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::vector<int32_t>> tables = {{order.begin(), order.begin() + 5},
                                              {order.begin() + 5, order.begin() + 7},
                                              {order.begin() + 7, order.begin() + 11}};
  for (size_t s = 0; s < seqs.size(); ++s) {
    seqs[s].block_table = tables[s].data();
    seqs[s].num_blocks = static_cast<int32_t>(tables[s].size());
  }
  Tensor q = Random(DType::kF32, {tokens, c.heads, c.d}, rng);
  Tensor kc = Random(ctype, {kBlocks, kBlockSize, c.kv_heads, c.d}, rng);
  Tensor vc_own = Random(ctype, {kBlocks, kBlockSize, c.kv_heads, c.dv}, rng);
  TensorView k_view = kc.view();
  TensorView v_view = c.mla ? TensorView(kc.data(), ctype, {kBlocks, kBlockSize, 1, c.dv},
                                         k_view.strides())
                            : vc_own.view();
  Tensor out(DType::kF32, {tokens, c.heads, c.dv});
  Mirror dq(q), dkc(kc), dvc(vc_own), dout(out);
  const Mirror& v_owner = c.mla ? dkc : dvc;
  const float scale = 1.f / std::sqrt(static_cast<float>(c.d));
  ASSERT_TRUE(PagedAttention({.q = dq.Dev(), .k_cache = dkc.Dev(), .v_cache = v_owner.Dev(v_view),
                              .seqs = &seqs, .scale = scale, .out = dout.Dev()}).ok());
  RUN_CPU_REFERENCE(PagedAttention({.q = q.view(), .k_cache = k_view, .v_cache = v_view,
                                    .seqs = &seqs, .scale = scale, .out = out.view()}));
  // Same bf16 cache values on both sides; f32 softmax/accumulation order differs: 2e-5.
  ExpectNear(out, dout.Download(), 2e-5f, 1e-4f, "PagedAttention");
}

TEST_F(CudaKernelsTest, PagedAttentionGqaMixedBatch) {
  for (DType ctype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(ctype == DType::kF32 ? "f32 cache" : "bf16 cache");
    RunAttention({.heads = 4, .kv_heads = 2, .d = 24, .dv = 24, .mla = false}, ctype, rng_);
    RunAttention({.heads = 6, .kv_heads = 6, .d = 33, .dv = 17, .mla = false}, ctype, rng_);
  }
}

TEST_F(CudaKernelsTest, PagedAttentionMlaStridedV) {
  for (DType ctype : {DType::kF32, DType::kBF16}) {
    RunAttention({.heads = 3, .kv_heads = 1, .d = 40, .dv = 32, .mla = true}, ctype, rng_);
  }
}

// ---- MoE ----------------------------------------------------------------------------------

struct RouterCase {
  const char* name;
  int64_t experts;
  RouterArgs args;
};

TEST_F(CudaKernelsTest, RouterTopKVariants) {
  const RouterCase cases[] = {
      {"mixtral", 8, {.scoring = Scoring::kSoftmax, .top_k = 2, .norm_topk_prob = true}},
      {"qwen2", 60, {.scoring = Scoring::kSoftmax, .top_k = 4}},
      {"deepseek-v2", 64,
       {.scoring = Scoring::kSoftmax, .top_k = 6, .n_group = 8, .topk_group = 3,
        .group_score = GroupScore::kMax, .routed_scaling_factor = 16.0}},
      {"deepseek-v3", 64,
       {.scoring = Scoring::kSigmoid, .top_k = 8, .norm_topk_prob = true, .n_group = 8,
        .topk_group = 4, .group_score = GroupScore::kTop2Sum, .routed_scaling_factor = 2.5}},
      {"sigmoid-no-groups", 37, {.scoring = Scoring::kSigmoid, .top_k = 3}},
  };
  constexpr int64_t kTokens = 21;
  for (const RouterCase& c : cases) {
    SCOPED_TRACE(c.name);
    const bool biased = c.args.scoring == Scoring::kSigmoid;
    Tensor logits = Random(DType::kF32, {kTokens, c.experts}, rng_, -3.f, 3.f);
    Tensor bias = Random(DType::kBF16, {c.experts}, rng_, 0.f, 0.2f);
    Tensor ids(DType::kI32, {kTokens, c.args.top_k}), weights(DType::kF32, {kTokens, c.args.top_k});
    Mirror dl(logits), db(bias), di(ids), dw(weights);
    RouterArgs dev = c.args, cpu = c.args;
    dev.logits = dl.Dev();
    dev.topk_ids = di.Dev();
    dev.topk_weights = dw.Dev();
    cpu.logits = logits.view();
    cpu.topk_ids = ids.view();
    cpu.topk_weights = weights.view();
    if (biased) {
      dev.correction_bias = db.Dev();
      cpu.correction_bias = bias.view();
    }
    ASSERT_TRUE(RouterTopK(dev).ok());
    RUN_CPU_REFERENCE(RouterTopK(cpu));
    ExpectEqual(ids, di.Download(), "topk_ids");
    ExpectNear(weights, dw.Download(), 1e-6f, 1e-5f, "topk_weights");
  }
}

TEST_F(CudaKernelsTest, PermuteUnpermute) {
  constexpr int64_t kTokens = 9, kK = 3, kExperts = 7, kHidden = 33;
  Tensor x = Random(DType::kF32, {kTokens, kHidden}, rng_);
  Tensor ids(DType::kI32, {kTokens, kK});
  std::uniform_int_distribution<int> pick(-1, kExperts);  // -1 and kExperts are skipped
  for (int64_t i = 0; i < kTokens * kK; ++i) ids.data_as<int32_t>()[i] = pick(rng_);
  Tensor permuted(DType::kF32, {kTokens * kK, kHidden}), row_of(DType::kI32, {kTokens * kK}),
      choice_of(DType::kI32, {kTokens * kK}), offsets(DType::kI32, {kExperts + 1}),
      dev_offsets(DType::kI32, {kExperts + 1});
  Mirror dx(x), dids(ids), dperm(permuted), drow(row_of), dchoice(choice_of);
  // expert_offsets is host-readable: the CUDA op fills a host view.
  ASSERT_TRUE(Permute({.x = dx.Dev(), .topk_ids = dids.Dev(), .num_experts = kExperts,
                       .permuted = dperm.Dev(), .row_of = drow.Dev(),
                       .choice_of = dchoice.Dev(), .expert_offsets = dev_offsets.view()}).ok());
  const int64_t rows = dev_offsets.data_as<int32_t>()[kExperts];

  Tensor y = Random(DType::kF32, {rows, kHidden}, rng_);
  Tensor weights = Random(DType::kF32, {kTokens, kK}, rng_);
  Tensor out = Random(DType::kF32, {kTokens, kHidden}, rng_);
  Mirror dy(y), dweights(weights), dout(out);
  ASSERT_TRUE(Unpermute({.y = dy.Dev(), .row_of = drow.Dev(TensorView(row_of.data(), DType::kI32, {rows})),
                         .choice_of = dchoice.Dev(TensorView(choice_of.data(), DType::kI32, {rows})),
                         .topk_weights = dweights.Dev(), .out = dout.Dev()}).ok());

  RUN_CPU_REFERENCE(Permute({.x = x.view(), .topk_ids = ids.view(), .num_experts = kExperts,
                             .permuted = permuted.view(), .row_of = row_of.view(),
                             .choice_of = choice_of.view(), .expert_offsets = offsets.view()}));
  ExpectEqual(offsets, dev_offsets, "expert_offsets");
  Tensor got_rows = drow.Download(), got_choice = dchoice.Download(), got_perm = dperm.Download();
  for (int64_t i = 0; i < rows; ++i) {
    EXPECT_EQ(row_of.data_as<int32_t>()[i], got_rows.data_as<int32_t>()[i]) << "row_of " << i;
    EXPECT_EQ(choice_of.data_as<int32_t>()[i], got_choice.data_as<int32_t>()[i]) << "choice_of " << i;
    for (int64_t h = 0; h < kHidden; ++h) {
      ASSERT_EQ(permuted.data_as<float>()[i * kHidden + h], got_perm.data_as<float>()[i * kHidden + h])
          << "permuted row " << i;
    }
  }
  RUN_CPU_REFERENCE(Unpermute({.y = y.view(), .row_of = TensorView(row_of.data(), DType::kI32, {rows}),
                               .choice_of = TensorView(choice_of.data(), DType::kI32, {rows}),
                               .topk_weights = weights.view(), .out = out.view()}));
  ExpectNear(out, dout.Download(), 1e-6f, 1e-6f, "Unpermute (sum order differs)");
}

// ---- GEMMs --------------------------------------------------------------------------------

// Absolute tolerance of a GEMM result, relative to its largest magnitude. f32 weights: f32
// rounding in a different summation order. bf16 weights: either side may round the
// activations (and the SwiGLU intermediate) to bf16 before the tensor-core/dot-product
// instructions (2^-9 relative per product), so allow 1.5% of the largest output.
float GemmTolerance(DType wtype, const Tensor& ref) {
  float max_abs = 0.f;
  for (int64_t i = 0; i < ref.numel(); ++i) max_abs = std::max(max_abs, std::fabs(Get(ref, i)));
  return (wtype == DType::kF32 ? 2e-5f : 1.5e-2f) * max_abs + 1e-5f;
}

TEST_F(CudaKernelsTest, LinearSmallAndLargeM) {
  constexpr int64_t kK = 67, kN = 45, kLd = 70;
  for (DType wtype : {DType::kF32, DType::kBF16}) {
    for (int64_t m : {1, 5, 8, 9, 33}) {
      for (bool bias_accumulate : {false, true}) {
        SCOPED_TRACE(testing::Message() << "m " << m << " bf16 " << (wtype == DType::kBF16)
                                        << " bias+acc " << bias_accumulate);
        Tensor in_buf = Random(DType::kF32, {m, kLd}, rng_);
        TensorView in(in_buf.data(), DType::kF32, {m, kK}, {kLd, 1});
        Tensor w = Random(wtype, {kN, kK}, rng_);
        Tensor bias = Random(wtype, {kN}, rng_);
        Tensor out = Random(DType::kF32, {m, kN}, rng_);
        Mirror din(in_buf), dw(w), dbias(bias), dout(out);
        LinearArgs dev{.in = din.Dev(in), .weight = dw.Dev(), .out = dout.Dev()};
        LinearArgs cpu{.in = in, .weight = w.view(), .out = out.view()};
        if (bias_accumulate) {
          dev.bias = dbias.Dev();
          cpu.bias = bias.view();
          dev.accumulate = cpu.accumulate = true;
        }
        ASSERT_TRUE(Linear(dev).ok());
        RUN_CPU_REFERENCE(Linear(cpu));
        ExpectNear(out, dout.Download(), GemmTolerance(wtype, out), 0.f, "Linear");
      }
    }
  }
}

std::vector<Tensor> SwigluTensors(DType wtype, int64_t hidden, int64_t f, std::mt19937& rng) {
  std::vector<Tensor> t;
  t.push_back(Random(wtype, {f, hidden}, rng));
  t.push_back(Random(wtype, {f, hidden}, rng));
  t.push_back(Random(wtype, {hidden, f}, rng));
  return t;
}

TEST_F(CudaKernelsTest, Mlp) {
  constexpr int64_t kHidden = 40, kF = 24;
  for (DType wtype : {DType::kF32, DType::kBF16}) {
    for (int64_t tokens : {3, 11}) {
      SCOPED_TRACE(testing::Message() << "tokens " << tokens << " bf16 " << (wtype == DType::kBF16));
      std::vector<Tensor> w = SwigluTensors(wtype, kHidden, kF, rng_);
      Tensor x = Random(DType::kF32, {tokens, kHidden}, rng_);
      Tensor out = Random(DType::kF32, {tokens, kHidden}, rng_);
      Mirror dx(x), dg(w[0]), du(w[1]), dd(w[2]), dout(out);
      SwigluWeights dev_w{.gate = dg.Dev(), .up = du.Dev(), .down = dd.Dev()};
      SwigluWeights cpu_w{.gate = w[0].view(), .up = w[1].view(), .down = w[2].view()};
      ASSERT_TRUE(Mlp({.x = dx.Dev(), .weights = &dev_w, .out = dout.Dev(), .accumulate = true}).ok());
      RUN_CPU_REFERENCE(Mlp({.x = x.view(), .weights = &cpu_w, .out = out.view(), .accumulate = true}));
      ExpectNear(out, dout.Download(), GemmTolerance(wtype, out), 0.f, "Mlp");
    }
  }
}

TEST_F(CudaKernelsTest, ExpertFfnWithAbsentExperts) {
  constexpr int64_t kHidden = 40, kF = 24, kExperts = 6, kK = 2;
  for (DType wtype : {DType::kF32, DType::kBF16}) {
    for (int64_t tokens : {3, 29}) {
      SCOPED_TRACE(testing::Message() << "tokens " << tokens << " bf16 " << (wtype == DType::kBF16));
      std::vector<std::vector<Tensor>> host;
      std::vector<std::unique_ptr<Mirror>> mirrors;
      std::vector<SwigluWeights> dev_w(kExperts), cpu_w(kExperts);
      for (int e = 0; e < kExperts; ++e) {
        if (e == 2) continue;  // not held by this worker
        host.push_back(SwigluTensors(wtype, kHidden, kF, rng_));
        const std::vector<Tensor>& w = host.back();
        for (const Tensor& t : w) mirrors.push_back(std::make_unique<Mirror>(t));
        const size_t m = mirrors.size();
        dev_w[e] = {.gate = mirrors[m - 3]->Dev(), .up = mirrors[m - 2]->Dev(), .down = mirrors[m - 1]->Dev()};
        cpu_w[e] = {.gate = w[0].view(), .up = w[1].view(), .down = w[2].view()};
      }
      Tensor x = Random(DType::kF32, {tokens, kHidden}, rng_);
      Tensor ids(DType::kI32, {tokens, kK});
      std::uniform_int_distribution<int> pick(0, kExperts);  // kExperts: outside the table
      for (int64_t t = 0; t < tokens; ++t) {
        const int a = pick(rng_);
        int b = pick(rng_);
        if (b == a) b = (a + 1) % (kExperts + 1);
        ids.data_as<int32_t>()[t * kK] = a;
        ids.data_as<int32_t>()[t * kK + 1] = b;
      }
      Tensor weights = Random(DType::kF32, {tokens, kK}, rng_, 0.f, 1.f);
      Tensor out = Random(DType::kF32, {tokens, kHidden}, rng_);
      Mirror dx(x), dids(ids), dweights(weights), dout(out);
      ASSERT_TRUE(ExpertFfn({.x = dx.Dev(), .topk_ids = dids.Dev(), .topk_weights = dweights.Dev(),
                             .experts = &dev_w, .out = dout.Dev()}).ok());
      RUN_CPU_REFERENCE(ExpertFfn({.x = x.view(), .topk_ids = ids.view(),
                                   .topk_weights = weights.view(), .experts = &cpu_w,
                                   .out = out.view()}));
      ExpectNear(out, dout.Download(), GemmTolerance(wtype, out), 0.f, "ExpertFfn");
    }
  }
}

}  // namespace
}  // namespace moe::kernels
