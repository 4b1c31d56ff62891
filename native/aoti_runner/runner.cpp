// dreamfuse_aoti_runner: run an AOTInductor package written by `dreamfuse export aoti` from C++, without Python.
//
//   dreamfuse_aoti_runner DIR/unet.pt2 --inputs IN --out OUT [--device cpu|cuda[:N]] [--manifest FILE]
//                         [--expect DIR [--atol X]]
//   dreamfuse_aoti_runner DIR/unet.pt2 --info
//
// The manifest is the export's dreamfuse.json next to the package (export/aoti.py): graphs.unet.inputs lists each
// input in call order as {name, dtype, shape}, a shape entry being a number or the name of a dynamic axis whose
// range is under "dims" (batch, latent_height, latent_width); graphs.unet.outputs names the outputs.
//
// Inputs are NumPy .npy files, one per manifest input, named after it (IN/sample.npy, IN/timestep.npy,
// IN/encoder_hidden_states.npy, SDXL also text_embeds.npy and time_ids.npy), C order, little-endian. Each is
// checked against the manifest (shape, dtype) before the package runs. Outputs go to OUT/<output name>.npy (the
// manifest's output names; output<i> when it lists none). With --expect, each output is compared with
// DIR/<name>.npy and the runner fails (exit 1) when the max abs difference exceeds --atol (default 1e-4).
//
// Exit status: 0 done, 1 a mismatch against --expect (or an unexpected failure), 2 bad input (usage, a missing or
// malformed file, a shape outside the manifest, a package this process cannot run); errors are one line on stderr.

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "mini_json.h"
#include "npy.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kProg = "dreamfuse_aoti_runner";
constexpr int64_t kLatentMultiple = 8;  // export/manifest.py's LATENT_MULTIPLE

// A user error: one line on stderr, exit status 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: dreamfuse_aoti_runner PACKAGE.pt2 --inputs DIR --out DIR [--device cpu|cuda[:N]] [--manifest FILE]\n"
    "                             [--expect DIR [--atol X]]\n"
    "       dreamfuse_aoti_runner PACKAGE.pt2 --info\n"
    "\n"
    "Run an AOTInductor package written by `dreamfuse export aoti` (no Python needed).\n"
    "\n"
    "  PACKAGE.pt2      the package; its manifest (dreamfuse.json, else manifest.json) is read from its folder\n"
    "  --inputs DIR     one NumPy .npy file per manifest input, named after it (sample.npy, timestep.npy,\n"
    "                   encoder_hidden_states.npy; SDXL also text_embeds.npy, time_ids.npy); C order\n"
    "  --out DIR        where the outputs are written, <name>.npy (created)\n"
    "  --device D       cpu or cuda[:N] (default: the device the package was compiled for)\n"
    "  --manifest FILE  the manifest, when it is not next to the package\n"
    "  --expect DIR     compare each output with DIR/<name>.npy; exit 1 past --atol\n"
    "  --atol X         max abs difference allowed by --expect (default 1e-4)\n"
    "  --info           print the package's metadata and the manifest's inputs and outputs, run nothing\n"
    "\n"
    "exit status: 0 done, 1 outputs differ from --expect, 2 bad input (one line on stderr)\n"
    "environment: AOTI_RUNTIME_CHECK_INPUTS=1 adds the package's own input checks (on by default only when the\n"
    "  manifest lists no shapes; they refuse batch 1 of a dynamic batch, which runs correctly)\n"
    "example:\n"
    "  dreamfuse export aoti --model tiny --out ./tiny-aoti --batch 1-2 --size 64 --static\n"
    "  dreamfuse_aoti_runner ./tiny-aoti/unet.pt2 --inputs ./in --out ./out\n";

struct Args {
  std::string package;
  std::string inputs;
  std::string out;
  std::string device;
  std::string manifest;
  std::string expect;
  double atol = 1e-4;
  bool info = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto value = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw UserError(flag + ": expected a value (see: " + kProg + " --help)");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--inputs") {
      a.inputs = value(i, s);
    } else if (s == "--out") {
      a.out = value(i, s);
    } else if (s == "--device") {
      a.device = value(i, s);
    } else if (s == "--manifest") {
      a.manifest = value(i, s);
    } else if (s == "--expect") {
      a.expect = value(i, s);
    } else if (s == "--atol") {
      std::string v = value(i, s);
      try {
        size_t used = 0;
        a.atol = std::stod(v, &used);
        if (used != v.size() || !(a.atol >= 0) || !std::isfinite(a.atol)) throw std::invalid_argument(v);
      } catch (const std::logic_error&) {
        throw UserError("--atol: expected a finite number >= 0, got '" + v + "'");
      }
    } else if (s == "--info") {
      a.info = true;
    } else if (!s.empty() && s[0] == '-') {
      throw UserError("unknown option " + s + " (see: " + kProg + " --help)");
    } else if (a.package.empty()) {
      a.package = s;
    } else {
      throw UserError("unexpected argument '" + s + "' (one package per run; see: " + kProg + " --help)");
    }
  }
  if (a.package.empty()) {
    throw UserError("PACKAGE: give the .pt2 package to run (see: " + std::string(kProg) + " --help)");
  }
  if (!a.info) {
    if (a.inputs.empty()) throw UserError("--inputs: required (a folder of .npy files, one per manifest input)");
    if (a.out.empty()) throw UserError("--out: required (the folder the outputs are written to)");
  }
  return a;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw UserError(p.string() + ": cannot read");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string first_line(const std::string& s) {
  size_t n = s.find('\n');
  return n == std::string::npos ? s : s.substr(0, n);
}

// ------------------------------------------------------------------------------------------------ manifest
// One dimension of an input as the manifest gives it: a number (fixed), [lo, hi] or {"min": lo, "max": hi} (a
// range), a string (a symbol: every dimension with that name must have one size, e.g. "batch"), or null (any).
struct Dim {
  int64_t lo = 0, hi = -1;  // hi < 0: unbounded
  std::string symbol;
  std::string text() const {
    if (!symbol.empty()) return symbol;
    if (lo == hi) return std::to_string(lo);
    if (hi < 0 && lo == 0) return "?";
    return std::to_string(lo) + ".." + (hi < 0 ? std::string("") : std::to_string(hi));
  }
};

struct TensorSpec {
  std::string name;
  bool has_shape = false;
  std::vector<Dim> shape;
  std::string dtype;  // "" when the manifest does not say
};

struct Manifest {
  fs::path path;
  std::vector<TensorSpec> inputs;
  std::vector<std::string> outputs;
  std::string device;  // "" when the manifest does not say
  std::map<std::string, Dim> symbols;  // ranges of named dimensions (from the profile)
};

int64_t as_int(const mini_json::Value& v, const std::string& where) {
  if (!v.is_number() || v.number != std::floor(v.number)) throw UserError(where + ": expected an integer");
  return static_cast<int64_t>(v.number);
}

Dim parse_dim(const mini_json::Value& v, const std::string& where) {
  Dim d;
  if (v.is_null()) return d;
  if (v.is_number()) {
    d.lo = d.hi = as_int(v, where);
  } else if (v.is_string()) {
    d.symbol = v.string;
  } else if (v.is_array() && v.array.size() == 2) {
    d.lo = as_int(v.array[0], where);
    d.hi = v.array[1].is_null() ? -1 : as_int(v.array[1], where);
  } else if (v.is_object() && v.find("min")) {
    d.lo = as_int(*v.find("min"), where + ".min");
    const auto* hi = v.find("max");
    d.hi = hi && !hi->is_null() ? as_int(*hi, where + ".max") : -1;
  } else {
    throw UserError(where + ": a dimension is a number, [min, max], {\"min\", \"max\"}, a name or null");
  }
  return d;
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string normalize_dtype(std::string s) {
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  if (s == "float" || s == "fp32") return "float32";
  if (s == "half" || s == "fp16") return "float16";
  if (s == "bf16") return "bfloat16";
  if (s == "double") return "float64";
  if (s == "long") return "int64";
  if (s == "int") return "int32";
  return s;
}

Manifest read_manifest(const Args& a) {
  Manifest m;
  fs::path dir = fs::path(a.package).parent_path();
  if (dir.empty()) dir = ".";
  if (!a.manifest.empty()) {
    m.path = a.manifest;
    if (!fs::is_regular_file(m.path)) throw UserError("--manifest: '" + a.manifest + "' does not exist");
  } else if (fs::is_regular_file(dir / "dreamfuse.json")) {
    m.path = dir / "dreamfuse.json";
  } else if (fs::is_regular_file(dir / "manifest.json")) {
    m.path = dir / "manifest.json";
  } else {
    throw UserError("PACKAGE: '" + dir.string() +
                    "' has no dreamfuse.json (export the package with `dreamfuse export aoti`, or give --manifest)");
  }
  mini_json::Value root;
  try {
    root = mini_json::parse(read_text(m.path));
  } catch (const std::runtime_error& e) {
    throw UserError(m.path.string() + ": not a readable manifest (" + e.what() + ")");
  }
  if (!root.is_object()) throw UserError(m.path.string() + ": not a readable manifest (not a JSON object)");

  // The inputs: top-level "inputs", or those of the "unet" graph (dreamfuse.json's layout).
  const mini_json::Value* graph = nullptr;
  if (const auto* graphs = root.find("graphs")) {
    graph = graphs->find("unet");
    if (!graph && graphs->is_object() && graphs->object.size() == 1) graph = &graphs->object.begin()->second;
  }
  const mini_json::Value* inputs = root.find("inputs");
  if (!inputs && graph) inputs = graph->find("inputs");
  if (!inputs || !inputs->is_array() || inputs->array.empty()) {
    throw UserError(m.path.string() + ": lists no inputs (export the package again with `dreamfuse export aoti`)");
  }
  const mini_json::Value* outputs = root.find("outputs");
  if (!outputs && graph) outputs = graph->find("outputs");
  if (const auto* dev = root.find("device"); dev && dev->is_string()) m.device = dev->string;
  std::string default_dtype;
  if (const auto* dt = root.find("dtype"); dt && dt->is_string()) default_dtype = normalize_dtype(dt->string);

  for (size_t i = 0; i < inputs->array.size(); ++i) {
    const auto& v = inputs->array[i];
    std::string where = m.path.filename().string() + ": inputs[" + std::to_string(i) + "]";
    TensorSpec spec;
    if (v.is_string()) {
      spec.name = v.string;
    } else if (v.is_object() && v.find("name") && v.find("name")->is_string()) {
      spec.name = v.find("name")->string;
      if (const auto* shape = v.find("shape"); shape && shape->is_array()) {
        spec.has_shape = true;
        for (size_t k = 0; k < shape->array.size(); ++k) {
          spec.shape.push_back(parse_dim(shape->array[k], where + ".shape[" + std::to_string(k) + "]"));
        }
      }
      if (const auto* dt = v.find("dtype"); dt && dt->is_string()) spec.dtype = normalize_dtype(dt->string);
    } else {
      throw UserError(where + ": an input is a name or {\"name\", \"shape\", \"dtype\"}");
    }
    if (spec.name.empty() || spec.name.find('/') != std::string::npos || spec.name[0] == '.') {
      throw UserError(where + ": bad input name '" + spec.name + "'");
    }
    m.inputs.push_back(spec);
  }
  (void)default_dtype;  // the model's dtype; inputs such as the timestep may differ, so only per-input dtypes count
  if (outputs && outputs->is_array()) {
    for (const auto& v : outputs->array) {
      if (v.is_string()) {
        m.outputs.push_back(v.string);
      } else if (v.is_object() && v.find("name") && v.find("name")->is_string()) {
        m.outputs.push_back(v.find("name")->string);
      }
    }
  }
  // Ranges of the named (dynamic) dimensions: "dims" ({"batch": [1, 2], ...}), else the profile's ranges.
  for (const char* section : {"dims", "profile"}) {
    const auto* ranges = root.find(section);
    if (!ranges || !ranges->is_object()) continue;
    for (const auto& [key, val] : ranges->object) {
      if (val.is_array() && val.array.size() == 2 && val.array[0].is_number() && val.array[1].is_number() &&
          !m.symbols.count(key)) {
        m.symbols[key] = parse_dim(val, m.path.filename().string() + ": " + section + "." + key);
      }
    }
  }
  return m;
}

// ------------------------------------------------------------------------------------------------ inputs
std::string shape_text(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string spec_text(const TensorSpec& spec) {
  std::string s = "(";
  for (size_t i = 0; i < spec.shape.size(); ++i) s += (i ? ", " : "") + spec.shape[i].text();
  return s + (spec.shape.size() == 1 ? ",)" : ")");
}

std::vector<at::Tensor> read_inputs(const Args& a, const Manifest& m) {
  if (!fs::is_directory(a.inputs)) throw UserError("--inputs: '" + a.inputs + "' is not a folder");
  std::vector<at::Tensor> tensors;
  std::map<std::string, std::pair<int64_t, std::string>> bound;  // symbol -> (size, "input[dim]")
  for (const auto& spec : m.inputs) {
    fs::path p = fs::path(a.inputs) / (spec.name + ".npy");
    if (!fs::is_regular_file(p)) {
      throw UserError("--inputs: '" + p.string() + "' is missing (the manifest's input " + spec.name + ")");
    }
    at::Tensor t;
    try {
      t = npy::read(p.string());
    } catch (const std::runtime_error& e) {
      throw UserError(std::string("--inputs: ") + e.what());
    }
    std::string got = dtype_name(t.scalar_type());
    if (!spec.dtype.empty() && got != spec.dtype) {
      throw UserError(spec.name + ": " + p.string() + " holds " + got + ", the package takes " + spec.dtype);
    }
    if (spec.has_shape) {
      bool ok = static_cast<size_t>(t.dim()) == spec.shape.size();
      std::string why = ok ? "" : std::to_string(t.dim()) + " dimensions, the package takes " +
                                      std::to_string(spec.shape.size());
      for (size_t k = 0; ok && k < spec.shape.size(); ++k) {
        const Dim& d = spec.shape[k];
        int64_t n = t.size(static_cast<int64_t>(k));
        if (!d.symbol.empty()) {
          auto it = bound.find(d.symbol);
          if (it != bound.end() && it->second.first != n) {
            ok = false;
            why = "dimension " + std::to_string(k) + " (" + d.symbol + ") is " + std::to_string(n) + " but " +
                  it->second.second + " is " + std::to_string(it->second.first);
          }
          auto r = m.symbols.find(d.symbol);
          if (ok && r != m.symbols.end() && (n < r->second.lo || (r->second.hi >= 0 && n > r->second.hi))) {
            ok = false;
            why = "dimension " + std::to_string(k) + " (" + d.symbol + ") is " + std::to_string(n) +
                  ", outside the exported profile " + r->second.text();
          }
          // dreamfuse's dynamic latent sizes are multiples of 8 (diffusers' down/upsamplers guard on it)
          if (ok && r != m.symbols.end() && r->second.lo != r->second.hi && d.symbol.rfind("latent_", 0) == 0 &&
              n % kLatentMultiple) {
            ok = false;
            why = "dimension " + std::to_string(k) + " (" + d.symbol + ") is " + std::to_string(n) +
                  ", not a multiple of " + std::to_string(kLatentMultiple);
          }
          bound.emplace(d.symbol, std::make_pair(n, spec.name + "[" + std::to_string(k) + "]"));
        } else if (n < d.lo || (d.hi >= 0 && n > d.hi)) {
          ok = false;
          why = "dimension " + std::to_string(k) + " is " + std::to_string(n) + ", the package takes " + d.text();
        }
      }
      if (!ok) {
        throw UserError(spec.name + ": shape " + shape_text(t.sizes()) + " does not fit the manifest's " +
                        spec_text(spec) + ": " + why);
      }
    }
    tensors.push_back(t);
  }
  return tensors;
}

// ------------------------------------------------------------------------------------------------ package
std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_package(const std::string& path, c10::DeviceIndex index) {
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, index);
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    size_t k = msg.find("Could not find schema for ");
    if (k != std::string::npos) {
      std::string op = msg.substr(k + 26);
      op = op.substr(0, op.find_first_of(". \n"));
      throw UserError("PACKAGE: '" + path + "' calls the Python custom op " + op +
                      ", which only exists in a Python process; export the package with the ops lowered "
                      "(`dreamfuse export aoti` lowers dreamfuse's ops to ATen on CPU and embeds their Triton "
                      "kernels on CUDA)");
    }
    throw UserError("PACKAGE: '" + path + "' could not be loaded as an AOTInductor package (" + first_line(msg) + ")");
  }
}

// "input_handles[0]: ..." (the package's own input check) -> "sample: ..." with the manifest's names.
std::string name_inputs(std::string msg, const Manifest& m) {
  const std::string head = "input_handles[";
  size_t k = msg.find(head);
  if (k == std::string::npos) return msg;
  size_t end = msg.find(']', k);
  if (end == std::string::npos) return msg;
  try {
    size_t i = std::stoul(msg.substr(k + head.size(), end - k - head.size()));
    if (i < m.inputs.size()) msg.replace(k, end + 1 - k, m.inputs[i].name);
  } catch (const std::logic_error&) {
  }
  return msg;
}

// Redirects stderr (fd 2) into a temporary file for its lifetime; on destruction the held text is written to the
// real stderr unless drop() was called.
class StderrHold {
 public:
  StderrHold() {
    std::fflush(stderr);
    file_ = std::tmpfile();
    saved_ = file_ ? dup(2) : -1;
    if (saved_ >= 0 && dup2(fileno(file_), 2) < 0) {
      close(saved_);
      saved_ = -1;
    }
  }
  ~StderrHold() {
    if (saved_ < 0) {
      if (file_) std::fclose(file_);
      return;
    }
    std::fflush(stderr);
    dup2(saved_, 2);
    close(saved_);
    if (!dropped_) {
      std::rewind(file_);
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, file_)) > 0) std::fwrite(buf, 1, n, stderr);
    }
    std::fclose(file_);
  }
  void drop() { dropped_ = true; }
  StderrHold(const StderrHold&) = delete;
  StderrHold& operator=(const StderrHold&) = delete;

 private:
  FILE* file_ = nullptr;
  int saved_ = -1;
  bool dropped_ = false;
};

std::string metadata_value(const std::unordered_map<std::string, std::string>& meta, const std::string& key) {
  auto it = meta.find(key);
  return it == meta.end() ? "" : it->second;
}

int info(const Args& a) {
  auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(a.package, "model");
  std::map<std::string, std::string> sorted(meta.begin(), meta.end());
  std::cout << "package " << a.package << "\n";
  for (const auto& [k, v] : sorted) std::cout << "  " << k << ": " << v << "\n";
  Manifest m = read_manifest(a);
  std::cout << "manifest " << m.path.string() << "\n";
  for (const auto& s : m.inputs) {
    std::cout << "  input  " << s.name << " " << (s.has_shape ? spec_text(s) : "(shape not listed)") << " "
              << (s.dtype.empty() ? "" : s.dtype) << "\n";
  }
  for (const auto& o : m.outputs) std::cout << "  output " << o << "\n";
  for (const auto& [name, d] : m.symbols) std::cout << "  axis   " << name << " " << d.text() << "\n";
  return 0;
}

int run(const Args& a) {
  if (!fs::is_regular_file(a.package)) {
    throw UserError("PACKAGE: '" + a.package + "' " + (fs::exists(a.package) ? "is not a file" : "does not exist"));
  }
  if (a.info) return info(a);
  if (!a.expect.empty() && !fs::is_directory(a.expect)) throw UserError("--expect: '" + a.expect + "' is not a folder");
  Manifest m = read_manifest(a);
  std::vector<at::Tensor> inputs = read_inputs(a, m);

  // The device: --device, else the package's own (its metadata records what it was compiled for).
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(a.package, "model");
  } catch (const c10::Error& e) {
    throw UserError("PACKAGE: '" + a.package + "' is not an AOTInductor package (" +
                    first_line(e.what_without_backtrace()) + ")");
  }
  std::string compiled_for = metadata_value(meta, "AOTI_DEVICE_KEY");
  if (compiled_for.empty()) compiled_for = m.device.empty() ? "cpu" : m.device;
  std::string device_text = a.device.empty() ? compiled_for : a.device;
  std::optional<c10::Device> device;
  try {
    device.emplace(device_text);
  } catch (const c10::Error&) {
    throw UserError("--device: '" + device_text + "' is not a device (cpu, cuda, cuda:N)");
  }
  if (device->type() != c10::Device(compiled_for).type()) {
    throw UserError("--device: the package is compiled for " + compiled_for + ", not " + device_text +
                    " (export it again with --device " + c10::DeviceTypeName(device->type(), true) + ")");
  }
  if (device->is_cuda() && !at::hasCUDA()) {
    throw UserError("--device: " + device_text + " needs a CUDA build of libtorch and a GPU; this process has neither");
  }
  c10::DeviceIndex index = device->has_index() ? device->index() : (device->is_cuda() ? 0 : -1);

  // The package's own check of every input's sizes, strides, dtype and device (AOTI_RUNTIME_CHECK_INPUTS; off by
  // default) where the manifest lists no shapes: a wrong shape would otherwise read out of bounds. Not where it
  // does: the package's check refuses batch 1 of a dynamic batch (torch.export assumes dynamic sizes >= 2 and the
  // check says so), which runs correctly and which the manifest's profile includes (the ctest compares it with
  // eager). Set AOTI_RUNTIME_CHECK_INPUTS=1 to force it.
  bool listed = std::all_of(m.inputs.begin(), m.inputs.end(), [](const TensorSpec& s) { return s.has_shape; });
  if (!listed) setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
  c10::InferenceMode guard;
  auto loader = load_package(a.package, index);
  for (auto& t : inputs) t = t.to(*device);

  auto t0 = std::chrono::steady_clock::now();
  std::vector<at::Tensor> outputs;
  {
    // The package's C shim prints its own "Error: ..." line before it throws: hold stderr back during the run and
    // pass it on only when the run succeeds, so that a refusal stays one line.
    StderrHold hold;
    try {
      outputs = loader->run(inputs);
    } catch (const c10::Error& e) {
      hold.drop();
      throw UserError("PACKAGE: the run failed (" + first_line(e.what_without_backtrace()) + ")");
    } catch (const std::exception& e) {
      hold.drop();
      throw UserError("PACKAGE: the package refused the inputs (" + name_inputs(first_line(e.what()), m) + ")");
    }
  }
  for (auto& t : outputs) t = t.to(at::kCPU);  // synchronizes a CUDA run before the clock stops
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  std::error_code ec;
  fs::create_directories(a.out, ec);
  if (ec || !fs::is_directory(a.out)) {
    throw UserError("--out: cannot create the folder '" + a.out + "' (" + (ec ? ec.message() : "not a folder") + ")");
  }
  bool all_ok = true;
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::string name = i < m.outputs.size() ? m.outputs[i] : "output" + std::to_string(i);
    fs::path p = fs::path(a.out) / (name + ".npy");
    try {
      npy::write(p.string(), outputs[i]);
    } catch (const std::runtime_error& e) {
      throw UserError(std::string("--out: ") + e.what());
    }
    std::cout << name << ": " << shape_text(outputs[i].sizes()) << " " << dtype_name(outputs[i].scalar_type())
              << " -> " << p.string() << "\n";
    if (a.expect.empty()) continue;
    fs::path e = fs::path(a.expect) / (name + ".npy");
    if (!fs::is_regular_file(e)) throw UserError("--expect: '" + e.string() + "' is missing (output " + name + ")");
    at::Tensor want;
    try {
      want = npy::read(e.string());
    } catch (const std::runtime_error& err) {
      throw UserError(std::string("--expect: ") + err.what());
    }
    if (want.sizes() != outputs[i].sizes()) {
      std::cout << name << ": shape " << shape_text(outputs[i].sizes()) << ", expected " << shape_text(want.sizes())
                << ": FAIL\n";
      all_ok = false;
      continue;
    }
    at::Tensor got = outputs[i].to(at::kDouble), ref = want.to(at::kDouble);
    bool finite = got.isfinite().all().item<bool>();
    double diff = got.numel() ? (got - ref).abs().max().item<double>() : 0.0;
    bool ok = finite && diff <= a.atol;
    char line[160];
    std::snprintf(line, sizeof line, "%s: max abs diff %.3g (atol %.3g)%s: %s", name.c_str(), diff, a.atol,
                  finite ? "" : ", non-finite values", ok ? "ok" : "FAIL");
    std::cout << line << "\n";
    all_ok = all_ok && ok;
  }
  std::printf("ran %s on %s in %.1f ms\n", fs::path(a.package).filename().c_str(), device->str().c_str(), ms);
  if (!a.expect.empty() && outputs.size() != m.outputs.size() && !m.outputs.empty()) {
    std::cout << "outputs: " << outputs.size() << ", the manifest lists " << m.outputs.size() << ": FAIL\n";
    all_ok = false;
  }
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UserError& e) {
    std::cerr << kProg << ": error: " << e.what() << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << kProg << ": error: " << first_line(e.what_without_backtrace()) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << kProg << ": error: " << first_line(e.what()) << "\n";
    return 1;
  }
}
