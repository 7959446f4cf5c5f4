// The building blocks of the GPU merge's warp (topk_merge_warp.h), written against warp_collectives.h: sort keys
// on the distances' stored bits, a warp radix select with a shared-memory histogram, and a warp bitonic sort of
// the survivors. Same rules as the merge: one source for nvcc and the host build.
#pragma once

#include <stdint.h>

#include "warp_collectives.h"

namespace karma {
namespace topk {
namespace warp_merge {

using warp::kLanes;
using warp::Lanes;

// IEEE formats by their bits: the sort key is computed on the stored bits, so fp16/bf16 need no conversion
// and come back exactly. Sign bit = every bit outside exponent and mantissa.
template <typename B, uint64_t Exponent, uint64_t Mantissa>
struct Format {
  using Bits = B;
  static constexpr B kExponent = static_cast<B>(Exponent);
  static constexpr B kMantissa = static_cast<B>(Mantissa);
  static constexpr B kSign = static_cast<B>(~(Exponent | Mantissa));
  static constexpr B kAllOnes = static_cast<B>(~B{0});
  static constexpr B kCanonicalNan = static_cast<B>(Exponent | ((Mantissa >> 1) + 1));
  static constexpr B kNanKey = static_cast<B>(kCanonicalNan | kSign);  // above +inf's key
  // Staged keys of removed candidates, above every distance's key: padding, and (dedup) a worse occurrence.
  static constexpr B kPaddingKey = kAllOnes;
  static constexpr B kDroppedKey = static_cast<B>(kAllOnes - 1);
};
using Float32 = Format<uint32_t, 0x7F800000u, 0x007FFFFFu>;
using Float64 = Format<uint64_t, 0x7FF0000000000000ull, 0x000FFFFFFFFFFFFFull>;
using Float16 = Format<uint16_t, 0x7C00u, 0x03FFu>;
using BFloat16 = Format<uint16_t, 0x7F80u, 0x007Fu>;

// Distance bits -> key ascending in rank (as topk::sort_key: NaN after every number, -0 ties +0, "ip" ranks
// the negated score).
template <typename F, bool Largest>
KARMA_WARP typename F::Bits sort_key(typename F::Bits bits) {
  using B = typename F::Bits;
  const B b = Largest ? static_cast<B>(bits ^ F::kSign) : bits;
  const B magnitude = static_cast<B>(b & static_cast<B>(~F::kSign));
  const B key = static_cast<B>(b ^ ((b & F::kSign) ? F::kAllOnes : F::kSign));
  return magnitude > F::kExponent ? F::kNanKey : (magnitude == 0 ? F::kSign : key);
}

// Key -> the distance's bits (NaN as the canonical NaN, zero as +0), as the CPU op writes them.
template <typename F, bool Largest>
KARMA_WARP typename F::Bits distance_bits(typename F::Bits key) {
  using B = typename F::Bits;
  B b = (key & F::kSign) ? static_cast<B>(key ^ F::kSign) : static_cast<B>(~key);
  if (Largest) b = static_cast<B>(b ^ F::kSign);
  if ((b & static_cast<B>(~F::kSign)) == 0) b = 0;
  return key == F::kNanKey ? F::kCanonicalNan : b;
}

template <typename F, bool Largest>
KARMA_WARP typename F::Bits padding_bits() {  // +inf ("l2") / -inf ("ip")
  return static_cast<typename F::Bits>(F::kExponent | (Largest ? F::kSign : 0));
}

// A survivor: sort key, global id, and where it came from (for dedup marks and the sortedness check).
struct Entry {
  uint64_t key;
  int64_t id;
  int32_t shard;
  int32_t pos;
};

constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

template <typename Value>
struct Selection {
  Value value;     // the rank-th smallest value
  uint32_t need;   // how many of the values equal to it are within the rank
  uint32_t equal;  // how many offered values equal it
};

// Adds the digit (value >> shift) & 0xFF of each offering lane whose value matches prefix under mask; lanes
// with the same digit add once (their leader adds their count).
template <typename Value>
KARMA_WARP void count_digits(const Lanes<bool>& offered, const Lanes<Value>& value, Value prefix, Value mask,
                             int shift, uint32_t* histogram) {
  Lanes<uint32_t> digit;
  KARMA_EACH_LANE(lane) {
    const bool counted = offered[lane] && static_cast<Value>(value[lane] & mask) == prefix;
    digit[lane] = counted ? static_cast<uint32_t>((value[lane] >> shift) & (kBins - 1)) : kBins + lane;
  }
  const Lanes<uint32_t> peers = warp::match_any(digit);
  KARMA_EACH_LANE(lane) {
    if (digit[lane] < kBins && warp::lowest_lane(peers[lane]) == lane) {
      warp::shared_add(histogram + digit[lane], warp::popc(peers[lane]));
    }
  }
}

// The rank-th smallest (1-based) of the values offer(prefix, mask, shift) counts with count_digits; rank must
// not exceed how many it offers. One pass per 8-bit digit, most significant first.
template <typename Value, typename Offer>
KARMA_WARP Selection<Value> radix_select(uint32_t rank, uint32_t* histogram, Offer&& offer) {
  Value prefix = 0;
  Value mask = 0;
  uint32_t remaining = rank;
  uint32_t equal = 0;
  for (int shift = 8 * static_cast<int>(sizeof(Value)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
    KARMA_EACH_LANE(lane) {
      for (int b = 0; b < kBins / kLanes; ++b) histogram[lane * (kBins / kLanes) + b] = 0;
    }
    warp::sync_warp();
    offer(prefix, mask, shift);
    warp::sync_warp();
    // Lane l owns bins [8 l, 8 l + 8): the lane whose running total crosses `remaining` owns the digit.
    Lanes<uint32_t> sums;
    KARMA_EACH_LANE(lane) {
      uint32_t sum = 0;
      for (int b = 0; b < kBins / kLanes; ++b) sum += histogram[lane * (kBins / kLanes) + b];
      sums[lane] = sum;
    }
    const Lanes<uint32_t> totals = warp::inclusive_scan(sums);
    Lanes<bool> crosses;
    KARMA_EACH_LANE(lane) { crosses[lane] = totals[lane] >= remaining && totals[lane] - sums[lane] < remaining; }
    const int owner = warp::lowest_lane(warp::ballot(crosses));
    uint32_t before = warp::broadcast(totals, owner) - warp::broadcast(sums, owner);
    int digit = owner * (kBins / kLanes);
    while (before + histogram[digit] < remaining) before += histogram[digit++];
    equal = histogram[digit];
    remaining -= before;
    prefix = static_cast<Value>(prefix | (static_cast<Value>(digit) << shift));
    mask = static_cast<Value>(mask | (static_cast<Value>(kBins - 1) << shift));
    warp::sync_warp();  // every lane has read the histogram before the next pass clears it
  }
  return {prefix, remaining, equal};
}

template <bool ById>
KARMA_WARP bool entry_before(const Entry& a, const Entry& b) {
  if (ById) return a.id < b.id || (a.id == b.id && a.key < b.key);
  return a.key < b.key || (a.key == b.key && a.id < b.id);
}

// Bitonic sort of entries[0, size), size a power of two; each lane runs size / 64 compare-exchanges a step.
template <bool ById>
KARMA_WARP void bitonic_sort(Entry* entries, int32_t size) {
  for (int32_t span = 2; span <= size; span *= 2) {
    for (int32_t stride = span / 2; stride > 0; stride /= 2) {
      for (int32_t base = 0; base < size / 2; base += kLanes) {
        KARMA_EACH_LANE(lane) {
          const int32_t t = base + lane;
          if (t >= size / 2) continue;
          const int32_t i = 2 * t - (t & (stride - 1));
          const int32_t j = i + stride;
          const Entry a = entries[i];
          const Entry b = entries[j];
          if (entry_before<ById>(b, a) == ((i & span) == 0)) {
            entries[i] = b;
            entries[j] = a;
          }
        }
      }
      warp::sync_warp();
    }
  }
}

}  // namespace warp_merge
}  // namespace topk
}  // namespace karma
