// dreamfuse::CompositeBlend: eps_uncond, eps_cond, masks, guidance (B, S) -> eps. dfk_composite_blend.
#include "plugins.h"

namespace dreamfuse_trt {

const std::vector<std::string> CompositeBlend::kFields = {};

bool CompositeBlend::valid(const std::vector<float>&) { return true; }

int32_t CompositeBlend::getNbOutputs() const noexcept { return 1; }

int32_t CompositeBlend::getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs,
                                           const nv::DataType* inputTypes, int32_t nbInputs) const noexcept {
    if (!expect_io(nbInputs, 4, nbOutputs, 1))
        return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t CompositeBlend::getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs*, int32_t,
                                        nv::DimsExprs* outputs, int32_t nbOutputs, nv::IExprBuilder&) noexcept {
    if (!expect_io(nbInputs, 4, nbOutputs, 1))
        return -1;
    const char* names[] = {"eps_uncond", "eps_cond", "masks", "guidance"};
    const int ranks[] = {5, 5, 4, 2};
    for (int i = 0; i < 4; ++i)
        if (inputs[i].nbDims != ranks[i]) {
            log_error(std::string("dreamfuse::CompositeBlend: ") + names[i] + " must be rank " +
                      std::to_string(ranks[i]) + ", got rank " + std::to_string(inputs[i].nbDims));
            return -1;
        }
    const nv::DimsExprs& u = inputs[0];  // (B, S, C, h, w) -> (B, C, h, w)
    outputs[0].nbDims = 4;
    outputs[0].d[0] = u.d[0];
    outputs[0].d[1] = u.d[2];
    outputs[0].d[2] = u.d[3];
    outputs[0].d[3] = u.d[4];
    return 0;
}

bool CompositeBlend::supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut,
                                               int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != 4 || nbOutputs != 1 || !format_ok(inOut, pos))
        return false;
    return pos == 0 ? is_float_type(inOut[0].desc.type) : same_float_type(inOut, pos, 0);
}

size_t CompositeBlend::getWorkspaceSize(const nv::DynamicPluginTensorDesc*, int32_t, const nv::DynamicPluginTensorDesc*,
                                        int32_t) const noexcept {
    return 0;
}

int32_t CompositeBlend::enqueue(const nv::PluginTensorDesc* in, const nv::PluginTensorDesc* out,
                                const void* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept {
    dfk_tensor u = tensor(in[0], inputs[0]), c = tensor(in[1], inputs[1]), m = tensor(in[2], inputs[2]);
    dfk_tensor g = tensor(in[3], inputs[3]), eps = tensor(out[0], outputs[0]);
    return report(dfk_composite_blend(&u, &c, &m, &g, 0.0, &eps, stream));
}

}  // namespace dreamfuse_trt
