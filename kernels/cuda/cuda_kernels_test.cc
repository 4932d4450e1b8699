// Placeholder: GPU tests land with the kernels.
#include <gtest/gtest.h>

#include "kernels/cuda/device.h"

TEST(CudaKernelsTest, SkipsWithoutDevice) {
  if (!moe::kernels::cuda::CudaAvailable()) GTEST_SKIP() << "no CUDA device";
}
