// The four plugins (their node contract: common.h and export/plugins.py).
#pragma once

#include "common.h"

namespace dreamfuse_trt {

// Declares what every plugin implements on top of PluginBase.
#define DREAMFUSE_PLUGIN_METHODS(Class)                                                                             \
    explicit Class(std::vector<float> values) : PluginBase(kName, kFields, std::move(values)) {}                   \
    static bool valid(const std::vector<float>& values);                                                           \
    nv::IPluginV3* clone() noexcept override { return new (std::nothrow) Class(fields()); }                        \
    int32_t getNbOutputs() const noexcept override;                                                                \
    int32_t getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs, const nv::DataType* inputTypes,       \
                               int32_t nbInputs) const noexcept override;                                          \
    int32_t getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs* shapeInputs,       \
                            int32_t nbShapeInputs, nv::DimsExprs* outputs, int32_t nbOutputs,                      \
                            nv::IExprBuilder& exprBuilder) noexcept override;                                      \
    bool supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut, int32_t nbInputs,        \
                                   int32_t nbOutputs) noexcept override;                                           \
    size_t getWorkspaceSize(const nv::DynamicPluginTensorDesc* inputs, int32_t nbInputs,                           \
                            const nv::DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept override; \
    int32_t enqueue(const nv::PluginTensorDesc* inputDesc, const nv::PluginTensorDesc* outputDesc,                 \
                    const void* const* inputs, void* const* outputs, void* workspace,                              \
                    cudaStream_t stream) noexcept override;

class AmaAttention : public PluginBase {
  public:
    static constexpr const char* kName = "AmaAttention";
    static const std::vector<std::string> kFields;  // scale
    DREAMFUSE_PLUGIN_METHODS(AmaAttention)

  protected:
    bool check_static(const nv::DynamicPluginTensorDesc* in, int32_t nbInputs) const override;
};

class MatchArgmax : public PluginBase {
  public:
    static constexpr const char* kName = "MatchArgmax";
    static const std::vector<std::string> kFields;  // none
    DREAMFUSE_PLUGIN_METHODS(MatchArgmax)
};

class CycleMask : public PluginBase {
  public:
    static constexpr const char* kName = "CycleMask";
    static const std::vector<std::string> kFields;  // lambda_c
    DREAMFUSE_PLUGIN_METHODS(CycleMask)
};

class CompositeBlend : public PluginBase {
  public:
    static constexpr const char* kName = "CompositeBlend";
    static const std::vector<std::string> kFields;  // none
    DREAMFUSE_PLUGIN_METHODS(CompositeBlend)
};

#undef DREAMFUSE_PLUGIN_METHODS

// Linear format, and T (kFLOAT/kHALF/kBF16) at `pos` equal to the type at `ref` (ref < pos), or `fixed`.
bool format_ok(const nv::DynamicPluginTensorDesc* inOut, int32_t pos);
bool same_float_type(const nv::DynamicPluginTensorDesc* inOut, int32_t pos, int32_t ref);

}  // namespace dreamfuse_trt
