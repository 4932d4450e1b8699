// The wire format of the TCP data plane: length-prefixed frames on a byte stream.
//
// Every frame is a fixed 64-byte little-endian header followed by `payload_bytes` bytes:
//
//   off size field
//     0   4  magic            "MOEF" (0x46454f4d)
//     4   2  version          1
//     6   2  type             1 dispatch, 2 combine, 3 error
//     8   8  request_id       chosen by the sender of a dispatch, echoed by the answer
//    16   8  step_id          dispatch
//    24   8  epoch            dispatch: placement epoch; error: the worker's epoch
//    32   4  layer            dispatch
//    36   4  source_rank      dispatch
//    40   4  num_rows         dispatch, combine
//    44   4  hidden           dispatch, combine
//    48   4  num_choices      dispatch (k)
//    52   1  row_dtype        dispatch, combine: 0 f32, 1 bf16 (rows / combine on the wire)
//    53   1  flags            error: bit 0 = epoch field is set
//    54   2  status_code      error: absl::StatusCode
//    56   4  payload_bytes
//    60   4  header_checksum  of bytes [0, 60) and of the payload (FrameChecksum)
//
// Payloads: dispatch = rows [n, H] (f32 or bf16) ‖ slots [n, k] i32 ‖ weights [n, k] f32;
// combine = [n, H] (f32 or bf16); error = the message (UTF-8). payload_bytes must equal what
// the shape fields imply, and shapes are bounded (FrameLimits), so a lying length is caught
// before anything is allocated. The checksum catches corruption that TCP's does not.
//
// Threads: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe::worker::frame {

inline constexpr uint32_t kMagic = 0x46454f4du;  // "MOEF" little-endian
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 64;

enum class FrameType : uint16_t { kDispatch = 1, kCombine = 2, kError = 3 };
enum class WireDType : uint8_t { kF32 = 0, kBF16 = 1 };

struct FrameHeader {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  FrameType type = FrameType::kDispatch;
  uint64_t request_id = 0;
  uint64_t step_id = 0;
  uint64_t epoch = 0;
  int32_t layer = 0;
  int32_t source_rank = 0;
  int32_t num_rows = 0;
  int32_t hidden = 0;
  int32_t num_choices = 0;
  WireDType row_dtype = WireDType::kF32;
  uint8_t flags = 0;
  uint16_t status_code = 0;
  uint32_t payload_bytes = 0;
  uint32_t checksum = 0;
};

struct FrameLimits {
  int32_t max_rows = 1 << 20;
  int32_t max_hidden = 1 << 16;
  int32_t max_choices = 1024;
  uint32_t max_payload_bytes = 1u << 30;
  uint32_t max_error_bytes = 1u << 16;
};

// Serialises `h` (checksum field included as given).
void EncodeHeader(const FrameHeader& h, uint8_t out[kHeaderBytes]);
// Parses the header and checks magic, version, type, shape bounds and that payload_bytes
// matches the shape fields: kDataLoss for a bad magic/version/type, kInvalidArgument for
// shapes or lengths that are out of bounds or disagree. Does not check the checksum.
absl::StatusOr<FrameHeader> DecodeHeader(const uint8_t in[kHeaderBytes], const FrameLimits& limits);

// Payload bytes the shape fields of `h` imply (0 for an error frame: its length is free).
uint64_t ExpectedPayloadBytes(const FrameHeader& h);

// Checksum of header bytes [0, 60) and the payload pieces (32-bit, fast, not cryptographic).
class Checksum {
 public:
  void Update(const void* data, size_t n);
  uint32_t Finish() const;

 private:
  uint64_t lanes_[4] = {0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full, 0x165667b19e3779f9ull,
                        0x27d4eb2f165667c5ull};
  uint64_t total_ = 0;
  uint8_t tail_[32] = {};
  size_t tail_len_ = 0;
};

}  // namespace moe::worker::frame
