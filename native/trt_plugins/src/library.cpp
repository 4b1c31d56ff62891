// The library's entry points. TensorRT's IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, the Python
// `registry.load_library`, engines that serialize the library) looks up the two C functions below:
// getCreators (IPluginV3 creators) and setLoggerFinder. Nothing registers itself at load time: for
// trtexec --staticPlugins use libdreamfuse_trt_plugins_autoreg.so (autoreg.cpp).
#include "plugins.h"

namespace dreamfuse_trt {

nv::IPluginCreatorInterface* const* creators(int32_t* count) {
    static Creator<AmaAttention> ama;
    static Creator<MatchArgmax> match;
    static Creator<CycleMask> cycle;
    static Creator<CompositeBlend> blend;
    static nv::IPluginCreatorInterface* const list[] = {&ama, &match, &cycle, &blend};
    *count = static_cast<int32_t>(sizeof list / sizeof list[0]);
    return list;
}

}  // namespace dreamfuse_trt

extern "C" {

DFT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    return dreamfuse_trt::creators(&nbCreators);
}

DFT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { dreamfuse_trt::set_logger_finder(finder); }

// The last error this thread logged (a plugin or creator call that failed), for tests.
DFT_EXPORT const char* dreamfuse_trt_plugins_last_error() { return dreamfuse_trt::last_error(); }

}  // extern "C"
