// Fused batch norm (batch statistics) -> ReLU -> max-pool 2x2 (optional), CPU kernels.
//
// Three entry points (and two more for a net's first layer, conv_bn_relu_pool.inc):
//   forward:          out, mean, rstd, idx, xsel   (idx: uint8 route, xsel: x at the route, see below)
//   backward:         gx, gw, gb                   from the pooled gradient gp
//   double_backward:  g_gp, g_x, g_w               from the gradients ggx, ggw, ggb of gx, gw, gb
// The Python side (bn_relu_pool.py) wraps them in two autograd Functions and documents the math.
//
// Memory order: every pass walks the (n, c) planes in memory order (parallel over planes), with
// flat vector loops inside a plane; per-channel sums are per-plane partials (double), reduced in a
// fixed order, so results do not depend on the thread count.  Each op reads the full-size
// tensors at most twice (forward: x, x; backward: x; double backward: x + ggx, x + ggx).
//
// idx, pool=True: one byte per pooled output, k in 0..3 = the position (row-major in the 2x2
// window) of the first maximum of y = w * xhat + b, when that maximum is > 0; 4 when the ReLU
// kills the window.  xsel: x at that position (pooled size).  pool=False: idx is one byte per
// element, 1 where y > 0, and there is no xsel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define BRP_AVX512 1
#else
#define BRP_AVX512 0
#endif

namespace {

constexpr uint8_t kDead = 4;
constexpr int64_t kBlock = 1024;  // per-plane sums: in T over blocks this long, then in double

struct Geo {
  int64_t N, C, H, W, Ho, Wo, HW, HoWo, P;  // P = N * C planes
  bool pool;
  bool cl;                    // channels-last (N, H, W, C) memory
  double M;                   // elements per channel
};

// The geometry of an (N, C, H, W) batch-norm input; cl: channels-last memory.
Geo make_geometry(int64_t N, int64_t C, int64_t H, int64_t W, bool pool, bool cl) {
  Geo g;
  g.N = N; g.C = C; g.H = H; g.W = W;
  g.pool = pool;
  g.cl = cl;
  g.Ho = pool ? g.H / 2 : g.H;
  g.Wo = pool ? g.W / 2 : g.W;
  g.HW = g.H * g.W;
  g.HoWo = g.Ho * g.Wo;
  g.P = g.N * g.C;
  g.M = static_cast<double>(g.N * g.HW);
  TORCH_CHECK(g.N * g.HW > 0 && g.C > 0, "bn_relu_pool: empty input");
  TORCH_CHECK(g.HW < (int64_t(1) << 31), "bn_relu_pool: planes too large");
  if (pool) {
    TORCH_CHECK(g.HoWo > 0, "bn_relu_pool: input too small for a 2x2 max-pool");
  }
  return g;
}

Geo geometry(const at::Tensor& x, bool pool) {
  TORCH_CHECK(x.dim() == 4, "bn_relu_pool: x must be 4-d (N, C, H, W), got ", x.dim(), "-d");
  // channels-last when x is laid out so and not also plain-contiguous (C == 1, or 1x1 maps: same memory)
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return make_geometry(x.size(0), x.size(1), x.size(2), x.size(3), pool, cl);
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "bn_relu_pool: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bn_relu_pool: ", name, " dtype ",
              t.scalar_type(), " != x dtype ", x.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "bn_relu_pool: ", name, " must be contiguous");
}

// Full-size tensors (x, grad_output, xsel, route, grad of grad_input): x's dtype and memory layout.
void check_layout(const at::Tensor& t, const Geo& g, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "bn_relu_pool: ", name, " must be a CPU tensor");
  if (t.scalar_type() != at::kByte)
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bn_relu_pool: ", name, " dtype ", t.scalar_type(),
                " != x dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == 4, "bn_relu_pool: ", name, " must be 4-d");
  TORCH_CHECK(g.cl ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(), "bn_relu_pool: ", name,
              " must be ", g.cl ? "channels-last" : "contiguous", " like x");
}

at::TensorOptions layout_options(const Geo& g, const at::Tensor& x) {
  return x.options().memory_format(g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Parallel loop over planes; grain so that small inputs stay on one thread.
template <typename F>
inline void for_planes(const Geo& g, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.HW));
  at::parallel_for(0, g.P, grain, f);
}

// part[p * K + k] (planes in memory order) -> out[c * K + k], summed over n in order.
inline void reduce_planes(const Geo& g, const std::vector<double>& part, int K, std::vector<double>& out) {
  out.assign(g.C * K, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int k = 0; k < K; ++k) out[c * K + k] += part[(n * g.C + c) * K + k];
}

// Scratch per thread: two row-pair buffers (row stride 2*Wo) and one plane.
template <typename T>
struct Scratch {
  std::vector<T> t0, t1, t2, t3, plane;
  explicit Scratch(const Geo& g)
      : t0(g.pool ? g.HoWo * 2 : 0), t1(g.pool ? g.HoWo * 2 : 0), t2(g.pool ? g.HoWo * 2 : 0),
        t3(g.pool ? g.HoWo * 2 : 0), plane(g.pool ? g.HW : 0) {}
};

// Forward of one plane: y = x * sc + sh, 2x2 max-pool of y with the first maximum in row-major
// order, ReLU; also x at the maximum.  Vertical pass into row-pair buffers, then one flat pass.
template <typename T>
inline void pool_plane(const Geo& g, const T* xp, T sc, T sh, T* op, uint8_t* ip, T* xs, Scratch<T>& s);
template <typename T>
inline void unpool_plane(const Geo& g, const T* gp, const uint8_t* ip, T* dst, Scratch<T>& s);
template <typename T>
inline void select_plane(const Geo& g, const T* src, const uint8_t* ip, T* dst, Scratch<T>& s);

template <typename T>
inline void pool_plane_generic(const Geo& g, const T* xp, T sc, T sh, T* op, uint8_t* ip, T* xs, Scratch<T>& s) {
  const int64_t W2 = 2 * g.Wo;
  T* vm = s.t0.data();
  T* vk = s.t1.data();
  T* vx = s.t2.data();
  for (int64_t i = 0; i < g.Ho; ++i) {
    const T* r0 = xp + 2 * i * g.W;
    const T* r1 = r0 + g.W;
    T* m = vm + i * W2;
    T* k = vk + i * W2;
    T* xv = vx + i * W2;
#pragma omp simd
    for (int64_t e = 0; e < W2; ++e) {
      const T top = r0[e] * sc + sh;
      const T bot = r1[e] * sc + sh;
      const bool b = bot > top;
      m[e] = b ? bot : top;
      k[e] = b ? T(2) : T(0);
      xv[e] = b ? r1[e] : r0[e];
    }
  }
#pragma omp simd
  for (int64_t f = 0; f < g.HoWo; ++f) {
    const T L = vm[2 * f], R = vm[2 * f + 1], kl = vk[2 * f], kr = vk[2 * f + 1];
    const T xl = vx[2 * f], xr = vx[2 * f + 1];  // (plain loads, then a select: keeps it vectorized)
    // right wins if larger, or equal and left came from the bottom row while right is top
    const bool r = R > L || (R == L && kl > kr);
    const T m = r ? R : L;
    const T k = r ? kr + T(1) : kl;
    const bool alive = m > T(0);
    op[f] = alive ? m : (m != m ? m : T(0));  // ReLU; NaN propagates
    ip[f] = alive ? static_cast<uint8_t>(static_cast<int>(k)) : kDead;
    xs[f] = r ? xr : xl;
  }
}

// Dense plane of the routed gradient: dst[route(f)] = gp[f] (alive), 0 elsewhere.
template <typename T>
inline void unpool_plane_generic(const Geo& g, const T* gp, const uint8_t* ip, T* dst, Scratch<T>& s) {
  const int64_t W2 = 2 * g.Wo;
  T* t0 = s.t0.data();
  T* t1 = s.t1.data();
#pragma omp simd
  for (int64_t f = 0; f < g.HoWo; ++f) {
    const uint8_t k = ip[f];
    const T v = gp[f];
    t0[2 * f] = k == 0 ? v : T(0);
    t0[2 * f + 1] = k == 1 ? v : T(0);
    t1[2 * f] = k == 2 ? v : T(0);
    t1[2 * f + 1] = k == 3 ? v : T(0);
  }
  if (W2 != g.W || 2 * g.Ho != g.H) std::memset(dst, 0, sizeof(T) * g.HW);
  for (int64_t i = 0; i < g.Ho; ++i) {
    std::memcpy(dst + 2 * i * g.W, t0 + i * W2, sizeof(T) * W2);
    std::memcpy(dst + (2 * i + 1) * g.W, t1 + i * W2, sizeof(T) * W2);
  }
}

// Routed values of a plane: dst[f] = src[route(f)] (alive windows; the top-left element otherwise).
template <typename T>
inline void select_plane_generic(const Geo& g, const T* src, const uint8_t* ip, T* dst, Scratch<T>& s) {
  const int64_t W2 = 2 * g.Wo;
  T* t0 = s.t2.data();
  T* t1 = s.t3.data();
  for (int64_t i = 0; i < g.Ho; ++i) {
    std::memcpy(t0 + i * W2, src + 2 * i * g.W, sizeof(T) * W2);
    std::memcpy(t1 + i * W2, src + (2 * i + 1) * g.W, sizeof(T) * W2);
  }
#pragma omp simd
  for (int64_t f = 0; f < g.HoWo; ++f) {
    const uint8_t k = ip[f];
    const T a = t0[2 * f], b = t0[2 * f + 1], c = t1[2 * f], d = t1[2 * f + 1];
    dst[f] = k == 1 ? b : (k == 2 ? c : (k == 3 ? d : a));
  }
}


#if BRP_AVX512
// AVX-512 float32 versions of the three plane helpers above: per output row, 16 outputs at a time
// (32 input columns of the row pair, masked at the row end), even / odd columns split by permutes.
struct RowChunk {
  __mmask16 lo, hi, out;  // input columns [0, 16), [16, 32); outputs
};

inline RowChunk row_chunk(int64_t nj) {  // nj = outputs in this chunk, 1..16
  const int64_t cols = 2 * nj;
  RowChunk r;
  r.lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  r.hi = cols >= 32 ? __mmask16(0xFFFF) : (cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0));
  r.out = nj >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nj) - 1);
  return r;
}

inline __m512i even_idx() { return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30); }
inline __m512i odd_idx() { return _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31); }

inline void pool_plane_avx512(const Geo& g, const float* xp, float sc, float sh, float* op, uint8_t* ip, float* xs) {
  const __m512 vsc = _mm512_set1_ps(sc), vsh = _mm512_set1_ps(sh), zero = _mm512_setzero_ps();
  const __m512i ev = even_idx(), od = odd_idx();
  const __m512i k1 = _mm512_set1_epi32(1), k2 = _mm512_set1_epi32(2), k3 = _mm512_set1_epi32(3),
                kd = _mm512_set1_epi32(kDead);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* r0 = xp + 2 * i * g.W;
    const float* r1 = r0 + g.W;
    for (int64_t j0 = 0; j0 < g.Wo; j0 += 16) {
      const RowChunk m = row_chunk(std::min<int64_t>(16, g.Wo - j0));
      const __m512 t0 = _mm512_maskz_loadu_ps(m.lo, r0 + 2 * j0), t1 = _mm512_maskz_loadu_ps(m.hi, r0 + 2 * j0 + 16);
      const __m512 b0 = _mm512_maskz_loadu_ps(m.lo, r1 + 2 * j0), b1 = _mm512_maskz_loadu_ps(m.hi, r1 + 2 * j0 + 16);
      const __m512 xa = _mm512_permutex2var_ps(t0, ev, t1), xb = _mm512_permutex2var_ps(t0, od, t1);
      const __m512 xc = _mm512_permutex2var_ps(b0, ev, b1), xd = _mm512_permutex2var_ps(b0, od, b1);
      // first maximum in row-major order a, b, c, d (strictly greater replaces)
      __m512 mx = _mm512_fmadd_ps(xa, vsc, vsh), xv = xa;
      __m512i k = _mm512_setzero_si512();
      const __m512 yb = _mm512_fmadd_ps(xb, vsc, vsh), yc = _mm512_fmadd_ps(xc, vsc, vsh),
                   yd = _mm512_fmadd_ps(xd, vsc, vsh);
      __mmask16 c = _mm512_cmp_ps_mask(yb, mx, _CMP_GT_OQ);
      mx = _mm512_mask_blend_ps(c, mx, yb); xv = _mm512_mask_blend_ps(c, xv, xb); k = _mm512_mask_blend_epi32(c, k, k1);
      c = _mm512_cmp_ps_mask(yc, mx, _CMP_GT_OQ);
      mx = _mm512_mask_blend_ps(c, mx, yc); xv = _mm512_mask_blend_ps(c, xv, xc); k = _mm512_mask_blend_epi32(c, k, k2);
      c = _mm512_cmp_ps_mask(yd, mx, _CMP_GT_OQ);
      mx = _mm512_mask_blend_ps(c, mx, yd); xv = _mm512_mask_blend_ps(c, xv, xd); k = _mm512_mask_blend_epi32(c, k, k3);
      const __mmask16 alive = _mm512_cmp_ps_mask(mx, zero, _CMP_GT_OQ);
      const __mmask16 nan = _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
      const __m512 out = _mm512_mask_blend_ps(alive | nan, zero, mx);  // ReLU; NaN propagates
      k = _mm512_mask_blend_epi32(alive, kd, k);
      const int64_t o = i * g.Wo + j0;
      _mm512_mask_storeu_ps(op + o, m.out, out);
      _mm512_mask_storeu_ps(xs + o, m.out, xv);
      _mm512_mask_cvtepi32_storeu_epi8(ip + o, m.out, k);
    }
  }
}

// dst (dense plane) = route(gp); zero elsewhere
inline void unpool_plane_avx512(const Geo& g, const float* gp, const uint8_t* ip, float* dst) {
  if (2 * g.Wo != g.W || 2 * g.Ho != g.H) std::memset(dst, 0, sizeof(float) * g.HW);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i k0 = _mm512_setzero_si512(), k1 = _mm512_set1_epi32(1), k2 = _mm512_set1_epi32(2),
                k3 = _mm512_set1_epi32(3);
  for (int64_t i = 0; i < g.Ho; ++i) {
    float* d0 = dst + 2 * i * g.W;
    float* d1 = d0 + g.W;
    for (int64_t j0 = 0; j0 < g.Wo; j0 += 16) {
      const RowChunk m = row_chunk(std::min<int64_t>(16, g.Wo - j0));
      const int64_t o = i * g.Wo + j0;
      const __m512 v = _mm512_maskz_loadu_ps(m.out, gp + o);
      const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m.out, ip + o));
      const __m512 a = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, k0) & m.out, v);
      const __m512 b = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, k1), v);
      const __m512 c = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, k2), v);
      const __m512 d = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, k3), v);
      _mm512_mask_storeu_ps(d0 + 2 * j0, m.lo, _mm512_permutex2var_ps(a, lo_idx, b));
      _mm512_mask_storeu_ps(d0 + 2 * j0 + 16, m.hi, _mm512_permutex2var_ps(a, hi_idx, b));
      _mm512_mask_storeu_ps(d1 + 2 * j0, m.lo, _mm512_permutex2var_ps(c, lo_idx, d));
      _mm512_mask_storeu_ps(d1 + 2 * j0 + 16, m.hi, _mm512_permutex2var_ps(c, hi_idx, d));
    }
  }
}

// dst[f] = src[route(f)] (the top-left element for dead windows)
inline void select_plane_avx512(const Geo& g, const float* src, const uint8_t* ip, float* dst) {
  const __m512i ev = even_idx(), od = odd_idx();
  const __m512i k1 = _mm512_set1_epi32(1), k2 = _mm512_set1_epi32(2), k3 = _mm512_set1_epi32(3);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* r0 = src + 2 * i * g.W;
    const float* r1 = r0 + g.W;
    for (int64_t j0 = 0; j0 < g.Wo; j0 += 16) {
      const RowChunk m = row_chunk(std::min<int64_t>(16, g.Wo - j0));
      const int64_t o = i * g.Wo + j0;
      const __m512 t0 = _mm512_maskz_loadu_ps(m.lo, r0 + 2 * j0), t1 = _mm512_maskz_loadu_ps(m.hi, r0 + 2 * j0 + 16);
      const __m512 b0 = _mm512_maskz_loadu_ps(m.lo, r1 + 2 * j0), b1 = _mm512_maskz_loadu_ps(m.hi, r1 + 2 * j0 + 16);
      const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m.out, ip + o));
      __m512 v = _mm512_permutex2var_ps(t0, ev, t1);
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, k1), v, _mm512_permutex2var_ps(t0, od, t1));
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, k2), v, _mm512_permutex2var_ps(b0, ev, b1));
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, k3), v, _mm512_permutex2var_ps(b0, od, b1));
      _mm512_mask_storeu_ps(dst + o, m.out, v);
    }
  }
}
#endif  // BRP_AVX512

template <typename T>
inline void pool_plane(const Geo& g, const T* xp, T sc, T sh, T* op, uint8_t* ip, T* xs, Scratch<T>& s) {
#if BRP_AVX512
  if constexpr (std::is_same_v<T, float>) {
    pool_plane_avx512(g, xp, sc, sh, op, ip, xs);
    return;
  }
#endif
  pool_plane_generic<T>(g, xp, sc, sh, op, ip, xs, s);
}

template <typename T>
inline void unpool_plane(const Geo& g, const T* gp, const uint8_t* ip, T* dst, Scratch<T>& s) {
#if BRP_AVX512
  if constexpr (std::is_same_v<T, float>) {
    unpool_plane_avx512(g, gp, ip, dst);
    return;
  }
#endif
  unpool_plane_generic<T>(g, gp, ip, dst, s);
}

template <typename T>
inline void select_plane(const Geo& g, const T* src, const uint8_t* ip, T* dst, Scratch<T>& s) {
#if BRP_AVX512
  if constexpr (std::is_same_v<T, float>) {
    select_plane_avx512(g, src, ip, dst);
    return;
  }
#endif
  select_plane_generic<T>(g, src, ip, dst, s);
}

// ------------------------------------------------------------------------------------- forward
// Per-channel mean / rstd from per-(n, c) partials part[2 (n C + c) + {0, 1}] = (sum, M2 around the
// partial's own mean, over HW values), combined exactly in a fixed order; sc, sh: y = x sc + sh.
template <typename T>
void channel_affine(const Geo& g, const std::vector<double>& part, const T* w, const T* b, double eps, T* mean_out,
                    T* rstd_out, std::vector<T>& sc, std::vector<T>& sh) {
  for (int64_t c = 0; c < g.C; ++c) {
    double s = 0;
    for (int64_t n = 0; n < g.N; ++n) s += part[2 * (n * g.C + c)];
    const double mean = s / g.M;
    double q = 0;
    for (int64_t n = 0; n < g.N; ++n) {
      const double d = part[2 * (n * g.C + c)] / g.HW - mean;
      q += part[2 * (n * g.C + c) + 1] + g.HW * d * d;
    }
    const double rstd = 1.0 / std::sqrt(q / g.M + eps);
    mean_out[c] = static_cast<T>(mean);
    rstd_out[c] = static_cast<T>(rstd);
    const double wd = w ? static_cast<double>(w[c]) : 1.0;
    const double bd = b ? static_cast<double>(b[c]) : 0.0;
    sc[c] = static_cast<T>(wd * rstd);
    sh[c] = static_cast<T>(bd - mean * wd * rstd);
  }
}

// out = ca * u + cx * (x - mean) + c0 + cg * route(gp), per channel coefficients (u optional);
// with g_gp: also g_gp = alive ? k1 * sel(u) + k2 * (xsel - mean) + k0 : 0.
template <typename T>
struct Coef {
  T ca, cx, c0, cg, mean, k1, k2, k0;
};

// ------------------------------------------------------------------- channels-last (NHWC) kernels
// x is (N, H, W, C) in memory (torch.channels_last).  Same math and the same per-(n, c) partials as
// the plane kernels, but walked image by image (parallel over n) in memory order, with the inner
// loops over the C channels of a pixel (vectorized; per-channel coefficients as arrays).  The inner
// loops are the small __restrict functions below, so the compiler sees that nothing aliases.
// Per-channel sums run sequentially over pixels, so they are kept in T over runs of only kBlockCl
// pixels, then added in double.
constexpr int64_t kBlockCl = 32;
#define BRP_R __restrict

template <typename F>
inline void for_images(const Geo& g, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.HW * g.C));
  at::parallel_for(0, g.N, grain, f);
}

// Pixels of pooled pixel (i, j) of image n: a, b (top row), c, d (bottom row), in pixels.
struct Window {
  int64_t a, b, c, d;
};
inline Window window(const Geo& g, int64_t n, int64_t i, int64_t j) {
  const int64_t a = (n * g.H + 2 * i) * g.W + 2 * j;
  return Window{a, a + 1, a + g.W, a + g.W + 1};
}

// Pixels of image n not covered by any 2x2 window (the last row / column of odd H / W).
template <typename F>
inline void for_uncovered(const Geo& g, int64_t n, const F& f) {
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = (h < 2 * g.Ho ? 2 * g.Wo : 0); w < g.W; ++w) f((n * g.H + h) * g.W + w);
}

template <typename T>
inline T pick4(uint8_t k, T a, T b, T c, T d) {  // the value at route k (a for dead windows)
  T v = a;  // (all four loaded, then selects: no branches, so the loops vectorize)
  v = k == 1 ? b : v;
  v = k == 2 ? c : v;
  v = k == 3 ? d : v;
  return v;
}

template <typename T>
inline void cl_sum(T* BRP_R t, const T* BRP_R x, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) t[c] += x[c];
}

template <typename T>
inline void cl_sum_dev(T* BRP_R tr, T* BRP_R tq, const T* BRP_R x, const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T d = x[c] - m[c];
    tr[c] += d;
    tq[c] += d * d;
  }
}

template <typename T>
inline void cl_sum_prod(T* BRP_R t1, T* BRP_R t2, const T* BRP_R h, const T* BRP_R x, const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    t1[c] += h[c];
    t2[c] += h[c] * (x[c] - m[c]);
  }
}

// routed sums at one pooled pixel (pool) or pixel (no pool): g = alive ? gp : 0; sum g, g (x - m), g h
template <typename T, bool POOL>
inline void cl_routed(T* BRP_R ta, T* BRP_R tb, const T* BRP_R gp, const uint8_t* BRP_R ip, const T* BRP_R x,
                      const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T gy = (POOL ? ip[c] < kDead : ip[c] != 0) ? gp[c] : T(0);
    ta[c] += gy;
    tb[c] += gy * (x[c] - m[c]);
  }
}

template <typename T>
inline void cl_routed_h(T* BRP_R ta, T* BRP_R tb, T* BRP_R tq, const T* BRP_R gp, const uint8_t* BRP_R ip,
                        const T* BRP_R x, const T* BRP_R m, const T* BRP_R h, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T gy = ip[c] ? gp[c] : T(0);
    ta[c] += gy;
    tb[c] += gy * (x[c] - m[c]);
    tq[c] += gy * h[c];
  }
}

template <typename T>
inline void cl_routed_h4(T* BRP_R ta, T* BRP_R tb, T* BRP_R tq, const T* BRP_R gp, const uint8_t* BRP_R ip,
                         const T* BRP_R xs, const T* BRP_R m, const T* BRP_R ha, const T* BRP_R hb,
                         const T* BRP_R hc, const T* BRP_R hd, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t k = ip[c];
    const T gy = k < kDead ? gp[c] : T(0);
    ta[c] += gy;
    tb[c] += gy * (xs[c] - m[c]);
    const T va = ha[c], vb = hb[c], vc = hc[c], vd = hd[c];
    tq[c] += gy * pick4(k, va, vb, vc, vd);
  }
}

template <typename T>
inline void cl_relu(T* BRP_R op, uint8_t* BRP_R ip, const T* BRP_R x, const T* BRP_R sc, const T* BRP_R sh,
                    int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T y = x[c] * sc[c] + sh[c];
    op[c] = !(y <= T(0)) ? y : T(0);  // ReLU, NaN propagates
    ip[c] = y > T(0) ? 1 : 0;
  }
}

template <typename T>
inline void cl_pool(T* BRP_R op, uint8_t* BRP_R ip, T* BRP_R xs, const T* BRP_R pa, const T* BRP_R pb,
                    const T* BRP_R pc, const T* BRP_R pd, const T* BRP_R sc, const T* BRP_R sh, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T s = sc[c], h = sh[c];
    const T xa = pa[c], xb = pb[c], xc = pc[c], xd = pd[c];
    const T ya = xa * s + h, yb = xb * s + h, yc = xc * s + h, yd = xd * s + h;
    // first maximum in row-major order a, b, c, d (strictly greater replaces); k kept in T
    T mx = ya, xv = xa, k = T(0);
    const bool cb = yb > mx;
    mx = cb ? yb : mx; xv = cb ? xb : xv; k = cb ? T(1) : k;
    const bool cc = yc > mx;
    mx = cc ? yc : mx; xv = cc ? xc : xv; k = cc ? T(2) : k;
    const bool cd = yd > mx;
    mx = cd ? yd : mx; xv = cd ? xd : xv; k = cd ? T(3) : k;
    const bool alive = mx > T(0);
    op[c] = alive ? mx : (mx != mx ? mx : T(0));  // ReLU; NaN propagates
    ip[c] = static_cast<uint8_t>(static_cast<int>(alive ? k : T(kDead)));
    xs[c] = xv;
  }
}

// dense output at one pixel: ca u + cx (x - m) + c0 [+ cg gp where the route is `want`]
template <typename T, bool U, bool G>
inline void cl_dense(T* BRP_R op, const T* BRP_R u, const T* BRP_R x, const T* BRP_R gp, const uint8_t* BRP_R ip,
                     uint8_t want, const T* BRP_R ca, const T* BRP_R cx, const T* BRP_R c0, const T* BRP_R cg,
                     const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    T v = cx[c] * (x[c] - m[c]) + c0[c];
    if constexpr (U) v += ca[c] * u[c];
    if constexpr (G) v += ip[c] == want ? cg[c] * gp[c] : T(0);
    op[c] = v;
  }
}

// g_gp at one pooled pixel: alive ? k1 u_route + k2 (xs - m) + k0 : 0
template <typename T, bool U>
inline void cl_ggp4(T* BRP_R op, const uint8_t* BRP_R ip, const T* BRP_R xs, const T* BRP_R ua, const T* BRP_R ub,
                    const T* BRP_R uc, const T* BRP_R ud, const T* BRP_R k1, const T* BRP_R k2, const T* BRP_R k0,
                    const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t k = ip[c];
    T v = k2[c] * (xs[c] - m[c]) + k0[c];
    if constexpr (U) {
      const T va = ua[c], vb = ub[c], vc = uc[c], vd = ud[c];
      v += k1[c] * pick4(k, va, vb, vc, vd);
    }
    op[c] = k < kDead ? v : T(0);
  }
}

// g_gp at one pixel, no pool: alive ? k1 u + k2 (x - m) + k0 : 0
template <typename T, bool U>
inline void cl_ggp1(T* BRP_R op, const uint8_t* BRP_R ip, const T* BRP_R x, const T* BRP_R u, const T* BRP_R k1,
                    const T* BRP_R k2, const T* BRP_R k0, const T* BRP_R m, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    T v = k2[c] * (x[c] - m[c]) + k0[c];
    if constexpr (U) v += k1[c] * u[c];
    op[c] = ip[c] ? v : T(0);
  }
}

// part[2 (n C + c) + {0, 1}] = sum over the image of x, and of (x - image mean)^2.
template <typename T>
void stats_partials_cl(const Geo& g, const T* x, std::vector<double>& part) {
  const int64_t C = g.C;
  part.assign(g.P * 2, 0.0);
  for_images(g, [&](int64_t n0, int64_t n1) {
    std::vector<T> t(C), tr(C), m(C);
    std::vector<double> s(C), q(C), r(C);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * g.HW * C;
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t e0 = 0; e0 < g.HW; e0 += kBlockCl) {
        const int64_t e1 = std::min(g.HW, e0 + kBlockCl);
        std::fill(t.begin(), t.end(), T(0));
        for (int64_t e = e0; e < e1; ++e) cl_sum<T>(t.data(), xn + e * C, C);
        for (int64_t c = 0; c < C; ++c) s[c] += t[c];
      }
      for (int64_t c = 0; c < C; ++c) m[c] = static_cast<T>(s[c] / g.HW);
      std::fill(q.begin(), q.end(), 0.0);
      std::fill(r.begin(), r.end(), 0.0);
      for (int64_t e0 = 0; e0 < g.HW; e0 += kBlockCl) {
        const int64_t e1 = std::min(g.HW, e0 + kBlockCl);
        std::fill(t.begin(), t.end(), T(0));
        std::fill(tr.begin(), tr.end(), T(0));
        for (int64_t e = e0; e < e1; ++e) cl_sum_dev<T>(tr.data(), t.data(), xn + e * C, m.data(), C);
        for (int64_t c = 0; c < C; ++c) {
          q[c] += t[c];
          r[c] += tr[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        part[2 * (n * C + c)] = s[c];
        part[2 * (n * C + c) + 1] = q[c] - r[c] * r[c] / g.HW;
      }
    }
  });
}

template <typename T>
void forward_kernel_cl(const Geo& g, const T* x, const T* w, const T* b, double eps, T* out, T* mean_out,
                       T* rstd_out, uint8_t* idx, T* xsel) {
  const int64_t C = g.C;
  std::vector<double> part;
  stats_partials_cl<T>(g, x, part);
  std::vector<T> scv(C), shv(C);
  channel_affine<T>(g, part, w, b, eps, mean_out, rstd_out, scv, shv);
  const T* sc = scv.data();
  const T* sh = shv.data();
  for_images(g, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (!g.pool) {
        for (int64_t e = n * g.HW; e < (n + 1) * g.HW; ++e) cl_relu<T>(out + e * C, idx + e * C, x + e * C, sc, sh, C);
        continue;
      }
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j) {
          const Window win = window(g, n, i, j);
          const int64_t o = ((n * g.Ho + i) * g.Wo + j) * C;
          cl_pool<T>(out + o, idx + o, xsel + o, x + win.a * C, x + win.b * C, x + win.c * C, x + win.d * C, sc, sh, C);
        }
    }
  });
}

// Per-(n, c) partials of sum(g), sum(g (x - mean)) and, with h (a full-size tensor), sum(g h_route),
// g = route(gp), from the pooled tensors (pool: xsel) or the full ones, into part[K (n C + c) + ia / ib / iq].
template <typename T>
void routed_partials_cl(const Geo& g, const T* gp, const T* x, const uint8_t* idx, const T* xsel, const T* mean_,
                        const T* h, int K, int ia, int ib, int iq, std::vector<double>& part) {
  const int64_t C = g.C;
  const int64_t npix = g.pool ? g.HoWo : g.HW;
  const T* xr = g.pool ? xsel : x;
  for_images(g, [&](int64_t n0, int64_t n1) {
    std::vector<T> ta(C), tb(C), tq(C);
    std::vector<double> a(C), b(C), q(C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(a.begin(), a.end(), 0.0);
      std::fill(b.begin(), b.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t f0 = 0; f0 < npix; f0 += kBlockCl) {
        const int64_t f1 = std::min(npix, f0 + kBlockCl);
        std::fill(ta.begin(), ta.end(), T(0));
        std::fill(tb.begin(), tb.end(), T(0));
        std::fill(tq.begin(), tq.end(), T(0));
        for (int64_t f = f0; f < f1; ++f) {
          const int64_t o = (n * npix + f) * C;
          if (!h) {
            if (g.pool)
              cl_routed<T, true>(ta.data(), tb.data(), gp + o, idx + o, xr + o, mean_, C);
            else
              cl_routed<T, false>(ta.data(), tb.data(), gp + o, idx + o, xr + o, mean_, C);
          } else if (!g.pool) {
            cl_routed_h<T>(ta.data(), tb.data(), tq.data(), gp + o, idx + o, xr + o, mean_, h + o, C);
          } else {
            const Window win = window(g, n, f / g.Wo, f % g.Wo);
            cl_routed_h4<T>(ta.data(), tb.data(), tq.data(), gp + o, idx + o, xr + o, mean_, h + win.a * C,
                            h + win.b * C, h + win.c * C, h + win.d * C, C);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          a[c] += ta[c];
          b[c] += tb[c];
          q[c] += tq[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        double* pp = part.data() + K * (n * C + c);
        pp[ia] = a[c];
        pp[ib] = b[c];
        if (h) pp[iq] = q[c];
      }
    }
  });
}

// part[K (n C + c) + i1 / i2] = sum(h), sum(h (x - mean)) over the full image.
template <typename T>
void plain_partials_cl(const Geo& g, const T* h, const T* x, const T* mean_, int K, int i1, int i2,
                       std::vector<double>& part) {
  const int64_t C = g.C;
  for_images(g, [&](int64_t n0, int64_t n1) {
    std::vector<T> t1(C), t2(C);
    std::vector<double> s1(C), s2(C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t e0 = 0; e0 < g.HW; e0 += kBlockCl) {
        const int64_t e1 = std::min(g.HW, e0 + kBlockCl);
        std::fill(t1.begin(), t1.end(), T(0));
        std::fill(t2.begin(), t2.end(), T(0));
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t o = (n * g.HW + e) * C;
          cl_sum_prod<T>(t1.data(), t2.data(), h + o, x + o, mean_, C);
        }
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += t1[c];
          s2[c] += t2[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        double* pp = part.data() + K * (n * C + c);
        pp[i1] = s1[c];
        pp[i2] = s2[c];
      }
    }
  });
}

// The dense pass of dense_pass() below, channels-last: out = ca u + cx (x - mean) + c0 + cg route(gp);
// g_gp = alive ? k1 sel(u) + k2 (xsel - mean) + k0 : 0.
template <typename T>
void dense_pass_cl(const Geo& g, const T* u, const T* x, const T* gp, const uint8_t* idx, const T* xsel,
                   const std::vector<Coef<T>>& co, T* out, T* g_gp) {
  const int64_t C = g.C;
  std::vector<T> v(8 * C);  // structure of arrays: ca, cx, c0, cg, mean, k1, k2, k0
  for (int64_t c = 0; c < C; ++c) {
    const Coef<T>& k = co[c];
    const T vals[8] = {k.ca, k.cx, k.c0, k.cg, k.mean, k.k1, k.k2, k.k0};
    for (int i = 0; i < 8; ++i) v[i * C + c] = vals[i];
  }
  const T *ca = v.data(), *cx = ca + C, *c0 = cx + C, *cg = c0 + C, *mn = cg + C, *k1 = mn + C, *k2 = k1 + C,
          *k0 = k2 + C;
  // out at pixel e, with the gradient routed there where the route is `want` (gpp == nullptr: none)
  auto dense = [&](int64_t e, const T* gpp, const uint8_t* ip, uint8_t want) {
    T* op = out + e * C;
    const T* xp = x + e * C;
    if (u && gpp)
      cl_dense<T, true, true>(op, u + e * C, xp, gpp, ip, want, ca, cx, c0, cg, mn, C);
    else if (gpp)
      cl_dense<T, false, true>(op, nullptr, xp, gpp, ip, want, ca, cx, c0, cg, mn, C);
    else if (u)
      cl_dense<T, true, false>(op, u + e * C, xp, nullptr, nullptr, 0, ca, cx, c0, cg, mn, C);
    else
      cl_dense<T, false, false>(op, nullptr, xp, nullptr, nullptr, 0, ca, cx, c0, cg, mn, C);
  };
  for_images(g, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (!g.pool) {
        for (int64_t e = n * g.HW; e < (n + 1) * g.HW; ++e) {
          const int64_t o = e * C;
          if (out) dense(e, gp + o, idx + o, 1);
          if (g_gp) {
            if (u)
              cl_ggp1<T, true>(g_gp + o, idx + o, x + o, u + o, k1, k2, k0, mn, C);
            else
              cl_ggp1<T, false>(g_gp + o, idx + o, x + o, nullptr, k1, k2, k0, mn, C);
          }
        }
        continue;
      }
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j) {
          const Window win = window(g, n, i, j);
          const int64_t o = ((n * g.Ho + i) * g.Wo + j) * C;
          if (out) {
            dense(win.a, gp + o, idx + o, 0);
            dense(win.b, gp + o, idx + o, 1);
            dense(win.c, gp + o, idx + o, 2);
            dense(win.d, gp + o, idx + o, 3);
          }
          if (g_gp) {
            if (u)
              cl_ggp4<T, true>(g_gp + o, idx + o, xsel + o, u + win.a * C, u + win.b * C, u + win.c * C,
                               u + win.d * C, k1, k2, k0, mn, C);
            else
              cl_ggp4<T, false>(g_gp + o, idx + o, xsel + o, nullptr, nullptr, nullptr, nullptr, k1, k2, k0, mn, C);
          }
        }
      if (out) for_uncovered(g, n, [&](int64_t e) { dense(e, nullptr, nullptr, 0); });
    }
  });
}
#undef BRP_R

template <typename T>
void forward_kernel(const Geo& g, const T* x, const T* w, const T* b, double eps, T* out, T* mean_out,
                    T* rstd_out, uint8_t* idx, T* xsel) {
  if (g.cl) {
    forward_kernel_cl<T>(g, x, w, b, eps, out, mean_out, rstd_out, idx, xsel);
    return;
  }
  // per plane: sum and sum of squared deviations from the plane mean (second pass from L1)
  std::vector<double> part(g.P * 2);
  for_planes(g, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* xp = x + p * g.HW;
      // sums in T over blocks (vector lanes), then in double
      double s = 0;
      for (int64_t e0 = 0; e0 < g.HW; e0 += kBlock) {
        const int64_t e1 = std::min(g.HW, e0 + kBlock);
        T t = 0;
#pragma omp simd reduction(+ : t)
        for (int64_t e = e0; e < e1; ++e) t += xp[e];
        s += t;
      }
      const T m = static_cast<T>(s / g.HW);
      double q = 0, r = 0;  // r: sum of (x - m), exact-ish correction for the rounding of m
      for (int64_t e0 = 0; e0 < g.HW; e0 += kBlock) {
        const int64_t e1 = std::min(g.HW, e0 + kBlock);
        T tq = 0, tr = 0;
#pragma omp simd reduction(+ : tq, tr)
        for (int64_t e = e0; e < e1; ++e) {
          const T d = xp[e] - m;
          tr += d;
          tq += d * d;
        }
        q += tq;
        r += tr;
      }
      q -= r * r / g.HW;  // sum of squares around the exact plane mean
      part[2 * p] = s;
      part[2 * p + 1] = q;
    }
  });
  std::vector<T> sc(g.C), sh(g.C);
  channel_affine<T>(g, part, w, b, eps, mean_out, rstd_out, sc, sh);
  for_planes(g, [&](int64_t p0, int64_t p1) {
    Scratch<T> scratch(g);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % g.C;
      const T* xp = x + p * g.HW;
      T* op = out + p * g.HoWo;
      uint8_t* ip = idx + p * g.HoWo;
      if (g.pool) {
        pool_plane<T>(g, xp, sc[c], sh[c], op, ip, xsel + p * g.HoWo, scratch);
        continue;
      }
      const T a = sc[c], bb = sh[c];
#pragma omp simd
      for (int64_t e = 0; e < g.HW; ++e) {
        const T y = xp[e] * a + bb;
        op[e] = !(y <= T(0)) ? y : T(0);  // ReLU, NaN propagates
        ip[e] = y > T(0) ? 1 : 0;
      }
    }
  });
}

// ------------------------------------------------------------------------------------ backward
// Per plane partials of sum(g), sum(g (x - mean)) with g = route(gp), from the pooled tensors
// (pool: xsel) or the full planes (no pool).
template <typename T>
void routed_partials(const Geo& g, const T* gp, const T* x, const uint8_t* idx, const T* xsel, const T* mean_,
                     std::vector<double>& part) {
  part.assign(g.P * 2, 0.0);
  if (g.cl) {
    routed_partials_cl<T>(g, gp, x, idx, xsel, mean_, nullptr, 2, 0, 1, -1, part);
    return;
  }
  for_planes(g, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const double mean = mean_[p % g.C];
      const T* gpp = gp + p * g.HoWo;
      const uint8_t* ip = idx + p * g.HoWo;
      // sums in T over blocks (vectorizes with the byte mask), then in double
      const T mn = static_cast<T>(mean);
      double a = 0, b = 0;
      const int64_t n = g.pool ? g.HoWo : g.HW;
      const T* xp = g.pool ? xsel + p * g.HoWo : x + p * g.HW;
      for (int64_t e0 = 0; e0 < n; e0 += kBlock) {
        const int64_t e1 = std::min(n, e0 + kBlock);
        T ta = 0, tb = 0;
        if (g.pool) {
#pragma omp simd reduction(+ : ta, tb)
          for (int64_t f = e0; f < e1; ++f) {
            const T gy = ip[f] < kDead ? gpp[f] : T(0);
            ta += gy;
            tb += gy * (xp[f] - mn);
          }
        } else {
#pragma omp simd reduction(+ : ta, tb)
          for (int64_t e = e0; e < e1; ++e) {
            const T gy = ip[e] ? gpp[e] : T(0);
            ta += gy;
            tb += gy * (xp[e] - mn);
          }
        }
        a += ta;
        b += tb;
      }
      part[2 * p] = a;
      part[2 * p + 1] = b;
    }
  });
}

template <typename T>
void dense_pass(const Geo& g, const T* u, const T* x, const T* gp, const uint8_t* idx, const T* xsel,
                const std::vector<Coef<T>>& co, T* out, T* g_gp) {
  if (g.cl) {
    dense_pass_cl<T>(g, u, x, gp, idx, xsel, co, out, g_gp);
    return;
  }
  for_planes(g, [&](int64_t p0, int64_t p1) {
    Scratch<T> s(g);
    for (int64_t p = p0; p < p1; ++p) {
      const Coef<T>& k = co[p % g.C];
      const T ca = k.ca, cx = k.cx, c0 = k.c0, cg = k.cg, mean = k.mean;
      const int64_t off = p * g.HW;
      const T* xp = x + off;
      const T* up = u ? u + off : nullptr;
      const T* gpp = gp + p * g.HoWo;
      const uint8_t* ip = idx + p * g.HoWo;
      if (out) {
        T* op = out + off;
        if (g.pool) {
          const T* gy = s.plane.data();
          unpool_plane<T>(g, gpp, ip, s.plane.data(), s);
          if (up) {
#pragma omp simd
            for (int64_t e = 0; e < g.HW; ++e) op[e] = ca * up[e] + cx * (xp[e] - mean) + c0 + cg * gy[e];
          } else {
#pragma omp simd
            for (int64_t e = 0; e < g.HW; ++e) op[e] = cx * (xp[e] - mean) + c0 + cg * gy[e];
          }
        } else if (up) {
#pragma omp simd
          for (int64_t e = 0; e < g.HW; ++e)
            op[e] = ca * up[e] + cx * (xp[e] - mean) + c0 + (ip[e] ? cg * gpp[e] : T(0));
        } else {
#pragma omp simd
          for (int64_t e = 0; e < g.HW; ++e) op[e] = cx * (xp[e] - mean) + c0 + (ip[e] ? cg * gpp[e] : T(0));
        }
      }
      if (g_gp) {
        const T k1 = k.k1, k2 = k.k2, k0 = k.k0;
        T* op = g_gp + p * g.HoWo;
        if (g.pool) {
          const T* xs = xsel + p * g.HoWo;
          if (up) {
            T* us = s.plane.data();  // free again: the dense output is written
            select_plane<T>(g, up, ip, us, s);
#pragma omp simd
            for (int64_t f = 0; f < g.HoWo; ++f) op[f] = ip[f] < kDead ? k1 * us[f] + k2 * (xs[f] - mean) + k0 : T(0);
          } else {
#pragma omp simd
            for (int64_t f = 0; f < g.HoWo; ++f) op[f] = ip[f] < kDead ? k2 * (xs[f] - mean) + k0 : T(0);
          }
        } else if (up) {
#pragma omp simd
          for (int64_t e = 0; e < g.HW; ++e) op[e] = ip[e] ? k1 * up[e] + k2 * (xp[e] - mean) + k0 : T(0);
        } else {
#pragma omp simd
          for (int64_t e = 0; e < g.HW; ++e) op[e] = ip[e] ? k2 * (xp[e] - mean) + k0 : T(0);
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const Geo& g, const T* gp, const T* x, const T* w, const T* mean_, const T* rstd_,
                     const uint8_t* idx, const T* xsel, T* gx, T* gw, T* gb) {
  std::vector<double> part, sums;
  routed_partials<T>(g, gp, x, idx, xsel, mean_, part);
  reduce_planes(g, part, 2, sums);
  std::vector<Coef<T>> co(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double sg = sums[2 * c], sgd = sums[2 * c + 1];
    const double r = rstd_[c], wd = w ? static_cast<double>(w[c]) : 1.0, wr = wd * r;
    gw[c] = static_cast<T>(sgd * r);  // sum(gy xhat)
    gb[c] = static_cast<T>(sg);       // sum(gy)
    // gx = w r (gy - sg / M - xhat * sum(gy xhat) / M)
    co[c] = Coef<T>{T(0), static_cast<T>(-wr * r * r * sgd / g.M), static_cast<T>(-wr * sg / g.M),
                    static_cast<T>(wr), mean_[c], T(0), T(0), T(0)};
  }
  if (gx) dense_pass<T>(g, nullptr, x, gp, idx, xsel, co, gx, nullptr);
}

// ----------------------------------------------------------------------------- double backward
// Backward of (gp, x, w) -> (gx, gw, gb) above, given ggx (may be null), ggw, ggb (per channel).
// With E = mean over the channel's M values, g = routed gp, r = rstd:
//   g_gp = route(w r (ggx - E[ggx] - xhat E[ggx xhat]) + ggw xhat + ggb)
//   g_w  = r (sum(ggx g) - sum(ggx) E[g] - sum(ggx xhat) E[g xhat])  =: r * B
//   g_x  = r (a g + b ggx - E[h] - xhat (E[h xhat] + w B r / M)),  h = a g + b ggx,
//          a = ggw - w r E[ggx xhat],  b = -w r E[g xhat]
template <typename T>
void double_backward_kernel(const Geo& g, const T* ggx, const T* ggw, const T* ggb, const T* gp, const T* x,
                            const T* w, const T* mean_, const T* rstd_, const uint8_t* idx, const T* xsel,
                            T* g_gp, T* g_x, T* g_w) {
  // per plane: sum(g), sum(g (x - mean)), sum(ggx), sum(ggx (x - mean)), sum(g ggx)
  const int K = 5;
  std::vector<double> part(g.P * K, 0.0), sums;
  if (g.cl) {
    routed_partials_cl<T>(g, gp, x, idx, xsel, mean_, ggx, K, 0, 1, 4, part);
    if (ggx) plain_partials_cl<T>(g, ggx, x, mean_, K, 2, 3, part);
  } else
  for_planes(g, [&](int64_t p0, int64_t p1) {
    Scratch<T> s(g);
    for (int64_t p = p0; p < p1; ++p) {
      const double mean = mean_[p % g.C];
      const T* gpp = gp + p * g.HoWo;
      const uint8_t* ip = idx + p * g.HoWo;
      const T* xp = x + p * g.HW;
      const T* hp = ggx ? ggx + p * g.HW : nullptr;
      const T mn = static_cast<T>(mean);
      double a = 0, b = 0, s1 = 0, s2 = 0, q = 0;
      if (hp) {
        for (int64_t e0 = 0; e0 < g.HW; e0 += kBlock) {
          const int64_t e1 = std::min(g.HW, e0 + kBlock);
          T t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
          for (int64_t e = e0; e < e1; ++e) {
            t1 += hp[e];
            t2 += hp[e] * (xp[e] - mn);
          }
          s1 += t1;
          s2 += t2;
        }
      }
      // routed sums: over the pooled planes (pool) or the full planes; h = ggx at the route
      const int64_t n = g.pool ? g.HoWo : g.HW;
      const T* xr = g.pool ? xsel + p * g.HoWo : xp;
      const T* hr = hp;
      if (hp && g.pool) {
        select_plane<T>(g, hp, ip, s.plane.data(), s);
        hr = s.plane.data();
      }
      for (int64_t e0 = 0; e0 < n; e0 += kBlock) {
        const int64_t e1 = std::min(n, e0 + kBlock);
        T ta = 0, tb = 0, tq = 0;
        if (g.pool && hr) {
#pragma omp simd reduction(+ : ta, tb, tq)
          for (int64_t f = e0; f < e1; ++f) {
            const T gy = ip[f] < kDead ? gpp[f] : T(0);
            ta += gy;
            tb += gy * (xr[f] - mn);
            tq += gy * hr[f];
          }
        } else if (g.pool) {
#pragma omp simd reduction(+ : ta, tb)
          for (int64_t f = e0; f < e1; ++f) {
            const T gy = ip[f] < kDead ? gpp[f] : T(0);
            ta += gy;
            tb += gy * (xr[f] - mn);
          }
        } else if (hr) {
#pragma omp simd reduction(+ : ta, tb, tq)
          for (int64_t e = e0; e < e1; ++e) {
            const T gy = ip[e] ? gpp[e] : T(0);
            ta += gy;
            tb += gy * (xr[e] - mn);
            tq += gy * hr[e];
          }
        } else {
#pragma omp simd reduction(+ : ta, tb)
          for (int64_t e = e0; e < e1; ++e) {
            const T gy = ip[e] ? gpp[e] : T(0);
            ta += gy;
            tb += gy * (xr[e] - mn);
          }
        }
        a += ta;
        b += tb;
        q += tq;
      }
      double* pp = part.data() + p * K;
      pp[0] = a; pp[1] = b; pp[2] = s1; pp[3] = s2; pp[4] = q;
    }
  });
  reduce_planes(g, part, K, sums);
  std::vector<Coef<T>> co(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double* sc = sums.data() + c * K;
    const double sg = sc[0], sgd = sc[1], S1 = sc[2], S2 = sc[3], sgg = sc[4];
    const double r = rstd_[c], wd = w ? static_cast<double>(w[c]) : 1.0;
    const double ggw_c = ggw ? static_cast<double>(ggw[c]) : 0.0;
    const double ggb_c = ggb ? static_cast<double>(ggb[c]) : 0.0;
    const double M = g.M, wr = wd * r;
    const double Eggx = S1 / M, Eggxh = r * S2 / M, Eg = sg / M, Egh = r * sgd / M;
    const double B = sgg - S1 * Eg - r * S2 * Egh;
    if (g_w) g_w[c] = static_cast<T>(r * B);
    const double a = ggw_c - wr * Eggxh;
    const double b = -wr * Egh;
    const double Eh = Eg * a + b * Eggx;
    const double gam = Egh * (ggw_c - 2.0 * wr * Eggxh) + wd * B * r / M;
    // g_x = (r b) ggx - r^2 gam (x - mean) - r Eh + (r a) g
    // g_gp = alive ? (w r) ggx + r (ggw - w r E[ggx xhat]) (x - mean) + ggb - w r E[ggx] : 0
    co[c] = Coef<T>{static_cast<T>(r * b), static_cast<T>(-r * r * gam), static_cast<T>(-r * Eh),
                    static_cast<T>(r * a), mean_[c], static_cast<T>(wr), static_cast<T>(r * a),
                    static_cast<T>(ggb_c - wr * Eggx)};
  }
  if (g_x || g_gp) dense_pass<T>(g, ggx, x, gp, idx, xsel, co, g_x, g_gp);
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

void check_opt(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (t.has_value() && t->defined()) check_same(*t, x, name);
}

#include "conv_bn_relu_pool.inc"

// ----------------------------------------------------------------------------------- bindings
void check_route(const Geo& g, const at::Tensor& x, const at::Tensor& gp, const at::Tensor& idx,
                 const std::optional<at::Tensor>& xsel) {
  check_layout(gp, g, x, "grad_output");
  TORCH_CHECK(gp.numel() == g.P * g.HoWo, "bn_relu_pool: grad_output has ", gp.numel(), " elements, expected ",
              g.P * g.HoWo);
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.numel() == gp.numel(), "bn_relu_pool: bad route tensor");
  check_layout(idx, g, x, "route");
  if (g.pool) {
    TORCH_CHECK(xsel.has_value() && xsel->defined(), "bn_relu_pool: pool needs xsel");
    check_layout(*xsel, g, x, "xsel");
    TORCH_CHECK(xsel->numel() == gp.numel(), "bn_relu_pool: bad xsel shape");
  }
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "bn_relu_pool: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "bn_relu_pool: x must be 4-d (N, C, H, W), got ", x.dim(), "-d");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_relu_pool: x must be contiguous or channels-last contiguous");
}

void check_stats(const Geo& g, const at::Tensor& x, const std::optional<at::Tensor>& w, const at::Tensor& mean,
                 const at::Tensor& rstd) {
  check_x(x);
  check_opt(w, x, "weight");
  check_same(mean, x, "mean");
  check_same(rstd, x, "rstd");
  TORCH_CHECK(mean.numel() == g.C && rstd.numel() == g.C, "bn_relu_pool: bad statistics shapes");
  if (w.has_value() && w->defined()) TORCH_CHECK(w->numel() == g.C, "bn_relu_pool: bad weight shape");
}

std::vector<at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                const std::optional<at::Tensor>& b, double eps, bool pool) {
  check_x(x);
  const Geo g = geometry(x, pool);
  check_opt(w, x, "weight");
  check_opt(b, x, "bias");
  if (w.has_value() && w->defined()) TORCH_CHECK(w->numel() == g.C, "bn_relu_pool: bad weight shape");
  if (b.has_value() && b->defined()) TORCH_CHECK(b->numel() == g.C, "bn_relu_pool: bad bias shape");
  const auto full = layout_options(g, x);
  auto out = at::empty({g.N, g.C, g.Ho, g.Wo}, full);
  auto mean = at::empty({g.C}, x.options());
  auto rstd = at::empty({g.C}, x.options());
  auto idx = at::empty({g.N, g.C, g.Ho, g.Wo}, full.dtype(at::kByte));
  at::Tensor xsel = pool ? at::empty({g.N, g.C, g.Ho, g.Wo}, full) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_forward", [&] {
    forward_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(w), opt_ptr<scalar_t>(b), eps,
                             out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                             idx.data_ptr<uint8_t>(), pool ? xsel.data_ptr<scalar_t>() : nullptr);
  });
  if (pool) return {out, mean, rstd, idx, xsel};
  return {out, mean, rstd, idx};
}

std::vector<at::Tensor> backward(const at::Tensor& gp, const at::Tensor& x, const std::optional<at::Tensor>& w,
                                 const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& idx,
                                 const std::optional<at::Tensor>& xsel, bool pool, bool need_gx) {
  const Geo g = geometry(x, pool);
  check_stats(g, x, w, mean, rstd);
  check_route(g, x, gp, idx, xsel);
  at::Tensor gx = need_gx ? at::empty(x.sizes(), layout_options(g, x)) : at::Tensor();
  auto gw = at::empty({g.C}, x.options());
  auto gb = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_backward", [&] {
    backward_kernel<scalar_t>(g, gp.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(w),
                              mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(),
                              opt_ptr<scalar_t>(xsel), need_gx ? gx.data_ptr<scalar_t>() : nullptr,
                              gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
  });
  return {gx, gw, gb};
}

std::vector<at::Tensor> double_backward(const std::optional<at::Tensor>& ggx, const std::optional<at::Tensor>& ggw,
                                        const std::optional<at::Tensor>& ggb, const at::Tensor& gp,
                                        const at::Tensor& x, const std::optional<at::Tensor>& w,
                                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& idx,
                                        const std::optional<at::Tensor>& xsel, bool pool, bool need_ggp,
                                        bool need_gx, bool need_gw) {
  const Geo g = geometry(x, pool);
  check_stats(g, x, w, mean, rstd);
  check_route(g, x, gp, idx, xsel);
  if (ggx.has_value() && ggx->defined()) check_layout(*ggx, g, x, "grad of grad_input");
  check_opt(ggw, x, "grad of grad_weight");
  check_opt(ggb, x, "grad of grad_bias");
  if (ggx.has_value() && ggx->defined())
    TORCH_CHECK(ggx->numel() == x.numel(), "bn_relu_pool: bad grad-of-grad_input shape");
  if (ggw.has_value() && ggw->defined()) TORCH_CHECK(ggw->numel() == g.C, "bn_relu_pool: bad grad-of-grad_weight");
  if (ggb.has_value() && ggb->defined()) TORCH_CHECK(ggb->numel() == g.C, "bn_relu_pool: bad grad-of-grad_bias");
  at::Tensor g_gp = need_ggp ? at::empty(gp.sizes(), layout_options(g, x)) : at::Tensor();
  at::Tensor g_x = need_gx ? at::empty(x.sizes(), layout_options(g, x)) : at::Tensor();
  at::Tensor g_w = need_gw ? at::empty({g.C}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_double_backward", [&] {
    double_backward_kernel<scalar_t>(g, opt_ptr<scalar_t>(ggx), opt_ptr<scalar_t>(ggw), opt_ptr<scalar_t>(ggb),
                                     gp.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(w),
                                     mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(),
                                     opt_ptr<scalar_t>(xsel), need_ggp ? g_gp.data_ptr<scalar_t>() : nullptr,
                                     need_gx ? g_x.data_ptr<scalar_t>() : nullptr,
                                     need_gw ? g_w.data_ptr<scalar_t>() : nullptr);
  });
  return {g_gp, g_x, g_w};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused BN(batch stats) + ReLU + max-pool 2x2 forward");
  m.def("backward", &backward, "its backward");
  m.def("double_backward", &double_backward, "the backward of its backward");
  m.def("stem_forward", &stem_forward, "fused conv3x3 (1 or 3 input channels) + BN + ReLU + max-pool 2x2 forward");
  m.def("stem_backward", &stem_backward, "its first-order backward (weight, BN weight and bias gradients)");
}
