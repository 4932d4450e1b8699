#include "model/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::model {
namespace {

using common::DType;
using ::testing::HasSubstr;

std::string NewDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/safetensors_test_" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A raw file: 8-byte header length (or `length_override`), header text, `data_bytes` zeros.
std::string WriteRaw(const std::string& dir, const std::string& header, size_t data_bytes,
                     uint64_t length_override = 0) {
  std::string path = dir + "/raw.safetensors";
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t len = length_override ? length_override : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(len >> (8 * i)));
  out << header << std::string(data_bytes, '\0');
  return path;
}

std::string OpenError(const std::string& path) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (file.ok()) return "OK";
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss) << file.status();
  return std::string(file.status().message());
}

struct Sample {
  common::Tensor a{DType::kF32, {2, 3}};   // [2, 3]
  common::Tensor b{DType::kBF16, {4}};     // [4]
  common::Tensor c{DType::kI32, {3}};
  common::Tensor d{DType::kI64, {2}};
  common::Tensor e{DType::kF16, {1, 2}};
  Sample() {
    for (int i = 0; i < 6; ++i) a.data_as<float>()[i] = 0.5f * i;
    for (int i = 0; i < 4; ++i) b.data_as<uint16_t>()[i] = common::F32ToBf16(1.0f + i);
    for (int i = 0; i < 3; ++i) c.data_as<int32_t>()[i] = -i;
    for (int i = 0; i < 2; ++i) d.data_as<int64_t>()[i] = (int64_t{1} << 40) + i;
    for (int i = 0; i < 2; ++i) e.data_as<uint16_t>()[i] = common::F32ToF16(0.25f * i);
  }
  std::vector<TensorToWrite> ToWrite() const {
    return {TensorToWrite::Copy("a", a.view()), TensorToWrite::Copy("b", b.view()),
            TensorToWrite::Copy("c", c.view()), TensorToWrite::Copy("d", d.view()),
            TensorToWrite::Copy("e", e.view())};
  }
};

void ExpectSample(SafetensorsReader& reader) {
  Sample s;
  for (const auto& [name, tensor] :
       std::vector<std::pair<std::string, const common::Tensor*>>{
           {"a", &s.a}, {"b", &s.b}, {"c", &s.c}, {"d", &s.d}, {"e", &s.e}}) {
    absl::StatusOr<common::TensorView> v = reader.Get(name, tensor->shape());
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->dtype(), tensor->dtype()) << name;
    EXPECT_EQ(std::memcmp(v->data(), tensor->data(), v->nbytes()), 0) << name;
  }
}

TEST(SafetensorsTest, RoundTripSingleFile) {
  std::string dir = NewDir("single");
  Sample s;
  WriteSafetensorsOptions options;
  options.metadata = {{"format", "pt"}, {"note", "hello"}};
  absl::StatusOr<std::vector<std::string>> files = WriteSafetensors(dir, s.ToWrite(), options);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(*files, std::vector<std::string>{"model.safetensors"});

  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_FALSE((*reader)->sharded());
  ExpectSample(**reader);
  absl::StatusOr<std::map<std::string, std::string>> md = (*reader)->Metadata();
  ASSERT_TRUE(md.ok());
  EXPECT_EQ(md->at("note"), "hello");
  absl::StatusOr<std::vector<std::string>> names = (*reader)->TensorNames();
  ASSERT_TRUE(names.ok());
  EXPECT_EQ(names->size(), 5u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*reader)->Get("a")->data()) % 8, 0u);  // header padded

  // The file path works as well as the directory.
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> by_file =
      SafetensorsReader::Open(dir + "/model.safetensors");
  ASSERT_TRUE(by_file.ok()) << by_file.status();
  ExpectSample(**by_file);
}

TEST(SafetensorsTest, RoundTripShardedAndLazy) {
  std::string dir = NewDir("sharded");
  Sample s;
  WriteSafetensorsOptions options;
  options.shard_bytes = 24;  // a: 24 bytes alone; then b+c (20); d+e (20)
  options.num_threads = 2;
  absl::StatusOr<std::vector<std::string>> files = WriteSafetensors(dir, s.ToWrite(), options);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_THAT(*files, ::testing::ElementsAre("model-00001-of-00003.safetensors",
                                             "model-00002-of-00003.safetensors",
                                             "model-00003-of-00003.safetensors",
                                             "model.safetensors.index.json"));
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  SafetensorsReader& r = **reader;
  EXPECT_TRUE(r.sharded());
  EXPECT_TRUE(r.MappedFiles().empty());  // nothing mapped until asked
  EXPECT_TRUE(r.Has("d"));
  EXPECT_FALSE(r.Has("zz"));
  ASSERT_TRUE(r.Get("d").ok());
  EXPECT_THAT(r.MappedFiles(), ::testing::ElementsAre(HasSubstr("model-00003-of-00003")));
  ASSERT_TRUE(r.Prefetch({"b", "c"}).ok());
  EXPECT_EQ(r.MappedFiles().size(), 2u);  // shard 1 still unmapped
  ExpectSample(r);
  EXPECT_EQ(r.MappedFiles().size(), 3u);
  absl::StatusOr<std::map<std::string, std::string>> md = r.Metadata();
  ASSERT_TRUE(md.ok());
  EXPECT_EQ(md->at("total_size"), "64");
  absl::Status missing = r.Prefetch({"a", "nope"});
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.message()), HasSubstr("\"nope\""));
}

TEST(SafetensorsTest, ShapeMismatchNamesTensorAndShapes) {
  std::string dir = NewDir("shape");
  Sample s;
  ASSERT_TRUE(WriteSafetensors(dir, s.ToWrite()).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok());
  absl::StatusOr<common::TensorView> v = (*reader)->Get("a", {3, 2});
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(v.status().message()),
              HasSubstr("tensor \"a\" in " + dir + "/model.safetensors: expected shape [3, 2], got [2, 3]"));
}

TEST(SafetensorsTest, TruncatedFile) {
  std::string dir = NewDir("truncated");
  Sample s;
  ASSERT_TRUE(WriteSafetensors(dir, s.ToWrite()).ok());
  std::string path = dir + "/model.safetensors";
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  std::string error = OpenError(path);
  EXPECT_THAT(error, HasSubstr(path));
  EXPECT_THAT(error, HasSubstr("outside the data section"));
  EXPECT_THAT(error, HasSubstr("truncated"));
  std::filesystem::resize_file(path, 5);
  EXPECT_THAT(OpenError(path), HasSubstr("too short"));
  std::filesystem::resize_file(path, 0);
  EXPECT_THAT(OpenError(path), HasSubstr("too short"));
}

TEST(SafetensorsTest, OffsetOutsideFile) {
  std::string dir = NewDir("outside");
  std::string path = WriteRaw(
      dir, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 16);
  std::string error = OpenError(path);
  EXPECT_THAT(error, HasSubstr("tensor \"w\""));
  EXPECT_THAT(error, HasSubstr("outside"));
}

TEST(SafetensorsTest, Overlap) {
  std::string dir = NewDir("overlap");
  std::string path = WriteRaw(dir,
                              R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                              R"("y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                              16);
  std::string error = OpenError(path);
  EXPECT_THAT(error, HasSubstr("overlaps"));
  EXPECT_THAT(error, HasSubstr("\"x\""));
  EXPECT_THAT(error, HasSubstr("\"y\""));
}

TEST(SafetensorsTest, BadDtypeAndSize) {
  std::string dir = NewDir("dtype");
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4)),
              HasSubstr("tensor \"w\": unsupported dtype \"F8_E4M3\""));
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16)),
              HasSubstr("holds 16 bytes but F32[3] needs 12"));
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)),
              HasSubstr("bad shape"));
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4)),
              HasSubstr("reversed"));
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w":{"dtype":"F32","shape":[1]}})", 4)),
              HasSubstr("data_offsets"));
  EXPECT_THAT(OpenError(WriteRaw(dir,
                                 R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})",
                                 4)),
              HasSubstr("too large"));
}

TEST(SafetensorsTest, BadJson) {
  std::string dir = NewDir("json");
  EXPECT_THAT(OpenError(WriteRaw(dir, R"({"w": {"dtype": "F32", )", 0)),
              HasSubstr("header is not valid JSON"));
  EXPECT_THAT(OpenError(WriteRaw(dir, R"([1, 2])", 0)), HasSubstr("not a JSON object"));
}

TEST(SafetensorsTest, HeaderLengthHuge) {
  std::string dir = NewDir("huge");
  std::string path = WriteRaw(dir, "{}", 0, /*length_override=*/uint64_t{1} << 62);
  std::string error = OpenError(path);
  EXPECT_THAT(error, HasSubstr(path));
  EXPECT_THAT(error, HasSubstr("header length"));
  EXPECT_THAT(OpenError(WriteRaw(dir, "{}", 0, /*length_override=*/3)), HasSubstr("header length 3"));
}

TEST(SafetensorsTest, BadIndex) {
  std::string dir = NewDir("index");
  {
    std::ofstream out(dir + "/model.safetensors.index.json");
    out << R"({"weight_map": {"w": "../escape.safetensors"}})";
  }
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader = SafetensorsReader::Open(dir);
  ASSERT_FALSE(reader.ok());
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("is not a file name"));
  {
    std::ofstream out(dir + "/model.safetensors.index.json");
    out << R"({"weight_map": {"w": "missing.safetensors"}})";
  }
  reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok()) << reader.status();  // shards are opened lazily
  absl::StatusOr<common::TensorView> w = (*reader)->Get("w");
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("missing.safetensors"));
  EXPECT_EQ(SafetensorsReader::Open(dir + "/nothing").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, WriterRejectsDuplicates) {
  std::string dir = NewDir("dup");
  Sample s;
  std::vector<TensorToWrite> t = {TensorToWrite::Copy("a", s.a.view()),
                                  TensorToWrite::Copy("a", s.b.view())};
  absl::StatusOr<std::vector<std::string>> files = WriteSafetensors(dir, t);
  EXPECT_EQ(files.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, ReadsGoldenFixture) {
  // Fixtures written by Python safetensors (tests/golden/) read with this reader.
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader =
      SafetensorsReader::Open("tests/golden/qwen3_moe/golden_f32.safetensors");
  ASSERT_TRUE(reader.ok()) << reader.status();
  absl::StatusOr<SafetensorsEntry> prompt = (*reader)->Entry("prompt_ids");
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(prompt->dtype, DType::kI32);
  ASSERT_EQ(prompt->shape.size(), 1u);
  const int64_t t = prompt->shape[0];
  EXPECT_TRUE((*reader)->Get("prefill_logits", {t, 512}).ok());
  EXPECT_TRUE((*reader)->Get("decode_logits", {16, 512}).ok());
  absl::StatusOr<std::map<std::string, std::string>> md = (*reader)->Metadata();
  ASSERT_TRUE(md.ok());
  EXPECT_THAT(md->at("gen_model_args"), HasSubstr("qwen3_moe"));
}

}  // namespace
}  // namespace moe::model
