// The f16 build of fp8_quant.cu: the same kernels over IEEE half inputs, named with f16 in
// place of bf16. See the element type in common.cuh.
#define RVLLM_F16
#include "fp8_quant.cu"
