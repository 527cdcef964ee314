// The f16 build of moe_small.cu: the same kernels over IEEE half activations and weights, named
// with f16 in place of bf16. See the element type in common.cuh.
#define RVLLM_F16
#include "moe_small.cu"
