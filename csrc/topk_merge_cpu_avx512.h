// AVX-512 builds of the sorted merge's per-row passes over float32 rows (topk_merge_cpu_sorted.h): the whole-row
// sorted check (and rows_in_order, the check of a query's rows with or without it), the conversion of a block into
// tree keys and the id copy. Compiled for AVX-512 by function attribute (the
// extension's baseline is SSE2) and taken only where the CPU has it and KARMA_TOPK_MERGE_AVX512 is not "0" (the
// tests run both builds on the same inputs). Same results as the portable passes, bit for bit. (Shifts are
// written masked: GCC 12 warns about the undefined source of the unmasked intrinsic.)
#pragma once

#include <cstdint>
#include <cstdlib>

#include <type_traits>
#include <vector>

#include "topk_merge.h"
#include "topk_merge_cpu_rows.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KARMA_HAS_AVX512_PASSES 1

#include <immintrin.h>

#define KARMA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,bmi2")))

namespace karma {
namespace cpu_merge {
namespace avx512 {

// Whether the merge of this call may use the AVX-512 passes (read once per call, not per row).
inline bool enabled() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("bmi2");
  const char* flag = std::getenv("KARMA_TOPK_MERGE_AVX512");
  return has && !(flag != nullptr && flag[0] == '0' && flag[1] == '\0');
}

KARMA_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<uint32_t>(n < 16 ? n : 16)));
}

// True when distances[0, n) never gets better along the row (ordered comparisons: false at a NaN, like the
// portable pass; such a row then takes the exact check). Sixteen neighbour pairs per step, one load each: the
// previous value comes from the vector before (a second, shifted load would split cache lines every step).
template <bool Largest>
KARMA_AVX512 __attribute__((noinline)) bool floats_monotone(const float* distances, int64_t n) {
  if (n < 2) return true;
  __mmask16 in_order = 0xFFFF;
  __m512 previous = _mm512_set1_ps(distances[0]);  // lane 15 stands before element 0: compares it with itself
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 here = _mm512_loadu_ps(distances + j);
    const __m512 before = _mm512_castsi512_ps(
        _mm512_maskz_alignr_epi32(0xFFFF, _mm512_castps_si512(here), _mm512_castps_si512(previous), 15));
    in_order &= Largest ? _mm512_cmp_ps_mask(here, before, _CMP_LE_OQ)
                        : _mm512_cmp_ps_mask(here, before, _CMP_GE_OQ);
    previous = here;
  }
  if (j < n) {
    const __mmask16 tail = first_lanes(n - j);
    const __m512 here = _mm512_maskz_loadu_ps(tail, distances + j);
    const __m512 before = _mm512_castsi512_ps(
        _mm512_maskz_alignr_epi32(0xFFFF, _mm512_castps_si512(here), _mm512_castps_si512(previous), 15));
    const __mmask16 ok = Largest ? _mm512_mask_cmp_ps_mask(tail, here, before, _CMP_LE_OQ)
                                 : _mm512_mask_cmp_ps_mask(tail, here, before, _CMP_GE_OQ);
    in_order &= static_cast<__mmask16>(ok | ~tail);
  }
  return in_order == 0xFFFF;
}

// Tree keys (sort key << 32 | slot, slots from `base`) of distances[0, n) into keys[0, n), sixteen at a time:
// the keys of topk::sort_key (the metric's negation, -0 folded into +0, NaN to kNanKey32).
template <bool Largest>
KARMA_AVX512 __attribute__((noinline)) void tree_keys(const float* distances, uint64_t* keys, uint32_t base,
                                                     int64_t n) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int>(topk::kNanKey32));
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i slots = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  // Interleaves (slot, key) pairs of lanes 0-7 and 8-15 into little-endian 64-bit tree keys.
  const __m512i low_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high_pairs = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 d = _mm512_maskz_loadu_ps(lanes, distances + j);
    const __mmask16 nan = _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
    const __m512 negated = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(d), sign));
    const __m512 value = _mm512_add_ps(Largest ? negated : d, _mm512_setzero_ps());
    const __m512i bits = _mm512_castps_si512(value);
    __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_maskz_srai_epi32(0xFFFF, bits, 31), sign));
    key = _mm512_mask_mov_epi32(key, nan, nan_key);
    const __mmask8 low_lanes = static_cast<__mmask8>(lanes), high_lanes = static_cast<__mmask8>(lanes >> 8);
    _mm512_mask_storeu_epi64(keys + j, low_lanes, _mm512_permutex2var_epi32(slots, low_pairs, key));
    _mm512_mask_storeu_epi64(keys + j + 8, high_lanes, _mm512_permutex2var_epi32(slots, high_pairs, key));
    slots = _mm512_add_epi32(slots, sixteen);
  }
}

// Copies ids[0, n) to out[0, n) and returns whether any is negative (padding), eight at a time. The last few go
// one by one: a masked vector load past the block could touch a cache line the merge never asked for.
KARMA_AVX512 __attribute__((noinline)) inline bool copy_ids(const int64_t* ids, int64_t* out, int64_t n) {
  __m512i sign_bits = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i id = _mm512_loadu_si512(ids + j);
    _mm512_storeu_si512(out + j, id);
    sign_bits = _mm512_or_si512(sign_bits, id);
  }
  int64_t rest = 0;
  for (; j < n; ++j) {
    out[j] = ids[j];
    rest |= ids[j];
  }
  return _mm512_movepi64_mask(sign_bits) != 0 || rest < 0;
}

}  // namespace avx512
}  // namespace cpu_merge
}  // namespace karma

#endif  // x86_64 GCC

namespace karma {
namespace cpu_merge {

// Whether every row of query q is sorted (the whole row: see rows_sorted_by); records the first shard out of order.
// avx512: float32 rows take the AVX-512 distance pass (avx512::enabled() was true for this call).
template <typename scalar_t, bool Largest>
bool rows_in_order(const std::vector<ShardRows<scalar_t>>& shards, int64_t q, InputErrorReport& errors, bool avx512) {
#if defined(KARMA_HAS_AVX512_PASSES)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (avx512) {
      // Short rows keep the inlined passes (a call costs more there).
      return rows_sorted_by<float, Largest>(
          shards.data(), static_cast<int64_t>(shards.size()), q, errors, [](const float* distances, int64_t width) {
            return width >= kAvx2RowCheckMinWidth ? avx512::floats_monotone<Largest>(distances, width)
                                                  : row_distances_monotone<float, Largest>(distances, width);
          });
    }
  }
#endif
  (void)avx512;
  return rows_sorted<scalar_t, Largest>(shards, q, errors);
}

}  // namespace cpu_merge
}  // namespace karma
