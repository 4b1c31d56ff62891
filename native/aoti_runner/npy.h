// NumPy .npy files (format 1.0-3.0, C order, little-endian) to and from at::Tensor: what `numpy.save` writes and
// `numpy.load` reads. dtypes: float16/32/64, int8/16/32/64, uint8, bool (NumPy has no bfloat16: cast on the way).
// Errors are std::runtime_error naming the file.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace npy {

inline at::ScalarType dtype_of(const std::string& descr, const std::string& path) {
  // '<' little-endian, '|' not applicable (one byte), '=' native (little-endian on every platform we build for)
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|' && descr[0] != '=')) {
    throw std::runtime_error(path + ": dtype '" + descr + "' is not little-endian (save it with numpy on x86/ARM)");
  }
  std::string t = descr.substr(1);
  if (t == "f4") return at::kFloat;
  if (t == "f2") return at::kHalf;
  if (t == "f8") return at::kDouble;
  if (t == "i8") return at::kLong;
  if (t == "i4") return at::kInt;
  if (t == "i2") return at::kShort;
  if (t == "i1") return at::kChar;
  if (t == "u1") return at::kByte;
  if (t == "b1") return at::kBool;
  throw std::runtime_error(path + ": dtype '" + descr +
                           "' is not supported (float16/32/64, int8/16/32/64, uint8, bool)");
}

inline std::string descr_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "<f4";
    case at::kHalf: return "<f2";
    case at::kDouble: return "<f8";
    case at::kLong: return "<i8";
    case at::kInt: return "<i4";
    case at::kShort: return "<i2";
    case at::kChar: return "|i1";
    case at::kByte: return "|u1";
    case at::kBool: return "|b1";
    default: throw std::runtime_error(std::string("npy: no NumPy dtype for ") + c10::toString(t));
  }
}

// The quoted value after `'key':` in the header dict, or the raw text up to the next ',' / '}' / ')' for others.
inline std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error(path + ": .npy header lacks '" + key + "'");
  size_t colon = header.find(':', k);
  if (colon == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  size_t v = header.find_first_not_of(' ', colon + 1);
  if (v == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  if (header[v] == '\'') {
    size_t end = header.find('\'', v + 1);
    if (end == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
    return header.substr(v + 1, end - v - 1);
  }
  if (header[v] == '(') {
    size_t end = header.find(')', v);
    if (end == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
    return header.substr(v, end - v + 1);
  }
  size_t end = header.find_first_of(",}", v);
  return header.substr(v, end - v);
}

inline std::vector<int64_t> parse_shape(const std::string& tuple, const std::string& path) {
  std::vector<int64_t> shape;
  std::string inner = tuple.substr(1, tuple.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(' ');
    if (a == std::string::npos) continue;  // the trailing comma of a 1-tuple
    size_t b = item.find_last_not_of(" L");
    std::string digits = item.substr(a, b - a + 1);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) {
      throw std::runtime_error(path + ": bad shape " + tuple + " in the .npy header");
    }
    shape.push_back(std::stoll(digits));
  }
  return shape;
}

inline at::Tensor read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  if (!f.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY") {
    throw std::runtime_error(path + ": not a .npy file (no \\x93NUMPY magic)");
  }
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw std::runtime_error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw std::runtime_error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw std::runtime_error(path + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (header_len > (1u << 20)) throw std::runtime_error(path + ": implausible .npy header length");
  std::string header(header_len, '\0');
  if (!f.read(header.data(), header_len)) throw std::runtime_error(path + ": truncated .npy header");
  at::ScalarType dtype = dtype_of(header_field(header, "descr", path), path);
  if (header_field(header, "fortran_order", path).find("False") == std::string::npos) {
    throw std::runtime_error(path + ": Fortran-order arrays are not supported (save a C-contiguous array)");
  }
  std::string shape_text = header_field(header, "shape", path);
  if (shape_text.empty() || shape_text[0] != '(') throw std::runtime_error(path + ": bad shape in the .npy header");
  std::vector<int64_t> shape = parse_shape(shape_text, path);
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  size_t nbytes = t.numel() * t.element_size();
  if (nbytes && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes))) {
    throw std::runtime_error(path + ": truncated data (" + std::to_string(nbytes) + " bytes expected)");
  }
  if (f.peek() != std::char_traits<char>::eof()) {
    throw std::runtime_error(path + ": " + std::to_string(nbytes) + " bytes of data expected, the file holds more");
  }
  return t;
}

// Writes `path` atomically (a temporary file next to it, renamed into place).
inline void write(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.to(at::kCPU).contiguous();
  if (t.scalar_type() == at::kBFloat16) t = t.to(at::kFloat);
  std::string shape = "(";
  for (int64_t i = 0; i < t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(t.size(i));
  shape += t.dim() == 1 ? ",)" : ")";  // a 1-tuple is "(4,)"
  std::string header =
      "{'descr': '" + descr_of(t.scalar_type()) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;  // magic + version + length, the header, its newline
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp" + std::to_string(getpid());  // one per writer: ctest may run tests in parallel
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error(path + ": cannot write");
    f.write("\x93NUMPY\x01\x00", 8);
    unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xFF),
                            static_cast<unsigned char>(header.size() >> 8)};
    f.write(reinterpret_cast<const char*>(len), 2);
    f << header;
    f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
    if (!f) throw std::runtime_error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename the temporary file into place");
  }
}

}  // namespace npy
