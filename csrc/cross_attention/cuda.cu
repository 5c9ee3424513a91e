// cross_attention CUDA kernels (filled in by the CUDA work).
#include <ATen/ATen.h>
