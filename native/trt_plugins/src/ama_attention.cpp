// dreamfuse::AmaAttention: q, k, v_tgt, v_ref, flow (int32), mask -> out; field scale. dfk_ama_attention.
#include <cmath>

#include "plugins.h"

namespace dreamfuse_trt {

const std::vector<std::string> AmaAttention::kFields = {"scale"};

bool AmaAttention::valid(const std::vector<float>&) { return true; }  // any finite scale (parse_fields)

int32_t AmaAttention::getNbOutputs() const noexcept { return 1; }

int32_t AmaAttention::getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs, const nv::DataType* inputTypes,
                                         int32_t nbInputs) const noexcept {
    if (!expect_io(nbInputs, 6, nbOutputs, 1))
        return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t AmaAttention::getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs*, int32_t,
                                      nv::DimsExprs* outputs, int32_t nbOutputs, nv::IExprBuilder&) noexcept {
    if (!expect_io(nbInputs, 6, nbOutputs, 1))
        return -1;
    const char* names[] = {"q", "k", "v_tgt", "v_ref", "flow", "mask"};
    const int ranks[] = {4, 4, 4, 4, 2, 2};
    for (int i = 0; i < 6; ++i)
        if (inputs[i].nbDims != ranks[i]) {
            log_error(std::string("dreamfuse::AmaAttention: ") + names[i] + " must be rank " +
                      std::to_string(ranks[i]) + ", got rank " + std::to_string(inputs[i].nbDims));
            return -1;
        }
    outputs[0] = inputs[0];  // out: q's (B, H, Lq, D)
    return 0;
}

bool AmaAttention::supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                             int32_t nbOutputs) noexcept {
    if (nbInputs != 6 || nbOutputs != 1 || !format_ok(inOut, pos))
        return false;
    if (pos == 4)
        return inOut[pos].desc.type == nv::DataType::kINT32;  // flow
    return pos == 0 ? is_float_type(inOut[0].desc.type) : same_float_type(inOut, pos, 0);
}

bool AmaAttention::check_static(const nv::DynamicPluginTensorDesc* in, int32_t nbInputs) const {
    if (nbInputs != 6)
        return false;
    const int64_t D = dim(in[0].desc.dims, 3);
    if (D != -1 && D != 40 && D != 64 && D != 80 && D != 160) {
        log_error("dreamfuse::AmaAttention: head dim " + std::to_string(D) +
                  " has no embedded kernel (40, 64, 80, 160; rebuild kernels/aot.py with --head-dims)");
        return false;
    }
    for (int i = 1; i < 4; ++i) {
        const int64_t d = dim(in[i].desc.dims, 3);
        if (D != -1 && d != -1 && d != D) {
            log_error("dreamfuse::AmaAttention: input " + std::to_string(i) + " has head dim " + std::to_string(d) +
                      ", q has " + std::to_string(D));
            return false;
        }
    }
    return true;
}

size_t AmaAttention::getWorkspaceSize(const nv::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                      const nv::DynamicPluginTensorDesc*, int32_t) const noexcept {
    if (nbInputs != 6)
        return 0;
    // the kernel's lse output, (B, H, Lq) fp32, which the node does not expose
    const nv::Dims& q = inputs[0].max;
    size_t n = 4;
    for (int i = 0; i < 3 && i < q.nbDims; ++i) n *= static_cast<size_t>(q.d[i] > 0 ? q.d[i] : 0);
    return (n + 255) / 256 * 256;
}

int32_t AmaAttention::enqueue(const nv::PluginTensorDesc* in, const nv::PluginTensorDesc* out,
                              const void* const* inputs, void* const* outputs, void* workspace,
                              cudaStream_t stream) noexcept {
    dfk_tensor q = tensor(in[0], inputs[0]), k = tensor(in[1], inputs[1]), vt = tensor(in[2], inputs[2]);
    dfk_tensor vr = tensor(in[3], inputs[3]), flow = tensor(in[4], inputs[4]), mask = tensor(in[5], inputs[5]);
    dfk_tensor o = tensor(out[0], outputs[0]);
    const int64_t shape[3] = {q.shape[0], q.shape[1], q.shape[2]};
    dfk_tensor lse = dfk_tensor_contiguous(workspace, DFK_FLOAT32, 3, shape);
    return report(dfk_ama_attention(&q, &k, &vt, &vr, &flow, &mask, field(0), &o, &lse, stream));
}

// ----------------------------------------------------------------------------------------------- shared helpers
bool format_ok(const nv::DynamicPluginTensorDesc* inOut, int32_t pos) {
    return inOut[pos].desc.format == nv::TensorFormat::kLINEAR;
}

bool same_float_type(const nv::DynamicPluginTensorDesc* inOut, int32_t pos, int32_t ref) {
    return is_float_type(inOut[pos].desc.type) && inOut[pos].desc.type == inOut[ref].desc.type;
}

}  // namespace dreamfuse_trt
