// The gated MLP activations as the GEMVs that fuse them into their input loads apply them to a
// [gate | up] row: act(gate) * up in f32, the same expressions as activation.cu's
// silu_and_mul and gelu_tanh_and_mul, so that a fused GEMV reads the bits those kernels store.
#pragma once

#include "common.cuh"

enum GatedAct { kActSilu = 0, kActGeluTanh = 1 };

// expf (not __expf) so that SiLU matches a CPU f32 reference to rounding. tanhf: under
// --use_fast_math nvcc may take the hardware approximation (relative error about 2^-11),
// which the rounding of the product to bf16 (2^-9) or f16 (2^-12) mostly hides.
template <int kAct>
RVLLM_DEVICE float gated_act(float g) {
    if (kAct == kActSilu) return g / (1.0f + expf(-g));
    const float k = 0.7978845608028654f;  // sqrt(2 / pi); PyTorch's approximate="tanh"
    return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}

// act(gate) * up over 8 elements, rounded to the element type as the unfused kernels store it.
template <int kAct>
RVLLM_DEVICE Elem8 gated_act8(const Elem8& gate, const Elem8& up) {
    float g[8], u[8], r[8];
    elem8_to_f32(gate, g);
    elem8_to_f32(up, u);
#pragma unroll
    for (int e = 0; e < 8; ++e) r[e] = gated_act<kAct>(g[e]) * u[e];
    return f32_to_elem8(r);
}
