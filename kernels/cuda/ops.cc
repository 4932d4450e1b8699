// Host side of the CUDA backend for everything but the GEMMs (gemm.cc): view validation,
// per-call packing of host-side metadata, launches and Status conversion.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda {
namespace internal {

using common::Device;
using common::DType;
using common::DTypeName;
using common::TensorView;

absl::Status FieldError(const char* op, const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cuda ", op, ": ", field, " ", what));
}

absl::Status CheckView(const TensorView& v, const char* op, const char* field, int rank,
                       std::initializer_list<DType> dtypes) {
  if (v.empty()) return FieldError(op, field, "is missing");
  if (v.device() != Device::kCuda) return FieldError(op, field, "is not on the CUDA device");
  if (v.rank() != rank) {
    return FieldError(op, field, absl::StrCat("must have rank ", rank, ", got ", v.DebugString()));
  }
  if (v.strides().back() != 1 && v.dim(-1) > 1) {
    return FieldError(op, field, "must have a unit innermost stride");
  }
  for (int i = 0; i + 1 < rank; ++i) {
    if (v.strides()[i] < 0) return FieldError(op, field, "has a negative stride");
  }
  if (std::find(dtypes.begin(), dtypes.end(), v.dtype()) == dtypes.end()) {
    return absl::UnimplementedError(
        absl::StrCat("cuda ", op, ": ", field, " dtype ", std::string(DTypeName(v.dtype())), " unsupported"));
  }
  return absl::OkStatus();
}

absl::Status CheckDims(const TensorView& v, const char* op, const char* field,
                       std::initializer_list<int64_t> dims) {
  int i = 0;
  for (int64_t d : dims) {
    if (d >= 0 && v.dim(i) != d) {
      return FieldError(op, field,
                        absl::StrCat("dim ", i, " must be ", d, ", got ", v.DebugString()));
    }
    ++i;
  }
  return absl::OkStatus();
}

}  // namespace internal

namespace {

using common::Device;
using common::DType;
using common::TensorView;
using namespace internal;  // NOLINT: the launchers and checks of this backend

constexpr auto kF32 = DType::kF32;
constexpr auto kBF16 = DType::kBF16;

bool IsBf16(const TensorView& v) { return v.dtype() == DType::kBF16; }

// ---- RoPE table cache --------------------------------------------------------------------
// Tables are built once on the host (RopeTable) and live as long as the model; the first
// Rope call with a table uploads its cos/sin to the current device (a synchronous copy,
// so warm up before capturing a CUDA graph). Entries are keyed by the table's address and
// the addresses and sizes of its vectors, so a rebuilt table gets a new entry; uploads are
// never freed (a model has one or two tables).
struct RopeDeviceTable {
  float* cos = nullptr;
  float* sin = nullptr;
};

absl::StatusOr<RopeDeviceTable> DeviceRopeTable(const RopeTable& table) {
  using Key = std::tuple<const RopeTable*, const float*, const float*, int, int, int>;
  static std::mutex mu;
  static std::map<Key, RopeDeviceTable>* cache = new std::map<Key, RopeDeviceTable>();
  int device = 0;
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device), "cudaGetDevice");
  const Key key{&table, table.cos.data(), table.sin.data(), table.rotary_dim,
                table.max_positions, device};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  const size_t bytes = table.cos.size() * sizeof(float);
  RopeDeviceTable dev;
  MOE_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&dev.cos), bytes), "cudaMalloc");
  absl::Status status = CudaStatus(cudaMalloc(reinterpret_cast<void**>(&dev.sin), bytes),
                                   "cudaMalloc");
  if (status.ok()) {
    status = CudaStatus(cudaMemcpy(dev.cos, table.cos.data(), bytes, cudaMemcpyHostToDevice),
                        "rope table upload");
  }
  if (status.ok()) {
    status = CudaStatus(cudaMemcpy(dev.sin, table.sin.data(), bytes, cudaMemcpyHostToDevice),
                        "rope table upload");
  }
  if (!status.ok()) {
    cudaFree(dev.cos);
    cudaFree(dev.sin);
    return status;
  }
  cache->emplace(key, dev);
  return dev;
}

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return capture != cudaStreamCaptureStatusNone;
}

}  // namespace

absl::Status Embedding(const EmbeddingArgs& args) {
  constexpr const char* kOp = "Embedding";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.ids, kOp, "ids", 1, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.table, kOp, "table", 2, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.ids.dim(0), hidden = args.table.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {rows, hidden}));
  if (rows == 0) return absl::OkStatus();
  cudaStream_t stream = StreamOf(args.exec.stream);
  MOE_ASSIGN_OR_RETURN(StreamBuffer flag, StreamBuffer::Allocate(sizeof(int32_t), stream));
  MOE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flag.as<int32_t>(), 0, sizeof(int32_t), stream),
                           "cudaMemsetAsync");
  EmbeddingParams p{.ids = args.ids.data_as<const int32_t>(),
                    .table = args.table.data(),
                    .table_bf16 = IsBf16(args.table),
                    .table_ld = args.table.strides()[0],
                    .vocab = args.table.dim(0),
                    .out = Mat(args.out),
                    .rows = rows,
                    .hidden = hidden,
                    .bad_id = flag.as<int32_t>()};
  MOE_CUDA_RETURN_IF_ERROR(LaunchEmbedding(p, stream), "cuda Embedding");
  if (Capturing(stream)) return absl::OkStatus();  // ids unchecked inside a graph
  int32_t bad = 0;
  MOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&bad, flag.as<int32_t>(), sizeof(bad), cudaMemcpyDeviceToHost, stream),
      "cuda Embedding");
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cuda Embedding");
  if (bad != 0) {
    return FieldError(kOp, "ids", absl::StrCat("has an id outside [0, ", p.vocab, ")"));
  }
  return absl::OkStatus();
}

absl::Status RmsNorm(const RmsNormArgs& args) {
  constexpr const char* kOp = "RmsNorm";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.in, kOp, "in", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.weight, kOp, "weight", 1, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.in.dim(0), dim = args.in.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.weight, kOp, "weight", {dim}));
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {rows, dim}));
  RmsNormParams p{.in = ConstMat(args.in),
                  .weight = args.weight.data(),
                  .weight_bf16 = IsBf16(args.weight),
                  .out = Mat(args.out),
                  .residual = {},
                  .rows = rows,
                  .dim = dim,
                  .eps = static_cast<float>(args.eps)};
  if (!args.residual.empty()) {
    MOE_RETURN_IF_ERROR(CheckView(args.residual, kOp, "residual", 2, {kF32}));
    MOE_RETURN_IF_ERROR(CheckDims(args.residual, kOp, "residual", {rows, dim}));
    p.residual = Mat(args.residual);
  }
  return CudaStatus(LaunchRmsNorm(p, StreamOf(args.exec.stream)), "cuda RmsNorm");
}

absl::Status Add(const AddArgs& args) {
  constexpr const char* kOp = "Add";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.a, kOp, "a", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.b, kOp, "b", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.out.dim(0), cols = args.out.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.a, kOp, "a", {rows, cols}));
  MOE_RETURN_IF_ERROR(CheckDims(args.b, kOp, "b", {rows, cols}));
  return CudaStatus(LaunchAdd(ConstMat(args.a), ConstMat(args.b), Mat(args.out), rows, cols,
                              StreamOf(args.exec.stream)),
                    "cuda Add");
}

absl::Status SiluMul(const SiluMulArgs& args) {
  constexpr const char* kOp = "SiluMul";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.gate_up, kOp, "gate_up", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.out.dim(0), f = args.out.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.gate_up, kOp, "gate_up", {rows, 2 * f}));
  return CudaStatus(LaunchSiluMul(ConstMat(args.gate_up), Mat(args.out), rows, f,
                                  StreamOf(args.exec.stream)),
                    "cuda SiluMul");
}

absl::Status SigmoidGatedAdd(const SigmoidGatedAddArgs& args) {
  constexpr const char* kOp = "SigmoidGatedAdd";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.in, kOp, "in", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.gate_logit, kOp, "gate_logit", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.out.dim(0), cols = args.out.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.in, kOp, "in", {rows, cols}));
  MOE_RETURN_IF_ERROR(CheckDims(args.gate_logit, kOp, "gate_logit", {rows, 1}));
  return CudaStatus(LaunchSigmoidGatedAdd(ConstMat(args.in), ConstMat(args.gate_logit),
                                          Mat(args.out), rows, cols, StreamOf(args.exec.stream)),
                    "cuda SigmoidGatedAdd");
}

absl::Status Rope(const RopeArgs& args) {
  constexpr const char* kOp = "Rope";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.x, kOp, "x", 3, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.positions, kOp, "positions", 1, {DType::kI32}));
  if (args.table == nullptr) return FieldError(kOp, "table", "is missing");
  const RopeTable& table = *args.table;
  const int64_t tokens = args.x.dim(0), heads = args.x.dim(1), head_dim = args.x.dim(2);
  MOE_RETURN_IF_ERROR(CheckDims(args.positions, kOp, "positions", {tokens}));
  const size_t entries = static_cast<size_t>(table.max_positions) * (table.rotary_dim / 2);
  if (table.rotary_dim <= 0 || table.rotary_dim % 2 != 0 || table.rotary_dim > head_dim ||
      table.cos.size() != entries || table.sin.size() != entries) {
    return FieldError(kOp, "table",
                      absl::StrCat("(rotary_dim ", table.rotary_dim, ", max_positions ",
                                   table.max_positions, ") does not fit head_dim ", head_dim));
  }
  if (tokens == 0) return absl::OkStatus();
  MOE_ASSIGN_OR_RETURN(RopeDeviceTable dev, DeviceRopeTable(table));
  RopeParams p{.x = args.x.data_as<float>(),
               .token_stride = args.x.strides()[0],
               .head_stride = args.x.strides()[1],
               .tokens = tokens,
               .heads = heads,
               .positions = args.positions.data_as<const int32_t>(),
               .cos = dev.cos,
               .sin = dev.sin,
               .rotary_dim = table.rotary_dim,
               .max_positions = table.max_positions,
               .interleaved = args.style == RopeStyle::kInterleaved};
  return CudaStatus(LaunchRope(p, StreamOf(args.exec.stream)), "cuda Rope");
}

namespace {

absl::Status WriteOneCache(const TensorView& src, const TensorView& cache, const char* src_field,
                           const char* cache_field, const TensorView& slots,
                           cudaStream_t stream) {
  constexpr const char* kOp = "WriteKvCache";
  MOE_RETURN_IF_ERROR(CheckView(src, kOp, src_field, 3, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(cache, kOp, cache_field, 4, {kF32, kBF16}));
  const int64_t tokens = src.dim(0), heads = src.dim(1), dim = src.dim(2);
  MOE_RETURN_IF_ERROR(CheckDims(cache, kOp, cache_field, {-1, -1, heads, dim}));
  KvWriteParams p{.src = src.data_as<const float>(),
                  .src_t = src.strides()[0],
                  .src_h = src.strides()[1],
                  .cache = cache.data(),
                  .cache_bf16 = IsBf16(cache),
                  .c_b = cache.strides()[0],
                  .c_s = cache.strides()[1],
                  .c_h = cache.strides()[2],
                  .num_blocks = cache.dim(0),
                  .block_size = cache.dim(1),
                  .slots = slots.data_as<const int64_t>(),
                  .tokens = tokens,
                  .heads = heads,
                  .dim = dim};
  return CudaStatus(LaunchWriteKv(p, stream), "cuda WriteKvCache");
}

}  // namespace

absl::Status WriteKvCache(const KvWriteArgs& args) {
  constexpr const char* kOp = "WriteKvCache";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.slots, kOp, "slots", 1, {DType::kI64}));
  MOE_RETURN_IF_ERROR(CheckView(args.k, kOp, "k", 3, {kF32}));
  MOE_RETURN_IF_ERROR(CheckDims(args.slots, kOp, "slots", {args.k.dim(0)}));
  cudaStream_t stream = StreamOf(args.exec.stream);
  MOE_RETURN_IF_ERROR(WriteOneCache(args.k, args.k_cache, "k", "k_cache", args.slots, stream));
  if (args.v.empty()) return absl::OkStatus();
  MOE_RETURN_IF_ERROR(CheckView(args.v, kOp, "v", 3, {kF32}));
  MOE_RETURN_IF_ERROR(CheckDims(args.v, kOp, "v", {args.k.dim(0)}));
  return WriteOneCache(args.v, args.v_cache, "v", "v_cache", args.slots, stream);
}

// Block tables arrive as host pointers (AttentionSeq), so every call packs the per-sequence
// metadata and the tables into one host vector and copies it into a stream-ordered device
// buffer (one small pageable H2D copy per call). A CUDA-graph decode path needs a persistent
// device buffer of fixed capacity, refreshed from pinned memory before each replay, instead.
absl::Status PagedAttention(const AttentionArgs& args) {
  constexpr const char* kOp = "PagedAttention";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.q, kOp, "q", 3, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.k_cache, kOp, "k_cache", 4, {kF32, kBF16}));
  MOE_RETURN_IF_ERROR(CheckView(args.v_cache, kOp, "v_cache", 4, {args.k_cache.dtype()}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 3, {kF32}));
  if (args.seqs == nullptr) return FieldError(kOp, "seqs", "is missing");
  const int64_t tokens = args.q.dim(0), heads = args.q.dim(1), d = args.q.dim(2);
  const int64_t num_blocks = args.k_cache.dim(0), block_size = args.k_cache.dim(1);
  const int64_t kv_heads = args.k_cache.dim(2), dv = args.v_cache.dim(3);
  MOE_RETURN_IF_ERROR(CheckDims(args.k_cache, kOp, "k_cache", {-1, -1, -1, d}));
  MOE_RETURN_IF_ERROR(
      CheckDims(args.v_cache, kOp, "v_cache", {num_blocks, block_size, kv_heads, -1}));
  MOE_RETURN_IF_ERROR(CheckDims(args.out, kOp, "out", {tokens, heads, dv}));
  if (kv_heads <= 0 || heads % kv_heads != 0) {
    return FieldError(kOp, "k_cache", "kv_heads must divide the query heads");
  }
  if (d > kAttentionMaxHeadDim || dv > kAttentionMaxHeadDim) {
    return absl::UnimplementedError(absl::StrCat("cuda PagedAttention: head dims ", d, "/", dv,
                                                 " above ", kAttentionMaxHeadDim));
  }
  if (heads > 65535) return absl::UnimplementedError("cuda PagedAttention: more than 65535 heads");
  const std::vector<AttentionSeq>& seqs = *args.seqs;
  if (tokens == 0 || seqs.empty()) return absl::OkStatus();

  // Packed layout: [seq_info 4*S][token_seq T][block tables ...].
  const size_t num_seqs = seqs.size();
  std::vector<int32_t> packed(4 * num_seqs + tokens, -1);
  int32_t* token_seq = packed.data() + 4 * num_seqs;
  for (size_t s = 0; s < num_seqs; ++s) {
    const AttentionSeq& seq = seqs[s];
    const std::string field = absl::StrCat("seqs[", s, "]");
    if (seq.q_len < 0 || seq.q_start < 0 || seq.q_start + int64_t{seq.q_len} > tokens ||
        seq.context_len < seq.q_len) {
      return FieldError(kOp, field.c_str(), "has a query range outside q or the context");
    }
    const int64_t needed = (int64_t{seq.context_len} + block_size - 1) / block_size;
    if (seq.num_blocks < needed || (needed > 0 && seq.block_table == nullptr)) {
      return FieldError(kOp, field.c_str(), "has too few blocks for its context");
    }
    packed[4 * s] = seq.q_start;
    packed[4 * s + 1] = seq.q_len;
    packed[4 * s + 2] = seq.context_len;
    packed[4 * s + 3] = static_cast<int32_t>(packed.size());
    for (int64_t i = 0; i < needed; ++i) {
      const int32_t block = seq.block_table[i];
      if (block < 0 || block >= num_blocks) {
        return FieldError(kOp, field.c_str(), "names a block outside the cache");
      }
      packed.push_back(block);
    }
    token_seq = packed.data() + 4 * num_seqs;  // push_back may have moved the vector
    for (int32_t t = seq.q_start; t < seq.q_start + seq.q_len; ++t) {
      if (token_seq[t] != -1) return FieldError(kOp, field.c_str(), "overlaps another sequence");
      token_seq[t] = static_cast<int32_t>(s);
    }
  }
  cudaStream_t stream = StreamOf(args.exec.stream);
  const size_t bytes = packed.size() * sizeof(int32_t);
  MOE_ASSIGN_OR_RETURN(StreamBuffer dev, StreamBuffer::Allocate(bytes, stream));
  MOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dev.as<void>(), packed.data(), bytes, cudaMemcpyHostToDevice, stream),
      "cuda PagedAttention: metadata upload");
  const int32_t* packed_dev = dev.as<const int32_t>();
  AttentionParams p{.q = args.q.data_as<const float>(),
                    .q_t = args.q.strides()[0],
                    .q_h = args.q.strides()[1],
                    .k_cache = args.k_cache.data(),
                    .v_cache = args.v_cache.data(),
                    .cache_bf16 = IsBf16(args.k_cache),
                    .k_b = args.k_cache.strides()[0],
                    .k_s = args.k_cache.strides()[1],
                    .k_h = args.k_cache.strides()[2],
                    .v_b = args.v_cache.strides()[0],
                    .v_s = args.v_cache.strides()[1],
                    .v_h = args.v_cache.strides()[2],
                    .block_size = block_size,
                    .out = args.out.data_as<float>(),
                    .o_t = args.out.strides()[0],
                    .o_h = args.out.strides()[1],
                    .tokens = tokens,
                    .heads = heads,
                    .kv_heads = kv_heads,
                    .d = d,
                    .dv = dv,
                    .scale = args.scale,
                    .seq_info = packed_dev,
                    .block_tables = packed_dev,
                    .token_seq = packed_dev + 4 * num_seqs};
  return CudaStatus(LaunchPagedAttention(p, stream), "cuda PagedAttention");
}

absl::Status RouterTopK(const RouterArgs& args) {
  constexpr const char* kOp = "RouterTopK";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.logits, kOp, "logits", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_ids, kOp, "topk_ids", 2, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_weights, kOp, "topk_weights", 2, {kF32}));
  const int64_t tokens = args.logits.dim(0), experts = args.logits.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_ids, kOp, "topk_ids", {tokens, args.top_k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_weights, kOp, "topk_weights", {tokens, args.top_k}));
  if (experts > kRouterMaxExperts || args.top_k > kRouterMaxTopK) {
    return absl::UnimplementedError(absl::StrCat("cuda RouterTopK: ", experts, " experts / top_k ",
                                                 args.top_k, " above the kernel's limits"));
  }
  if (args.top_k < 1 || args.top_k > experts) return FieldError(kOp, "top_k", "out of range");
  const int n_group = std::max(args.n_group, 1);
  if (n_group > 1) {
    if (n_group > 32 || experts % n_group != 0) {
      return FieldError(kOp, "n_group", "must divide the experts and be at most 32");
    }
    const int64_t group_size = experts / n_group;
    if (args.topk_group < 1 || args.topk_group > n_group ||
        args.top_k > args.topk_group * group_size) {
      return FieldError(kOp, "topk_group", "out of range for n_group and top_k");
    }
    if (args.group_score == GroupScore::kTop2Sum && group_size < 2) {
      return FieldError(kOp, "group_score", "top2-sum needs groups of at least two experts");
    }
  }
  RouterParams p{.logits = ConstMat(args.logits),
                 .bias = nullptr,
                 .bias_bf16 = false,
                 .sigmoid = args.scoring == Scoring::kSigmoid,
                 .top_k = args.top_k,
                 .norm_topk_prob = args.norm_topk_prob,
                 .n_group = n_group,
                 .topk_group = args.topk_group,
                 .group_top2_sum = args.group_score == GroupScore::kTop2Sum,
                 .routed_scaling_factor = static_cast<float>(args.routed_scaling_factor),
                 .topk_ids = args.topk_ids.data_as<int32_t>(),
                 .ids_ld = args.topk_ids.strides()[0],
                 .topk_weights = args.topk_weights.data_as<float>(),
                 .w_ld = args.topk_weights.strides()[0],
                 .tokens = tokens,
                 .experts = experts};
  if (!args.correction_bias.empty()) {
    MOE_RETURN_IF_ERROR(CheckView(args.correction_bias, kOp, "correction_bias", 1, {kF32, kBF16}));
    MOE_RETURN_IF_ERROR(CheckDims(args.correction_bias, kOp, "correction_bias", {experts}));
    p.bias = args.correction_bias.data();
    p.bias_bf16 = IsBf16(args.correction_bias);
  }
  return CudaStatus(LaunchRouterTopK(p, StreamOf(args.exec.stream)), "cuda RouterTopK");
}

absl::Status Permute(const PermuteArgs& args) {
  constexpr const char* kOp = "Permute";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.x, kOp, "x", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_ids, kOp, "topk_ids", 2, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.permuted, kOp, "permuted", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.row_of, kOp, "row_of", 1, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.choice_of, kOp, "choice_of", 1, {DType::kI32}));
  const int64_t tokens = args.x.dim(0), hidden = args.x.dim(1), k = args.topk_ids.dim(1);
  const int num_experts = args.num_experts;
  if (num_experts < 0) return FieldError(kOp, "num_experts", "is negative");
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_ids, kOp, "topk_ids", {tokens, k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.permuted, kOp, "permuted", {tokens * k, hidden}));
  MOE_RETURN_IF_ERROR(CheckDims(args.row_of, kOp, "row_of", {tokens * k}));
  MOE_RETURN_IF_ERROR(CheckDims(args.choice_of, kOp, "choice_of", {tokens * k}));
  const TensorView& offsets = args.expert_offsets;
  if (offsets.empty() || offsets.rank() != 1 || offsets.dtype() != DType::kI32 ||
      offsets.dim(0) != num_experts + 1 || !offsets.is_contiguous()) {
    return FieldError(kOp, "expert_offsets", "must be a contiguous i32 [num_experts + 1]");
  }
  cudaStream_t stream = StreamOf(args.exec.stream);
  const bool host_offsets = offsets.device() == Device::kCpu;
  StreamBuffer offsets_dev;
  int32_t* dev_offsets = offsets.data_as<int32_t>();
  if (host_offsets) {
    MOE_ASSIGN_OR_RETURN(offsets_dev,
                         StreamBuffer::Allocate((num_experts + 1) * sizeof(int32_t), stream));
    dev_offsets = offsets_dev.as<int32_t>();
  }
  PermuteIndexParams p{.topk_ids = args.topk_ids.data_as<const int32_t>(),
                       .ids_ld = args.topk_ids.strides()[0],
                       .tokens = tokens,
                       .k = k,
                       .num_experts = num_experts,
                       .expert_offsets = dev_offsets,
                       .row_of = args.row_of.data_as<int32_t>(),
                       .choice_of = args.choice_of.data_as<int32_t>()};
  MOE_CUDA_RETURN_IF_ERROR(LaunchPermuteIndex(p, stream), "cuda Permute");
  MOE_CUDA_RETURN_IF_ERROR(
      LaunchGatherRows(ConstMat(args.x), p.row_of, dev_offsets + num_experts, tokens * k, hidden,
                       Mat(args.permuted), stream),
      "cuda Permute");
  if (host_offsets) {
    MOE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(offsets.data(), dev_offsets, (num_experts + 1) * sizeof(int32_t),
                        cudaMemcpyDeviceToHost, stream),
        "cuda Permute: expert_offsets download");
    MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cuda Permute");
  }
  return absl::OkStatus();
}

namespace internal {

// Shared by Unpermute and ExpertFfn: out[t] += sum_j w[t, j] * y[slot of (t, j)].
absl::Status CombineRows(ConstMatF32 y, int64_t rows, const int32_t* row_of,
                         const int32_t* choice_of, const TensorView& topk_weights,
                         const TensorView& out, cudaStream_t stream) {
  const int64_t tokens = out.dim(0), k = topk_weights.dim(1);
  if (tokens == 0 || k == 0) return absl::OkStatus();
  MOE_ASSIGN_OR_RETURN(StreamBuffer slot_of,
                       StreamBuffer::Allocate(tokens * k * sizeof(int32_t), stream));
  MOE_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(slot_of.as<void>(), 0xff, tokens * k * sizeof(int32_t), stream),
      "cudaMemsetAsync");
  MOE_CUDA_RETURN_IF_ERROR(
      LaunchInverseRows(row_of, choice_of, rows, tokens, k, slot_of.as<int32_t>(), stream),
      "cuda combine");
  return CudaStatus(LaunchCombineRows(y, slot_of.as<int32_t>(), topk_weights.data_as<float>(),
                                      topk_weights.strides()[0], tokens, k, out.dim(1), Mat(out),
                                      stream),
                    "cuda combine");
}

}  // namespace internal

absl::Status Unpermute(const UnpermuteArgs& args) {
  constexpr const char* kOp = "Unpermute";
  MOE_RETURN_IF_ERROR(RequireDevice());
  MOE_RETURN_IF_ERROR(CheckView(args.y, kOp, "y", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.row_of, kOp, "row_of", 1, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.choice_of, kOp, "choice_of", 1, {DType::kI32}));
  MOE_RETURN_IF_ERROR(CheckView(args.topk_weights, kOp, "topk_weights", 2, {kF32}));
  MOE_RETURN_IF_ERROR(CheckView(args.out, kOp, "out", 2, {kF32}));
  const int64_t rows = args.y.dim(0), hidden = args.out.dim(1);
  MOE_RETURN_IF_ERROR(CheckDims(args.y, kOp, "y", {rows, hidden}));
  MOE_RETURN_IF_ERROR(CheckDims(args.topk_weights, kOp, "topk_weights", {args.out.dim(0)}));
  if (args.row_of.dim(0) < rows || args.choice_of.dim(0) < rows) {
    return FieldError(kOp, "row_of", "is shorter than y");
  }
  return CombineRows(ConstMat(args.y), rows, args.row_of.data_as<const int32_t>(),
                     args.choice_of.data_as<const int32_t>(), args.topk_weights, args.out,
                     StreamOf(args.exec.stream));
}

}  // namespace moe::kernels::cuda
