// Fused CPU forward and backward of the spatio-temporal adapter (see DESIGN.md for the math).
//
// Tensors arrive as strided (B, T, L, C) views with channel stride 1; parameters in the
// official module's shapes. Every backend-visible check (shapes, dtypes) happened in Python
// (stadapter_kernels/spec.py); the TORCH_CHECKs here only guard the C++ entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace stadapter {

// Whether ATen's brgemm micro-kernels (at::native::cpublas::brgemm) compute the weight GEMMs of a
// call whose GEMM operands are `gemm_dtype` (float32, or x's 16-bit dtype with native_gemm) on
// this CPU, for these channel and bottleneck widths.
bool brgemm_serves(c10::ScalarType gemm_dtype, int64_t channels, int64_t bottleneck);

// "AMD", "Intel" or "other": which maker's CPU this is.
std::string cpu_vendor();

// Writes the adapter output into `out` (B, T, L, C). `tile_patches` = 0 picks the tiling from
// the shape; a positive value forces it (benchmarks sweep it). `native_gemm` runs the GEMMs of
// bfloat16/float16 inputs in that dtype instead of widening them to float32, `brgemm` the GEMMs
// with a weight operand through brgemm (where brgemm_serves; see the .cpp). `residual` = false
// writes the adapter branch alone (zero on the prefix tokens).

void st_adapter_forward_cpu(
    at::Tensor& out, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& cond,
    int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
    bool native_gemm, bool brgemm, bool residual);

// Writes dL/dx into `dx` (without `residual`, no identity term) and returns the gradients of fc1 weight/bias, conv weight/bias,
// fc2 weight/bias and cond (all of them, also for absent biases and cond).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
st_adapter_backward_cpu(
    at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& cond,
    int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
    bool native_gemm, bool brgemm, bool residual);

}  // namespace stadapter
