// AVX-512 building blocks of the threshold merge (topk_merge_cpu_threshold.h): float32 distances <-> 32-bit sort
// keys sixteen at a time, and a bitonic sorting network over up to 256 packed 64-bit values (key << 32 | slot).
// Compiled for AVX-512 by function attribute (the extension's baseline is SSE2); called only where the CPU has
// it (cpu_has_avx512). Included by topk_merge_cpu_threshold.h only.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define KARMA_HAS_AVX512_MERGE 1

#include <immintrin.h>

#include <cstdint>

#include "topk_merge.h"

#define KARMA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,popcnt,bmi2")))
#define KARMA_AVX512_INLINE KARMA_AVX512 inline __attribute__((always_inline))

namespace karma {
namespace cpu_merge {
namespace avx512 {

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2");
  return has;
}

// topk::sort_key of sixteen floats (same bits: the metric's negation, -0 folded into +0, NaN to kNanKey32).
template <bool Largest>
KARMA_AVX512_INLINE __m512i sort_keys(__m512 distances) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __mmask16 nan = _mm512_cmp_ps_mask(distances, distances, _CMP_UNORD_Q);
  const __m512 value = _mm512_add_ps(
      Largest ? _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(distances), sign)) : distances,
      _mm512_setzero_ps());
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), sign));
  return _mm512_mask_mov_epi32(key, nan, _mm512_set1_epi32(static_cast<int>(topk::kNanKey32)));
}

// topk::distance_of of sixteen keys (NaN's key gives the canonical NaN, the zero key +0).
template <bool Largest>
KARMA_AVX512_INLINE __m512 distances_of(__m512i keys) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i not_keys = _mm512_xor_si512(keys, _mm512_set1_epi32(-1));
  const __m512 value =
      _mm512_castsi512_ps(_mm512_xor_si512(keys, _mm512_or_si512(_mm512_srai_epi32(not_keys, 31), sign)));
  if (!Largest) return value;
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(keys, _mm512_set1_epi32(static_cast<int>(topk::kNanKey32)));
  return _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_setzero_ps(), value), nan, value);
}

// One compare-exchange stage inside each vector: lane i meets lane partner[i]; lanes in `low` keep the minimum.
KARMA_AVX512_INLINE __m512i exchange_lanes(__m512i v, __m512i partner, __mmask8 low) {
  const __m512i other = _mm512_permutexvar_epi64(partner, v);
  return _mm512_mask_blend_epi64(low, _mm512_max_epu64(v, other), _mm512_min_epu64(v, other));
}

// The stages of a bitonic merge whose partners are less than 8 lanes apart (4, 2, 1): lane i meets i ^ d.
KARMA_AVX512_INLINE __m512i clean_lanes(__m512i v) {
  v = exchange_lanes(v, _mm512_setr_epi64(4, 5, 6, 7, 0, 1, 2, 3), 0x0F);
  v = exchange_lanes(v, _mm512_setr_epi64(2, 3, 0, 1, 6, 7, 4, 5), 0x33);
  return exchange_lanes(v, _mm512_setr_epi64(1, 0, 3, 2, 5, 4, 7, 6), 0x55);
}

// Sorts the eight lanes ascending: bitonic merges of 2, 4 and 8 lanes, each opened by its "flip" stage (lane i
// meets the mirror lane of its block), so every block is sorted ascending, no direction bits.
KARMA_AVX512_INLINE __m512i sort_lanes(__m512i v) {
  v = exchange_lanes(v, _mm512_setr_epi64(1, 0, 3, 2, 5, 4, 7, 6), 0x55);
  v = exchange_lanes(v, _mm512_setr_epi64(3, 2, 1, 0, 7, 6, 5, 4), 0x33);
  v = exchange_lanes(v, _mm512_setr_epi64(1, 0, 3, 2, 5, 4, 7, 6), 0x55);
  v = exchange_lanes(v, _mm512_setr_epi64(7, 6, 5, 4, 3, 2, 1, 0), 0x0F);
  v = exchange_lanes(v, _mm512_setr_epi64(2, 3, 0, 1, 6, 7, 4, 5), 0x33);
  return exchange_lanes(v, _mm512_setr_epi64(1, 0, 3, 2, 5, 4, 7, 6), 0x55);
}

// Sorts v[0, Vectors) (8 values each) ascending as one sequence. Vectors: a power of two up to 32. Fully unrolled
// for a constant Vectors, so the values stay in registers.
template <int Vectors>
KARMA_AVX512_INLINE void sort_vectors(__m512i* v) {
  const __m512i reverse = _mm512_setr_epi64(7, 6, 5, 4, 3, 2, 1, 0);
#pragma GCC unroll 32
  for (int i = 0; i < Vectors; ++i) v[i] = sort_lanes(v[i]);
#pragma GCC unroll 8
  for (int block = 2; block <= Vectors; block *= 2) {  // merge sorted runs of block / 2 vectors into runs of block
    // Flip: element i of a run meets element (2 * run - 1 - i): vector j against the mirror vector, reversed.
#pragma GCC unroll 32
    for (int start = 0; start < Vectors; start += block) {
#pragma GCC unroll 16
      for (int j = 0; j < block / 2; ++j) {
        __m512i& lo = v[start + j];
        __m512i& hi = v[start + block - 1 - j];
        const __m512i mirrored = _mm512_permutexvar_epi64(reverse, hi);
        const __m512i min = _mm512_min_epu64(lo, mirrored), max = _mm512_max_epu64(lo, mirrored);
        lo = min;
        hi = _mm512_permutexvar_epi64(reverse, max);
      }
    }
    // Half-cleaners whole vectors apart, then inside the vectors.
#pragma GCC unroll 8
    for (int distance = block / 4; distance >= 1; distance /= 2) {
#pragma GCC unroll 32
      for (int j = 0; j < Vectors; ++j) {
        if ((j & distance) != 0) continue;
        const __m512i min = _mm512_min_epu64(v[j], v[j + distance]), max = _mm512_max_epu64(v[j], v[j + distance]);
        v[j] = min;
        v[j + distance] = max;
      }
    }
#pragma GCC unroll 32
    for (int j = 0; j < Vectors; ++j) v[j] = clean_lanes(v[j]);
  }
}

template <int Vectors>
KARMA_AVX512 __attribute__((noinline)) void sort_block(uint64_t* values) {
  __m512i v[Vectors];
#pragma GCC unroll 32
  for (int i = 0; i < Vectors; ++i) v[i] = _mm512_loadu_si512(values + 8 * i);
  sort_vectors<Vectors>(v);
#pragma GCC unroll 32
  for (int i = 0; i < Vectors; ++i) _mm512_storeu_si512(values + 8 * i, v[i]);
}

// Sorts values[0, n) ascending, n <= 256; values has room for 256 (the tail up to the network's size is filled
// with the all-ones value, which sorts last).
KARMA_AVX512 inline void sort_packed(uint64_t* values, int64_t n) {
  int64_t size = 8;
  while (size < n) size *= 2;
  for (int64_t i = n; i < size; ++i) values[i] = ~uint64_t{0};
  switch (size) {
    case 8: _mm512_storeu_si512(values, sort_lanes(_mm512_loadu_si512(values))); break;
    case 16: sort_block<2>(values); break;
    case 32: sort_block<4>(values); break;
    case 64: sort_block<8>(values); break;
    case 128: sort_block<16>(values); break;
    default: sort_block<32>(values); break;
  }
}

}  // namespace avx512
}  // namespace cpu_merge
}  // namespace karma

#endif  // x86_64 GCC
