#include "kernels/cpu/internal/matmul.h"

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "common/thread_pool.h"

namespace moe::kernels::cpu::internal {

int64_t StreamChunkRows(int64_t n) {
  const int64_t items = common::ThreadPool::Default().num_threads() * kStreamItemsPerThread;
  const int64_t rows = (n + items - 1) / items;
  return std::max(kStreamMinChunk, (rows + 15) / 16 * 16);
}

void* ThreadScratch(ScratchSlot slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
    size_t bytes = 0;
  };
  thread_local Buffer buffers[kNumScratchSlots];
  Buffer& b = buffers[slot];
  if (b.bytes < bytes) {
    // Grow geometrically so a slowly rising size does not reallocate every call.
    const size_t want = std::max<size_t>((bytes + 63) / 64 * 64, b.bytes * 3 / 2 / 64 * 64);
    b.data.reset(std::aligned_alloc(64, want));
    b.bytes = b.data != nullptr ? want : 0;
  }
  return b.data.get();
}

ActivationRows::ActivationRows(const common::TensorView& x, bool bf16) {
  const int64_t m = x.dim(0), k = x.dim(1);
  rows_.resize(m);
  if (!bf16) {
    for (int64_t i = 0; i < m; ++i) rows_[i] = &x.at<float>(i, 0);  // [M, K]
    return;
  }
  uint16_t* converted =
      ThreadScratchAs<uint16_t>(kScratchActivations, static_cast<size_t>(m) * k);
  for (int64_t i = 0; i < m; ++i) rows_[i] = converted + i * k;
  auto convert = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) ConvertToBf16(&x.at<float>(i, 0), converted + i * k, k);
  };
  if (m * k < 65536) {
    convert(0, m);
  } else {
    common::ThreadPool::Default().ParallelFor(m, std::max<int64_t>(1, 16384 / k), convert);
  }
}

void ParallelMatmul(const MatmulBlockArgs& args) {
  const size_t wsize = args.w_bf16 ? 2 : 4;
  if (args.w_bf16 && args.m <= kStreamMaxRows) {
    const int64_t chunk = StreamChunkRows(args.n);
    common::ThreadPool::Default().ParallelFor(
        (args.n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
          float* c_rows[kStreamMaxRows];
          for (int64_t item = begin; item < end; ++item) {
            const int64_t j0 = item * chunk, j1 = std::min(args.n, j0 + chunk);
            for (int64_t i = 0; i < args.m; ++i) c_rows[i] = args.c_rows[i] + j0;
            MatmulBlockArgs block = args;
            block.w = static_cast<const char*>(args.w) + j0 * args.ldw * wsize;
            block.n = j1 - j0;
            block.c_rows = c_rows;
            MatmulBlock(block);
          }
        });
    return;
  }
  const int64_t n_chunks = (args.n + kWeightChunk - 1) / kWeightChunk;
  // bf16 with many rows runs the packed-panel kernel, which packs each weight panel once per
  // call: give it all rows up to kPackedRowBlock so packing is amortised.
  const int64_t row_block = args.w_bf16 ? kPackedRowBlock : kRowBlock;
  const int64_t m_blocks = (args.m + row_block - 1) / row_block;
  common::ThreadPool::Default().ParallelFor(
      n_chunks * m_blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float*> c_rows;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t mb = item / n_chunks, nc = item % n_chunks;
          const int64_t i0 = mb * row_block, i1 = std::min(args.m, i0 + row_block);
          const int64_t j0 = nc * kWeightChunk, j1 = std::min(args.n, j0 + kWeightChunk);
          c_rows.resize(i1 - i0);
          for (int64_t i = i0; i < i1; ++i) c_rows[i - i0] = args.c_rows[i] + j0;
          MatmulBlockArgs block = args;
          block.a_rows = args.a_rows + i0;
          block.m = i1 - i0;
          block.w = static_cast<const char*>(args.w) + j0 * args.ldw * wsize;
          block.n = j1 - j0;
          block.c_rows = c_rows.data();
          block.row_scale = args.row_scale != nullptr ? args.row_scale + i0 : nullptr;
          MatmulBlock(block);
        }
      });
}

}  // namespace moe::kernels::cpu::internal
