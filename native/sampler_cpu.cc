// CPU kernels of the sampler family: ai.stn::GridSample (generic, reads a grid) and ai.stn::Warp
// (affine or projective theta, coordinates computed on the fly; no grid tensor).
//
// Work split: (image, band of output rows) tasks on onnxruntime's intra-op thread pool. Per output
// row: a coordinate pass (normalized -> padded pixel coordinates, branch-free, vectorised by the
// compiler), a tap pass (indices and weights, once per row, shared by every channel), then the
// channel loops over the precomputed taps: a fast path for runs of pixels whose taps are all inside
// the image and a checked path for the others. Every output element is computed the same way
// whatever the split, so results do not depend on the thread count.
//
// Runtime dispatch: the row functions are built for AVX-512, AVX2+FMA and baseline x86-64
// (GCC target_clones; no -march=native), the loader picks one at run time. Bilinear rows have
// an explicit AVX2 path on x86-64 CPUs that have AVX2 (bilinear_row_avx2): taps computed in
// registers 8 pixels at a time, each pixel's horizontal tap pairs read as one 64-bit load;
// STN_NATIVE_ISA=baseline turns it off (tests compare the two). Every path computes each value
// with the same float operations in the same order (no FMA: -ffp-contract=off), so all give
// the same bits.
#include "sampler_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define STN_AVX2_PATH 1
#endif

namespace stn {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(STN_NO_CLONES)
#define STN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STN_CLONES
#endif

namespace {

struct RowScratch {
  std::vector<float> gx, gy, ix, iy;
  std::vector<float> w00, w01, w10, w11;
  std::vector<int32_t> off, mask;
  std::vector<int32_t> segs;  // [begin, end, interior] triples covering the row
  std::vector<int32_t> cidx;  // bicubic: 4 x-taps and 4 y-taps per pixel
  std::vector<float> cw;      // bicubic: 4 x and 4 y coefficients per pixel
  void resize(int w, int mode) {
    if (static_cast<int>(gx.size()) >= w && (mode != kBicubic || static_cast<int>(cidx.size()) >= 8 * w)) return;
    gx.resize(w); gy.resize(w); ix.resize(w); iy.resize(w);
    w00.resize(w); w01.resize(w); w10.resize(w); w11.resize(w);
    off.resize(w); mask.resize(w); segs.reserve(3 * w + 3);
    if (mode == kBicubic) { cidx.resize(8 * w); cw.resize(8 * w); }
  }
};

thread_local RowScratch tls_scratch;

// Normalized (gx, gy) -> pixel coordinates, padding applied for bilinear and nearest (bicubic
// applies it per tap). Branch-free per element: vectorised.
STN_CLONES void coordinate_pass(const float* gx, const float* gy, float* ix, float* iy, int w, Axis ax, Axis ay,
                                int padding, bool pad_now) {
  if (!pad_now || padding == kZeros) {
    for (int j = 0; j < w; ++j) { ix[j] = unnormalize(gx[j], ax); iy[j] = unnormalize(gy[j], ay); }
  } else if (padding == kBorder) {
    for (int j = 0; j < w; ++j) { ix[j] = clip(unnormalize(gx[j], ax), ax); iy[j] = clip(unnormalize(gy[j], ay), ay); }
  } else {
    for (int j = 0; j < w; ++j) {
      ix[j] = clip(reflect(unnormalize(gx[j], ax), ax), ax);
      iy[j] = clip(reflect(unnormalize(gy[j], ay), ay), ay);
    }
  }
}

// Bilinear taps: offset of the north-west tap, the four weights, and which taps are inside
// (bit 0 nw, 1 ne, 2 sw, 3 se; 15: all inside, the fast path). Branch-free: vectorised.
STN_CLONES void bilinear_taps(const float* __restrict ix, const float* __restrict iy, int w, int W, int H,
                              float* __restrict w00, float* __restrict w01, float* __restrict w10,
                              float* __restrict w11, int32_t* __restrict off, int32_t* __restrict mask) {
  const float xmax = static_cast<float>(W) + 1.f, ymax = static_cast<float>(H) + 1.f;
  for (int j = 0; j < w; ++j) {
    float xf = floorf(ix[j]), yf = floorf(iy[j]);
    float fw = ix[j] - xf, fn = iy[j] - yf;  // east and south weights
    float fe = 1.f - fw, fs = 1.f - fn;
    w00[j] = fs * fe; w01[j] = fs * fw; w10[j] = fn * fe; w11[j] = fn * fw;
    // clamp to [-2, S+1] (NaN -> -2): out of bounds either way, and safe to convert
    float xc = xf > -2.f ? xf : -2.f, yc = yf > -2.f ? yf : -2.f;
    xc = xc < xmax ? xc : xmax;
    yc = yc < ymax ? yc : ymax;
    int32_t x0 = static_cast<int32_t>(xc), y0 = static_cast<int32_t>(yc);
    int32_t xw = static_cast<uint32_t>(x0) < static_cast<uint32_t>(W);
    int32_t xe = static_cast<uint32_t>(x0 + 1) < static_cast<uint32_t>(W);
    int32_t yn = static_cast<uint32_t>(y0) < static_cast<uint32_t>(H);
    int32_t ys = static_cast<uint32_t>(y0 + 1) < static_cast<uint32_t>(H);
    mask[j] = (yn & xw) | ((yn & xe) << 1) | ((ys & xw) << 2) | ((ys & xe) << 3);
    off[j] = y0 * W + x0;
  }
}

// Runs of fast-path (mask == full) and checked pixels: [begin, end, interior] triples.
void make_segments(const int32_t* mask, int w, int32_t full, std::vector<int32_t>& segs) {
  segs.clear();
  int j = 0;
  while (j < w) {
    bool in = mask[j] == full;
    int k = j + 1;
    while (k < w && (mask[k] == full) == in) ++k;
    segs.push_back(j); segs.push_back(k); segs.push_back(in);
    j = k;
  }
}

// Fast path, pixel-major: each pixel's taps and weights are loaded once for every channel.
STN_CLONES void bilinear_fast(const float* __restrict img, int C, int64_t plane, int W, float* __restrict out,
                              int64_t out_plane, int a, int b, const float* __restrict w00,
                              const float* __restrict w01, const float* __restrict w10, const float* __restrict w11,
                              const int32_t* __restrict off) {
  for (int q = a; q < b; ++q) {
    const float* t = img + off[q];
    const float a00 = w00[q], a01 = w01[q], a10 = w10[q], a11 = w11[q];
    for (int c = 0; c < C; ++c, t += plane) {
      out[c * out_plane + q] = t[0] * a00 + t[1] * a01 + t[W] * a10 + t[W + 1] * a11;
    }
  }
}

// A bilinear pixel whose taps may be outside: missing taps read zero (the checked path).
inline void bilinear_checked_pixel(const float* img, int C, int64_t plane, int W, float* out, int64_t out_plane, int j,
                                   float a00, float a01, float a10, float a11, int32_t off, int32_t m) {
  for (int c = 0; c < C; ++c) {
    float* o = out + c * out_plane + j;
    if (m == 0) {  // all outside: the weights may be NaN/inf, as in torch the sum is 0 * w
      *o = 0.f * a00 + 0.f * a01 + 0.f * a10 + 0.f * a11;
      continue;
    }
    const float* t = img + c * plane + off;
    float v00 = (m & 1) ? t[0] : 0.f, v01 = (m & 2) ? t[1] : 0.f;
    float v10 = (m & 4) ? t[W] : 0.f, v11 = (m & 8) ? t[W + 1] : 0.f;
    *o = v00 * a00 + v01 * a01 + v10 * a10 + v11 * a11;
  }
}

void bilinear_channels(const float* img, int C, int64_t plane, int W, float* out, int64_t out_plane,
                       const RowScratch& s) {
  const float* w00 = s.w00.data(); const float* w01 = s.w01.data();
  const float* w10 = s.w10.data(); const float* w11 = s.w11.data();
  const int32_t* off = s.off.data(); const int32_t* mask = s.mask.data();
  const size_t nseg = s.segs.size();
  for (size_t g = 0; g < nseg; g += 3) {
    const int a = s.segs[g], b = s.segs[g + 1];
    if (s.segs[g + 2]) {
      bilinear_fast(img, C, plane, W, out, out_plane, a, b, w00, w01, w10, w11, off);
      continue;
    }
    for (int j = a; j < b; ++j)
      bilinear_checked_pixel(img, C, plane, W, out, out_plane, j, w00[j], w01[j], w10[j], w11[j], off[j], mask[j]);
  }
}

STN_CLONES void nearest_taps(const float* __restrict ix, const float* __restrict iy, int w, int W, int H,
                             int32_t* __restrict off, int32_t* __restrict mask) {
  const float xmax = static_cast<float>(W), ymax = static_cast<float>(H);
  for (int j = 0; j < w; ++j) {
    float xr = nearbyintf(ix[j]), yr = nearbyintf(iy[j]);
    float xc = xr > -1.f ? xr : -1.f, yc = yr > -1.f ? yr : -1.f;  // NaN -> -1: outside
    xc = xc < xmax ? xc : xmax;
    yc = yc < ymax ? yc : ymax;
    int32_t x = static_cast<int32_t>(xc), y = static_cast<int32_t>(yc);
    int32_t in = (static_cast<uint32_t>(x) < static_cast<uint32_t>(W)) & (static_cast<uint32_t>(y) < static_cast<uint32_t>(H));
    mask[j] = in;
    off[j] = in ? y * W + x : 0;
  }
}

STN_CLONES void nearest_channels(const float* img, int C, int64_t plane, float* out, int64_t out_plane, int w,
                                 const int32_t* __restrict off, const int32_t* __restrict mask) {
  for (int c = 0; c < C; ++c) {
    const float* __restrict p = img + c * plane;
    float* __restrict o = out + c * out_plane;
    for (int j = 0; j < w; ++j) o[j] = mask[j] ? p[off[j]] : 0.f;
  }
}

void bicubic_taps(const float* ix, const float* iy, int w, Axis ax, Axis ay, int padding, RowScratch& s) {
  for (int j = 0; j < w; ++j) {
    float xf = floorf(ix[j]), yf = floorf(iy[j]);
    cubic_coefficients(ix[j] - xf, &s.cw[8 * j]);
    cubic_coefficients(iy[j] - yf, &s.cw[8 * j + 4]);
    for (int t = 0; t < 4; ++t) {
      s.cidx[8 * j + t] = cubic_tap(xf - 1.f + t, ax, padding);
      s.cidx[8 * j + 4 + t] = cubic_tap(yf - 1.f + t, ay, padding);
    }
  }
}

void bicubic_channels(const float* img, int C, int64_t plane, int W, float* out, int64_t out_plane, int w,
                      const RowScratch& s) {
  for (int c = 0; c < C; ++c) {
    const float* p = img + c * plane;
    float* o = out + c * out_plane;
    for (int j = 0; j < w; ++j) {
      const int32_t* xi = &s.cidx[8 * j];
      const int32_t* yi = xi + 4;
      const float* cx = &s.cw[8 * j];
      const float* cy = cx + 4;
      float rows[4];
      for (int r = 0; r < 4; ++r) {
        float v[4];
        for (int t = 0; t < 4; ++t) v[t] = (xi[t] >= 0 && yi[r] >= 0) ? p[static_cast<int64_t>(yi[r]) * W + xi[t]] : 0.f;
        rows[r] = v[0] * cx[0] + v[1] * cx[1] + v[2] * cx[2] + v[3] * cx[3];
      }
      o[j] = rows[0] * cy[0] + rows[1] * cy[1] + rows[2] * cy[2] + rows[3] * cy[3];
    }
  }
}

#ifdef STN_AVX2_PATH
// The AVX2 bilinear row: blocks of 8 pixels; taps in registers (bilinear_taps' formulas); a block
// whose 32 taps are all inside reads each pixel's (x0, x0+1) pairs of the two rows as 64-bit loads,
// a block with any tap outside goes through bilinear_taps and the checked path pixel by pixel.
// CC: the channel count when known at compile time (1, 3: the channel loop unrolled), else 0.
template <int CC>
__attribute__((target("avx2"))) void bilinear_row_avx2(const float* img, int channels, int64_t plane, int W, int H,
                                                       float* out, int64_t out_plane, int w, const float* ix,
                                                       const float* iy) {
  const int C = CC ? CC : channels;
  const __m256 one = _mm256_set1_ps(1.f), lo = _mm256_set1_ps(-2.f);
  const __m256 xmax = _mm256_set1_ps(static_cast<float>(W) + 1.f), ymax = _mm256_set1_ps(static_cast<float>(H) + 1.f);
  const __m256i minus1 = _mm256_set1_epi32(-1), wlast = _mm256_set1_epi32(W - 1), hlast = _mm256_set1_epi32(H - 1);
  const __m256i wv = _mm256_set1_epi32(W);
  alignas(32) int32_t o[8];
  float a00[8], a01[8], a10[8], a11[8];
  int32_t offs[8], masks[8];
  int q = 0;
  for (; q + 8 <= w; q += 8) {
    const __m256 x = _mm256_loadu_ps(ix + q), y = _mm256_loadu_ps(iy + q);
    const __m256 xf = _mm256_floor_ps(x), yf = _mm256_floor_ps(y);
    const __m256 fw = _mm256_sub_ps(x, xf), fn = _mm256_sub_ps(y, yf);
    const __m256 fe = _mm256_sub_ps(one, fw), fs = _mm256_sub_ps(one, fn);
    // max/min return their second operand for NaN: NaN -> -2, as bilinear_taps' clamp
    const __m256i x0 = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(xf, lo), xmax));
    const __m256i y0 = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(yf, lo), ymax));
    const __m256i inside = _mm256_and_si256(
        _mm256_and_si256(_mm256_cmpgt_epi32(x0, minus1), _mm256_cmpgt_epi32(wlast, x0)),
        _mm256_and_si256(_mm256_cmpgt_epi32(y0, minus1), _mm256_cmpgt_epi32(hlast, y0)));
    if (_mm256_movemask_ps(_mm256_castsi256_ps(inside)) != 0xFF) {
      bilinear_taps(ix + q, iy + q, 8, W, H, a00, a01, a10, a11, offs, masks);
      for (int k = 0; k < 8; ++k)
        bilinear_checked_pixel(img, C, plane, W, out, out_plane, q + k, a00[k], a01[k], a10[k], a11[k], offs[k],
                               masks[k]);
      continue;
    }
    const __m256 A00 = _mm256_mul_ps(fs, fe), A01 = _mm256_mul_ps(fs, fw);
    const __m256 A10 = _mm256_mul_ps(fn, fe), A11 = _mm256_mul_ps(fn, fw);
    _mm256_store_si256(reinterpret_cast<__m256i*>(o), _mm256_add_epi32(_mm256_mullo_epi32(y0, wv), x0));
    for (int c = 0; c < C; ++c) {
      const float* p = img + c * plane;
      // (p[k0], p[k0 + 1], p[k1], p[k1 + 1]): two pixels' tap pairs, two 64-bit loads
      auto pairs = [p](int32_t k0, int32_t k1) {
        __m128 v = _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(p + k0));
        return _mm_loadh_pi(v, reinterpret_cast<const __m64*>(p + k1));
      };
      const __m256 n01 = _mm256_insertf128_ps(_mm256_castps128_ps256(pairs(o[0], o[1])), pairs(o[4], o[5]), 1);
      const __m256 n23 = _mm256_insertf128_ps(_mm256_castps128_ps256(pairs(o[2], o[3])), pairs(o[6], o[7]), 1);
      const __m256 s01 = _mm256_insertf128_ps(_mm256_castps128_ps256(pairs(o[0] + W, o[1] + W)),
                                              pairs(o[4] + W, o[5] + W), 1);
      const __m256 s23 = _mm256_insertf128_ps(_mm256_castps128_ps256(pairs(o[2] + W, o[3] + W)),
                                              pairs(o[6] + W, o[7] + W), 1);
      // even and odd elements: the west and east taps of pixels 0..7, in order
      const __m256 v00 = _mm256_shuffle_ps(n01, n23, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 v01 = _mm256_shuffle_ps(n01, n23, _MM_SHUFFLE(3, 1, 3, 1));
      const __m256 v10 = _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 v11 = _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 1, 3, 1));
      const __m256 r = _mm256_add_ps(
          _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(v00, A00), _mm256_mul_ps(v01, A01)), _mm256_mul_ps(v10, A10)),
          _mm256_mul_ps(v11, A11));
      _mm256_storeu_ps(out + c * out_plane + q, r);
    }
  }
  if (q < w) {  // the last pixels, fewer than 8
    const int n = w - q;
    bilinear_taps(ix + q, iy + q, n, W, H, a00, a01, a10, a11, offs, masks);
    for (int k = 0; k < n; ++k)
      bilinear_checked_pixel(img, C, plane, W, out, out_plane, q + k, a00[k], a01[k], a10[k], a11[k], offs[k],
                             masks[k]);
  }
}

bool avx2_enabled() {
  static const bool enabled = [] {
    const char* isa = std::getenv("STN_NATIVE_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return enabled;
}
#else
bool avx2_enabled() { return false; }
#endif

// One output row from its normalized coordinates (s.gx, s.gy).
void sample_row(const float* img, int C, int H, int W, float* out, int64_t out_plane, int w, const Options& o,
                RowScratch& s) {
  Axis ax = make_axis(W, o.align_corners), ay = make_axis(H, o.align_corners);
  int64_t plane = static_cast<int64_t>(H) * W;
  coordinate_pass(s.gx.data(), s.gy.data(), s.ix.data(), s.iy.data(), w, ax, ay, o.padding, o.mode != kBicubic);
#ifdef STN_AVX2_PATH
  if (o.mode == kBilinear && avx2_enabled()) {
    auto row = C == 3 ? bilinear_row_avx2<3> : C == 1 ? bilinear_row_avx2<1> : bilinear_row_avx2<0>;
    row(img, C, plane, W, H, out, out_plane, w, s.ix.data(), s.iy.data());
    return;
  }
#endif
  if (o.mode == kBilinear) {
    bilinear_taps(s.ix.data(), s.iy.data(), w, W, H, s.w00.data(), s.w01.data(), s.w10.data(), s.w11.data(),
                  s.off.data(), s.mask.data());
    make_segments(s.mask.data(), w, 15, s.segs);
    bilinear_channels(img, C, plane, W, out, out_plane, s);
  } else if (o.mode == kNearest) {
    nearest_taps(s.ix.data(), s.iy.data(), w, W, H, s.off.data(), s.mask.data());
    nearest_channels(img, C, plane, out, out_plane, w, s.off.data(), s.mask.data());
  } else {
    bicubic_taps(s.ix.data(), s.iy.data(), w, ax, ay, o.padding, s);
    bicubic_channels(img, C, plane, W, out, out_plane, w, s);
  }
}

STN_CLONES void deinterleave(const float* grid_row, float* gx, float* gy, int w) {
  for (int j = 0; j < w; ++j) { gx[j] = grid_row[2 * j]; gy[j] = grid_row[2 * j + 1]; }
}

STN_CLONES void warp_row(const float* t, bool projective, const float* xb, float yb, float* gx, float* gy, int w) {
  if (projective) {
    for (int j = 0; j < w; ++j) warp_point(t, true, xb[j], yb, &gx[j], &gy[j]);
  } else {
    for (int j = 0; j < w; ++j) warp_point(t, false, xb[j], yb, &gx[j], &gy[j]);
  }
}

}  // namespace

const char* cpu_path() { return avx2_enabled() ? "avx2" : "baseline"; }

int rows_per_task(int w, int C) {
  // About 16k output values a task: enough work to amortise a task, enough tasks to balance.
  int64_t per_row = static_cast<int64_t>(std::max(w, 1)) * std::max(C, 1);
  return static_cast<int>(std::max<int64_t>(1, 16384 / per_row));
}

void grid_sample_rows(const SampleJob& job, int n, int row_begin, int row_end) {
  RowScratch& s = tls_scratch;
  s.resize(job.w, job.opt.mode);
  const float* img = job.image + static_cast<int64_t>(n) * job.C * job.H * job.W;
  int64_t out_plane = static_cast<int64_t>(job.h) * job.w;
  for (int i = row_begin; i < row_end; ++i) {
    float* out = job.out + static_cast<int64_t>(n) * job.C * out_plane + static_cast<int64_t>(i) * job.w;
    if (job.grid) {
      const float* g = job.grid + (static_cast<int64_t>(n) * job.h + i) * job.w * 2;
      deinterleave(g, s.gx.data(), s.gy.data(), job.w);
    } else {
      float yb = base_coordinate(i, job.h, job.opt.align_corners);
      warp_row(job.theta + static_cast<int64_t>(n) * (job.projective ? 9 : 6), job.projective, job.xbase, yb,
               s.gx.data(), s.gy.data(), job.w);
    }
    sample_row(img, job.C, job.H, job.W, out, out_plane, job.w, job.opt, s);
  }
}

}  // namespace stn
