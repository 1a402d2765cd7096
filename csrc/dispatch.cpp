// The kernels' entry points: each call runs the copy of st_adapter_cpu.cpp compiled for the
// instruction set the caller asks for (fused_cpp.py asks for AVX-512 where avx512_available).
#include "st_adapter_cpu.h"

#include <c10/util/Exception.h>

namespace stadapter {

namespace baseline = stadapter::CPU_CAPABILITY;
#if !defined(__x86_64__)
// No AVX-512 copy is built here; avx512_available() is false, so kernel_copy never picks it.
namespace AVX512 = baseline;
#endif

bool avx512_available() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The CPU's maker: library GEMMs dispatch on it (MKL's float32 kernels are not its best on AMD),
// where the ISA flags alone would say two CPUs are alike.
std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd")) return "AMD";
  if (__builtin_cpu_is("intel")) return "Intel";
#endif
  return "other";
}

// Each copy checks its own brgemm path once (an exact product): both must pass where both run.
bool brgemm_serves(c10::ScalarType gemm_dtype, int64_t channels, int64_t bottleneck) {
  return baseline::brgemm_serves(gemm_dtype, channels, bottleneck) &&
         (!avx512_available() || AVX512::brgemm_serves(gemm_dtype, channels, bottleneck));
}

namespace {

// The copy of a kernel a call asks for: `avx512_fn` with avx512 (which this CPU must run), else the
// baseline's.
template <typename Fn>
Fn kernel_copy(bool avx512, Fn baseline_fn, Fn avx512_fn) {
  TORCH_CHECK(!avx512 || avx512_available(),
              "stadapter_cpp: avx512=True, but this CPU or this build has no AVX-512 (avx512f, bw, vl, dq)");
  return avx512 ? avx512_fn : baseline_fn;
}

}  // namespace

void st_adapter_forward_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& fc1_weight,
                            const std::optional<at::Tensor>& fc1_bias, const at::Tensor& conv_weight,
                            const std::optional<at::Tensor>& conv_bias, const at::Tensor& fc2_weight,
                            const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& cond,
                            int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
                            bool native_gemm, bool brgemm, bool residual, bool avx512) {
  kernel_copy(avx512, &baseline::st_adapter_forward_cpu, &AVX512::st_adapter_forward_cpu)(
      out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond, prefix, activation, scale,
      tile_patches, native_gemm, brgemm, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
st_adapter_backward_cpu(at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x,
                        const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                        const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                        const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                        const std::optional<at::Tensor>& cond, int64_t prefix, const std::string& activation,
                        double scale, int64_t tile_patches, bool native_gemm, bool brgemm, bool residual,
                        bool avx512) {
  return kernel_copy(avx512, &baseline::st_adapter_backward_cpu, &AVX512::st_adapter_backward_cpu)(
      dx, grad_out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond, prefix, activation,
      scale, tile_patches, native_gemm, brgemm, residual);
}

}  // namespace stadapter
