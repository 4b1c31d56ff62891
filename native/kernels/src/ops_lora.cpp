// dfk_lora_delta: kernels/lora.py's _lora_shrink_kernel then _lora_expand_kernel, launched as lora._lora_delta_fwd
// (argument checks: lora._check), the shrink's (K, T, BLOCK_R) buffer in the caller's workspace.
#include <cinttypes>

#include "internal.h"

namespace {

using dfk::fail;

using Named = std::pair<const char*, const dfk_tensor*>;

// lora._block_r: r_max rounded up to a power of two, at least 16 (an MMA's smallest N)
int64_t block_r(int64_t r_max) {
    int64_t b = 16;
    while (b < r_max) b *= 2;
    return b;
}

size_t workspace_bytes(int64_t T, int64_t K, int64_t r_max, dfk_dtype dtype) {
    return static_cast<size_t>(K) * static_cast<size_t>(T) * static_cast<size_t>(block_r(r_max)) *
           dfk::dtype_size(dtype);
}

dfk_status check_index(const char* op, const char* name, const dfk_tensor* t, int ndim, dfk_dtype want) {
    DFK_TRY(dfk::check_tensor(op, name, t, ndim));
    if (t->dtype != want || !dfk::is_contiguous(*t))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be a contiguous %s tensor, got %s with shape %s", op, name,
                    dfk::dtype_name(want), dfk::dtype_name(t->dtype), dfk::shape_str(*t).c_str());
    return DFK_OK;
}

dfk_status check_rows(const char* op, const char* name, const dfk_tensor* t) {
    if (t->strides[t->ndim - 1] != 1 && t->shape[t->ndim - 1] > 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must have unit stride along its last dim, got %s strides", op,
                    name, dfk::shape_str(*t).c_str());
    return DFK_OK;
}

// The embedded variants are compiled with these values as multiples of 16 (kernels/aot.py, Variant.divisible).
dfk_status check_16(const char* op, std::initializer_list<std::pair<const char*, int64_t>> values) {
    for (const auto& [what, v] : values)
        if (v % 16 != 0)
            return fail(DFK_ERR_NO_VARIANT, "%s: %s = %" PRId64 " is not a multiple of 16 (the embedded kernels "
                                            "assume 16-element aligned rows)", op, what, v);
    return DFK_OK;
}

}  // namespace

extern "C" {

size_t dfk_lora_delta_workspace_size(int64_t T, int64_t K, int64_t r_max, dfk_dtype dtype) {
    if (T <= 0 || K <= 0 || r_max <= 0 || dtype < DFK_FLOAT16 || dtype > DFK_INT64)
        return 0;
    return workspace_bytes(T, K, r_max, dtype);
}

dfk_status dfk_lora_delta(const dfk_tensor* x, const dfk_tensor* lora_a, const dfk_tensor* lora_b,
                          const dfk_tensor* ranks, const dfk_tensor* seg_starts, const dfk_tensor* seg_adapter,
                          const dfk_tensor* seg_scale, const dfk_tensor* base, const dfk_tensor* out, void* workspace,
                          size_t workspace_size, dfk_stream stream) {
    dfk::Call call("lora_delta");
    const char* op = call.op();
    DFK_TRY(dfk::check_tensor(op, "x", x, 2));
    if (x->dtype != DFK_FLOAT16 && x->dtype != DFK_BFLOAT16)
        return fail(x->dtype == DFK_FLOAT32 ? DFK_ERR_NO_VARIANT : DFK_ERR_INVALID_ARGUMENT,
                    "%s: x dtype %s not supported (fp16, bf16)", op, dfk::dtype_name(x->dtype));
    const int64_t T = x->shape[0], d_in = x->shape[1];
    DFK_TRY(dfk::check_tensor(op, "lora_a", lora_a, 3));
    const int64_t N = lora_a->shape[0], r_max = lora_a->shape[1];
    if (lora_a->shape[2] != d_in)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: lora_a shape %s does not match x's d_in = %" PRId64, op,
                    dfk::shape_str(*lora_a).c_str(), d_in);
    if (r_max < 1 || r_max > 128)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: r_max = %" PRId64 " (lora_a.shape[1]) outside 1..128", op, r_max);
    DFK_TRY(dfk::check_tensor(op, "lora_b", lora_b, 3));
    if (lora_b->shape[0] != N || lora_b->shape[2] != r_max)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: lora_b must be (N, d_out, r_max) = (%" PRId64 ", d_out, %" PRId64
                                              "), got shape %s", op, N, r_max, dfk::shape_str(*lora_b).c_str());
    const int64_t d_out = lora_b->shape[1];
    for (const auto& [name, t] : {Named{"lora_a", lora_a}, Named{"lora_b", lora_b}})
        if (t->dtype != x->dtype)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s dtype %s must equal x's %s", op, name,
                        dfk::dtype_name(t->dtype), dfk::dtype_name(x->dtype));
    DFK_TRY(check_index(op, "ranks", ranks, 1, DFK_INT32));
    if (ranks->shape[0] != N)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: ranks must be (N,) = (%" PRId64 ",), got shape %s", op, N,
                    dfk::shape_str(*ranks).c_str());
    DFK_TRY(check_index(op, "seg_starts", seg_starts, 1, DFK_INT32));
    if (seg_starts->shape[0] < 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: seg_starts must be (S + 1,), got shape (0)", op);
    const int64_t S = seg_starts->shape[0] - 1;
    DFK_TRY(check_index(op, "seg_adapter", seg_adapter, 2, DFK_INT32));
    if (seg_adapter->shape[0] != S || seg_adapter->shape[1] < 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: seg_adapter must be (S, K) = (%" PRId64 ", K >= 1) for %" PRId64
                                              " seg_starts, got shape %s", op, S, S + 1,
                    dfk::shape_str(*seg_adapter).c_str());
    const int64_t K = seg_adapter->shape[1];
    DFK_TRY(check_index(op, "seg_scale", seg_scale, 2, DFK_FLOAT32));
    if (seg_scale->shape[0] != S || seg_scale->shape[1] != K)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: seg_scale shape %s must equal seg_adapter's %s", op,
                    dfk::shape_str(*seg_scale).c_str(), dfk::shape_str(*seg_adapter).c_str());
    if (base != nullptr) {
        DFK_TRY(dfk::check_tensor(op, "base", base, 2));
        if (base->shape[0] != T || base->shape[1] != d_out || base->dtype != x->dtype)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: base must be a %s (T, d_out) = (%" PRId64 ", %" PRId64
                                                  ") tensor, got %s %s", op, dfk::dtype_name(x->dtype), T, d_out,
                        dfk::dtype_name(base->dtype), dfk::shape_str(*base).c_str());
    }
    DFK_TRY(dfk::check_tensor(op, "out", out, 2));
    if (out->shape[0] != T || out->shape[1] != d_out || out->dtype != x->dtype || !dfk::is_contiguous(*out))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: out must be a contiguous %s (T, d_out) = (%" PRId64 ", %" PRId64
                                              ") tensor, got %s %s", op, dfk::dtype_name(x->dtype), T, d_out,
                    dfk::dtype_name(out->dtype), dfk::shape_str(*out).c_str());
    for (const auto& [name, t] : {Named{"x", x}, Named{"lora_a", lora_a}, Named{"lora_b", lora_b}, Named{"base", base}})
        if (t != nullptr)
            DFK_TRY(check_rows(op, name, t));
    DFK_TRY(check_16(op, {{"d_in", d_in}, {"d_out", d_out}, {"r_max", r_max}, {"x row stride", x->strides[0]},
                          {"lora_a stride 0", lora_a->strides[0]}, {"lora_a stride 1", lora_a->strides[1]},
                          {"lora_b stride 0", lora_b->strides[0]}, {"lora_b stride 1", lora_b->strides[1]},
                          {"base row stride", base != nullptr ? base->strides[0] : 0}}));

    const int64_t br = block_r(r_max);
    const std::string dt = dfk::dtype_name(x->dtype);
    int shrink, expand;
    DFK_TRY(call.select("lora_shrink", "block_r=" + std::to_string(br) + ";dtype=" + dt, &shrink));
    DFK_TRY(call.select("lora_expand", std::string("base=") + (base != nullptr ? "1" : "0") + ";block_r=" +
                                           std::to_string(br) + ";dtype=" + dt, &expand));
    if (T == 0 || d_out == 0)
        return DFK_OK;
    const size_t need = workspace_bytes(T, K, r_max, x->dtype);
    if (workspace_size < need || workspace == nullptr)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace of %zu bytes is too small: this call needs %zu "
                                              "(dfk_lora_delta_workspace_size)", op, workspace_size, need);
    if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace pointer %p is not 16-byte aligned", op, workspace);

    // shrink: v[k, t] = scale[s, k] * A[a] @ x[t] into the workspace, (K, T, BLOCK_R) contiguous
    dfk::Params p(op);
    p.ptr("X", x->data);
    p.ptr("A", lora_a->data);
    p.ptr("RANKS", ranks->data);
    p.ptr("SEG_STARTS", seg_starts->data);
    p.ptr("SEG_ADAPTER", seg_adapter->data);
    p.ptr("SEG_SCALE", seg_scale->data);
    p.ptr("V", workspace);
    p.i32("stride_xt", x->strides[0]);
    p.i32("stride_an", lora_a->strides[0]);
    p.i32("stride_ar", lora_a->strides[1]);
    p.i32("stride_vk", T * br);
    p.i32("T", T);
    p.i32("D_IN", d_in);
    p.i32("N", N);
    p.i32("S", S);
    p.i32("K", K);
    p.i32("R_MAX", r_max);
    p.scratch();
    const int64_t bm_s = dfk::variant_const(dfk::variant(shrink), "BLOCK_M");
    DFK_TRY(call.launch(shrink, p, dfk::cdiv(T, bm_s), K, 1, stream));

    // expand: out[t] = sum_k B[a] @ v[k, t] (+ base[t]), every element written once
    dfk::Params q(op);
    q.ptr("V", workspace);
    q.ptr("B", lora_b->data);
    q.ptr("RANKS", ranks->data);
    q.ptr("SEG_STARTS", seg_starts->data);
    q.ptr("SEG_ADAPTER", seg_adapter->data);
    q.ptr("SEG_SCALE", seg_scale->data);
    q.ptr("BASE", base != nullptr ? base->data : out->data);  // unused without HAS_BASE; any pointer will do
    q.ptr("OUT", out->data);
    q.i32("stride_vk", T * br);
    q.i32("stride_bn", lora_b->strides[0]);
    q.i32("stride_bo", lora_b->strides[1]);
    q.i32("stride_baset", base != nullptr ? base->strides[0] : out->strides[0]);
    q.i32("stride_ot", out->strides[0]);
    q.i32("T", T);
    q.i32("D_OUT", d_out);
    q.i32("N", N);
    q.i32("S", S);
    q.i32("K", K);
    q.i32("R_MAX", r_max);
    q.scratch();
    const dfk_variant& ve = dfk::variant(expand);
    const int64_t bm_e = dfk::variant_const(ve, "BLOCK_M"), bn_e = dfk::variant_const(ve, "BLOCK_N");
    // grids: (cdiv(T, BLOCK_M), K) and (cdiv(T, BLOCK_M), cdiv(d_out, BLOCK_N)), as lora._lora_delta_fwd
    return call.launch(expand, q, dfk::cdiv(T, bm_e), dfk::cdiv(d_out, bn_e), 1, stream);
}

}  // extern "C"
