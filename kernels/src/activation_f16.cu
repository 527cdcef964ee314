// The f16 build of activation.cu: the same kernels over IEEE half elements,
// named with f16 in place of bf16 (or _f16 appended). See the element type in common.cuh.
#define RVLLM_F16
#include "activation.cu"
