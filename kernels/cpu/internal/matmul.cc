#include "kernels/cpu/internal/matmul.h"

#include <algorithm>

#include "common/thread_pool.h"

namespace moe::kernels::cpu::internal {

ActivationRows::ActivationRows(const common::TensorView& x, bool bf16) {
  const int64_t m = x.dim(0), k = x.dim(1);
  rows_.resize(m);
  if (!bf16) {
    for (int64_t i = 0; i < m; ++i) rows_[i] = &x.at<float>(i, 0);  // [M, K]
    return;
  }
  bf16_.resize(static_cast<size_t>(m) * k);
  for (int64_t i = 0; i < m; ++i) rows_[i] = bf16_.data() + i * k;
  auto convert = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ConvertToBf16(&x.at<float>(i, 0), bf16_.data() + i * k, k);
    }
  };
  if (m * k < 65536) {
    convert(0, m);
  } else {
    common::ThreadPool::Default().ParallelFor(m, std::max<int64_t>(1, 16384 / k), convert);
  }
}

void ParallelMatmul(const MatmulBlockArgs& args) {
  const int64_t n_chunks = (args.n + kWeightChunk - 1) / kWeightChunk;
  // bf16 with many rows runs the packed-panel kernel, which packs each weight panel once per
  // call: give it all rows up to kPackedRowBlock so packing is amortised.
  const int64_t row_block = args.w_bf16 ? kPackedRowBlock : kRowBlock;
  const int64_t m_blocks = (args.m + row_block - 1) / row_block;
  const size_t wsize = args.w_bf16 ? 2 : 4;
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
