// CUDA kernels (placeholder).
#include <cuda_runtime.h>
