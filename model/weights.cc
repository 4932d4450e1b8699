#include "model/weights.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>

#include "common/logging.h"
#include "common/thread_pool.h"
#include "model/tensor_names.h"

namespace moe::model {

using common::DType;
using common::Tensor;
using common::TensorView;

namespace {

float LoadElement(const TensorView& v, int64_t i) {
  switch (v.dtype()) {
    case DType::kF32: return v.data_as<const float>()[i];
    case DType::kBF16: return common::Bf16ToF32(v.data_as<const uint16_t>()[i]);
    case DType::kF16: return common::F16ToF32(v.data_as<const uint16_t>()[i]);
    default: return 0.0f;
  }
}

void StoreElement(const TensorView& v, int64_t i, float x) {
  if (v.dtype() == DType::kF32) {
    v.data_as<float>()[i] = x;
  } else {
    v.data_as<uint16_t>()[i] = common::F32ToBf16(x);
  }
}

bool IsFloat(DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; }

// Whether transparent huge pages can back an madvise'd region: "always" or "madvise" is
// selected in /sys/kernel/mm/transparent_hugepage/enabled. Empty = yes, else the reason.
std::string HugePagesUnavailable() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!f || !std::getline(f, line)) {
    return "cannot read /sys/kernel/mm/transparent_hugepage/enabled";
  }
  if (line.find("[never]") != std::string::npos) return "transparent huge pages are disabled";
  return "";
}

}  // namespace

// Bump allocator over anonymous regions of 2 MiB-aligned memory advised MADV_HUGEPAGE.
// Regions are reserved in kRegionBytes steps (address space only: pages are backed when the
// copy touches them), or exactly sized for a larger tensor.
class ModelWeights::HugePageArena {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kRegionBytes = size_t{1} << 30;

  ~HugePageArena() {
    for (const Region& r : regions_) munmap(r.base, r.bytes);
  }

  // `bytes` of 64-byte aligned memory, or nullptr when the mapping fails.
  void* Allocate(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (regions_.empty() || regions_.back().used + bytes > regions_.back().usable) {
      if (!NewRegion(std::max(bytes, kRegionBytes))) return nullptr;
    }
    Region& r = regions_.back();
    void* p = static_cast<char*>(r.aligned) + r.used;
    r.used += bytes;
    return p;
  }

 private:
  struct Region {
    void* base;      // as mapped
    size_t bytes;    // as mapped
    void* aligned;   // first 2 MiB boundary
    size_t usable;   // bytes from `aligned`
    size_t used;
  };

  bool NewRegion(size_t bytes) {
    bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    const size_t mapped = bytes + kHugePage;  // room to align the start
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (base == MAP_FAILED) return false;
    const uintptr_t start = reinterpret_cast<uintptr_t>(base);
    void* aligned = reinterpret_cast<void*>((start + kHugePage - 1) / kHugePage * kHugePage);
    madvise(aligned, bytes, MADV_HUGEPAGE);  // a hint: failure leaves 4 KiB pages
    regions_.push_back({base, mapped, aligned, bytes, 0});
    return true;
  }

  std::vector<Region> regions_;
};

ModelWeights::ModelWeights() = default;
ModelWeights::~ModelWeights() = default;

// Fetches, checks and converts tensors for one Load call.
class ModelWeights::Loader {
 public:
  Loader(ModelWeights& w, const WeightsOptions& options) : w_(w), options_(options) {}

  // The tensor `name` with `shape`, in the dtype the options ask for.
  absl::StatusOr<TensorView> Get(const std::string& name, const std::vector<int64_t>& shape,
                                 bool keep_f32 = false) {
    if (auto it = cache_.find(name); it != cache_.end()) return it->second;
    MOE_ASSIGN_OR_RETURN(TensorView src, w_.reader_->Get(name, shape));
    if (!IsFloat(src.dtype())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", name, ": dtype ", std::string(DTypeName(src.dtype())),
          " is not a floating-point weight (f32, bf16 or f16 expected)"));
    }
    DType target = src.dtype() == DType::kF16 ? DType::kF32 : src.dtype();
    if (options_.dtype.has_value()) target = *options_.dtype;
    if (keep_f32) target = DType::kF32;
    TensorView out = src;
    if (target != src.dtype()) {
      out = Convert(src, target);
    } else if (options_.huge_pages) {
      out = CopyToHugePages(src);
    }
    w_.total_bytes_ += out.nbytes();
    cache_[name] = out;
    return out;
  }

  // Same, with the shape from TensorNames' spec list.
  absl::StatusOr<TensorView> GetSpec(const std::map<std::string, TensorSpec>& specs,
                                     const std::string& name) {
    if (name.empty()) return TensorView();
    auto it = specs.find(name);
    if (it == specs.end()) {
      return absl::InternalError(absl::StrCat("no shape known for tensor ", name));
    }
    return Get(name, it->second.shape, it->second.keep_f32);
  }

  // An owned tensor in the weight dtype of `like`.
  TensorView NewOwned(DType dtype, std::vector<int64_t> shape) {
    w_.owned_.emplace_back(dtype, std::move(shape));
    TensorView v = w_.owned_.back().view();
    w_.total_bytes_ += v.nbytes();
    return v;
  }

 private:
  TensorView Convert(const TensorView& src, DType target) {
    w_.owned_.emplace_back(target, src.shape());
    TensorView dst = w_.owned_.back().view();
    common::ThreadPool::Default().ParallelFor(
        src.numel(), /*grain=*/1 << 16, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) StoreElement(dst, i, LoadElement(src, i));
        });
    return dst;
  }

  // A copy of the mapped `src` in the huge-page arena; `src` itself when huge pages are not
  // available (logged once).
  TensorView CopyToHugePages(const TensorView& src) {
    if (!huge_pages_failed_ && w_.huge_pages_ == nullptr) {
      if (std::string why = HugePagesUnavailable(); !why.empty()) {
        MOE_LOG(INFO) << "weights stay in the file mapping (4 KiB pages)"
                      << common::Kv("reason", why);
        huge_pages_failed_ = true;
      } else {
        w_.huge_pages_ = std::make_unique<HugePageArena>();
      }
    }
    if (huge_pages_failed_) return src;
    void* dst = w_.huge_pages_->Allocate(src.nbytes());
    if (dst == nullptr) {
      MOE_LOG(WARNING) << "weights stay in the file mapping (4 KiB pages)"
                       << common::Kv("reason", "anonymous mmap failed")
                       << common::Kv("copied_bytes", w_.huge_page_bytes_);
      huge_pages_failed_ = true;
      return src;
    }
    const char* from = static_cast<const char*>(src.data());
    char* to = static_cast<char*>(dst);
    constexpr int64_t kPiece = int64_t{1} << 20;
    const int64_t bytes = static_cast<int64_t>(src.nbytes());
    common::ThreadPool::Default().ParallelFor(
        (bytes + kPiece - 1) / kPiece, 1, [&](int64_t begin, int64_t end) {
          const int64_t b0 = begin * kPiece, b1 = std::min(bytes, end * kPiece);
          std::memcpy(to + b0, from + b0, b1 - b0);
        });
    w_.huge_page_bytes_ += src.nbytes();
    return TensorView(dst, src.dtype(), src.shape());
  }

  ModelWeights& w_;
  const WeightsOptions& options_;
  bool huge_pages_failed_ = false;
  std::map<std::string, TensorView> cache_;  // tied tensors are loaded once
};

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& dir,
                                                                 const ModelConfig& config,
                                                                 const WeightsOptions& options) {
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> reader, SafetensorsReader::Open(dir));
  return Load(std::move(reader), config, options);
}

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(
    std::unique_ptr<SafetensorsReader> reader, const ModelConfig& config,
    const WeightsOptions& options) {
  if (options.dtype.has_value() && *options.dtype != DType::kF32 &&
      *options.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights dtype must be f32 or bf16, got ",
                     std::string(DTypeName(*options.dtype))));
  }
  std::unique_ptr<ModelWeights> w(new ModelWeights());
  w->config_ = config;
  w->reader_ = std::move(reader);
  Loader loader(*w, options);
  const TensorNames names(config);
  const int64_t hidden = config.hidden_size;
  const bool dense = options.load_non_expert;

  if (dense) {
    MOE_ASSIGN_OR_RETURN(w->embedding_,
                         loader.Get(names.embedding(), {config.vocab_size, hidden}));
    MOE_ASSIGN_OR_RETURN(w->final_norm_, loader.Get(names.final_norm(), {hidden}));
    MOE_ASSIGN_OR_RETURN(w->lm_head_, loader.Get(names.lm_head(), {config.vocab_size, hidden}));
  }

  w->layers_.resize(config.num_layers);
  for (int l = 0; l < config.num_layers; ++l) {
    LayerWeights& lw = w->layers_[l];
    lw.is_moe = config.IsMoeLayer(l);
    if (dense) {
      std::map<std::string, TensorSpec> specs;
      for (TensorSpec& s : names.LayerTensors(l)) specs.emplace(s.name, std::move(s));
      const LayerTensorNames n = names.Layer(l);
      auto get = [&](const std::string& name) { return loader.GetSpec(specs, name); };
      MOE_ASSIGN_OR_RETURN(lw.input_norm, get(n.input_norm));
      MOE_ASSIGN_OR_RETURN(lw.post_attention_norm, get(n.post_attention_norm));
      AttentionWeights& a = lw.attn;
      MOE_ASSIGN_OR_RETURN(a.q_proj, get(n.q_proj));
      MOE_ASSIGN_OR_RETURN(a.k_proj, get(n.k_proj));
      MOE_ASSIGN_OR_RETURN(a.v_proj, get(n.v_proj));
      MOE_ASSIGN_OR_RETURN(a.q_bias, get(n.q_bias));
      MOE_ASSIGN_OR_RETURN(a.k_bias, get(n.k_bias));
      MOE_ASSIGN_OR_RETURN(a.v_bias, get(n.v_bias));
      MOE_ASSIGN_OR_RETURN(a.q_norm, get(n.q_norm));
      MOE_ASSIGN_OR_RETURN(a.k_norm, get(n.k_norm));
      MOE_ASSIGN_OR_RETURN(a.o_proj, get(n.o_proj));
      MOE_ASSIGN_OR_RETURN(a.q_a_proj, get(n.q_a_proj));
      MOE_ASSIGN_OR_RETURN(a.q_a_norm, get(n.q_a_norm));
      MOE_ASSIGN_OR_RETURN(a.q_b_proj, get(n.q_b_proj));
      MOE_ASSIGN_OR_RETURN(a.kv_a_proj, get(n.kv_a_proj_with_mqa));
      MOE_ASSIGN_OR_RETURN(a.kv_a_norm, get(n.kv_a_norm));
      MOE_ASSIGN_OR_RETURN(a.kv_b_proj, get(n.kv_b_proj));
      if (config.attention == AttentionKind::kMla) {
        const int64_t heads = config.num_heads, dn = config.mla.qk_nope_head_dim,
                      dv = config.mla.v_head_dim, lat = config.mla.kv_lora_rank,
                      rope = config.mla.qk_rope_head_dim, qk = dn + rope;
        const TensorView kvb = a.kv_b_proj;  // [H * (dn + dv), L]
        const size_t esize = DTypeSize(kvb.dtype());
        TensorView uk_t = loader.NewOwned(kvb.dtype(), {heads, lat, dn});  // [H, L, dn]
        for (int64_t h = 0; h < heads; ++h) {
          TensorView dst = uk_t.Row(h);  // [L, dn]
          for (int64_t i = 0; i < dn; ++i) {
            const int64_t src_row = h * (dn + dv) + i;
            for (int64_t j = 0; j < lat; ++j) {
              StoreElement(dst, j * dn + i, LoadElement(kvb, src_row * lat + j));
            }
          }
          a.w_uk_t.push_back(dst);
          char* uv = static_cast<char*>(kvb.data()) + (h * (dn + dv) + dn) * lat * esize;
          a.w_uv.emplace_back(uv, kvb.dtype(), std::vector<int64_t>{dv, lat});
          const TensorView q = a.q_b_proj.empty() ? a.q_proj : a.q_b_proj;  // [H * qk, q_in]
          const int64_t q_in = q.dim(1);
          char* pe = static_cast<char*>(q.data()) +
                     (h * qk + dn) * q_in * DTypeSize(q.dtype());
          a.q_pe.emplace_back(pe, q.dtype(), std::vector<int64_t>{rope, q_in});
        }
      }
      if (!lw.is_moe) {
        MOE_ASSIGN_OR_RETURN(lw.mlp.gate, get(n.mlp_gate_proj));
        MOE_ASSIGN_OR_RETURN(lw.mlp.up, get(n.mlp_up_proj));
        MOE_ASSIGN_OR_RETURN(lw.mlp.down, get(n.mlp_down_proj));
      } else {
        MoeWeights& m = lw.moe;
        MOE_ASSIGN_OR_RETURN(m.router, get(n.router));
        MOE_ASSIGN_OR_RETURN(m.correction_bias, get(n.router_correction_bias));
        MOE_ASSIGN_OR_RETURN(m.shared.gate, get(n.shared_gate_proj));
        MOE_ASSIGN_OR_RETURN(m.shared.up, get(n.shared_up_proj));
        MOE_ASSIGN_OR_RETURN(m.shared.down, get(n.shared_down_proj));
        MOE_ASSIGN_OR_RETURN(m.shared_gate, get(n.shared_expert_gate));
      }
    }
    if (!lw.is_moe) continue;
    lw.moe.experts.resize(config.moe.num_experts);
    for (int e = 0; e < config.moe.num_experts; ++e) {
      if (options.experts && !options.experts(l, e)) continue;
      const std::vector<TensorSpec> specs = names.ExpertTensors(l, e);  // gate, up, down
      kernels::SwigluWeights& ew = lw.moe.experts[e];
      MOE_ASSIGN_OR_RETURN(ew.gate, loader.Get(specs[0].name, specs[0].shape));
      MOE_ASSIGN_OR_RETURN(ew.up, loader.Get(specs[1].name, specs[1].shape));
      MOE_ASSIGN_OR_RETURN(ew.down, loader.Get(specs[2].name, specs[2].shape));
      ++w->num_loaded_experts_;
    }
  }
  if (w->huge_page_bytes_ > 0) {
    MOE_LOG(INFO) << "weights copied into 2 MiB huge pages"
                  << common::Kv("bytes", w->huge_page_bytes_);
  }
  return w;
}

size_t ModelWeights::owned_bytes() const {
  size_t total = 0;
  for (const Tensor& t : owned_) total += t.view().nbytes();
  return total;
}

}  // namespace moe::model
