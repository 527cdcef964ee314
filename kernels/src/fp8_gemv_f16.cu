// The f16 build of fp8_gemv.cu: the same kernel writing IEEE half outputs, named with f16 in
// place of bf16. See the element type in common.cuh.
#define RVLLM_F16
#include "fp8_gemv.cu"
