// CUDA kernels of the sampler family: ai.stn::GridSample and ai.stn::Warp on the CUDA execution
// provider, with the semantics of sampler.h (the CPU kernels' formulas, so CPU and GPU agree).
// One thread per output pixel (image, row, column), looping over the channels with the taps
// computed once; launched on onnxruntime's compute stream.
#include <cuda_runtime.h>

#include "sampler_cuda.h"

namespace stn {
namespace {

struct DevJob {
  const float* image;
  const float* grid;
  const float* theta;
  bool projective;
  float* out;
  int N, C, H, W, h, w;
  Options opt;
};

__device__ __forceinline__ float read(const float* p, int x, int y, int W, int H) {
  return (x >= 0 && x < W && y >= 0 && y < H) ? __ldg(p + static_cast<long long>(y) * W + x) : 0.f;
}

__global__ void sample_kernel(DevJob j) {
  long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  long long total = static_cast<long long>(j.N) * j.h * j.w;
  if (idx >= total) return;
  int col = static_cast<int>(idx % j.w);
  int row = static_cast<int>((idx / j.w) % j.h);
  int n = static_cast<int>(idx / (static_cast<long long>(j.w) * j.h));
  float gx, gy;
  if (j.grid) {
    const float* g = j.grid + idx * 2;
    gx = g[0];
    gy = g[1];
  } else {
    float xb = base_coordinate(col, j.w, j.opt.align_corners);
    float yb = base_coordinate(row, j.h, j.opt.align_corners);
    warp_point(j.theta + n * (j.projective ? 9 : 6), j.projective, xb, yb, &gx, &gy);
  }
  Axis ax = make_axis(j.W, j.opt.align_corners), ay = make_axis(j.H, j.opt.align_corners);
  long long plane = static_cast<long long>(j.H) * j.W;
  long long out_plane = static_cast<long long>(j.h) * j.w;
  const float* img = j.image + static_cast<long long>(n) * j.C * plane;
  float* out = j.out + static_cast<long long>(n) * j.C * out_plane + static_cast<long long>(row) * j.w + col;
  if (j.opt.mode == kBicubic) {
    float ix = unnormalize(gx, ax), iy = unnormalize(gy, ay);
    float xf = floorf(ix), yf = floorf(iy);
    float cx[4], cy[4];
    cubic_coefficients(ix - xf, cx);
    cubic_coefficients(iy - yf, cy);
    int xi[4], yi[4];
    for (int t = 0; t < 4; ++t) {
      xi[t] = cubic_tap(xf - 1.f + t, ax, j.opt.padding);
      yi[t] = cubic_tap(yf - 1.f + t, ay, j.opt.padding);
    }
    for (int c = 0; c < j.C; ++c) {
      const float* p = img + c * plane;
      float rows[4];
      for (int r = 0; r < 4; ++r) {
        float v[4];
        for (int t = 0; t < 4; ++t) v[t] = (xi[t] >= 0 && yi[r] >= 0) ? __ldg(p + static_cast<long long>(yi[r]) * j.W + xi[t]) : 0.f;
        rows[r] = v[0] * cx[0] + v[1] * cx[1] + v[2] * cx[2] + v[3] * cx[3];
      }
      out[c * out_plane] = rows[0] * cy[0] + rows[1] * cy[1] + rows[2] * cy[2] + rows[3] * cy[3];
    }
    return;
  }
  float ix = pad_coordinate(unnormalize(gx, ax), ax, j.opt.padding);
  float iy = pad_coordinate(unnormalize(gy, ay), ay, j.opt.padding);
  if (j.opt.mode == kNearest) {
    int x = safe_index(nearbyintf(ix), j.W), y = safe_index(nearbyintf(iy), j.H);
    for (int c = 0; c < j.C; ++c) out[c * out_plane] = read(img + c * plane, x, y, j.W, j.H);
    return;
  }
  float xf = floorf(ix), yf = floorf(iy);
  float fw = ix - xf, fn = iy - yf;
  float fe = 1.f - fw, fs = 1.f - fn;
  float w00 = fs * fe, w01 = fs * fw, w10 = fn * fe, w11 = fn * fw;
  int x0 = safe_index(xf, j.W), y0 = safe_index(yf, j.H);
  for (int c = 0; c < j.C; ++c) {
    const float* p = img + c * plane;
    out[c * out_plane] = read(p, x0, y0, j.W, j.H) * w00 + read(p, x0 + 1, y0, j.W, j.H) * w01 +
                         read(p, x0, y0 + 1, j.W, j.H) * w10 + read(p, x0 + 1, y0 + 1, j.W, j.H) * w11;
  }
}

}  // namespace

std::string cuda_sample(const SampleJob& job, void* stream) {
  DevJob d{job.image, job.grid, job.theta, job.projective, job.out, job.N, job.C, job.H, job.W, job.h, job.w, job.opt};
  long long total = static_cast<long long>(job.N) * job.h * job.w;
  if (total == 0) return "";
  const int threads = 256;
  long long blocks = (total + threads - 1) / threads;
  if (blocks > 0x7fffffffLL) return "output too large for one launch";
  sample_kernel<<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(d);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace stn
