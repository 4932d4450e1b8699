#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/thread_pool.h"
#include "nlohmann/json.hpp"

namespace moe::model {
namespace {

using Json = nlohmann::json;
using common::DType;

// Headers larger than this are treated as corrupt (real ones are a few MB at most).
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
constexpr char kIndexName[] = "model.safetensors.index.json";
constexpr char kSingleName[] = "model.safetensors";

std::string ErrnoText() { return std::strerror(errno); }

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return text.str();
}

const char* SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
    case DType::kI8: return "I8";
  }
  return "?";
}

bool ParseSafetensorsDType(const std::string& text, DType* dtype) {
  // Only the upper-case safetensors names; common::ParseDType also takes ours.
  if (text.empty() || text != absl::AsciiStrToUpper(text)) return false;
  return common::ParseDType(text, dtype);
}

// product(shape) * element size, or false on overflow / negative dims.
bool ByteSize(const std::vector<int64_t>& shape, size_t elem, uint64_t* out) {
  unsigned __int128 n = elem;
  for (int64_t d : shape) {
    if (d < 0) return false;
    n *= static_cast<uint64_t>(d);
    if (n > (static_cast<unsigned __int128>(1) << 62)) return false;
  }
  *out = static_cast<uint64_t>(n);
  return true;
}

std::string MetadataValue(const Json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

}  // namespace

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::map<std::string, SafetensorsEntry>> ParseSafetensorsHeader(
    const std::string& header_json, uint64_t data_size, const std::string& file,
    std::map<std::string, std::string>* metadata) {
  auto corrupt = [&file](const std::string& tensor, const std::string& what) {
    if (tensor.empty()) return absl::DataLossError(absl::StrCat(file, ": ", what));
    return absl::DataLossError(absl::StrCat(file, ": tensor \"", tensor, "\": ", what));
  };
  Json root;
  try {
    root = Json::parse(header_json);
  } catch (const std::exception& e) {
    return corrupt("", absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return corrupt("", "header is not a JSON object");

  std::map<std::string, SafetensorsEntry> entries;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return corrupt("", "__metadata__ is not an object");
      if (metadata != nullptr) {
        for (auto m = v.begin(); m != v.end(); ++m) (*metadata)[m.key()] = MetadataValue(m.value());
      }
      continue;
    }
    if (!v.is_object()) return corrupt(name, "entry is not an object");
    SafetensorsEntry e;
    e.name = name;
    auto dtype = v.find("dtype");
    if (dtype == v.end() || !dtype->is_string()) return corrupt(name, "missing dtype");
    if (!ParseSafetensorsDType(dtype->get<std::string>(), &e.dtype)) {
      return corrupt(name, absl::StrCat("unsupported dtype ", dtype->dump(),
                                        " (supported: F32, BF16, F16, I32, I64, U8, I8)"));
    }
    auto shape = v.find("shape");
    if (shape == v.end() || !shape->is_array()) return corrupt(name, "missing shape");
    for (const Json& d : *shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return corrupt(name, absl::StrCat("bad shape ", shape->dump()));
      }
      e.shape.push_back(d.get<int64_t>());
    }
    auto offsets = v.find("data_offsets");
    if (offsets == v.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      return corrupt(name, "data_offsets must be [begin, end]");
    }
    e.begin = (*offsets)[0].get<uint64_t>();
    e.end = (*offsets)[1].get<uint64_t>();
    if (e.begin > e.end) {
      return corrupt(name, absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] are reversed"));
    }
    if (e.end > data_size) {
      return corrupt(name, absl::StrCat("data_offsets [", e.begin, ", ", e.end,
                                        "] lie outside the data section of ", data_size,
                                        " bytes (truncated file?)"));
    }
    uint64_t nbytes = 0;
    if (!ByteSize(e.shape, common::DTypeSize(e.dtype), &nbytes)) {
      return corrupt(name, absl::StrCat("shape ", ShapeString(e.shape), " is too large"));
    }
    if (nbytes != e.end - e.begin) {
      return corrupt(name, absl::StrCat("holds ", e.end - e.begin, " bytes but ",
                                        SafetensorsDTypeName(e.dtype), ShapeString(e.shape),
                                        " needs ", nbytes));
    }
    entries.emplace(name, std::move(e));
  }

  // No two tensors may share bytes.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& [name, e] : entries) {
    if (e.end > e.begin) by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
              return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
            });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return corrupt(by_offset[i]->name,
                     absl::StrCat("data [", by_offset[i]->begin, ", ", by_offset[i]->end,
                                  ") overlaps tensor \"", by_offset[i - 1]->name, "\" [",
                                  by_offset[i - 1]->begin, ", ", by_offset[i - 1]->end, ")"));
    }
  }
  return entries;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", ErrnoText()));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    std::string err = ErrnoText();
    ::close(fd);
    return absl::DataLossError(absl::StrCat("cannot stat ", path, ": ", err));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(
        absl::StrCat(path, ": file of ", size, " bytes is too short for a safetensors header"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  std::string map_err = map == MAP_FAILED ? ErrnoText() : "";
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", map_err));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = size;

  const uint8_t* bytes = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " does not fit in a file of ", size, " bytes"));
  }
  std::string header(reinterpret_cast<const char*>(bytes + 8), header_len);
  file->data_ = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  MOE_ASSIGN_OR_RETURN(file->entries_,
                       ParseSafetensorsHeader(header, data_size, path, &file->metadata_));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<common::TensorView> SafetensorsFile::Get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  }
  const SafetensorsEntry& e = it->second;
  // The mapping is read-only; the view's non-const pointer is a TensorView convention.
  void* data = const_cast<uint8_t*>(data_ + e.begin);
  return common::TensorView(data, e.dtype, e.shape);
}

// ---------------------------------------------------------------------------------------------
// SafetensorsReader

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path) {
  std::unique_ptr<SafetensorsReader> reader(new SafetensorsReader());
  std::string index_path;
  if (IsDirectory(path)) {
    reader->dir_ = path;
    if (IsFile(JoinPath(path, kIndexName))) {
      index_path = JoinPath(path, kIndexName);
    } else if (IsFile(JoinPath(path, kSingleName))) {
      reader->single_file_ = kSingleName;
    } else {
      return absl::NotFoundError(absl::StrCat(path, ": neither ", kIndexName, " nor ",
                                              kSingleName, " found"));
    }
  } else if (IsFile(path)) {
    reader->dir_ = DirName(path);
    if (absl::EndsWith(path, ".json")) {
      index_path = path;
    } else {
      reader->single_file_ = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
    }
  } else {
    return absl::NotFoundError(absl::StrCat("no checkpoint at ", path));
  }
  if (index_path.empty()) return reader;

  reader->index_path_ = index_path;
  MOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
  try {
    Json root = Json::parse(text);
    if (!root.is_object()) {
      return absl::DataLossError(absl::StrCat(index_path, ": not a JSON object"));
    }
    auto wm = root.find("weight_map");
    if (wm == root.end() || !wm->is_object()) {
      return absl::DataLossError(absl::StrCat(index_path, ": weight_map missing or not an object"));
    }
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::DataLossError(
            absl::StrCat(index_path, ": weight_map[\"", it.key(), "\"] is not a file name"));
      }
      std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "..") {
        return absl::DataLossError(absl::StrCat(index_path, ": weight_map[\"", it.key(),
                                                "\"] = \"", file, "\" is not a file name in ",
                                                reader->dir_));
      }
      reader->weight_map_[it.key()] = file;
    }
    auto md = root.find("metadata");
    if (md != root.end() && md->is_object()) {
      for (auto it = md->begin(); it != md->end(); ++it) {
        reader->index_metadata_[it.key()] = MetadataValue(it.value());
      }
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(index_path, ": invalid JSON: ", e.what()));
  }
  if (reader->weight_map_.empty()) {
    return absl::DataLossError(absl::StrCat(index_path, ": weight_map is empty"));
  }
  return reader;
}

absl::StatusOr<const SafetensorsFile*> SafetensorsReader::MapFile(const std::string& file_name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(file_name);
  if (it != files_.end()) return it->second.get();
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                       SafetensorsFile::Open(JoinPath(dir_, file_name)));
  const SafetensorsFile* raw = file.get();
  files_.emplace(file_name, std::move(file));
  return raw;
}

absl::StatusOr<const SafetensorsFile*> SafetensorsReader::FileFor(const std::string& name) {
  std::string file_name = single_file_;
  if (sharded()) {
    auto it = weight_map_.find(name);
    if (it == weight_map_.end()) {
      return absl::NotFoundError(absl::StrCat(index_path_, ": no tensor \"", name, "\""));
    }
    file_name = it->second;
  }
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, MapFile(file_name));
  if (file->entries().count(name) == 0) {
    return absl::NotFoundError(absl::StrCat(file->path(), ": no tensor \"", name, "\"",
                                            sharded() ? " (the index lists it here)" : ""));
  }
  return file;
}

absl::StatusOr<std::vector<std::string>> SafetensorsReader::TensorNames() {
  std::vector<std::string> names;
  if (sharded()) {
    for (const auto& [name, file] : weight_map_) names.push_back(name);
    return names;
  }
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, MapFile(single_file_));
  for (const auto& [name, entry] : file->entries()) names.push_back(name);
  return names;
}

absl::StatusOr<std::map<std::string, std::string>> SafetensorsReader::Metadata() {
  if (sharded()) return index_metadata_;
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, MapFile(single_file_));
  return file->metadata();
}

bool SafetensorsReader::Has(const std::string& name) {
  if (sharded()) return weight_map_.count(name) > 0;
  absl::StatusOr<const SafetensorsFile*> file = MapFile(single_file_);
  return file.ok() && (*file)->entries().count(name) > 0;
}

absl::StatusOr<SafetensorsEntry> SafetensorsReader::Entry(const std::string& name) {
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, FileFor(name));
  return file->entries().at(name);
}

absl::StatusOr<common::TensorView> SafetensorsReader::Get(const std::string& name) {
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, FileFor(name));
  return file->Get(name);
}

absl::StatusOr<common::TensorView> SafetensorsReader::Get(
    const std::string& name, const std::vector<int64_t>& expected_shape) {
  MOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, FileFor(name));
  MOE_ASSIGN_OR_RETURN(common::TensorView view, file->Get(name));
  if (view.shape() != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" in ", file->path(),
                                                   ": expected shape ", ShapeString(expected_shape),
                                                   ", got ", ShapeString(view.shape())));
  }
  return view;
}

absl::Status SafetensorsReader::Prefetch(const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    MOE_RETURN_IF_ERROR(FileFor(name).status());
  }
  return absl::OkStatus();
}

std::vector<std::string> SafetensorsReader::MappedFiles() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, file] : files_) out.push_back(file->path());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writer

size_t TensorToWrite::nbytes() const {
  uint64_t n = 0;
  if (!ByteSize(shape, common::DTypeSize(dtype), &n)) return 0;
  return static_cast<size_t>(n);
}

TensorToWrite TensorToWrite::Copy(std::string name, const common::TensorView& view) {
  TensorToWrite t;
  t.name = std::move(name);
  t.dtype = view.dtype();
  t.shape = view.shape();
  MOE_CHECK(view.is_contiguous()) << "TensorToWrite::Copy needs a contiguous view";
  const void* src = view.data();
  const size_t n = view.nbytes();
  t.fill = [src, n](uint8_t* dst) {
    if (n > 0) std::memcpy(dst, src, n);
  };
  return t;
}

namespace {

// Writes one file: header for `tensors` (indices into all), then their data, filled in place
// through a shared writable mapping.
absl::Status WriteOneFile(const std::string& path, const std::vector<TensorToWrite>& all,
                          const std::vector<size_t>& tensors,
                          const std::map<std::string, std::string>& metadata, int num_threads) {
  Json header = Json::object();
  if (!metadata.empty()) {
    Json md = Json::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header["__metadata__"] = md;
  }
  std::vector<uint64_t> offsets;
  uint64_t offset = 0;
  for (size_t i : tensors) {
    const TensorToWrite& t = all[i];
    const uint64_t n = t.nbytes();
    header[t.name] = {{"dtype", SafetensorsDTypeName(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + n}}};
    offsets.push_back(offset);
    offset += n;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  const uint64_t total = 8 + text.size() + offset;

  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", ErrnoText()));
  if (::ftruncate(fd, static_cast<off_t>(total)) != 0) {
    std::string err = ErrnoText();
    ::close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("cannot size ", path, ": ", err));
  }
  void* map = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    std::string err = ErrnoText();
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", err));
  }
  uint8_t* bytes = static_cast<uint8_t*>(map);
  const uint64_t header_len = text.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(header_len >> (8 * i));
  std::memcpy(bytes + 8, text.data(), text.size());
  uint8_t* data = bytes + 8 + text.size();

  auto fill_range = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const TensorToWrite& t = all[tensors[k]];
      if (t.nbytes() > 0 && t.fill) t.fill(data + offsets[k]);
    }
  };
  if (num_threads > 1 && tensors.size() > 1) {
    common::ThreadPool pool(num_threads);
    pool.ParallelFor(static_cast<int64_t>(tensors.size()), 1, fill_range);
  } else {
    fill_range(0, static_cast<int64_t>(tensors.size()));
  }
  int rc = ::munmap(map, total);
  int close_rc = ::close(fd);
  if (rc != 0 || close_rc != 0) {
    return absl::InternalError(absl::StrCat("cannot finish writing ", path, ": ", ErrnoText()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> WriteSafetensors(
    const std::string& dir, const std::vector<TensorToWrite>& tensors,
    const WriteSafetensorsOptions& options) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  {
    std::map<std::string, int> seen;
    for (const TensorToWrite& t : tensors) {
      if (t.name.empty() || t.name == "__metadata__") {
        return absl::InvalidArgumentError(absl::StrCat("bad tensor name \"", t.name, "\""));
      }
      if (++seen[t.name] > 1) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\" written twice"));
      }
      uint64_t n = 0;
      if (!ByteSize(t.shape, common::DTypeSize(t.dtype), &n)) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor \"", t.name, "\": bad shape ", ShapeString(t.shape)));
      }
    }
  }

  // Group into shards in order.
  std::vector<std::vector<size_t>> shards;
  if (options.shard_bytes <= 0) {
    shards.emplace_back();
    for (size_t i = 0; i < tensors.size(); ++i) shards[0].push_back(i);
  } else {
    uint64_t in_shard = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      uint64_t n = tensors[i].nbytes();
      if (shards.empty() || (in_shard > 0 && in_shard + n > static_cast<uint64_t>(options.shard_bytes))) {
        shards.emplace_back();
        in_shard = 0;
      }
      shards.back().push_back(i);
      in_shard += n;
    }
    if (shards.empty()) shards.emplace_back();
  }

  std::vector<std::string> written;
  const int threads = std::max(1, options.num_threads);
  if (options.shard_bytes <= 0) {
    MOE_RETURN_IF_ERROR(WriteOneFile(JoinPath(dir, options.file_name), tensors, shards[0],
                                     options.metadata, threads));
    written.push_back(options.file_name);
    return written;
  }
  Json weight_map = Json::object();
  uint64_t total_size = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    MOE_RETURN_IF_ERROR(
        WriteOneFile(JoinPath(dir, name), tensors, shards[s], options.metadata, threads));
    for (size_t i : shards[s]) {
      weight_map[tensors[i].name] = name;
      total_size += tensors[i].nbytes();
    }
    written.push_back(name);
  }
  Json md = Json::object();
  for (const auto& [k, v] : options.metadata) md[k] = v;
  md["total_size"] = total_size;
  Json index = {{"metadata", md}, {"weight_map", weight_map}};
  std::ofstream out(JoinPath(dir, kIndexName), std::ios::binary | std::ios::trunc);
  out << index.dump(2) << "\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", JoinPath(dir, kIndexName)));
  written.push_back(kIndexName);
  return written;
}

}  // namespace moe::model
