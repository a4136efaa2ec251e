// Scheduler data plane on the CPU: applies one StepRow to flat buffers in one pass, optionally
// combining the three guidance branches of the model output first. No Python, no torch.
#pragma once

#include <cstdint>

#include "scheduler/schedule.h"

namespace dreampose_rt {
namespace scheduler {

enum class DType { kFloat32 = 0, kFloat16 = 1 };

// All pointers address `numel` contiguous elements unless stated otherwise.
struct StepBuffers {
  DType dtype = DType::kFloat32;  // of out, sample and model_output
  int64_t numel = 0;              // elements of the sample
  void* out = nullptr;            // may alias sample
  const void* sample = nullptr;
  // numel elements, or 3 * numel when guidance is enabled (branch-major, see Guidance).
  const void* model_output = nullptr;
  float* history[kMaxHistory] = {nullptr, nullptr, nullptr};  // fp32 state (may be null if unused)
  float* saved_sample = nullptr;                             // fp32
  float* accumulator = nullptr;                              // fp32
};

// Guidance caching (dreampose/guidance.py): a refresh step evaluates the three branches and keeps the
// two guidance differences of every element, d_I = eI0 - e00 and d_P = eIP - eI0; a cached step
// evaluates only eIP and reuses them.
enum class CacheMode {
  kNone = 0,     // model_output: 3 x numel (e00, eIP, eI0); the cache is neither read nor written
  kRefresh = 1,  // model_output: 3 x numel; eps as kNone (same arithmetic, same bits), and the cache is
                 // written: cache[0, numel) = eI0 - e00, cache[numel, 2 numel) = eIP - eI0 (fp32)
  kCached = 2,   // model_output: numel (eIP only); eps = eIP + (s_I - 1) * d_I + (s_p - 1) * d_P, in fp32
                 // and in that order; the cache is only read
};

// Three-branch guidance (DreamPose's dual classifier-free guidance). The model output holds, in
// this order, numel elements each: e00 (null image, null pose), eIP (image + pose), eI0 (image,
// null pose). eps = e00 + s_I * (eI0 - e00) + s_p * (eIP - eI0), s_I/s_p per frame. With
// cache_mode = kCached it holds eIP alone (numel elements); see CacheMode.
struct Guidance {
  bool enabled = false;
  int64_t frames = 1;           // F: the sample is F frames of frame_numel elements
  int64_t frame_numel = 0;      // numel / F
  const float* scale_image = nullptr;  // F values
  const float* scale_pose = nullptr;   // F values
  CacheMode cache_mode = CacheMode::kNone;
  // 2 x numel fp32, d_I then d_P (each in the sample's element order); required (non-null) unless
  // cache_mode is kNone, and must not overlap any other buffer of the step.
  float* cache = nullptr;
};

// out = row applied to the buffers (see schedule.h), the state buffers updated in place.
// num_threads <= 0 picks a count from the size (small tensors run on the calling thread).
void apply_step(const StepRow& row, const StepBuffers& buf, const Guidance& guidance, int num_threads);

// Bulk conversions used by the data plane (branch-free, vectorised); exposed for tests.
void convert_half_to_float(const uint16_t* src, float* dst, int64_t n);
void convert_float_to_half(const float* src, uint16_t* dst, int64_t n);

// IEEE binary16 <-> binary32, round to nearest even (scalar reference versions).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

}  // namespace scheduler
}  // namespace dreampose_rt
