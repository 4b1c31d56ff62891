// libdreamfuse_trt_plugins_autoreg.so: registers the dreamfuse plugins with the process's TensorRT plugin registry
// when it is loaded, for hosts that only dlopen a library (trtexec --staticPlugins). It links no TensorRT library:
// getPluginRegistry is looked up in the process (libnvinfer is already loaded by then). Where none is loaded it
// prints one line and registers nothing. Build against the TensorRT major version you run (the registry's vtable
// differs between TensorRT 10 and 11).
#include <dlfcn.h>

#include <cstdio>

#include "common.h"

// from libdreamfuse_trt_plugins.so (this library's one dependency)
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace {

using GetRegistry = nvinfer1::IPluginRegistry* (*)();

GetRegistry find_registry() {
    if (void* f = dlsym(RTLD_DEFAULT, "getPluginRegistry"))
        return reinterpret_cast<GetRegistry>(f);
    // a TensorRT loaded RTLD_LOCAL (e.g. by Python) is not in the default scope: ask its library by name
    for (const char* lib : {"libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so", "libtensorrt_rtx.so.1"}) {
        if (void* h = dlopen(lib, RTLD_NOW | RTLD_NOLOAD))
            if (void* f = dlsym(h, "getPluginRegistry"))
                return reinterpret_cast<GetRegistry>(f);
    }
    return nullptr;
}

__attribute__((constructor)) void register_dreamfuse_plugins() {
    GetRegistry get = find_registry();
    nvinfer1::IPluginRegistry* registry = get ? get() : nullptr;
    if (registry == nullptr) {
        std::fprintf(stderr, "dreamfuse_trt_plugins_autoreg: no TensorRT in this process, nothing registered\n");
        return;
    }
    int32_t n = 0;
    nvinfer1::IPluginCreatorInterface* const* list = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
        if (!registry->registerCreator(*list[i], dreamfuse_trt::kNamespace))
            std::fprintf(stderr, "dreamfuse_trt_plugins_autoreg: could not register dreamfuse::%s (already "
                                 "registered?)\n", static_cast<nvinfer1::IPluginCreatorV3One*>(list[i])->getPluginName());
}

}  // namespace
