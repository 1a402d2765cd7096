// Fused CPU kernels of the spatio-temporal adapter: forward, and a backward that recomputes the
// bottleneck from x.
//
// Work is split into tiles of (one video, a run of patch positions: a whole frame's patches
// where that leaves enough tiles) with a tiling that depends only on the shape, never on the
// thread count. A tile walks the T frames and keeps the temporal window of the bottleneck (kt
// frames of tile x Ca floats, plus any frames projected ahead) in a ring buffer, so nothing of
// tokens x Ca elements is ever written to memory: per frame, the down-projection, the depthwise
// temporal conv + activation (at::vec) and the up-projection with the residual add fused into
// its epilogue all run on cache-resident blocks. With a narrow bottleneck, native 16-bit GEMMs
// take a few consecutive frames at once (see kBatchBottleneckElements); brgemm's forward projects
// a run of frames with one weight before switching to the other (see kBrgemmBatchElements).
//
// Element-wise arithmetic (bias, conv, activation, residual, gradient partials) is float32.
// The GEMMs of bfloat16/float16 inputs run one of two ways, chosen per call (`native_gemm`):
//  - widened: rows are widened into float32 tile buffers and multiplied by MKL's float32 GEMM
//    (as float32 calls are, where brgemm does not serve them: on weights packed once per call, see
//    pack_mkl_weights).
//    Fastest on CPUs without native half-precision matrix instructions (AVX2), where ATen's
//    bf16/fp16 GEMM is a slow fallback, and on some CPUs with them (an Intel Xeon with
//    avx512_bf16 and AMX off): fused_cpp.py times one frame's GEMM both ways to choose.
//  - native: the GEMMs take the 16-bit operands as they are (oneDNN, avx512_bf16 / AMX / fp16
//    instructions) and return 16-bit results, which are widened for the element-wise work. Each
//    GEMM output is rounded once, as nn.Linear in that dtype rounds it (except relu's backward,
//    which recomputes y with a float32 GEMM, see st_adapter_backward_cpu). Weight gradients use
//    one GEMM per chunk of frames (K = frames x rows), into a 16-bit block that is added to the
//    float32 partials, so partial sums over chunks are never rounded (on AMX, bfloat16's go through
//    MKL straight into the partials, with whole-frame tiles frame by frame from the token rows).
//
// The tile GEMMs with a weight operand (the down- and up-projection, and the backward's
// da = g @ fc2_weight and dx = dy @ fc1_weight) may instead run through ATen's batch-reduce GEMM
// micro-kernels, at::native::cpublas::brgemm (`brgemm`, chosen per call by fused_cpp.py): oneDNN
// kernels generated once per shape and cached per thread, with none of a library GEMM's per-call
// set-up, which is what dominates one frame's 196-row GEMMs on AMX. The weight is laid out for
// them once per call, in parallel (float32: K x N; bfloat16/float16: VNNI pairs, see
// lay_out_block), and the float32 accumulator is the result: written straight into the bottleneck
// ring, or read by the residual pass, with no 16-bit rounding of y or of the up-projection. 16-bit
// brgemm needs AMX (cpublas::could_pack); float32 brgemm runs on AVX2 and later. Weight-gradient
// GEMMs (large K, few calls) stay on the library GEMM. The hardware context (AMX tile
// configuration) is released when a task starts and ends, and before a library GEMM between brgemm
// calls (see BrgemmScope).
//
// Determinism: every tile is computed by one thread with single-threaded GEMMs (ATen's addmm,
// MKL and OpenMP pinned to one thread, see SequentialBlas), and weight-gradient partials are
// accumulated per reduction group (a fixed run of tiles) and summed in group order, so results
// are bit-identical for any thread count. The forward may also split T into runs with the thread
// count (see forward_tile): each frame's GEMM rows then meet other rows in a multi-frame GEMM,
// which oneDNN's 16-bit GEMMs compute row by row alike (checked by the split tests); float32's
// MKL does not, so float32 keeps one frame per GEMM, as does brgemm (in runs of frames, see
// kBrgemmBatchElements).
#include "st_adapter_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/SmallVector.h>
#include <c10/util/irange.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if AT_MKL_ENABLED()
// MKL's per-thread thread count, its bfloat16 GEMM with a float32 result and its float32 GEMM on a
// packed B operand (libtorch_cpu exports MKL, which torch links statically; ATen wraps none of these).
extern "C" int MKL_Set_Num_Threads_Local(int);  // the C entry point (mkl_service.h maps the lower-case macro to it)
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc);
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest);
extern "C" void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                                    const float* b, int ldb, float beta, float* c, int ldc);
#endif
// MKL's CBLAS_LAYOUT, CBLAS_TRANSPOSE (with its packed-operand value) and CBLAS_IDENTIFIER.
constexpr int kCblasRowMajor = 101, kCblasNoTranspose = 111, kCblasTranspose = 112, kCblasPacked = 151;
constexpr int kCblasBMatrix = 162;

// This file is compiled once per instruction set, like ATen's kernels: with setup.py's flags
// (CPU_CAPABILITY=AVX2 on x86-64) and again by st_adapter_cpu_avx512.cpp, each copy in a namespace
// of its own, stadapter::<CPU_CAPABILITY>; dispatch.cpp picks one per call. The GEMMs are the
// libraries' either way: what AVX-512 speeds up is this file's element-wise work (the conv,
// activation, residual and widening passes), twice as wide.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace stadapter {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// Patch rows per tile (per frame) at most: a ViT-B/16 frame's 196 patches make one tile, half the
// GEMM calls of two 98-row tiles, while the working set (kt frames of the bottleneck) still fits
// a core's L2. tools/measure_cpp.py --tile-sweep 49,98,196 (bf16, Ca = 384): fwd / floor 1.36,
// 1.19, 1.13; float32 1.14, 1.04, 1.02.
constexpr int64_t kMaxTilePatches = 200;
// Tiles per call at least (frames split in patch runs when there are fewer videos): the backward
// is parallel over tiles only, and the tiling may depend on the shape alone, not the thread count
// (see Determinism above), so a single clip still gets two tiles for a dual-core CPU.
constexpr int64_t kMinTiles = 2;
// Upper bound on the number of weight-gradient partials of the backward (each Ca x C floats,
// twice): enough groups to keep every core busy, few enough that summing them is cheap.
constexpr int64_t kMaxReductionGroups = 8;
// Frames per weight-gradient GEMM of the native-GEMM backward (K = frames x tile rows): one
// 16-bit rounding per chunk rather than per frame, and a bound on the gathered operands' scratch
// for long clips. (Float32 accumulates per frame in the GEMM: gathering its operands measured 1%
// slower, the copies costing more than the accumulator traffic they save.)
constexpr int64_t kWeightGradChunkFrames = 8;
// Native-GEMM forward: frames per GEMM so that each GEMM's bottleneck block is about this many
// elements. oneDNN's bf16 GEMMs with a narrow bottleneck run well below speed on one frame's
// rows (196 x 768 x 128: 27% slower than 784 rows at once; at Ca = 384 no slower, so one frame)
// and give each row the same result whatever the rows around it, so batching changes no bit.
constexpr int64_t kBatchBottleneckElements = 4 * 200 * 128;
// brgemm forward: frames per run of one weight's GEMMs (down-projections ahead of the window, then
// up-projections of the frames waiting for them), so that the run's bottleneck block is about this
// many elements. A 196-row brgemm call takes ~25 us longer when its 590 KB weight comes back from
// L3 rather than L2, and frame by frame each weight evicts the other; in runs, one call a run pays.
// bf16, Ca = 384, B = 2, 2 threads on the AMX Xeon (same build, run length forced, each candidate
// timed right after the same cache-evicting GEMMs, in both orders): runs of 8 frames take 0.91x the
// forward's time frame by frame. Each GEMM stays one frame's call, so no bit changes. (The backward,
// in blocks of steps that give each of its three weights a run, measured no faster: not done.)
constexpr int64_t kBrgemmBatchElements = 8 * 200 * 384;
// Rows per up-projection call of the brgemm forward, each call's float32 result (rows x C) read by
// the residual pass while in L1/L2 rather than a whole frame's (600 KB at 196 x 768) from L3: 0.98x
// the bf16 forward's time of a frame per call (Ca = 384, measured as kBrgemmBatchElements). The
// backward's dx = dy @ fc1_weight in blocks of 32 or 64 rows, and its da, measured no faster.
constexpr int64_t kBrgemmUpRows = 64;
// Alignment of every scratch buffer: a cache line, and enough for any vector load.
constexpr size_t kArenaAlignment = 64;
constexpr size_t round_up_to_alignment(size_t bytes) {
  return (bytes + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
}
// Columns of a brgemm weight laid out per task (lay_out_brgemm_weights).
constexpr int64_t kBrgemmBlockN = 64;
// 16-bit brgemm takes widths (C and Ca, each a K and an N) that are multiples of this: whole AMX
// tile rows of 16, and K even for the VNNI pairs.
constexpr int64_t kBrgemmColumnMultiple = 16;

// ---------------------------------------------------------------------------------------------
// Activations (formulas and derivatives of stadapter_kernels/activations.py)
// ---------------------------------------------------------------------------------------------

enum class Activation { kIdentity, kRelu, kGelu, kGeluTanh, kQuickGelu, kSilu };

Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "quick_gelu") return Activation::kQuickGelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "stadapter_cpp: unknown activation '", name, "'");
}

// Calls f(std::integral_constant<Activation, A>{}) so each activation gets its own inner loops.
template <typename F>
void with_activation(Activation activation, F&& f) {
  switch (activation) {
    case Activation::kIdentity: return f(std::integral_constant<Activation, Activation::kIdentity>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kQuickGelu: return f(std::integral_constant<Activation, Activation::kQuickGelu>{});
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>{});
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluTanhCubic = 0.044715f;
constexpr float kQuickGeluAlpha = 1.702f;

// erf(u) given e = exp(-u^2): Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), at::vec's own erf
// formula, with the exponential passed in (gelu's derivative needs the same one).
inline Vec erf_given_exp(Vec u, Vec e) {
  const Vec one(1.0f);
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), u.abs(), one);
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec magnitude = one - r * t * e;
  return Vec::blendv(magnitude.neg(), magnitude, u >= Vec(0.0f));
}

inline Vec sigmoid(Vec v) {
  const Vec one(1.0f);
  return one / (one + v.neg().exp());
}

// act(z) and, when `derivative` is non-null, act'(z).
template <Activation A>
inline Vec activate(Vec z, Vec* derivative) {
  const Vec one(1.0f), half(0.5f);
  if constexpr (A == Activation::kIdentity) {
    if (derivative) *derivative = one;
    return z;
  } else if constexpr (A == Activation::kRelu) {
    const Vec zero(0.0f);
    if (derivative) *derivative = Vec::blendv(zero, one, z > zero);
    return at::vec::maximum(z, zero);
  } else if constexpr (A == Activation::kGelu) {
    // exp(-z^2 / 2) once, for the cdf's erf and the derivative's pdf, through at::vec's inline
    // exp_u20 (~2e-6 relative) rather than Sleef's exp, an opaque call per vector. gelu's error
    // against float64 is unchanged (4.6e-7 at most on [-12, 12], the erf formula's), and on the AMX
    // Xeon the bf16 Ca = 384 forward takes 0.89-0.94x, forward+backward 0.92-0.94x the time.
    const Vec e = (Vec(-0.5f) * z * z).exp_u20();
    const Vec cdf = half * (one + erf_given_exp(z * Vec(kInvSqrt2), e));
    if (derivative) *derivative = cdf + z * e * Vec(kInvSqrt2Pi);
    return z * cdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    const Vec z2 = z * z;
    const Vec t = (Vec(kSqrt2OverPi) * (z + Vec(kGeluTanhCubic) * z2 * z)).tanh();
    if (derivative) {
      *derivative = half * (one + t) + half * z * (one - t * t) * Vec(kSqrt2OverPi) *
                                           (one + Vec(3.0f * kGeluTanhCubic) * z2);
    }
    return half * z * (one + t);
  } else if constexpr (A == Activation::kQuickGelu) {
    const Vec s = sigmoid(Vec(kQuickGeluAlpha) * z);
    if (derivative) *derivative = s + Vec(kQuickGeluAlpha) * z * s * (one - s);
    return z * s;
  } else {
    const Vec s = sigmoid(z);
    if (derivative) *derivative = s * (one + z * (one - s));
    return z * s;
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes, strided views, parameters
// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t batch, frames, tokens, channels, bottleneck, prefix, patches, kernel_t, half;
  int64_t tile;             // patch rows per tile
  int64_t tiles_per_video;  // ceil(patches / tile)
  int64_t tiles;            // batch * tiles_per_video
  bool native_gemm;         // 16-bit GEMM operands as they are (see the top of this file)
  bool brgemm;              // the weight GEMMs through cpublas::brgemm (see the top of this file)
  bool mkl_packed;          // float32 library GEMMs with a weight on MKL's packed copies (pack_mkl_weights)
  bool residual;            // out = x + branch (else the branch alone; dx without the identity term)
  bool widened_down;        // native_gemm, but the down-projection widened to float32 (relu's backward)
  bool bias_in_conv;        // the forward's row bias added where the conv reads y, not stored with it
                            // in the ring (brgemm, float32 GEMMs): no pass of its own, same bits;
                            // bf16 forward 0.98x on the AMX Xeon, float32 1.00x
  int64_t grad_chunk;       // frames per weight-gradient GEMM of the native backward
  int64_t up_frames;        // frames per up-projection GEMM of the forward (brgemm: per run of calls)
  int64_t down_frames;      // frames per down-projection GEMM of the forward (back-to-back rows only;
                            // brgemm: per run of calls)
  int64_t ring_frames;      // frames of y alive in the ring: kt, plus the frames projected ahead

  int64_t video_of(int64_t tile_index) const { return tile_index / tiles_per_video; }
  int64_t first_patch(int64_t tile_index) const { return (tile_index % tiles_per_video) * tile; }
  int64_t rows_of(int64_t tile_index) const { return std::min(tile, patches - first_patch(tile_index)); }
  // Ring-buffer slots of frame f: the y ring holds the window and the frames projected ahead, the
  // dz ring of the backward the last kt frames.
  int64_t y_slot(int64_t frame) const { return frame % ring_frames; }
  int64_t dz_slot(int64_t frame) const { return frame % kernel_t; }
  // Whether frame f is the last of its weight-gradient chunk (native backward).
  bool ends_grad_chunk(int64_t frame) const { return frame % grad_chunk == grad_chunk - 1 || frame == frames - 1; }
  // The taps j whose frame t + j - half lies in the clip (zero padding in T elsewhere).
  std::pair<int64_t, int64_t> taps_in_clip(int64_t t) const {
    return {std::max<int64_t>(0, half - t), std::min(kernel_t, frames - t + half)};
  }
};

Shape make_shape(const at::Tensor& x, const at::Tensor& conv_weight, int64_t bottleneck, int64_t prefix,
                 int64_t tile_patches, bool native_gemm, bool brgemm, bool residual, bool backward,
                 bool widened_down = false) {
  Shape s{};
  s.native_gemm = native_gemm && x.scalar_type() != at::kFloat;
  s.brgemm = brgemm;
  s.mkl_packed = AT_MKL_ENABLED() && !s.native_gemm && !brgemm;
  s.residual = residual;
  TORCH_CHECK(!brgemm || brgemm_serves(s.native_gemm ? x.scalar_type() : at::kFloat, x.size(3), bottleneck),
              "stadapter_cpp: brgemm cannot serve these GEMMs on this CPU (fused_cpp.py checks before asking)");
  // brgemm accumulates y in float32 from the 16-bit operands: nothing rounds it, so relu's
  // backward needs no widened down-projection (see st_adapter_backward_cpu).
  s.widened_down = s.native_gemm && widened_down && !brgemm;
  s.batch = x.size(0);
  s.frames = x.size(1);
  s.tokens = x.size(2);
  s.channels = x.size(3);
  s.bottleneck = bottleneck;
  s.prefix = prefix;
  s.patches = s.tokens - prefix;
  s.kernel_t = conv_weight.size(2);
  s.grad_chunk = std::min(s.frames, kWeightGradChunkFrames);
  s.half = s.kernel_t / 2;
  TORCH_CHECK(s.patches > 0, "stadapter_cpp: prefix must be smaller than L");
  if (tile_patches > 0) {
    s.tile = tile_patches;
  } else {  // tiles of equal size, so no tile is a tiny, inefficient remainder
    const int64_t count = std::min(s.patches, std::max((s.patches + kMaxTilePatches - 1) / kMaxTilePatches,
                                                       (kMinTiles + s.batch - 1) / s.batch));
    s.tile = (s.patches + count - 1) / count;
  }
  s.tiles_per_video = (s.patches + s.tile - 1) / s.tile;
  s.tiles = s.batch * s.tiles_per_video;
  // Float32 (MKL) results depend on the rows around: one frame per GEMM there, so that a split of
  // T (see forward_tile) changes no bit. The down-projection's rows of several frames are one
  // strided block only when a tile is a whole frame's patches and frames lie back to back
  // (the prefix rows between them are projected too, and dropped).
  auto batch_frames = [&](int64_t elements) {
    return std::clamp<int64_t>(elements / (s.tile * bottleneck), 1, s.frames);
  };
  const bool back_to_back = s.tile == s.patches && x.stride(1) == s.tokens * x.stride(2) && !s.widened_down;
  s.bias_in_conv = !backward && (s.brgemm || !s.native_gemm);
  if (backward) {  // frame by frame
    s.up_frames = s.down_frames = 1;
  } else if (s.brgemm) {  // one brgemm call per frame: any run of frames, no bit changes
    s.up_frames = s.down_frames = batch_frames(kBrgemmBatchElements);
  } else {
    s.up_frames = s.native_gemm ? batch_frames(kBatchBottleneckElements) : 1;
    s.down_frames = back_to_back ? s.up_frames : 1;
  }
  s.ring_frames = s.kernel_t + s.down_frames - 1;
  return s;
}

// Tile rows at least for frame-by-frame weight gradients (frame_weight_grads): on the AMX Xeon,
// forward + backward with 196-row tiles (2 clips) 0.96-0.98x the time of oneDNN's chunks, with 98-row
// tiles (1 clip) 1.07x, MKL's GEMM over one frame's 98 rows being the slower one there.
constexpr int64_t kFrameWeightGradRows = 192;

// Whether the native backward's weight-gradient GEMMs go through MKL's GEMM with a float32 result,
// straight into the float32 partials (see add_weight_grad_rows): bfloat16 where brgemm serves it (AMX),
// where that was measured faster (over gathered chunks, 1 clip's 98-row tiles: forward + backward
// 0.91-0.95x oneDNN's time); elsewhere oneDNN's into a 16-bit product (on AMD's Zen 4, MKL's over the
// same chunks made forward + backward 1.22-1.27x slower: its bfloat16 kernels lag there).
template <typename T>
bool mkl_weight_grads(const Shape& s) {
  return AT_MKL_ENABLED() && std::is_same_v<T, at::BFloat16> && s.native_gemm && s.brgemm;
}

// Whether they also run frame by frame from the token rows where they lie, with no chunk of
// gathered operands: with tiles of whole ViT-B frames (kFrameWeightGradRows).
template <typename T>
bool frame_weight_grads(const Shape& s) {
  return mkl_weight_grads<T>(s) && s.tile >= kFrameWeightGradRows;
}

// A (B, T, L, C) tensor with channel stride 1, addressed by row.
template <typename T>
struct Rows {
  T* data;
  int64_t stride_b, stride_t, stride_l;
  T* row(int64_t b, int64_t t, int64_t l) const { return data + b * stride_b + t * stride_t + l * stride_l; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "stadapter_cpp: expected a (B, T, L, C) view with channel stride 1");
  return Rows<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Memory for one call. Requests up to kMaxRetainedArenaBytes come from the calling thread's
// arena, kept and reused across calls (grown when a call needs more), one per slot: fresh
// multi-megabyte buffers per call would be new pages, zero-filled by the kernel on first touch,
// every call. Larger requests (long clips, wide models) are allocated for the call and freed
// with the lease, so no thread keeps more than the cap per slot alive between calls.
enum class ArenaSlot { kTileScratch, kWeightGradPartials, kLaidOutWeights, kCount };
constexpr size_t kMaxRetainedArenaBytes = size_t{32} << 20;

class ArenaLease {
 public:
  ArenaLease() = default;
  ArenaLease(ArenaSlot slot, size_t bytes) {
    bytes = round_up_to_alignment(bytes);  // as aligned_alloc requires
    if (bytes > kMaxRetainedArenaBytes) {
      owned_.reset(allocate(bytes));
      data_ = owned_.get();
      return;
    }
    constexpr auto kSlots = static_cast<size_t>(ArenaSlot::kCount);
    thread_local std::array<std::unique_ptr<char, Free>, kSlots> arenas;
    thread_local std::array<size_t, kSlots> capacities{};
    const auto i = static_cast<size_t>(slot);
    if (bytes > capacities[i]) {
      arenas[i].reset(allocate(bytes));
      capacities[i] = bytes;
    }
    data_ = arenas[i].get();
  }
  char* data() const { return data_; }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  static char* allocate(size_t bytes) {
    char* memory = static_cast<char*>(std::aligned_alloc(kArenaAlignment, bytes));
    TORCH_CHECK(memory, "stadapter_cpp: cannot allocate ", bytes, " bytes of scratch");
    return memory;
  }
  std::unique_ptr<char, Free> owned_;
  char* data_ = nullptr;
};

// The B operand (K x N) of GEMMs with a weight, laid out once per call: for brgemm float32
// row-major (the weight itself where it is that already) or 16-bit in VNNI pairs [K/2][N][2], or
// packed by MKL (pack_mkl_weights). One brgemm call takes all N columns (ATen's cpublas::pack makes
// blocks of at most 64, one call each): alone on AMX (196 rows, one thread) 15-17% faster than
// 64-column calls, inside the kernel within noise (0.97-1.03).
struct LaidOutWeight {
  const void* data = nullptr;
  int64_t k = 0, n = 0;
};

// A weight to lay out as a GEMM's B operand: `source` (contiguous, in the GEMM dtype) is K x N, or
// with `transposed` N x K (B = source.T: the forward's x @ W.T).
struct WeightLayout {
  at::Tensor source;
  bool transposed;
  LaidOutWeight* target;

  int64_t k() const { return source.size(transposed ? 1 : 0); }
  int64_t n() const { return source.size(transposed ? 0 : 1); }
  // Float32 taken as it is needs no memory of its own for brgemm.
  bool in_place() const { return !transposed && source.scalar_type() == at::kFloat; }
  size_t bytes() const { return in_place() ? 0 : source.numel() * source.element_size(); }
};

// dst (cols x rows, leading dimension ld_dst) = src (rows x cols, leading dimension ld_src)
// transposed, 32-bit elements, through at::vec's in-register float transposes (shuffles move every
// bit pattern as it is, NaNs included): 16 x 16 blocks on AVX-512, 8 x 8 on AVX2.
void transpose_32bit(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst,
                     int64_t ld_dst) {
  const auto* from = reinterpret_cast<const float*>(src);
  auto* to = reinterpret_cast<float*>(dst);
#if defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float>(from, ld_src, to, ld_dst, static_cast<int>(rows), static_cast<int>(cols));
#else
  constexpr int kBlock = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min<int64_t>(rows, r0 + kBlock), c1 = std::min<int64_t>(cols, c0 + kBlock);
      if (r1 - r0 == kBlock && c1 - c0 == kBlock) {
        at::vec::transpose_mxn<float, kBlock, kBlock>(from + r0 * ld_src + c0, ld_src, to + c0 * ld_dst + r0, ld_dst);
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) to[c * ld_dst + r] = from[r * ld_src + c];
      }
    }
  }
#endif
}

// Columns [n0, n0 + block_n) of a layout. Float32: rows of K x N (a transposed source's rows n
// become its columns). 16-bit: pairs (B[2i][n], B[2i+1][n]) as one 32-bit element at [i][n] (a
// transposed source's row n holds column n's pairs back to back: a 32-bit transpose again; an
// upright source's rows 2i and 2i+1 interleaved).
void lay_out_block(const WeightLayout& l, int64_t n0, int64_t block_n) {
  const int64_t k = l.k(), n = l.n();
  if (l.source.scalar_type() == at::kFloat) {
    const auto* src = static_cast<const uint32_t*>(l.source.const_data_ptr());
    auto* dst = static_cast<uint32_t*>(const_cast<void*>(l.target->data));
    transpose_32bit(src + n0 * k, k, block_n, k, dst + n0, n);  // only transposed float32 gets here
    return;
  }
  auto* dst = static_cast<uint32_t*>(const_cast<void*>(l.target->data)) + n0;
  if (l.transposed) {
    const auto* src = static_cast<const uint32_t*>(l.source.const_data_ptr());
    transpose_32bit(src + n0 * k / 2, k / 2, block_n, k / 2, dst, n);
    return;
  }
  const auto* src = static_cast<const uint16_t*>(l.source.const_data_ptr());
  for (int64_t i = 0; i < k / 2; ++i) {
    const uint16_t* even = src + 2 * i * n + n0;
    const uint16_t* odd = even + n;
    for (int64_t j = 0; j < block_n; ++j) dst[i * n + j] = uint32_t{even[j]} | uint32_t{odd[j]} << 16;
  }
}

// Lays out every weight of `layouts` into memory leased from the calling thread's arena (kept in
// `memory` for the call), in parallel over column blocks: cheap next to a per-call torch transpose
// and pack, which took ~0.4 ms of a 4 ms bf16 forward on a 2-core Xeon.
void lay_out_brgemm_weights(const std::vector<WeightLayout>& layouts, ArenaLease* memory) {
  size_t bytes = 0;
  for (const WeightLayout& l : layouts) bytes += round_up_to_alignment(l.bytes());
  *memory = ArenaLease(ArenaSlot::kLaidOutWeights, bytes);
  std::vector<std::pair<const WeightLayout*, int64_t>> blocks;  // (layout, first column)
  char* next = memory->data();
  for (const WeightLayout& l : layouts) {
    *l.target = LaidOutWeight{l.in_place() ? l.source.const_data_ptr() : next, l.k(), l.n()};
    if (l.in_place()) continue;
    next += round_up_to_alignment(l.bytes());
    for (int64_t n0 = 0; n0 < l.n(); n0 += kBrgemmBlockN) blocks.emplace_back(&l, n0);
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [layout, n0] = blocks[i];
      lay_out_block(*layout, n0, std::min(kBrgemmBlockN, layout->n() - n0));
    }
  });
}

// c (m x b.n float32, leading dimension ldc) = a (m x b.k, leading dimension lda >= b.k) @ b.
template <typename T>
void brgemm_rows(const LaidOutWeight& b, const T* a, int64_t lda, int64_t m, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, b.n, b.k, lda, b.n, ldc, /*add_C=*/false, a, static_cast<const T*>(b.data), c,
                              /*is_vnni=*/!std::is_same_v<T, float>);
}

// Releases the calling thread's brgemm hardware context (AMX tile configuration) on entry and on
// exit. cpublas::brgemm loads its tile configuration only when the micro-kernel differs from the
// one it ran last on this thread, and other code (oneDNN's library GEMMs, another library's
// brgemm) leaves the tiles in its own state: a release makes the next brgemm load its own. Without
// it, on a Xeon with AMX, brgemm -> torch.mm (bf16) -> the same brgemm died of SIGILL.
class BrgemmScope {
 public:
  explicit BrgemmScope(bool vnni) : vnni_(vnni) { release(vnni_); }
  ~BrgemmScope() { release(vnni_); }
  static void release(bool vnni) { at::native::cpublas::brgemm_release(vnni); }

 private:
  bool vnni_;
};

// Packs every float32 weight of `packings` with MKL (cblas_sgemm_pack) for GEMMs of up to `rows`
// rows, where the call's float32 GEMMs with a weight are MKL's (s.mkl_packed): a plain sgemm call
// packs its B anew, and a tile's frame-by-frame GEMMs make one call per frame. On the AMX Xeon, one
// thread, 8 frames of 196 x 768 @ 768 x 384 (or 384 x 768): 0.90-0.93x the time of torch.mm's frame
// by frame, the pack included (~80 us a weight), and bit-identical results for any row count up to
// the one packed for (checked down to 66; MKL leaves the packed buffer unchanged, so threads share
// it). Memory is leased from the calling thread's arena (kept in `memory` for the call); one weight
// per task, each packed by one MKL thread as the tiles' single-threaded GEMMs will read it (MKL asks
// for the same thread count for packing and computing), so the packed bytes do not depend on the
// thread count.
void pack_mkl_weights(const std::vector<WeightLayout>& packings, int64_t rows, ArenaLease* memory) {
#if AT_MKL_ENABLED()
  std::vector<size_t> offsets;
  size_t bytes = 0;
  for (const WeightLayout& w : packings) {
    offsets.push_back(bytes);
    bytes += round_up_to_alignment(cblas_sgemm_pack_get_size(kCblasBMatrix, static_cast<int>(rows),
                                                             static_cast<int>(w.n()), static_cast<int>(w.k())));
  }
  *memory = ArenaLease(ArenaSlot::kLaidOutWeights, bytes);
  at::parallel_for(0, static_cast<int64_t>(packings.size()), 1, [&](int64_t begin, int64_t end) {
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t i = begin; i < end; ++i) {
      const WeightLayout& w = packings[i];
      auto* packed = reinterpret_cast<float*>(memory->data() + offsets[i]);
      cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, w.transposed ? kCblasTranspose : kCblasNoTranspose,
                       static_cast<int>(rows), static_cast<int>(w.n()), static_cast<int>(w.k()), 1.0f,
                       w.source.const_data_ptr<float>(), static_cast<int>(w.source.size(1)), packed);
      *w.target = LaidOutWeight{packed, w.k(), w.n()};
    }
    MKL_Set_Num_Threads_Local(previous);
  });
#else
  TORCH_INTERNAL_ASSERT(false, "stadapter_cpp: packed weights need MKL (see Shape::mkl_packed)");
#endif
}

// c (m x b.n float32, leading dimension ldc) = a (m x b.k float32, leading dimension lda >= b.k) @ b,
// b packed by pack_mkl_weights.
void mkl_packed_rows(const LaidOutWeight& b, const float* a, int64_t lda, int64_t m, float* c, int64_t ldc) {
#if AT_MKL_ENABLED()
  cblas_sgemm_compute(kCblasRowMajor, kCblasNoTranspose, kCblasPacked, static_cast<int>(m), static_cast<int>(b.n),
                      static_cast<int>(b.k), a, static_cast<int>(lda), static_cast<const float*>(b.data),
                      static_cast<int>(b.n), 0.0f, c, static_cast<int>(ldc));
#else
  TORCH_INTERNAL_ASSERT(false, "stadapter_cpp: packed weights need MKL (see Shape::mkl_packed)");
#endif
}

// c = a @ b for float32 rows (as mkl_packed_rows) on a weight laid out for this call's GEMMs: by
// lay_out_brgemm_weights (s.brgemm) or pack_mkl_weights (s.mkl_packed).
void float_rows_times_weight(const Shape& s, const LaidOutWeight& b, const float* a, int64_t lda, int64_t m, float* c,
                             int64_t ldc) {
  if (s.brgemm) return brgemm_rows(b, a, lda, m, c, ldc);
  mkl_packed_rows(b, a, lda, m, c, ldc);
}

// The parameters laid out for the kernels: the GEMMs' weights in the GEMM dtype (float32, or x's
// dtype with native_gemm), everything else float32.
struct Params {
  at::Tensor fc1_weight;  // (Ca, C)
  at::Tensor fc1_weight_wide;  // (Ca, C) float32, for a widened down-projection next to native GEMMs
  at::Tensor row_bias;    // (B, Ca): fc1 bias + cond[b]
  at::Tensor taps;        // (kt, Ca): conv tap j of every channel, contiguous in the channel
  at::Tensor conv_bias;   // (Ca,)
  at::Tensor fc2_weight;  // (C, Ca)
  at::Tensor fc2_bias;    // (C,)
  // brgemm or s.mkl_packed only: the weights as the B operand of y = x @ fc1.T, up = a @ fc2.T, and
  // the backward's da = g @ fc2 and dx = dy @ fc1, laid out for brgemm or packed by MKL.
  LaidOutWeight down, up, up_grad, down_grad;
  ArenaLease weight_memory;  // what they point into (not the float32 weights brgemm takes as they are)
};

Params prepare_params(const Shape& s, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                      const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                      const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                      const std::optional<at::Tensor>& cond, bool backward) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  auto as_gemm = [&](const at::Tensor& t) { return s.native_gemm ? t.contiguous() : as_f32(t); };
  Params p;
  p.fc1_weight = as_gemm(fc1_weight);
  if (s.widened_down) p.fc1_weight_wide = as_f32(fc1_weight);
  p.fc2_weight = as_gemm(fc2_weight);
  if (s.brgemm || s.mkl_packed) {
    std::vector<WeightLayout> layouts{{p.fc1_weight, /*transposed=*/true, &p.down}};
    if (backward) {
      layouts.push_back({p.fc2_weight, /*transposed=*/false, &p.up_grad});
      layouts.push_back({p.fc1_weight, /*transposed=*/false, &p.down_grad});
    } else {
      layouts.push_back({p.fc2_weight, /*transposed=*/true, &p.up});
    }
    if (s.brgemm) {
      lay_out_brgemm_weights(layouts, &p.weight_memory);
    } else {
      pack_mkl_weights(layouts, s.tile, &p.weight_memory);
    }
  }
  p.row_bias = at::zeros({s.batch, s.bottleneck}, f32);
  if (fc1_bias) p.row_bias.add_(fc1_bias->to(at::kFloat));
  if (cond) p.row_bias.add_(cond->to(at::kFloat));
  p.taps = as_f32(conv_weight.reshape({s.bottleneck, s.kernel_t}).t());
  p.conv_bias = conv_bias ? as_f32(*conv_bias) : at::zeros({s.bottleneck}, f32);
  p.fc2_bias = fc2_bias ? as_f32(*fc2_bias) : at::zeros({s.channels}, f32);
  return p;
}

// Makes the calling thread's GEMMs single-threaded while alive: MKL's (float32) and oneDNN's
// (native 16-bit, which parallelises with OpenMP). Inside at::parallel_for's parallel region
// they already run sequentially, but when the work is a single task, at::parallel_for runs it
// inline on the caller, where they would split the GEMMs over the threads
// torch.set_num_threads allows, and a different split can change the last bits.
class SequentialBlas {
 public:
  SequentialBlas() : previous_omp_(omp_get_max_threads()) {
    omp_set_num_threads(1);
#if AT_MKL_ENABLED()
    previous_mkl_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SequentialBlas() {
#if AT_MKL_ENABLED()
    MKL_Set_Num_Threads_Local(previous_mkl_);
#endif
    omp_set_num_threads(previous_omp_);
  }

 private:
  int previous_omp_;
  int previous_mkl_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Blocks: GEMMs through ATen, widening/narrowing rows, vectorised row loops
// ---------------------------------------------------------------------------------------------

// A row-major block as a tensor (no copy).
template <typename T>
at::Tensor block(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// c = alpha * a @ b + beta * c, c row-major with leading dimension ldc and a's dtype; beta = 0
// ignores c's contents.
template <typename T>
void gemm(T* c, int64_t ldc, const at::Tensor& a, const at::Tensor& b, float alpha, float beta) {
  at::Tensor out = block(c, a.size(0), b.size(1), ldc);
  at::addmm_out(out, out, a, b, beta, alpha);
}

// dst = float32(src) for a bfloat16/float16 run. at::vec::convert is a scalar loop in this
// direction (only float32 -> half is vectorised), and widening x and grad_out is on the hot path.
template <typename scalar_t>
void widen(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy_n(src, n, dst);
  } else {
    using HalfVec = at::vec::Vectorized<scalar_t>;  // 2 x kVec elements
    int64_t i = 0;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      const auto [low, high] = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(src + i));
      low.store(dst + i);
      high.store(dst + i + kVec);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// y[r, :] += bias for a (rows x n) contiguous block.
void add_row_bias(float* y, const float* bias, int64_t rows, int64_t n) {
  for (const auto r : c10::irange(rows)) {
    float* row = y + r * n;
    int64_t c = 0;
    for (; c + kVec <= n; c += kVec) (Vec::loadu(row + c) + Vec::loadu(bias + c)).store(row + c);
    for (; c < n; ++c) row[c] += bias[c];
  }
}

// dst[r, :] = float32(src[r, :]) + bias for a (rows x n) contiguous 16-bit block, in one pass.
template <typename scalar_t>
void widen_add_bias(const scalar_t* src, const float* bias, float* dst, int64_t rows, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy_n(src, rows * n, dst);
    add_row_bias(dst, bias, rows, n);
  } else {
    using HalfVec = at::vec::Vectorized<scalar_t>;
    for (const auto r : c10::irange(rows)) {
      const scalar_t* in = src + r * n;
      float* out = dst + r * n;
      int64_t c = 0;
      for (; c + HalfVec::size() <= n; c += HalfVec::size()) {
        const auto [low, high] = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(in + c));
        (low + Vec::loadu(bias + c)).store(out + c);
        (high + Vec::loadu(bias + c + kVec)).store(out + c + kVec);
      }
      for (; c < n; ++c) out[c] = static_cast<float>(in[c]) + bias[c];
    }
  }
}

// The rows as float32: the source itself for float32, else widened into `buffer` (ld = cols).
template <typename scalar_t>
const float* widen_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, float* buffer,
                        int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld_out = ld;
    return src;
  } else {
    for (const auto r : c10::irange(rows)) widen(src + r * ld, buffer + r * cols, cols);
    *ld_out = cols;
    return buffer;
  }
}

// dst = residual + scale * (u + bias) for one row of n channels (no residual: scale * (u + bias)),
// u a float32 (MKL, brgemm) or 16-bit (oneDNN) GEMM result: one pass, float32 arithmetic, one
// rounding to a 16-bit dst. This row loop is the forward's largest element-wise cost.
template <typename scalar_t, typename U>
void residual_row(scalar_t* dst, const scalar_t* residual, const U* u_row, const float* bias, float scale,
                  int64_t n) {
  const Vec vscale(scale), zero(0.0f);
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    static_assert(std::is_same_v<U, float>, "float32 calls have float32 GEMM results");
    for (; c + kVec <= n; c += kVec) {
      const Vec u = bias ? Vec::loadu(u_row + c) + Vec::loadu(bias + c) : Vec::loadu(u_row + c);
      at::vec::fmadd(vscale, u, residual ? Vec::loadu(residual + c) : zero).store(dst + c);
    }
  } else {
    using HalfVec = at::vec::Vectorized<scalar_t>;  // 2 x kVec elements
    for (; c + HalfVec::size() <= n; c += HalfVec::size()) {
      Vec u0, u1, r0 = zero, r1 = zero;
      if constexpr (std::is_same_v<U, float>) {
        u0 = Vec::loadu(u_row + c);
        u1 = Vec::loadu(u_row + c + kVec);
      } else {
        std::tie(u0, u1) = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(u_row + c));
      }
      if (bias) {
        u0 = u0 + Vec::loadu(bias + c);
        u1 = u1 + Vec::loadu(bias + c + kVec);
      }
      if (residual) std::tie(r0, r1) = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(residual + c));
      at::vec::convert_from_float<scalar_t>(at::vec::fmadd(vscale, u0, r0), at::vec::fmadd(vscale, u1, r1))
          .store(dst + c);
    }
  }
  for (; c < n; ++c) {
    const float u = static_cast<float>(u_row[c]) + (bias ? bias[c] : 0.0f);
    dst[c] = static_cast<scalar_t>((residual ? static_cast<float>(residual[c]) : 0.0f) + scale * u);
  }
}

template <typename scalar_t>
void copy_rows(scalar_t* dst, int64_t dst_ld, const scalar_t* src, int64_t src_ld, int64_t rows, int64_t cols) {
  for (const auto r : c10::irange(rows)) std::copy_n(src + r * src_ld, cols, dst + r * dst_ld);
}

// acc[c] += alpha * sum_r m[r, c], rows summed in order, 16-bit rows widened in registers; with
// `copy`, the rows are also copied there (rows x cols, contiguous) in the same pass.
template <typename T>
void add_column_sums(float* acc, const T* m, int64_t ld, int64_t rows, int64_t cols, float alpha,
                     T* copy = nullptr) {
  const Vec valpha(alpha);
  for (const auto r : c10::irange(rows)) {
    const T* row = m + r * ld;
    T* copy_row = copy ? copy + r * cols : nullptr;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; c + kVec <= cols; c += kVec) {
        const Vec v = Vec::loadu(row + c);
        if (copy_row) v.store(copy_row + c);
        at::vec::fmadd(valpha, v, Vec::loadu(acc + c)).store(acc + c);
      }
    } else {
      using HalfVec = at::vec::Vectorized<T>;
      for (; c + HalfVec::size() <= cols; c += HalfVec::size()) {
        const HalfVec h = HalfVec::loadu(row + c);
        if (copy_row) h.store(copy_row + c);
        const auto [low, high] = at::vec::convert_to_float<T>(h);
        at::vec::fmadd(valpha, low, Vec::loadu(acc + c)).store(acc + c);
        at::vec::fmadd(valpha, high, Vec::loadu(acc + c + kVec)).store(acc + c + kVec);
      }
    }
    for (; c < cols; ++c) {
      if (copy_row) copy_row[c] = row[c];
      acc[c] += alpha * static_cast<float>(row[c]);
    }
  }
}

// The ring block of each tap j in [j_lo, j_hi), at frame frame_of(j), resolved once per frame:
// the ring slot is a modulo, far too slow for the channel loops.
template <typename T, typename FrameOf>
c10::SmallVector<T*, 8> ring_blocks(const Shape& s, T* ring, bool ring_is_y, int64_t j_lo, int64_t j_hi,
                                    FrameOf frame_of) {
  c10::SmallVector<T*, 8> blocks;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    const int64_t frame = frame_of(j);
    blocks.push_back(ring + (ring_is_y ? s.y_slot(frame) : s.dz_slot(frame)) * s.tile * s.bottleneck);
  }
  return blocks;
}

// What the backward adds to conv_activation's pass over a frame, while the window is in registers
// and L1: dz = da_scale * da * act'(z) (brgemm leaves the scale of d_up to this pass), and the conv
// gradients d_conv[j] += dz * y[t + j - half] and d_conv[kt] += dz (the bias), rows summed in order.
struct ConvBackward {
  const float* da;  // (rows x Ca), times da_scale
  float da_scale;
  float* dz;        // (rows x Ca)
  float* d_conv;    // (kt + 1) x Ca
};

// The window of frame t: z = conv_bias + sum_j taps[j] * y[t + j - half] (zero padding in T),
// a = act(z) (float32, or rounded to 16 bits through `row_scratch`, Ca floats), and with
// `backward` its gradients (see ConvBackward). With `row_bias` (s.bias_in_conv), y is the ring's
// plus row_bias, added here as the down-projection would have: the same float32 sums.
template <Activation A, typename OutT>
void conv_activation(const Shape& s, const Params& p, const float* ring_y, int64_t t, int64_t rows, OutT* a,
                     const ConvBackward* backward, float* row_scratch, const float* row_bias = nullptr) {
  const int64_t ca = s.bottleneck;
  const float* taps = p.taps.data_ptr<float>();
  const float* bias = p.conv_bias.data_ptr<float>();
  const auto [j_lo, j_hi] = s.taps_in_clip(t);
  const auto window = ring_blocks(s, ring_y, /*ring_is_y=*/true, j_lo, j_hi, [&](int64_t j) { return t + j - s.half; });
  const Vec da_scale(backward ? backward->da_scale : 1.0f);  // times 1 is exact: no other path changes
  for (const auto r : c10::irange(rows)) {
    float* a_row = row_scratch;
    if constexpr (std::is_same_v<OutT, float>) a_row = a + r * ca;
    for (int64_t c = 0; c < ca; c += kVec) {
      const int64_t n = std::min(kVec, ca - c);
      Vec z = Vec::loadu(bias + c, n);
      if (row_bias) {
        const Vec shift = Vec::loadu(row_bias + c, n);
        for (int64_t j = j_lo; j < j_hi; ++j) {
          z = at::vec::fmadd(Vec::loadu(taps + j * ca + c, n), Vec::loadu(window[j - j_lo] + r * ca + c, n) + shift, z);
        }
      } else {
        for (int64_t j = j_lo; j < j_hi; ++j) {
          z = at::vec::fmadd(Vec::loadu(taps + j * ca + c, n), Vec::loadu(window[j - j_lo] + r * ca + c, n), z);
        }
      }
      if (!backward) {
        activate<A>(z, nullptr).store(a_row + c, n);
        continue;
      }
      Vec derivative;
      activate<A>(z, &derivative).store(a_row + c, n);
      const Vec dz = Vec::loadu(backward->da + r * ca + c, n) * da_scale * derivative;
      dz.store(backward->dz + r * ca + c, n);
      for (int64_t j = j_lo; j < j_hi; ++j) {
        float* acc = backward->d_conv + j * ca + c;
        at::vec::fmadd(dz, Vec::loadu(window[j - j_lo] + r * ca + c, n), Vec::loadu(acc, n)).store(acc, n);
      }
      float* bias_acc = backward->d_conv + s.kernel_t * ca + c;
      (Vec::loadu(bias_acc, n) + dz).store(bias_acc, n);
    }
    if constexpr (!std::is_same_v<OutT, float>) at::vec::convert(row_scratch, a + r * ca, ca);
  }
}

// Per-thread scratch of one tile, carved out of the thread's arena (uninitialised): the kt-frame
// rings and per-frame blocks in float32, and with native_gemm the 16-bit GEMM operands and results.
template <typename scalar_t>
struct Scratch {
  float *ring_y = nullptr, *ring_dz = nullptr, *a = nullptr, *bottleneck_grad = nullptr;
  float *wide_x = nullptr, *wide_g = nullptr, *wide_out = nullptr, *row_u = nullptr;
  // native_gemm only: a GEMM's 16-bit result (with brgemm: token rows copied for a call) and the
  // 16-bit bottleneck operand of the forward's up-projection (s.up_frames frames).
  scalar_t *narrow_out = nullptr, *narrow_a = nullptr;
  // native_gemm backward only: the weight-gradient operands of a chunk of frames (rows ordered by
  // frame, then patch), and their 16-bit product (none with mkl_weight_grads).
  scalar_t *frames_g = nullptr, *frames_a = nullptr, *frames_x = nullptr, *frames_dy = nullptr;
  scalar_t* weight_grad = nullptr;

  Scratch(const Shape& s, bool backward) {
    lease_ = ArenaLease(ArenaSlot::kTileScratch, carve(s, backward, 0));  // a dry run from 0 measures it
    carve(s, backward, reinterpret_cast<uintptr_t>(lease_.data()));
  }

 private:
  ArenaLease lease_;

  // Points every needed buffer into [base, base + returned size); the rest stay null.
  size_t carve(const Shape& s, bool backward, uintptr_t base) {
    uintptr_t next = base;
    auto take = [&](auto*& buffer, int64_t count) {
      using T = std::remove_reference_t<decltype(*buffer)>;
      next = round_up_to_alignment(next);
      buffer = reinterpret_cast<T*>(next);
      next += count * sizeof(T);
    };
    const int64_t tile_ca = s.tile * s.bottleneck, tile_c = s.tile * s.channels;
    take(ring_y, s.ring_frames * tile_ca);
    take(row_u, std::max(s.channels, s.bottleneck));
    if (!s.native_gemm) take(a, s.up_frames * tile_ca);
    if (!s.native_gemm || s.brgemm) take(wide_out, tile_c);
    if (!s.native_gemm || s.widened_down) take(wide_x, tile_c);
    if (backward) {
      take(ring_dz, s.kernel_t * tile_ca);
      take(bottleneck_grad, tile_ca);
      if (!s.native_gemm) take(wide_g, tile_c);
    }
    if (s.native_gemm) {
      const int64_t down_rows = (s.down_frames - 1) * s.tokens + s.tile;
      // brgemm: rows copied for a call (see non_overlapping_rows); else the library GEMMs' results
      take(narrow_out, s.brgemm ? tile_c : std::max({tile_c, down_rows * s.bottleneck, s.up_frames * tile_c}));
      take(narrow_a, s.up_frames * tile_ca);
    }
    if (s.native_gemm && backward && !frame_weight_grads<scalar_t>(s)) {
      take(frames_g, s.grad_chunk * tile_c);
      take(frames_x, s.grad_chunk * tile_c);
      take(frames_a, s.grad_chunk * tile_ca);
      take(frames_dy, s.grad_chunk * tile_ca);
      if (!mkl_weight_grads<scalar_t>(s)) take(weight_grad, s.channels * s.bottleneck);
    }
    return next - base;
  }
};

// Token rows of x or grad_out as a GEMM operand: as they are with native_gemm, else widened to
// float32 (into `buffer`, unless they already are float32).
template <typename scalar_t>
at::Tensor rows_operand(const Shape& s, const scalar_t* src, int64_t ld, int64_t rows, float* buffer) {
  if (s.native_gemm) return block(src, rows, s.channels, ld);
  int64_t ld_out = 0;
  const float* wide = widen_rows(src, ld, rows, s.channels, buffer, &ld_out);
  return block(wide, rows, s.channels, ld_out);
}

// A float32 (rows x Ca) bottleneck block as a GEMM operand: itself, or with native_gemm rounded
// into `narrow`.
template <typename scalar_t>
at::Tensor bottleneck_operand(const Shape& s, const float* src, int64_t rows, scalar_t* narrow) {
  if (!s.native_gemm) return block(src, rows, s.bottleneck, s.bottleneck);
  at::vec::convert(src, narrow, rows * s.bottleneck);
  return block(narrow, rows, s.bottleneck, s.bottleneck);
}

// dst (float32, row-major, leading dimension n = b's columns) = alpha * a @ b, whatever the
// operands' dtype: a 16-bit product goes through w.narrow_out and is widened.
template <typename scalar_t>
void gemm_to_float(float* dst, const at::Tensor& a, const at::Tensor& b, float alpha, Scratch<scalar_t>& w) {
  const int64_t n = b.size(1);
  if (a.scalar_type() == at::kFloat) return gemm(dst, n, a, b, alpha, 0.0f);
  gemm(w.narrow_out, n, a, b, alpha, 0.0f);
  widen(w.narrow_out, dst, a.size(0) * n);
}

// acc (float32) = or += the 16-bit block src, n elements.
template <typename scalar_t>
void accumulate_widened(float* acc, const scalar_t* src, int64_t n, bool assign) {
  if (assign) return widen(src, acc, n);
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, float>) {
    using HalfVec = at::vec::Vectorized<scalar_t>;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      const auto [low, high] = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(src + i));
      (Vec::loadu(acc + i) + low).store(acc + i);
      (Vec::loadu(acc + i + kVec) + high).store(acc + i + kVec);
    }
  }
  for (; i < n; ++i) acc[i] += static_cast<float>(src[i]);
}

// dst[b, t, l0 + r] = residual[b, t, l0 + r] + scale * (u[r] + bias) for the tile's rows, u a
// (rows x C) float32 or 16-bit GEMM result; without s.residual, scale * (u[r] + bias).
template <typename scalar_t, typename U>
void residual_rows(const Shape& s, const Rows<scalar_t>& dst, const Rows<const scalar_t>& residual, int64_t b,
                   int64_t t, int64_t l0, int64_t rows, const U* u, const float* bias, float scale) {
  for (const auto r : c10::irange(rows)) {
    residual_row(dst.row(b, t, l0 + r), s.residual ? residual.row(b, t, l0 + r) : nullptr, u + r * s.channels, bias,
                 scale, s.channels);
  }
}

// The prefix rows of frame t: the residual's (x for out, grad_out for dx), or zero without s.residual.
template <typename scalar_t>
void prefix_rows(const Shape& s, const Rows<scalar_t>& dst, const Rows<const scalar_t>& residual, int64_t b,
                 int64_t t) {
  for (const auto l : c10::irange(s.prefix)) {
    scalar_t* row = dst.row(b, t, l);
    if (s.residual) {
      std::copy_n(residual.row(b, t, l), s.channels, row);
    } else {
      std::fill_n(row, s.channels, scalar_t(0));
    }
  }
}

// Token rows `ld` apart as the A operand of a GEMM on a laid-out weight (brgemm, MKL's packed GEMM),
// whose rows must not overlap: the rows themselves, else (grad_out of a broadcast has row stride 0)
// copied into `buffer` (rows x cols).
template <typename T>
const T* non_overlapping_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, T* buffer, int64_t* ld_out) {
  if (ld >= cols) {
    *ld_out = ld;
    return src;
  }
  for (const auto r : c10::irange(rows)) std::copy_n(src + r * ld, cols, buffer + r * cols);
  *ld_out = cols;
  return buffer;
}

// c (rows x b.n float32, contiguous) = the token rows (ld apart) @ b, laid out for this call: 16-bit
// rows as they are with native_gemm (brgemm), else as float32 (widened into `wide`, which also
// takes float32 rows that overlap; brgemm or MKL's packed GEMM).
template <typename scalar_t>
void token_rows_times_weight(const Shape& s, const LaidOutWeight& b, const scalar_t* src, int64_t ld, int64_t rows,
                             float* c, float* wide, scalar_t* narrow) {
  int64_t lda = 0;
  if (s.native_gemm) {
    const scalar_t* operand = non_overlapping_rows(src, ld, rows, s.channels, narrow, &lda);  // sets lda first
    brgemm_rows(b, operand, lda, rows, c, b.n);
    return;
  }
  const float* rows_f32 = widen_rows(src, ld, rows, s.channels, wide, &lda);
  rows_f32 = non_overlapping_rows(rows_f32, lda, rows, s.channels, wide, &lda);
  float_rows_times_weight(s, b, rows_f32, lda, rows, c, b.n);
}

// y[f] = x[b, f, tile] @ fc1_weight.T + row_bias[b] into the ring slot of each frame f in [f0, f1):
// on a laid-out weight (brgemm, MKL's packed GEMM), one call per frame; else with several frames (s.down_frames > 1: frames back to
// back), one GEMM over their rows from the first patch of f0 to the last of f1 - 1, the prefix rows
// between frames included and dropped.
template <typename scalar_t>
void down_projection(const Shape& s, const Params& p, const Rows<const scalar_t>& x, int64_t b, int64_t f0,
                     int64_t f1, int64_t l0, int64_t rows, Scratch<scalar_t>& w) {
  const int64_t ca = s.bottleneck;
  const float* bias = p.row_bias.data_ptr<float>() + b * ca;
  if (s.brgemm || s.mkl_packed) {  // the float32 result is the ring slot
    for (int64_t f = f0; f < f1; ++f) {
      float* y = w.ring_y + s.y_slot(f) * s.tile * ca;
      token_rows_times_weight(s, p.down, x.row(b, f, l0), x.stride_l, rows, y, w.wide_x, w.narrow_out);
      if (!s.bias_in_conv) add_row_bias(y, bias, rows, ca);
    }
    return;
  }
  if (s.native_gemm && !s.widened_down) {
    const int64_t gemm_rows = (f1 - f0 - 1) * s.tokens + rows;
    gemm(w.narrow_out, ca, block(x.row(b, f0, l0), gemm_rows, s.channels, x.stride_l), p.fc1_weight.t(), 1.0f,
         0.0f);
    for (int64_t f = f0; f < f1; ++f) {
      widen_add_bias(w.narrow_out + (f - f0) * s.tokens * ca, bias, w.ring_y + s.y_slot(f) * s.tile * ca, rows, ca);
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(f1 == f0 + 1, "stadapter_cpp: float32 GEMMs take one frame at a time");
  float* y = w.ring_y + s.y_slot(f0) * s.tile * ca;
  int64_t ld = 0;
  const float* wide = widen_rows(x.row(b, f0, l0), x.stride_l, rows, s.channels, w.wide_x, &ld);
  const at::Tensor& weight = s.widened_down ? p.fc1_weight_wide : p.fc1_weight;
  gemm(y, ca, block(wide, rows, s.channels, ld), weight.t(), 1.0f, 0.0f);
  if (!s.bias_in_conv) add_row_bias(y, bias, rows, ca);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Output frames [t0, t1) of one tile. The ring starts kt//2 frames before t0, so a run of
// frames computes exactly what a run over all T frames computes for them: the same GEMM rows
// (grouped into other multi-frame GEMMs, whose rows do not depend on each other, see the top of
// this file), the same conv terms. That makes the split of T free to follow the thread count
// without changing a bit of the output.
template <typename scalar_t, Activation A>
void forward_tile(const Shape& s, const Params& p, const Rows<const scalar_t>& x, const Rows<scalar_t>& out,
                  float scale, int64_t tile_index, int64_t t0, int64_t t1, Scratch<scalar_t>& w) {
  const int64_t b = s.video_of(tile_index), p0 = s.first_patch(tile_index), rows = s.rows_of(tile_index);
  const int64_t l0 = s.prefix + p0, ca = s.bottleneck, c_dim = s.channels;
  const float* up_bias = p.fc2_bias.data_ptr<float>();
  const float* row_bias = s.bias_in_conv ? p.row_bias.data_ptr<float>() + b * ca : nullptr;
  const int64_t first = std::max<int64_t>(0, t0 - s.half), last = std::min(s.frames, t1 + s.half);
  int64_t projected = first;  // frames [first, projected) are in the ring
  int64_t up_first = t0;      // frames [up_first, t] wait (in narrow_a, or a) for their up-projection
  // Step `step` makes sure frame `step` is projected down (with down_frames - 1 frames ahead) and
  // finishes frame `step - half`, whose window is complete.
  for (int64_t step = first; step < t1 + s.half; ++step) {
    if (step < last && step == projected) {
      projected = std::min(last, step + s.down_frames);
      down_projection(s, p, x, b, step, projected, l0, rows, w);
    }
    const int64_t t = step - s.half;
    if (t < t0) continue;
    const bool up_projects = t - up_first + 1 == s.up_frames || t == t1 - 1;  // the waiting frames' turn
    if (s.brgemm) {  // one call per frame, its float32 accumulator straight to the residual pass
      auto waiting_frames = [&](auto* a) {
        conv_activation<A>(s, p, w.ring_y, t, rows, a + (t - up_first) * rows * ca, nullptr, w.row_u, row_bias);
        for (int64_t f = up_first; up_projects && f <= t; ++f) {
          for (int64_t r0 = 0; r0 < rows; r0 += kBrgemmUpRows) {  // each block's result read while in cache
            const int64_t m = std::min(kBrgemmUpRows, rows - r0);
            brgemm_rows(p.up, a + ((f - up_first) * rows + r0) * ca, ca, m, w.wide_out, c_dim);
            residual_rows(s, out, x, b, f, l0 + r0, m, w.wide_out, up_bias, scale);
          }
        }
      };
      if (s.native_gemm) {
        waiting_frames(w.narrow_a);
      } else {
        waiting_frames(w.a);
      }
      if (up_projects) up_first = t + 1;
    } else if (s.native_gemm) {
      conv_activation<A>(s, p, w.ring_y, t, rows, w.narrow_a + (t - up_first) * rows * ca, nullptr, w.row_u);
      if (up_projects) {  // one GEMM for the waiting frames
        const int64_t count = t - up_first + 1;
        gemm(w.narrow_out, c_dim, block(w.narrow_a, count * rows, ca, ca), p.fc2_weight.t(), 1.0f, 0.0f);
        for (int64_t f = up_first; f <= t; ++f) {
          residual_rows(s, out, x, b, f, l0, rows, w.narrow_out + (f - up_first) * rows * c_dim, up_bias, scale);
        }
        up_first = t + 1;
      }
    } else {
      conv_activation<A>(s, p, w.ring_y, t, rows, w.a, nullptr, w.row_u, row_bias);
      if (s.mkl_packed) {
        mkl_packed_rows(p.up, w.a, ca, rows, w.wide_out, c_dim);
      } else {
        gemm(w.wide_out, c_dim, block(w.a, rows, ca, ca), p.fc2_weight.t(), 1.0f, 0.0f);
      }
      residual_rows(s, out, x, b, t, l0, rows, w.wide_out, up_bias, scale);
    }
    if (p0 == 0) prefix_rows(s, out, x, b, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// d_weight (float32, m x n) = (assign) or += alpha * lhs.T @ rhs over k bfloat16 token rows, lhs
// (k x m) and rhs (k x n) rows ld_lhs and ld_rhs apart (one frame's where they lie, or a gathered
// chunk), through MKL's GEMM with a float32 result straight into d_weight (see mkl_weight_grads). On
// the AMX Xeon, one thread, 768 x 384 over 8 frames of 196 rows: 0.75-0.8x the time of oneDNN's over
// the chunk into bfloat16 (whose product then still needs adding), and frame by frame as fast as one
// call over the chunk; in the kernel, with no chunks to gather, forward + backward take 0.96-0.98x the
// time of oneDNN's chunks (same build, path forced, each candidate after the same cache-evicting
// GEMMs, both orders).
template <typename scalar_t>
void add_weight_grad_rows(float* d_weight, const scalar_t* lhs, int64_t ld_lhs, int64_t m, const scalar_t* rhs,
                          int64_t ld_rhs, int64_t n, int64_t k, float alpha, bool assign) {
#if AT_MKL_ENABLED()
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    BrgemmScope::release(/*vnni=*/true);  // MKL's GEMM takes the tiles (see BrgemmScope)
    cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasTranspose, kCblasNoTranspose, static_cast<int>(m), static_cast<int>(n),
                           static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(lhs), static_cast<int>(ld_lhs),
                           reinterpret_cast<const uint16_t*>(rhs), static_cast<int>(ld_rhs), assign ? 0.0f : 1.0f,
                           d_weight, static_cast<int>(n));
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "stadapter_cpp: MKL's weight-gradient GEMM takes bfloat16 only (see mkl_weight_grads)");
}

// d_weight (float32, m x n) = (assign) or += alpha * lhs.T @ rhs over k gathered 16-bit rows,
// lhs (k x m) and rhs (k x n): with mkl_weight_grads through add_weight_grad_rows, else through one
// rounded product per chunk (`product`, m x n). Either way partial sums over chunks are never rounded.
template <typename scalar_t>
void add_weight_grad(const Shape& s, float* d_weight, const scalar_t* lhs, int64_t m, const scalar_t* rhs, int64_t n,
                     int64_t k, float alpha, bool assign, scalar_t* product) {
  if (mkl_weight_grads<scalar_t>(s)) return add_weight_grad_rows(d_weight, lhs, m, m, rhs, n, n, k, alpha, assign);
  if (s.brgemm) BrgemmScope::release(/*vnni=*/true);  // oneDNN's GEMM takes the tiles (see BrgemmScope)
  gemm(product, n, block(lhs, k, m, m).t(), block(rhs, k, n, n), alpha, 0.0f);
  accumulate_widened(d_weight, product, m * n, assign);
}

// Float32 accumulators of one reduction group (matrices) and of one tile (vectors).
struct GradPartials {
  at::Tensor fc1_weight;  // (groups, Ca, C)
  at::Tensor fc2_weight;  // (groups, C, Ca)
  at::Tensor fc2_bias;    // (tiles, C)
  at::Tensor conv;        // (tiles, kt + 1, Ca): taps, then the bias
  at::Tensor bottleneck;  // (tiles, Ca): column sums of dy, for fc1 bias and cond
};

template <typename scalar_t, Activation A>
void backward_tile(const Shape& s, const Params& p, const Rows<const scalar_t>& x, const Rows<const scalar_t>& g,
                   const Rows<scalar_t>& dx, float scale, int64_t tile_index, int64_t group, bool first_in_group,
                   GradPartials& partials, Scratch<scalar_t>& w) {
  const int64_t b = s.video_of(tile_index), p0 = s.first_patch(tile_index), rows = s.rows_of(tile_index);
  const int64_t l0 = s.prefix + p0, ca = s.bottleneck, c_dim = s.channels, slot_size = s.tile * ca;
  float* d_fc1_weight = partials.fc1_weight[group].data_ptr<float>();
  float* d_fc2_weight = partials.fc2_weight[group].data_ptr<float>();
  float* d_fc2_bias = partials.fc2_bias[tile_index].data_ptr<float>();
  float* d_conv = partials.conv[tile_index].data_ptr<float>();
  float* d_bottleneck = partials.bottleneck[tile_index].data_ptr<float>();
  const float* taps = p.taps.data_ptr<float>();
  bool first_fc2 = first_in_group, first_fc1 = first_in_group;
  const bool frame_grads = frame_weight_grads<scalar_t>(s);  // else native: over gathered chunks

  // Step `step`: down-project frame `step`; take frame t = step - half through the conv,
  // activation and up-projection gradients (its y window is complete); take frame
  // u = step - 2 half through the conv-input gradient (its dz window is complete) and fc1.
  for (int64_t step = 0; step < s.frames + 2 * s.half; ++step) {
    if (step < s.frames) down_projection(s, p, x, b, step, step + 1, l0, rows, w);

    const int64_t t = step - s.half;
    if (t >= 0 && t < s.frames) {
      const scalar_t* g_rows = g.row(b, t, l0);
      const int64_t t_in_chunk = t % s.grad_chunk;
      // d_up = scale * g: d fc2_bias += sum d_up, da = d_up @ fc2_weight, d fc2_weight += d_up.T @ a.
      at::Tensor g_block;  // g as the GEMMs' operand: the rows, their native-path copy, or widened
      if (frame_grads) {  // the rows for da and d fc2_weight, copied only where they overlap
        add_column_sums(d_fc2_bias, g_rows, g.stride_l, rows, c_dim, scale);
        int64_t ld = 0;
        const scalar_t* operand = non_overlapping_rows(g_rows, g.stride_l, rows, c_dim, w.narrow_out, &ld);  // sets ld first
        g_block = block(operand, rows, c_dim, ld);
      } else if (s.native_gemm) {
        // g gathered for d fc2_weight (and brgemm's da) in the column-sum pass.
        scalar_t* gathered = w.frames_g + t_in_chunk * rows * c_dim;
        add_column_sums(d_fc2_bias, g_rows, g.stride_l, rows, c_dim, scale, gathered);
        g_block = s.brgemm ? block(gathered, rows, c_dim, c_dim) : block(g_rows, rows, c_dim, g.stride_l);
      } else {
        g_block = rows_operand(s, g_rows, g.stride_l, rows, w.wide_g);
        add_column_sums(d_fc2_bias, g_block.data_ptr<float>(), g_block.stride(0), rows, c_dim, scale);
      }
      float da_scale = 1.0f;
      if (s.brgemm || s.mkl_packed) {  // the float32 result is da; the scale is applied where dz reads it
        if (s.native_gemm) {
          brgemm_rows(p.up_grad, g_block.const_data_ptr<scalar_t>(), g_block.stride(0), rows, w.bottleneck_grad, ca);
        } else {
          int64_t ld = 0;
          const float* rows_f32 =
              non_overlapping_rows(g_block.const_data_ptr<float>(), g_block.stride(0), rows, c_dim, w.wide_g, &ld);
          float_rows_times_weight(s, p.up_grad, rows_f32, ld, rows, w.bottleneck_grad, ca);
        }
        da_scale = scale;
      } else {
        gemm_to_float(w.bottleneck_grad, g_block, p.fc2_weight, scale, w);
      }
      // dz (kept in the ring for the conv-input gradient) and the conv gradients, with a.
      const ConvBackward conv_backward{w.bottleneck_grad, da_scale, w.ring_dz + s.dz_slot(t) * slot_size, d_conv};
      if (frame_grads) {
        conv_activation<A>(s, p, w.ring_y, t, rows, w.narrow_a, &conv_backward, w.row_u);
        add_weight_grad_rows(d_fc2_weight, g_block.const_data_ptr<scalar_t>(), g_block.stride(0), c_dim, w.narrow_a,
                             ca, ca, rows, scale, first_fc2);
        first_fc2 = false;
      } else if (s.native_gemm) {  // d fc2_weight waits for the chunk's last frame
        conv_activation<A>(s, p, w.ring_y, t, rows, w.frames_a + t_in_chunk * rows * ca, &conv_backward, w.row_u);
        if (s.ends_grad_chunk(t)) {
          add_weight_grad(s, d_fc2_weight, w.frames_g, c_dim, w.frames_a, ca, (t_in_chunk + 1) * rows, scale,
                          first_fc2, w.weight_grad);
          first_fc2 = false;
        }
      } else {
        conv_activation<A>(s, p, w.ring_y, t, rows, w.a, &conv_backward, w.row_u);
        gemm(d_fc2_weight, ca, g_block.t(), block(w.a, rows, ca, ca), scale, first_fc2 ? 0.0f : 1.0f);
        first_fc2 = false;
      }
    }

    const int64_t u = step - 2 * s.half;
    if (u >= 0) {
      // dy[u] = sum_j taps[j] * dz[u - j + half].
      const int64_t u_in_chunk = u % s.grad_chunk;
      float* dy = w.bottleneck_grad;
      const int64_t j_lo = std::max<int64_t>(0, u + s.half - (s.frames - 1));
      const int64_t j_hi = std::min(s.kernel_t, u + s.half + 1);
      const auto window = ring_blocks(s, static_cast<const float*>(w.ring_dz), /*ring_is_y=*/false, j_lo, j_hi,
                                      [&](int64_t j) { return u - j + s.half; });
      for (const auto r : c10::irange(rows)) {
        for (int64_t c = 0; c < ca; c += kVec) {
          const int64_t n = std::min(kVec, ca - c);
          Vec acc(0.0f);
          for (int64_t j = j_lo; j < j_hi; ++j) {
            acc = at::vec::fmadd(Vec::loadu(taps + j * ca + c, n), Vec::loadu(window[j - j_lo] + r * ca + c, n), acc);
          }
          acc.store(dy + r * ca + c, n);
        }
      }
      add_column_sums(d_bottleneck, dy, ca, rows, ca, 1.0f);
      const scalar_t* x_rows = x.row(b, u, l0);
      const at::Tensor dy_block = bottleneck_operand(
          s, dy, rows, frame_grads ? w.narrow_a : s.native_gemm ? w.frames_dy + u_in_chunk * rows * ca : nullptr);
      if (frame_grads) {  // x's rows, copied only where they overlap
        int64_t ld = 0;
        const scalar_t* x_operand = non_overlapping_rows(x_rows, x.stride_l, rows, c_dim, w.narrow_out, &ld);
        add_weight_grad_rows(d_fc1_weight, dy_block.const_data_ptr<scalar_t>(), ca, ca, x_operand, ld, c_dim, rows,
                             1.0f, first_fc1);
        first_fc1 = false;
      } else if (s.native_gemm) {  // d fc1_weight waits for the chunk's last frame
        copy_rows(w.frames_x + u_in_chunk * rows * c_dim, c_dim, x_rows, x.stride_l, rows, c_dim);
      } else {
        const at::Tensor x_block = rows_operand(s, x_rows, x.stride_l, rows, w.wide_x);
        gemm(d_fc1_weight, c_dim, dy_block.t(), x_block, 1.0f, first_fc1 ? 0.0f : 1.0f);
        first_fc1 = false;
      }
      // dx = g + dy @ fc1_weight (without s.residual, no g), the residual fused into the epilogue.
      if (s.brgemm || s.mkl_packed) {
        if (s.native_gemm) {
          brgemm_rows(p.down_grad, dy_block.const_data_ptr<scalar_t>(), ca, rows, w.wide_out, c_dim);
        } else {
          float_rows_times_weight(s, p.down_grad, dy, ca, rows, w.wide_out, c_dim);
        }
        residual_rows(s, dx, g, b, u, l0, rows, w.wide_out, nullptr, 1.0f);
      } else if (s.native_gemm) {
        gemm(w.narrow_out, c_dim, dy_block, p.fc1_weight, 1.0f, 0.0f);
        residual_rows(s, dx, g, b, u, l0, rows, w.narrow_out, nullptr, 1.0f);
      } else {
        gemm(w.wide_out, c_dim, dy_block, p.fc1_weight, 1.0f, 0.0f);
        residual_rows(s, dx, g, b, u, l0, rows, w.wide_out, nullptr, 1.0f);
      }
      if (p0 == 0) prefix_rows(s, dx, g, b, u);
      if (s.native_gemm && !frame_grads && s.ends_grad_chunk(u)) {
        add_weight_grad(s, d_fc1_weight, w.frames_dy, ca, w.frames_x, c_dim, (u_in_chunk + 1) * rows, 1.0f,
                        first_fc1, w.weight_grad);
        first_fc1 = false;
      }
    }
  }
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "stadapter_cpp: unsupported dtype ", dtype, " (float32, bfloat16, float16)");
  }
}

// The sum over the leading (group) dimension, groups added in order, in dtype: parallel over
// elements, each run summed in a float32 block on the stack and rounded once.
at::Tensor sum_partials(const at::Tensor& partials, int64_t groups, at::ScalarType dtype) {
  constexpr int64_t kBlock = 1024;
  const int64_t numel = partials[0].numel();
  at::Tensor total = at::empty(partials.sizes().slice(1), partials.options().dtype(dtype));
  const float* src = partials.data_ptr<float>();
  dispatch_dtype(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* dst = total.data_ptr<scalar_t>();
    at::parallel_for(0, numel, 4 * kBlock, [&](int64_t begin, int64_t end) {
      alignas(kArenaAlignment) float acc[kBlock];
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t n = std::min(kBlock, end - i0);
        std::copy_n(src + i0, n, acc);
        for (int64_t gi = 1; gi < groups; ++gi) {
          const float* part = src + gi * numel + i0;
          int64_t i = 0;
          for (; i + kVec <= n; i += kVec) (Vec::loadu(acc + i) + Vec::loadu(part + i)).store(acc + i);
          for (; i < n; ++i) acc[i] += part[i];
        }
        at::vec::convert(acc, dst + i0, n);
      }
    });
  });
  return total;
}

void check_inputs(const at::Tensor& x, const at::Tensor& written) {
  TORCH_CHECK(x.device().is_cpu() && written.device().is_cpu(), "stadapter_cpp: CPU tensors only");
  TORCH_CHECK(x.sizes() == written.sizes() && x.scalar_type() == written.scalar_type(),
              "stadapter_cpp: output must match x in shape and dtype");
}

}  // namespace

namespace {

// Small products through this file's brgemm path (both weight layouts, laid out in column blocks
// with a partial last one) against the exact result: small integers, exact in every dtype and in
// float32 sums. The 16-bit path runs only on CPUs with AMX, so each new one checks it once before
// trusting it.
bool brgemm_matches_exact_product(at::ScalarType dtype) {
  constexpr int64_t m = 5, k = 2 * kBrgemmColumnMultiple, n = kBrgemmBlockN + kBrgemmColumnMultiple;
  const auto wide = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::arange(m * k, wide).remainder(11).sub(5).view({m, k}).to(dtype);
  const at::Tensor b = at::arange(k * n, wide).remainder(7).sub(3).view({k, n}).to(dtype);
  LaidOutWeight upright, transposed;
  ArenaLease memory;
  lay_out_brgemm_weights({{b, /*transposed=*/false, &upright}, {b.t().contiguous(), /*transposed=*/true, &transposed}},
                         &memory);
  const at::Tensor exact = at::mm(a.to(at::kFloat), b.to(at::kFloat));
  const BrgemmScope brgemm_scope(/*vnni=*/dtype != at::kFloat);
  for (const LaidOutWeight* weight : {&upright, &transposed}) {
    at::Tensor c = at::empty({m, n}, wide);
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      brgemm_rows(*weight, a.const_data_ptr<T>(), k, m, c.data_ptr<float>(), n);
    });
    if (!at::equal(c, exact)) return false;
  }
  return true;
}

}  // namespace

// float32 from AVX2 on (ATen's oneDNN float32 ukernel; the extension itself needs AVX2), 16-bit
// where ATen would pack weights for it (cpublas::could_pack: AMX), every K and N a whole number of
// packed columns. Elsewhere cpublas::brgemm would quietly fall back to a library GEMM, or refuse VNNI.
// Each dtype's path is also checked once on an exact product (a mismatch warns and disables it).
bool brgemm_serves(at::ScalarType gemm_dtype, int64_t channels, int64_t bottleneck) {
  if (gemm_dtype != at::kFloat && (!at::native::cpublas::could_pack(gemm_dtype) ||
                                   channels % kBrgemmColumnMultiple != 0 || bottleneck % kBrgemmColumnMultiple != 0)) {
    return false;
  }
  auto checked = [](at::ScalarType dtype) {
    const bool exact = brgemm_matches_exact_product(dtype);
    if (!exact) {
      TORCH_WARN("stadapter_cpp: brgemm's ", dtype, " product differs from the exact one on this CPU; the cpp ",
                 "backend uses the library GEMM instead");
    }
    return exact;
  };
  switch (gemm_dtype) {  // one check per dtype and process (thread-safe static initialisation)
    case at::kFloat: {
      static const bool exact = checked(at::kFloat);
      return exact;
    }
    case at::kBFloat16: {
      static const bool exact = checked(at::kBFloat16);
      return exact;
    }
    case at::kHalf: {
      static const bool exact = checked(at::kHalf);
      return exact;
    }
    default: return false;
  }
}

void st_adapter_forward_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& fc1_weight,
                            const std::optional<at::Tensor>& fc1_bias, const at::Tensor& conv_weight,
                            const std::optional<at::Tensor>& conv_bias, const at::Tensor& fc2_weight,
                            const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& cond,
                            int64_t prefix, const std::string& activation, double scale, int64_t tile_patches,
                            bool native_gemm, bool brgemm, bool residual) {
  check_inputs(x, out);
  const Shape s = make_shape(x, conv_weight, fc1_weight.size(0), prefix, tile_patches, native_gemm, brgemm, residual,
                             /*backward=*/false);
  const Params p = prepare_params(s, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond,
                                  /*backward=*/false);
  const Activation act = parse_activation(activation);
  dispatch_dtype(x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const auto x_rows = rows_of<const scalar_t>(x);
    const auto out_rows = rows_of<scalar_t>(out);
    // With fewer tiles than threads (few clips, many cores), T is split into runs too, each
    // re-projecting its kt//2-frame halo: the output is the same for any split (see forward_tile).
    // Called from inside a parallel region, parallel_for runs inline, where runs would only add halos.
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int64_t runs = std::clamp<int64_t>((threads + s.tiles - 1) / s.tiles, 1, s.frames);
    with_activation(act, [&](auto a) {
      at::parallel_for(0, s.tiles * runs, 1, [&](int64_t begin, int64_t end) {
        at::AutoDispatchBelowADInplaceOrView no_autograd;
        SequentialBlas sequential_blas;
        const BrgemmScope brgemm_scope(/*vnni=*/s.brgemm && s.native_gemm);
        Scratch<scalar_t> w(s, /*backward=*/false);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t run = i % runs, t0 = run * s.frames / runs, t1 = (run + 1) * s.frames / runs;
          forward_tile<scalar_t, decltype(a)::value>(s, p, x_rows, out_rows, static_cast<float>(scale), i / runs,
                                                     t0, t1, w);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
st_adapter_backward_cpu(at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x,
                        const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                        const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                        const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                        const std::optional<at::Tensor>& cond, int64_t prefix, const std::string& activation,
                        double scale, int64_t tile_patches, bool native_gemm, bool brgemm, bool residual) {
  check_inputs(x, dx);
  check_inputs(x, grad_out);
  const Activation act = parse_activation(activation);
  // Native 16-bit GEMMs round the recomputed y, moving z by ~2^-9 of its size. relu' jumps at z = 0:
  // where the rounding moves z across zero, dz is wrong by all of da, which put 2-5% errors into the
  // conv, fc1-bias and cond gradients at any size. So relu's backward recomputes y with a float32
  // GEMM; every other GEMM stays native (their rounding only scales what they feed). brgemm rounds
  // no y: it needs none of this.
  const Shape s = make_shape(x, conv_weight, fc1_weight.size(0), prefix, tile_patches, native_gemm, brgemm, residual,
                             /*backward=*/true, /*widened_down=*/act == Activation::kRelu);
  const Params p = prepare_params(s, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond,
                                  /*backward=*/true);
  const int64_t groups = std::min(s.tiles, kMaxReductionGroups), ca = s.bottleneck, c_dim = s.channels;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // The weight-gradient partials are written whole by each group's first tile (no zeroing).
  const ArenaLease partials_memory(ArenaSlot::kWeightGradPartials, 2 * groups * ca * c_dim * sizeof(float));
  float* weight_partials = reinterpret_cast<float*>(partials_memory.data());
  GradPartials partials{
      at::from_blob(weight_partials, {groups, ca, c_dim}, f32),
      at::from_blob(weight_partials + groups * ca * c_dim, {groups, c_dim, ca}, f32),
      at::zeros({s.tiles, c_dim}, f32), at::zeros({s.tiles, s.kernel_t + 1, ca}, f32), at::zeros({s.tiles, ca}, f32)};

  dispatch_dtype(x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const auto x_rows = rows_of<const scalar_t>(x);
    const auto g_rows = rows_of<const scalar_t>(grad_out);
    const auto dx_rows = rows_of<scalar_t>(dx);
    with_activation(act, [&](auto a) {
      at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        at::AutoDispatchBelowADInplaceOrView no_autograd;
        SequentialBlas sequential_blas;
        const BrgemmScope brgemm_scope(/*vnni=*/s.brgemm && s.native_gemm);
        Scratch<scalar_t> w(s, /*backward=*/true);
        for (int64_t group = begin; group < end; ++group) {
          const int64_t first = group * s.tiles / groups, last = (group + 1) * s.tiles / groups;
          for (int64_t i = first; i < last; ++i) {
            backward_tile<scalar_t, decltype(a)::value>(s, p, x_rows, g_rows, dx_rows, static_cast<float>(scale), i,
                                                        group, i == first, partials, w);
          }
        }
      });
    });
  });

  const auto dtype = x.scalar_type();
  // Per-tile vectors are summed in tile order; cond's gradient per video, fc1 bias's over all.
  const at::Tensor per_video = partials.bottleneck.view({s.batch, s.tiles_per_video, ca});
  at::Tensor d_cond = at::empty({s.batch, ca}, f32);
  for (const auto b : c10::irange(s.batch)) {
    at::Tensor acc = per_video[b][0].clone();
    for (int64_t i = 1; i < s.tiles_per_video; ++i) acc.add_(per_video[b][i]);
    d_cond[b].copy_(acc);
  }
  auto ordered_sum = [](const at::Tensor& t) {
    at::Tensor acc = t[0].clone();
    for (int64_t i = 1; i < t.size(0); ++i) acc.add_(t[i]);
    return acc;
  };
  const at::Tensor d_fc1_bias = ordered_sum(d_cond);
  const at::Tensor d_conv = ordered_sum(partials.conv);  // (kt + 1, Ca)
  // Copies, not views of d_conv: the op's outputs must not alias each other.
  const at::Tensor d_conv_weight = d_conv.narrow(0, 0, s.kernel_t).t().contiguous().view(conv_weight.sizes());
  const at::Tensor d_conv_bias = d_conv[s.kernel_t].clone();
  return {sum_partials(partials.fc1_weight, groups, dtype), d_fc1_bias.to(dtype), d_conv_weight.to(dtype),
          d_conv_bias.to(dtype), sum_partials(partials.fc2_weight, groups, dtype),
          ordered_sum(partials.fc2_bias).to(dtype), d_cond.to(dtype)};
}

}  // namespace CPU_CAPABILITY
}  // namespace stadapter
