#include "worker/transport/frame.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moe::worker::frame {
namespace {

template <typename T>
void Put(uint8_t* out, size_t off, T v) {
  std::memcpy(out + off, &v, sizeof(T));  // hosts are little-endian (x86-64, aarch64)
}
template <typename T>
T Get(const uint8_t* in, size_t off) {
  T v;
  std::memcpy(&v, in + off, sizeof(T));
  return v;
}

constexpr uint64_t kPrime = 0x9fb21c651e98df25ull;

inline uint64_t Mix(uint64_t lane, uint64_t word) {
  lane ^= word;
  lane *= kPrime;
  return lane ^ (lane >> 29);
}

}  // namespace

void EncodeHeader(const FrameHeader& h, uint8_t out[kHeaderBytes]) {
  Put<uint32_t>(out, 0, h.magic);
  Put<uint16_t>(out, 4, h.version);
  Put<uint16_t>(out, 6, static_cast<uint16_t>(h.type));
  Put<uint64_t>(out, 8, h.request_id);
  Put<uint64_t>(out, 16, h.step_id);
  Put<uint64_t>(out, 24, h.epoch);
  Put<int32_t>(out, 32, h.layer);
  Put<int32_t>(out, 36, h.source_rank);
  Put<int32_t>(out, 40, h.num_rows);
  Put<int32_t>(out, 44, h.hidden);
  Put<int32_t>(out, 48, h.num_choices);
  Put<uint8_t>(out, 52, static_cast<uint8_t>(h.row_dtype));
  Put<uint8_t>(out, 53, h.flags);
  Put<uint16_t>(out, 54, h.status_code);
  Put<uint32_t>(out, 56, h.payload_bytes);
  Put<uint32_t>(out, 60, h.checksum);
}

uint64_t ExpectedPayloadBytes(const FrameHeader& h) {
  const uint64_t elem = h.row_dtype == WireDType::kBF16 ? 2 : 4;
  const uint64_t n = static_cast<uint64_t>(h.num_rows), hid = static_cast<uint64_t>(h.hidden),
                 k = static_cast<uint64_t>(h.num_choices);
  switch (h.type) {
    case FrameType::kDispatch: return n * hid * elem + n * k * 8;
    case FrameType::kCombine: return n * hid * elem;
    case FrameType::kError: return 0;
  }
  return 0;
}

absl::StatusOr<FrameHeader> DecodeHeader(const uint8_t in[kHeaderBytes], const FrameLimits& limits) {
  FrameHeader h;
  h.magic = Get<uint32_t>(in, 0);
  if (h.magic != kMagic) {
    return absl::DataLossError(absl::StrCat("frame: bad magic 0x", absl::Hex(h.magic)));
  }
  h.version = Get<uint16_t>(in, 4);
  if (h.version != kVersion) {
    return absl::DataLossError(
        absl::StrCat("frame: version ", h.version, " (this build speaks ", kVersion, ")"));
  }
  const uint16_t type = Get<uint16_t>(in, 6);
  if (type < 1 || type > 3) return absl::DataLossError(absl::StrCat("frame: unknown type ", type));
  h.type = static_cast<FrameType>(type);
  h.request_id = Get<uint64_t>(in, 8);
  h.step_id = Get<uint64_t>(in, 16);
  h.epoch = Get<uint64_t>(in, 24);
  h.layer = Get<int32_t>(in, 32);
  h.source_rank = Get<int32_t>(in, 36);
  h.num_rows = Get<int32_t>(in, 40);
  h.hidden = Get<int32_t>(in, 44);
  h.num_choices = Get<int32_t>(in, 48);
  const uint8_t dtype = Get<uint8_t>(in, 52);
  if (dtype > 1) return absl::DataLossError(absl::StrCat("frame: unknown row dtype ", dtype));
  h.row_dtype = static_cast<WireDType>(dtype);
  h.flags = Get<uint8_t>(in, 53);
  h.status_code = Get<uint16_t>(in, 54);
  h.payload_bytes = Get<uint32_t>(in, 56);
  h.checksum = Get<uint32_t>(in, 60);
  if (h.type == FrameType::kError) {
    if (h.payload_bytes > limits.max_error_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("frame: error message of ", h.payload_bytes,
                                                     " bytes exceeds ", limits.max_error_bytes));
    }
    return h;
  }
  if (h.num_rows < 0 || h.num_rows > limits.max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame: num_rows ", h.num_rows, " outside [0, ", limits.max_rows, "]"));
  }
  if (h.hidden <= 0 || h.hidden > limits.max_hidden) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame: hidden ", h.hidden, " outside [1, ", limits.max_hidden, "]"));
  }
  if (h.type == FrameType::kDispatch &&
      (h.num_choices <= 0 || h.num_choices > limits.max_choices)) {
    return absl::InvalidArgumentError(absl::StrCat("frame: num_choices ", h.num_choices,
                                                   " outside [1, ", limits.max_choices, "]"));
  }
  const uint64_t expected = ExpectedPayloadBytes(h);
  if (expected > limits.max_payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame: payload of ", expected,
                                                   " bytes exceeds ", limits.max_payload_bytes));
  }
  if (expected != h.payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame: payload_bytes ", h.payload_bytes,
                                                   " does not match the shape (", expected, ")"));
  }
  return h;
}

void Checksum::Update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (tail_len_ > 0) {
    const size_t take = std::min(n, sizeof(tail_) - tail_len_);
    std::memcpy(tail_ + tail_len_, p, take);
    tail_len_ += take;
    p += take;
    n -= take;
    if (tail_len_ < sizeof(tail_)) return;
    for (int i = 0; i < 4; ++i) lanes_[i] = Mix(lanes_[i], Get<uint64_t>(tail_, i * 8));
    tail_len_ = 0;
  }
  uint64_t a = lanes_[0], b = lanes_[1], c = lanes_[2], d = lanes_[3];
  for (; n >= 32; p += 32, n -= 32) {
    a = Mix(a, Get<uint64_t>(p, 0));
    b = Mix(b, Get<uint64_t>(p, 8));
    c = Mix(c, Get<uint64_t>(p, 16));
    d = Mix(d, Get<uint64_t>(p, 24));
  }
  lanes_[0] = a, lanes_[1] = b, lanes_[2] = c, lanes_[3] = d;
  std::memcpy(tail_, p, n);
  tail_len_ = n;
}

uint32_t Checksum::Finish() const {
  uint64_t h = total_ * kPrime;
  for (int i = 0; i < 4; ++i) h = Mix(h, lanes_[i]);
  for (size_t i = 0; i < tail_len_; ++i) h = Mix(h, tail_[i] + (uint64_t{i} << 8));
  h = Mix(h, total_);
  return static_cast<uint32_t>(h ^ (h >> 32));
}

}  // namespace moe::worker::frame
