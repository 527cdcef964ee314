// The f16 build of dummy_fill.cu: the same kernel over IEEE half elements,
// named with f16 in place of bf16. See the element type in common.cuh.
#define RVLLM_F16
#include "dummy_fill.cu"
