// The plumbing the four plugins share (see common.h for the node contract).
#include "common.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace dreamfuse_trt {

namespace {
std::mutex g_mu;
nv::ILoggerFinder* g_finder = nullptr;
thread_local std::string t_last_error;
}  // namespace

void set_logger_finder(nv::ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_finder = finder;
}

void log_error(const std::string& msg) {
    t_last_error = msg;
    nv::ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(g_mu);
        if (g_finder != nullptr)
            logger = g_finder->findLogger();
    }
    if (logger != nullptr)
        logger->log(nv::ILogger::Severity::kERROR, msg.c_str());
    else
        std::fprintf(stderr, "%s\n", msg.c_str());
}

const char* last_error() { return t_last_error.c_str(); }

bool to_dfk(nv::DataType t, dfk_dtype* out) {
    switch (t) {
        case nv::DataType::kHALF: *out = DFK_FLOAT16; return true;
        case nv::DataType::kBF16: *out = DFK_BFLOAT16; return true;
        case nv::DataType::kFLOAT: *out = DFK_FLOAT32; return true;
        case nv::DataType::kINT32: *out = DFK_INT32; return true;
        case nv::DataType::kINT64: *out = DFK_INT64; return true;
        default: return false;
    }
}

bool is_float_type(nv::DataType t) {
    return t == nv::DataType::kFLOAT || t == nv::DataType::kHALF || t == nv::DataType::kBF16;
}

dfk_tensor tensor(const nv::PluginTensorDesc& desc, const void* data, std::vector<int64_t> dims) {
    dfk_dtype dt = DFK_FLOAT32;
    to_dfk(desc.type, &dt);  // types were fixed by supportsFormatCombination
    return dfk_tensor_contiguous(const_cast<void*>(data), dt, static_cast<int32_t>(dims.size()), dims.data());
}

dfk_tensor tensor(const nv::PluginTensorDesc& desc, const void* data) {
    std::vector<int64_t> dims(desc.dims.d, desc.dims.d + (desc.dims.nbDims > 0 ? desc.dims.nbDims : 0));
    return tensor(desc, data, dims);
}

int64_t dim(const nv::Dims& d, int i) { return i >= 0 && i < d.nbDims ? d.d[i] : -1; }

bool parse_fields(const char* plugin, const nv::PluginFieldCollection* fc, const std::vector<std::string>& required,
                  std::vector<float>* values) {
    const std::string who = std::string("dreamfuse::") + plugin;
    values->assign(required.size(), NAN);
    std::vector<bool> seen(required.size(), false);
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        const nv::PluginField& f = fc->fields[i];
        if (f.name == nullptr)
            continue;
        const std::string name = f.name;
        if (name == "plugin_namespace" || name == "plugin_version")
            continue;  // the ONNX node's creator lookup attributes, not plugin fields
        size_t k = 0;
        while (k < required.size() && required[k] != name) ++k;
        if (k == required.size()) {
            std::string known;
            for (const std::string& r : required) known += (known.empty() ? "" : ", ") + r;
            log_error(who + ": unknown field '" + name + "' (its fields: " + (known.empty() ? "none" : known) + ")");
            return false;
        }
        if (f.data == nullptr || f.length < 1) {
            log_error(who + ": field '" + name + "' has no value");
            return false;
        }
        if (f.type == nv::PluginFieldType::kFLOAT32) {
            (*values)[k] = *static_cast<const float*>(f.data);
        } else if (f.type == nv::PluginFieldType::kFLOAT64) {
            (*values)[k] = static_cast<float>(*static_cast<const double*>(f.data));
        } else {
            log_error(who + ": field '" + name + "' must be a float (kFLOAT32), got PluginFieldType " +
                      std::to_string(static_cast<int>(f.type)));
            return false;
        }
        seen[k] = true;
    }
    for (size_t k = 0; k < required.size(); ++k) {
        if (!seen[k]) {
            log_error(who + ": missing field '" + required[k] + "' (a float)");
            return false;
        }
        if (!std::isfinite((*values)[k])) {
            log_error(who + ": field '" + required[k] + "' must be finite");
            return false;
        }
    }
    return true;
}

PluginBase::PluginBase(const char* name, std::vector<std::string> field_names, std::vector<float> field_values)
    : name_(name), names_(std::move(field_names)), values_(std::move(field_values)) {
    for (size_t i = 0; i < names_.size(); ++i)
        serialized_.emplace_back(names_[i].c_str(), &values_[i], nv::PluginFieldType::kFLOAT32, 1);
    fc_.nbFields = static_cast<int32_t>(serialized_.size());
    fc_.fields = serialized_.data();
    metadata_ = std::string("dreamfuse::") + name_;
    for (size_t i = 0; i < names_.size(); ++i)
        metadata_ += " " + names_[i] + "=" + std::to_string(values_[i]);
}

nv::IPluginCapability* PluginBase::getCapabilityInterface(nv::PluginCapabilityType type) noexcept {
    switch (type) {
        case nv::PluginCapabilityType::kCORE: return static_cast<nv::IPluginV3OneCore*>(this);
        case nv::PluginCapabilityType::kBUILD: return static_cast<nv::IPluginV3OneBuild*>(this);
        case nv::PluginCapabilityType::kRUNTIME: return static_cast<nv::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

int32_t PluginBase::configurePlugin(const nv::DynamicPluginTensorDesc* in, int32_t nbInputs,
                                    const nv::DynamicPluginTensorDesc* /*out*/, int32_t /*nbOutputs*/) noexcept {
    return check_static(in, nbInputs) ? 0 : -1;
}

int32_t PluginBase::onShapeChange(const nv::PluginTensorDesc*, int32_t, const nv::PluginTensorDesc*,
                                  int32_t) noexcept {
    return 0;  // shapes are checked by the launchers at enqueue (on the host, before any launch)
}

nv::IPluginV3* PluginBase::attachToContext(nv::IPluginResourceContext*) noexcept { return clone(); }

const nv::PluginFieldCollection* PluginBase::getFieldsToSerialize() noexcept { return &fc_; }

const char* PluginBase::getMetadataString() noexcept { return metadata_.c_str(); }

bool PluginBase::expect_io(int32_t nbInputs, int32_t want_in, int32_t nbOutputs, int32_t want_out) const {
    if (nbInputs == want_in && nbOutputs == want_out)
        return true;
    log_error(std::string("dreamfuse::") + name_ + ": expected " + std::to_string(want_in) + " inputs and " +
              std::to_string(want_out) + " outputs, got " + std::to_string(nbInputs) + " and " +
              std::to_string(nbOutputs));
    return false;
}

int32_t PluginBase::report(dfk_status st) const {
    if (st != DFK_OK)
        log_error(std::string("dreamfuse::") + name_ + ": " + dfk_status_name(st) + ": " + dfk_last_error());
    return static_cast<int32_t>(st);
}

}  // namespace dreamfuse_trt
