// The f16 build of logits_process.cu: the same kernels over IEEE half elements,
// named with f16 in place of bf16. See the element type in common.cuh.
#define RVLLM_F16
#include "logits_process.cu"
