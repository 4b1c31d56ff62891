// Shared by the launchers: errors, the CUDA driver loaded at run time, variant selection, parameter packing, launch.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dfk_variant.h"
#include "dreamfuse_kernels.h"

namespace dfk {

// ----------------------------------------------------------------------------------------------- errors
// Sets this thread's dfk_last_error() to the formatted message and returns `status`.
dfk_status fail(dfk_status status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

// ----------------------------------------------------------------------------------------------- driver
// The driver API entry points this library uses, resolved from libcuda.so.1 by dlopen/dlsym: the library links no
// CUDA library, so it loads (and its host-side checks run) on machines without a GPU.
struct Driver {
    decltype(&::cuInit) Init = nullptr;
    decltype(&::cuGetErrorName) GetErrorName = nullptr;
    decltype(&::cuGetErrorString) GetErrorString = nullptr;
    decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
    decltype(&::cuCtxGetDevice) CtxGetDevice = nullptr;
    decltype(&::cuDeviceGetAttribute) DeviceGetAttribute = nullptr;
    decltype(&::cuModuleLoadData) ModuleLoadData = nullptr;
    decltype(&::cuModuleGetFunction) ModuleGetFunction = nullptr;
    decltype(&::cuFuncSetAttribute) FuncSetAttribute = nullptr;
    decltype(&::cuLaunchKernel) LaunchKernel = nullptr;
    decltype(&::cuCtxGetId) CtxGetId = nullptr;  // optional (CUDA 12.0+): tells a new context from a reused handle
};

// The loaded driver, or nullptr with the reason set as the error (DFK_ERR_NO_DRIVER) in *status.
const Driver* driver(dfk_status* status);
// "cuModuleLoadData: CUDA_ERROR_INVALID_IMAGE (device kernel image is invalid)"
dfk_status cuda_fail(const Driver& d, CUresult r, const char* what);

// ----------------------------------------------------------------------------------------------- variants
int variant_count();
const dfk_variant& variant(int index);
long long variant_const(const dfk_variant& v, const char* name);  // -1 when absent

// ----------------------------------------------------------------------------------------------- parameters
// The kernel parameters of one launch, in order. The "name:type" list it builds must equal the variant's `params`
// (generated from the Triton signature): a launcher that drifts from the kernel fails with DFK_ERR_INTERNAL
// instead of passing misplaced arguments.
class Params {
  public:
    explicit Params(const char* op) : op_(op) {}
    void ptr(const char* name, const void* p);
    void i32(const char* name, int64_t value);  // range-checked: the kernels take i32
    void f32(const char* name, double value);
    void scratch();                             // Triton's global and profile scratch pointers: NULL (size 0)
    const std::string& signature() const { return sig_; }
    std::string describe() const;  // "name=value,..." for dry-run records
    void** values() { return ptrs_.data(); }
    int count() const { return static_cast<int>(vals_.size()); }
    dfk_status status() const { return status_; }

  private:
    union Value {
        uint64_t u64;
        int32_t i32;
        float f32;
    };
    void add(const char* name, const char* type, Value v);
    const char* op_;
    std::string sig_;
    std::vector<Value> vals_;
    std::vector<void*> ptrs_;
    dfk_status status_ = DFK_OK;
};

// ----------------------------------------------------------------------------------------------- one op call
struct Device {
    int sm = 0;          // major * 10 + minor
    int num_sms = 0;
    int smem_optin = 0;  // max dynamic shared memory per block (opt-in)
    CUcontext ctx = nullptr;
    unsigned long long ctx_id = 0;
};

// One launcher call: clears this thread's error and launch records, resolves the device (or the dry run's
// pretend device), selects variants and launches them.
class Call {
  public:
    explicit Call(const char* op);
    const char* op() const { return op_; }
    // The device the launches go to (dry run: the pretend one). Loads the driver on first use.
    dfk_status device(const Device** out);
    // The variant of `op` for `key` best suited to the device: same major arch, highest minor <= the device's.
    dfk_status select(const char* op, const std::string& key, int* index);
    // Launch variant `index` on grid (gx, gy, gz) with `params` (checked against the variant's signature).
    dfk_status launch(int index, Params& params, uint64_t gx, uint64_t gy, uint64_t gz, dfk_stream stream);

  private:
    const char* op_;
    Device dev_;
    bool have_dev_ = false;
    bool dry_ = false;
};

// ----------------------------------------------------------------------------------------------- tensor checks
const char* dtype_name(dfk_dtype t);  // "fp16", "bf16", "fp32", "i32", "i64" (the variant keys' spelling)
size_t dtype_size(dfk_dtype t);
int64_t numel(const dfk_tensor& t);
bool is_contiguous(const dfk_tensor& t);
std::string shape_str(const dfk_tensor& t);  // "(2, 3, 77, 40)"
// Non-null, a valid dtype and rank 0..DFK_MAX_DIMS, sizes >= 0, and a 16-byte-aligned non-null pointer unless
// empty. `name` is the argument's name in messages ("attention: q ...").
dfk_status check_tensor(const char* op, const char* name, const dfk_tensor* t, int ndim);

constexpr uint64_t cdiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

}  // namespace dfk

#define DFK_TRY(expr)                          \
    do {                                       \
        dfk_status dfk_try_status_ = (expr);   \
        if (dfk_try_status_ != DFK_OK)         \
            return dfk_try_status_;            \
    } while (0)
