// Control plane of the scheduler: see schedule.h. Scalar arithmetic that diffusers performs on
// fp32 0-d tensors is done here in float too (same roundings); the per-buffer weights are then
// combined in double and rounded to fp32 once.
#include "scheduler/schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace dreampose_rt {
namespace scheduler {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// log/exp as fp32 tensors give them: the correctly rounded result (computed in double, rounded).
float flog(float x) { return static_cast<float>(std::log(static_cast<double>(x))); }
float fexp(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }

// numpy.linspace(start, stop, num) with endpoint=True, in float64.
std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> y(static_cast<size_t>(std::max<int64_t>(num, 0)));
  const int64_t div = num - 1;
  const double delta = stop - start;
  if (div > 0) {
    const double step = delta / static_cast<double>(div);
    for (int64_t i = 0; i < num; ++i) {
      y[i] = (step == 0.0) ? (static_cast<double>(i) / div) * delta : static_cast<double>(i) * step;
      y[i] += start;
    }
    y[num - 1] = stop;
  } else {
    for (int64_t i = 0; i < num; ++i) y[i] = static_cast<double>(i) * delta + start;
  }
  return y;
}

// numpy.arange(start, stop, step) for floats: length ceil((stop - start) / step), values
// start + i * ((start + step) - start).
std::vector<double> np_arange(double start, double stop, double step) {
  const double len_f = std::ceil((stop - start) / step);
  const int64_t len = len_f > 0 ? static_cast<int64_t>(len_f) : 0;
  std::vector<double> y(static_cast<size_t>(len));
  if (len == 0) return y;
  y[0] = start;
  if (len == 1) return y;
  const double delta = (start + step) - start;
  for (int64_t i = 1; i < len; ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

int64_t np_round(double v) { return static_cast<int64_t>(std::nearbyint(v)); }  // half to even

double alpha_at(const std::vector<float>& ac, int64_t t, const char* what) {
  if (t < 0 || t >= static_cast<int64_t>(ac.size())) {
    std::ostringstream os;
    os << what << " " << t << " is outside [0, " << ac.size() - 1 << "]";
    fail(os.str());
  }
  return ac[static_cast<size_t>(t)];
}

// ---------------------------------------------------------------------------------------------
// PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as diffusers runs it.
// ---------------------------------------------------------------------------------------------

// Eq. (9) of the PNDM paper: x_prev = c_s * x - c_e * e, with v-prediction folded in.
// Returns {weight of the sample it is applied to, weight of e}.
std::pair<double, double> pndm_transfer(const Config& cfg, const std::vector<float>& ac,
                                        float final_alpha, int64_t t, int64_t prev_t) {
  const float a_t = static_cast<float>(alpha_at(ac, t, "timestep"));
  const float a_prev = prev_t >= 0 ? static_cast<float>(alpha_at(ac, prev_t, "previous timestep"))
                                   : final_alpha;
  const float b_t = 1.f - a_t;
  const float b_prev = 1.f - a_prev;
  const float sample_coeff = std::sqrt(a_prev / a_t);
  const float denom = a_t * std::sqrt(b_prev) + std::sqrt(a_t * b_t * a_prev);
  const double c_e = static_cast<double>(a_prev - a_t) / static_cast<double>(denom);
  double c_x = sample_coeff;
  double c_m = -c_e;
  if (cfg.prediction_type == Prediction::kVPrediction) {
    // e' = sqrt(a_t) * e + sqrt(b_t) * x
    c_x += -c_e * static_cast<double>(std::sqrt(b_t));
    c_m = -c_e * static_cast<double>(std::sqrt(a_t));
  }
  return {c_x, c_m};
}

void pndm_plan(const Config& cfg, int n, const std::vector<float>& ac, Plan* plan) {
  const float final_alpha = cfg.set_alpha_to_one ? 1.f : ac[0];
  const int64_t ratio = cfg.num_train_timesteps / n;
  const auto& ts = plan->timesteps;
  const int64_t num_prk = cfg.skip_prk_steps ? 0 : 12;
  std::vector<int> past;  // slots of diffusers' `ets` entries, oldest first (at most 3)
  std::vector<int> free_slots = {0, 1, 2};
  auto store_q = [&](StepRow* row) {
    int slot;
    if (past.size() == kMaxHistory) {
      slot = past.front();
      past.erase(past.begin());
    } else {
      slot = free_slots.front();
      free_slots.erase(free_slots.begin());
    }
    row->write_slot = slot;
    past.push_back(slot);
  };
  for (int64_t c = 0; c < static_cast<int64_t>(ts.size()); ++c) {
    StepRow row;
    row.timestep = ts[c];
    row.qx = 0.f;  // q = m: PNDM keeps raw model outputs
    row.qm = 1.f;
    double w_q = 0.0, w_a = 0.0;  // e = w_q * q + sum w_h * H + w_a * A
    double w_h[kMaxHistory] = {0.0, 0.0, 0.0};
    bool from_saved = false;  // the update is applied to S instead of x
    int64_t t = ts[c], prev_t;
    if (c < num_prk) {
      // Runge-Kutta warm-up (PNDM paper, Alg. 1): 4 evaluations per step, e = (k1 + 2k2 + 2k3 + k4)/6
      const int64_t diff = (c % 2) ? 0 : cfg.num_train_timesteps / n / 2;
      prev_t = t - diff;
      t = ts[c / 4 * 4];
      switch (c % 4) {
        case 0:
          w_q = 1.0;
          row.akeep = 0.f;
          row.am = static_cast<float>(1.0 / 6.0);
          row.save_sample = true;
          break;
        case 1:
        case 2:
          w_q = 1.0;
          from_saved = true;
          row.akeep = 1.f;
          row.am = static_cast<float>(1.0 / 3.0);
          break;
        default:
          w_a = 1.0;
          w_q = 1.0 / 6.0;
          from_saved = true;
          row.akeep = 0.f;
          row.am = 0.f;
          break;
      }
      if (c % 4 == 0) {
        // ets.append(model_output): weights are unaffected, q is stored after the update.
        int slot = free_slots.front();
        free_slots.erase(free_slots.begin());
        row.write_slot = slot;
        past.push_back(slot);
      }
    } else {
      // Linear multistep (PLMS): Adams-Bashforth of order len(ets), eq. (12) of the paper.
      prev_t = t - ratio;
      const bool appended = (c != 1);
      if (!appended) {
        prev_t = t;
        t = t + ratio;
      }
      const std::vector<int> hist = past;  // past q before this step
      const size_t len = hist.size() + (appended ? 1 : 0);
      const auto P = [&](size_t back) { return hist[hist.size() - back]; };  // P(1) newest
      if (len == 1 && c == 0) {
        w_q = 1.0;
        row.save_sample = true;
      } else if (len == 1 && c == 1) {
        w_q = 0.5;
        w_h[P(1)] = 0.5;
        from_saved = true;
      } else if (len == 2) {
        w_q = 1.5;
        w_h[P(1)] = -0.5;
      } else if (len == 3) {
        w_q = 23.0 / 12.0;
        w_h[P(1)] = -16.0 / 12.0;
        w_h[P(2)] = 5.0 / 12.0;
      } else {
        w_q = 55.0 / 24.0;
        w_h[P(1)] = -59.0 / 24.0;
        w_h[P(2)] = 37.0 / 24.0;
        w_h[P(3)] = -9.0 / 24.0;
      }
      if (appended) store_q(&row);
    }
    const auto coef = pndm_transfer(cfg, ac, final_alpha, t, prev_t);
    (from_saved ? row.os : row.ox) = static_cast<float>(coef.first);
    row.oq = static_cast<float>(coef.second * w_q);
    for (int j = 0; j < kMaxHistory; ++j) row.oh[j] = static_cast<float>(coef.second * w_h[j]);
    row.oa = static_cast<float>(coef.second * w_a);
    plan->rows.push_back(row);
  }
}

// ---------------------------------------------------------------------------------------------
// DDIM (Song et al. 2021), eta = 0: eq. (12) with sigma_t = 0.
// ---------------------------------------------------------------------------------------------
void ddim_plan(const Config& cfg, int n, const std::vector<float>& ac, Plan* plan) {
  const float final_alpha = cfg.set_alpha_to_one ? 1.f : ac[0];
  const int64_t ratio = cfg.num_train_timesteps / n;
  for (int64_t t : plan->timesteps) {
    StepRow row;
    row.timestep = t;
    const int64_t prev_t = t - ratio;
    const float a_t = static_cast<float>(alpha_at(ac, t, "timestep"));
    const float a_prev =
        prev_t >= 0 ? static_cast<float>(alpha_at(ac, prev_t, "previous timestep")) : final_alpha;
    const float b_t = 1.f - a_t;
    const float sa = std::sqrt(a_t), sb = std::sqrt(b_t);
    const float dir = std::sqrt(1.f - a_prev);  // (1 - a_prev - sigma_t^2)^0.5 with sigma_t = 0
    // 1. q = predicted x0;  2. out = sqrt(a_prev) * x0 + dir * eps
    if (cfg.prediction_type == Prediction::kEpsilon) {
      row.qx = static_cast<float>(1.0 / sa);
      row.qm = static_cast<float>(-static_cast<double>(sb) / sa);
      row.om = dir;
    } else {
      row.qx = sa;
      row.qm = -sb;
      row.om = static_cast<float>(static_cast<double>(dir) * sa);  // eps = sa*m + sb*x
      row.ox = static_cast<float>(static_cast<double>(dir) * sb);
    }
    row.oq = std::sqrt(a_prev);
    plan->rows.push_back(row);
  }
}

// ---------------------------------------------------------------------------------------------
// DPM-Solver++ multistep (Lu et al. 2022), data prediction, orders 1 and 2.
// ---------------------------------------------------------------------------------------------
struct AlphaSigma {
  float alpha, sigma, lambda;
};

AlphaSigma alpha_sigma(float sigma) {
  AlphaSigma r;
  r.alpha = 1.f / std::sqrt(sigma * sigma + 1.f);
  r.sigma = sigma * r.alpha;
  r.lambda = (r.sigma == 0.f) ? std::numeric_limits<float>::infinity()
                              : flog(r.alpha) - flog(r.sigma);
  return r;
}

void dpmpp_plan(const Config& cfg, const std::vector<float>& ac, Plan* plan) {
  const auto& ts = plan->timesteps;
  const int64_t n = static_cast<int64_t>(ts.size());
  for (int64_t i = 1; i < n; ++i) {
    if (ts[i] >= ts[i - 1]) {
      std::ostringstream os;
      os << "num_inference_steps=" << n << " with timestep_spacing gives the repeated timestep "
         << ts[i] << "; DPM-Solver++ needs strictly decreasing timesteps";
      fail(os.str());
    }
  }
  // sigma_t = sqrt((1 - a) / a), evaluated in fp32 at the timesteps, then the final sigma.
  std::vector<float> sigmas;
  for (int64_t t : ts) {
    const float a = static_cast<float>(alpha_at(ac, t, "timestep"));
    sigmas.push_back(std::sqrt((1.f - a) / a));
  }
  sigmas.push_back(cfg.final_sigmas_type == FinalSigmas::kZero ? 0.f
                                                               : std::sqrt((1.f - ac[0]) / ac[0]));
  for (int64_t i = 0; i < n; ++i) {
    StepRow row;
    row.timestep = ts[i];
    const bool last = (i == n - 1);
    const bool lower_order_final =
        last && (cfg.euler_at_final || (cfg.lower_order_final && n < 15) ||
                 cfg.final_sigmas_type == FinalSigmas::kZero);
    const bool lower_order_second = (i == n - 2) && cfg.lower_order_final && n < 15;
    (void)lower_order_second;  // only selects order <= 2, which is the highest order here
    const AlphaSigma s0 = alpha_sigma(sigmas[i]);
    const AlphaSigma tt = alpha_sigma(sigmas[i + 1]);
    // q = x0 prediction (convert_model_output)
    if (cfg.prediction_type == Prediction::kEpsilon) {
      row.qx = static_cast<float>(1.0 / s0.alpha);
      row.qm = static_cast<float>(-static_cast<double>(s0.sigma) / s0.alpha);
    } else {
      row.qx = s0.alpha;
      row.qm = -s0.sigma;
    }
    const float h = tt.lambda - s0.lambda;  // inf when the target sigma is 0
    const float em1 = (tt.sigma == 0.f) ? -1.f : fexp(-h) - 1.f;
    const float a_coef = tt.alpha * em1;  // alpha_t * (exp(-h) - 1)
    row.ox = (tt.sigma == 0.f) ? 0.f : tt.sigma / s0.sigma;
    const bool first_order = cfg.solver_order == 1 || i == 0 || lower_order_final;
    if (first_order) {
      // eq. (5) of DPM-Solver++: x_t = sigma_t/sigma_s x - alpha_t (e^-h - 1) x0
      row.oq = -a_coef;
    } else {
      // second-order multistep (DPM-Solver++(2M)): D0 = q, D1 = (q - q_prev) / r0
      const AlphaSigma s1 = alpha_sigma(sigmas[i - 1]);
      const float h0 = s0.lambda - s1.lambda;
      const float inv_r0 = 1.f / (h0 / h);
      double w_d1;
      if (cfg.solver_type == SolverType::kMidpoint) {
        w_d1 = -static_cast<double>(0.5f * a_coef);
      } else {
        w_d1 = static_cast<double>(tt.alpha * (em1 / h + 1.f));
      }
      row.oq = static_cast<float>(-static_cast<double>(a_coef) + w_d1 * inv_r0);
      row.oh[0] = static_cast<float>(-w_d1 * inv_r0);
    }
    if (cfg.solver_order == 2) row.write_slot = 0;
    plan->rows.push_back(row);
  }
}

}  // namespace

void validate(const Config& cfg) {
  std::ostringstream os;
  if (cfg.num_train_timesteps < 1) {
    os << "num_train_timesteps must be >= 1, got " << cfg.num_train_timesteps;
    fail(os.str());
  }
  if (!(cfg.beta_start > 0.0) || !(cfg.beta_end > 0.0) || !(cfg.beta_end < 1.0)) {
    os << "beta_start and beta_end must be in (0, 1), got beta_start=" << cfg.beta_start
       << ", beta_end=" << cfg.beta_end;
    fail(os.str());
  }
  if (cfg.steps_offset < 0) {
    os << "steps_offset must be >= 0, got " << cfg.steps_offset;
    fail(os.str());
  }
  if (cfg.kind == Kind::kDPMSolverPP && cfg.solver_order != 1 && cfg.solver_order != 2) {
    os << "solver_order must be 1 or 2, got " << cfg.solver_order;
    fail(os.str());
  }
}

// torch.linspace(start, end, T, dtype=float32): fp32 endpoints and step, each value formed with one
// rounding from the nearer end (bit-identical to torch's CPU kernel).
std::vector<float> torch_linspace_f32(double start, double end, int T) {
  std::vector<float> v(static_cast<size_t>(T));
  if (T == 1) {
    v[0] = static_cast<float>(start);
    return v;
  }
  const float s = static_cast<float>(start), e = static_cast<float>(end);
  const float step = (e - s) / static_cast<float>(T - 1);
  for (int i = 0; i < T; ++i) {
    v[i] = i < T / 2 ? static_cast<float>(static_cast<double>(s) + static_cast<double>(step) * i)
                     : static_cast<float>(static_cast<double>(e) - static_cast<double>(step) * (T - 1 - i));
  }
  return v;
}

std::vector<float> betas(const Config& cfg) {
  validate(cfg);
  const int T = cfg.num_train_timesteps;
  std::vector<float> b;
  switch (cfg.beta_schedule) {
    case BetaSchedule::kLinear:
      b = torch_linspace_f32(cfg.beta_start, cfg.beta_end, T);
      break;
    case BetaSchedule::kScaledLinear:
      b = torch_linspace_f32(std::sqrt(cfg.beta_start), std::sqrt(cfg.beta_end), T);
      for (float& r : b) r = r * r;
      break;
    case BetaSchedule::kSquaredCosCapV2: {
      // Nichol & Dhariwal 2021, eq. (17): alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2)
      const double pi = 3.14159265358979323846;
      auto alpha_bar = [&](double t) {
        const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
        return c * c;
      };
      b.resize(static_cast<size_t>(T));
      for (int i = 0; i < T; ++i) {
        const double t1 = static_cast<double>(i) / T, t2 = static_cast<double>(i + 1) / T;
        b[i] = static_cast<float>(std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), 0.999));
      }
      break;
    }
  }
  return b;
}

std::vector<float> alphas_cumprod(const Config& cfg) {
  const std::vector<float> b = betas(cfg);
  std::vector<float> ac(b.size());
  double prod = 1.0;  // torch's CPU cumprod accumulates fp32 in double
  for (size_t i = 0; i < b.size(); ++i) {
    prod *= static_cast<double>(1.f - b[i]);
    ac[i] = static_cast<float>(prod);
  }
  return ac;
}

std::vector<int64_t> timesteps(const Config& cfg, int n) {
  validate(cfg);
  const int64_t T = cfg.num_train_timesteps;
  if (n < 1 || n > T) {
    std::ostringstream os;
    os << "num_inference_steps must be in [1, num_train_timesteps=" << T << "], got " << n;
    fail(os.str());
  }
  std::vector<int64_t> out;
  if (cfg.kind == Kind::kDPMSolverPP) {
    const int64_t last = T;  // lambda_min_clipped = -inf clips nothing
    switch (cfg.timestep_spacing) {
      case Spacing::kLinspace: {
        const auto v = np_linspace(0.0, static_cast<double>(last - 1), n + 1);
        for (int64_t i = n; i >= 1; --i) out.push_back(np_round(v[i]));
        break;
      }
      case Spacing::kLeading: {
        const int64_t ratio = last / (n + 1);
        for (int64_t i = n; i >= 1; --i) out.push_back(i * ratio + cfg.steps_offset);
        break;
      }
      case Spacing::kTrailing: {
        const double ratio = static_cast<double>(T) / n;
        for (double v : np_arange(static_cast<double>(last), 0.0, -ratio)) out.push_back(np_round(v) - 1);
        break;
      }
    }
    return out;
  }
  // PNDM and DDIM share the base schedule; DDIM keeps it descending, PNDM rearranges it.
  std::vector<int64_t> asc;  // ascending
  switch (cfg.timestep_spacing) {
    case Spacing::kLinspace:
      for (double v : np_linspace(0.0, static_cast<double>(T - 1), n)) asc.push_back(np_round(v));
      break;
    case Spacing::kLeading: {
      const int64_t ratio = T / n;
      for (int64_t i = 0; i < n; ++i) asc.push_back(i * ratio + cfg.steps_offset);
      break;
    }
    case Spacing::kTrailing: {
      const double ratio = static_cast<double>(T) / n;
      const auto v = np_arange(static_cast<double>(T), 0.0, -ratio);
      for (auto it = v.rbegin(); it != v.rend(); ++it) asc.push_back(np_round(*it) - 1);
      break;
    }
  }
  if (cfg.kind == Kind::kDDIM) return std::vector<int64_t>(asc.rbegin(), asc.rend());
  const int64_t m = static_cast<int64_t>(asc.size());
  if (cfg.skip_prk_steps) {
    // plms = concat(b[:-1], b[-2:-1], b[-1:])[::-1]
    std::vector<int64_t> fwd(asc.begin(), asc.end() - 1);
    if (m >= 2) fwd.push_back(asc[m - 2]);
    fwd.push_back(asc[m - 1]);
    return std::vector<int64_t>(fwd.rbegin(), fwd.rend());
  }
  if (m < 4) {
    std::ostringstream os;
    os << "PNDM with the Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= 4, got "
       << n;
    fail(os.str());
  }
  const int64_t half = T / n / 2;
  int64_t a[8];
  for (int k = 0; k < 4; ++k) {
    a[2 * k] = asc[m - 4 + k];
    a[2 * k + 1] = asc[m - 4 + k] + half;
  }
  // prk = a[:-1].repeat(2)[1:-1][::-1] = a6, a5, a5, a4, a4, ..., a1, a1, a0
  out.push_back(a[6]);
  for (int k = 5; k >= 1; --k) {
    out.push_back(a[k]);
    out.push_back(a[k]);
  }
  out.push_back(a[0]);
  for (int64_t i = m - 4; i >= 0; --i) out.push_back(asc[i]);  // plms = b[:-3][::-1]
  return out;
}

Plan make_plan(const Config& cfg, int n) {
  Plan plan;
  plan.timesteps = timesteps(cfg, n);
  const std::vector<float> ac = alphas_cumprod(cfg);
  switch (cfg.kind) {
    case Kind::kPNDM:
      pndm_plan(cfg, n, ac, &plan);
      break;
    case Kind::kDDIM:
      ddim_plan(cfg, n, ac, &plan);
      break;
    case Kind::kDPMSolverPP:
      dpmpp_plan(cfg, ac, &plan);
      break;
  }
  // Nothing reads the state after the last step: do not write it.
  if (!plan.rows.empty()) {
    StepRow& last = plan.rows.back();
    last.write_slot = -1;
    last.save_sample = false;
    last.akeep = 0.f;
    last.am = 0.f;
  }
  for (const StepRow& r : plan.rows) {
    plan.num_history_slots = std::max(plan.num_history_slots, r.write_slot + 1);
    plan.uses_saved_sample = plan.uses_saved_sample || r.save_sample || r.os != 0.f;
    plan.uses_accumulator = plan.uses_accumulator || r.oa != 0.f || r.am != 0.f;
  }
  return plan;
}

}  // namespace scheduler
}  // namespace dreampose_rt
