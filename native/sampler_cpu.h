// CPU kernels of the sampler family (sampler_cpu.cc); the onnxruntime glue is in ops.cc.
#pragma once

#include <cstdint>

#include "sampler.h"

namespace stn {

// One call of GridSample (grid set) or Warp (theta set): image [N,C,H,W] -> out [N,C,h,w].
struct SampleJob {
  const float* image = nullptr;
  const float* grid = nullptr;   // [N,h,w,2] (GridSample)
  const float* theta = nullptr;  // [N,2,3] or [N,3,3] (Warp)
  const float* xbase = nullptr;  // [w] base x coordinates (Warp)
  bool projective = false;
  float* out = nullptr;
  int N = 0, C = 0, H = 0, W = 0, h = 0, w = 0;
  Options opt;
};

// The bilinear path in use: "avx2" or "baseline" (STN_NATIVE_ISA=baseline forces it).
const char* cpu_path();

// Rows of one task (the band size used to split the work).
int rows_per_task(int w, int C);

// Output rows [row_begin, row_end) of image n.
void grid_sample_rows(const SampleJob& job, int n, int row_begin, int row_end);

}  // namespace stn
