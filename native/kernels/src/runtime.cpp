// Errors, the driver loaded at run time, variant selection, parameter packing and launches.
#include <dlfcn.h>

#include <cinttypes>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "internal.h"

#define DFK_STR2(x) #x
#define DFK_STR(x) DFK_STR2(x)  // the symbol name after cuda.h's macros (cuLaunchKernel_ptsz under PTDS)

namespace dfk {

// ----------------------------------------------------------------------------------------------- errors
namespace {
thread_local std::string t_error;
thread_local std::vector<dfk_launch_record> t_records;
thread_local std::vector<std::string> t_record_params;  // dry runs: each launch's parameter values
thread_local int t_dry_sm = 0;
thread_local int t_dry_num_sms = 0;
}  // namespace

dfk_status fail(dfk_status status, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    t_error = buf;
    return status;
}

void clear_error() { t_error.clear(); }

// ----------------------------------------------------------------------------------------------- driver
namespace {
struct Loaded {
    Driver d;
    dfk_status status = DFK_OK;
    std::string error;
};

template <class F>
bool resolve(void* handle, const char* name, F& fn) {
    fn = reinterpret_cast<F>(dlsym(handle, name));
    return fn != nullptr;
}

Loaded load_driver() {
    Loaded out;
    // DFK_LIBCUDA overrides the library (tests point it at a missing file to check the no-driver path anywhere).
    const char* env = std::getenv("DFK_LIBCUDA");
    const char* path = env && *env ? env : "libcuda.so.1";
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        const char* why = dlerror();
        out.status = DFK_ERR_NO_DRIVER;
        out.error = std::string("CUDA driver not available: cannot load ") + path + " (" + (why ? why : "?") +
                    "); this machine has no NVIDIA driver";
        return out;
    }
    Driver& d = out.d;
    const char* missing = nullptr;
    if (!resolve(h, DFK_STR(cuInit), d.Init)) missing = DFK_STR(cuInit);
    else if (!resolve(h, DFK_STR(cuGetErrorName), d.GetErrorName)) missing = DFK_STR(cuGetErrorName);
    else if (!resolve(h, DFK_STR(cuGetErrorString), d.GetErrorString)) missing = DFK_STR(cuGetErrorString);
    else if (!resolve(h, DFK_STR(cuCtxGetCurrent), d.CtxGetCurrent)) missing = DFK_STR(cuCtxGetCurrent);
    else if (!resolve(h, DFK_STR(cuCtxGetDevice), d.CtxGetDevice)) missing = DFK_STR(cuCtxGetDevice);
    else if (!resolve(h, DFK_STR(cuDeviceGetAttribute), d.DeviceGetAttribute)) missing = DFK_STR(cuDeviceGetAttribute);
    else if (!resolve(h, DFK_STR(cuModuleLoadData), d.ModuleLoadData)) missing = DFK_STR(cuModuleLoadData);
    else if (!resolve(h, DFK_STR(cuModuleGetFunction), d.ModuleGetFunction)) missing = DFK_STR(cuModuleGetFunction);
    else if (!resolve(h, DFK_STR(cuFuncSetAttribute), d.FuncSetAttribute)) missing = DFK_STR(cuFuncSetAttribute);
    else if (!resolve(h, DFK_STR(cuLaunchKernel), d.LaunchKernel)) missing = DFK_STR(cuLaunchKernel);
    if (missing != nullptr) {
        out.status = DFK_ERR_NO_DRIVER;
        out.error = std::string("CUDA driver not usable: ") + path + " has no " + missing + " (driver too old?)";
        return out;
    }
    resolve(h, DFK_STR(cuCtxGetId), d.CtxGetId);  // optional
    CUresult r = d.Init(0);
    if (r != CUDA_SUCCESS) {
        const char* name = nullptr;
        d.GetErrorName(r, &name);
        out.status = DFK_ERR_CUDA;
        out.error = std::string("cuInit failed: ") + (name ? name : "?") + " (no usable GPU?)";
    }
    return out;  // the handle stays open for the life of the process
}
}  // namespace

const Driver* driver(dfk_status* status) {
    static const Loaded loaded = load_driver();  // once, thread-safe
    *status = loaded.status;
    if (loaded.status != DFK_OK) {
        fail(loaded.status, "%s", loaded.error.c_str());
        return nullptr;
    }
    return &loaded.d;
}

dfk_status cuda_fail(const Driver& d, CUresult r, const char* what) {
    const char* name = nullptr;
    const char* text = nullptr;
    d.GetErrorName(r, &name);
    d.GetErrorString(r, &text);
    return fail(DFK_ERR_CUDA, "%s: %s (%s)", what, name ? name : "?", text ? text : "?");
}

// ----------------------------------------------------------------------------------------------- parameters
void Params::add(const char* name, const char* type, Value v) {
    if (!sig_.empty())
        sig_ += ',';
    sig_ += name;
    sig_ += ':';
    sig_ += type;
    vals_.push_back(v);
}

void Params::ptr(const char* name, const void* p) {
    Value v{};
    v.u64 = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p));
    add(name, "p", v);
}

void Params::i32(const char* name, int64_t value) {
    Value v{};
    if (value < INT32_MIN || value > INT32_MAX) {
        if (status_ == DFK_OK)
            status_ = fail(DFK_ERR_INVALID_ARGUMENT,
                           "%s: %s = %" PRId64 " does not fit in int32 (the kernels index with 32-bit integers)", op_,
                           name, value);
    } else {
        v.i32 = static_cast<int32_t>(value);
    }
    add(name, "i32", v);
}

void Params::f32(const char* name, double value) {
    Value v{};
    v.f32 = static_cast<float>(value);
    add(name, "fp32", v);
}

std::string Params::describe() const {
    std::string out;
    size_t start = 0;
    for (size_t i = 0; i < vals_.size(); ++i) {
        size_t comma = sig_.find(',', start);
        std::string item = sig_.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        start = comma + 1;
        size_t colon = item.find(':');
        std::string type = item.substr(colon + 1);
        char buf[64];
        if (type == "p")
            std::snprintf(buf, sizeof buf, "0x%" PRIx64, vals_[i].u64);
        else if (type == "i32")
            std::snprintf(buf, sizeof buf, "%d", vals_[i].i32);
        else
            std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(vals_[i].f32));
        out += (i ? "," : "") + item.substr(0, colon) + "=" + buf;
    }
    return out;
}

void Params::scratch() {
    ptr("global_scratch", nullptr);
    ptr("profile_scratch", nullptr);
}

// ----------------------------------------------------------------------------------------------- calls
namespace {
// Per-block opt-in shared memory of the pretend device of a dry run.
int dry_smem_optin(int sm) {
    switch (sm) {
        case 80: case 87: return 166912;
        case 90: case 100: return 232448;
        default: return 101376;  // sm_86, sm_89 and others
    }
}

struct ModuleCache {
    std::mutex mu;
    std::map<std::tuple<CUcontext, unsigned long long, int>, CUfunction> fns;
};
ModuleCache& cache() {
    static ModuleCache c;
    return c;
}
}  // namespace

Call::Call(const char* op) : op_(op), dry_(t_dry_sm > 0) {
    clear_error();
    t_records.clear();
    t_record_params.clear();
}

dfk_status Call::device(const Device** out) {
    if (!have_dev_) {
        if (dry_) {
            dev_.sm = t_dry_sm;
            dev_.num_sms = t_dry_num_sms > 0 ? t_dry_num_sms : 108;
            dev_.smem_optin = dry_smem_optin(t_dry_sm);
        } else {
            dfk_status st;
            const Driver* d = driver(&st);
            if (d == nullptr)
                return st;
            CUcontext ctx = nullptr;
            CUresult r = d->CtxGetCurrent(&ctx);
            if (r != CUDA_SUCCESS)
                return cuda_fail(*d, r, "cuCtxGetCurrent");
            if (ctx == nullptr)
                return fail(DFK_ERR_CUDA, "%s: no current CUDA context on this thread (make one current first, "
                                          "e.g. cudaSetDevice or cuCtxSetCurrent)", op_);
            CUdevice dev;
            if ((r = d->CtxGetDevice(&dev)) != CUDA_SUCCESS)
                return cuda_fail(*d, r, "cuCtxGetDevice");
            int major = 0, minor = 0;
            if ((r = d->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) ||
                (r = d->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) ||
                (r = d->DeviceGetAttribute(&dev_.num_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)) ||
                (r = d->DeviceGetAttribute(&dev_.smem_optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                                           dev)))
                return cuda_fail(*d, r, "cuDeviceGetAttribute");
            dev_.sm = major * 10 + minor;
            dev_.ctx = ctx;
            if (d->CtxGetId != nullptr)
                d->CtxGetId(ctx, &dev_.ctx_id);
        }
        have_dev_ = true;
    }
    *out = &dev_;
    return DFK_OK;
}

dfk_status Call::select(const char* op, const std::string& key, int* index) {
    const Device* dev;
    DFK_TRY(device(&dev));
    int best = -1;
    bool key_found = false;
    std::set<std::string> keys;
    std::set<int> archs;
    for (int i = 0; i < variant_count(); ++i) {
        const dfk_variant& v = variant(i);
        if (std::strcmp(v.op, op) != 0)
            continue;
        keys.insert(v.key);
        if (key != v.key)
            continue;
        key_found = true;
        archs.insert(v.arch);
        // cubins run on the same major architecture at an equal or higher minor (sm_80 on sm_86/sm_89); sm_90a
        // only on sm_90
        if (v.arch / 10 == dev->sm / 10 && v.arch <= dev->sm && (best < 0 || v.arch > variant(best).arch))
            best = i;
    }
    if (!key_found) {
        std::string list;
        for (const std::string& k : keys) {
            if (list.size() > 400) {
                list += ", ...";
                break;
            }
            list += (list.empty() ? "" : ", ") + k;
        }
        return fail(DFK_ERR_NO_VARIANT, "%s: no embedded kernel for %s (embedded: %s)", op_, key.c_str(),
                    list.empty() ? "none" : list.c_str());
    }
    if (best < 0) {
        std::string list;
        for (int a : archs)
            list += (list.empty() ? "sm_" : ", sm_") + std::to_string(a);
        return fail(DFK_ERR_NO_VARIANT, "%s: no cubin for this GPU (sm_%d; embedded: %s): rebuild with "
                                        "-DDREAMFUSE_CUDA_ARCHS including %d", op_, dev->sm, list.c_str(), dev->sm);
    }
    *index = best;
    return DFK_OK;
}

dfk_status Call::launch(int index, Params& params, uint64_t gx, uint64_t gy, uint64_t gz, dfk_stream stream) {
    DFK_TRY(params.status());
    const dfk_variant& v = variant(index);
    if (params.signature() != v.params)
        return fail(DFK_ERR_INTERNAL, "%s: the launcher's parameters (%s) differ from kernel %s's (%s): the "
                                      "kernels changed; rebuild the library", op_, params.signature().c_str(),
                    v.name, v.params);
    if (gx > 0x7fffffffu || gy > 65535 || gz > 65535)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: launch grid (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ") of %s exceeds "
                                              "CUDA's limits (2^31-1, 65535, 65535): too many batch items or heads",
                    op_, gx, gy, gz, v.grid);
    const Device* dev;
    DFK_TRY(device(&dev));
    if (v.shared + v.static_shared > dev->smem_optin)
        return fail(DFK_ERR_NO_VARIANT, "%s: kernel %s needs %d bytes of shared memory, the device allows %d", op_,
                    v.name, v.shared + v.static_shared, dev->smem_optin);
    dfk_launch_record rec{index, {static_cast<uint32_t>(gx), static_cast<uint32_t>(gy), static_cast<uint32_t>(gz)},
                          static_cast<uint32_t>(32 * v.num_warps), static_cast<uint32_t>(v.shared), params.count()};
    t_records.push_back(rec);
    if (dry_)
        t_record_params.push_back(params.describe());
    if (gx == 0 || gy == 0 || gz == 0 || dry_)
        return DFK_OK;

    dfk_status st;
    const Driver* d = driver(&st);
    if (d == nullptr)
        return st;
    CUfunction fn = nullptr;
    {
        ModuleCache& c = cache();
        std::lock_guard<std::mutex> lock(c.mu);
        auto k = std::make_tuple(dev->ctx, dev->ctx_id, index);
        auto it = c.fns.find(k);
        if (it != c.fns.end()) {
            fn = it->second;
        } else {
            CUmodule mod = nullptr;
            CUresult r = d->ModuleLoadData(&mod, v.cubin);
            if (r != CUDA_SUCCESS)
                return cuda_fail(*d, r, "cuModuleLoadData");
            if ((r = d->ModuleGetFunction(&fn, mod, v.entry)) != CUDA_SUCCESS)
                return cuda_fail(*d, r, "cuModuleGetFunction");
            // Triton kernels use dynamic shared memory only; above 48 KiB a kernel must opt in.
            if (v.shared > 49152 &&
                (r = d->FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v.shared)) != CUDA_SUCCESS)
                return cuda_fail(*d, r, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
            c.fns.emplace(k, fn);  // modules stay loaded for the life of the context
        }
    }
    CUresult r = d->LaunchKernel(fn, static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz),
                                 static_cast<unsigned>(32 * v.num_warps), 1, 1, static_cast<unsigned>(v.shared),
                                 reinterpret_cast<CUstream>(stream), params.values(), nullptr);
    if (r != CUDA_SUCCESS)
        return cuda_fail(*d, r, "cuLaunchKernel");
    return DFK_OK;
}

// ----------------------------------------------------------------------------------------------- tensors
const char* dtype_name(dfk_dtype t) {
    switch (t) {
        case DFK_FLOAT16: return "fp16";
        case DFK_BFLOAT16: return "bf16";
        case DFK_FLOAT32: return "fp32";
        case DFK_INT32: return "i32";
        case DFK_INT64: return "i64";
    }
    return "?";
}

size_t dtype_size(dfk_dtype t) {
    switch (t) {
        case DFK_FLOAT16: case DFK_BFLOAT16: return 2;
        case DFK_FLOAT32: case DFK_INT32: return 4;
        case DFK_INT64: return 8;
    }
    return 0;
}

int64_t numel(const dfk_tensor& t) {
    int64_t n = 1;
    for (int i = 0; i < t.ndim; ++i)
        n *= t.shape[i];
    return n;
}

bool is_contiguous(const dfk_tensor& t) {
    if (numel(t) == 0)
        return true;  // nothing is read or written
    int64_t expect = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
        if (t.shape[i] != 1 && t.strides[i] != expect)
            return false;
        expect *= t.shape[i];
    }
    return true;
}

std::string shape_str(const dfk_tensor& t) {
    std::string s = "(";
    for (int i = 0; i < t.ndim; ++i)
        s += (i ? ", " : "") + std::to_string(t.shape[i]);
    return s + (t.ndim == 1 ? ",)" : ")");
}

dfk_status check_tensor(const char* op, const char* name, const dfk_tensor* t, int ndim) {
    if (t == nullptr)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s is NULL", op, name);
    if (t->dtype < DFK_FLOAT16 || t->dtype > DFK_INT64)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s has an unknown dtype %d", op, name, static_cast<int>(t->dtype));
    if (t->ndim != ndim)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be rank %d, got rank %d", op, name, ndim, t->ndim);
    for (int i = 0; i < ndim; ++i)
        if (t->shape[i] < 0)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s has a negative size %" PRId64 " in dim %d", op, name,
                        t->shape[i], i);
    if (numel(*t) > 0) {
        if (t->data == nullptr)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s data pointer is NULL", op, name);
        if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s data pointer %p is not 16-byte aligned (the kernels are "
                                                  "compiled for aligned rows)", op, name, t->data);
    }
    return DFK_OK;
}

}  // namespace dfk

// ----------------------------------------------------------------------------------------------- C API
extern "C" {

const char* dfk_last_error(void) { return dfk::t_error.c_str(); }

const char* dfk_status_name(dfk_status status) {
    switch (status) {
        case DFK_OK: return "DFK_OK";
        case DFK_ERR_INVALID_ARGUMENT: return "DFK_ERR_INVALID_ARGUMENT";
        case DFK_ERR_NO_VARIANT: return "DFK_ERR_NO_VARIANT";
        case DFK_ERR_NO_DRIVER: return "DFK_ERR_NO_DRIVER";
        case DFK_ERR_CUDA: return "DFK_ERR_CUDA";
        case DFK_ERR_INTERNAL: return "DFK_ERR_INTERNAL";
    }
    return "DFK_ERR_UNKNOWN";
}

dfk_tensor dfk_tensor_contiguous(void* data, dfk_dtype dtype, int32_t ndim, const int64_t* shape) {
    dfk_tensor t{};
    t.data = data;
    t.dtype = dtype;
    t.ndim = ndim < 0 ? 0 : (ndim > DFK_MAX_DIMS ? DFK_MAX_DIMS : ndim);
    int64_t stride = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i] > 0 ? shape[i] : 1;
    }
    return t;
}

dfk_status dfk_driver_check(void) {
    dfk::clear_error();
    dfk_status st;
    dfk::driver(&st);
    return st;
}

void dfk_set_dry_run(int32_t sm, int32_t num_sms) {
    dfk::t_dry_sm = sm > 0 ? sm : 0;
    dfk::t_dry_num_sms = num_sms;
}

int32_t dfk_last_launches(dfk_launch_record* records, int32_t capacity) {
    int32_t n = static_cast<int32_t>(dfk::t_records.size());
    for (int32_t i = 0; i < n && i < capacity && records != nullptr; ++i)
        records[i] = dfk::t_records[i];
    return n;
}

int32_t dfk_last_launch_params(int32_t index, char* buf, size_t size) {
    if (index < 0 || index >= static_cast<int32_t>(dfk::t_record_params.size()))
        return -1;
    const std::string& s = dfk::t_record_params[index];
    if (buf != nullptr && size > 0) {
        size_t n = s.size() < size - 1 ? s.size() : size - 1;
        std::memcpy(buf, s.data(), n);
        buf[n] = '\0';
    }
    return static_cast<int32_t>(s.size());
}

}  // extern "C"
