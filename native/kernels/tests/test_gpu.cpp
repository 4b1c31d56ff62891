// On a GPU: every launcher of dreamfuse_kernels against the PyTorch references, on data that tests/test_native.py
// writes (`python tests/test_native.py --write-gpu-data DIR`; CPU only, seeded): inputs as .npy, the fp64 oracle's
// outputs, and per output the tolerance 2 * err(torch at the inputs' precision) + atol (the kernel tests' rule).
//
//   dfk_gpu_test DIR        exit 0: all cases pass; 1: a mismatch; 2: bad data; 77: no CUDA device (ctest: skipped)
//   dfk_gpu_test --self-check DIR   no GPU: the expected outputs, rounded to the output dtypes, pass the comparisons
//
// The data is read and checked before looking for a device, so the reader runs on every machine.
#include <cuda_runtime.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dreamfuse_kernels.h"

namespace {

// ----------------------------------------------------------------------------------------------- .npy
struct Array {
    std::string descr;  // "<f2", "<u2" (bf16 bits), "<f4", "<f8", "<i4", "<i8"
    std::vector<int64_t> shape;
    std::vector<char> data;
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t s : shape) n *= s;
        return n;
    }
    size_t itemsize() const { return static_cast<size_t>(std::atoi(descr.c_str() + 2)); }
    double at(int64_t i) const {
        const char* p = data.data() + i * itemsize();
        if (descr == "<f8") { double v; std::memcpy(&v, p, 8); return v; }
        if (descr == "<f4") { float v; std::memcpy(&v, p, 4); return v; }
        if (descr == "<i8") { int64_t v; std::memcpy(&v, p, 8); return static_cast<double>(v); }
        if (descr == "<i4") { int32_t v; std::memcpy(&v, p, 4); return v; }
        uint16_t h;
        std::memcpy(&h, p, 2);
        if (descr == "<u2") {  // bf16 bit pattern
            uint32_t u = static_cast<uint32_t>(h) << 16;
            float f;
            std::memcpy(&f, &u, 4);
            return f;
        }
        // fp16
        const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
        double v = exp == 0 ? std::ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(man | 0x400, exp - 25);
        return sign ? -v : v;
    }
};

bool read_npy(const std::string& path, Array* a, std::string* err) {
    std::ifstream f(path, std::ios::binary);
    if (!f) { *err = path + ": cannot open"; return false; }
    char magic[8];
    f.read(magic, 8);
    if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) { *err = path + ": not a .npy file"; return false; }
    uint32_t hlen = 0;
    if (magic[6] == 1) { uint16_t h; f.read(reinterpret_cast<char*>(&h), 2); hlen = h; }
    else { f.read(reinterpret_cast<char*>(&hlen), 4); }
    std::string header(hlen, '\0');
    f.read(&header[0], hlen);
    auto field = [&](const char* key) {
        size_t at = header.find(key);
        return at == std::string::npos ? std::string() : header.substr(at + std::strlen(key));
    };
    std::string d = field("'descr': '");
    a->descr = d.substr(0, d.find('\''));
    if (field("'fortran_order': ").rfind("False", 0) != 0) { *err = path + ": fortran order"; return false; }
    std::string s = field("'shape': (");
    s = s.substr(0, s.find(')'));
    a->shape.clear();
    for (std::stringstream ss(s); ss.good();) {
        std::string tok;
        std::getline(ss, tok, ',');
        if (tok.find_first_not_of(" ") != std::string::npos) a->shape.push_back(std::atoll(tok.c_str()));
    }
    static const char* known[] = {"<f2", "<u2", "<f4", "<f8", "<i4", "<i8"};
    bool ok = false;
    for (const char* k : known) ok |= a->descr == k;
    if (!ok) { *err = path + ": unsupported dtype " + a->descr; return false; }
    a->data.resize(static_cast<size_t>(a->numel()) * a->itemsize());
    f.read(a->data.data(), static_cast<std::streamsize>(a->data.size()));
    if (!f) { *err = path + ": truncated"; return false; }
    return true;
}

// ----------------------------------------------------------------------------------------------- cases
struct Tensor {
    Array host;
    dfk_dtype dtype;
    std::vector<int> perm;  // logical dim i = stored dim perm[i] (a strided view of contiguous storage)
    void* dev = nullptr;
};

struct Case {
    std::string name, op;
    std::map<std::string, std::string> params;
    std::map<std::string, Tensor> inputs;
    std::map<std::string, std::pair<Array, double>> expect;  // name -> (fp64 oracle, tolerance)
    double num(const char* k) const { return std::atof(params.at(k).c_str()); }
};

dfk_dtype dtype_of(const std::string& name) {
    if (name == "fp16") return DFK_FLOAT16;
    if (name == "bf16") return DFK_BFLOAT16;
    if (name == "fp32") return DFK_FLOAT32;
    if (name == "i32") return DFK_INT32;
    return DFK_INT64;
}

// cases.txt: "case NAME" ... "end" blocks of "op OP", "param K V", "input NAME DTYPE FILE [PERM]",
// "expect NAME FILE TOL".
bool read_cases(const std::string& dir, std::vector<Case>* cases, std::string* err) {
    std::ifstream f(dir + "/cases.txt");
    if (!f) { *err = dir + "/cases.txt: cannot open"; return false; }
    std::string line;
    Case c;
    while (std::getline(f, line)) {
        std::stringstream ss(line);
        std::string w;
        ss >> w;
        if (w == "case") { c = Case(); ss >> c.name; }
        else if (w == "op") ss >> c.op;
        else if (w == "param") { std::string k, v; ss >> k >> v; c.params[k] = v; }
        else if (w == "input") {
            std::string name, dt, file, perm;
            ss >> name >> dt >> file >> perm;
            Tensor t;
            t.dtype = dtype_of(dt);
            if (!read_npy(dir + "/" + file, &t.host, err)) return false;
            for (char ch : perm) t.perm.push_back(ch - '0');
            c.inputs[name] = std::move(t);
        } else if (w == "expect") {
            std::string name, file;
            double tol;
            ss >> name >> file >> tol;
            Array a;
            if (!read_npy(dir + "/" + file, &a, err)) return false;
            c.expect[name] = {std::move(a), tol};
        } else if (w == "end") cases->push_back(std::move(c));
    }
    return true;
}

#define CUDA_OK(x)                                                                                  \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) {                                                                    \
            std::printf("%s: %s failed: %s\n", c.name.c_str(), #x, cudaGetErrorString(e_));         \
            return false;                                                                           \
        }                                                                                           \
    } while (0)

dfk_tensor view(const Tensor& t) {
    std::vector<int64_t> stored = t.host.shape;
    int nd = static_cast<int>(stored.size());
    std::vector<int64_t> st(nd, 1);
    for (int i = nd - 2; i >= 0; --i) st[i] = st[i + 1] * stored[i + 1];
    dfk_tensor v{};
    v.data = t.dev;
    v.dtype = t.dtype;
    v.ndim = nd;
    for (int i = 0; i < nd; ++i) {
        int s = t.perm.empty() ? i : t.perm[i];
        v.shape[i] = stored[s];
        v.strides[i] = st[s];
    }
    return v;
}

std::vector<void*> g_allocs;  // freed after each case

cudaError_t dev_alloc(void** p, size_t n) {
    cudaError_t e = cudaMalloc(p, n);
    if (e == cudaSuccess) g_allocs.push_back(*p);
    return e;
}

struct Out {
    dfk_tensor t;
    std::vector<char> host;
};

bool alloc_out(const Case& c, Out* o, dfk_dtype dt, std::vector<int64_t> shape) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    const size_t item = dt == DFK_FLOAT16 || dt == DFK_BFLOAT16 ? 2 : dt == DFK_INT64 ? 8 : 4;
    void* p = nullptr;
    CUDA_OK(dev_alloc(&p, n * item + 16));
    CUDA_OK(cudaMemset(p, 0xff, n * item));  // garbage: an output the kernel does not write shows up
    o->t = dfk_tensor_contiguous(p, dt, static_cast<int32_t>(shape.size()), shape.data());
    o->host.resize(n * item);
    return true;
}

double value(const Out& o, size_t i) {
    Array a;
    static const char* descr[] = {"<f2", "<u2", "<f4", "<i4", "<i8"};
    a.descr = descr[o.t.dtype];
    a.shape = {static_cast<int64_t>(o.host.size() / a.itemsize())};
    a.data = o.host;
    return a.at(static_cast<int64_t>(i));
}

// max |got - want| <= tol (NaN never passes)
bool compare(const Case& c, const char* name, const Out& got) {
    const auto& [want, tol] = c.expect.at(name);
    double worst = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
        double d = std::fabs(value(got, i) - want.at(i));
        if (!(d <= worst)) worst = std::isnan(d) ? INFINITY : d;
    }
    bool ok = worst <= tol;
    std::printf("  %-28s %-8s max err %.3g (tol %.3g) %s\n", c.name.c_str(), name, worst, tol, ok ? "ok" : "FAIL");
    return ok;
}

// argmax outputs: the chosen index reaches the maximum within `gap` (near-ties may go either way under rounding)
bool compare_argmax(const Case& c, const char* name, const Out& got, bool rows) {
    const Array& sim = c.expect.at("sim").first;  // (B, N, M) fp64 cosine similarities
    const int64_t B = sim.shape[0], N = sim.shape[1], M = sim.shape[2];
    const double gap = c.num("gap");
    int bad = 0;
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < (rows ? N : M); ++i) {
            double best = -INFINITY;
            for (int64_t j = 0; j < (rows ? M : N); ++j)
                best = std::fmax(best, sim.at(rows ? (b * N + i) * M + j : (b * N + j) * M + i));
            int64_t pick = static_cast<int64_t>(value(got, static_cast<size_t>(b * (rows ? N : M) + i)));
            if (pick < 0 || pick >= (rows ? M : N) ||
                sim.at(rows ? (b * N + i) * M + pick : (b * N + pick) * M + i) < best - gap)
                ++bad;
        }
    }
    std::printf("  %-28s %-8s %d picks below the max - %.3g %s\n", c.name.c_str(), name, bad, gap, bad ? "FAIL" : "ok");
    return bad == 0;
}

bool download(const Case& c, Out* o) {
    CUDA_OK(cudaMemcpy(o->host.data(), o->t.data, o->host.size(), cudaMemcpyDeviceToHost));
    return true;
}

bool run_case(Case& c) {
    for (auto& [name, t] : c.inputs) {
        CUDA_OK(dev_alloc(&t.dev, t.host.data.size() + 16));
        CUDA_OK(cudaMemcpy(t.dev, t.host.data.data(), t.host.data.size(), cudaMemcpyHostToDevice));
    }
    auto in = [&](const char* n) { return view(c.inputs.at(n)); };
    void* ws = nullptr;
    const size_t ws_size = 64 << 20;
    CUDA_OK(dev_alloc(&ws, ws_size));
    dfk_status st = DFK_OK;
    bool ok = true;
    if (c.op == "attention" || c.op == "ama_attention") {
        dfk_tensor q = in("q"), k = in("k");
        Out out, lse;
        ok &= alloc_out(c, &out, q.dtype, {q.shape[0], q.shape[1], q.shape[2], q.shape[3]});
        ok &= alloc_out(c, &lse, DFK_FLOAT32, {q.shape[0], q.shape[1], q.shape[2]});
        if (!ok) return false;
        if (c.op == "attention") {
            dfk_tensor v = in("v");
            st = dfk_attention(&q, &k, &v, c.num("scale"), &out.t, &lse.t, nullptr);
        } else {
            dfk_tensor v = in("v_tgt"), vr = in("v_ref"), fl = in("flow"), m = in("mask");
            st = dfk_ama_attention(&q, &k, &v, &vr, &fl, &m, c.num("scale"), &out.t, &lse.t, nullptr);
        }
        if (st == DFK_OK) {
            CUDA_OK(cudaDeviceSynchronize());
            ok = download(c, &out) && download(c, &lse) && compare(c, "out", out) & compare(c, "lse", lse);
        }
    } else if (c.op == "match_argmax") {
        dfk_tensor ft = in("f_tgt"), fr = in("f_ref");
        const int64_t B = ft.shape[0], N = ft.shape[1], M = fr.shape[1];
        dfk_dtype ix = dtype_of(c.params.at("index"));
        Out t2r, r2t, ts, rs;
        ok &= alloc_out(c, &t2r, ix, {B, N}) && alloc_out(c, &r2t, ix, {B, M});
        ok &= alloc_out(c, &ts, DFK_FLOAT32, {B, N}) && alloc_out(c, &rs, DFK_FLOAT32, {B, M});
        if (!ok) return false;
        if (dfk_match_argmax_workspace_size(B, N, M) > ws_size) return false;
        st = dfk_match_argmax(&ft, &fr, &t2r.t, &r2t.t, &ts.t, &rs.t, ws, ws_size, nullptr);
        if (st == DFK_OK) {
            CUDA_OK(cudaDeviceSynchronize());
            ok = download(c, &t2r) && download(c, &r2t) && download(c, &ts) && download(c, &rs);
            ok = ok && compare(c, "t2r_sim", ts) & compare(c, "r2t_sim", rs) & compare_argmax(c, "t2r", t2r, true) &
                 compare_argmax(c, "r2t", r2t, false);
        }
    } else if (c.op == "cycle_mask") {
        dfk_tensor t2r = in("t2r"), r2t = in("r2t"), fg = in("fg");
        Out out;
        if (!alloc_out(c, &out, fg.dtype, {fg.shape[0], fg.shape[1]})) return false;
        st = dfk_cycle_mask(&t2r, &r2t, &fg, static_cast<int64_t>(c.num("height")),
                            static_cast<int64_t>(c.num("width")), c.num("lambda_c"), &out.t, ws, ws_size, nullptr);
        if (st == DFK_OK) {
            CUDA_OK(cudaDeviceSynchronize());
            ok = download(c, &out) && compare(c, "out", out);
        }
    } else if (c.op == "composite_blend") {
        dfk_tensor u = in("eps_uncond"), cn = in("eps_cond"), m = in("masks");
        dfk_tensor g{};
        const bool per_seg = c.inputs.count("guidance") > 0;
        if (per_seg) g = in("guidance");
        Out out;
        if (!alloc_out(c, &out, u.dtype, {u.shape[0], u.shape[2], u.shape[3], u.shape[4]})) return false;
        st = dfk_composite_blend(&u, &cn, &m, per_seg ? &g : nullptr, per_seg ? 0.0 : c.num("guidance_scale"), &out.t,
                                 nullptr);
        if (st == DFK_OK) {
            CUDA_OK(cudaDeviceSynchronize());
            ok = download(c, &out) && compare(c, "out", out);
        }
    } else if (c.op == "lora_delta") {
        dfk_tensor x = in("x"), a = in("lora_a"), b = in("lora_b"), rk = in("ranks"), s0 = in("seg_starts");
        dfk_tensor ad = in("seg_adapter"), sc = in("seg_scale"), base{};
        const bool has_base = c.inputs.count("base") > 0;
        if (has_base) base = in("base");
        Out out;
        if (!alloc_out(c, &out, x.dtype, {x.shape[0], b.shape[1]})) return false;
        if (dfk_lora_delta_workspace_size(x.shape[0], ad.shape[1], a.shape[1], x.dtype) > ws_size) return false;
        st = dfk_lora_delta(&x, &a, &b, &rk, &s0, &ad, &sc, has_base ? &base : nullptr, &out.t, ws, ws_size, nullptr);
        if (st == DFK_OK) {
            CUDA_OK(cudaDeviceSynchronize());
            ok = download(c, &out) && compare(c, "out", out);
        }
    } else {
        std::printf("%s: unknown op %s\n", c.name.c_str(), c.op.c_str());
        return false;
    }
    if (st != DFK_OK) {
        std::printf("  %-28s %s: %s FAIL\n", c.name.c_str(), dfk_status_name(st), dfk_last_error());
        return false;
    }
    return ok;
}

// ----------------------------------------------------------------------------------------------- self-check
// Without a GPU: each case's expected outputs, rounded to the dtypes the launchers write, must pass this file's own
// comparisons (and the argmax picks of the fp64 similarities their argmax check) -- the reader, the dtype decoding
// and the comparisons run on every machine, and the tolerances leave room for the outputs' rounding.
uint16_t to_half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    const int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffff;
    if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00);
    if (exp <= 0) {  // subnormal or zero
        if (exp < -10) return static_cast<uint16_t>(sign);
        man |= 0x800000;
        const int shift = 14 - exp;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = (static_cast<uint32_t>(exp) << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
}

Out rounded(const Array& want, dfk_dtype dt) {
    Out o;
    std::vector<int64_t> shape = want.shape;
    o.t = dfk_tensor_contiguous(nullptr, dt, static_cast<int32_t>(shape.size()), shape.data());
    const size_t item = dt == DFK_FLOAT16 || dt == DFK_BFLOAT16 ? 2 : dt == DFK_INT64 ? 8 : 4;
    o.host.resize(static_cast<size_t>(want.numel()) * item);
    for (int64_t i = 0; i < want.numel(); ++i) {
        const double x = want.at(i);
        char* p = o.host.data() + i * item;
        if (dt == DFK_FLOAT32) { float f = static_cast<float>(x); std::memcpy(p, &f, 4); }
        else if (dt == DFK_INT32) { int32_t v = static_cast<int32_t>(x); std::memcpy(p, &v, 4); }
        else if (dt == DFK_INT64) { int64_t v = static_cast<int64_t>(x); std::memcpy(p, &v, 8); }
        else if (dt == DFK_FLOAT16) { uint16_t h = to_half(static_cast<float>(x)); std::memcpy(p, &h, 2); }
        else {  // bf16, round to nearest even
            float f = static_cast<float>(x);
            uint32_t u;
            std::memcpy(&u, &f, 4);
            uint16_t b = static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
            std::memcpy(p, &b, 2);
        }
    }
    return o;
}

bool self_check(const Case& c) {
    auto dt = [&](const char* input) { return c.inputs.at(input).dtype; };
    bool ok = true;
    if (c.op == "attention" || c.op == "ama_attention") {
        ok &= compare(c, "out", rounded(c.expect.at("out").first, dt("q")));
        ok &= compare(c, "lse", rounded(c.expect.at("lse").first, DFK_FLOAT32));
    } else if (c.op == "match_argmax") {
        const Array& sim = c.expect.at("sim").first;
        const int64_t B = sim.shape[0], N = sim.shape[1], M = sim.shape[2];
        Array t2r, r2t;
        t2r.descr = r2t.descr = "<f8";
        t2r.shape = {B, N};
        r2t.shape = {B, M};
        std::vector<double> a(B * N), b(B * M);
        for (int64_t x = 0; x < B; ++x) {
            for (int64_t i = 0; i < N; ++i)
                for (int64_t j = 0; j < M; ++j) {
                    double v = sim.at((x * N + i) * M + j);
                    if (j == 0 || v > sim.at((x * N + i) * M + static_cast<int64_t>(a[x * N + i]))) a[x * N + i] = j;
                    if (i == 0 || v > sim.at((x * N + static_cast<int64_t>(b[x * M + j])) * M + j)) b[x * M + j] = i;
                }
        }
        t2r.data.resize(a.size() * 8);
        r2t.data.resize(b.size() * 8);
        std::memcpy(t2r.data.data(), a.data(), t2r.data.size());
        std::memcpy(r2t.data.data(), b.data(), r2t.data.size());
        const dfk_dtype ix = dtype_of(c.params.at("index"));
        ok &= compare(c, "t2r_sim", rounded(c.expect.at("t2r_sim").first, DFK_FLOAT32));
        ok &= compare(c, "r2t_sim", rounded(c.expect.at("r2t_sim").first, DFK_FLOAT32));
        ok &= compare_argmax(c, "t2r", rounded(t2r, ix), true);
        ok &= compare_argmax(c, "r2t", rounded(r2t, ix), false);
    } else if (c.op == "cycle_mask") {
        ok &= compare(c, "out", rounded(c.expect.at("out").first, dt("fg")));
    } else if (c.op == "composite_blend") {
        ok &= compare(c, "out", rounded(c.expect.at("out").first, dt("eps_uncond")));
    } else if (c.op == "lora_delta") {
        ok &= compare(c, "out", rounded(c.expect.at("out").first, dt("x")));
    } else {
        std::printf("%s: unknown op %s\n", c.name.c_str(), c.op.c_str());
        return false;
    }
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 3 && std::strcmp(argv[1], "--self-check") == 0) {
        std::vector<Case> cases;
        std::string err;
        if (!read_cases(argv[2], &cases, &err) || cases.empty()) {
            std::fprintf(stderr, "dfk_gpu_test: error: %s\n", err.empty() ? "no cases" : err.c_str());
            return 2;
        }
        int failed = 0;
        for (const Case& c : cases) failed += !self_check(c);
        std::printf("self-check: %zu cases, %d failed\n", cases.size(), failed);
        return failed ? 1 : 0;
    }
    if (argc != 2) {
        std::fprintf(stderr, "usage: dfk_gpu_test DIR (written by python tests/test_native.py --write-gpu-data DIR)\n");
        return 2;
    }
    std::vector<Case> cases;
    std::string err;
    if (!read_cases(argv[1], &cases, &err) || cases.empty()) {
        std::fprintf(stderr, "dfk_gpu_test: error: %s\n", err.empty() ? "no cases" : err.c_str());
        return 2;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        std::printf("dfk_gpu_test: %zu cases read; no CUDA device (%s): skipped\n", cases.size(),
                    e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
    cudaDeviceProp prop;
    cudaSetDevice(0);
    cudaGetDeviceProperties(&prop, 0);
    cudaFree(nullptr);  // makes the primary context current for the driver API the library uses
    std::printf("dfk_gpu_test: %s (sm_%d%d), %s\n", prop.name, prop.major, prop.minor, dfk_version());
    int failed = 0;
    for (Case& c : cases) {
        failed += !run_case(c);
        for (void* p : g_allocs) cudaFree(p);
        g_allocs.clear();
    }
    std::printf("%zu cases, %d failed\n", cases.size(), failed);
    return failed ? 1 : 0;
}
