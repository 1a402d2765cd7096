// Registers the fused CPU kernels as the `stadapter_cpp` torch.library operators.
//
// `import stadapter_kernels._C` loads this library, and with it the registrations; the module
// itself is empty (PyInit stub), so no pybind11 is compiled. Schemas declare `out`/`dx` as
// mutated arguments (Tensor(a!)), so the Python backend passes in the views it must fill and
// torch.compile sees the writes. Fake (meta) implementations live in stadapter_kernels/fused_cpp.py.
#include <Python.h>
#include <torch/library.h>

#include "st_adapter_cpu.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stadapter_cpp, m) {
  m.def(
      "st_adapter_forward(Tensor(a!) out, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? cond, int prefix, str activation, "
      "float scale, int tile_patches=0, bool native_gemm=False, bool brgemm=False, bool residual=True, "
      "bool avx512=False) -> ()");
  m.def(
      "st_adapter_backward(Tensor(a!) dx, Tensor grad_out, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor conv_weight, Tensor? conv_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? cond, int prefix, "
      "str activation, float scale, int tile_patches=0, bool native_gemm=False, bool brgemm=False, bool residual=True, "
      "bool avx512=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Questions about this CPU, no tensor involved: one kernel for every dispatch key.
  m.def("brgemm_serves(ScalarType gemm_dtype, int channels, int bottleneck) -> bool", &stadapter::brgemm_serves);
  m.def("cpu_vendor() -> str", &stadapter::cpu_vendor);
  m.def("avx512_available() -> bool", &stadapter::avx512_available);
}

TORCH_LIBRARY_IMPL(stadapter_cpp, CPU, m) {
  m.impl("st_adapter_forward", &stadapter::st_adapter_forward_cpu);
  m.impl("st_adapter_backward", &stadapter::st_adapter_backward_cpu);
}
