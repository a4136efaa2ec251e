// pybind11 glue of the scheduler, the one file of the scheduler that talks to torch: converts the
// options, checks the tensor arguments (each error names the tensor: tensor_args.h) and fills the
// plain structs of scheduler/schedule.h and scheduler/step_kernel.h; the core (scheduler/*) is plain
// C++17 and knows nothing of torch or Python.
//
// One entry for a step: scheduler_bind(plan, *, sample, frames, history, saved_sample, accumulator,
// num_threads) checks the run's fp32 state tensors once and returns a SchedulerBoundStep, whose
// step(k, sample, model_output, out=None, scale_image=None, scale_pose=None, guidance_cache=None) is the
// per-step call.
// Reading a tensor's dtype, device, sizes and contiguity from C++ costs nanoseconds (from Python about
// 1 us a step). The per-step caller passes step()'s arguments by position: pybind11 matches keyword
// arguments at ~0.4 us a call, more than the rest of the call (~0.25 us).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "registry.h"
#include "scheduler/columns.h"
#include "scheduler/schedule.h"
#include "scheduler/step_kernel.h"
#include "tensor_args.h"

namespace py = pybind11;
namespace sch = dreampose_rt::scheduler;
namespace args = dreampose_rt::args;

namespace {

using args::bad;

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
};

// A run's step bound to its state once (the fast path of DiffusionScheduler.step): the plan, the
// run's fp32 state tensors (kept alive here), the sample's sizes and dtype, and the frame count are
// checked and fixed by scheduler_bind; each step() then only checks that its tensors match them.
struct PyBoundStep {
  py::object plan_owner;  // the SchedulerPlan (its rows are read)
  const sch::Plan* plan = nullptr;
  at::Tensor history, saved_sample, accumulator;  // the run's fp32 state (undefined when unused)
  sch::StepBuffers buf;  // the state pointers, dtype and numel (out/sample/model_output set per step)
  int64_t frames = 1;
  std::vector<float> uniform_image, uniform_pose;  // scratch for scales given as one value
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

  void run(const sch::StepRow& r, void* out, const void* sample, const void* model_output,
           const sch::Guidance& g) const {
    sch::StepBuffers b = buf;
    b.out = out;
    b.sample = sample;
    b.model_output = model_output;
    // Below ~64K elements the step takes a few us: releasing the GIL would cost more than it frees.
    if (b.numel >= (int64_t(1) << 16)) {
      py::gil_scoped_release release;
      sch::apply_step(r, b, g, num_threads);
    } else {
      sch::apply_step(r, b, g, num_threads);
    }
  }

  // The F guidance scales of `s` (named `name`): a Python float or int (the same for every frame,
  // rounded to float32 as torch.full(..., dtype=torch.float32) does), or a CPU float32 tensor of F or
  // 1 values. A single value is spread over `uniform`.
  const float* scales(py::handle s, const char* name, std::vector<float>& uniform) const {
    PyObject* o = s.ptr();
    float value;
    if (PyFloat_Check(o) || (PyLong_Check(o) && !PyBool_Check(o))) {
      const double v = PyFloat_AsDouble(o);
      if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
      value = static_cast<float>(v);
    } else {
      if (!THPVariable_Check(o))
        bad(std::string(name) + " must be a float or a CPU float32 tensor, got " + Py_TYPE(o)->tp_name);
      const at::Tensor& t = THPVariable_Unpack(o);
      args::check_cpu_contiguous(t, name, {at::kFloat});
      if (t.numel() == frames) return t.data_ptr<float>();
      if (t.numel() != 1) {
        std::ostringstream os;
        os << "1 or " << frames << " (one per frame)";
        args::check_numel(t, frames, name, os.str());
      }
      value = *t.data_ptr<float>();
    }
    std::fill(uniform.begin(), uniform.end(), value);
    return uniform.data();
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

  // The guidance cache `obj` of a step on sample x, model output m and out o (o: null for an output
  // the binding allocates or recycles, which nothing else can see): a CPU float32 contiguous tensor of
  // shape (2, *sample shape) (d_I then d_P) that overlaps none of the step's other tensors.
  float* cache_arg(py::handle obj, const at::Tensor& x, const at::Tensor& m, const at::Tensor* o) const {
    const char* name = "guidance_cache";
    const at::Tensor& c = args::tensor(obj, name);
    args::check_cpu_contiguous(c, name, {at::kFloat});
    std::vector<int64_t> want{2};
    want.insert(want.end(), sizes.begin(), sizes.end());
    if (c.sizes() != at::IntArrayRef(want))
      bad(std::string(name) + " has shape " + args::shape_str(c.sizes()) + ", expected " + args::shape_str(want) +
          " (d_I and d_P, each shaped like the sample)");
    args::check_no_overlap(c, name, x, "sample");
    args::check_no_overlap(c, name, m, "model_output");
    if (o != nullptr) args::check_no_overlap(c, name, *o, "out");
    args::check_no_overlap(c, name, history, "the scheduler's history");
    args::check_no_overlap(c, name, saved_sample, "the scheduler's saved sample");
    args::check_no_overlap(c, name, accumulator, "the scheduler's accumulator");
    return c.data_ptr<float>();
  }

  // Step k: writes prev_sample into `out` (None: a new tensor, or a recycled earlier output) and
  // updates the state. Unguided when both scales are None; guided when both are given: model_output
  // holds the three branches (3F rows), or with guidance_cache given either the three branches (a
  // refresh step: the guidance differences are also written to the cache) or the sample's F rows (a
  // cached step: e(I,P) alone, combined with the cache). Returns the tensor written, or None when
  // sample, model_output or out does not match the binding (another dtype, device, shape or layout, a
  // tensor subclass): the caller then takes its checked path, which re-binds or names the problem.
  py::object step(int64_t k, py::handle sample, py::handle model_output, py::handle out, py::handle scale_image,
                  py::handle scale_pose, py::handle guidance_cache) {
    const bool guided = !scale_image.is_none() || !scale_pose.is_none();
    const bool has_cache = !guidance_cache.is_none();
    const at::Tensor* x = match(sample.ptr(), 1);
    const at::Tensor* m = x ? match(model_output.ptr(), guided ? 3 : 1) : nullptr;
    bool cached = false;
    if (m == nullptr && x != nullptr && guided) {
      m = match(model_output.ptr(), 1);  // the sample's F rows: a cached step (e(I,P) alone)
      if (m != nullptr && !has_cache) {
        std::vector<int64_t> full(sizes);
        full[0] *= 3;
        bad("guidance_cache is required: model_output has shape " + args::shape_str(m->sizes()) +
            ", the sample's " + std::to_string(sizes[0]) + " rows (a cached step: e(I,P) alone); without a " +
            "cache it holds the three branches, expected " + args::shape_str(full));
      }
      cached = m != nullptr;
    }
    if (m == nullptr) return py::none();
    const at::Tensor* o = nullptr;
    if (!out.is_none()) {
      o = match(out.ptr(), 1);
      if (o == nullptr) return py::none();
    }
    const sch::StepRow& r = row(k);
    sch::Guidance g;
    if (has_cache && !guided)
      bad("guidance_cache is given but the step is not guided (pass scale_image and scale_pose)");
    if (guided) {
      if (scale_image.is_none() || scale_pose.is_none())
        bad("scale_image and scale_pose must be given together (a guided step) or both be None");
      g.enabled = true;
      g.frames = frames;
      g.frame_numel = buf.numel / frames;
      g.scale_image = scales(scale_image, "scale_image", uniform_image);
      g.scale_pose = scales(scale_pose, "scale_pose", uniform_pose);
      if (has_cache) {
        g.cache = cache_arg(guidance_cache, *x, *m, o);
        g.cache_mode = cached ? sch::CacheMode::kCached : sch::CacheMode::kRefresh;
      }
    }
    py::object result;
    void* out_ptr;
    if (o == nullptr) {
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
      out_ptr = o->data_ptr();
      result = py::reinterpret_borrow<py::object>(out);
    }
    run(r, out_ptr, x->data_ptr(), m->data_ptr(), g);
    return result;
  }
};

// A state tensor argument: undefined for None, else a checked CPU float32 contiguous tensor.
at::Tensor state_arg(py::handle obj, const char* name) {
  if (obj.is_none()) return at::Tensor();
  const at::Tensor& t = args::tensor(obj, name);
  args::check_cpu_contiguous(t, name, {at::kFloat});
  return t;
}

// Checks a state buffer against the plan's needs: required and of `want` elements when `used`,
// None otherwise.
void check_state(const at::Tensor& t, bool used, int64_t want, const char* name, const std::string& expected,
                 const char* what) {
  if (!used) {
    if (t.defined()) bad(std::string(name) + " is given but the plan does not use " + what + " (pass None)");
    return;
  }
  if (!t.defined()) bad(std::string(name) + " is required: the plan uses " + what + " (" + expected + ")");
  args::check_numel(t, want, name, expected);
}

PyBoundStep bind_plan(const py::object& plan_obj, py::handle sample, int64_t frames, py::handle history,
                      py::handle saved_sample, py::handle accumulator, int num_threads) {
  const PyPlan& p = plan_obj.cast<const PyPlan&>();
  const at::Tensor& t = args::tensor(sample, "sample");
  args::check_cpu_contiguous(t, "sample", {at::kFloat, at::kHalf});
  if (t.dim() < 1) bad("sample must have a frame dimension, got a 0-d tensor");
  const int64_t numel = t.numel();
  if (numel < 1) bad("sample has no elements");
  if (frames < 1 || numel % frames != 0) {
    std::ostringstream os;
    os << "sample has " << numel << " elements, not divisible into frames=" << frames;
    bad(os.str());
  }
  if (num_threads < 0) bad("num_threads must be >= 0, got " + std::to_string(num_threads));
  PyBoundStep b;
  b.plan_owner = plan_obj;
  b.plan = &p.plan;
  b.frames = frames;
  b.num_threads = num_threads;
  b.uniform_image.assign(static_cast<size_t>(frames), 0.f);
  b.uniform_pose.assign(static_cast<size_t>(frames), 0.f);
  b.buf.dtype = t.scalar_type() == at::kHalf ? sch::DType::kFloat16 : sch::DType::kFloat32;
  b.buf.numel = numel;
  b.sizes.assign(t.sizes().begin(), t.sizes().end());
  b.dtype = t.scalar_type();

  const int slots = p.plan.num_history_slots;
  b.history = state_arg(history, "history");
  std::ostringstream hist;
  hist << slots << " x " << numel << " (num_history_slots x sample numel)";
  check_state(b.history, slots > 0, slots * numel, "history", hist.str(), "a history of past outputs");
  for (int j = 0; j < slots; ++j) b.buf.history[j] = b.history.data_ptr<float>() + j * numel;

  const std::string one_each = std::to_string(numel) + " (one per sample element)";
  b.saved_sample = state_arg(saved_sample, "saved_sample");
  check_state(b.saved_sample, p.plan.uses_saved_sample, numel, "saved_sample", one_each, "a saved sample");
  if (p.plan.uses_saved_sample) b.buf.saved_sample = b.saved_sample.data_ptr<float>();

  b.accumulator = state_arg(accumulator, "accumulator");
  check_state(b.accumulator, p.plan.uses_accumulator, numel, "accumulator", one_each, "an accumulator");
  if (p.plan.uses_accumulator) b.buf.accumulator = b.accumulator.data_ptr<float>();
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
      .def("table", &PyPlan::table, "Row-major float32 bytes, (num_steps, num_columns).");

  py::class_<PyBoundStep>(m, "SchedulerBoundStep",
                          "A run's step bound to its plan and fp32 state tensors (made by scheduler_bind).")
      .def("step", &PyBoundStep::step, py::arg("k"), py::arg("sample"), py::arg("model_output"),
           py::arg("out") = py::none(), py::arg("scale_image") = py::none(), py::arg("scale_pose") = py::none(),
           py::arg("guidance_cache") = py::none(),
           "Step k of the plan on CPU tensors like the bound sample: writes prev_sample into `out` (None: a new "
           "tensor) and updates the state. Guided when scale_image and scale_pose are given (floats, or CPU "
           "float32 tensors of F or 1 values; model_output then holds 3F rows, branch-major). guidance_cache "
           "(guided steps only): a CPU float32 contiguous tensor (2, *sample.shape), d_I then d_P; with 3F rows "
           "of model_output the step refreshes it (writes e(I,0) - e(0,0) and e(I,P) - e(I,0)), with the "
           "sample's F rows (e(I,P) alone) the step reads it (a cached step; the cache is then required). "
           "Returns the tensor written, or None when sample, model_output or out does not match the binding. "
           "(Keywords work; a per-step caller passes the arguments by position: pybind11 matches keywords at "
           "~0.4 us a call.)")
      .def("set_plan", &PyBoundStep::set_plan, py::arg("plan"),
           "Use another plan with the same buffers (checked: the plan needs no buffer that is not bound).");
  m.def("scheduler_bind", &bind_plan, py::arg("plan"), py::kw_only(), py::arg("sample"), py::arg("frames"),
        py::arg("history"), py::arg("saved_sample"), py::arg("accumulator"), py::arg("num_threads") = 0,
        "Bind a plan to a run's fp32 state tensors (CPU, contiguous; None for a buffer the plan does not use: "
        "history num_history_slots x sample numel elements, saved_sample and accumulator sample numel each) "
        "for samples shaped and typed like `sample` (CPU float32 or float16, `frames` frames). Checks every "
        "tensor (errors name it) and keeps the state tensors alive.");

  m.def("scheduler_make_plan", [](const sch::Config& cfg, int n) { return PyPlan{sch::make_plan(cfg, n)}; },
        py::arg("config"), py::arg("num_inference_steps"));
  m.def("scheduler_timesteps", &sch::timesteps, py::arg("config"), py::arg("num_inference_steps"));
  m.def("scheduler_alphas_cumprod", &sch::alphas_cumprod, py::arg("config"));
  m.def("scheduler_table_columns", []() {
    std::vector<std::string> names(std::begin(sch::kTableColumns), std::end(sch::kTableColumns));
    return names;
  });
}
