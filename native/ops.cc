// onnxruntime glue of the sampler family: the ai.stn custom-op domain and RegisterCustomOps.
//
//   ai.stn::GridSample(X [N,C,H,W], Grid [N,h,w,2]) -> Y [N,C,h,w]
//   ai.stn::Warp(X [N,C,H,W], theta [N,2,3] | [N,3,3], size_like [h,w,...]) -> Y [N,C,h,w]
//
// Attributes of both: mode (bilinear|nearest|bicubic; ONNX-20's linear|cubic also read),
// padding_mode (zeros|border|reflection), align_corners (0|1): torch.nn.functional.grid_sample's
// semantics. Warp samples at theta applied to the output's base coordinates (F.affine_grid's, for
// the same align_corners; projective theta divides by z), computed on the fly; only the shape of
// size_like is read (the stn sampler feeds its base_grid [h, w, 3]).
//
// Built twice: libstn_sampler.so (CPU kernels) and, where nvcc is found, libstn_sampler_cuda.so
// (STN_WITH_CUDA: the same CPU kernels plus CUDA kernels under the same names), so a session
// registers exactly one library. Neither links libonnxruntime: the OrtApi comes from the
// OrtApiBase that onnxruntime passes to RegisterCustomOps. Errors come back as OrtStatus (the
// V2 callbacks), never as exceptions across the C ABI.
#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "sampler_cpu.h"
#ifdef STN_WITH_CUDA
#include "sampler_cuda.h"
#endif

#define STN_STR2(x) #x
#define STN_STR(x) STN_STR2(x)

namespace {

using stn::Options;
using stn::SampleJob;

const char* const kDomain = "ai.stn";
const char* const kCpu = "CPUExecutionProvider";
const char* const kCuda = "CUDAExecutionProvider";

struct Error : std::runtime_error {
  OrtErrorCode code;
  Error(const std::string& m, OrtErrorCode c = ORT_INVALID_ARGUMENT) : std::runtime_error(m), code(c) {}
};

void check(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return;
  std::string msg = api->GetErrorMessage(status);
  OrtErrorCode code = api->GetErrorCode(status);
  api->ReleaseStatus(status);
  throw Error(msg, code);
}

struct OpDef {
  OrtCustomOp base;  // first member: onnxruntime hands back &base
  const char* name;
  const char* provider;
  bool warp;
};

const OpDef& def(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

struct Kernel {
  const OrtApi* api;
  Options opt;
  bool warp;
  bool cuda;
  std::string name;
};

std::string attr_string(const OrtApi* api, const OrtKernelInfo* info, const char* key, const char* fallback) {
  size_t size = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_string(info, key, nullptr, &size);
  if (st != nullptr) {  // absent: the ONNX default
    api->ReleaseStatus(st);
    return fallback;
  }
  std::string value(size, '\0');
  check(api, api->KernelInfoGetAttribute_string(info, key, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);
  return value;
}

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* key, int64_t fallback) {
  int64_t value = fallback;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, key, &value);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

Options parse_options(const OrtApi* api, const OrtKernelInfo* info, const std::string& op) {
  Options o;
  std::string mode = attr_string(api, info, "mode", "bilinear");
  if (mode == "bilinear" || mode == "linear") o.mode = stn::kBilinear;
  else if (mode == "nearest") o.mode = stn::kNearest;
  else if (mode == "bicubic" || mode == "cubic") o.mode = stn::kBicubic;
  else throw Error(op + ": unknown mode '" + mode + "' (bilinear, nearest or bicubic)");
  std::string padding = attr_string(api, info, "padding_mode", "zeros");
  if (padding == "zeros") o.padding = stn::kZeros;
  else if (padding == "border") o.padding = stn::kBorder;
  else if (padding == "reflection") o.padding = stn::kReflection;
  else throw Error(op + ": unknown padding_mode '" + padding + "' (zeros, border or reflection)");
  int64_t ac = attr_int(api, info, "align_corners", 0);
  if (ac != 0 && ac != 1) throw Error(op + ": align_corners must be 0 or 1, got " + std::to_string(ac));
  o.align_corners = ac == 1;
  return o;
}

struct Tensor {
  const OrtValue* value = nullptr;
  std::vector<int64_t> dims;
  const float* data = nullptr;
};

std::string shape_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

Tensor input(const OrtApi* api, OrtKernelContext* ctx, size_t i, const std::string& op, const char* what,
             bool need_data = true) {
  Tensor t;
  check(api, api->KernelContext_GetInput(ctx, i, &t.value));
  if (t.value == nullptr) throw Error(op + ": input " + what + " is missing");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(t.value, &info));
  size_t n = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtStatus* st = api->GetDimensionsCount(info, &n);
  if (st == nullptr) {
    t.dims.resize(n);
    st = api->GetDimensions(info, t.dims.data(), n);
  }
  if (st == nullptr) st = api->GetTensorElementType(info, &type);
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, st);
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Error(op + ": input " + what + " must be float32");
  if (need_data) {
    void* p = nullptr;
    check(api, api->GetTensorMutableData(const_cast<OrtValue*>(t.value), &p));
    t.data = static_cast<const float*>(p);
  }
  return t;
}

int to_int(int64_t v, const std::string& op, const char* what) {
  if (v < 0 || v > INT_MAX) throw Error(op + ": " + what + " " + std::to_string(v) + " is out of range");
  return static_cast<int>(v);
}

struct CpuTask {
  const SampleJob* job;
  int tasks_per_image;
  int rows;
};

void run_task(void* data, size_t index) {
  const CpuTask& t = *static_cast<const CpuTask*>(data);
  int n = static_cast<int>(index / t.tasks_per_image);
  int band = static_cast<int>(index % t.tasks_per_image);
  int begin = band * t.rows;
  int end = std::min(begin + t.rows, t.job->h);
  stn::grid_sample_rows(*t.job, n, begin, end);
}

void compute(Kernel& k, OrtKernelContext* ctx) {
  const OrtApi* api = k.api;
  const std::string& op = k.name;
  Tensor x = input(api, ctx, 0, op, "X");
  if (x.dims.size() != 4) throw Error(op + ": X must be [N, C, H, W], got shape " + shape_str(x.dims));
  SampleJob job;
  job.opt = k.opt;
  job.image = x.data;
  job.N = to_int(x.dims[0], op, "batch");
  job.C = to_int(x.dims[1], op, "channels");
  job.H = to_int(x.dims[2], op, "height");
  job.W = to_int(x.dims[3], op, "width");
  Tensor g, theta, size_like;
  if (!k.warp) {
    g = input(api, ctx, 1, op, "Grid");
    if (g.dims.size() != 4 || g.dims[3] != 2 || g.dims[0] != x.dims[0])
      throw Error(op + ": Grid must be [N, h, w, 2] with N = " + std::to_string(x.dims[0]) + ", got shape " +
                  shape_str(g.dims));
    job.grid = g.data;
    job.h = to_int(g.dims[1], op, "grid height");
    job.w = to_int(g.dims[2], op, "grid width");
  } else {
    theta = input(api, ctx, 1, op, "theta");
    bool ok = theta.dims.size() == 3 && theta.dims[0] == x.dims[0] && theta.dims[2] == 3 &&
              (theta.dims[1] == 2 || theta.dims[1] == 3);
    if (!ok)
      throw Error(op + ": theta must be [N, 2, 3] (affine) or [N, 3, 3] (projective) with N = " +
                  std::to_string(x.dims[0]) + ", got shape " + shape_str(theta.dims));
    job.theta = theta.data;
    job.projective = theta.dims[1] == 3;
    size_like = input(api, ctx, 2, op, "size_like", false);
    if (size_like.dims.size() < 2)
      throw Error(op + ": size_like must have the output size as its first two dims [h, w, ...], got shape " +
                  shape_str(size_like.dims));
    job.h = to_int(size_like.dims[0], op, "output height");
    job.w = to_int(size_like.dims[1], op, "output width");
  }
  int64_t out_dims[4] = {job.N, job.C, job.h, job.w};
  OrtValue* out = nullptr;
  check(api, api->KernelContext_GetOutput(ctx, 0, out_dims, 4, &out));
  int64_t out_count = int64_t(job.N) * job.C * job.h * job.w;
  if (out_count == 0) return;
  if (job.H == 0 || job.W == 0)
    throw Error(op + ": X has an empty spatial size " + shape_str(x.dims) + "; nothing to sample from");
  if (int64_t(job.H) * job.W > INT_MAX - 2 * int64_t(job.W) - 2)
    throw Error(op + ": images of more than 2^31 pixels are not supported, got " + shape_str(x.dims));
  void* out_data = nullptr;
  check(api, api->GetTensorMutableData(out, &out_data));
  job.out = static_cast<float*>(out_data);

  if (k.cuda) {
#ifdef STN_WITH_CUDA
    void* stream = nullptr;
    check(api, api->KernelContext_GetGPUComputeStream(ctx, &stream));
    std::string err = stn::cuda_sample(job, stream);
    if (!err.empty()) throw Error(op + " (CUDA): " + err, ORT_RUNTIME_EXCEPTION);
#endif
    return;
  }
  std::vector<float> xbase;
  if (k.warp) {
    xbase.resize(job.w);
    for (int j = 0; j < job.w; ++j) xbase[j] = stn::base_coordinate(j, job.w, job.opt.align_corners);
    job.xbase = xbase.data();
  }
  CpuTask task{&job, 0, stn::rows_per_task(job.w, job.C)};
  task.tasks_per_image = (job.h + task.rows - 1) / task.rows;
  size_t total = size_t(job.N) * task.tasks_per_image;
  if (total == 1) {
    run_task(&task, 0);
  } else {
    check(api, api->KernelContext_ParallelFor(ctx, run_task, total, 0, &task));
  }
}

// ---- OrtCustomOp callbacks ------------------------------------------------------------------
OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                        void** kernel) {
  const OpDef& d = def(op);
  try {
    std::string name = std::string(kDomain) + "::" + d.name;
    auto* k = new Kernel{api, parse_options(api, info, name), d.warp, d.provider == kCuda, name};
    *kernel = k;
    return nullptr;
  } catch (const Error& e) {
    return api->CreateStatus(e.code, e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

OrtStatusPtr ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  Kernel& k = *static_cast<Kernel*>(kernel);
  try {
    compute(k, ctx);
    return nullptr;
  } catch (const Error& e) {
    return k.api->CreateStatus(e.code, e.what());
  } catch (const std::exception& e) {
    return k.api->CreateStatus(ORT_FAIL, (k.name + ": " + e.what()).c_str());
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def(op).name; }
const char* ORT_API_CALL get_provider(const OrtCustomOp* op) { return def(op).provider; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL input_count(const OrtCustomOp* op) { return def(op).warp ? 3 : 2; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL default_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL no_map(int** a, int** b) {
  *a = nullptr;
  *b = nullptr;
  return 0;
}
void ORT_API_CALL release_map(int*, int*) {}

OpDef make_op(const char* name, const char* provider, bool warp) {
  OpDef d;
  std::memset(&d, 0, sizeof(d));
  OrtCustomOp& o = d.base;
  o.version = ORT_API_VERSION;
  o.GetName = get_name;
  o.GetExecutionProviderType = get_provider;
  o.GetInputType = float_type;
  o.GetInputTypeCount = input_count;
  o.GetOutputType = float_type;
  o.GetOutputTypeCount = output_count;
  o.KernelDestroy = destroy_kernel;
  o.GetInputCharacteristic = required;
  o.GetOutputCharacteristic = required;
  o.GetInputMemoryType = default_memory;
  o.GetVariadicInputMinArity = one;
  o.GetVariadicInputHomogeneity = one;
  o.GetVariadicOutputMinArity = one;
  o.GetVariadicOutputHomogeneity = one;
  o.CreateKernelV2 = create_kernel;
  o.KernelComputeV2 = compute_kernel;
  o.GetStartVersion = start_version;
  o.GetEndVersion = end_version;
  o.GetMayInplace = no_map;
  o.ReleaseMayInplace = release_map;
  o.GetAliasMap = no_map;
  o.ReleaseAliasMap = release_map;
  d.name = name;
  d.provider = provider;
  d.warp = warp;
  return d;
}

OpDef g_ops[] = {
    make_op("GridSample", kCpu, false),
    make_op("Warp", kCpu, true),
#ifdef STN_WITH_CUDA
    make_op("GridSample", kCuda, false),
    make_op("Warp", kCuda, true),
#endif
};

std::mutex g_lock;
OrtCustomOpDomain* g_domain = nullptr;  // shared by every session; lives as long as the process

}  // namespace

extern "C" {

// What this build is (read by native/__init__.py with ctypes).
__attribute__((visibility("default"))) const char* stn_native_info() {
#ifdef STN_WITH_CUDA
#define STN_KERNELS "CPU + CUDA"
#else
#define STN_KERNELS "CPU"
#endif
  static const std::string info = std::string("stn native sampler: ai.stn GridSample, Warp; " STN_KERNELS
                                              "; onnxruntime C API " STN_STR(ORT_API_VERSION) "; CPU bilinear path ") +
                                  stn::cpu_path();
  return info.c_str();
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("stn native sampler: needs onnxruntime C API ") + STN_STR(ORT_API_VERSION) +
                      " or later; this onnxruntime is " + api_base->GetVersionString();
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  std::lock_guard<std::mutex> guard(g_lock);
  if (g_domain == nullptr) {
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
    for (OpDef& d : g_ops) {
      if (OrtStatus* st = api->CustomOpDomain_Add(domain, &d.base)) {
        api->ReleaseCustomOpDomain(domain);
        return st;
      }
    }
    g_domain = domain;
  }
  return api->AddCustomOpDomain(options, g_domain);
}

}  // extern "C"
