// dreamfuse_trt_plugins: TensorRT IPluginV3 plugins on the dreamfuse_kernels launchers.
//
// The plugin node contract is export/plugins.py's module docstring (the ONNX exporter writes these nodes; the
// onnxruntime custom ops implement the same spec). Every plugin: namespace "dreamfuse", version "1", dense
// row-major ("linear") tensors, every dimension dynamic, fp32 accumulation. T is float32 or float16 (bfloat16 is
// accepted too); within one node every T tensor has the same type. Plugin fields (from the node's attributes other
// than plugin_namespace / plugin_version, which TensorRT's ONNX parser reads itself):
//
//   AmaAttention    inputs  q (B,H,Lq,D) T, k (B,H,Lk,D) T, v_tgt (B,H,Lk,D) T, v_ref (B,H,Lk,D) T,
//                           flow (B,Lk) int32, mask (B,Lk) T
//                   outputs out (B,H,Lq,D) T
//                   fields  scale: kFLOAT32 (1 value)           D in {40, 64, 80, 160} (the embedded kernels)
//   MatchArgmax     inputs  f_tgt (B,N,D) T, f_ref (B,M,D) T
//                   outputs t2r (B,N) int32, r2t (B,M) int32, t2r_sim (B,N) float32, r2t_sim (B,M) float32
//                   fields  none
//   CycleMask       inputs  t2r (B,Hg,Wg) int32, r2t (B,Hg,Wg) int32, fg (B,Hg,Wg) T
//                   outputs mask (B,Hg,Wg) T
//                   fields  lambda_c: kFLOAT32 (1 value, > 0)
//   CompositeBlend  inputs  eps_uncond (B,S,C,h,w) T, eps_cond (B,S,C,h,w) T, masks (B,S,h,w) T, guidance (B,S) T
//                   outputs eps (B,C,h,w) T
//                   fields  none
//
// Fields also accept kFLOAT64 (what a Python builder passing numpy float64 arrays gives); every listed field is
// required. Workspace: AmaAttention keeps the kernel's lse there (B*H*Lq fp32), MatchArgmax its partial buffers,
// CycleMask the per-item thresholds.
#pragma once

#include <NvInferRuntime.h>

#include <new>
#include <string>
#include <vector>

#include "dreamfuse_kernels.h"

#if defined(__GNUC__)
#define DFT_EXPORT __attribute__((visibility("default")))
#else
#define DFT_EXPORT
#endif

namespace dreamfuse_trt {

namespace nv = nvinfer1;

constexpr const char* kNamespace = "dreamfuse";
constexpr const char* kVersion = "1";

// Logs through the logger TensorRT hands to setLoggerFinder (else stderr) and keeps the message as the library's
// last error (dreamfuse_trt_plugins_last_error, for tests).
void log_error(const std::string& msg);
void set_logger_finder(nv::ILoggerFinder* finder);
const char* last_error();

bool to_dfk(nv::DataType t, dfk_dtype* out);
bool is_float_type(nv::DataType t);  // T: kFLOAT, kHALF, kBF16
// A contiguous dfk_tensor over a plugin tensor; `dims` overrides desc.dims (a reshape of the same memory).
dfk_tensor tensor(const nv::PluginTensorDesc& desc, const void* data);
dfk_tensor tensor(const nv::PluginTensorDesc& desc, const void* data, std::vector<int64_t> dims);
int64_t dim(const nv::Dims& d, int i);  // -1 when unknown or out of range

// The plugin fields of a node: a float (kFLOAT32 / kFLOAT64) per name. `required` names must all be present;
// other names except plugin_namespace / plugin_version are errors.
bool parse_fields(const char* plugin, const nv::PluginFieldCollection* fc, const std::vector<std::string>& required,
                  std::vector<float>* values);

// Everything the four plugins share: the capability plumbing, naming, fields and their serialization, and the
// runtime side's context attach. A plugin implements its shapes, types, formats, workspace and enqueue.
class PluginBase : public nv::IPluginV3,
                   public nv::IPluginV3OneCore,
                   public nv::IPluginV3OneBuild,
                   public nv::IPluginV3OneRuntime {
  public:
    PluginBase(const char* name, std::vector<std::string> field_names, std::vector<float> field_values);
    ~PluginBase() override = default;

    // IPluginV3
    nv::IPluginCapability* getCapabilityInterface(nv::PluginCapabilityType type) noexcept override;
    // IPluginV3OneCore
    const char* getPluginName() const noexcept override { return name_; }
    const char* getPluginVersion() const noexcept override { return kVersion; }
    const char* getPluginNamespace() const noexcept override { return kNamespace; }
    // IPluginV3OneBuild
    int32_t configurePlugin(const nv::DynamicPluginTensorDesc* in, int32_t nbInputs,
                            const nv::DynamicPluginTensorDesc* out, int32_t nbOutputs) noexcept override;
    // IPluginV3OneRuntime
    int32_t onShapeChange(const nv::PluginTensorDesc* in, int32_t nbInputs, const nv::PluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override;
    nv::IPluginV3* attachToContext(nv::IPluginResourceContext* context) noexcept override;
    const nv::PluginFieldCollection* getFieldsToSerialize() noexcept override;
    const char* getMetadataString() noexcept override;

  protected:
    float field(size_t i) const { return values_[i]; }
    const std::vector<float>& fields() const { return values_; }
    // Checks of the shapes known at build time (dims of -1 are dynamic): an unsupported head dim, say.
    virtual bool check_static(const nv::DynamicPluginTensorDesc* in, int32_t nbInputs) const { return true; }
    bool expect_io(int32_t nbInputs, int32_t want_in, int32_t nbOutputs, int32_t want_out) const;
    // A launcher's status as enqueue's return value (logged with the launcher's message when not DFK_OK).
    int32_t report(dfk_status st) const;

  private:
    const char* name_;
    std::vector<std::string> names_;
    std::vector<float> values_;
    std::vector<nv::PluginField> serialized_;
    nv::PluginFieldCollection fc_{};
    std::string metadata_;
};

// The creator of plugin P: its name and field names; createPlugin parses the fields into P(values).
template <class P>
class Creator : public nv::IPluginCreatorV3One {
  public:
    Creator() {
        for (const std::string& n : P::kFields)
            fields_.emplace_back(n.c_str(), nullptr, nv::PluginFieldType::kFLOAT32, 1);
        fc_.nbFields = static_cast<int32_t>(fields_.size());
        fc_.fields = fields_.data();
    }
    nv::IPluginV3* createPlugin(const char* /*name*/, const nv::PluginFieldCollection* fc,
                                nv::TensorRTPhase /*phase*/) noexcept override {
        try {
            std::vector<float> values;
            if (!parse_fields(P::kName, fc, P::kFields, &values) || !P::valid(values))
                return nullptr;
            return new P(values);
        } catch (const std::exception& e) {
            log_error(std::string("dreamfuse::") + P::kName + ": " + e.what());
            return nullptr;
        }
    }
    const nv::PluginFieldCollection* getFieldNames() noexcept override { return &fc_; }
    const char* getPluginName() const noexcept override { return P::kName; }
    const char* getPluginVersion() const noexcept override { return kVersion; }
    const char* getPluginNamespace() const noexcept override { return kNamespace; }

  private:
    std::vector<nv::PluginField> fields_;
    nv::PluginFieldCollection fc_{};
};

// The four creators, in a fixed order (AmaAttention, MatchArgmax, CycleMask, CompositeBlend).
nv::IPluginCreatorInterface* const* creators(int32_t* count);

}  // namespace dreamfuse_trt
