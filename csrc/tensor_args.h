// Checks of the tensor arguments of the pybind11 glue (scheduler_bindings.cpp, testing/): each
// error is a ValueError whose message starts with the argument's name, e.g. "history has 1000
// elements, expected 3 x 980 (num_history_slots x sample numel)". Header-only; sees torch, so the
// plain C++17 core (scheduler/*, parallel.*) never includes it.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dreampose_rt {
namespace args {

[[noreturn]] inline void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// "torch.float32" for at::kFloat (as Python prints dtypes).
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The tensor behind `obj` (a torch.Tensor or a subclass); an error naming `name` for anything else.
inline const at::Tensor& tensor(pybind11::handle obj, const char* name) {
  if (!THPVariable_Check(obj.ptr()))
    bad(std::string(name) + " must be a torch tensor, got " + Py_TYPE(obj.ptr())->tp_name);
  return THPVariable_Unpack(obj.ptr());
}

// A tensor the C++ data plane can read through its data pointer: on the CPU, dense, of one of
// `dtypes`, C-contiguous, with no lazy negation or conjugation.
inline void check_cpu_contiguous(const at::Tensor& t, const char* name,
                                 std::initializer_list<at::ScalarType> dtypes) {
  if (!t.defined()) bad(std::string(name) + " is an undefined tensor");
  if (!t.device().is_cpu()) bad(std::string(name) + " must be a CPU tensor, got one on " + t.device().str());
  if (t.layout() != at::kStrided) bad(std::string(name) + " must be a dense (strided) tensor");
  bool dtype_ok = false;
  std::string want;
  for (at::ScalarType d : dtypes) {
    dtype_ok = dtype_ok || t.scalar_type() == d;
    want += (want.empty() ? "" : " or ") + dtype_name(d);
  }
  if (!dtype_ok) bad(std::string(name) + " must be " + want + ", got " + dtype_name(t.scalar_type()));
  if (!t.is_contiguous()) bad(std::string(name) + " must be contiguous (call .contiguous())");
  if (t.is_neg() || t.is_conj())
    bad(std::string(name) + " is a lazily negated or conjugated view (call .resolve_neg() / .resolve_conj())");
}

// "<name> has <numel> elements, expected <expected>", e.g. expected = "980 (one per sample element)".
inline void check_numel(const at::Tensor& t, int64_t want, const char* name, const std::string& expected) {
  if (t.numel() != want) {
    std::ostringstream os;
    os << name << " has " << t.numel() << " elements, expected " << expected;
    bad(os.str());
  }
}

// A shape as Python prints a tuple: "(2, 4, 8, 8)", "(3,)", "()".
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t d = 0; d < sizes.size(); ++d) os << (d ? ", " : "") << sizes[d];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

// Do two contiguous tensors share any byte? (Undefined tensors share nothing.)
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// "<name> overlaps <other> (<name> must be a buffer of its own)" when the contiguous tensors share memory.
inline void check_no_overlap(const at::Tensor& t, const char* name, const at::Tensor& other, const char* other_name) {
  if (overlaps(t, other))
    bad(std::string(name) + " overlaps " + other_name + " (" + name + " must be a buffer of its own)");
}

}  // namespace args
}  // namespace dreampose_rt
