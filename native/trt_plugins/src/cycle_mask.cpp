// dreamfuse::CycleMask: t2r, r2t (int32), fg on a (B, Hg, Wg) grid -> mask; field lambda_c. dfk_cycle_mask.
#include <cmath>

#include "plugins.h"

namespace dreamfuse_trt {

const std::vector<std::string> CycleMask::kFields = {"lambda_c"};

bool CycleMask::valid(const std::vector<float>& values) {
    if (values[0] > 0)
        return true;
    log_error("dreamfuse::CycleMask: field 'lambda_c' must be > 0, got " + std::to_string(values[0]));
    return false;
}

int32_t CycleMask::getNbOutputs() const noexcept { return 1; }

int32_t CycleMask::getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs, const nv::DataType* inputTypes,
                                      int32_t nbInputs) const noexcept {
    if (!expect_io(nbInputs, 3, nbOutputs, 1))
        return -1;
    outputTypes[0] = inputTypes[2];  // fg's T
    return 0;
}

int32_t CycleMask::getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs*, int32_t,
                                   nv::DimsExprs* outputs, int32_t nbOutputs, nv::IExprBuilder&) noexcept {
    if (!expect_io(nbInputs, 3, nbOutputs, 1))
        return -1;
    const char* names[] = {"t2r", "r2t", "fg"};
    for (int i = 0; i < 3; ++i)
        if (inputs[i].nbDims != 3) {
            log_error(std::string("dreamfuse::CycleMask: ") + names[i] + " must be rank 3 (B, Hg, Wg), got rank " +
                      std::to_string(inputs[i].nbDims));
            return -1;
        }
    outputs[0] = inputs[2];
    return 0;
}

bool CycleMask::supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                          int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1 || !format_ok(inOut, pos))
        return false;
    if (pos < 2)
        return inOut[pos].desc.type == nv::DataType::kINT32;
    return pos == 2 ? is_float_type(inOut[2].desc.type) : same_float_type(inOut, pos, 2);
}

size_t CycleMask::getWorkspaceSize(const nv::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                   const nv::DynamicPluginTensorDesc*, int32_t) const noexcept {
    return nbInputs == 3 ? dfk_cycle_mask_workspace_size(dim(inputs[2].max, 0)) : 0;
}

int32_t CycleMask::enqueue(const nv::PluginTensorDesc* in, const nv::PluginTensorDesc* out,
                           const void* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
    // the grid is the inputs' (Hg, Wg); the launcher takes the flattened (B, Hg * Wg) tensors of the same memory
    const int64_t B = dim(in[2].dims, 0), Hg = dim(in[2].dims, 1), Wg = dim(in[2].dims, 2);
    const std::vector<int64_t> flat = {B, Hg * Wg};
    dfk_tensor t2r = tensor(in[0], inputs[0], {dim(in[0].dims, 0), dim(in[0].dims, 1) * dim(in[0].dims, 2)});
    dfk_tensor r2t = tensor(in[1], inputs[1], {dim(in[1].dims, 0), dim(in[1].dims, 1) * dim(in[1].dims, 2)});
    dfk_tensor fg = tensor(in[2], inputs[2], flat), mask = tensor(out[0], outputs[0], flat);
    return report(dfk_cycle_mask(&t2r, &r2t, &fg, Hg, Wg, field(0), &mask, workspace,
                                 dfk_cycle_mask_workspace_size(B), stream));
}

}  // namespace dreamfuse_trt
