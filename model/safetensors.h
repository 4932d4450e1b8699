// Safetensors checkpoints: a memory-mapped, lazily opened reader and a writer.
//
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
// N bytes of JSON {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]},
// "__metadata__": {"k": "v"}}, then the data; offsets are relative to the end of the header.
// A sharded checkpoint has `model.safetensors.index.json` {"metadata": {...}, "weight_map":
// {"name": "model-00001-of-00002.safetensors"}}.
//
// Reader contract:
//  - SafetensorsReader::Open takes a model directory (model.safetensors.index.json, else
//    model.safetensors), an index json, or one .safetensors file. It reads only the index
//    (sharded) or nothing but the path (single file); a data file is mapped (read-only,
//    mmap) and its header validated the first time a tensor in it is asked for. So an expert
//    rank that asks only for its slots' experts maps only the shards that hold them.
//  - Every header is validated when mapped: sane length, JSON, known dtype, offsets inside
//    the file, byte size = product(shape) * dtype size, no two tensors overlapping. Errors
//    name the file and the tensor, never crash: kDataLoss for a corrupt or truncated file,
//    kNotFound for a missing tensor or file, kInvalidArgument for a shape mismatch.
//  - Views returned by Get point into the mapping: valid while the reader lives, read-only
//    (writing through them faults). F32, BF16, F16, I32, I64, U8, I8 are accepted.
//
// Threads: every SafetensorsReader method may be called from several threads at once
// (mapping is guarded by a mutex). The writer is a plain function.
//
//   MOE_ASSIGN_OR_RETURN(auto reader, SafetensorsReader::Open("/models/qwen3-moe"));
//   MOE_ASSIGN_OR_RETURN(TensorView w, reader->Get("model.layers.0.mlp.gate.weight",
//                                                 {num_experts, hidden}));  // [E, hidden]
//
//   std::vector<TensorToWrite> tensors = {TensorToWrite::Copy("x", view)};
//   MOE_RETURN_IF_ERROR(WriteSafetensors(dir, tensors, {.shard_bytes = 64 << 20}));
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"

namespace moe::model {

// One tensor as a safetensors header describes it.
struct SafetensorsEntry {
  std::string name;
  common::DType dtype = common::DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
};

// One mapped .safetensors file with a validated header. Immutable after Open; thread-safe.
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates its header.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Entries in header (name) order.
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A view of `name` into the mapping; kNotFound names the file and tensor.
  absl::StatusOr<common::TensorView> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Validates a header (the JSON text) against the size of the data section. Exposed for
// tests and the writer's self-check; `file` names the file in errors.
absl::StatusOr<std::map<std::string, SafetensorsEntry>> ParseSafetensorsHeader(
    const std::string& header_json, uint64_t data_size, const std::string& file,
    std::map<std::string, std::string>* metadata);

// "[4, 8]"
std::string ShapeString(const std::vector<int64_t>& shape);

// A whole checkpoint: one file or shards with an index. See the contract above.
class SafetensorsReader {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(const std::string& path);

  // Every tensor name (from the index when sharded, else from the one file's header, which
  // maps it).
  absl::StatusOr<std::vector<std::string>> TensorNames();
  bool sharded() const { return !weight_map_.empty(); }
  // Metadata: the index's "metadata" when sharded, else the file's "__metadata__".
  absl::StatusOr<std::map<std::string, std::string>> Metadata();

  // Whether the checkpoint has `name` (maps the file for an unsharded checkpoint).
  bool Has(const std::string& name);
  // The header entry of `name`: dtype and shape (maps the file holding it).
  absl::StatusOr<SafetensorsEntry> Entry(const std::string& name);
  // A view of `name`, mapping the file that holds it on first use.
  absl::StatusOr<common::TensorView> Get(const std::string& name);
  // As Get, and checks the shape: kInvalidArgument "tensor X in F: expected shape [..], got [..]".
  absl::StatusOr<common::TensorView> Get(const std::string& name,
                                         const std::vector<int64_t>& expected_shape);
  // Maps the files that hold `names` (only those), validating that every name exists.
  // Lets a caller fail early before it starts copying weights.
  absl::Status Prefetch(const std::vector<std::string>& names);

  // Paths of the files mapped so far (for tests and logs).
  std::vector<std::string> MappedFiles() const;

 private:
  SafetensorsReader() = default;
  // The file holding `name` (mapped on demand); nullptr with kNotFound when absent.
  absl::StatusOr<const SafetensorsFile*> FileFor(const std::string& name);
  absl::StatusOr<const SafetensorsFile*> MapFile(const std::string& file_name);

  // Set at construction.
  std::string dir_;
  std::string index_path_;                          // "" when unsharded
  std::string single_file_;                         // unsharded: the file name in dir_
  std::map<std::string, std::string> weight_map_;   // sharded: tensor -> file name
  std::map<std::string, std::string> index_metadata_;

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_ ABSL_GUARDED_BY(mu_);
};

// One tensor to write. `fill` writes exactly nbytes (product(shape) * dtype size) at dst;
// the writer may call several fills in parallel from different threads.
struct TensorToWrite {
  std::string name;
  common::DType dtype = common::DType::kF32;
  std::vector<int64_t> shape;
  std::function<void(uint8_t* dst)> fill;

  size_t nbytes() const;
  // Copies `view` (contiguous, host) when written; the view's buffer must outlive the write.
  static TensorToWrite Copy(std::string name, const common::TensorView& view);
};

struct WriteSafetensorsOptions {
  // 0: one file `model.safetensors`. Otherwise shards of at most this many bytes of data
  // (a larger tensor gets a shard of its own) named model-0000i-of-0000n.safetensors, plus
  // model.safetensors.index.json.
  int64_t shard_bytes = 0;
  // Written as each file's "__metadata__" (and the index's "metadata" next to total_size).
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  // Threads filling tensors (1 = the caller only).
  int num_threads = 1;
  // File name when unsharded.
  std::string file_name = "model.safetensors";
};

// Writes `tensors` (names must be unique) into directory `dir` (created if needed).
// Same inputs give byte-identical files. Returns the files written (relative names).
absl::StatusOr<std::vector<std::string>> WriteSafetensors(
    const std::string& dir, const std::vector<TensorToWrite>& tensors,
    const WriteSafetensorsOptions& options = {});

}  // namespace moe::model
