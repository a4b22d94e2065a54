// The sampler family's semantics, shared by the CPU (sampler_cpu.cc) and CUDA (sampler_cuda.cu)
// kernels: torch.nn.functional.grid_sample, case for case, as PyTorch's CPU kernel computes it
// (aten/src/ATen/native/cpu/GridSamplerKernel.cpp): the same formulas in the same order, so
// results agree to float rounding. Compiled with -ffp-contract=off so that every dispatch target
// (AVX-512, AVX2, baseline) gives the same bits.
//
// Conventions (docs/DESIGN.md): NCHW float32; grid values are normalized (x, y) in [-1, 1];
// align_corners=false puts the centre of pixel i of an axis of size S at (2i + 1)/S - 1.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define STN_HD __host__ __device__ __forceinline__
#else
#define STN_HD inline __attribute__((always_inline))
#endif

namespace stn {

enum Mode : int { kBilinear = 0, kNearest = 1, kBicubic = 2 };
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

struct Options {
  int mode = kBilinear;
  int padding = kZeros;
  bool align_corners = false;
};

// Per-axis constants of torch's ComputeLocation: unnormalize, clip, reflect.
struct Axis {
  int size;
  float scale;       // align_corners ? (S-1)/2 : S/2
  float max_val;     // S - 1
  float low;         // align_corners ? 0 : -0.5 (reflection)
  float twice_span;  // align_corners ? 2(S-1) : 2S
  bool align_corners;
};

STN_HD Axis make_axis(int size, bool align_corners) {
  Axis a;
  a.size = size;
  a.align_corners = align_corners;
  a.scale = align_corners ? static_cast<float>(size - 1) / 2.f : static_cast<float>(size) / 2.f;
  a.max_val = static_cast<float>(size - 1);
  a.low = align_corners ? 0.f : -0.5f;
  a.twice_span = align_corners ? static_cast<float>(2 * (size - 1)) : static_cast<float>(2 * size);
  return a;
}

// Normalized coordinate -> pixel coordinate (pixel centres at integers).
STN_HD float unnormalize(float x, const Axis& a) {
  return a.align_corners ? (x + 1.f) * a.scale : (x + 1.f) * a.scale - 0.5f;
}

// Clamp to [0, S-1]; NaN becomes 0 (as torch's vectorised clip does).
STN_HD float clip(float x, const Axis& a) {
  float y = x > 0.f ? x : 0.f;  // NaN -> 0
  return y < a.max_val ? y : a.max_val;
}

// Reflect by the image borders (the pixel edges without align_corners, the centres with).
STN_HD float reflect(float x, const Axis& a) {
  if (a.twice_span <= 0.f) return 0.f;
  float abs_in = fabsf(x - a.low);
  float double_flips = truncf(abs_in / a.twice_span);
  float extra = abs_in - double_flips * a.twice_span;
  float other = a.twice_span - extra;
  float m = extra < other ? extra : other;
  return m + a.low;
}

// Border or reflection padding applied to a pixel coordinate (zeros: unchanged).
STN_HD float pad_coordinate(float x, const Axis& a, int padding) {
  if (padding == kBorder) return clip(x, a);
  if (padding == kReflection) return clip(reflect(x, a), a);
  return x;
}

// Float pixel index -> int, with anything outside (-2, S+1) (and NaN, inf) sent to -2: out of bounds.
STN_HD int safe_index(float xf, int size) {
  return (xf > -2.f && xf < static_cast<float>(size) + 1.f) ? static_cast<int>(xf) : -2;
}

// Cubic convolution (A = -0.75, as torch).
STN_HD void cubic_coefficients(float t, float c[4]) {
  const float A = -0.75f;
  float x1 = t + 1.f;
  c[0] = ((A * x1 - 5.f * A) * x1 + 8.f * A) * x1 - 4.f * A;
  float x = t;
  c[1] = ((A + 2.f) * x - (A + 3.f)) * x * x + 1.f;
  float x2 = 1.f - t;
  c[2] = ((A + 2.f) * x2 - (A + 3.f)) * x2 * x2 + 1.f;
  float x3 = x2 + 1.f;
  c[3] = ((A * x3 - 5.f * A) * x3 + 8.f * A) * x3 - 4.f * A;
}

// A bicubic tap's index along one axis: padding applied to the (float) tap coordinate, then
// bounds-checked; -1 when the tap reads zero.
STN_HD int cubic_tap(float x, const Axis& a, int padding) {
  float p = pad_coordinate(x, a, padding);
  int i = safe_index(p, a.size);
  return (i >= 0 && i < a.size) ? i : -1;
}

// Base (output) coordinate of the fused warp: torch's affine_grid base, in double then rounded
// like numpy's models.frames.pixel_centres.
STN_HD float base_coordinate(int i, int size, bool align_corners) {
  if (align_corners) return size <= 1 ? 0.f : static_cast<float>(-1.0 + 2.0 * i / (size - 1));
  return static_cast<float>((2.0 * i + 1.0) / size - 1.0);
}

// theta (row-major [2,3] or [3,3]) applied to base (xb, yb, 1) -> normalized (x, y); projective
// divides by z, kept away from 0 with its sign as models.transforms.Projective does.
STN_HD void warp_point(const float* t, bool projective, float xb, float yb, float* gx, float* gy) {
  float x = xb * t[0] + yb * t[1] + t[2];
  float y = xb * t[3] + yb * t[4] + t[5];
  if (projective) {
    float z = xb * t[6] + yb * t[7] + t[8];
    z = fabsf(z) < 1e-6f ? 1e-6f : z;
    x = x / z;
    y = y / z;
  }
  *gx = x;
  *gy = y;
}

}  // namespace stn
