// The AVX-512 copy of the kernels: st_adapter_cpu.cpp compiled for AVX-512 (ATen's AVX512
// capability: avx512f, bw, vl, dq and FMA) in namespace stadapter::AVX512. The target pragma comes
// before every include, so at::vec's headers compile their 512-bit implementations here, while the
// rest of the extension keeps setup.py's baseline flags. dispatch.cpp runs this copy only on CPUs
// that have AVX-512; inline functions of the headers that both copies emit are linked from the
// baseline copy, whose object comes first (setup.py; tests/test_cpp_build.py checks that nothing
// outside this namespace uses 512-bit registers).
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC's target pragma enables the instructions but not the macros that -mavx512f would define,
// and sleef.h declares its 512-bit functions (at::vec's exp, erf, tanh) only under them.
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// at::vec's 512-bit headers, compiled this way: lambdas returning __m512 (-Wpsabi, about calls
// from code without AVX-512, which never happen) and GCC 12's own _mm512_undefined_* intrinsics.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "st_adapter_cpu.cpp"
#endif
