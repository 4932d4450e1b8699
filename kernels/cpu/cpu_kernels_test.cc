// Tests of the CPU backend through the public kernel API (kernels/kernels.h): every op
// against straightforward reference loops (double accumulation) on random inputs with odd
// sizes, both weight dtypes, strided views and the error paths.
//
// Tolerances: with bf16 weights the activations are drawn bf16-representable, so kernel and
// reference multiply the same values and differ only in summation order (f32 vs double):
// |got - ref| <= 1e-5 · Σ|a·w| + 1e-6. Where a kernel itself rounds an intermediate to bf16
// (ExpertFfn/Mlp's h before a bf16 down projection), one bf16 ulp (2⁻⁸ relative) of that
// intermediate is allowed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/internal/simd.h"
#include "kernels/kernels.h"

namespace moe::kernels {
namespace {

using common::Bf16ToF32;
using common::DType;
using common::F32ToBf16;
using common::Tensor;
using common::TensorView;
using ::testing::HasSubstr;

class Rng {
 public:
  explicit Rng(uint32_t seed) : gen_(seed) {}
  float Uniform(float lo = -1.0f, float hi = 1.0f) {
    return std::uniform_real_distribution<float>(lo, hi)(gen_);
  }
  int Int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }
  std::mt19937& gen() { return gen_; }

 private:
  std::mt19937 gen_;
};

// f32 tensor of uniform values; with bf16_exact the values are bf16-representable.
Tensor RandomF32(Rng& rng, std::vector<int64_t> shape, bool bf16_exact = false, float scale = 1) {
  Tensor t(DType::kF32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) {
    float v = rng.Uniform() * scale;
    t.data_as<float>()[i] = bf16_exact ? Bf16ToF32(F32ToBf16(v)) : v;
  }
  return t;
}

Tensor RandomWeights(Rng& rng, DType dtype, std::vector<int64_t> shape, float scale = 1) {
  Tensor t(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) {
    float v = rng.Uniform() * scale;
    if (dtype == DType::kBF16) {
      t.data_as<uint16_t>()[i] = F32ToBf16(v);
    } else {
      t.data_as<float>()[i] = v;
    }
  }
  return t;
}

// Element i of a contiguous f32 or bf16 tensor, widened.
double Get(const Tensor& t, int64_t i) {
  return t.dtype() == DType::kBF16 ? Bf16ToF32(t.data_as<uint16_t>()[i]) : t.data_as<float>()[i];
}

Tensor Copy(const Tensor& t) {
  Tensor c(t.dtype(), t.shape());
  std::memcpy(c.data(), t.data(), t.numel() * common::DTypeSize(t.dtype()));
  return c;
}

// [rows, cols] f32 view with row stride `stride` into a [rows, stride] buffer.
TensorView Strided(const Tensor& buffer, int64_t cols) {
  return TensorView(buffer.data(), DType::kF32, {buffer.shape()[0], cols},
                    {buffer.shape()[1], 1});
}

std::string Label(int64_t m, int64_t n, int64_t k, DType dtype) {
  return "M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
         " " + std::string(common::DTypeName(dtype));
}

// ---------------------------------------------------------------------------------------
// Normalisation and elementwise

TEST(CpuKernelsTest, RmsNormMatchesReferenceWithResidualAndStride) {
  Rng rng(1);
  for (DType wdtype : {DType::kF32, DType::kBF16}) {
    for (int64_t d : {1, 7, 64, 129}) {
      const int64_t m = 5;
      Tensor in_buf = RandomF32(rng, {m, d + 3});  // row stride d + 3
      Tensor weight = RandomWeights(rng, wdtype, {d});
      Tensor residual = RandomF32(rng, {m, d});
      Tensor residual_before = Copy(residual);
      Tensor out(DType::kF32, {m, d});
      ASSERT_TRUE(RmsNorm({.in = Strided(in_buf, d), .weight = weight.view(), .eps = 1e-5,
                           .out = out.view(), .residual = residual.view()})
                      .ok());
      for (int64_t i = 0; i < m; ++i) {
        double ss = 0;
        std::vector<double> x(d);
        for (int64_t j = 0; j < d; ++j) {
          x[j] = double(in_buf.data_as<float>()[i * (d + 3) + j]) +
                 residual_before.data_as<float>()[i * d + j];
          ss += x[j] * x[j];
        }
        const double inv = 1.0 / std::sqrt(ss / d + 1e-5);
        for (int64_t j = 0; j < d; ++j) {
          EXPECT_NEAR(residual.data_as<float>()[i * d + j], x[j], 1e-6) << "d=" << d;
          EXPECT_NEAR(out.data_as<float>()[i * d + j], x[j] * inv * Get(weight, j), 1e-5)
              << "d=" << d << " row " << i << " col " << j;
        }
      }
    }
  }
}

TEST(CpuKernelsTest, RmsNormInPlaceOverHeads) {
  Rng rng(2);
  // q: [T=3, heads=4, D=16] normalised per head in place (qk-norm), as [12, 16].
  Tensor q = RandomF32(rng, {12, 16});
  Tensor expect = Copy(q);
  Tensor weight = RandomWeights(rng, DType::kF32, {16});
  ASSERT_TRUE(RmsNorm({.in = q.view(), .weight = weight.view(), .out = q.view()}).ok());
  for (int64_t i = 0; i < 12; ++i) {
    double ss = 0;
    for (int j = 0; j < 16; ++j) ss += std::pow(expect.data_as<float>()[i * 16 + j], 2);
    for (int j = 0; j < 16; ++j) {
      EXPECT_NEAR(q.data_as<float>()[i * 16 + j],
                  expect.data_as<float>()[i * 16 + j] / std::sqrt(ss / 16 + 1e-6) * Get(weight, j),
                  1e-5);
    }
  }
}

TEST(CpuKernelsTest, EmbeddingWidensRowsAndRejectsBadIds) {
  Rng rng(3);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    Tensor table = RandomWeights(rng, dtype, {11, 9});
    Tensor ids(DType::kI32, {4});
    const int32_t id_values[] = {10, 0, 3, 3};
    std::copy(id_values, id_values + 4, ids.data_as<int32_t>());
    Tensor out(DType::kF32, {4, 9});
    ASSERT_TRUE(Embedding({.ids = ids.view(), .table = table.view(), .out = out.view()}).ok());
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 9; ++j) {
        EXPECT_EQ(out.data_as<float>()[i * 9 + j], Get(table, id_values[i] * 9 + j));
      }
    }
    ids.data_as<int32_t>()[2] = 11;
    absl::Status s = Embedding({.ids = ids.view(), .table = table.view(), .out = out.view()});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("ids"));
    ids.data_as<int32_t>()[2] = -1;
    EXPECT_EQ(Embedding({.ids = ids.view(), .table = table.view(), .out = out.view()}).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(CpuKernelsTest, AddSiluMulSigmoidGatedAdd) {
  Rng rng(4);
  const int64_t m = 3, n = 37;
  Tensor a = RandomF32(rng, {m, n}), b = RandomF32(rng, {m, n});
  Tensor sum(DType::kF32, {m, n});
  ASSERT_TRUE(Add({.a = a.view(), .b = b.view(), .out = sum.view()}).ok());
  for (int64_t i = 0; i < m * n; ++i) {
    EXPECT_FLOAT_EQ(sum.data_as<float>()[i], a.data_as<float>()[i] + b.data_as<float>()[i]);
  }
  Tensor gate_up = RandomF32(rng, {m, 2 * n}, false, 4.0f);
  Tensor act(DType::kF32, {m, n});
  ASSERT_TRUE(SiluMul({.gate_up = gate_up.view(), .out = act.view()}).ok());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double g = gate_up.data_as<float>()[i * 2 * n + j];
      const double u = gate_up.data_as<float>()[i * 2 * n + n + j];
      EXPECT_NEAR(act.data_as<float>()[i * n + j], g / (1 + std::exp(-g)) * u, 1e-5);
    }
  }
  Tensor logit = RandomF32(rng, {m, 1}, false, 3.0f);
  Tensor out = Copy(a);
  ASSERT_TRUE(
      SigmoidGatedAdd({.in = b.view(), .gate_logit = logit.view(), .out = out.view()}).ok());
  for (int64_t i = 0; i < m; ++i) {
    const double s = 1 / (1 + std::exp(-double(logit.data_as<float>()[i])));
    for (int64_t j = 0; j < n; ++j) {
      EXPECT_NEAR(out.data_as<float>()[i * n + j],
                  a.data_as<float>()[i * n + j] + s * b.data_as<float>()[i * n + j], 1e-6);
    }
  }
  Tensor bad(DType::kF32, {m, n + 1});
  absl::Status s = Add({.a = a.view(), .b = bad.view(), .out = sum.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("b"));
}

// ---------------------------------------------------------------------------------------
// RoPE

// Values from transformers' ROPE_INIT_FUNCTIONS (head_dim 64, theta 1e4) and
// cos = (pos * inv_freq).cos() * attention_scaling.
TEST(CpuKernelsTest, RopeTablesMatchTransformers) {
  struct Case {
    const char* name;
    RopeScalingParams scaling;
    int pos;
    float cos[4], sin[4];  // at indices 0, 5, 17, 31
  };
  RopeScalingParams linear{.type = RopeScalingParams::Type::kLinear, .factor = 4.0};
  RopeScalingParams deepseek{.type = RopeScalingParams::Type::kYarn, .factor = 40.0,
                             .original_max_positions = 4096, .mscale = 1.0,
                             .mscale_all_dim = 0.707};
  RopeScalingParams yarn{.type = RopeScalingParams::Type::kYarn, .factor = 8.0,
                         .original_max_positions = 512};
  const Case cases[] = {
      {"linear", linear, 7, {-0.178246051f, 0.915120184f, 0.999913871f, 1.0f},
       {0.98398596f, 0.403181136f, 0.0131227728f, 0.000233366271f}},
      {"linear", linear, 1000, {0.240988299f, -0.918739319f, -0.29928124f, 0.999444366f},
       {-0.970528007f, 0.394864649f, 0.954164982f, 0.0333318599f}},
      {"yarn-deepseek", deepseek, 7, {0.818531573f, -0.0966808349f, 1.0853889f, 1.08572638f},
       {0.713307679f, 1.08141327f, 0.0270686764f, 2.53371891e-05f}},
      {"yarn-deepseek", deepseek, 1000,
       {0.610589802f, -0.0573926643f, -0.991185486f, 1.08572042f},
       {0.897764981f, -1.08420837f, -0.443117499f, 0.00361959147f}},
      {"yarn", yarn, 1000, {0.679322481f, -0.640902877f, 0.714996159f, 1.20777631f},
       {0.998824358f, -1.02390063f, 0.973606467f, 0.0201343112f}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<RopeTable> table = BuildRopeTable(64, 4096, 10000.0, c.scaling);
    ASSERT_TRUE(table.ok()) << table.status();
    const int idx[] = {0, 5, 17, 31};
    for (int i = 0; i < 4; ++i) {
      // A few f32 ulps: the argument pos * inv_freq is up to ~1e3 rad.
      EXPECT_NEAR(table->cos[c.pos * 32 + idx[i]], c.cos[i], 2e-6 * (1 + c.pos / 100.0))
          << c.name << " pos " << c.pos << " i " << idx[i];
      EXPECT_NEAR(table->sin[c.pos * 32 + idx[i]], c.sin[i], 2e-6 * (1 + c.pos / 100.0))
          << c.name << " pos " << c.pos << " i " << idx[i];
    }
  }
  EXPECT_DOUBLE_EQ(YarnMscale(1.0, 0.707), 1.0);
  EXPECT_NEAR(YarnMscale(40.0, 1.0), 0.1 * std::log(40.0) + 1, 1e-12);
  EXPECT_EQ(BuildRopeTable(63, 16, 1e4, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuKernelsTest, RopeRotatesHalfAndInterleavedPairs) {
  Rng rng(5);
  RopeTable table = BuildRopeTable(8, 32, 10000.0, {}).value();
  for (RopeStyle style : {RopeStyle::kHalf, RopeStyle::kInterleaved}) {
    // x: [T=3, heads=2, head_dim=12] with row stride 30; rotary_dim 8 (partial rotary).
    Tensor buf = RandomF32(rng, {3, 30});
    Tensor before = Copy(buf);
    TensorView x(buf.data(), DType::kF32, {3, 2, 12}, {30, 12, 1});
    Tensor pos(DType::kI32, {3});
    const int32_t p[] = {0, 31, 5};
    std::copy(p, p + 3, pos.data_as<int32_t>());
    ASSERT_TRUE(Rope({.x = x, .positions = pos.view(), .table = &table, .style = style}).ok());
    for (int t = 0; t < 3; ++t) {
      for (int h = 0; h < 2; ++h) {
        const float* in = before.data_as<float>() + t * 30 + h * 12;
        const float* out = buf.data_as<float>() + t * 30 + h * 12;
        for (int i = 0; i < 4; ++i) {
          const int a = style == RopeStyle::kHalf ? i : 2 * i;
          const int b = style == RopeStyle::kHalf ? i + 4 : 2 * i + 1;
          const double theta = p[t] / std::pow(10000.0, 2.0 * i / 8);
          EXPECT_NEAR(out[a], in[a] * std::cos(theta) - in[b] * std::sin(theta), 1e-5);
          EXPECT_NEAR(out[b], in[b] * std::cos(theta) + in[a] * std::sin(theta), 1e-5);
        }
        for (int i = 8; i < 12; ++i) EXPECT_EQ(out[i], in[i]);  // beyond rotary_dim
      }
      for (int i = 24; i < 30; ++i) {
        EXPECT_EQ(buf.data_as<float>()[t * 30 + i], before.data_as<float>()[t * 30 + i]);
      }
    }
    pos.data_as<int32_t>()[1] = 32;
    EXPECT_EQ(Rope({.x = x, .positions = pos.view(), .table = &table}).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// ---------------------------------------------------------------------------------------
// Linear

void ExpectLinear(Rng& rng, int64_t m, int64_t n, int64_t k, DType wdtype, bool bias,
                  bool accumulate, bool strided) {
  const std::string label = Label(m, n, k, wdtype);
  Tensor in_buf = RandomF32(rng, {m, k + (strided ? 5 : 0)}, wdtype == DType::kBF16);
  TensorView in = strided ? Strided(in_buf, k) : in_buf.view();
  Tensor w = RandomWeights(rng, wdtype, {n, k});
  Tensor b = RandomWeights(rng, wdtype, {n});
  Tensor out = RandomF32(rng, {m, n});
  Tensor out_before = Copy(out);
  ASSERT_TRUE(Linear({.in = in, .weight = w.view(), .bias = bias ? b.view() : TensorView(),
                      .out = out.view(), .accumulate = accumulate})
                  .ok())
      << label;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double p = double(in.at<float>(i, kk)) * Get(w, j * k + kk);
        ref += p;
        mag += std::abs(p);
      }
      if (bias) ref += Get(b, j);
      if (accumulate) ref += out_before.data_as<float>()[i * n + j];
      ASSERT_NEAR(out.data_as<float>()[i * n + j], ref, 1e-5 * mag + 1e-6)
          << label << " at (" << i << ", " << j << ")";
    }
  }
}

TEST(CpuKernelsTest, LinearOddSizesBothDtypes) {
  Rng rng(6);
  const int64_t sizes[][3] = {{1, 1, 1},  {1, 5, 3},   {1, 17, 33}, {2, 4, 32},
                              {3, 7, 31}, {5, 9, 47},  {8, 33, 64}, {13, 3, 100},
                              {32, 65, 129}, {1, 40, 1024}};
  for (DType wdtype : {DType::kF32, DType::kBF16}) {
    for (const auto& s : sizes) ExpectLinear(rng, s[0], s[1], s[2], wdtype, false, false, false);
    ExpectLinear(rng, 3, 19, 45, wdtype, /*bias=*/true, /*accumulate=*/false, /*strided=*/true);
    ExpectLinear(rng, 6, 21, 77, wdtype, /*bias=*/true, /*accumulate=*/true, /*strided=*/false);
    // Prefill-sized: more than one row block and weight chunk.
    ExpectLinear(rng, 261, 70, 96, wdtype, true, false, true);
  }
}

TEST(CpuKernelsTest, LinearRejectsShapeMismatchNamingTheField) {
  Tensor in(DType::kF32, {2, 8}), w(DType::kBF16, {4, 9}), out(DType::kF32, {2, 4});
  absl::Status s = Linear({.in = in.view(), .weight = w.view(), .out = out.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("weight"));
  Tensor w_ok(DType::kBF16, {4, 8}), out_bad(DType::kF32, {2, 5});
  s = Linear({.in = in.view(), .weight = w_ok.view(), .out = out_bad.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("out"));
  Tensor w_i32(DType::kI32, {4, 8});
  EXPECT_EQ(Linear({.in = in.view(), .weight = w_i32.view(), .out = out.view()}).code(),
            absl::StatusCode::kUnimplemented);
}

// The portable build must agree with the AVX-512 one (it is what other CPUs run).
TEST(CpuKernelsTest, GenericAndAvx512MatmulAgree) {
  if (!cpu::internal::HasAvx512Bf16()) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  Rng rng(7);
  // Shapes that reach every tile of the streaming kernel (1-4 rows, row groups with paired
  // weight rows, K steps and masked tails) and the packed kernel (33 rows).
  struct Shape {
    int64_t m, n, k;
  };
  for (const Shape shape : {Shape{6, 11, 70}, Shape{1, 7, 300}, Shape{3, 5, 261},
                            Shape{9, 6, 1030}, Shape{33, 37, 97}})
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(absl::StrCat("m=", shape.m, " n=", shape.n, " k=", shape.k, " bf16=", bf16));
    const int64_t m = shape.m, n = shape.n, k = shape.k;
    Tensor a = RandomF32(rng, {m, k}, bf16);
    std::vector<uint16_t> a16(m * k);
    cpu::internal::generic::ConvertToBf16(a.data_as<float>(), a16.data(), m * k);
    std::vector<uint16_t> a16_avx(m * k);
    cpu::internal::avx512::ConvertToBf16(a.data_as<float>(), a16_avx.data(), m * k);
    EXPECT_EQ(a16, a16_avx);
    Tensor w = RandomWeights(rng, bf16 ? DType::kBF16 : DType::kF32, {n, k});
    std::vector<const void*> rows(m);
    for (int64_t i = 0; i < m; ++i) {
      rows[i] = bf16 ? static_cast<const void*>(a16.data() + i * k)
                     : static_cast<const void*>(a.data_as<float>() + i * k);
    }
    Tensor c1(DType::kF32, {m, n}), c2(DType::kF32, {m, n});
    std::vector<float*> r1(m), r2(m);
    for (int64_t i = 0; i < m; ++i) {
      r1[i] = c1.data_as<float>() + i * n;
      r2[i] = c2.data_as<float>() + i * n;
    }
    std::vector<float> scale(m, 0.5f);
    cpu::internal::MatmulBlockArgs args{.a_rows = rows.data(), .m = m, .w = w.data(), .ldw = k,
                                        .w_bf16 = bf16, .n = n, .k = k, .c_rows = r1.data(),
                                        .row_scale = scale.data()};
    cpu::internal::generic::MatmulBlock(args);
    args.c_rows = r2.data();
    cpu::internal::avx512::MatmulBlock(args);
    for (int64_t i = 0; i < m * n; ++i) {
      EXPECT_NEAR(c1.data_as<float>()[i], c2.data_as<float>()[i],
                  1e-5 * std::max(1.0f, std::abs(c1.data_as<float>()[i]))) << i;
    }
    // Attention primitives.
    std::vector<float> d1(n), d2(n);
    cpu::internal::generic::DotRows(a.data_as<float>(), w.data(), bf16, k, n, k - 3, d1.data());
    cpu::internal::avx512::DotRows(a.data_as<float>(), w.data(), bf16, k, n, k - 3, d2.data());
    for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(d1[j], d2[j], 1e-4);
    std::vector<float> acc1(k, 1.0f), acc2(k, 1.0f);
    cpu::internal::generic::AccumulateRows(d1.data(), w.data(), bf16, k, n, k, 0.5f, acc1.data());
    cpu::internal::avx512::AccumulateRows(d1.data(), w.data(), bf16, k, n, k, 0.5f, acc2.data());
    for (int64_t j = 0; j < k; ++j) EXPECT_NEAR(acc1[j], acc2[j], 1e-4);
  }
  // SiLU over the whole range, including where exp over/underflows.
  std::vector<float> g, u, s1, s2;
  for (float x = -120.0f; x <= 120.0f; x += 0.37f) {
    g.push_back(x);
    u.push_back(1.0f + x / 200);
  }
  s1.resize(g.size());
  s2.resize(g.size());
  cpu::internal::generic::SiluMul(g.data(), u.data(), s1.data(), g.size());
  cpu::internal::avx512::SiluMul(g.data(), u.data(), s2.data(), g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_NEAR(s2[i], s1[i], 1e-6f * std::abs(s1[i]) + 1e-30f) << "x = " << g[i];
  }
}

// ---------------------------------------------------------------------------------------
// Router, permute, experts

struct RouterCase {
  std::string name;
  Scoring scoring;
  int e, top_k, n_group, topk_group;
  GroupScore group_score;
  bool bias, norm;
  double scaling;
};

// Straightforward reference of kernels.h's RouterArgs comment.
void ReferenceRouter(const RouterCase& c, const float* logits, const std::vector<float>& bias,
                     std::vector<int>* ids, std::vector<double>* weights) {
  const int e = c.e;
  std::vector<double> scores(e), choice(e);
  double max = *std::max_element(logits, logits + e), sum = 0;
  for (int i = 0; i < e; ++i) {
    scores[i] = c.scoring == Scoring::kSoftmax ? std::exp(double(logits[i]) - max)
                                               : 1 / (1 + std::exp(-double(logits[i])));
    sum += scores[i];
  }
  for (int i = 0; i < e; ++i) {
    if (c.scoring == Scoring::kSoftmax) scores[i] /= sum;
    choice[i] = scores[i] + (c.bias ? bias[i] : 0.0);
  }
  if (c.n_group > 1) {
    const int gs = e / c.n_group;
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < c.n_group; ++g) {
      std::vector<double> s(choice.begin() + g * gs, choice.begin() + (g + 1) * gs);
      std::sort(s.rbegin(), s.rend());
      groups.push_back({c.group_score == GroupScore::kMax ? s[0] : s[0] + s[1], g});
    }
    std::stable_sort(groups.begin(), groups.end(),
                     [](auto& a, auto& b) { return a.first > b.first; });
    for (int r = c.topk_group; r < c.n_group; ++r) {
      for (int i = 0; i < gs; ++i) choice[groups[r].second * gs + i] = -INFINITY;
    }
  }
  std::vector<int> order(e);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return choice[a] > choice[b]; });
  ids->assign(order.begin(), order.begin() + c.top_k);
  weights->clear();
  double wsum = 0;
  for (int id : *ids) {
    weights->push_back(scores[id]);
    wsum += scores[id];
  }
  for (double& w : *weights) {
    if (c.norm) w /= wsum + (c.scoring == Scoring::kSigmoid ? 1e-20 : 0.0);
    w *= c.scaling;
  }
}

TEST(CpuKernelsTest, RouterTopKVariants) {
  const RouterCase cases[] = {
      {"qwen-softmax", Scoring::kSoftmax, 60, 4, 1, 1, GroupScore::kMax, false, false, 1.0},
      {"mixtral-softmax-norm", Scoring::kSoftmax, 8, 2, 1, 1, GroupScore::kMax, false, true, 1.0},
      {"deepseek-v2-groups-max", Scoring::kSoftmax, 64, 6, 8, 3, GroupScore::kMax, false, false,
       16.0},
      {"deepseek-v3-sigmoid-top2sum", Scoring::kSigmoid, 64, 8, 8, 4, GroupScore::kTop2Sum, true,
       true, 2.5},
      {"sigmoid-bias-no-groups", Scoring::kSigmoid, 17, 3, 1, 1, GroupScore::kMax, true, true,
       1.0},
      {"top1", Scoring::kSoftmax, 5, 1, 1, 1, GroupScore::kMax, false, false, 1.0},
  };
  Rng rng(8);
  for (const RouterCase& c : cases) {
    const int t = 9;
    Tensor logits = RandomF32(rng, {t, c.e}, false, 3.0f);
    Tensor bias = RandomWeights(rng, DType::kF32, {c.e}, 0.3f);
    std::vector<float> bias_v(bias.data_as<float>(), bias.data_as<float>() + c.e);
    Tensor ids(DType::kI32, {t, c.top_k}), weights(DType::kF32, {t, c.top_k});
    absl::Status s = RouterTopK({.logits = logits.view(),
                                 .correction_bias = c.bias ? bias.view() : TensorView(),
                                 .scoring = c.scoring, .top_k = c.top_k,
                                 .norm_topk_prob = c.norm, .n_group = c.n_group,
                                 .topk_group = c.topk_group, .group_score = c.group_score,
                                 .routed_scaling_factor = c.scaling,
                                 .topk_ids = ids.view(), .topk_weights = weights.view()});
    ASSERT_TRUE(s.ok()) << c.name << ": " << s;
    for (int i = 0; i < t; ++i) {
      std::vector<int> ref_ids;
      std::vector<double> ref_w;
      ReferenceRouter(c, logits.data_as<float>() + i * c.e, bias_v, &ref_ids, &ref_w);
      for (int j = 0; j < c.top_k; ++j) {
        EXPECT_EQ(ids.data_as<int32_t>()[i * c.top_k + j], ref_ids[j]) << c.name << " token " << i;
        EXPECT_NEAR(weights.data_as<float>()[i * c.top_k + j], ref_w[j], 1e-5 * c.scaling)
            << c.name << " token " << i;
      }
    }
  }
}

TEST(CpuKernelsTest, RouterTiesBreakTowardLowerExpertId) {
  // Equal logits: experts 0..3 tie; with groups, groups 0 and 1 tie too.
  Tensor logits(DType::kF32, {1, 8});
  for (int i = 0; i < 8; ++i) logits.data_as<float>()[i] = (i == 6) ? 2.0f : 1.0f;
  Tensor ids(DType::kI32, {1, 3}), weights(DType::kF32, {1, 3});
  ASSERT_TRUE(RouterTopK({.logits = logits.view(), .top_k = 3, .topk_ids = ids.view(),
                          .topk_weights = weights.view()})
                  .ok());
  EXPECT_THAT(std::vector<int>(ids.data_as<int32_t>(), ids.data_as<int32_t>() + 3),
              ::testing::ElementsAre(6, 0, 1));
  // 4 groups of 2: group 3 (experts 6, 7) is best; then groups 0, 1, 2 tie -> group 0.
  ASSERT_TRUE(RouterTopK({.logits = logits.view(), .top_k = 3, .n_group = 4, .topk_group = 2,
                          .topk_ids = ids.view(), .topk_weights = weights.view()})
                  .ok());
  EXPECT_THAT(std::vector<int>(ids.data_as<int32_t>(), ids.data_as<int32_t>() + 3),
              ::testing::ElementsAre(6, 0, 1));
  EXPECT_EQ(RouterTopK({.logits = logits.view(), .top_k = 3, .n_group = 3,
                        .topk_ids = ids.view(), .topk_weights = weights.view()})
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CpuKernelsTest, PermuteUnpermuteRoundTrip) {
  Rng rng(9);
  const int t = 7, k = 3, h = 19, e = 5;
  Tensor x = RandomF32(rng, {t, h});
  Tensor ids(DType::kI32, {t, k}), w = RandomF32(rng, {t, k});
  for (int i = 0; i < t * k; ++i) ids.data_as<int32_t>()[i] = rng.Int(-1, e);  // -1, e skipped
  Tensor permuted(DType::kF32, {t * k, h}), row_of(DType::kI32, {t * k}),
      choice_of(DType::kI32, {t * k}), offsets(DType::kI32, {e + 1});
  ASSERT_TRUE(Permute({.x = x.view(), .topk_ids = ids.view(), .num_experts = e,
                       .permuted = permuted.view(), .row_of = row_of.view(),
                       .choice_of = choice_of.view(), .expert_offsets = offsets.view()})
                  .ok());
  int r = 0;
  for (int ex = 0; ex < e; ++ex) {
    EXPECT_EQ(offsets.data_as<int32_t>()[ex], r);
    for (int i = 0; i < t; ++i) {
      for (int j = 0; j < k; ++j) {
        if (ids.data_as<int32_t>()[i * k + j] != ex) continue;
        EXPECT_EQ(row_of.data_as<int32_t>()[r], i);
        EXPECT_EQ(choice_of.data_as<int32_t>()[r], j);
        for (int c = 0; c < h; ++c) {
          EXPECT_EQ(permuted.data_as<float>()[r * h + c], x.data_as<float>()[i * h + c]);
        }
        ++r;
      }
    }
  }
  EXPECT_EQ(offsets.data_as<int32_t>()[e], r);
  Tensor out = RandomF32(rng, {t, h});
  Tensor expect = Copy(out);
  TensorView y = permuted.view().Slice(0, r);
  ASSERT_TRUE(Unpermute({.y = y, .row_of = row_of.view().Slice(0, r),
                         .choice_of = choice_of.view().Slice(0, r),
                         .topk_weights = w.view(), .out = out.view()})
                  .ok());
  for (int i = 0; i < r; ++i) {
    const int tok = row_of.data_as<int32_t>()[i];
    const float wt = w.data_as<float>()[tok * k + choice_of.data_as<int32_t>()[i]];
    for (int c = 0; c < h; ++c) {
      expect.data_as<float>()[tok * h + c] += wt * permuted.data_as<float>()[i * h + c];
    }
  }
  for (int i = 0; i < t * h; ++i) {
    EXPECT_NEAR(out.data_as<float>()[i], expect.data_as<float>()[i], 1e-5);
  }
}

struct Expert {
  Tensor gate, up, down;
  SwigluWeights view() const { return {gate.view(), up.view(), down.view()}; }
};

Expert RandomExpert(Rng& rng, DType dtype, int64_t h, int64_t f) {
  return {RandomWeights(rng, dtype, {f, h}, 0.5f), RandomWeights(rng, dtype, {f, h}, 0.5f),
          RandomWeights(rng, dtype, {h, f}, 0.5f)};
}

// out[t] += scale * expert(x[t]); returns the error bound for each element in `bound`.
void ReferenceSwiglu(const Expert& ex, const float* x, int64_t h, double scale, bool round_h,
                     double* out, double* bound) {
  const int64_t f = ex.gate.shape()[0];
  std::vector<double> act(f);
  std::vector<double> mag_act(f);
  for (int64_t j = 0; j < f; ++j) {
    double g = 0, u = 0, mg = 0, mu = 0;
    for (int64_t i = 0; i < h; ++i) {
      g += x[i] * Get(ex.gate, j * h + i);
      u += x[i] * Get(ex.up, j * h + i);
      mg += std::abs(x[i] * Get(ex.gate, j * h + i));
      mu += std::abs(x[i] * Get(ex.up, j * h + i));
    }
    const double silu = g / (1 + std::exp(-g));
    act[j] = silu * u;
    // Error of act from f32 summation of g and u, plus the bf16 rounding of h.
    mag_act[j] = 1e-5 * (mg * std::abs(u) + mu * std::abs(silu) + mg * mu) +
                 (round_h ? std::abs(act[j]) * (1.0 / 256) : 0.0);
    if (round_h) act[j] = Bf16ToF32(F32ToBf16(static_cast<float>(act[j])));
  }
  for (int64_t i = 0; i < h; ++i) {
    double y = 0, err = 0;
    for (int64_t j = 0; j < f; ++j) {
      const double d = Get(ex.down, i * f + j);
      y += act[j] * d;
      err += std::abs(d) * (mag_act[j] + 1e-5 * std::abs(act[j]));
    }
    out[i] += scale * y;
    bound[i] += std::abs(scale) * err;
  }
}

TEST(CpuKernelsTest, ExpertFfnMatchesReference) {
  Rng rng(10);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t t : {1, 5, 33, 150}) {
      const int64_t h = 48, f = 37, k = 3, e = 6;
      std::vector<Expert> experts;
      for (int i = 0; i < e; ++i) experts.push_back(RandomExpert(rng, dtype, h, f));
      std::vector<SwigluWeights> views;
      for (const Expert& ex : experts) views.push_back(ex.view());
      views[4] = {};  // an expert this worker does not hold
      Tensor x = RandomF32(rng, {t, h}, dtype == DType::kBF16);
      Tensor ids(DType::kI32, {t, k}), w = RandomF32(rng, {t, k});
      for (int64_t i = 0; i < t; ++i) {
        // Distinct ids per token, sometimes -1 (remote) or e (outside the table).
        std::vector<int> pool = {-1, 0, 1, 2, 3, 4, 5, 6};
        std::shuffle(pool.begin(), pool.end(), rng.gen());
        for (int j = 0; j < k; ++j) ids.data_as<int32_t>()[i * k + j] = pool[j];
      }
      if (t == 150) {  // one expert gets every token: more rows than one row block
        for (int64_t i = 0; i < t; ++i) ids.data_as<int32_t>()[i * k] = 2;
        for (int64_t i = 0; i < t; ++i) {
          for (int j = 1; j < k; ++j) {
            if (ids.data_as<int32_t>()[i * k + j] == 2) ids.data_as<int32_t>()[i * k + j] = -1;
          }
        }
      }
      Tensor out = RandomF32(rng, {t, h});
      std::vector<double> ref(out.data_as<float>(), out.data_as<float>() + t * h);
      std::vector<double> bound(t * h, 1e-5);
      ASSERT_TRUE(ExpertFfn({.x = x.view(), .topk_ids = ids.view(), .topk_weights = w.view(),
                             .experts = &views, .out = out.view()})
                      .ok());
      for (int64_t i = 0; i < t; ++i) {
        for (int j = 0; j < k; ++j) {
          const int id = ids.data_as<int32_t>()[i * k + j];
          if (id < 0 || id >= e || id == 4) continue;
          ReferenceSwiglu(experts[id], x.data_as<float>() + i * h, h, w.data_as<float>()[i * k + j],
                          dtype == DType::kBF16, &ref[i * h], &bound[i * h]);
        }
      }
      for (int64_t i = 0; i < t * h; ++i) {
        ASSERT_NEAR(out.data_as<float>()[i], ref[i], bound[i])
            << "T=" << t << " " << common::DTypeName(dtype) << " element " << i;
      }
    }
  }
}

TEST(CpuKernelsTest, MlpOverwritesOrAccumulates) {
  Rng rng(11);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (bool accumulate : {false, true}) {
      const int64_t t = 7, h = 40, f = 70;
      Expert ex = RandomExpert(rng, dtype, h, f);
      SwigluWeights wv = ex.view();
      Tensor x = RandomF32(rng, {t, h}, dtype == DType::kBF16);
      Tensor out = RandomF32(rng, {t, h});
      std::vector<double> ref(t * h, 0.0), bound(t * h, 1e-5);
      if (accumulate) std::copy(out.data_as<float>(), out.data_as<float>() + t * h, ref.begin());
      ASSERT_TRUE(
          Mlp({.x = x.view(), .weights = &wv, .out = out.view(), .accumulate = accumulate}).ok());
      for (int64_t i = 0; i < t; ++i) {
        ReferenceSwiglu(ex, x.data_as<float>() + i * h, h, 1.0, dtype == DType::kBF16,
                        &ref[i * h], &bound[i * h]);
      }
      for (int64_t i = 0; i < t * h; ++i) {
        ASSERT_NEAR(out.data_as<float>()[i], ref[i], bound[i]) << i;
      }
    }
  }
  // A down projection of the wrong shape is named.
  Expert ex = RandomExpert(rng, DType::kF32, 8, 4);
  ex.down = Tensor(DType::kF32, {8, 5});
  SwigluWeights wv = ex.view();
  Tensor x(DType::kF32, {2, 8}), out(DType::kF32, {2, 8});
  absl::Status s = Mlp({.x = x.view(), .weights = &wv, .out = out.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("down"));
}

// ---------------------------------------------------------------------------------------
// KV cache and attention

struct AttentionCase {
  std::string name;
  int heads, kv_heads, d, dv;
  bool mla;  // v is the first dv features of the k cache row
  DType cache;
  int block_size;
};

void RunAttentionCase(const AttentionCase& c) {
  Rng rng(12);
  // Three sequences in one batch: a decode step (context 23), a prefill chunk of 5 that
  // continues a context of 12 (17 total), and a fresh prefill of 9.
  struct SeqSpec {
    int context_len, q_len;
  };
  const SeqSpec specs[] = {{23, 1}, {17, 5}, {9, 9}};
  const int num_cache_blocks = 20;
  const int row_d = c.mla ? c.d : c.d;
  Tensor k_cache(c.cache, {num_cache_blocks, c.block_size, c.kv_heads, row_d});
  Tensor v_cache(c.cache, {num_cache_blocks, c.block_size, c.kv_heads, c.dv});
  TensorView k_view = k_cache.view();
  TensorView v_view = c.mla ? TensorView(k_cache.data(), c.cache,
                                         {num_cache_blocks, c.block_size, 1, c.dv},
                                         k_cache.view().strides())
                            : v_cache.view();
  // Blocks handed out in scrambled order.
  std::vector<int32_t> free_blocks(num_cache_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng.gen());
  std::vector<std::vector<int32_t>> tables;
  std::vector<AttentionSeq> seqs;
  int q_rows = 0, next_block = 0;
  for (const SeqSpec& s : specs) {
    const int nb = (s.context_len + c.block_size - 1) / c.block_size;
    tables.emplace_back(free_blocks.begin() + next_block, free_blocks.begin() + next_block + nb);
    next_block += nb;
    seqs.push_back({.q_start = q_rows, .q_len = s.q_len, .context_len = s.context_len,
                    .num_blocks = nb});
    q_rows += s.q_len;
  }
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i].block_table = tables[i].data();
  // Write every position's k/v through WriteKvCache (one call per sequence).
  std::vector<Tensor> ks, vs;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int n = seqs[s].context_len;
    ks.push_back(RandomF32(rng, {n, c.kv_heads, row_d}));
    vs.push_back(RandomF32(rng, {n, c.kv_heads, c.dv}));
    Tensor slots(DType::kI64, {n});
    for (int p = 0; p < n; ++p) {
      slots.data_as<int64_t>()[p] = int64_t{tables[s][p / c.block_size]} * c.block_size +
                                    p % c.block_size;
    }
    ASSERT_TRUE(WriteKvCache({.k = ks.back().view(), .v = c.mla ? TensorView() : vs.back().view(),
                              .slots = slots.view(), .k_cache = k_view,
                              .v_cache = c.mla ? TensorView() : v_cache.view()})
                    .ok());
  }
  Tensor q = RandomF32(rng, {q_rows, c.heads, c.d});
  Tensor out(DType::kF32, {q_rows, c.heads, c.dv});
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  absl::Status st = PagedAttention({.q = q.view(), .k_cache = k_view, .v_cache = v_view,
                                    .seqs = &seqs, .scale = scale, .out = out.view()});
  ASSERT_TRUE(st.ok()) << c.name << ": " << st;
  auto rounded = [&](float v) {
    return c.cache == DType::kBF16 ? double(Bf16ToF32(F32ToBf16(v))) : double(v);
  };
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int i = 0; i < seqs[s].q_len; ++i) {
      const int row = seqs[s].q_start + i;
      const int pos = seqs[s].context_len - seqs[s].q_len + i;
      for (int hh = 0; hh < c.heads; ++hh) {
        const int kvh = hh / (c.heads / c.kv_heads);
        std::vector<double> logits(pos + 1);
        double max = -INFINITY;
        for (int p = 0; p <= pos; ++p) {
          double dot = 0;
          for (int dd = 0; dd < c.d; ++dd) {
            dot += double(q.data_as<float>()[(row * c.heads + hh) * c.d + dd]) *
                   rounded(ks[s].data_as<float>()[(p * c.kv_heads + kvh) * row_d + dd]);
          }
          logits[p] = dot * scale;
          max = std::max(max, logits[p]);
        }
        double denom = 0;
        for (double& l : logits) denom += (l = std::exp(l - max));
        for (int dd = 0; dd < c.dv; ++dd) {
          double acc = 0;
          for (int p = 0; p <= pos; ++p) {
            const float v = c.mla ? ks[s].data_as<float>()[(p * c.kv_heads + kvh) * row_d + dd]
                                  : vs[s].data_as<float>()[(p * c.kv_heads + kvh) * c.dv + dd];
            acc += logits[p] * rounded(v);
          }
          ASSERT_NEAR(out.data_as<float>()[(row * c.heads + hh) * c.dv + dd], acc / denom, 2e-5)
              << c.name << " seq " << s << " row " << row << " head " << hh << " dim " << dd;
        }
      }
    }
  }
}

TEST(CpuKernelsTest, PagedAttentionMixedBatch) {
  const AttentionCase cases[] = {
      {"mha-f32", 3, 3, 20, 20, false, DType::kF32, 4},
      {"gqa4-f32", 8, 2, 32, 32, false, DType::kF32, 16},
      {"gqa4-bf16", 8, 2, 33, 17, false, DType::kBF16, 5},
      {"mla-bf16", 4, 1, 40, 32, true, DType::kBF16, 8},
      {"mla-f32", 4, 1, 24, 16, true, DType::kF32, 3},
  };
  for (const AttentionCase& c : cases) RunAttentionCase(c);
}

TEST(CpuKernelsTest, AttentionAndKvWriteRejectBadArguments) {
  Tensor k_cache(DType::kF32, {2, 4, 1, 8}), q(DType::kF32, {1, 2, 8}), out(DType::kF32, {1, 2, 8});
  std::vector<int32_t> table = {5};
  std::vector<AttentionSeq> seqs = {{.q_start = 0, .q_len = 1, .context_len = 3,
                                     .block_table = table.data(), .num_blocks = 1}};
  absl::Status s = PagedAttention({.q = q.view(), .k_cache = k_cache.view(),
                                   .v_cache = k_cache.view(), .seqs = &seqs, .out = out.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("block_table"));
  Tensor k(DType::kF32, {1, 1, 8}), slots(DType::kI64, {1});
  slots.data_as<int64_t>()[0] = 8;
  s = WriteKvCache({.k = k.view(), .slots = slots.view(), .k_cache = k_cache.view()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("slots"));
}

}  // namespace
}  // namespace moe::kernels
