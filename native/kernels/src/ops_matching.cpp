// dfk_match_argmax and dfk_cycle_mask: kernels/matching.py's kernels, with the steps its Python launchers do in
// torch (inverse norms, the final max over the partial buffers, the threshold) done by the glue kernels of
// kernels/aot.py. Argument checks: matching._check_features and matching.cycle_mask.
#include <cinttypes>
#include <cmath>

#include "internal.h"

namespace {

using dfk::fail;

constexpr size_t kAlign = 256;

// The match kernel's tiles, from the embedded variants: a workspace bound must hold for whichever arch runs.
struct MatchTiles {
    int64_t min_block_m = 0, min_block_n = 0;
};

MatchTiles match_tiles() {
    MatchTiles t;
    for (int i = 0; i < dfk::variant_count(); ++i) {
        const dfk_variant& v = dfk::variant(i);
        if (std::string(v.op) != "match_argmax")
            continue;
        int64_t bm = dfk::variant_const(v, "BLOCK_M"), bn = dfk::variant_const(v, "BLOCK_N");
        if (t.min_block_m == 0 || bm < t.min_block_m)
            t.min_block_m = bm;
        if (t.min_block_n == 0 || bn < t.min_block_n)
            t.min_block_n = bn;
    }
    return t;
}

// Workspace of one match call: inverse norms, the (B, S, N) row partials and the (B, P, M) column partials
// (fp32 max + int32 argmax each), and fp32 similarity outputs when the caller passes none.
struct MatchLayout {
    size_t inv_t, inv_r, row_sim, row_arg, col_sim, col_arg, t2r_sim, r2t_sim, total;
};

MatchLayout match_layout(int64_t B, int64_t N, int64_t M, int64_t S, int64_t P) {
    MatchLayout l{};
    size_t off = 0;
    auto take = [&](size_t bytes) {
        size_t at = off;
        off = dfk::align_up(off + bytes, kAlign);
        return at;
    };
    l.inv_t = take(4 * B * N);
    l.inv_r = take(4 * B * M);
    l.row_sim = take(4 * B * S * N);
    l.row_arg = take(4 * B * S * N);
    l.col_sim = take(4 * B * P * M);
    l.col_arg = take(4 * B * P * M);
    l.t2r_sim = take(4 * B * N);
    l.r2t_sim = take(4 * B * M);
    l.total = off;
    return l;
}

// matching._col_chunk with num_sms known: ~4 programs per SM, at least 4 column tiles per split, a multiple of
// BLOCK_N (the kernel's column tiles never straddle two splits).
int64_t col_chunk(int64_t B, int64_t N, int64_t M, int64_t num_sms, int64_t block_m, int64_t block_n) {
    const int64_t target = 4 * num_sms;
    const int64_t min_chunk = 4 * block_n;
    const int64_t splits = static_cast<int64_t>(dfk::cdiv(target, B * dfk::cdiv(N, block_m)));
    int64_t chunk = static_cast<int64_t>(dfk::cdiv(M, splits > 0 ? splits : 1));
    if (chunk < min_chunk)
        chunk = min_chunk;
    return static_cast<int64_t>(dfk::cdiv(chunk, block_n)) * block_n;
}

char* at(void* base, size_t off) { return static_cast<char*>(base) + off; }

dfk_status check_out(const char* op, const char* name, const dfk_tensor* t, int64_t B, int64_t L,
                     bool index_dtype) {
    DFK_TRY(dfk::check_tensor(op, name, t, 2));
    if (t->shape[0] != B || t->shape[1] != L)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must have shape (%" PRId64 ", %" PRId64 "), got %s", op, name,
                    B, L, dfk::shape_str(*t).c_str());
    if (index_dtype ? (t->dtype != DFK_INT32 && t->dtype != DFK_INT64) : t->dtype != DFK_FLOAT32)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be %s, got %s", op, name,
                    index_dtype ? "int32 or int64" : "fp32", dfk::dtype_name(t->dtype));
    if (!dfk::is_contiguous(*t))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be contiguous", op, name);
    return DFK_OK;
}

dfk_status launch_inv_norm(dfk::Call& call, const dfk_tensor* f, void* out, dfk_stream stream) {
    int idx;
    DFK_TRY(call.select("match_inv_norm", std::string("dtype=") + dfk::dtype_name(f->dtype), &idx));
    dfk::Params p(call.op());
    p.ptr("F", f->data);
    p.ptr("OUT", out);
    p.i32("L", f->shape[1]);
    p.i32("D", f->shape[2]);
    p.i32("stride_b", f->strides[0]);
    p.i32("stride_l", f->strides[1]);
    p.scratch();
    const int64_t bl = dfk::variant_const(dfk::variant(idx), "BLOCK_L");
    return call.launch(idx, p, dfk::cdiv(f->shape[1], bl), f->shape[0], 1, stream);
}

dfk_status launch_finish(dfk::Call& call, const void* sim, const void* arg, void* out_sim, const dfk_tensor* out_idx,
                         int64_t B, int64_t R, int64_t L, dfk_stream stream) {
    int idx;
    DFK_TRY(call.select("match_finish", std::string("index=") + dfk::dtype_name(out_idx->dtype), &idx));
    dfk::Params p(call.op());
    p.ptr("SIM", sim);
    p.ptr("ARG", arg);
    p.ptr("OUT_SIM", out_sim);
    p.ptr("OUT_IDX", out_idx->data);
    p.i32("R", R);
    p.i32("L", L);
    p.scratch();
    const int64_t block = dfk::variant_const(dfk::variant(idx), "BLOCK");
    return call.launch(idx, p, dfk::cdiv(L, block), B, 1, stream);
}

}  // namespace

extern "C" {

size_t dfk_match_argmax_workspace_size(int64_t B, int64_t N, int64_t M) {
    if (B <= 0 || N <= 0 || M <= 0)
        return 0;
    MatchTiles t = match_tiles();
    if (t.min_block_m <= 0)
        return 0;
    // S <= cdiv(M, min_chunk) with min_chunk = 4 * BLOCK_N; P = cdiv(N, BLOCK_M)
    const int64_t S = static_cast<int64_t>(dfk::cdiv(M, 4 * t.min_block_n));
    const int64_t P = static_cast<int64_t>(dfk::cdiv(N, t.min_block_m));
    return match_layout(B, N, M, S, P).total;
}

dfk_status dfk_match_argmax(const dfk_tensor* f_tgt, const dfk_tensor* f_ref, const dfk_tensor* t2r,
                            const dfk_tensor* r2t, const dfk_tensor* t2r_sim, const dfk_tensor* r2t_sim,
                            void* workspace, size_t workspace_size, dfk_stream stream) {
    dfk::Call call("match_argmax");
    const char* op = call.op();
    DFK_TRY(dfk::check_tensor(op, "f_tgt", f_tgt, 3));
    DFK_TRY(dfk::check_tensor(op, "f_ref", f_ref, 3));
    for (const auto& [name, f] : {std::pair<const char*, const dfk_tensor*>{"f_tgt", f_tgt}, {"f_ref", f_ref}}) {
        if (f->dtype != DFK_FLOAT16 && f->dtype != DFK_BFLOAT16 && f->dtype != DFK_FLOAT32)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s dtype %s not supported (fp16, bf16, fp32)", op, name,
                        dfk::dtype_name(f->dtype));
        if (f->shape[1] < 1 || f->shape[2] < 1)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s positions and channels must be >= 1, got %s", op, name,
                        dfk::shape_str(*f).c_str());
        if (f->strides[2] != 1 && f->shape[2] != 1)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must have unit stride along D, got %" PRId64, op, name,
                        f->strides[2]);
    }
    const int64_t B = f_tgt->shape[0], N = f_tgt->shape[1], D = f_tgt->shape[2], M = f_ref->shape[1];
    if (f_ref->shape[0] != B)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: batch: f_tgt has B=%" PRId64 ", f_ref has B=%" PRId64, op, B,
                    f_ref->shape[0]);
    if (f_ref->shape[2] != D)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: dim: f_tgt has D=%" PRId64 ", f_ref has D=%" PRId64, op, D,
                    f_ref->shape[2]);
    if (f_ref->dtype != f_tgt->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: dtype: f_tgt is %s, f_ref is %s", op, dfk::dtype_name(f_tgt->dtype),
                    dfk::dtype_name(f_ref->dtype));
    DFK_TRY(check_out(op, "t2r", t2r, B, N, true));
    DFK_TRY(check_out(op, "r2t", r2t, B, M, true));
    if (r2t->dtype != t2r->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: t2r and r2t must share a dtype, got %s and %s", op,
                    dfk::dtype_name(t2r->dtype), dfk::dtype_name(r2t->dtype));
    if (t2r_sim != nullptr)
        DFK_TRY(check_out(op, "t2r_sim", t2r_sim, B, N, false));
    if (r2t_sim != nullptr)
        DFK_TRY(check_out(op, "r2t_sim", r2t_sim, B, M, false));

    int idx;
    DFK_TRY(call.select("match_argmax", std::string("dtype=") + dfk::dtype_name(f_tgt->dtype), &idx));
    if (B == 0)
        return DFK_OK;
    const dfk::Device* dev;
    DFK_TRY(call.device(&dev));
    const dfk_variant& v = dfk::variant(idx);
    const int64_t bm = dfk::variant_const(v, "BLOCK_M"), bn = dfk::variant_const(v, "BLOCK_N");
    const int64_t chunk = col_chunk(B, N, M, dev->num_sms, bm, bn);
    const int64_t S = static_cast<int64_t>(dfk::cdiv(M, chunk));
    const int64_t P = static_cast<int64_t>(dfk::cdiv(N, bm));
    const MatchLayout l = match_layout(B, N, M, S, P);
    if (workspace_size < l.total || (l.total > 0 && workspace == nullptr))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace of %zu bytes is too small: this call needs %zu "
                                              "(dfk_match_argmax_workspace_size)", op, workspace_size, l.total);
    if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace pointer %p is not 16-byte aligned", op, workspace);

    DFK_TRY(launch_inv_norm(call, f_tgt, at(workspace, l.inv_t), stream));
    DFK_TRY(launch_inv_norm(call, f_ref, at(workspace, l.inv_r), stream));
    dfk::Params p(op);
    p.ptr("FT", f_tgt->data);
    p.ptr("FR", f_ref->data);
    p.ptr("INV_T", at(workspace, l.inv_t));
    p.ptr("INV_R", at(workspace, l.inv_r));
    p.ptr("ROW_SIM", at(workspace, l.row_sim));
    p.ptr("ROW_ARG", at(workspace, l.row_arg));
    p.ptr("COL_SIM", at(workspace, l.col_sim));
    p.ptr("COL_ARG", at(workspace, l.col_arg));
    p.i32("stb", f_tgt->strides[0]);
    p.i32("stn", f_tgt->strides[1]);
    p.i32("srb", f_ref->strides[0]);
    p.i32("srm", f_ref->strides[1]);
    p.i32("N", N);
    p.i32("M", M);
    p.i32("D", D);
    p.i32("CHUNK", chunk);
    p.i32("S", S);
    p.i32("P", P);
    p.scratch();
    // grid: (cdiv(N, BLOCK_M), S, B), as matching._launch_match
    DFK_TRY(call.launch(idx, p, dfk::cdiv(N, bm), S, B, stream));
    void* ts = t2r_sim ? t2r_sim->data : at(workspace, l.t2r_sim);
    void* rs = r2t_sim ? r2t_sim->data : at(workspace, l.r2t_sim);
    DFK_TRY(launch_finish(call, at(workspace, l.row_sim), at(workspace, l.row_arg), ts, t2r, B, S, N, stream));
    return launch_finish(call, at(workspace, l.col_sim), at(workspace, l.col_arg), rs, r2t, B, P, M, stream);
}

size_t dfk_cycle_mask_workspace_size(int64_t B) { return B > 0 ? dfk::align_up(4 * static_cast<size_t>(B), kAlign) : 0; }

dfk_status dfk_cycle_mask(const dfk_tensor* t2r, const dfk_tensor* r2t, const dfk_tensor* fg, int64_t height,
                          int64_t width, double lambda_c, const dfk_tensor* out, void* workspace, size_t workspace_size,
                          dfk_stream stream) {
    dfk::Call call("cycle_mask");
    const char* op = call.op();
    DFK_TRY(dfk::check_tensor(op, "t2r", t2r, 2));
    DFK_TRY(dfk::check_tensor(op, "r2t", r2t, 2));
    DFK_TRY(dfk::check_tensor(op, "fg", fg, 2));
    DFK_TRY(dfk::check_tensor(op, "out", out, 2));
    for (const auto& [name, t] : {std::pair<const char*, const dfk_tensor*>{"t2r", t2r}, {"r2t", r2t}})
        if (t->dtype != DFK_INT32 && t->dtype != DFK_INT64)
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be an integer flow (int32/int64), got %s", op, name,
                        dfk::dtype_name(t->dtype));
    if (fg->dtype == DFK_INT32 || fg->dtype == DFK_INT64)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: fg must be a float (B, N) mask, got %s", op,
                    dfk::dtype_name(fg->dtype));
    if (height < 1 || width < 1)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: height/width must be >= 1, got %" PRId64 "x%" PRId64, op, height,
                    width);
    const int64_t B = t2r->shape[0], n = height * width;
    if (t2r->shape[1] != n)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: height*width: %" PRId64 "*%" PRId64 " = %" PRId64 " but t2r has "
                                              "N = %" PRId64, op, height, width, n, t2r->shape[1]);
    if (r2t->shape[1] != n)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: r2t: M = %" PRId64 " must equal N = height*width = %" PRId64
                                              " (one grid)", op, r2t->shape[1], n);
    if (r2t->shape[0] != B)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: batch: t2r has B=%" PRId64 ", r2t has B=%" PRId64, op, B,
                    r2t->shape[0]);
    if (fg->shape[0] != B || fg->shape[1] != n)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: fg: shape %s must equal t2r's %s", op, dfk::shape_str(*fg).c_str(),
                    dfk::shape_str(*t2r).c_str());
    if (out->shape[0] != B || out->shape[1] != n || out->dtype != fg->dtype)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: out must be a %s %s tensor like fg, got %s %s", op,
                    dfk::dtype_name(fg->dtype), dfk::shape_str(*fg).c_str(), dfk::dtype_name(out->dtype),
                    dfk::shape_str(*out).c_str());
    if (!(lambda_c > 0) || !std::isfinite(lambda_c))
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: lambda_c must be > 0, got %g", op, lambda_c);
    for (const auto& [name, t] :
         {std::pair<const char*, const dfk_tensor*>{"t2r", t2r}, {"r2t", r2t}, {"fg", fg}, {"out", out}})
        if (!dfk::is_contiguous(*t))
            return fail(DFK_ERR_INVALID_ARGUMENT, "%s: %s must be contiguous", op, name);
    if (r2t->dtype != t2r->dtype)
        return fail(DFK_ERR_NO_VARIANT, "%s: t2r and r2t must share a dtype in the embedded kernels, got %s and %s", op,
                    dfk::dtype_name(t2r->dtype), dfk::dtype_name(r2t->dtype));
    const std::string dt = dfk::dtype_name(fg->dtype);
    int thr_idx, idx;
    DFK_TRY(call.select("cycle_threshold", "dtype=" + dt, &thr_idx));
    DFK_TRY(call.select("cycle_mask", "dtype=" + dt + ";flow=" + dfk::dtype_name(t2r->dtype), &idx));
    if (B * n == 0)
        return DFK_OK;
    const size_t need = dfk_cycle_mask_workspace_size(B);
    if (workspace_size < need || workspace == nullptr)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace of %zu bytes is too small: this call needs %zu "
                                              "(dfk_cycle_mask_workspace_size)", op, workspace_size, need);
    if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
        return fail(DFK_ERR_INVALID_ARGUMENT, "%s: workspace pointer %p is not 16-byte aligned", op, workspace);

    // thr[b] = lambda_c * height * sum(fg[b]) / N, with lambda_c * height rounded once to fp32 (as torch does)
    dfk::Params pt(op);
    pt.ptr("FG", fg->data);
    pt.ptr("THR", workspace);
    pt.i32("N", n);
    pt.i32("stride_b", fg->strides[0]);
    pt.f32("scale", lambda_c * static_cast<double>(height));
    pt.scratch();
    DFK_TRY(call.launch(thr_idx, pt, B, 1, 1, stream));

    dfk::Params p(op);
    p.ptr("T2R", t2r->data);
    p.ptr("R2T", r2t->data);
    p.ptr("FG", fg->data);
    p.ptr("THR", workspace);
    p.ptr("OUT", out->data);
    p.i32("N", n);
    p.i32("W", width);
    p.scratch();
    const int64_t block = dfk::variant_const(dfk::variant(idx), "BLOCK");
    // grid: (cdiv(N, BLOCK), B), as matching._launch_cycle
    return call.launch(idx, p, dfk::cdiv(n, block), B, 1, stream);
}

}  // extern "C"
