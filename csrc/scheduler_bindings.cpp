// pybind11 glue of the scheduler: converts options and buffers, checks them (errors name the
// argument), fills the plain structs of scheduler/schedule.h and scheduler/step_kernel.h.
// Buffers arrive through the buffer protocol (numpy views of CPU torch tensors), as data pointers
// checked in Python, or as torch tensors checked here (the per-step fast path: reading a tensor's
// dtype, device, sizes and contiguity from C++ costs nanoseconds, from Python about 1 us a step).
// This file is the only one that sees torch; the scheduler core (scheduler/*) is plain C++17.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#include <algorithm>
#include <cstdint>

#include "registry.h"
#include "scheduler/columns.h"
#include "scheduler/schedule.h"
#include "scheduler/step_kernel.h"

namespace py = pybind11;
namespace sch = dreampose_rt::scheduler;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// Tensor::has_names() where this torch still has named tensors (removed in recent releases).
template <typename T>
auto has_names_impl(const T& t, int) -> decltype(t.has_names()) {
  return t.has_names();
}
template <typename T>
bool has_names_impl(const T&, long) {
  return false;
}
bool has_names(const at::Tensor& t) { return has_names_impl(t, 0); }

template <typename E>
E parse_enum(const std::string& option, const std::string& value,
             std::initializer_list<std::pair<const char*, E>> choices) {
  std::ostringstream names;
  for (const auto& c : choices) {
    if (value == c.first) return c.second;
    names << (names.tellp() > 0 ? ", " : "") << "'" << c.first << "'";
  }
  bad(option + "='" + value + "' is not supported (choose one of " + names.str() + ")");
}

template <typename E>
std::string enum_name(E v, std::initializer_list<std::pair<const char*, E>> choices) {
  for (const auto& c : choices)
    if (c.second == v) return c.first;
  return "?";
}

const std::initializer_list<std::pair<const char*, sch::Kind>> kKinds = {
    {"pndm", sch::Kind::kPNDM}, {"ddim", sch::Kind::kDDIM}, {"dpmpp", sch::Kind::kDPMSolverPP}};
const std::initializer_list<std::pair<const char*, sch::BetaSchedule>> kBetas = {
    {"linear", sch::BetaSchedule::kLinear},
    {"scaled_linear", sch::BetaSchedule::kScaledLinear},
    {"squaredcos_cap_v2", sch::BetaSchedule::kSquaredCosCapV2}};
const std::initializer_list<std::pair<const char*, sch::Spacing>> kSpacings = {
    {"leading", sch::Spacing::kLeading},
    {"trailing", sch::Spacing::kTrailing},
    {"linspace", sch::Spacing::kLinspace}};
const std::initializer_list<std::pair<const char*, sch::Prediction>> kPredictions = {
    {"epsilon", sch::Prediction::kEpsilon}, {"v_prediction", sch::Prediction::kVPrediction}};
const std::initializer_list<std::pair<const char*, sch::SolverType>> kSolverTypes = {
    {"midpoint", sch::SolverType::kMidpoint}, {"heun", sch::SolverType::kHeun}};
const std::initializer_list<std::pair<const char*, sch::FinalSigmas>> kFinalSigmas = {
    {"zero", sch::FinalSigmas::kZero}, {"sigma_min", sch::FinalSigmas::kSigmaMin}};

// A checked, C-contiguous view of one buffer argument.
struct View {
  void* ptr = nullptr;
  int64_t numel = 0;
  bool half = false;
};

View view_of(const py::object& obj, const char* name, bool writable, bool fp32_only) {
  if (obj.is_none()) bad(std::string(name) + " is required");
  py::buffer b = py::reinterpret_borrow<py::buffer>(obj);
  py::buffer_info info;
  try {
    info = b.request(writable);
  } catch (const std::exception& e) {
    bad(std::string(name) + ": not a " + (writable ? "writable " : "") + "buffer (" + e.what() + ")");
  }
  View v;
  if (info.format == "f" && info.itemsize == 4) {
    v.half = false;
  } else if (info.format == "e" && info.itemsize == 2 && !fp32_only) {
    v.half = true;
  } else {
    bad(std::string(name) + ": dtype must be " + (fp32_only ? "float32" : "float32 or float16") +
        " (buffer format '" + info.format + "')");
  }
  int64_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect) bad(std::string(name) + " must be contiguous");
    expect *= info.shape[d];
  }
  v.ptr = info.ptr;
  v.numel = info.size;
  return v;
}

void check_numel(const View& v, int64_t want, const char* name, const char* what) {
  if (v.numel != want) {
    std::ostringstream os;
    os << name << " has " << v.numel << " elements, expected " << want << " (" << what << ")";
    bad(os.str());
  }
}

struct PyPlan {
  sch::Plan plan;

  py::bytes table() const {
    const int C = sch::kNumTableColumns;
    std::string data(plan.rows.size() * C * sizeof(float), '\0');
    float* t = reinterpret_cast<float*>(&data[0]);
    for (size_t k = 0; k < plan.rows.size(); ++k) {
      const sch::StepRow& r = plan.rows[k];
      const float row[] = {static_cast<float>(r.timestep), r.qx, r.qm, r.ox, r.om, r.oq, r.os,
                           r.oh[0], r.oh[1], r.oh[2], r.oa, r.akeep, r.am,
                           static_cast<float>(r.write_slot), r.save_sample ? 1.f : 0.f};
      static_assert(sizeof(row) / sizeof(float) == sch::kNumTableColumns, "table layout");
      std::memcpy(t + k * C, row, sizeof row);
    }
    return py::bytes(data);
  }

  void step(int64_t k, const py::object& out, const py::object& sample, const py::object& model_output,
            const py::object& history, const py::object& saved_sample, const py::object& accumulator,
            const py::object& scale_image, const py::object& scale_pose, int num_threads) const {
    const int64_t n = static_cast<int64_t>(plan.rows.size());
    if (k < 0 || k >= n) {
      std::ostringstream os;
      os << "step index " << k << " is outside the schedule of " << n << " steps";
      bad(os.str());
    }
    const sch::StepRow& row = plan.rows[k];
    sch::StepBuffers buf;
    sch::Guidance g;
    const View vs = view_of(sample, "sample", false, false);
    const View vo = view_of(out, "out", true, false);
    const View vm = view_of(model_output, "model_output", false, false);
    if (vo.half != vs.half || vm.half != vs.half)
      bad("sample, model_output and out must have the same dtype");
    buf.dtype = vs.half ? sch::DType::kFloat16 : sch::DType::kFloat32;
    buf.numel = vs.numel;
    buf.sample = vs.ptr;
    buf.out = vo.ptr;
    buf.model_output = vm.ptr;
    check_numel(vo, vs.numel, "out", "one per sample element");
    g.enabled = !scale_image.is_none() || !scale_pose.is_none();
    View si, sp;
    if (g.enabled) {
      si = view_of(scale_image, "scale_image", false, true);
      sp = view_of(scale_pose, "scale_pose", false, true);
      if (si.numel < 1 || si.numel != sp.numel) bad("scale_image and scale_pose must have the same length F >= 1");
      if (vs.numel % si.numel != 0) {
        std::ostringstream os;
        os << "sample has " << vs.numel << " elements, not divisible into F=" << si.numel << " frames";
        bad(os.str());
      }
      check_numel(vm, 3 * vs.numel, "model_output", "3 guidance branches per sample element");
      g.frames = si.numel;
      g.frame_numel = vs.numel / si.numel;
      g.scale_image = static_cast<const float*>(si.ptr);
      g.scale_pose = static_cast<const float*>(sp.ptr);
    } else {
      check_numel(vm, vs.numel, "model_output", "one per sample element");
    }
    if (plan.num_history_slots > 0) {
      const View h = view_of(history, "history", true, true);
      check_numel(h, plan.num_history_slots * vs.numel, "history", "num_history_slots x sample numel");
      for (int j = 0; j < plan.num_history_slots; ++j) buf.history[j] = static_cast<float*>(h.ptr) + j * vs.numel;
    }
    if (plan.uses_saved_sample) {
      const View s = view_of(saved_sample, "saved_sample", true, true);
      check_numel(s, vs.numel, "saved_sample", "one per sample element");
      buf.saved_sample = static_cast<float*>(s.ptr);
    }
    if (plan.uses_accumulator) {
      const View a = view_of(accumulator, "accumulator", true, true);
      check_numel(a, vs.numel, "accumulator", "one per sample element");
      buf.accumulator = static_cast<float*>(a.ptr);
    }
    py::gil_scoped_release release;
    sch::apply_step(row, buf, g, num_threads);
  }
};

// A run's step bound to its state once (the fast path of DiffusionScheduler.step): the state
// pointers, the element count, the dtype and the frame count are fixed when the run's first step
// has been checked in Python; each call then passes only the step index and the data pointers of
// tensors that Python has checked against that signature (no buffer protocol, no py::object).
struct PyBoundStep {
  py::object plan_owner;   // the SchedulerPlan (its rows are read)
  py::object state_owner;  // keeps the state tensors alive
  const sch::Plan* plan = nullptr;
  sch::StepBuffers buf;
  int64_t frames = 1;
  std::vector<float> uniform_image, uniform_pose;  // scratch for scalar guidance scales
  int num_threads = 0;
  std::vector<int64_t> sizes;  // of the sample the binding was made for
  at::ScalarType dtype = at::kFloat;

  const sch::StepRow& row(int64_t k) const {
    const int64_t n = static_cast<int64_t>(plan->rows.size());
    if (k < 0 || k >= n) {
      std::ostringstream os;
      os << "step index " << k << " is outside the schedule of " << n << " steps";
      bad(os.str());
    }
    return plan->rows[k];
  }

  void run(int64_t k, uintptr_t out, uintptr_t sample, uintptr_t model_output, const sch::Guidance& g) const {
    const sch::StepRow& r = row(k);
    sch::StepBuffers b = buf;
    b.out = reinterpret_cast<void*>(out);
    b.sample = reinterpret_cast<const void*>(sample);
    b.model_output = reinterpret_cast<const void*>(model_output);
    if (!b.out || !b.sample || !b.model_output) bad("out, sample and model_output must be non-null");
    // Below ~64K elements the step takes a few us: releasing the GIL would cost more than it frees.
    if (b.numel >= (int64_t(1) << 16)) {
      py::gil_scoped_release release;
      sch::apply_step(r, b, g, num_threads);
    } else {
      sch::apply_step(r, b, g, num_threads);
    }
  }

  void step(int64_t k, uintptr_t out, uintptr_t sample, uintptr_t model_output) const {
    run(k, out, sample, model_output, sch::Guidance{});
  }

  void step_guided(int64_t k, uintptr_t out, uintptr_t sample, uintptr_t model_output, uintptr_t scale_image,
                   uintptr_t scale_pose) const {
    if (!scale_image || !scale_pose) bad("scale_image and scale_pose must be non-null");
    sch::Guidance g;
    g.enabled = true;
    g.frames = frames;
    g.frame_numel = buf.numel / frames;
    g.scale_image = reinterpret_cast<const float*>(scale_image);
    g.scale_pose = reinterpret_cast<const float*>(scale_pose);
    run(k, out, sample, model_output, g);
  }

  // Same scales for every frame: s_I, s_p rounded to float32 as torch.full(..., dtype=float32) does.
  void step_guided_uniform(int64_t k, uintptr_t out, uintptr_t sample, uintptr_t model_output, double scale_image,
                           double scale_pose) {
    std::fill(uniform_image.begin(), uniform_image.end(), static_cast<float>(scale_image));
    std::fill(uniform_pose.begin(), uniform_pose.end(), static_cast<float>(scale_pose));
    step_guided(k, out, sample, model_output, reinterpret_cast<uintptr_t>(uniform_image.data()),
                reinterpret_cast<uintptr_t>(uniform_pose.data()));
  }

  // Point the binding at another run's plan (a new set_timesteps) that needs no more buffers than it has.
  void set_plan(const py::object& plan_obj) {
    const PyPlan& p = plan_obj.cast<const PyPlan&>();
    for (int j = 0; j < p.plan.num_history_slots; ++j)
      if (j >= sch::kMaxHistory || buf.history[j] == nullptr) bad("the plan needs more history slots than are bound");
    if (p.plan.uses_saved_sample && buf.saved_sample == nullptr) bad("the plan needs a saved sample buffer");
    if (p.plan.uses_accumulator && buf.accumulator == nullptr) bad("the plan needs an accumulator buffer");
    plan_owner = plan_obj;
    plan = &p.plan;
  }

  // Outputs of step(out=None), recycled once nothing else can see them. In the usual loop
  // (`x = step(eps, t, x).prev_sample`) the output of step k - 1 is dead by step k + 1: a new tensor per
  // step costs an allocation (1.5 us at 1 x 4 x 80 x 64, page faults at larger sizes) where a dead
  // one can be written again. Two slots: the newest output is usually still alive (it is the sample).
  py::object recent[2];
  void* recent_ptr[2] = {nullptr, nullptr};
  int newest = 0;

  // A previous output that nothing but this binding references and that is exactly as step() made it
  // (so handing it out again cannot be told from a new tensor): Python refcount 1, no weak references,
  // no attributes, no autograd metadata (requires_grad, grad, hooks), the same data pointer, unshared
  // storage, no views, the binding's dtype/sizes, and the current inference mode. Null otherwise.
  py::object recycled_output() {
#if defined(Py_GIL_DISABLED) || PY_VERSION_HEX >= 0x030E0000
    // Free-threaded builds (a refcount of 1 proves nothing there) and Pythons whose object layout this
    // was not checked against: never recycle.
    return py::object();
#endif
    for (int i = 0; i < 2; ++i) {
      const int slot = newest ^ i;  // the newest first (cache-warm), else the older one
      PyObject* o = recent[slot].ptr();
      if (o == nullptr || Py_REFCNT(o) != 1 || !THPVariable_CheckExact(o) || match(o, 1) == nullptr) continue;
      // Weak references: the list head lives at tp_weaklistoffset, which is negative for the managed
      // weakref slot of Python >= 3.12 (as CPython's own _PyObject_GET_WEAKREFS_LISTPTR computes it).
      PyTypeObject* type = Py_TYPE(o);
      if (type->tp_weaklistoffset == 0 ||
          *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(o) + type->tp_weaklistoffset) != nullptr)
        continue;
      PyObject* dict = PyObject_GenericGetDict(o, nullptr);  // new reference (an empty dict if none yet)
      if (dict == nullptr) {
        PyErr_Clear();
        continue;
      }
      const Py_ssize_t attributes = PyDict_Size(dict);
      Py_DECREF(dict);
      if (attributes != 0) continue;
      const at::Tensor& t = THPVariable_Unpack(o);
      if (t.use_count() != 1 || !t.storage() || t.storage().use_count() != 1 || t.data_ptr() != recent_ptr[slot] ||
          t.unsafeGetTensorImpl()->autograd_meta() != nullptr || t.storage_offset() != 0 ||
          t.is_inference() != c10::InferenceMode::is_enabled() || t.is_conj() || has_names(t))
        continue;
      return recent[slot];
    }
    return py::object();
  }

  // Remember the output just handed out (a recycled one is already in a slot; a new one replaces the older).
  void keep_output(const py::object& obj, void* ptr) {
    for (int i = 0; i < 2; ++i) {
      if (recent[i].ptr() == obj.ptr()) {
        newest = i;
        return;
      }
    }
    newest ^= 1;
    recent[newest] = obj;
    recent_ptr[newest] = ptr;
  }

  // The tensor `obj` if it is a plain CPU tensor of the bound dtype, contiguous, sized like the sample
  // with `rows` times its frames; nullptr otherwise.
  const at::Tensor* match(PyObject* obj, int64_t rows) const {
    if (!THPVariable_CheckExact(obj)) return nullptr;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.scalar_type() != dtype || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_neg() ||
        !t.is_contiguous())
      return nullptr;
    const auto sz = t.sizes();
    if (sz.size() != sizes.size() || sz[0] != sizes[0] * rows) return nullptr;
    for (size_t d = 1; d < sizes.size(); ++d)
      if (sz[d] != sizes[d]) return nullptr;
    return &t;
  }

  // The per-step fast path: step k on tensors that match the binding; `out` None: a new tensor.
  // Returns the tensor written, or None when a tensor does not match (the caller then takes its
  // checked path, which names the problem). guided: model_output holds the three branches.
  py::object step_tensors(int64_t k, py::handle out, py::handle sample, py::handle model_output, bool guided,
                          double scale_image, double scale_pose) {
    const at::Tensor* x = match(sample.ptr(), 1);
    const at::Tensor* m = x ? match(model_output.ptr(), guided ? 3 : 1) : nullptr;
    if (m == nullptr) return py::none();
    py::object result;
    void* out_ptr;
    if (out.is_none()) {
      result = recycled_output();
      if (result) {
        out_ptr = THPVariable_Unpack(result.ptr()).data_ptr();
      } else {
        at::Tensor fresh = at::empty(x->sizes(), x->options());
        out_ptr = fresh.data_ptr();
        result = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(fresh)));
      }
      keep_output(result, out_ptr);
    } else {
      const at::Tensor* o = match(out.ptr(), 1);
      if (o == nullptr) return py::none();
      out_ptr = o->data_ptr();
      result = py::reinterpret_borrow<py::object>(out);
    }
    const auto o = reinterpret_cast<uintptr_t>(out_ptr), xs = reinterpret_cast<uintptr_t>(x->data_ptr()),
               ms = reinterpret_cast<uintptr_t>(m->data_ptr());
    if (guided) {
      step_guided_uniform(k, o, xs, ms, scale_image, scale_pose);
    } else {
      step(k, o, xs, ms);
    }
    return result;
  }
};

PyBoundStep bind_plan(const py::object& plan_obj, const py::object& sample, int64_t frames, uintptr_t history,
                      uintptr_t saved_sample, uintptr_t accumulator, const py::object& state_owner,
                      int num_threads) {
  const PyPlan& p = plan_obj.cast<const PyPlan&>();
  if (!THPVariable_Check(sample.ptr())) bad("sample must be a torch tensor");
  const at::Tensor& t = THPVariable_Unpack(sample.ptr());
  if (t.dim() < 1) bad("sample must have a frame dimension");
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kHalf) bad("sample must be float32 or float16");
  const int64_t numel = t.numel();
  const bool half = t.scalar_type() == at::kHalf;
  if (numel < 1) bad("numel must be >= 1");
  if (frames < 1 || numel % frames != 0) {
    std::ostringstream os;
    os << "sample has " << numel << " elements, not divisible into F=" << frames << " frames";
    bad(os.str());
  }
  PyBoundStep b;
  b.plan_owner = plan_obj;
  b.state_owner = state_owner;
  b.plan = &p.plan;
  b.frames = frames;
  b.num_threads = num_threads;
  b.uniform_image.assign(static_cast<size_t>(frames), 0.f);
  b.uniform_pose.assign(static_cast<size_t>(frames), 0.f);
  b.buf.dtype = half ? sch::DType::kFloat16 : sch::DType::kFloat32;
  b.buf.numel = numel;
  b.sizes.assign(t.sizes().begin(), t.sizes().end());
  b.dtype = t.scalar_type();
  if (p.plan.num_history_slots > 0) {
    if (!history) bad("history is required");
    for (int j = 0; j < p.plan.num_history_slots; ++j)
      b.buf.history[j] = reinterpret_cast<float*>(history) + j * numel;
  }
  if (p.plan.uses_saved_sample) {
    if (!saved_sample) bad("saved_sample is required");
    b.buf.saved_sample = reinterpret_cast<float*>(saved_sample);
  }
  if (p.plan.uses_accumulator) {
    if (!accumulator) bad("accumulator is required");
    b.buf.accumulator = reinterpret_cast<float*>(accumulator);
  }
  return b;
}

}  // namespace

void register_scheduler(py::module_& m) {
  py::class_<sch::Config>(m, "SchedulerConfig", "Options of the C++ scheduler core (a plain struct).")
      .def(py::init<>())
      .def_property(
          "kind", [](const sch::Config& c) { return enum_name(c.kind, kKinds); },
          [](sch::Config& c, const std::string& v) { c.kind = parse_enum("scheduler", v, kKinds); })
      .def_readwrite("num_train_timesteps", &sch::Config::num_train_timesteps)
      .def_readwrite("beta_start", &sch::Config::beta_start)
      .def_readwrite("beta_end", &sch::Config::beta_end)
      .def_property(
          "beta_schedule", [](const sch::Config& c) { return enum_name(c.beta_schedule, kBetas); },
          [](sch::Config& c, const std::string& v) { c.beta_schedule = parse_enum("beta_schedule", v, kBetas); })
      .def_property(
          "prediction_type", [](const sch::Config& c) { return enum_name(c.prediction_type, kPredictions); },
          [](sch::Config& c, const std::string& v) {
            c.prediction_type = parse_enum("prediction_type", v, kPredictions);
          })
      .def_property(
          "timestep_spacing", [](const sch::Config& c) { return enum_name(c.timestep_spacing, kSpacings); },
          [](sch::Config& c, const std::string& v) {
            c.timestep_spacing = parse_enum("timestep_spacing", v, kSpacings);
          })
      .def_readwrite("steps_offset", &sch::Config::steps_offset)
      .def_readwrite("set_alpha_to_one", &sch::Config::set_alpha_to_one)
      .def_readwrite("skip_prk_steps", &sch::Config::skip_prk_steps)
      .def_readwrite("solver_order", &sch::Config::solver_order)
      .def_property(
          "solver_type", [](const sch::Config& c) { return enum_name(c.solver_type, kSolverTypes); },
          [](sch::Config& c, const std::string& v) { c.solver_type = parse_enum("solver_type", v, kSolverTypes); })
      .def_readwrite("lower_order_final", &sch::Config::lower_order_final)
      .def_readwrite("euler_at_final", &sch::Config::euler_at_final)
      .def_property(
          "final_sigmas_type", [](const sch::Config& c) { return enum_name(c.final_sigmas_type, kFinalSigmas); },
          [](sch::Config& c, const std::string& v) {
            c.final_sigmas_type = parse_enum("final_sigmas_type", v, kFinalSigmas);
          });

  py::class_<PyPlan>(m, "SchedulerPlan", "One run of a scheduler: timesteps and per-step coefficients.")
      .def_property_readonly("timesteps", [](const PyPlan& p) { return p.plan.timesteps; })
      .def_property_readonly("num_history_slots", [](const PyPlan& p) { return p.plan.num_history_slots; })
      .def_property_readonly("uses_saved_sample", [](const PyPlan& p) { return p.plan.uses_saved_sample; })
      .def_property_readonly("uses_accumulator", [](const PyPlan& p) { return p.plan.uses_accumulator; })
      .def("table", &PyPlan::table, "Row-major float32 bytes, (num_steps, num_columns).")
      .def("step", &PyPlan::step, py::arg("k"), py::arg("out"), py::arg("sample"), py::arg("model_output"),
           py::arg("history") = py::none(), py::arg("saved_sample") = py::none(),
           py::arg("accumulator") = py::none(), py::arg("scale_image") = py::none(),
           py::arg("scale_pose") = py::none(), py::arg("num_threads") = 0,
           "Apply step k: out = row k applied to the buffers; updates history/saved_sample/accumulator.");

  py::class_<PyBoundStep>(m, "SchedulerBoundStep",
                          "A run's step bound to its state buffers (internal: takes raw data pointers that the "
                          "caller has checked against the bound numel, dtype and frames).")
      .def("step", &PyBoundStep::step, py::arg("k"), py::arg("out"), py::arg("sample"), py::arg("model_output"))
      .def("step_guided", &PyBoundStep::step_guided, py::arg("k"), py::arg("out"), py::arg("sample"),
           py::arg("model_output"), py::arg("scale_image"), py::arg("scale_pose"))
      .def("step_guided_uniform", &PyBoundStep::step_guided_uniform, py::arg("k"), py::arg("out"),
           py::arg("sample"), py::arg("model_output"), py::arg("scale_image"), py::arg("scale_pose"))
      .def("set_plan", &PyBoundStep::set_plan, py::arg("plan"),
           "Use another plan with the same buffers (checked: the plan needs no buffer that is not bound).")
      .def("step_tensors", &PyBoundStep::step_tensors, py::arg("k"), py::arg("out"), py::arg("sample"),
           py::arg("model_output"), py::arg("guided") = false, py::arg("scale_image") = 0.0,
           py::arg("scale_pose") = 0.0,
           "Step k on tensors that match the binding (out None: a new tensor); the tensor written, or None "
           "when a tensor does not match.");
  m.def("scheduler_bind", &bind_plan, py::arg("plan"), py::arg("sample"), py::arg("frames"), py::arg("history"),
        py::arg("saved_sample"), py::arg("accumulator"), py::arg("state_owner"), py::arg("num_threads") = 0,
        "Bind a plan to a run's fp32 state buffers (data pointers; 0 for an unused buffer) for samples shaped "
        "and typed like `sample`.");

  m.def("scheduler_make_plan", [](const sch::Config& cfg, int n) { return PyPlan{sch::make_plan(cfg, n)}; },
        py::arg("config"), py::arg("num_inference_steps"));
  m.def("scheduler_timesteps", &sch::timesteps, py::arg("config"), py::arg("num_inference_steps"));
  m.def("scheduler_alphas_cumprod", &sch::alphas_cumprod, py::arg("config"));
  m.def("scheduler_table_columns", []() {
    std::vector<std::string> names(std::begin(sch::kTableColumns), std::end(sch::kTableColumns));
    return names;
  });
  m.def("half_to_float", &sch::half_to_float);
  m.def("float_to_half", &sch::float_to_half);
  // Bulk conversion of a buffer (what the data plane uses): (src, dst) of equal numel.
  m.def("convert_half_to_float", [](const py::object& src, const py::object& dst) {
    const View s = view_of(src, "src", false, false), d = view_of(dst, "dst", true, true);
    if (!s.half || s.numel != d.numel) bad("src must be float16 with as many elements as dst");
    sch::convert_half_to_float(static_cast<const uint16_t*>(s.ptr), static_cast<float*>(d.ptr), s.numel);
  });
  m.def("convert_float_to_half", [](const py::object& src, const py::object& dst) {
    const View s = view_of(src, "src", false, true), d = view_of(dst, "dst", true, false);
    if (!d.half || s.numel != d.numel) bad("dst must be float16 with as many elements as src");
    sch::convert_float_to_half(static_cast<const float*>(s.ptr), static_cast<uint16_t*>(d.ptr), s.numel);
  });
}
