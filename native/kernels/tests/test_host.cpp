// Host-side checks of dreamfuse_kernels, on any machine (no GPU, no driver):
//  * every expected kernel variant is embedded for every arch, as a CUDA ELF of that arch naming its entry;
//  * dry runs (dfk_set_dry_run) of every launcher select the right variant, build parameters that match the
//    kernel's signature (generated from the Triton code) and compute the Python launchers' grids -- and together
//    they reach every embedded kernel;
//  * the argument checks reject bad shapes, dtypes, strides, pointers and workspaces with DFK_ERR_INVALID_ARGUMENT
//    (or DFK_ERR_NO_VARIANT where only the embedded set is short) and a message naming the argument;
//  * `--no-driver` (run with DFK_LIBCUDA pointing at a missing file): real launches fail cleanly with
//    DFK_ERR_NO_DRIVER.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "dreamfuse_kernels.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        ++g_checks;                                                         \
        if (!(cond)) {                                                      \
            ++g_failures;                                                   \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
            std::printf(__VA_ARGS__);                                       \
            std::printf("\n");                                              \
        }                                                                   \
    } while (0)

// Distinct, 256-byte aligned fake device addresses: a dry run never dereferences them.
void* fake(int i) { return reinterpret_cast<void*>(static_cast<uintptr_t>(0x10000000ull + 0x1000000ull * i)); }

dfk_tensor T(dfk_dtype dt, std::vector<int64_t> shape, int id) {
    return dfk_tensor_contiguous(fake(id), dt, static_cast<int32_t>(shape.size()), shape.data());
}

std::vector<int> split_archs(const char* s) {
    std::vector<int> out;
    for (const char* p = s; *p;) {
        out.push_back(std::atoi(p));
        while (*p && *p != ',') ++p;
        if (*p == ',') ++p;
    }
    return out;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<dfk_launch_record> launches() {
    dfk_launch_record recs[16];
    int n = dfk_last_launches(recs, 16);
    return std::vector<dfk_launch_record>(recs, recs + (n < 16 ? n : 16));
}

dfk_kernel_info info(int i) {
    dfk_kernel_info k{};
    dfk_kernel_get(i, &k);
    return k;
}

std::set<int> g_launched;  // kernels reached by the dry runs

// A call's status and message, and its launches' kernels (op, key) and grids.
void expect_ok(dfk_status st, const char* what) {
    CHECK(st == DFK_OK, "%s: %s: %s", what, dfk_status_name(st), dfk_last_error());
    CHECK(st != DFK_OK || dfk_last_error()[0] == '\0', "%s: error left set after success: %s", what, dfk_last_error());
    for (const dfk_launch_record& r : launches()) g_launched.insert(r.kernel);
}

void expect_fail(dfk_status st, dfk_status want, const char* substr, const char* what) {
    CHECK(st == want, "%s: got %s (%s), want %s", what, dfk_status_name(st), dfk_last_error(), dfk_status_name(want));
    CHECK(std::strstr(dfk_last_error(), substr) != nullptr, "%s: message '%s' lacks '%s'", what, dfk_last_error(),
          substr);
    CHECK(std::strchr(dfk_last_error(), '\n') == nullptr, "%s: message is not one line", what);
}

void expect_launch(size_t i, const char* op, const std::string& key, int arch, int64_t gx, int64_t gy, int64_t gz,
                   const char* what) {
    std::vector<dfk_launch_record> recs = launches();
    if (i >= recs.size()) {
        CHECK(false, "%s: launch %zu missing (%zu launches)", what, i, recs.size());
        return;
    }
    const dfk_launch_record& r = recs[i];
    dfk_kernel_info k = info(r.kernel);
    CHECK(std::strcmp(k.op, op) == 0 && key == k.key && k.arch == arch, "%s: launch %zu ran %s [%s] sm_%d, want %s [%s] "
          "sm_%d", what, i, k.op, k.key, k.arch, op, key.c_str(), arch);
    CHECK(r.grid[0] == gx && r.grid[1] == gy && r.grid[2] == gz, "%s: %s grid (%u, %u, %u), want (%" PRId64 ", %" PRId64
          ", %" PRId64 ") from %s", what, k.name, r.grid[0], r.grid[1], r.grid[2], gx, gy, gz, k.grid);
    CHECK(r.block == static_cast<uint32_t>(32 * k.num_warps), "%s: block %u for %d warps", what, r.block, k.num_warps);
    CHECK(r.shared_bytes == static_cast<uint32_t>(k.shared_bytes), "%s: shared %u != %d", what, r.shared_bytes,
          k.shared_bytes);
    int commas = 0;
    for (const char* p = k.params; *p; ++p) commas += *p == ',';
    CHECK(r.num_params == commas + 1, "%s: %d parameters, the kernel declares %d", what, r.num_params, commas + 1);
}

int64_t kconst(size_t launch_index, const char* name) { return dfk_kernel_constexpr(launches()[launch_index].kernel, name); }

// ----------------------------------------------------------------------------------------------- embedded
std::vector<std::pair<std::string, std::string>> expected_variants() {
    std::vector<std::pair<std::string, std::string>> v;
    const char* half[] = {"fp16", "bf16"};
    const char* all[] = {"fp16", "bf16", "fp32"};
    const char* idx[] = {"i32", "i64"};
    for (int d : {40, 64, 80, 160}) {
        for (const char* dt : half) {
            v.push_back({"attention", std::string("dtype=") + dt + ";head_dim=" + std::to_string(d)});
            for (const char* fl : idx)
                v.push_back({"ama_attention", std::string("dtype=") + dt + ";flow=" + fl + ";head_dim=" + std::to_string(d)});
        }
        v.push_back({"ama_attention", "dtype=fp32;flow=i32;head_dim=" + std::to_string(d)});
    }
    for (const char* dt : all) {
        v.push_back({"match_argmax", std::string("dtype=") + dt});
        v.push_back({"match_inv_norm", std::string("dtype=") + dt});
        v.push_back({"cycle_threshold", std::string("dtype=") + dt});
        for (const char* fl : idx) v.push_back({"cycle_mask", std::string("dtype=") + dt + ";flow=" + fl});
        for (int bc : {4, 16})
            for (int g : {0, 1})
                v.push_back({"composite_blend", "block_c=" + std::to_string(bc) + ";dtype=" + dt +
                                                    ";per_segment_guidance=" + std::to_string(g)});
    }
    for (const char* i : idx) v.push_back({"match_finish", std::string("index=") + i});
    for (const char* dt : half)
        for (int br : {16, 32, 64, 128}) {
            const std::string k = "block_r=" + std::to_string(br) + ";dtype=" + dt;
            v.push_back({"lora_shrink", k});
            v.push_back({"lora_expand", "base=0;" + k});
            v.push_back({"lora_expand", "base=1;" + k});
        }
    return v;
}

void test_embedded(const std::vector<int>& archs) {
    std::map<std::tuple<std::string, std::string, int>, int> have;
    for (int i = 0; i < dfk_kernel_count(); ++i) {
        dfk_kernel_info k = info(i);
        have[{k.op, k.key, k.arch}]++;
        CHECK(dfk_cubin_arch(k.cubin, k.cubin_size) == k.arch, "%s: cubin is for sm_%d, listed as sm_%d", k.name,
              dfk_cubin_arch(k.cubin, k.cubin_size), k.arch);
        std::string bytes(static_cast<const char*>(k.cubin), k.cubin_size);
        CHECK(bytes.find(k.entry) != std::string::npos, "%s: entry %s not in the cubin", k.name, k.entry);
        const char* tail = ",global_scratch:p,profile_scratch:p";
        size_t n = std::strlen(k.params), m = std::strlen(tail);
        CHECK(n > m && std::strcmp(k.params + n - m, tail) == 0, "%s: parameters lack Triton's scratch pointers: %s",
              k.name, k.params);
        CHECK(k.num_warps == 1 || k.num_warps == 2 || k.num_warps == 4 || k.num_warps == 8, "%s: %d warps", k.name,
              k.num_warps);
        CHECK(k.shared_bytes >= 0 && k.shared_bytes <= 232448, "%s: %d bytes shared", k.name, k.shared_bytes);
    }
    std::vector<std::pair<std::string, std::string>> want = expected_variants();
    for (int arch : archs)
        for (const auto& [op, key] : want) {
            const int times = have[std::make_tuple(op, key, arch)];
            CHECK(times == 1, "%s [%s] sm_%d embedded %d times", op.c_str(), key.c_str(), arch, times);
        }
    CHECK(dfk_kernel_count() == static_cast<int>(want.size() * archs.size()), "%d kernels embedded, want %zu",
          dfk_kernel_count(), want.size() * archs.size());
    unsigned char junk[64] = {0};
    CHECK(dfk_cubin_arch(junk, sizeof junk) == -1, "zeros are not a cubin");
    CHECK(dfk_kernel_constexpr(-1, "BLOCK_M") == -1 && dfk_kernel_constexpr(0, "NO_SUCH") == -1, "constexpr lookup");
    dfk_kernel_info k;
    expect_fail(dfk_kernel_get(dfk_kernel_count(), &k), DFK_ERR_INVALID_ARGUMENT, "outside", "kernel_get range");
}

// ----------------------------------------------------------------------------------------------- dry runs
void dry_attention(int arch) {
    const dfk_dtype dts[] = {DFK_FLOAT16, DFK_BFLOAT16, DFK_FLOAT32};
    const char* names[] = {"fp16", "bf16", "fp32"};
    for (int d : {40, 64, 80, 160}) {
        for (int di = 0; di < 3; ++di) {
            dfk_dtype dt = dts[di];
            dfk_tensor q = T(dt, {2, 3, 77, d}, 0), k = T(dt, {2, 3, 100, d}, 1), v = T(dt, {2, 3, 100, d}, 2);
            dfk_tensor vr = T(dt, {2, 3, 100, d}, 3), out = T(dt, {2, 3, 77, d}, 4), lse = T(DFK_FLOAT32, {2, 3, 77}, 5);
            dfk_tensor mask = T(dt, {2, 100}, 6);
            std::string sd = std::to_string(d);
            if (dt != DFK_FLOAT32) {
                expect_ok(dfk_attention(&q, &k, &v, 0.125, &out, &lse, nullptr), "attention");
                expect_launch(0, "attention", std::string("dtype=") + names[di] + ";head_dim=" + sd, arch,
                              cdiv(77, kconst(0, "BLOCK_M")), 6, 1, "attention grid");
                CHECK(kconst(0, "HEAD_DIM") == d && kconst(0, "AMA") == 0 && kconst(0, "SA") == 8, "attention consts");
            } else {
                expect_fail(dfk_attention(&q, &k, &v, 0.125, &out, &lse, nullptr), DFK_ERR_NO_VARIANT,
                            "no embedded kernel for dtype=fp32", "plain fp32 attention");
            }
            for (dfk_dtype fl : {DFK_INT32, DFK_INT64}) {
                dfk_tensor flow = T(fl, {2, 100}, 7);
                dfk_status st = dfk_ama_attention(&q, &k, &v, &vr, &flow, &mask, 0.125, &out, &lse, nullptr);
                if (dt == DFK_FLOAT32 && fl == DFK_INT64) {
                    expect_fail(st, DFK_ERR_NO_VARIANT, "no embedded kernel", "fp32 AMA with int64 flow");
                    continue;
                }
                expect_ok(st, "ama_attention");
                expect_launch(0, "ama_attention", std::string("dtype=") + names[di] + ";flow=" +
                              (fl == DFK_INT32 ? "i32" : "i64") + ";head_dim=" + sd, arch,
                              cdiv(77, kconst(0, "BLOCK_M")), 6, 1, "ama grid");
                CHECK(kconst(0, "AMA") == 1, "ama consts");
            }
        }
    }
    // (B, L, H, D) memory seen as (B, H, L, D): the usual view, strides multiples of 8
    dfk_tensor q = T(DFK_FLOAT16, {2, 3, 77, 40}, 0);
    int64_t st[4] = {77 * 3 * 40, 40, 3 * 40, 1};
    std::memcpy(q.strides, st, sizeof st);
    dfk_tensor k = T(DFK_FLOAT16, {2, 3, 77, 40}, 1), out = q, lse = T(DFK_FLOAT32, {2, 3, 77}, 5);
    out.data = fake(4);
    expect_ok(dfk_attention(&q, &k, &k, 1.0, &out, &lse, nullptr), "transposed view");
    // nothing to compute: no launch, as the Python launcher's early return
    dfk_tensor q0 = T(DFK_FLOAT16, {2, 3, 0, 40}, 0), o0 = T(DFK_FLOAT16, {2, 3, 0, 40}, 4), l0 = T(DFK_FLOAT32, {2, 3, 0}, 5);
    expect_ok(dfk_attention(&q0, &k, &k, 1.0, &o0, &l0, nullptr), "empty q");
    CHECK(launches().empty(), "empty q launched %zu kernels", launches().size());
}

void dry_matching(int arch, int num_sms) {
    const dfk_dtype dts[] = {DFK_FLOAT16, DFK_BFLOAT16, DFK_FLOAT32};
    const char* names[] = {"fp16", "bf16", "fp32"};
    struct Case { int64_t B, N, M, D; };
    for (Case c : {Case{2, 100, 67, 256}, Case{1, 64, 4096, 512}, Case{3, 1000, 300, 40}}) {
        for (int di = 0; di < 3; ++di) {
            for (dfk_dtype ix : {DFK_INT32, DFK_INT64}) {
                dfk_tensor ft = T(dts[di], {c.B, c.N, c.D}, 0), fr = T(dts[di], {c.B, c.M, c.D}, 1);
                dfk_tensor t2r = T(ix, {c.B, c.N}, 2), r2t = T(ix, {c.B, c.M}, 3);
                dfk_tensor ts = T(DFK_FLOAT32, {c.B, c.N}, 4), rs = T(DFK_FLOAT32, {c.B, c.M}, 5);
                size_t ws = dfk_match_argmax_workspace_size(c.B, c.N, c.M);
                bool sims = ix == DFK_INT32;  // with and without the similarity outputs
                expect_ok(dfk_match_argmax(&ft, &fr, &t2r, &r2t, sims ? &ts : nullptr, sims ? &rs : nullptr, fake(8),
                                           ws, nullptr), "match_argmax");
                std::vector<dfk_launch_record> recs = launches();
                CHECK(recs.size() == 5, "match_argmax: %zu launches, want 5", recs.size());
                if (recs.size() != 5)
                    continue;
                std::string dk = std::string("dtype=") + names[di];
                std::string ik = std::string("index=") + (ix == DFK_INT32 ? "i32" : "i64");
                expect_launch(0, "match_inv_norm", dk, arch, cdiv(c.N, kconst(0, "BLOCK_L")), c.B, 1, "inv_norm tgt");
                expect_launch(1, "match_inv_norm", dk, arch, cdiv(c.M, kconst(1, "BLOCK_L")), c.B, 1, "inv_norm ref");
                // matching._col_chunk: ~4 programs per SM, >= 4 column tiles per split, a multiple of BLOCK_N
                int64_t bm = kconst(2, "BLOCK_M"), bn = kconst(2, "BLOCK_N");
                int64_t splits = cdiv(4 * num_sms, c.B * cdiv(c.N, bm));
                int64_t chunk = cdiv(c.M, splits) > 4 * bn ? cdiv(c.M, splits) : 4 * bn;
                int64_t S = cdiv(c.M, cdiv(chunk, bn) * bn), P = cdiv(c.N, bm);
                expect_launch(2, "match_argmax", dk, arch, cdiv(c.N, bm), S, c.B, "match grid");
                expect_launch(3, "match_finish", ik, arch, cdiv(c.N, kconst(3, "BLOCK")), c.B, 1, "finish rows");
                expect_launch(4, "match_finish", ik, arch, cdiv(c.M, kconst(4, "BLOCK")), c.B, 1, "finish cols");
                CHECK(P >= 1 && S >= 1, "S=%" PRId64 " P=%" PRId64, S, P);
                if (c.M == 4096)
                    CHECK(S > 1, "a long reference axis is split for occupancy (S = %" PRId64 ")", S);
            }
        }
    }
}

void dry_cycle(int arch) {
    const dfk_dtype dts[] = {DFK_FLOAT16, DFK_BFLOAT16, DFK_FLOAT32};
    const char* names[] = {"fp16", "bf16", "fp32"};
    for (int di = 0; di < 3; ++di) {
        for (dfk_dtype fl : {DFK_INT32, DFK_INT64}) {
            dfk_tensor t2r = T(fl, {2, 96}, 0), r2t = T(fl, {2, 96}, 1), fg = T(dts[di], {2, 96}, 2);
            dfk_tensor out = T(dts[di], {2, 96}, 3);
            expect_ok(dfk_cycle_mask(&t2r, &r2t, &fg, 8, 12, 0.4, &out, fake(8), dfk_cycle_mask_workspace_size(2),
                                     nullptr), "cycle_mask");
            std::string dk = std::string("dtype=") + names[di];
            expect_launch(0, "cycle_threshold", dk, arch, 2, 1, 1, "threshold grid");
            expect_launch(1, "cycle_mask", dk + ";flow=" + (fl == DFK_INT32 ? "i32" : "i64"), arch,
                          cdiv(96, kconst(1, "BLOCK")), 2, 1, "cycle grid");
        }
    }
}

void dry_blend(int arch) {
    const dfk_dtype dts[] = {DFK_FLOAT16, DFK_BFLOAT16, DFK_FLOAT32};
    const char* names[] = {"fp16", "bf16", "fp32"};
    for (int di = 0; di < 3; ++di) {
        for (int64_t C : {4, 8, 20}) {
            dfk_dtype dt = dts[di];
            dfk_tensor u = T(dt, {2, 3, C, 7, 9}, 0), c = T(dt, {2, 3, C, 7, 9}, 1), m = T(dt, {2, 3, 7, 9}, 2);
            dfk_tensor out = T(dt, {2, C, 7, 9}, 3), g = T(dt, {2, 3}, 4), g1 = T(dt, {3}, 5), g0 = T(dt, {}, 6);
            int64_t bc = C <= 4 ? 4 : 16;
            std::string k0 = "block_c=" + std::to_string(bc) + ";dtype=" + names[di] + ";per_segment_guidance=";
            expect_ok(dfk_composite_blend(&u, &c, &m, nullptr, 7.5, &out, nullptr), "blend scalar");
            expect_launch(0, "composite_blend", k0 + "0", arch, cdiv(63, kconst(0, "BLOCK_P")), cdiv(C, bc), 2,
                          "blend grid");
            for (const dfk_tensor* gt : {&g, &g1, &g0}) {
                expect_ok(dfk_composite_blend(&u, &c, &m, gt, 0.0, &out, nullptr), "blend per-segment");
                expect_launch(0, "composite_blend", k0 + "1", arch, cdiv(63, kconst(0, "BLOCK_P")), cdiv(C, bc), 2,
                              "blend grid");
            }
        }
    }
    // an expand over the segment axis (stride 0) and a slice along B are read in place
    dfk_tensor u = T(DFK_FLOAT16, {2, 3, 4, 7, 9}, 0);
    u.strides[1] = 0;
    dfk_tensor m = T(DFK_FLOAT16, {2, 3, 7, 9}, 2), out = T(DFK_FLOAT16, {2, 4, 7, 9}, 3);
    expect_ok(dfk_composite_blend(&u, &u, &m, nullptr, 1.0, &out, nullptr), "blend expanded");
}

dfk_status lora(const dfk_tensor& x, const dfk_tensor& a, const dfk_tensor& b, const dfk_tensor& ranks,
                const dfk_tensor& starts, const dfk_tensor& adapter, const dfk_tensor& scale, const dfk_tensor* base,
                const dfk_tensor& out, size_t ws) {
    return dfk_lora_delta(&x, &a, &b, &ranks, &starts, &adapter, &scale, base, &out, fake(9), ws, nullptr);
}

void dry_lora(int arch) {
    const dfk_dtype dts[] = {DFK_FLOAT16, DFK_BFLOAT16};
    const char* names[] = {"fp16", "bf16"};
    const dfk_dtype I = DFK_INT32;
    for (int di = 0; di < 2; ++di) {
        // r_max -> BLOCK_R: 16 -> 16, 32 -> 32, 48 -> 64, 128 -> 128; T = 16 rows x 77 tokens, 3 slots
        for (int64_t r : {16, 32, 48, 128}) {
            const int64_t br = r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128;
            const int64_t Tn = 16 * 77, N = 5, S = 9, K = 3, d_in = 768, d_out = 1280;
            dfk_dtype dt = dts[di];
            dfk_tensor x = T(dt, {Tn, d_in}, 0), a = T(dt, {N, r, d_in}, 1), b = T(dt, {N, d_out, r}, 2);
            dfk_tensor rk = T(I, {N}, 3), st = T(I, {S + 1}, 4), ad = T(I, {S, K}, 5), sc = T(DFK_FLOAT32, {S, K}, 6);
            dfk_tensor base = T(dt, {Tn, d_out}, 7), out = T(dt, {Tn, d_out}, 8);
            const size_t ws = dfk_lora_delta_workspace_size(Tn, K, r, dt);
            CHECK(ws == static_cast<size_t>(K * Tn * br * 2), "lora workspace %zu", ws);
            const std::string k = "block_r=" + std::to_string(br) + ";dtype=" + names[di];
            const dfk_tensor* bases[] = {nullptr, &base};
            for (const dfk_tensor* bp : bases) {
                expect_ok(lora(x, a, b, rk, st, ad, sc, bp, out, ws), "lora_delta");
                CHECK(launches().size() == 2, "lora_delta: %zu launches, want 2", launches().size());
                expect_launch(0, "lora_shrink", k, arch, cdiv(Tn, kconst(0, "BLOCK_M")), K, 1, "lora shrink grid");
                expect_launch(1, "lora_expand", std::string("base=") + (bp ? "1;" : "0;") + k, arch,
                              cdiv(Tn, kconst(1, "BLOCK_M")), cdiv(d_out, kconst(1, "BLOCK_N")), 1, "lora expand grid");
                CHECK(kconst(0, "BLOCK_R") == br && kconst(1, "HAS_BASE") == (bp ? 1 : 0), "lora consts");
            }
        }
    }
    // nothing to compute: no launch
    dfk_tensor x0 = T(DFK_FLOAT16, {0, 320}, 0), a = T(DFK_FLOAT16, {2, 16, 320}, 1), b = T(DFK_FLOAT16, {2, 320, 16}, 2);
    dfk_tensor rk = T(I, {2}, 3), st = T(I, {1}, 4), ad = T(I, {0, 1}, 5), sc = T(DFK_FLOAT32, {0, 1}, 6);
    expect_ok(lora(x0, a, b, rk, st, ad, sc, nullptr, T(DFK_FLOAT16, {0, 320}, 8), 0), "lora empty");
    CHECK(launches().empty(), "empty lora launched %zu kernels", launches().size());
}

void test_dry_runs(const std::vector<int>& archs) {
    for (int arch : archs) {
        const int num_sms = arch == 90 ? 132 : 108;
        dfk_set_dry_run(arch, num_sms);
        g_launched.clear();
        dry_attention(arch);
        dry_matching(arch, num_sms);
        dry_cycle(arch);
        dry_blend(arch);
        dry_lora(arch);
        for (int i = 0; i < dfk_kernel_count(); ++i) {
            dfk_kernel_info k = info(i);
            if (k.arch == arch)
                CHECK(g_launched.count(i) == 1, "sm_%d: kernel %s [%s] never selected by a launcher", arch, k.op, k.key);
        }
    }
    // a GPU arch with no cubins: a clear error
    dfk_set_dry_run(120, 84);
    dfk_tensor q = T(DFK_FLOAT16, {1, 1, 8, 64}, 0), l = T(DFK_FLOAT32, {1, 1, 8}, 5);
    expect_fail(dfk_attention(&q, &q, &q, 1.0, &q, &l, nullptr), DFK_ERR_NO_VARIANT, "no cubin for this GPU (sm_120",
                "sm_120");
    dfk_set_dry_run(86, 84);  // sm_80 cubins serve sm_86
    expect_ok(dfk_attention(&q, &q, &q, 1.0, &q, &l, nullptr), "sm_86");
    CHECK(info(launches()[0].kernel).arch == 80, "sm_86 runs the sm_80 cubin");
}

// ----------------------------------------------------------------------------------------------- argument checks
void test_argument_checks() {
    dfk_set_dry_run(80, 108);
    const dfk_dtype H = DFK_FLOAT16, F = DFK_FLOAT32;
    dfk_tensor q = T(H, {2, 3, 77, 40}, 0), k = T(H, {2, 3, 100, 40}, 1), v = T(H, {2, 3, 100, 40}, 2);
    dfk_tensor out = T(H, {2, 3, 77, 40}, 4), lse = T(F, {2, 3, 77}, 5);
    auto attn = [&](const dfk_tensor& q_, const dfk_tensor& k_, const dfk_tensor& v_, const dfk_tensor& o_,
                    const dfk_tensor& l_, double scale = 0.125) {
        return dfk_attention(&q_, &k_, &v_, scale, &o_, &l_, nullptr);
    };
    expect_fail(attn(T(H, {2, 3, 77}, 0), k, v, out, lse), DFK_ERR_INVALID_ARGUMENT, "q must be rank 4", "q rank");
    expect_fail(dfk_attention(nullptr, &k, &v, 1.0, &out, &lse, nullptr), DFK_ERR_INVALID_ARGUMENT, "q is NULL", "q null");
    expect_fail(attn(T(DFK_INT32, {2, 3, 77, 40}, 0), k, v, out, lse), DFK_ERR_INVALID_ARGUMENT,
                "dtype i32 unsupported", "int q");
    expect_fail(attn(q, T(DFK_BFLOAT16, {2, 3, 100, 40}, 1), v, out, lse), DFK_ERR_INVALID_ARGUMENT,
                "must share a dtype", "k dtype");
    expect_fail(attn(q, T(H, {2, 4, 100, 40}, 1), v, out, lse), DFK_ERR_INVALID_ARGUMENT,
                "k shape (2, 4, 100, 40) does not match q's batch, heads, head dim", "k heads");
    expect_fail(attn(q, k, T(H, {2, 3, 99, 40}, 2), out, lse), DFK_ERR_INVALID_ARGUMENT, "key lengths differ", "Lv");
    expect_fail(attn(q, T(H, {2, 3, 0, 40}, 1), T(H, {2, 3, 0, 40}, 2), out, lse), DFK_ERR_INVALID_ARGUMENT,
                "no keys (Lk = 0)", "Lk 0");
    expect_fail(attn(T(H, {2, 3, 77, 300}, 0), T(H, {2, 3, 100, 300}, 1), T(H, {2, 3, 100, 300}, 2),
                     T(H, {2, 3, 77, 300}, 4), lse), DFK_ERR_INVALID_ARGUMENT, "head dim 300 unsupported", "D 300");
    expect_fail(attn(T(H, {2, 3, 77, 48}, 0), T(H, {2, 3, 100, 48}, 1), T(H, {2, 3, 100, 48}, 2),
                     T(H, {2, 3, 77, 48}, 4), lse), DFK_ERR_NO_VARIANT, "no embedded kernel for dtype=fp16;head_dim=48",
                "D 48");
    dfk_tensor qs = q;
    qs.strides[3] = 2;
    expect_fail(attn(qs, k, v, out, lse), DFK_ERR_INVALID_ARGUMENT, "q must have unit stride along D", "D stride");
    qs = q;
    qs.strides[2] = 44;
    expect_fail(attn(qs, k, v, out, lse), DFK_ERR_NO_VARIANT, "q stride 44 along dim 2 is not a multiple of 8", "SA");
    qs = q;
    qs.data = static_cast<char*>(fake(0)) + 2;
    expect_fail(attn(qs, k, v, out, lse), DFK_ERR_INVALID_ARGUMENT, "q data pointer", "misaligned");
    qs = q;
    qs.data = nullptr;
    expect_fail(attn(qs, k, v, out, lse), DFK_ERR_INVALID_ARGUMENT, "q data pointer is NULL", "null data");
    expect_fail(attn(q, k, v, out, T(H, {2, 3, 77}, 5)), DFK_ERR_INVALID_ARGUMENT, "lse must be a contiguous fp32",
                "lse dtype");
    expect_fail(attn(q, k, v, T(H, {2, 3, 76, 40}, 4), lse), DFK_ERR_INVALID_ARGUMENT, "out shape", "out shape");
    expect_fail(attn(q, k, v, out, lse, 0.0 / 0.0), DFK_ERR_INVALID_ARGUMENT, "scale must be finite", "nan scale");
    {  // a stride past int32 (the kernels take i32)
        const int64_t Lk = int64_t(1) << 31;
        dfk_tensor q1 = T(H, {1, 1, 1, 64}, 0), k1 = T(H, {2, 1, Lk, 64}, 1), o1 = T(H, {1, 1, 1, 64}, 4);
        k1.shape[0] = 1;
        expect_fail(attn(q1, k1, k1, o1, T(F, {1, 1, 1}, 5)), DFK_ERR_INVALID_ARGUMENT, "does not fit in int32", "i32");
    }
    {  // B * H past the grid's y limit
        dfk_tensor q1 = T(H, {70000, 1, 8, 64}, 0);
        expect_fail(attn(q1, q1, q1, q1, T(F, {70000, 1, 8}, 5)), DFK_ERR_INVALID_ARGUMENT, "exceeds CUDA's limits",
                    "grid");
    }
    // AMA
    dfk_tensor flow = T(DFK_INT64, {2, 100}, 7), mask = T(H, {2, 100}, 6);
    auto ama = [&](const dfk_tensor& vr, const dfk_tensor& fl, const dfk_tensor& m) {
        return dfk_ama_attention(&q, &k, &v, &vr, &fl, &m, 0.125, &out, &lse, nullptr);
    };
    expect_ok(ama(v, flow, mask), "ama ok");
    expect_fail(ama(T(H, {2, 3, 99, 40}, 3), flow, mask), DFK_ERR_INVALID_ARGUMENT, "v_ref must have v_tgt's shape",
                "v_ref");
    expect_fail(ama(v, T(DFK_INT64, {2, 99}, 7), mask), DFK_ERR_INVALID_ARGUMENT, "flow must have shape (B, Lk)", "flow");
    expect_fail(ama(v, T(H, {2, 100}, 7), mask), DFK_ERR_INVALID_ARGUMENT, "flow must be int32 or int64", "flow dt");
    expect_fail(ama(v, flow, T(DFK_INT32, {2, 100}, 6)), DFK_ERR_INVALID_ARGUMENT, "mask must be a float", "mask int");
    expect_fail(ama(v, flow, T(F, {2, 100}, 6)), DFK_ERR_NO_VARIANT, "mask dtype fp32 must equal q's fp16", "mask dt");
    // matching
    dfk_tensor ft = T(H, {2, 100, 256}, 0), fr = T(H, {2, 67, 256}, 1);
    dfk_tensor t2r = T(DFK_INT32, {2, 100}, 2), r2t = T(DFK_INT32, {2, 67}, 3);
    const size_t ws = dfk_match_argmax_workspace_size(2, 100, 67);
    auto match = [&](const dfk_tensor& a, const dfk_tensor& b, const dfk_tensor& x, const dfk_tensor& y, size_t w) {
        return dfk_match_argmax(&a, &b, &x, &y, nullptr, nullptr, fake(8), w, nullptr);
    };
    CHECK(ws > 0, "workspace size");
    expect_ok(match(ft, fr, t2r, r2t, ws), "match ok");
    expect_fail(match(ft, T(H, {2, 67, 128}, 1), t2r, r2t, ws), DFK_ERR_INVALID_ARGUMENT,
                "dim: f_tgt has D=256, f_ref has D=128", "match D");
    expect_fail(match(ft, T(H, {3, 67, 256}, 1), t2r, r2t, ws), DFK_ERR_INVALID_ARGUMENT, "batch: f_tgt has B=2",
                "match B");
    expect_fail(match(T(H, {2, 0, 256}, 0), fr, T(DFK_INT32, {2, 0}, 2), r2t, ws), DFK_ERR_INVALID_ARGUMENT,
                "positions and channels must be >= 1", "match N 0");
    expect_fail(match(T(DFK_INT64, {2, 100, 256}, 0), fr, t2r, r2t, ws), DFK_ERR_INVALID_ARGUMENT,
                "f_tgt dtype i64 not supported", "match dtype");
    expect_fail(match(ft, T(F, {2, 67, 256}, 1), t2r, r2t, ws), DFK_ERR_INVALID_ARGUMENT, "dtype: f_tgt is fp16",
                "match dtypes");
    expect_fail(match(ft, fr, T(DFK_INT32, {2, 99}, 2), r2t, ws), DFK_ERR_INVALID_ARGUMENT, "t2r must have shape (2, 100)",
                "t2r shape");
    expect_fail(match(ft, fr, T(F, {2, 100}, 2), r2t, ws), DFK_ERR_INVALID_ARGUMENT, "t2r must be int32 or int64",
                "t2r dtype");
    expect_fail(match(ft, fr, t2r, T(DFK_INT64, {2, 67}, 3), ws), DFK_ERR_INVALID_ARGUMENT, "must share a dtype",
                "index dtypes");
    expect_fail(match(ft, fr, t2r, r2t, 16), DFK_ERR_INVALID_ARGUMENT, "workspace of 16 bytes is too small", "ws");
    dfk_tensor fs = ft;
    fs.strides[2] = 2;
    expect_fail(match(fs, fr, t2r, r2t, ws), DFK_ERR_INVALID_ARGUMENT, "unit stride along D", "match stride");
    // cycle mask
    dfk_tensor c1 = T(DFK_INT32, {2, 96}, 0), c2 = T(DFK_INT32, {2, 96}, 1), fg = T(H, {2, 96}, 2), co = T(H, {2, 96}, 3);
    auto cyc = [&](const dfk_tensor& a, const dfk_tensor& b, const dfk_tensor& f, int64_t hh, int64_t ww, double lam,
                   const dfk_tensor& o, void* w, size_t wn) {
        return dfk_cycle_mask(&a, &b, &f, hh, ww, lam, &o, w, wn, nullptr);
    };
    const size_t cws = dfk_cycle_mask_workspace_size(2);
    expect_ok(cyc(c1, c2, fg, 8, 12, 0.4, co, fake(8), cws), "cycle ok");
    expect_fail(cyc(c1, c2, fg, 8, 11, 0.4, co, fake(8), cws), DFK_ERR_INVALID_ARGUMENT, "height*width: 8*11 = 88",
                "cycle hw");
    expect_fail(cyc(c1, c2, fg, 8, 12, 0.0, co, fake(8), cws), DFK_ERR_INVALID_ARGUMENT, "lambda_c must be > 0", "lambda");
    expect_fail(cyc(T(F, {2, 96}, 0), c2, fg, 8, 12, 0.4, co, fake(8), cws), DFK_ERR_INVALID_ARGUMENT,
                "t2r must be an integer flow", "cycle t2r dtype");
    expect_fail(cyc(c1, T(DFK_INT32, {3, 96}, 1), fg, 8, 12, 0.4, co, fake(8), cws), DFK_ERR_INVALID_ARGUMENT,
                "batch: t2r has B=2, r2t has B=3", "cycle B");
    expect_fail(cyc(c1, c2, fg, 8, 12, 0.4, T(F, {2, 96}, 3), fake(8), cws), DFK_ERR_INVALID_ARGUMENT,
                "out must be a fp16", "cycle out");
    dfk_tensor fgs = fg;
    fgs.strides[0] = 200;
    expect_fail(cyc(c1, c2, fgs, 8, 12, 0.4, co, fake(8), cws), DFK_ERR_INVALID_ARGUMENT, "fg must be contiguous",
                "cycle contiguous");
    expect_fail(cyc(c1, c2, fg, 8, 12, 0.4, co, nullptr, 0), DFK_ERR_INVALID_ARGUMENT, "workspace of 0 bytes",
                "cycle ws");
    expect_fail(cyc(c1, T(DFK_INT64, {2, 96}, 1), fg, 8, 12, 0.4, co, fake(8), cws), DFK_ERR_NO_VARIANT,
                "t2r and r2t must share a dtype", "cycle flow dtypes");
    // composite blend
    dfk_tensor u = T(H, {2, 3, 4, 7, 9}, 0), c = T(H, {2, 3, 4, 7, 9}, 1), m = T(H, {2, 3, 7, 9}, 2);
    dfk_tensor bo = T(H, {2, 4, 7, 9}, 3);
    auto blend = [&](const dfk_tensor& a, const dfk_tensor& b, const dfk_tensor& mm, const dfk_tensor* g,
                     const dfk_tensor& o) { return dfk_composite_blend(&a, &b, &mm, g, 7.5, &o, nullptr); };
    expect_fail(blend(u, c, T(H, {2, 3, 7, 8}, 2), nullptr, bo), DFK_ERR_INVALID_ARGUMENT,
                "masks: shape (2, 3, 7, 8) does not match", "blend masks");
    expect_fail(blend(u, T(F, {2, 3, 4, 7, 9}, 1), m, nullptr, bo), DFK_ERR_INVALID_ARGUMENT, "dtype: eps_cond is fp32",
                "blend dtype");
    expect_fail(blend(T(H, {2, 0, 4, 7, 9}, 0), T(H, {2, 0, 4, 7, 9}, 1), T(H, {2, 0, 7, 9}, 2), nullptr, bo),
                DFK_ERR_INVALID_ARGUMENT, "S must be >= 1", "blend S");
    dfk_tensor g4 = T(H, {4}, 4), gf = T(F, {2, 3}, 4);
    expect_fail(blend(u, c, m, &g4, bo), DFK_ERR_INVALID_ARGUMENT, "guidance: expected a float or a (B, S) = (2, 3)",
                "blend guidance shape");
    expect_fail(blend(u, c, m, &gf, bo), DFK_ERR_NO_VARIANT, "guidance dtype fp32", "blend guidance dtype");
    expect_fail(blend(u, c, T(F, {2, 3, 7, 9}, 2), nullptr, bo), DFK_ERR_NO_VARIANT, "masks dtype fp32", "masks dtype");
    dfk_tensor bos = bo;
    bos.strides[0] = 1000;
    expect_fail(blend(u, c, m, nullptr, bos), DFK_ERR_INVALID_ARGUMENT, "out must be a contiguous", "blend out");
    dfk_tensor uc = u;
    uc.strides[3] = 10;  // a crop along w: (h, w) plane no longer dense
    expect_fail(blend(uc, c, m, nullptr, bo), DFK_ERR_NO_VARIANT, "eps_uncond: the (h, w) plane is not dense",
                "blend crop");
    // lora_delta
    {
        const dfk_dtype I = DFK_INT32;
        dfk_tensor x = T(H, {100, 320}, 0), a = T(H, {4, 16, 320}, 1), b = T(H, {4, 640, 16}, 2), rk = T(I, {4}, 3);
        dfk_tensor st = T(I, {4}, 4), ad = T(I, {3, 2}, 5), sc = T(F, {3, 2}, 6), lo = T(H, {100, 640}, 8);
        const size_t lws = dfk_lora_delta_workspace_size(100, 2, 16, H);
        expect_ok(lora(x, a, b, rk, st, ad, sc, nullptr, lo, lws), "lora ok");
        expect_fail(lora(T(F, {100, 320}, 0), a, b, rk, st, ad, sc, nullptr, lo, lws), DFK_ERR_NO_VARIANT,
                    "x dtype fp32 not supported", "lora fp32");
        expect_fail(lora(x, T(H, {4, 16, 321}, 1), b, rk, st, ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "does not match x's d_in = 320", "lora d_in");
        expect_fail(lora(x, T(H, {4, 129, 320}, 1), T(H, {4, 640, 129}, 2), rk, st, ad, sc, nullptr, lo, lws),
                    DFK_ERR_INVALID_ARGUMENT, "r_max = 129", "lora r_max");
        expect_fail(lora(x, a, T(H, {4, 640, 8}, 2), rk, st, ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "lora_b must be (N, d_out, r_max) = (4, d_out, 16)", "lora b shape");
        expect_fail(lora(x, a, T(DFK_BFLOAT16, {4, 640, 16}, 2), rk, st, ad, sc, nullptr, lo, lws),
                    DFK_ERR_INVALID_ARGUMENT, "lora_b dtype bf16 must equal x's fp16", "lora b dtype");
        expect_fail(lora(x, a, b, T(DFK_INT64, {4}, 3), st, ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "ranks must be a contiguous i32", "lora ranks dtype");
        expect_fail(lora(x, a, b, T(I, {3}, 3), st, ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "ranks must be (N,) = (4,)", "lora ranks shape");
        expect_fail(lora(x, a, b, rk, T(I, {5}, 4), ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "seg_adapter must be (S, K) = (4, K >= 1)", "lora segments");
        expect_fail(lora(x, a, b, rk, st, ad, T(F, {3, 1}, 6), nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "seg_scale shape (3, 1) must equal", "lora scale shape");
        dfk_tensor bad_base = T(H, {100, 320}, 7);
        expect_fail(lora(x, a, b, rk, st, ad, sc, &bad_base, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "base must be a fp16 (T, d_out) = (100, 640)", "lora base");
        dfk_tensor los = lo;
        los.strides[0] = 700;
        expect_fail(lora(x, a, b, rk, st, ad, sc, nullptr, los, lws), DFK_ERR_INVALID_ARGUMENT,
                    "out must be a contiguous fp16", "lora out");
        dfk_tensor xs = x;
        xs.strides[1] = 2;
        expect_fail(lora(xs, a, b, rk, st, ad, sc, nullptr, lo, lws), DFK_ERR_INVALID_ARGUMENT,
                    "x must have unit stride along its last dim", "lora x stride");
        expect_fail(lora(T(H, {100, 40}, 0), T(H, {4, 16, 40}, 1), b, rk, st, ad, sc, nullptr, lo, lws),
                    DFK_ERR_NO_VARIANT, "d_in = 40 is not a multiple of 16", "lora d_in 40");
        expect_fail(lora(x, T(H, {4, 8, 320}, 1), T(H, {4, 640, 8}, 2), rk, st, ad, sc, nullptr, lo, lws),
                    DFK_ERR_NO_VARIANT, "r_max = 8 is not a multiple of 16", "lora r_max 8");
        xs = x;
        xs.strides[0] = 328;
        expect_fail(lora(xs, a, b, rk, st, ad, sc, nullptr, lo, lws), DFK_ERR_NO_VARIANT,
                    "x row stride = 328 is not a multiple of 16", "lora x row stride");
        expect_fail(lora(x, a, b, rk, st, ad, sc, nullptr, lo, lws - 2), DFK_ERR_INVALID_ARGUMENT,
                    "workspace of", "lora workspace");
    }
    // a success clears the previous error
    expect_ok(blend(u, c, m, nullptr, bo), "error cleared");
}

void test_helpers() {
    int64_t shape[3] = {2, 3, 4};
    dfk_tensor t = dfk_tensor_contiguous(fake(0), DFK_FLOAT16, 3, shape);
    CHECK(t.strides[0] == 12 && t.strides[1] == 4 && t.strides[2] == 1, "contiguous strides");
    CHECK(std::strcmp(dfk_status_name(DFK_ERR_NO_DRIVER), "DFK_ERR_NO_DRIVER") == 0, "status name");
    CHECK(std::strstr(dfk_version(), "dreamfuse_kernels") != nullptr, "version %s", dfk_version());
}

// Real launches (dry run off) without a driver: the reason, never a crash; argument errors still come first.
void test_no_driver() {
    dfk_set_dry_run(0, 0);
    dfk_status st = dfk_driver_check();
    expect_fail(st, DFK_ERR_NO_DRIVER, "/nonexistent/libcuda.so.1", "driver check");
    CHECK(std::strstr(dfk_last_error(), "no NVIDIA driver") != nullptr, "message: %s", dfk_last_error());
    dfk_tensor q = T(DFK_FLOAT16, {1, 2, 8, 64}, 0), l = T(DFK_FLOAT32, {1, 2, 8}, 5);
    expect_fail(dfk_attention(&q, &q, &q, 0.125, &q, &l, nullptr), DFK_ERR_NO_DRIVER, "cannot load", "launch");
    expect_fail(dfk_attention(&q, &q, &q, 0.125, &q, &q, nullptr), DFK_ERR_INVALID_ARGUMENT, "lse", "checks first");
}

}  // namespace

int main(int argc, char** argv) {
    const std::vector<int> archs = split_archs(DFK_TEST_ARCHS);
    std::printf("%s: %d kernels\n", dfk_version(), dfk_kernel_count());
    if (argc > 1 && std::strcmp(argv[1], "--no-driver") == 0) {
        test_no_driver();
    } else {
        test_helpers();
        test_embedded(archs);
        test_dry_runs(archs);
        test_argument_checks();
        dfk_set_dry_run(0, 0);
        dfk_status st = dfk_driver_check();
        std::printf("driver: %s%s%s\n", dfk_status_name(st), st ? ": " : "", dfk_last_error());
    }
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
