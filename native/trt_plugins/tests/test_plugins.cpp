// Host-side checks of the TensorRT plugins, without TensorRT's libraries or a GPU:
//   dft_plugin_test PLUGIN_LIB AUTOREG_LIB
// dlopens PLUGIN_LIB as IPluginRegistry::loadLibrary does (getCreators, setLoggerFinder), creates each plugin
// through its creator and checks names, fields, output types and shapes (dims taken from the inputs, never
// computed: every dimension may be dynamic), supported formats, workspace sizes, a serialize -> deserialize round
// trip and field validation; enqueue runs the launcher's checks (with DFK_LIBCUDA pointing at a missing driver the
// valid calls end in DFK_ERR_NO_DRIVER, the bad ones earlier). Then dlopens AUTOREG_LIB, whose constructor must
// register the four creators with the getPluginRegistry this executable exports.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dreamfuse_kernels.h"

namespace nv = nvinfer1;

namespace {

int g_failures = 0, g_checks = 0;

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

using GetCreators = nv::IPluginCreatorInterface* const* (*)(int32_t&);
using SetLoggerFinder = void (*)(nv::ILoggerFinder*);
using LastError = const char* (*)();
LastError g_last_error = nullptr;

// Dimension expressions are opaque to the plugins (they only pass them through), so stand-ins suffice.
struct FakeDim : nv::IDimensionExpr {
    FakeDim() { mImpl = nullptr; }
};
struct FakeBuilder : nv::IExprBuilder {
    FakeBuilder() { mImpl = nullptr; }
};

struct Logger : nv::ILogger {
    std::vector<std::string> errors;
    void log(Severity s, const char* msg) noexcept override {
        if (s <= Severity::kERROR) errors.push_back(msg);
    }
};
struct Finder : nv::ILoggerFinder {
    Logger logger;
    nv::ILogger* findLogger() override { return &logger; }
};
Finder g_finder;

void* fake(int i) { return reinterpret_cast<void*>(static_cast<uintptr_t>(0x20000000ull + 0x1000000ull * i)); }

struct Shape {
    std::vector<int64_t> d;
};

nv::Dims dims(const std::vector<int64_t>& v) {
    nv::Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
    return d;
}

nv::DynamicPluginTensorDesc dyn(nv::DataType t, std::vector<int64_t> max, std::vector<int64_t> static_dims = {}) {
    nv::DynamicPluginTensorDesc x{};
    x.desc.type = t;
    x.desc.format = nv::TensorFormat::kLINEAR;
    x.desc.dims = dims(static_dims.empty() ? std::vector<int64_t>(max.size(), -1) : static_dims);
    x.desc.scale = -1.f;
    x.min = dims(std::vector<int64_t>(max.size(), 1));
    x.opt = x.max = dims(max);
    return x;
}

nv::PluginTensorDesc desc(nv::DataType t, std::vector<int64_t> shape) {
    nv::PluginTensorDesc x{};
    x.type = t;
    x.format = nv::TensorFormat::kLINEAR;
    x.dims = dims(shape);
    x.scale = -1.f;
    return x;
}

struct Plugin {
    nv::IPluginV3* p = nullptr;
    nv::IPluginV3OneCore* core = nullptr;
    nv::IPluginV3OneBuild* build = nullptr;
    nv::IPluginV3OneRuntime* rt = nullptr;
};

Plugin caps(nv::IPluginV3* p) {
    Plugin x;
    x.p = p;
    if (p == nullptr) return x;
    x.core = static_cast<nv::IPluginV3OneCore*>(p->getCapabilityInterface(nv::PluginCapabilityType::kCORE));
    x.build = static_cast<nv::IPluginV3OneBuild*>(p->getCapabilityInterface(nv::PluginCapabilityType::kBUILD));
    x.rt = static_cast<nv::IPluginV3OneRuntime*>(p->getCapabilityInterface(nv::PluginCapabilityType::kRUNTIME));
    return x;
}

nv::PluginFieldCollection fields(std::vector<nv::PluginField>& storage) {
    nv::PluginFieldCollection fc;
    fc.nbFields = static_cast<int32_t>(storage.size());
    fc.fields = storage.data();
    return fc;
}

std::map<std::string, float> field_values(const nv::PluginFieldCollection* fc) {
    std::map<std::string, float> out;
    for (int i = 0; i < fc->nbFields; ++i)
        if (fc->fields[i].type == nv::PluginFieldType::kFLOAT32)
            out[fc->fields[i].name] = *static_cast<const float*>(fc->fields[i].data);
    return out;
}

bool has(const char* s, const char* sub) { return s != nullptr && std::strstr(s, sub) != nullptr; }

// ----------------------------------------------------------------------------------------------- per plugin
struct Spec {
    const char* name;
    std::vector<std::string> fields;
    std::vector<std::vector<int64_t>> in_shapes;  // max shapes (and the enqueue shapes)
    std::vector<nv::DataType> in_types;            // for T = kHALF
    std::vector<nv::DataType> out_types;
    std::vector<std::vector<std::pair<int, int>>> out_dims;  // output dim j = input (i, k)
};

const nv::DataType H = nv::DataType::kHALF, F = nv::DataType::kFLOAT, I = nv::DataType::kINT32;

std::vector<Spec> specs() {
    return {
        {"AmaAttention", {"scale"},
         {{2, 8, 64, 40}, {2, 8, 64, 40}, {2, 8, 64, 40}, {2, 8, 64, 40}, {2, 64}, {2, 64}},
         {H, H, H, H, I, H}, {H}, {{{0, 0}, {0, 1}, {0, 2}, {0, 3}}}},
        {"MatchArgmax", {}, {{2, 100, 256}, {2, 67, 256}}, {H, H}, {I, I, F, F},
         {{{0, 0}, {0, 1}}, {{0, 0}, {1, 1}}, {{0, 0}, {0, 1}}, {{0, 0}, {1, 1}}}},
        {"CycleMask", {"lambda_c"}, {{2, 8, 12}, {2, 8, 12}, {2, 8, 12}}, {I, I, H}, {H},
         {{{2, 0}, {2, 1}, {2, 2}}}},
        {"CompositeBlend", {}, {{2, 3, 4, 7, 9}, {2, 3, 4, 7, 9}, {2, 3, 7, 9}, {2, 3}}, {H, H, H, H}, {H},
         {{{0, 0}, {0, 2}, {0, 3}, {0, 4}}}},
    };
}

nv::IPluginV3* create(nv::IPluginCreatorV3One* c, std::vector<nv::PluginField> fs, nv::TensorRTPhase phase) {
    nv::PluginFieldCollection fc = fields(fs);
    return c->createPlugin(c->getPluginName(), &fc, phase);
}

void test_plugin(nv::IPluginCreatorV3One* c, const Spec& s) {
    const std::string who = s.name;
    // fields as TensorRT's ONNX parser passes them: floats, plus the lookup attributes it may leave in
    const float scale = 0.158113883f, lambda_c = 0.4f;
    const char* ns = "dreamfuse";
    std::vector<nv::PluginField> fs;
    if (who == "AmaAttention") fs.emplace_back("scale", &scale, nv::PluginFieldType::kFLOAT32, 1);
    if (who == "CycleMask") fs.emplace_back("lambda_c", &lambda_c, nv::PluginFieldType::kFLOAT32, 1);
    fs.emplace_back("plugin_namespace", ns, nv::PluginFieldType::kCHAR, 9);

    const nv::PluginFieldCollection* names = c->getFieldNames();
    CHECK(names->nbFields == static_cast<int>(s.fields.size()), "%s: %d fields", s.name, names->nbFields);
    for (int i = 0; i < names->nbFields && i < static_cast<int>(s.fields.size()); ++i)
        CHECK(s.fields[i] == names->fields[i].name && names->fields[i].type == nv::PluginFieldType::kFLOAT32,
              "%s: field %d is %s", s.name, i, names->fields[i].name);

    Plugin p = caps(create(c, fs, nv::TensorRTPhase::kBUILD));
    CHECK(p.p && p.core && p.build && p.rt, "%s: plugin or a capability is NULL (%s)", s.name,
          g_last_error ? g_last_error() : "");
    if (!p.p) return;
    CHECK(std::strcmp(p.core->getPluginName(), s.name) == 0 && std::strcmp(p.core->getPluginVersion(), "1") == 0 &&
          std::strcmp(p.core->getPluginNamespace(), "dreamfuse") == 0, "%s: core names", s.name);
    CHECK(std::strcmp(p.p->getInterfaceInfo().kind, "PLUGIN") == 0, "%s: IPluginV3 interface %s", s.name,
          p.p->getInterfaceInfo().kind);
    CHECK(std::strcmp(p.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "%s: build interface", s.name);
    CHECK(std::strcmp(p.rt->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "%s: runtime interface", s.name);
    const int nin = static_cast<int>(s.in_shapes.size()), nout = static_cast<int>(s.out_types.size());
    CHECK(p.build->getNbOutputs() == nout, "%s: %d outputs", s.name, p.build->getNbOutputs());

    // output types follow T
    for (nv::DataType t : {H, F, nv::DataType::kBF16}) {
        std::vector<nv::DataType> in = s.in_types;
        for (nv::DataType& x : in) if (x == H) x = t;
        std::vector<nv::DataType> out(nout);
        CHECK(p.build->getOutputDataTypes(out.data(), nout, in.data(), nin) == 0, "%s: output types", s.name);
        for (int o = 0; o < nout; ++o)
            CHECK(out[o] == (s.out_types[o] == H ? t : s.out_types[o]), "%s: output %d type %d", s.name, o,
                  static_cast<int>(out[o]));
    }
    // output shapes: the inputs' dimension expressions, passed through
    std::vector<std::vector<std::unique_ptr<FakeDim>>> dimexprs(nin);  // FakeDim is not movable (INoCopy)
    std::vector<nv::DimsExprs> ins(nin);
    for (int i = 0; i < nin; ++i) {
        ins[i].nbDims = static_cast<int32_t>(s.in_shapes[i].size());
        for (size_t k = 0; k < s.in_shapes[i].size(); ++k) {
            dimexprs[i].push_back(std::make_unique<FakeDim>());
            ins[i].d[k] = dimexprs[i][k].get();
        }
    }
    std::vector<nv::DimsExprs> outs(nout);
    FakeBuilder builder;
    CHECK(p.build->getOutputShapes(ins.data(), nin, nullptr, 0, outs.data(), nout, builder) == 0, "%s: shapes", s.name);
    for (int o = 0; o < nout; ++o) {
        CHECK(outs[o].nbDims == static_cast<int>(s.out_dims[o].size()), "%s: output %d rank %d", s.name, o,
              outs[o].nbDims);
        for (size_t j = 0; j < s.out_dims[o].size() && j < static_cast<size_t>(outs[o].nbDims); ++j)
            CHECK(outs[o].d[j] == dimexprs[s.out_dims[o][j].first][s.out_dims[o][j].second].get(),
                  "%s: output %d dim %zu is not input %d dim %d", s.name, o, j, s.out_dims[o][j].first,
                  s.out_dims[o][j].second);
    }
    std::vector<nv::DimsExprs> bad = ins;
    bad[0].nbDims -= 1;
    CHECK(p.build->getOutputShapes(bad.data(), nin, nullptr, 0, outs.data(), nout, builder) != 0, "%s: rank", s.name);
    CHECK(has(g_last_error(), "must be rank"), "%s: rank message '%s'", s.name, g_last_error());
    CHECK(p.build->getOutputShapes(ins.data(), nin - 1, nullptr, 0, outs.data(), nout, builder) != 0, "%s: arity",
          s.name);

    // formats: linear, T one of fp32/fp16/bf16 shared by all T tensors, int32 indices, fp32 similarities
    auto io = [&](nv::DataType t) {
        std::vector<nv::DynamicPluginTensorDesc> v;
        for (int i = 0; i < nin; ++i) v.push_back(dyn(s.in_types[i] == H ? t : s.in_types[i], s.in_shapes[i]));
        for (int o = 0; o < nout; ++o) v.push_back(dyn(s.out_types[o] == H ? t : s.out_types[o], {1}));
        return v;
    };
    for (nv::DataType t : {H, F, nv::DataType::kBF16}) {
        std::vector<nv::DynamicPluginTensorDesc> v = io(t);
        for (int pos = 0; pos < nin + nout; ++pos)
            CHECK(p.build->supportsFormatCombination(pos, v.data(), nin, nout), "%s: pos %d type %d rejected", s.name,
                  pos, static_cast<int>(v[pos].desc.type));
    }
    for (int pos = 0; pos < nin + nout; ++pos) {
        std::vector<nv::DynamicPluginTensorDesc> v = io(H);
        v[pos].desc.format = nv::TensorFormat::kCHW32;
        CHECK(!p.build->supportsFormatCombination(pos, v.data(), nin, nout), "%s: pos %d CHW32 accepted", s.name, pos);
        v = io(H);
        nv::DataType& t = v[pos].desc.type;
        t = t == I ? H : (t == F && pos >= nin && who == "MatchArgmax" ? I : nv::DataType::kINT8);
        CHECK(!p.build->supportsFormatCombination(pos, v.data(), nin, nout), "%s: pos %d wrong type accepted", s.name,
              pos);
        if (pos > 0 && s.in_types[0] == H && (pos < nin ? s.in_types[pos] : s.out_types[pos - nin]) == H) {
            v = io(H);
            v[pos].desc.type = F;  // mixed T
            CHECK(!p.build->supportsFormatCombination(pos, v.data(), nin, nout), "%s: pos %d mixed T accepted", s.name,
                  pos);
        }
    }

    // workspace, from the profile's max shapes
    std::vector<nv::DynamicPluginTensorDesc> v = io(H);
    size_t ws = p.build->getWorkspaceSize(v.data(), nin, v.data() + nin, nout);
    size_t want = 0;
    if (who == "AmaAttention") want = (2 * 8 * 64 * 4 + 255) / 256 * 256;
    if (who == "MatchArgmax") want = dfk_match_argmax_workspace_size(2, 100, 67);
    if (who == "CycleMask") want = dfk_cycle_mask_workspace_size(2);
    CHECK(ws == want, "%s: workspace %zu, want %zu", s.name, ws, want);
    CHECK(p.build->configurePlugin(v.data(), nin, v.data() + nin, nout) == 0, "%s: configure (dynamic dims)", s.name);

    // serialization round trip: the runtime fields create an equal plugin
    const nv::PluginFieldCollection* ser = p.rt->getFieldsToSerialize();
    std::map<std::string, float> before = field_values(ser);
    CHECK(before.size() == s.fields.size(), "%s: %zu serialized fields", s.name, before.size());
    if (who == "AmaAttention") CHECK(before["scale"] == scale, "scale serialized as %g", before["scale"]);
    if (who == "CycleMask") CHECK(before["lambda_c"] == lambda_c, "lambda_c serialized as %g", before["lambda_c"]);
    std::vector<nv::PluginField> copy(ser->fields, ser->fields + ser->nbFields);
    Plugin back = caps(create(c, copy, nv::TensorRTPhase::kRUNTIME));
    CHECK(back.p && field_values(back.rt->getFieldsToSerialize()) == before, "%s: round trip", s.name);
    Plugin cl = caps(p.p->clone());
    CHECK(cl.p && field_values(cl.rt->getFieldsToSerialize()) == before, "%s: clone", s.name);
    Plugin att = caps(p.rt->attachToContext(nullptr));
    CHECK(att.p && att.p != p.p && field_values(att.rt->getFieldsToSerialize()) == before, "%s: attach", s.name);
    CHECK(has(p.build->getMetadataString(), s.name), "%s: metadata", s.name);

    // enqueue: the arguments reach the launcher and pass its checks; without a driver that is where it stops
    std::vector<nv::PluginTensorDesc> din, dout;
    std::vector<const void*> pin;
    std::vector<void*> pout;
    for (int i = 0; i < nin; ++i) {
        din.push_back(desc(s.in_types[i], s.in_shapes[i]));
        pin.push_back(fake(i));
    }
    std::vector<nv::DataType> ot(nout);
    p.build->getOutputDataTypes(ot.data(), nout, s.in_types.data(), nin);
    for (int o = 0; o < nout; ++o) {
        std::vector<int64_t> shape;
        for (auto [i, k] : s.out_dims[o]) shape.push_back(s.in_shapes[i][k]);
        dout.push_back(desc(ot[o], shape));
        pout.push_back(fake(10 + o));
    }
    int32_t rc = p.rt->enqueue(din.data(), dout.data(), pin.data(), pout.data(), fake(20), nullptr);
    CHECK(rc == DFK_ERR_NO_DRIVER, "%s: enqueue returned %d: %s", s.name, rc, g_last_error());
    CHECK(has(g_last_error(), "CUDA driver not available"), "%s: enqueue message '%s'", s.name, g_last_error());
    pin[0] = static_cast<const char*>(fake(0)) + 2;  // misaligned: refused before the driver
    rc = p.rt->enqueue(din.data(), dout.data(), pin.data(), pout.data(), fake(20), nullptr);
    CHECK(rc == DFK_ERR_INVALID_ARGUMENT && has(g_last_error(), "16-byte aligned"), "%s: misaligned: %d %s", s.name, rc,
          g_last_error());
    CHECK(has(g_last_error(), (std::string("dreamfuse::") + s.name).c_str()), "%s: message names the plugin: %s",
          s.name, g_last_error());

    delete p.p;
    delete back.p;
    delete cl.p;
    delete att.p;
}

void test_field_validation(nv::IPluginCreatorV3One* ama, nv::IPluginCreatorV3One* cycle) {
    const float zero = 0.f, nan = NAN, good = 0.4f;
    const double d64 = 0.125;
    const int32_t i32 = 1;
    struct Bad {
        nv::IPluginCreatorV3One* c;
        std::vector<nv::PluginField> fs;
        const char* msg;
    };
    std::vector<Bad> cases = {
        {ama, {}, "missing field 'scale'"},
        {ama, {nv::PluginField("scale", &i32, nv::PluginFieldType::kINT32, 1)}, "'scale' must be a float"},
        {ama, {nv::PluginField("scale", &nan, nv::PluginFieldType::kFLOAT32, 1)}, "'scale' must be finite"},
        {ama, {nv::PluginField("scale", &good, nv::PluginFieldType::kFLOAT32, 1),
               nv::PluginField("frobnicate", &good, nv::PluginFieldType::kFLOAT32, 1)}, "unknown field 'frobnicate'"},
        {cycle, {nv::PluginField("lambda_c", &zero, nv::PluginFieldType::kFLOAT32, 1)}, "'lambda_c' must be > 0"},
        {cycle, {nv::PluginField("lambda_c", nullptr, nv::PluginFieldType::kFLOAT32, 0)}, "has no value"},
    };
    for (Bad& b : cases) {
        g_finder.logger.errors.clear();
        nv::IPluginV3* p = create(b.c, b.fs, nv::TensorRTPhase::kBUILD);
        CHECK(p == nullptr, "%s accepted", b.msg);
        CHECK(has(g_last_error(), b.msg), "message '%s' lacks '%s'", g_last_error(), b.msg);
        CHECK(g_finder.logger.errors.size() == 1 && has(g_finder.logger.errors[0].c_str(), b.msg),
              "'%s' not logged through the logger finder", b.msg);
        delete p;
    }
    // kFLOAT64 converts (a Python builder's numpy float64)
    nv::IPluginV3* p = create(ama, {nv::PluginField("scale", &d64, nv::PluginFieldType::kFLOAT64, 1)},
                              nv::TensorRTPhase::kBUILD);
    CHECK(p != nullptr, "float64 scale rejected: %s", g_last_error());
    if (p) {
        Plugin x = caps(p);
        CHECK(field_values(x.rt->getFieldsToSerialize())["scale"] == 0.125f, "float64 scale value");
        // a head dim the kernels lack is refused when the build knows it
        std::vector<nv::DynamicPluginTensorDesc> in;
        for (int i = 0; i < 4; ++i) in.push_back(dyn(H, {2, 8, 64, 48}, {-1, 8, -1, 48}));
        in.push_back(dyn(I, {2, 64}));
        in.push_back(dyn(H, {2, 64}));
        nv::DynamicPluginTensorDesc out = dyn(H, {2, 8, 64, 48});
        CHECK(x.build->configurePlugin(in.data(), 6, &out, 1) != 0, "head dim 48 configured");
        CHECK(has(g_last_error(), "head dim 48 has no embedded kernel"), "message '%s'", g_last_error());
        delete p;
    }
}

// ----------------------------------------------------------------------------------------------- autoreg
struct FakeRegistry : nv::IPluginRegistry {
    std::vector<std::pair<std::string, std::string>> registered;  // (name, namespace)
    void setErrorRecorder(nv::IErrorRecorder*) noexcept override {}
    nv::IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool) override {}
    PluginLibraryHandle loadLibrary(const char*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(nv::IPluginCreatorInterface& c, const char* ns) noexcept override {
        registered.emplace_back(static_cast<nv::IPluginCreatorV3One&>(c).getPluginName(), ns ? ns : "");
        return true;
    }
    nv::IPluginCreatorInterface* const* getAllCreators(int32_t* n) const noexcept override { *n = 0; return nullptr; }
    nv::IPluginCreatorInterface* getCreator(const char*, const char*, const char*) noexcept override { return nullptr; }
    bool deregisterCreator(const nv::IPluginCreatorInterface&) noexcept override { return false; }
    nv::IPluginResource* acquirePluginResource(const char*, nv::IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(const char*) noexcept override { return 0; }
    nv::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* n) noexcept override { *n = 0; return nullptr; }
#if NV_TENSORRT_MAJOR < 11  // TensorRT 10's deprecated IPluginV2 creator entries
    bool registerCreator(nv::IPluginCreator&, const char*) noexcept override { return false; }
    nv::IPluginCreator* const* getPluginCreatorList(int32_t* n) const noexcept override { *n = 0; return nullptr; }
    nv::IPluginCreator* getPluginCreator(const char*, const char*, const char*) noexcept override { return nullptr; }
    bool deregisterCreator(const nv::IPluginCreator&) noexcept override { return false; }
#endif
};
FakeRegistry* g_registry = nullptr;

void test_autoreg(const char* path) {
    static FakeRegistry registry;
    g_registry = &registry;
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    CHECK(h != nullptr, "dlopen %s: %s", path, dlerror());
    std::vector<std::pair<std::string, std::string>> want = {
        {"AmaAttention", "dreamfuse"}, {"MatchArgmax", "dreamfuse"}, {"CycleMask", "dreamfuse"},
        {"CompositeBlend", "dreamfuse"}};
    CHECK(registry.registered == want, "autoreg registered %zu creators", registry.registered.size());
}

}  // namespace

// What libnvinfer exports; found by the autoreg library's dlsym(RTLD_DEFAULT) (this executable exports it).
extern "C" __attribute__((visibility("default"))) nv::IPluginRegistry* getPluginRegistry() noexcept {
    return g_registry;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: dft_plugin_test PLUGIN_LIB AUTOREG_LIB\n");
        return 2;
    }
    void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        std::printf("FAIL dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    auto get = reinterpret_cast<GetCreators>(dlsym(h, "getCreators"));
    auto set_finder = reinterpret_cast<SetLoggerFinder>(dlsym(h, "setLoggerFinder"));
    g_last_error = reinterpret_cast<LastError>(dlsym(h, "dreamfuse_trt_plugins_last_error"));
    CHECK(get && set_finder && g_last_error, "getCreators/setLoggerFinder/dreamfuse_trt_plugins_last_error missing");
    if (!get || !set_finder || !g_last_error) return 1;
    CHECK(dlsym(h, "dfk_attention") == nullptr, "the embedded kernel library's symbols are exported");
    set_finder(&g_finder);
    int32_t n = 0;
    nv::IPluginCreatorInterface* const* list = get(n);
    CHECK(n == 4, "%d creators", n);
    std::map<std::string, nv::IPluginCreatorV3One*> by_name;
    for (int32_t i = 0; i < n; ++i) {
        nv::InterfaceInfo info = list[i]->getInterfaceInfo();
        CHECK(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1, "creator %d is %s %d", i,
              info.kind, info.major);
        auto* c = static_cast<nv::IPluginCreatorV3One*>(list[i]);
        CHECK(std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "dreamfuse") == 0,
              "%s: version %s namespace %s", c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace());
        by_name[c->getPluginName()] = c;
    }
    for (const Spec& s : specs()) {
        CHECK(by_name.count(s.name) == 1, "no creator %s", s.name);
        if (by_name.count(s.name)) test_plugin(by_name[s.name], s);
    }
    if (by_name.count("AmaAttention") && by_name.count("CycleMask"))
        test_field_validation(by_name["AmaAttention"], by_name["CycleMask"]);
    test_autoreg(argv[2]);
    std::printf("TensorRT %d headers; %d checks, %d failures\n", NV_TENSORRT_MAJOR, g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
