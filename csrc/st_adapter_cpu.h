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

// Writes the adapter output into `out` (B, T, L, C). `tile_patches` = 0 picks the tiling from
// the shape; a positive value forces it (benchmarks sweep it). `native_gemm` runs the GEMMs of
// bfloat16/float16 inputs in that dtype instead of widening them to float32 (see the .cpp).
void st_adapter_forward_cpu(
    at::Tensor& out, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& cond,
    int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
    bool native_gemm);

// Writes dL/dx into `dx` and returns the gradients of fc1 weight/bias, conv weight/bias,
// fc2 weight/bias and cond (all of them, also for absent biases and cond).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
st_adapter_backward_cpu(
    at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& cond,
    int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
    bool native_gemm);

}  // namespace stadapter
