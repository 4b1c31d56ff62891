// dfk_attention and dfk_ama_attention: kernels/attention.py's _attention_fwd_kernel, launched as
// attention._attention_fwd does (its argument checks are _check_qkv / _check_ama).
#include <cinttypes>
#include <cmath>

#include "internal.h"

namespace {

using dfk::fail;

// q, k, v (B, H, L, D): _check_qkv, plus what the embedded variants assume (unit stride along D, the other strides
// multiples of 8 -- the SA=8 specialization that gives 16-byte row loads).
dfk_status check_qkv(const char* op, const dfk_tensor* q, const dfk_tensor* k, const dfk_tensor* v,
                     const char* v_name) {
    DFK_TRY(dfk::check_tensor(op, "q", q, 4));
    DFK_TRY(dfk::check_tensor(op, "k", k, 4));
    DFK_TRY(dfk::check_tensor(op, v_name, v, 4));
    if (q->dtype != DFK_FLOAT16 && q->dtype != DFK_BFLOAT16 && q->dtype != DFK_FLOAT32)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: dtype %s unsupported (use fp16, bf16 or fp32)", op,
                    dfk::dtype_name(q->dtype));
    if (k->dtype != q->dtype || v->dtype != q->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: q, k, %s must share a dtype, got %s, %s, %s", op, v_name,
                    dfk::dtype_name(q->dtype), dfk::dtype_name(k->dtype), dfk::dtype_name(v->dtype));
    const int64_t B = q->shape[0], H = q->shape[1], D = q->shape[3];
    for (const auto& [name, t] : {std::pair<const char*, const dfk_tensor*>{"k", k}, {v_name, v}})
        if (t->shape[0] != B || t->shape[1] != H || t->shape[3] != D)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s shape %s does not match q's batch, heads, head dim (%" PRId64
                                                  ", %" PRId64 ", %" PRId64 ")", op, name,
                        dfk::shape_str(*t).c_str(), B, H, D);
    if (k->shape[2] != v->shape[2])
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: k and %s key lengths differ: %" PRId64 " vs %" PRId64, op, v_name,
                    k->shape[2], v->shape[2]);
    if (k->shape[2] <= 0)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: no keys (Lk = 0), softmax is undefined", op);
    if (D <= 0 || D > 256)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: head dim %" PRId64 " unsupported (1..256)", op, D);
    return DFK_OK;
}

dfk_status check_layout(const char* op, const char* name, const dfk_tensor* t) {
    if (t->strides[3] != 1 && t->shape[3] != 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must have unit stride along D, got strides (%" PRId64 ", %" PRId64
                                              ", %" PRId64 ", %" PRId64 ")", op, name, t->strides[0], t->strides[1],
                    t->strides[2], t->strides[3]);
    for (int i = 0; i < 3; ++i)
        if (t->strides[i] % 8 != 0)
            return fail(DFK_ERR_NO_VARIANT, "%s: %s stride %" PRId64 " along dim %d is not a multiple of 8 elements "
                                            "(the embedded kernels assume 16-byte aligned rows)", op, name,
                        t->strides[i], i);
    return DFK_OK;
}

dfk_status check_outputs(const char* op, const dfk_tensor* q, const dfk_tensor* out, const dfk_tensor* lse) {
    DFK_TRY(dfk::check_tensor(op, "out", out, 4));
    DFK_TRY(dfk::check_tensor(op, "lse", lse, 3));
    for (int i = 0; i < 4; ++i)
        if (out->shape[i] != q->shape[i])
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: out shape %s must equal q's %s", op,
                        dfk::shape_str(*out).c_str(), dfk::shape_str(*q).c_str());
    if (out->dtype != q->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: out dtype %s must equal q's %s", op, dfk::dtype_name(out->dtype),
                    dfk::dtype_name(q->dtype));
    if (lse->dtype != DFK_FLOAT32 || lse->shape[0] != q->shape[0] || lse->shape[1] != q->shape[1] ||
        lse->shape[2] != q->shape[2] || !dfk::is_contiguous(*lse))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: lse must be a contiguous fp32 (B, H, Lq) = (%" PRId64 ", %" PRId64
                                              ", %" PRId64 ") tensor, got %s %s", op, q->shape[0], q->shape[1],
                    q->shape[2], dfk::dtype_name(lse->dtype), dfk::shape_str(*lse).c_str());
    return DFK_OK;
}

void strides3(dfk::Params& p, const char* a, const char* b, const char* c, const dfk_tensor* t) {
    p.i32(a, t->strides[0] / 8);  // divided by SA = 8: the kernel multiplies back by the constexpr
    p.i32(b, t->strides[1] / 8);
    p.i32(c, t->strides[2] / 8);
}

dfk_status run(dfk::Call& call, const char* variant_op, const std::string& key, const dfk_tensor* q,
               const dfk_tensor* k, const dfk_tensor* v, const dfk_tensor* v_ref, const dfk_tensor* flow,
               const dfk_tensor* mask, double scale, const dfk_tensor* out, const dfk_tensor* lse, dfk_stream stream) {
    const int64_t B = q->shape[0], H = q->shape[1], Lq = q->shape[2], Lk = k->shape[2];
    int idx;
    DFK_TRY(call.select(variant_op, key, &idx));
    if (B * H * Lq == 0)
        return DFK_OK;  // nothing to compute (as the Python launcher's early return)
    const bool ama = v_ref != nullptr;
    dfk::Params p(call.op());
    p.ptr("Q", q->data);
    p.ptr("K", k->data);
    p.ptr("V", v->data);
    // the plain path compiles the AMA branch away; any aligned pointer keeps the signature (as in Python)
    p.ptr("VREF", ama ? v_ref->data : v->data);
    p.ptr("FLOW", ama ? flow->data : lse->data);
    p.ptr("MASK", ama ? mask->data : lse->data);
    p.ptr("O", out->data);
    p.ptr("LSE", lse->data);
    p.f32("qk_scale", scale * 1.4426950408889634);  // scale * log2(e): the kernel's softmax runs on exp2
    strides3(p, "stride_qb", "stride_qh", "stride_qm", q);
    strides3(p, "stride_kb", "stride_kh", "stride_kn", k);
    strides3(p, "stride_vb", "stride_vh", "stride_vn", v);
    strides3(p, "stride_rb", "stride_rh", "stride_rn", ama ? v_ref : v);
    p.i32("stride_fb", ama ? flow->strides[0] : 0);
    p.i32("stride_fn", ama ? flow->strides[1] : 0);
    p.i32("stride_wb", ama ? mask->strides[0] : 0);
    p.i32("stride_wn", ama ? mask->strides[1] : 0);
    strides3(p, "stride_ob", "stride_oh", "stride_om", out);
    p.i32("H", H);
    p.i32("Lq", Lq);
    p.i32("Lk", Lk);
    p.scratch();
    const int64_t block_m = dfk::variant_const(dfk::variant(idx), "BLOCK_M");
    if (block_m <= 0)
        return fail(DFK_ERR_INTERNAL, "%s: kernel %s has no BLOCK_M", call.op(), dfk::variant(idx).name);
    // grid: (cdiv(Lq, BLOCK_M), B * H, 1), as attention._attention_fwd
    return call.launch(idx, p, dfk::cdiv(static_cast<uint64_t>(Lq), block_m), static_cast<uint64_t>(B * H), 1,
                       stream);
}

std::string key_of(const dfk_tensor* q, const dfk_tensor* flow) {
    std::string key = std::string("dtype=") + dfk::dtype_name(q->dtype);
    if (flow != nullptr)
        key += std::string(";flow=") + dfk::dtype_name(flow->dtype);
    return key + ";head_dim=" + std::to_string(q->shape[3]);
}

}  // namespace

extern "C" {

dfk_status dfk_attention(const dfk_tensor* q, const dfk_tensor* k, const dfk_tensor* v, double scale,
                         const dfk_tensor* out, const dfk_tensor* lse, dfk_stream stream) {
    dfk::Call call("attention");
    const char* op = call.op();
    DFK_TRY(check_qkv(op, q, k, v, "v"));
    DFK_TRY(check_outputs(op, q, out, lse));
    for (const auto& [name, t] : {std::pair<const char*, const dfk_tensor*>{"q", q}, {"k", k}, {"v", v}, {"out", out}})
        DFK_TRY(check_layout(op, name, t));
    if (!std::isfinite(scale))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: scale must be finite, got %g", op, scale);
    return run(call, "attention", key_of(q, nullptr), q, k, v, nullptr, nullptr, nullptr, scale, out, lse, stream);
}

dfk_status dfk_ama_attention(const dfk_tensor* q, const dfk_tensor* k, const dfk_tensor* v_tgt,
                             const dfk_tensor* v_ref, const dfk_tensor* flow, const dfk_tensor* mask, double scale,
                             const dfk_tensor* out, const dfk_tensor* lse, dfk_stream stream) {
    dfk::Call call("ama_attention");
    const char* op = call.op();
    DFK_TRY(check_qkv(op, q, k, v_tgt, "v_tgt"));
    DFK_TRY(dfk::check_tensor(op, "v_ref", v_ref, 4));
    DFK_TRY(dfk::check_tensor(op, "flow", flow, 2));
    DFK_TRY(dfk::check_tensor(op, "mask", mask, 2));
    for (int i = 0; i < 4; ++i)
        if (v_ref->shape[i] != v_tgt->shape[i])
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: v_ref must have v_tgt's shape %s, got %s", op,
                        dfk::shape_str(*v_tgt).c_str(), dfk::shape_str(*v_ref).c_str());
    if (v_ref->dtype != v_tgt->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: v_ref dtype %s != v_tgt dtype %s", op,
                    dfk::dtype_name(v_ref->dtype), dfk::dtype_name(v_tgt->dtype));
    const int64_t B = k->shape[0], Lk = k->shape[2];
    for (const auto& [name, t] : {std::pair<const char*, const dfk_tensor*>{"flow", flow}, {"mask", mask}})
        if (t->shape[0] != B || t->shape[1] != Lk)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must have shape (B, Lk) = (%" PRId64 ", %" PRId64 "), got %s",
                        op, name, B, Lk, dfk::shape_str(*t).c_str());
    if (flow->dtype != DFK_INT32 && flow->dtype != DFK_INT64)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: flow must be int32 or int64, got %s", op,
                    dfk::dtype_name(flow->dtype));
    if (mask->dtype == DFK_INT32 || mask->dtype == DFK_INT64)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: mask must be a float tensor, got %s", op,
                    dfk::dtype_name(mask->dtype));
    if (mask->dtype != q->dtype)
        return fail(DFK_ERR_NO_VARIANT, "%s: mask dtype %s must equal q's %s in the embedded kernels", op,
                    dfk::dtype_name(mask->dtype), dfk::dtype_name(q->dtype));
    DFK_TRY(check_outputs(op, q, out, lse));
    for (const auto& [name, t] : {std::pair<const char*, const dfk_tensor*>{"q", q}, {"k", k}, {"v_tgt", v_tgt},
                                  {"v_ref", v_ref}, {"out", out}})
        DFK_TRY(check_layout(op, name, t));
    if (!std::isfinite(scale))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: scale must be finite, got %g", op, scale);
    return run(call, "ama_attention", key_of(q, flow), q, k, v_tgt, v_ref, flow, mask, scale, out, lse, stream);
}

}  // extern "C"
