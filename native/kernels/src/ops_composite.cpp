// dfk_composite_blend: kernels/composite.py's _composite_blend_fwd_kernel, launched as composite._blend_fwd
// (argument checks: composite._check_blend).
#include <cinttypes>
#include <cmath>

#include "internal.h"

namespace {

using dfk::fail;

bool is_float(dfk_dtype t) { return t == DFK_FLOAT16 || t == DFK_BFLOAT16 || t == DFK_FLOAT32; }

// composite._plane's "flat": pixel p of an (h, w) plane sits at p * stride_w.
bool flat_plane(const dfk_tensor& t) {
    const int64_t h = t.shape[t.ndim - 2], w = t.shape[t.ndim - 1];
    return h == 1 || t.strides[t.ndim - 2] == w * t.strides[t.ndim - 1];
}

}  // namespace

extern "C" {

dfk_status dfk_composite_blend(const dfk_tensor* eps_uncond, const dfk_tensor* eps_cond, const dfk_tensor* masks,
                               const dfk_tensor* guidance, double guidance_scale, const dfk_tensor* out,
                               dfk_stream stream) {
    dfk::Call call("composite_blend");
    const char* op = call.op();
    DFK_TRY(dfk::check_tensor(op, "eps_uncond", eps_uncond, 5));
    if (!is_float(eps_uncond->dtype))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: eps_uncond dtype %s not supported (float16, bfloat16, float32)", op,
                    dfk::dtype_name(eps_uncond->dtype));
    DFK_TRY(dfk::check_tensor(op, "masks", masks, 4));
    if (!is_float(masks->dtype))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: masks must be a float tensor, got %s", op,
                    dfk::dtype_name(masks->dtype));
    const int64_t B = eps_uncond->shape[0], S = eps_uncond->shape[1], C = eps_uncond->shape[2];
    const int64_t h = eps_uncond->shape[3], w = eps_uncond->shape[4];
    if (masks->shape[0] != B || masks->shape[1] != S || masks->shape[2] != h || masks->shape[3] != w)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: masks: shape %s does not match eps_uncond's (B, S, h, w) = (%" PRId64
                                              ", %" PRId64 ", %" PRId64 ", %" PRId64 ")", op,
                    dfk::shape_str(*masks).c_str(), B, S, h, w);
    if (S < 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: segments: S must be >= 1, got eps_uncond with S = %" PRId64, op, S);
    DFK_TRY(dfk::check_tensor(op, "eps_cond", eps_cond, 5));
    for (int i = 0; i < 5; ++i)
        if (eps_cond->shape[i] != eps_uncond->shape[i])
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: eps_cond: shape %s must equal eps_uncond's %s", op,
                        dfk::shape_str(*eps_cond).c_str(), dfk::shape_str(*eps_uncond).c_str());
    if (eps_cond->dtype != eps_uncond->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: dtype: eps_cond is %s, eps_uncond %s", op,
                    dfk::dtype_name(eps_cond->dtype), dfk::dtype_name(eps_uncond->dtype));
    // guidance: broadcastable to (B, S), rank <= 2 -> strides of a (B, S) view (0 along broadcast dims)
    int64_t g_sb = 0, g_ss = 0;
    if (guidance != nullptr) {
        if (guidance->ndim > 2)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: guidance: expected a float or a (B, S) = (%" PRId64 ", %" PRId64
                                                  ") tensor, got shape %s", op, B, S, dfk::shape_str(*guidance).c_str());
        DFK_TRY(dfk::check_tensor(op, "guidance", guidance, guidance->ndim));
        if (!is_float(guidance->dtype))
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: guidance: must be a float tensor, got %s", op,
                        dfk::dtype_name(guidance->dtype));
        const int64_t target[2] = {B, S};
        int64_t strides[2] = {0, 0};
        for (int i = 0; i < guidance->ndim; ++i) {
            const int d = 2 - guidance->ndim + i;  // align trailing dims, as broadcasting does
            const int64_t n = guidance->shape[i];
            if (n != target[d] && n != 1)
                return fail(DFK_ERR_INVALID_ARGUMENT, "%s: guidance: expected a float or a (B, S) = (%" PRId64
                                                      ", %" PRId64 ") tensor, got shape %s", op, B, S,
                            dfk::shape_str(*guidance).c_str());
            strides[d] = n == 1 ? 0 : guidance->strides[i];
        }
        g_sb = strides[0];
        g_ss = strides[1];
        if (guidance->dtype != eps_uncond->dtype)
            return fail(DFK_ERR_NO_VARIANT, "%s: guidance dtype %s must equal the predictions' %s in the embedded "
                                            "kernels", op, dfk::dtype_name(guidance->dtype),
                        dfk::dtype_name(eps_uncond->dtype));
    } else if (!std::isfinite(guidance_scale)) {
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: guidance_scale must be finite, got %g", op, guidance_scale);
    }
    DFK_TRY(dfk::check_tensor(op, "out", out, 4));
    if (out->shape[0] != B || out->shape[1] != C || out->shape[2] != h || out->shape[3] != w ||
        out->dtype != eps_uncond->dtype || !dfk::is_contiguous(*out))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: out must be a contiguous %s (B, C, h, w) = (%" PRId64 ", %" PRId64
                                              ", %" PRId64 ", %" PRId64 ") tensor, got %s %s", op,
                    dfk::dtype_name(eps_uncond->dtype), B, C, h, w, dfk::dtype_name(out->dtype),
                    dfk::shape_str(*out).c_str());
    if (masks->dtype != eps_uncond->dtype)
        return fail(DFK_ERR_NO_VARIANT, "%s: masks dtype %s must equal the predictions' %s in the embedded kernels", op,
                    dfk::dtype_name(masks->dtype), dfk::dtype_name(eps_uncond->dtype));
    for (const auto& [name, t] :
         {std::pair<const char*, const dfk_tensor*>{"eps_uncond", eps_uncond}, {"eps_cond", eps_cond}, {"masks", masks}})
        if (!flat_plane(*t))
            return fail(DFK_ERR_NO_VARIANT, "%s: %s: the (h, w) plane is not dense (stride_h != w * stride_w); only "
                                            "dense planes are embedded", op, name);

    const bool per_seg = guidance != nullptr;
    const int64_t block_c = C <= 4 ? 4 : 16;  // composite._block_c, rounded to the embedded 4 and 16
    const std::string key = "block_c=" + std::to_string(block_c) + ";dtype=" + dfk::dtype_name(eps_uncond->dtype) +
                            ";per_segment_guidance=" + (per_seg ? "1" : "0");
    int idx;
    DFK_TRY(call.select("composite_blend", key, &idx));
    if (B * C * h * w == 0)
        return DFK_OK;
    dfk::Params p(op);
    p.ptr("U", eps_uncond->data);
    p.ptr("CND", eps_cond->data);
    p.ptr("M", masks->data);
    p.ptr("G", per_seg ? guidance->data : masks->data);  // unused when PER_SEG_G is off; any pointer will do
    p.ptr("OUT", out->data);
    const int64_t* su = eps_uncond->strides;
    const int64_t* sc = eps_cond->strides;
    const int64_t* sm = masks->strides;
    p.i32("s_ub", su[0]); p.i32("s_us", su[1]); p.i32("s_uc", su[2]); p.i32("s_uh", su[3]); p.i32("s_uw", su[4]);
    p.i32("s_cb", sc[0]); p.i32("s_cs", sc[1]); p.i32("s_cc", sc[2]); p.i32("s_ch", sc[3]); p.i32("s_cw", sc[4]);
    p.i32("s_mb", sm[0]); p.i32("s_ms", sm[1]); p.i32("s_mh", sm[2]); p.i32("s_mw", sm[3]);
    p.i32("s_gb", g_sb);
    p.i32("s_gs", g_ss);
    p.f32("g_scale", guidance_scale);  // unused with per-segment guidance (PER_SEG_G), as in Python
    p.i32("S", S);
    p.i32("C", C);
    p.i32("HW", h * w);
    p.i32("W", w);
    p.scratch();
    const int64_t bp = dfk::variant_const(dfk::variant(idx), "BLOCK_P");
    // grid: (cdiv(h * w, BLOCK_P), cdiv(C, BLOCK_C), B), as composite._blend_fwd
    return call.launch(idx, p, dfk::cdiv(h * w, bp), dfk::cdiv(C, block_c), B, stream);
}

}  // extern "C"
