// Scheduler control plane: noise schedules, timesteps and the per-step coefficient plan.
// Plain C++17, no Python and no torch. Mirrors diffusers 0.42 (PNDMScheduler, DDIMScheduler with
// eta = 0, DPMSolverMultistepScheduler with algorithm_type = "dpmsolver++").
//
// Every step of the three samplers is linear in a handful of buffers, so a run is fully described
// by one StepRow per step (see dreampose_rt/scheduler/table.py for the column layout):
//
//   m   = model output (already guided)                    x = current sample
//   q   = qx * x + qm * m                                  (converted output: eps or x0-prediction)
//   out = ox*x + om*m + oq*q + os*S + sum_j oh[j]*H[j] + oa*A
//   then: H[write_slot] = q (if write_slot >= 0); S = x (if save_sample); A = akeep*A + am*m
//
// H: ring of kMaxHistory fp32 buffers of past q, S: saved sample, A: accumulator (PNDM's
// Runge-Kutta sum). A term whose coefficient is exactly 0 is never read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dreampose_rt {
namespace scheduler {

constexpr int kMaxHistory = 3;

enum class Kind { kPNDM = 0, kDDIM = 1, kDPMSolverPP = 2 };
enum class BetaSchedule { kLinear = 0, kScaledLinear = 1, kSquaredCosCapV2 = 2 };
enum class Spacing { kLeading = 0, kTrailing = 1, kLinspace = 2 };
enum class Prediction { kEpsilon = 0, kVPrediction = 1 };
enum class SolverType { kMidpoint = 0, kHeun = 1 };
enum class FinalSigmas { kZero = 0, kSigmaMin = 1 };

// Options of all three samplers (each uses the ones that apply to it). Defaults are diffusers'
// PNDMScheduler defaults; the Python layer fills every field explicitly.
struct Config {
  Kind kind = Kind::kPNDM;
  int num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::kLinear;
  Prediction prediction_type = Prediction::kEpsilon;
  Spacing timestep_spacing = Spacing::kLeading;
  int steps_offset = 0;
  bool set_alpha_to_one = false;  // PNDM, DDIM
  bool skip_prk_steps = false;    // PNDM
  int solver_order = 2;           // DPM-Solver++: 1 or 2
  SolverType solver_type = SolverType::kMidpoint;
  bool lower_order_final = true;
  bool euler_at_final = false;
  FinalSigmas final_sigmas_type = FinalSigmas::kZero;
};

// Coefficients of one step (fp32, as the data plane and a GPU kernel apply them).
struct StepRow {
  int64_t timestep = 0;  // the timestep the model is evaluated at for this step
  float qx = 0.f, qm = 0.f;
  float ox = 0.f, om = 0.f, oq = 0.f, os = 0.f;
  float oh[kMaxHistory] = {0.f, 0.f, 0.f};
  float oa = 0.f;
  float akeep = 0.f, am = 0.f;
  int write_slot = -1;  // -1: q is not kept
  bool save_sample = false;
};

struct Plan {
  std::vector<int64_t> timesteps;
  std::vector<StepRow> rows;  // rows.size() == timesteps.size()
  int num_history_slots = 0;  // slots 0..num_history_slots-1 are used
  bool uses_saved_sample = false;
  bool uses_accumulator = false;
};

// Throws std::invalid_argument naming the option when the config is not supported.
void validate(const Config& cfg);
// Betas and their cumulative product of (1 - beta), both fp32 like diffusers (length T).
std::vector<float> betas(const Config& cfg);
std::vector<float> alphas_cumprod(const Config& cfg);
// The timesteps diffusers' set_timesteps(n) gives for cfg.kind (validates n).
std::vector<int64_t> timesteps(const Config& cfg, int num_inference_steps);
// The whole run: timesteps plus one StepRow per step.
Plan make_plan(const Config& cfg, int num_inference_steps);

}  // namespace scheduler
}  // namespace dreampose_rt
