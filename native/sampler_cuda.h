// CUDA kernels of the sampler family (sampler_cuda.cu); called by ops.cc in the CUDA library.
#pragma once

#include <string>

#include "sampler_cpu.h"

namespace stn {

// Run ``job`` (device pointers) on ``stream`` (onnxruntime's compute stream, a cudaStream_t);
// returns "" or the CUDA error. Asynchronous: no synchronisation here.
std::string cuda_sample(const SampleJob& job, void* stream);

}  // namespace stn
