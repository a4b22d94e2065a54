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
// (GCC target_clones; no -march=native), the loader picks one at run time.
#include "sampler_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

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
  std::vector<int32_t> off;
  std::vector<uint8_t> mask;
  std::vector<int32_t> cidx;  // bicubic: 4 x-taps and 4 y-taps per pixel
  std::vector<float> cw;      // bicubic: 4 x and 4 y coefficients per pixel
  void resize(int w, int mode) {
    if (static_cast<int>(gx.size()) >= w && (mode != kBicubic || static_cast<int>(cidx.size()) >= 8 * w)) return;
    gx.resize(w); gy.resize(w); ix.resize(w); iy.resize(w);
    w00.resize(w); w01.resize(w); w10.resize(w); w11.resize(w);
    off.resize(w); mask.resize(w);
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
// (bit 0 nw, 1 ne, 2 sw, 3 se; 15: all inside, the fast path).
STN_CLONES void bilinear_taps(const float* ix, const float* iy, int w, int W, int H, RowScratch& s) {
  for (int j = 0; j < w; ++j) {
    float xf = floorf(ix[j]), yf = floorf(iy[j]);
    float fw = ix[j] - xf, fn = iy[j] - yf;  // east and south weights
    float fe = 1.f - fw, fs = 1.f - fn;
    s.w00[j] = fs * fe; s.w01[j] = fs * fw; s.w10[j] = fn * fe; s.w11[j] = fn * fw;
    int x0 = safe_index(xf, W), y0 = safe_index(yf, H);
    bool xw = x0 >= 0 && x0 < W, xe = x0 + 1 >= 0 && x0 + 1 < W;
    bool yn = y0 >= 0 && y0 < H, ys = y0 + 1 >= 0 && y0 + 1 < H;
    s.mask[j] = static_cast<uint8_t>((yn && xw) | ((yn && xe) << 1) | ((ys && xw) << 2) | ((ys && xe) << 3));
    s.off[j] = y0 * W + x0;
  }
}

STN_CLONES void bilinear_channels(const float* img, int C, int64_t plane, int W, float* out, int64_t out_plane, int w,
                                  const RowScratch& s) {
  const float* w00 = s.w00.data(); const float* w01 = s.w01.data();
  const float* w10 = s.w10.data(); const float* w11 = s.w11.data();
  const int32_t* off = s.off.data(); const uint8_t* mask = s.mask.data();
  for (int c = 0; c < C; ++c) {
    const float* p = img + c * plane;
    float* o = out + c * out_plane;
    int j = 0;
    while (j < w) {
      int k = j;
      while (k < w && mask[k] == 15) ++k;
      for (int q = j; q < k; ++q) {  // fast path: all four taps inside
        const float* b = p + off[q];
        o[q] = b[0] * w00[q] + b[1] * w01[q] + b[W] * w10[q] + b[W + 1] * w11[q];
      }
      for (j = k; j < w && mask[j] != 15; ++j) {  // checked path: missing taps read zero
        uint8_t m = mask[j];
        const float* b = p + off[j];
        float v00 = (m & 1) ? b[0] : 0.f, v01 = (m & 2) ? b[1] : 0.f;
        float v10 = (m & 4) ? b[W] : 0.f, v11 = (m & 8) ? b[W + 1] : 0.f;
        o[j] = v00 * w00[j] + v01 * w01[j] + v10 * w10[j] + v11 * w11[j];
      }
    }
  }
}

STN_CLONES void nearest_taps(const float* ix, const float* iy, int w, int W, int H, RowScratch& s) {
  for (int j = 0; j < w; ++j) {
    int x = safe_index(nearbyintf(ix[j]), W), y = safe_index(nearbyintf(iy[j]), H);
    bool in = x >= 0 && x < W && y >= 0 && y < H;
    s.mask[j] = in ? 1 : 0;
    s.off[j] = in ? y * W + x : 0;
  }
}

STN_CLONES void nearest_channels(const float* img, int C, int64_t plane, float* out, int64_t out_plane, int w,
                                 const RowScratch& s) {
  const int32_t* off = s.off.data(); const uint8_t* mask = s.mask.data();
  for (int c = 0; c < C; ++c) {
    const float* p = img + c * plane;
    float* o = out + c * out_plane;
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

// One output row from its normalized coordinates (s.gx, s.gy).
void sample_row(const float* img, int C, int H, int W, float* out, int64_t out_plane, int w, const Options& o,
                RowScratch& s) {
  Axis ax = make_axis(W, o.align_corners), ay = make_axis(H, o.align_corners);
  int64_t plane = static_cast<int64_t>(H) * W;
  coordinate_pass(s.gx.data(), s.gy.data(), s.ix.data(), s.iy.data(), w, ax, ay, o.padding, o.mode != kBicubic);
  if (o.mode == kBilinear) {
    bilinear_taps(s.ix.data(), s.iy.data(), w, W, H, s);
    bilinear_channels(img, C, plane, W, out, out_plane, w, s);
  } else if (o.mode == kNearest) {
    nearest_taps(s.ix.data(), s.iy.data(), w, W, H, s);
    nearest_channels(img, C, plane, out, out_plane, w, s);
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
