// Fused CPU forward and backward of the spatio-temporal adapter (see DESIGN.md for the math).
//
// Tensors arrive as strided (B, T, L, C) views with channel stride 1; parameters in the
// official module's shapes. Every backend-visible check (shapes, dtypes) happened in Python
// (stadapter_kernels/spec.py); the TORCH_CHECKs here only guard the C++ entry points.
//
// The kernels (st_adapter_cpu.cpp) are compiled once per instruction set, each copy in a namespace
// named by its CPU_CAPABILITY: the baseline (setup.py's flags: AVX2 on x86-64) and AVX512 (x86-64
// only). The functions in namespace stadapter (dispatch.cpp) pick a copy per call.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

// The signatures of one copy of the kernels (and of the dispatching functions, with `avx512`).
#define STADAPTER_DECLARE_KERNELS(...)                                                                        \
  bool brgemm_serves(c10::ScalarType gemm_dtype, int64_t channels, int64_t bottleneck);                       \
  void st_adapter_forward_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& fc1_weight,             \
                              const std::optional<at::Tensor>& fc1_bias, const at::Tensor& conv_weight,       \
                              const std::optional<at::Tensor>& conv_bias, const at::Tensor& fc2_weight,       \
                              const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& cond, \
                              int64_t prefix, const std::string& activation, double scale,                    \
                              int64_t tile_patches, bool native_gemm, bool brgemm, bool residual __VA_ARGS__); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>               \
  st_adapter_backward_cpu(at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x,                    \
                          const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,            \
                          const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,          \
                          const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,            \
                          const std::optional<at::Tensor>& cond, int64_t prefix, const std::string& activation, \
                          double scale, int64_t tile_patches, bool native_gemm, bool brgemm, bool residual __VA_ARGS__);

namespace stadapter {

// brgemm_serves: whether ATen's brgemm micro-kernels (at::native::cpublas::brgemm) compute the
// weight GEMMs of a call whose GEMM operands are `gemm_dtype` (float32, or x's 16-bit dtype with
// native_gemm) on this CPU, for these channel and bottleneck widths.
//
// st_adapter_forward_cpu writes the adapter output into `out` (B, T, L, C). `tile_patches` = 0
// picks the tiling from the shape; a positive value forces it (benchmarks sweep it). `native_gemm`
// runs the GEMMs of bfloat16/float16 inputs in that dtype instead of widening them to float32,
// `brgemm` the GEMMs with a weight operand through brgemm (where brgemm_serves; see the .cpp).
// `residual` = false writes the adapter branch alone (zero on the prefix tokens). `avx512` runs
// the AVX-512 copy of the kernels (the CPU must have it: see avx512_available).
//
// st_adapter_backward_cpu writes dL/dx into `dx` (without `residual`, no identity term) and
// returns the gradients of fc1 weight/bias, conv weight/bias, fc2 weight/bias and cond (all of
// them, also for absent biases and cond).
STADAPTER_DECLARE_KERNELS(, bool avx512)

// Whether this build has the AVX-512 copy of the kernels and this CPU can run it (avx512f, bw, vl
// and dq, as ATen's AVX512 capability; whether to is fused_cpp.py's choice).
bool avx512_available();

// "AMD", "Intel" or "other": which maker's CPU this is.
std::string cpu_vendor();

namespace CPU_CAPABILITY {
STADAPTER_DECLARE_KERNELS()
}  // namespace CPU_CAPABILITY

#if defined(__x86_64__)
namespace AVX512 {
STADAPTER_DECLARE_KERNELS()
}  // namespace AVX512
#endif

}  // namespace stadapter
