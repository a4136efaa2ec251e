// See step_kernel.h. Elements are processed in blocks of kBlock: every input is read once into an
// fp32 block, each term of the row is a separate (auto-vectorised) loop over the block, terms with
// a zero coefficient are skipped (their buffers are never read), and the block is written once.
#include "scheduler/step_kernel.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace dreampose_rt {
namespace scheduler {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // zero
  } else {
    // subnormal: normalise the mantissa
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // result is subnormal or zero: value = abs_f * 2^24 rounded to an integer (ties to even)
    if (abs < 0x33000000u) return sign;  // < 2^-25: rounds to 0
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // value = m * 2^(e - 150) = r * 2^-24  =>  r = m >> (126 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  // normal: rebias and round the 13 dropped bits to nearest even
  uint32_t r = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // may carry into the exponent: fine
  return static_cast<uint16_t>(sign | r);
}

namespace {

constexpr int64_t kBlock = 512;
constexpr int64_t kGrainPerThread = int64_t(1) << 16;

template <typename T>
struct IO;
template <>
struct IO<float> {
  static void load(const void* p, int64_t off, int64_t n, float* dst) {
    std::memcpy(dst, static_cast<const float*>(p) + off, sizeof(float) * n);
  }
  static void store(void* p, int64_t off, int64_t n, const float* src) {
    std::memcpy(static_cast<float*>(p) + off, src, sizeof(float) * n);
  }
};
// Branch-free conversions (vectorisable); bit-identical to half_to_float / float_to_half above.
inline float h2f_fast(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa in float position
  const uint32_t exp = em & 0x0f800000u;
  uint32_t bits = em + (112u << 23);                               // rebias 15 -> 127
  bits = exp == 0x0f800000u ? bits + (112u << 23) : bits;          // inf/nan: exponent to 255
  float f;
  std::memcpy(&f, &bits, sizeof f);
  // zero/subnormal: (mantissa * 2^-24) computed exactly as (2^-14 + m*2^-24) - 2^-14
  uint32_t sb = bits + (1u << 23);
  float fs;
  std::memcpy(&fs, &sb, sizeof fs);
  fs -= 6.103515625e-05f;  // 2^-14
  f = exp == 0 ? fs : f;
  uint32_t out;
  std::memcpy(&out, &f, sizeof out);
  out |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

inline uint16_t f2h_fast(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  // normal range: rebias, round to nearest even on the 13 dropped bits
  const uint32_t odd = (x >> 13) & 1u;
  const uint32_t normal = (x + 0xc8000fffu + odd) >> 13;  // + ((15 - 127) << 23) + 0xfff + odd
  // subnormal range: let the fp32 adder round: add 0.5 (2^-1), whose ulp is 2^-24 = the half subnormal ulp
  float f;
  std::memcpy(&f, &x, sizeof f);
  f += 0.5f;
  uint32_t sub;
  std::memcpy(&sub, &f, sizeof sub);
  sub -= 0x3f000000u;
  uint32_t o = x < 0x38800000u ? sub : normal;
  o = x >= 0x477ff000u ? 0x7c00u : o;           // overflow to inf
  o = x > 0x7f800000u ? 0x7e00u : o;            // nan
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <>
struct IO<uint16_t> {
  static void load(const void* p, int64_t off, int64_t n, float* __restrict__ dst) {
    const uint16_t* __restrict__ s = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = h2f_fast(s[i]);
  }
  static void store(void* p, int64_t off, int64_t n, const float* __restrict__ src) {
    uint16_t* __restrict__ d = static_cast<uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f2h_fast(src[i]);
  }
};

alignas(64) const float kZeros[kBlock] = {};

// The fused update of one block: every input read once, q and out written once (to scratch, since
// out may alias x and H[write_slot] may be one of the H read here). The generic form reads every
// term; a term with a zero coefficient (or a missing buffer) reads kZeros, i.e. adds coef * 0.
// No FMA contraction (ISO C++ mode; the avx2 clone does not enable FMA).
//
// Specialised forms drop those coef * 0 terms (s, h0, h1, h2, a) and are bit-identical: each dropped
// term is a signed zero, and in round-to-nearest, inserting zeros into a left-to-right sum changes
// at most the sign of a zero result; adding -0 changes nothing, and adding +0 anywhere is the same
// as adding +0 once at the end (a sum is -0 only if every term is -0). So when some dropped term is
// +0, the specialised form ends with "+ 0.f" (kPlusZero).
template <bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kPlusZero>
__attribute__((always_inline)) inline void fused_block_body(const StepRow& r, int64_t n, const float* __restrict__ x,
                                                            const float* __restrict__ m, const float* __restrict__ s,
                                                            const float* __restrict__ h0, const float* __restrict__ h1,
                                                            const float* __restrict__ h2, const float* __restrict__ a,
                                                            float* __restrict__ q, float* __restrict__ o) {
  const float qx = r.qx, qm = r.qm, ox = r.ox, om = r.om, oq = r.oq, os = r.os;
  const float oh0 = r.oh[0], oh1 = r.oh[1], oh2 = r.oh[2], oa = r.oa;
  for (int64_t k = 0; k < n; ++k) {
    const float qk = qx * x[k] + qm * m[k];
    q[k] = qk;
    float ok = ox * x[k] + om * m[k] + oq * qk;
    if (kS) ok = ok + os * s[k];
    if (kH0) ok = ok + oh0 * h0[k];
    if (kH1) ok = ok + oh1 * h1[k];
    if (kH2) ok = ok + oh2 * h2[k];
    if (kA) ok = ok + oa * a[k];
    if (kPlusZero) ok = ok + 0.f;
    o[k] = ok;
  }
}

using BlockFn = void (*)(const StepRow&, int64_t, const float*, const float*, const float*, const float*,
                         const float*, const float*, const float*, float*, float*);

template <bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kPZ>
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2")))
#endif
void fused_block_avx2(const StepRow& r, int64_t n, const float* x, const float* m, const float* s, const float* h0,
                      const float* h1, const float* h2, const float* a, float* q, float* o) {
  fused_block_body<kS, kH0, kH1, kH2, kA, kPZ>(r, n, x, m, s, h0, h1, h2, a, q, o);
}

template <bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kPZ>
void fused_block_base(const StepRow& r, int64_t n, const float* x, const float* m, const float* s, const float* h0,
                      const float* h1, const float* h2, const float* a, float* q, float* o) {
  fused_block_body<kS, kH0, kH1, kH2, kA, kPZ>(r, n, x, m, s, h0, h1, h2, a, q, o);
}

bool cpu_has_avx2() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

template <int kMask>
BlockFn block_fn() {
  constexpr bool s = kMask & 1, h0 = kMask & 2, h1 = kMask & 4, h2 = kMask & 8, a = kMask & 16, pz = kMask & 32;
  return cpu_has_avx2() ? &fused_block_avx2<s, h0, h1, h2, a, pz> : &fused_block_base<s, h0, h1, h2, a, pz>;
}

template <int... I>
BlockFn pick_block_fn(int mask, std::integer_sequence<int, I...>) {
  static const BlockFn table[] = {block_fn<I>()...};
  return table[mask];
}

// The block function for a row given which buffers exist: bit j of the mask keeps term j (s, h0, h1,
// h2, a); a term is kept when its coefficient is nonzero and its buffer exists.
BlockFn block_fn_for(const StepRow& r, const StepBuffers& buf) {
  const float coefs[5] = {r.os, r.oh[0], r.oh[1], r.oh[2], r.oa};
  const float* bufs[5] = {buf.saved_sample, buf.history[0], buf.history[1], buf.history[2], buf.accumulator};
  int mask = 0;
  bool plus_zero = false;
  for (int j = 0; j < 5; ++j) {
    if (coefs[j] != 0.f && bufs[j] != nullptr) {
      mask |= 1 << j;
    } else {
      const float dropped = coefs[j] * 0.f;  // what the generic form adds for this term
      if (dropped != 0.f) return nullptr;    // not a zero (non-finite coefficient): use the generic form
      if (!std::signbit(dropped)) plus_zero = true;
    }
  }
  if (plus_zero) mask |= 32;
  return pick_block_fn(mask, std::make_integer_sequence<int, 64>{});
}

// The generic form (every term), kept for rows with non-finite coefficients.
void fused_block(const StepRow& r, int64_t n, const float* x, const float* m, const float* s, const float* h0,
                 const float* h1, const float* h2, const float* a, float* q, float* o) {
  if (cpu_has_avx2()) {
    fused_block_avx2<true, true, true, true, true, false>(r, n, x, m, s, h0, h1, h2, a, q, o);
  } else {
    fused_block_base<true, true, true, true, true, false>(r, n, x, m, s, h0, h1, h2, a, q, o);
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void guidance_block(int64_t n, float s_i, float s_p, const float* __restrict__ e00, const float* __restrict__ eip,
                    const float* __restrict__ ei0, float* __restrict__ m) {
  for (int64_t k = 0; k < n; ++k) m[k] = e00[k] + s_i * (ei0[k] - e00[k]) + s_p * (eip[k] - ei0[k]);
}

template <typename T>
void run_range(const StepRow& row, const StepBuffers& buf, const Guidance& g, int64_t begin,
               int64_t end) {
  alignas(64) float xs[kBlock], ms[kBlock], q[kBlock], o[kBlock], t0[kBlock], t1[kBlock], t2[kBlock];
  constexpr bool kF32 = std::is_same<T, float>::value;
  const int64_t N = buf.numel;
  const bool need_m_acc = buf.accumulator != nullptr && (row.akeep != 0.f || row.am != 0.f || row.oa != 0.f);
  BlockFn block = block_fn_for(row, buf);
  if (block == nullptr) block = &fused_block;
  int64_t i = begin;
  while (i < end) {
    int64_t stop = std::min(end, i + kBlock);
    float s_i = 0.f, s_p = 0.f;
    if (g.enabled) {  // keep a block inside one frame so that the scales are constant
      const int64_t f = i / g.frame_numel;
      stop = std::min(stop, (f + 1) * g.frame_numel);
      s_i = g.scale_image[f];
      s_p = g.scale_pose[f];
    }
    const int64_t n = stop - i;
    // x and m as fp32 (fp32 inputs are read in place)
    const float* x;
    const float* m;
    if (kF32) {
      x = static_cast<const float*>(buf.sample) + i;
    } else {
      IO<T>::load(buf.sample, i, n, xs);
      x = xs;
    }
    if (g.enabled) {
      const float *e00, *eip, *ei0;
      if (kF32) {
        e00 = static_cast<const float*>(buf.model_output) + i;
        eip = static_cast<const float*>(buf.model_output) + N + i;
        ei0 = static_cast<const float*>(buf.model_output) + 2 * N + i;
      } else {
        IO<T>::load(buf.model_output, i, n, t0);
        IO<T>::load(buf.model_output, N + i, n, t1);
        IO<T>::load(buf.model_output, 2 * N + i, n, t2);
        e00 = t0, eip = t1, ei0 = t2;
      }
      guidance_block(n, s_i, s_p, e00, eip, ei0, ms);
      m = ms;
    } else if (kF32) {
      m = static_cast<const float*>(buf.model_output) + i;
    } else {
      IO<T>::load(buf.model_output, i, n, ms);
      m = ms;
    }
    auto src = [&](float coef, const float* p) { return (coef != 0.f && p != nullptr) ? p + i : kZeros; };
    block(row, n, row.ox != 0.f || row.qx != 0.f ? x : kZeros, m, src(row.os, buf.saved_sample),
                src(row.oh[0], buf.history[0]), src(row.oh[1], buf.history[1]), src(row.oh[2], buf.history[2]),
                src(row.oa, buf.accumulator), q, o);
    // state updates (after every read of this block)
    if (row.write_slot >= 0) std::memcpy(buf.history[row.write_slot] + i, q, sizeof(float) * n);
    if (row.save_sample) std::memcpy(buf.saved_sample + i, x, sizeof(float) * n);
    if (need_m_acc) {
      float* acc = buf.accumulator + i;
      if (row.akeep == 0.f) {
        for (int64_t k = 0; k < n; ++k) acc[k] = row.am * m[k];
      } else {
        for (int64_t k = 0; k < n; ++k) acc[k] = row.akeep * acc[k] + row.am * m[k];
      }
    }
    IO<T>::store(buf.out, i, n, o);
    i = stop;
  }
}

template <typename T>
void run(const StepRow& row, const StepBuffers& buf, const Guidance& g, int num_threads) {
  const int64_t N = buf.numel;
  if (num_threads <= 0) {
    // hardware_concurrency() reads sysfs (several us): ask once per process, not once per step.
    static const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
    num_threads = static_cast<int>(std::max<int64_t>(1, std::min(hw, N / kGrainPerThread)));
  }
  if (num_threads <= 1 || N < 2 * kBlock) {
    run_range<T>(row, buf, g, 0, N);
    return;
  }
  // Chunks aligned to kBlock; the calling thread takes the first.
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int64_t per = (blocks + num_threads - 1) / num_threads;
  std::vector<std::thread> workers;
  workers.reserve(num_threads - 1);
  for (int t = 1; t < num_threads; ++t) {
    const int64_t b = std::min(N, t * per * kBlock), e = std::min(N, (t + 1) * per * kBlock);
    if (b < e) workers.emplace_back(run_range<T>, std::cref(row), std::cref(buf), std::cref(g), b, e);
  }
  run_range<T>(row, buf, g, 0, std::min(N, per * kBlock));
  for (auto& w : workers) w.join();
}

}  // namespace

void convert_half_to_float(const uint16_t* src, float* dst, int64_t n) { IO<uint16_t>::load(src, 0, n, dst); }
void convert_float_to_half(const float* src, uint16_t* dst, int64_t n) { IO<uint16_t>::store(dst, 0, n, src); }

void apply_step(const StepRow& row, const StepBuffers& buf, const Guidance& g, int num_threads) {
  if (buf.dtype == DType::kFloat32) {
    run<float>(row, buf, g, num_threads);
  } else {
    run<uint16_t>(row, buf, g, num_threads);
  }
}

}  // namespace scheduler
}  // namespace dreampose_rt
