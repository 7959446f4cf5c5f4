// The warp collectives a per-warp algorithm may use, with two implementations chosen by the compiler:
//
// - nvcc (device): one CUDA thread is one lane; Lanes<T> holds that lane's value; the collectives are the
//   CUDA intrinsics (__shfl_sync, __ballot_sync, __match_any_sync, __syncwarp, shared-memory atomics).
// - a host compiler: one call runs all 32 lanes in lockstep; Lanes<T> holds 32 values; a per-lane block is a
//   loop over the lanes; a collective sees every lane's value at once.
//
// So one source of the algorithm is compiled by nvcc for the GPU and by g++ into a host build that CI executes
// (topk_merge_warp.h is written against this file only). Rules for that source, which both builds rely on:
// - Per-lane work goes in KARMA_EACH_LANE(lane) { ... } and touches lane-indexed state (x[lane]) and shared
//   memory; leave it with `continue` (ends this lane's work), never `break` or `return`.
// - Everything outside a per-lane block is warp-uniform: plain variables hold the same value in every lane,
//   and every lane reaches every collective (full-warp masks only).
// - Lanes exchange data through collectives, or through shared memory with sync_warp() in between. Shared-
//   memory atomics (shared_add) are the one read-modify-write several lanes may aim at one word in a block.
#pragma once

#include <stdint.h>

namespace karma {
namespace warp {

constexpr int kLanes = 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;

// Bits of the lanes below `lane` (for ballot prefix counts).
#if defined(__CUDACC__)
#define KARMA_WARP __device__ __forceinline__
#else
#define KARMA_WARP inline
#endif

KARMA_WARP uint32_t lanes_below(int lane) { return (1u << lane) - 1u; }

#if defined(__CUDACC__)

template <typename T>
struct Lanes {
  T value;
  KARMA_WARP T& operator[](int) { return value; }
  KARMA_WARP const T& operator[](int) const { return value; }
};

// The body runs once, as this thread's lane.
#define KARMA_EACH_LANE(lane) \
  for (int lane = static_cast<int>(threadIdx.x) & (::karma::warp::kLanes - 1), lane##_pending = 1; lane##_pending; lane##_pending = 0)

KARMA_WARP void sync_warp() { __syncwarp(kFullMask); }
KARMA_WARP uint32_t ballot(const Lanes<bool>& p) { return __ballot_sync(kFullMask, p.value); }
KARMA_WARP int popc(uint32_t x) { return __popc(x); }
KARMA_WARP int lowest_lane(uint32_t mask) { return __ffs(mask) - 1; }

// Lane `src`'s value, in every lane.
template <typename T>
KARMA_WARP T broadcast(const Lanes<T>& v, int src) { return __shfl_sync(kFullMask, v.value, src); }

template <typename T>
KARMA_WARP Lanes<T> shuffle_up(const Lanes<T>& v, int delta) { return {__shfl_up_sync(kFullMask, v.value, delta)}; }

// Per lane: the lanes whose value equals this lane's.
KARMA_WARP Lanes<uint32_t> match_any(const Lanes<uint32_t>& v) { return {__match_any_sync(kFullMask, v.value)}; }

KARMA_WARP void shared_add(uint32_t* word, uint32_t amount) { atomicAdd(word, amount); }

#else  // host: 32 lanes in lockstep

template <typename T>
struct Lanes {
  T value[kLanes];
  T& operator[](int lane) { return value[lane]; }
  const T& operator[](int lane) const { return value[lane]; }
};

#define KARMA_EACH_LANE(lane) for (int lane = 0; lane < ::karma::warp::kLanes; ++lane)

inline void sync_warp() {}  // lanes run in turn: every write of one block is seen by the next

inline uint32_t ballot(const Lanes<bool>& p) {
  uint32_t mask = 0;
  for (int lane = 0; lane < kLanes; ++lane) mask |= static_cast<uint32_t>(p[lane]) << lane;
  return mask;
}

inline int popc(uint32_t x) { return __builtin_popcount(x); }
inline int lowest_lane(uint32_t mask) { return __builtin_ffs(static_cast<int>(mask)) - 1; }

template <typename T>
T broadcast(const Lanes<T>& v, int src) { return v[src]; }

// As __shfl_up_sync: lanes below delta keep their own value.
template <typename T>
Lanes<T> shuffle_up(const Lanes<T>& v, int delta) {
  Lanes<T> out;
  for (int lane = 0; lane < kLanes; ++lane) out[lane] = v[lane >= delta ? lane - delta : lane];
  return out;
}

inline Lanes<uint32_t> match_any(const Lanes<uint32_t>& v) {
  Lanes<uint32_t> out;
  for (int lane = 0; lane < kLanes; ++lane) {
    uint32_t peers = 0;
    for (int other = 0; other < kLanes; ++other) peers |= static_cast<uint32_t>(v[other] == v[lane]) << other;
    out[lane] = peers;
  }
  return out;
}

inline void shared_add(uint32_t* word, uint32_t amount) { *word += amount; }

#endif

// Inclusive prefix sum across the lanes (5 shuffle steps).
template <typename T>
KARMA_WARP Lanes<T> inclusive_scan(Lanes<T> v) {
  for (int delta = 1; delta < kLanes; delta *= 2) {
    const Lanes<T> up = shuffle_up(v, delta);
    KARMA_EACH_LANE(lane) {
      if (lane >= delta) v[lane] += up[lane];
    }
  }
  return v;
}

}  // namespace warp
}  // namespace karma
