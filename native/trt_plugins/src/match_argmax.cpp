// dreamfuse::MatchArgmax: f_tgt, f_ref -> t2r (int32), r2t (int32), t2r_sim, r2t_sim (float32). dfk_match_argmax.
#include "plugins.h"

namespace dreamfuse_trt {

const std::vector<std::string> MatchArgmax::kFields = {};

bool MatchArgmax::valid(const std::vector<float>&) { return true; }

int32_t MatchArgmax::getNbOutputs() const noexcept { return 4; }

int32_t MatchArgmax::getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs, const nv::DataType*,
                                        int32_t nbInputs) const noexcept {
    if (!expect_io(nbInputs, 2, nbOutputs, 4))
        return -1;
    outputTypes[0] = outputTypes[1] = nv::DataType::kINT32;
    outputTypes[2] = outputTypes[3] = nv::DataType::kFLOAT;
    return 0;
}

int32_t MatchArgmax::getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs*, int32_t,
                                     nv::DimsExprs* outputs, int32_t nbOutputs, nv::IExprBuilder&) noexcept {
    if (!expect_io(nbInputs, 2, nbOutputs, 4))
        return -1;
    for (int i = 0; i < 2; ++i)
        if (inputs[i].nbDims != 3) {
            log_error(std::string("dreamfuse::MatchArgmax: ") + (i ? "f_ref" : "f_tgt") + " must be rank 3 (B, L, D), "
                      "got rank " + std::to_string(inputs[i].nbDims));
            return -1;
        }
    for (int o = 0; o < 4; ++o) {
        outputs[o].nbDims = 2;
        outputs[o].d[0] = inputs[0].d[0];                 // B
        outputs[o].d[1] = inputs[o % 2 == 0 ? 0 : 1].d[1];  // t2r, t2r_sim: N; r2t, r2t_sim: M
    }
    return 0;
}

bool MatchArgmax::supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                            int32_t nbOutputs) noexcept {
    if (nbInputs != 2 || nbOutputs != 4 || !format_ok(inOut, pos))
        return false;
    switch (pos) {
        case 0: return is_float_type(inOut[0].desc.type);
        case 1: return same_float_type(inOut, 1, 0);
        case 2: case 3: return inOut[pos].desc.type == nv::DataType::kINT32;
        default: return inOut[pos].desc.type == nv::DataType::kFLOAT;
    }
}

size_t MatchArgmax::getWorkspaceSize(const nv::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                     const nv::DynamicPluginTensorDesc*, int32_t) const noexcept {
    if (nbInputs != 2)
        return 0;
    return dfk_match_argmax_workspace_size(dim(inputs[0].max, 0), dim(inputs[0].max, 1), dim(inputs[1].max, 1));
}

int32_t MatchArgmax::enqueue(const nv::PluginTensorDesc* in, const nv::PluginTensorDesc* out,
                             const void* const* inputs, void* const* outputs, void* workspace,
                             cudaStream_t stream) noexcept {
    dfk_tensor ft = tensor(in[0], inputs[0]), fr = tensor(in[1], inputs[1]);
    dfk_tensor t2r = tensor(out[0], outputs[0]), r2t = tensor(out[1], outputs[1]);
    dfk_tensor ts = tensor(out[2], outputs[2]), rs = tensor(out[3], outputs[3]);
    // the bound for these shapes: at most what getWorkspaceSize gave for the profile's max shapes
    const size_t ws = dfk_match_argmax_workspace_size(ft.shape[0], ft.shape[1], fr.shape[1]);
    return report(dfk_match_argmax(&ft, &fr, &t2r, &r2t, &ts, &rs, workspace, ws, stream));
}

}  // namespace dreamfuse_trt
