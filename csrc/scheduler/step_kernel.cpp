// See step_kernel.h. Elements are processed in blocks of kBlock: every input is read once into an
// fp32 block, each term of the row is a separate (auto-vectorised) loop over the block, terms with
// a zero coefficient are skipped (their buffers are never read), and the block is written once.
#include "scheduler/step_kernel.h"

#include "parallel.h"

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
// Elements per thread below which a step runs on fewer threads (1 frame of 4 x 80 x 64 runs on 2).
constexpr int64_t kGrainPerThread = int64_t(1) << 13;
// Elements from which a step is long enough (~30 us on one core) to wake a sleeping pool worker.
constexpr int64_t kWakeElements = int64_t(1) << 17;

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

// Which optional terms of a row to keep: bit j of *mask keeps term j (s, h0, h1, h2, a), the terms
// with a nonzero coefficient and an existing buffer. A dropped term is what the generic form adds as
// coef * 0: a signed zero (*plus_zero: one of them is +0), or NaN for a non-finite coefficient, and
// then false: only the generic form gives the same result.
bool kept_terms(const StepRow& r, const StepBuffers& buf, int* mask, bool* plus_zero) {
  const float coefs[5] = {r.os, r.oh[0], r.oh[1], r.oh[2], r.oa};
  const float* bufs[5] = {buf.saved_sample, buf.history[0], buf.history[1], buf.history[2], buf.accumulator};
  *mask = 0;
  *plus_zero = false;
  for (int j = 0; j < 5; ++j) {
    if (coefs[j] != 0.f && bufs[j] != nullptr) {
      *mask |= 1 << j;
    } else {
      const float dropped = coefs[j] * 0.f;
      if (dropped != 0.f) return false;
      if (!std::signbit(dropped)) *plus_zero = true;
    }
  }
  return true;
}

// The block function for a row given which buffers exist (nullptr: use the generic form).
BlockFn block_fn_for(const StepRow& r, const StepBuffers& buf) {
  int mask;
  bool plus_zero;
  if (!kept_terms(r, buf, &mask, &plus_zero)) return nullptr;
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

// CacheMode::kRefresh: guidance_block's arithmetic (same bits), and the two differences kept.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void guidance_refresh_block(int64_t n, float s_i, float s_p, const float* __restrict__ e00,
                            const float* __restrict__ eip, const float* __restrict__ ei0, float* __restrict__ m,
                            float* __restrict__ d_i, float* __restrict__ d_p) {
  for (int64_t k = 0; k < n; ++k) {
    const float a = ei0[k] - e00[k], b = eip[k] - ei0[k];
    m[k] = e00[k] + s_i * a + s_p * b;
    d_i[k] = a;
    d_p[k] = b;
  }
}

// CacheMode::kCached: c_i = s_I - 1, c_p = s_p - 1.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void guidance_cached_block(int64_t n, float c_i, float c_p, const float* __restrict__ eip,
                           const float* __restrict__ d_i, const float* __restrict__ d_p, float* __restrict__ m) {
  for (int64_t k = 0; k < n; ++k) m[k] = eip[k] + c_i * d_i[k] + c_p * d_p[k];
}

// How a step gets its model output m: 0 unguided (m is read), 1 the three-branch combine, 2 the
// combine that also writes the guidance cache (kRefresh), 3 from eIP and the cache (kCached).
int guidance_kind(const Guidance& g) {
  if (!g.enabled) return 0;
  if (g.cache_mode == CacheMode::kCached) return 3;
  return g.cache_mode == CacheMode::kRefresh && g.cache != nullptr ? 2 : 1;
}


// ---- The fast path: rows that keep no saved sample and no accumulator (every row of PLMS after
// its first step, of DDIM and of DPM-Solver++). One loop reads each input once and writes q to the
// history slot and the result to `out` directly, with no scratch copies: in every iteration all
// loads come before the stores, so `out` may alias x and the history slot written may be one of
// those read (same index, which is all the aliasing the callers allow). Same arithmetic, in the same
// order, as fused_block_body (bit-identical); the dropped zero terms are accounted for by adding a
// signed zero (+0 where fused_block_body would add "+ 0.f", else -0, which changes nothing).
typedef float V8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: AVX2 or 2 x SSE/NEON

__attribute__((always_inline)) inline V8 ld8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void st8(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }
__attribute__((always_inline)) inline V8 splat8(float f) { return V8{f, f, f, f, f, f, f, f}; }

struct FastIn {
  const float* x;                   // sample (or kZeros when ox == qx == 0)
  const float* m;                   // model output (unguided)
  const float *e00, *eip, *ei0;     // the three branches (guided; cached: eip only)
  float s_i, s_p;                   // guidance scales of this frame (cached: s_I - 1 and s_p - 1)
  const float *s, *h0, *h1, *h2, *a;
  float* q;                         // history slot to write (kWQ)
  float* o;                         // result
  float *d_i, *d_p;                 // the guidance cache (refresh: written; cached: read)
};

// kG: guidance_kind (0 unguided, 1 combine, 2 combine + write the cache, 3 from eIP and the cache).
template <int kG, bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kWQ>
__attribute__((always_inline)) inline void fast_body(const StepRow& r, float pz, int64_t n, const FastIn& p) {
  int64_t k = 0;
  {
    const V8 qx = splat8(r.qx), qm = splat8(r.qm), ox = splat8(r.ox), om = splat8(r.om), oq = splat8(r.oq);
    const V8 os = splat8(r.os), oh0 = splat8(r.oh[0]), oh1 = splat8(r.oh[1]), oh2 = splat8(r.oh[2]);
    const V8 oa = splat8(r.oa), zero = splat8(pz), si = splat8(p.s_i), sp = splat8(p.s_p);
    for (; k + 8 <= n; k += 8) {
      const V8 x = ld8(p.x + k);
      V8 m, di, dp;
      if (kG == 1) {
        const V8 e00 = ld8(p.e00 + k), eip = ld8(p.eip + k), ei0 = ld8(p.ei0 + k);
        m = e00 + si * (ei0 - e00) + sp * (eip - ei0);
      } else if (kG == 2) {
        const V8 e00 = ld8(p.e00 + k), eip = ld8(p.eip + k), ei0 = ld8(p.ei0 + k);
        di = ei0 - e00;
        dp = eip - ei0;
        m = e00 + si * di + sp * dp;
      } else if (kG == 3) {
        m = ld8(p.eip + k) + si * ld8(p.d_i + k) + sp * ld8(p.d_p + k);
      } else {
        m = ld8(p.m + k);
      }
      const V8 s = kS ? ld8(p.s + k) : zero, h0 = kH0 ? ld8(p.h0 + k) : zero;
      const V8 h1 = kH1 ? ld8(p.h1 + k) : zero, h2 = kH2 ? ld8(p.h2 + k) : zero, a = kA ? ld8(p.a + k) : zero;
      const V8 q = qx * x + qm * m;
      V8 o = ox * x + om * m + oq * q;
      if (kS) o = o + os * s;
      if (kH0) o = o + oh0 * h0;
      if (kH1) o = o + oh1 * h1;
      if (kH2) o = o + oh2 * h2;
      if (kA) o = o + oa * a;
      o = o + zero;
      if (kWQ) st8(p.q + k, q);  // the stores come after every load of this iteration
      if (kG == 2) {
        st8(p.d_i + k, di);
        st8(p.d_p + k, dp);
      }
      st8(p.o + k, o);
    }
  }
  for (; k < n; ++k) {  // the tail, in the same order
    const float x = p.x[k];
    float m, di = 0.f, dp = 0.f;
    if (kG == 1) {
      m = p.e00[k] + p.s_i * (p.ei0[k] - p.e00[k]) + p.s_p * (p.eip[k] - p.ei0[k]);
    } else if (kG == 2) {
      di = p.ei0[k] - p.e00[k];
      dp = p.eip[k] - p.ei0[k];
      m = p.e00[k] + p.s_i * di + p.s_p * dp;
    } else if (kG == 3) {
      m = p.eip[k] + p.s_i * p.d_i[k] + p.s_p * p.d_p[k];
    } else {
      m = p.m[k];
    }
    const float s = kS ? p.s[k] : 0.f, h0 = kH0 ? p.h0[k] : 0.f, h1 = kH1 ? p.h1[k] : 0.f;
    const float h2 = kH2 ? p.h2[k] : 0.f, a = kA ? p.a[k] : 0.f;
    const float q = r.qx * x + r.qm * m;
    float o = r.ox * x + r.om * m + r.oq * q;
    if (kS) o = o + r.os * s;
    if (kH0) o = o + r.oh[0] * h0;
    if (kH1) o = o + r.oh[1] * h1;
    if (kH2) o = o + r.oh[2] * h2;
    if (kA) o = o + r.oa * a;
    o = o + pz;
    if (kWQ) p.q[k] = q;
    if (kG == 2) {
      p.d_i[k] = di;
      p.d_p[k] = dp;
    }
    p.o[k] = o;
  }
}

using FastFn = void (*)(const StepRow&, float, int64_t, const FastIn&);

template <int kG, bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kWQ>
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2")))
#endif
void fast_avx2(const StepRow& r, float pz, int64_t n, const FastIn& p) {
  fast_body<kG, kS, kH0, kH1, kH2, kA, kWQ>(r, pz, n, p);
}

template <int kG, bool kS, bool kH0, bool kH1, bool kH2, bool kA, bool kWQ>
void fast_base(const StepRow& r, float pz, int64_t n, const FastIn& p) {
  fast_body<kG, kS, kH0, kH1, kH2, kA, kWQ>(r, pz, n, p);
}

// kMask bits: 0 s, 1 h0, 2 h1, 3 h2, 4 a, 5-6 guidance_kind, 7 write q. A row that reads A updates
// it, which the fast path does not do (fast_fn_for), so no mask with bit 4 is asked for: those entries
// are not instantiated.
template <int kMask>
FastFn fast_fn() {
  if constexpr ((kMask & 16) != 0) {
    return nullptr;
  } else {
    constexpr bool s = kMask & 1, h0 = kMask & 2, h1 = kMask & 4, h2 = kMask & 8, a = false;
    constexpr int g = (kMask >> 5) & 3;
    constexpr bool wq = kMask & 128;
    return cpu_has_avx2() ? &fast_avx2<g, s, h0, h1, h2, a, wq> : &fast_base<g, s, h0, h1, h2, a, wq>;
  }
}

template <int... I>
FastFn pick_fast_fn(int mask, std::integer_sequence<int, I...>) {
  static const FastFn table[] = {fast_fn<I>()...};
  return table[mask];
}

// The fast function for a row, or nullptr when the row needs the general path (it saves the sample,
// updates the accumulator, or has a non-finite coefficient). guidance: guidance_kind. *pz: the signed
// zero to add.
FastFn fast_fn_for(const StepRow& r, const StepBuffers& buf, int guidance, float* pz) {
  if (r.save_sample) return nullptr;
  // any row that touches the accumulator updates it (as run_range and table_step_ref do), so the
  // state follows the table's contract bit for bit whichever path runs
  if (buf.accumulator != nullptr && (r.akeep != 0.f || r.am != 0.f || r.oa != 0.f)) return nullptr;
  if (r.write_slot >= 0 && buf.history[r.write_slot] == nullptr) return nullptr;
  int mask;
  bool plus_zero;
  if (!kept_terms(r, buf, &mask, &plus_zero)) return nullptr;
  mask |= guidance << 5;
  if (r.write_slot >= 0) mask |= 128;
  *pz = plus_zero ? 0.f : -0.f;
  return pick_fast_fn(mask, std::make_integer_sequence<int, 256>{});
}

template <typename T>
void run_range_fast(FastFn fn, float pz, const StepRow& row, const StepBuffers& buf, const Guidance& g,
                    int64_t begin, int64_t end) {
  alignas(64) float xs[kBlock], ms[kBlock], o[kBlock], t0[kBlock], t1[kBlock], t2[kBlock];
  constexpr bool kF32 = std::is_same<T, float>::value;
  const int64_t N = buf.numel;
  const bool need_x = row.ox != 0.f || row.qx != 0.f;
  const bool cached = g.enabled && g.cache_mode == CacheMode::kCached;
  const bool keep = g.enabled && g.cache_mode == CacheMode::kRefresh && g.cache != nullptr;
  auto in = [](float coef, const float* p, int64_t i) { return (coef != 0.f && p != nullptr) ? p + i : nullptr; };
  // fp32 reads and writes the buffers in place, so a block only ends at a frame boundary (guidance
  // scales are per frame); fp16 goes through kBlock-element scratch, as does a row without x (kZeros).
  const int64_t block = kF32 && need_x ? end - begin : kBlock;
  int64_t i = begin;
  while (i < end) {
    int64_t stop = std::min(end, i + block);
    FastIn p{};
    if (g.enabled) {  // keep a block inside one frame so that the scales are constant
      const int64_t f = i / g.frame_numel;
      stop = std::min(stop, (f + 1) * g.frame_numel);
      p.s_i = g.scale_image[f];
      p.s_p = g.scale_pose[f];
      if (cached) {
        p.s_i = p.s_i - 1.f;
        p.s_p = p.s_p - 1.f;
      }
    }
    const int64_t n = stop - i;
    if (!need_x) {
      p.x = kZeros;
    } else if (kF32) {
      p.x = static_cast<const float*>(buf.sample) + i;
    } else {
      IO<T>::load(buf.sample, i, n, xs);
      p.x = xs;
    }
    if (cached) {  // eIP alone (numel elements) and the cache
      if (kF32) {
        p.eip = static_cast<const float*>(buf.model_output) + i;
      } else {
        IO<T>::load(buf.model_output, i, n, t1);
        p.eip = t1;
      }
      p.d_i = g.cache + i;
      p.d_p = g.cache + N + i;
    } else if (g.enabled) {
      if (kF32) {
        p.e00 = static_cast<const float*>(buf.model_output) + i;
        p.eip = static_cast<const float*>(buf.model_output) + N + i;
        p.ei0 = static_cast<const float*>(buf.model_output) + 2 * N + i;
      } else {
        IO<T>::load(buf.model_output, i, n, t0);
        IO<T>::load(buf.model_output, N + i, n, t1);
        IO<T>::load(buf.model_output, 2 * N + i, n, t2);
        p.e00 = t0, p.eip = t1, p.ei0 = t2;
      }
      if (keep) {
        p.d_i = g.cache + i;
        p.d_p = g.cache + N + i;
      }
    } else if (kF32) {
      p.m = static_cast<const float*>(buf.model_output) + i;
    } else {
      IO<T>::load(buf.model_output, i, n, ms);
      p.m = ms;
    }
    p.s = in(row.os, buf.saved_sample, i);
    p.h0 = in(row.oh[0], buf.history[0], i);
    p.h1 = in(row.oh[1], buf.history[1], i);
    p.h2 = in(row.oh[2], buf.history[2], i);
    p.a = in(row.oa, buf.accumulator, i);
    p.q = row.write_slot >= 0 ? buf.history[row.write_slot] + i : nullptr;
    p.o = kF32 ? static_cast<float*>(buf.out) + i : o;
    fn(row, pz, n, p);
    if (!kF32) IO<T>::store(buf.out, i, n, o);
    i = stop;
  }
}

template <typename T>
void run_range(const StepRow& row, const StepBuffers& buf, const Guidance& g, int64_t begin,
               int64_t end) {
  alignas(64) float xs[kBlock], ms[kBlock], q[kBlock], o[kBlock], t0[kBlock], t1[kBlock], t2[kBlock];
  constexpr bool kF32 = std::is_same<T, float>::value;
  const int64_t N = buf.numel;
  const bool need_m_acc = buf.accumulator != nullptr && (row.akeep != 0.f || row.am != 0.f || row.oa != 0.f);
  const int guidance = guidance_kind(g);
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
    if (guidance == 3) {  // eIP alone (numel elements) and the cache
      const float* eip;
      if (kF32) {
        eip = static_cast<const float*>(buf.model_output) + i;
      } else {
        IO<T>::load(buf.model_output, i, n, t1);
        eip = t1;
      }
      guidance_cached_block(n, s_i - 1.f, s_p - 1.f, eip, g.cache + i, g.cache + N + i, ms);
      m = ms;
    } else if (guidance != 0) {
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
      if (guidance == 2) {
        guidance_refresh_block(n, s_i, s_p, e00, eip, ei0, ms, g.cache + i, g.cache + N + i);
      } else {
        guidance_block(n, s_i, s_p, e00, eip, ei0, ms);
      }
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
struct RangeJob {
  // Copies, not pointers: a pool worker reads the job from a few adjacent cache lines (fetched
  // together) instead of following pointers into the caller's stack one miss at a time.
  StepRow row;
  StepBuffers buf;
  Guidance g;
  FastFn fast = nullptr;
  float pz = 0.f;
  int64_t chunk = 0;  // elements per chunk (a multiple of kBlock)

  void range(int64_t b, int64_t e) const {
    if (fast != nullptr) {
      run_range_fast<T>(fast, pz, row, buf, g, b, e);
    } else {
      run_range<T>(row, buf, g, b, e);
    }
  }
  static void chunk_fn(void* ctx, int64_t c) {
    const RangeJob& j = *static_cast<const RangeJob*>(ctx);
    j.range(c * j.chunk, std::min(j.buf.numel, (c + 1) * j.chunk));
  }
};

template <typename T>
void run(const StepRow& row, const StepBuffers& buf, const Guidance& g, int num_threads) {
  const int64_t N = buf.numel;
  RangeJob<T> job{row, buf, g};
  job.fast = fast_fn_for(row, buf, guidance_kind(g), &job.pz);
  if (num_threads <= 0) num_threads = static_cast<int>(std::min<int64_t>(1 << 20, N / kGrainPerThread));
  if (num_threads <= 1 || N < 2 * kBlock) {
    job.range(0, N);
    return;
  }
  // A few chunks per thread (each a multiple of kBlock) so that an awake thread can take over the
  // range of one that is still asleep.
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int64_t chunks = std::min<int64_t>(blocks, int64_t(num_threads) * 4);
  job.chunk = (blocks + chunks - 1) / chunks * kBlock;
  parallel_for((N + job.chunk - 1) / job.chunk, num_threads, &RangeJob<T>::chunk_fn, &job, N >= kWakeElements);
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
