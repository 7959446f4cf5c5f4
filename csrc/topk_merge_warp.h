// The GPU merge of one query by one warp, written against warp_collectives.h so that the same source is the
// CUDA kernel (topk_merge_cuda.cu, nvcc) and a host build that runs the 32 lanes in lockstep
// (topk_merge_warp_host.cpp, g++, exercised by CI as the op karma::topk_merge_warp_emulated).
//
// Per query the warp
//  1. reads the S x k_s distances once, coalesced (consecutive lanes, consecutive positions of a row), and
//     stages their sort keys in shared memory (one integer per candidate, order as in topk_merge.h);
//  2. finds the k-th key T by a radix select: 8-bit digits, a 256-bin histogram in shared memory per pass
//     (lanes with equal digits add once, via match_any), the crossing bin found by a warp scan;
//  3. reads the ids of the candidates with key <= T only: padding (negative id) found there is marked in
//     the staged keys and the select repeats (rare: faiss pads at the end of a row, with the worst distance);
//  4. when more candidates tie at T than the result has room for, selects the smallest ids among them the
//     same way (a radix select over the ids of that tie group);
//  5. compacts the <= k survivors into shared memory (ballot + popc gives each lane its slot), and bitonic-
//     sorts them by (key, id). dedup: sorted by id first; a repeated id marks its worse occurrences and the
//     select repeats;
//  6. sorted=True: checks each survivor against the real candidates before and after it in its row (a row out
//     of order where the result comes from raises, as in the CPU merge; a disorder elsewhere cannot change the
//     result and is not looked for), then writes the k results.
// With sorted=True, S loads first bound the k-th key, and the passes after staging visit only the candidates
// listed under that bound (all of them when padding or disorder leaves too few). Rows need not be sorted (no
// pre-sort for sorted=False). Memory read per query: the distances once, the ids of about k candidates, and
// (sorted=True) the neighbours of each survivor; see docs/topk_merge_gpu.md. Building blocks: warp_select.h.
#pragma once

#include <stdint.h>

#include "topk_merge.h"
#include "topk_merge_cuda.h"
#include "warp_collectives.h"
#include "warp_select.h"

namespace karma {
namespace topk {
namespace warp_merge {

// A warp's shared memory: staged keys, the select's histogram, the survivors (a power of two for the sort), the
// list of candidates under the bound (sorted rows; 4 k + 128 at most, beyond that every pass visits all) and the
// shards' first slots.
struct Layout {
  int64_t histogram_offset;
  int64_t entries_offset;
  int64_t list_offset;
  int64_t shard_begin_offset;
  int64_t bytes;
  int32_t sort_size;
  int32_t list_capacity;

  KARMA_WARP Layout(int32_t total_width, int32_t k, int key_bytes) {
    histogram_offset = (static_cast<int64_t>(total_width) * key_bytes + 15) / 16 * 16;
    entries_offset = histogram_offset + kBins * static_cast<int64_t>(sizeof(uint32_t));
    const int32_t most = total_width < k ? total_width : k;
    sort_size = 1;
    while (sort_size < most) sort_size *= 2;
    list_offset = entries_offset + static_cast<int64_t>(sort_size) * static_cast<int64_t>(sizeof(Entry));
    const int64_t list_most = 4 * static_cast<int64_t>(k) + 128;
    list_capacity = static_cast<int32_t>(total_width < list_most ? total_width : list_most);
    shard_begin_offset = list_offset + (static_cast<int64_t>(list_capacity) * 4 + 15) / 16 * 16;
    bytes = shard_begin_offset + KARMA_TOPK_MAX_SHARDS * static_cast<int64_t>(sizeof(int32_t));
  }
};

// Shared memory a warp may use (an sm_90 block's opt-in maximum, 227 KiB).
constexpr int64_t kMaxSharedBytesPerWarp = 227 * 1024;


// The candidates a pass visits, 32 at a time: every position of every row, or (sorted rows) only the listed ones
// (`list`: shard << 24 | position, the candidates whose key is at most the bound). visit(valid, shard, position,
// index) with index the candidate's slot among the staged keys; every lane takes part in every call.
template <typename Visit>
KARMA_WARP void for_each_slice(const KarmaTopkParams& p, const int32_t* shard_begin, const uint32_t* list,
                               int32_t listed, bool use_list, Visit&& visit) {
  Lanes<bool> valid;
  Lanes<int32_t> shard;
  Lanes<int32_t> pos;
  Lanes<int32_t> index;
  if (use_list) {
    for (int32_t base = 0; base < listed; base += kLanes) {
      KARMA_EACH_LANE(lane) {
        valid[lane] = base + lane < listed;
        const uint32_t packed = valid[lane] ? list[base + lane] : 0u;
        shard[lane] = static_cast<int32_t>(packed >> 24);
        pos[lane] = static_cast<int32_t>(packed & 0xFFFFFFu);
        index[lane] = shard_begin[shard[lane]] + pos[lane];
      }
      visit(valid, shard, pos, index);
    }
    return;
  }
  for (int32_t s = 0; s < p.num_shards; ++s) {
    for (int32_t base = 0; base < p.shards[s].width; base += kLanes) {
      KARMA_EACH_LANE(lane) {
        valid[lane] = base + lane < p.shards[s].width;
        shard[lane] = s;
        pos[lane] = base + lane;
        index[lane] = p.shards[s].begin + base + lane;
      }
      visit(valid, shard, pos, index);
    }
  }
}

// Merges query q. Errors (a translated id out of int64, a row out of order with check_sorted) go to `errors`:
// errors.record_overflow(shard, local_id, offset), errors.record_unsorted(shard, query).
template <typename F, bool Largest, typename Errors>
KARMA_WARP void merge_query(const KarmaTopkParams& p, int64_t q, char* shared, Errors& errors) {
  using Bits = typename F::Bits;
  const int32_t n = p.total_width;
  const Layout layout(n, p.k, sizeof(Bits));
  Bits* keys = reinterpret_cast<Bits*>(shared);
  uint32_t* histogram = reinterpret_cast<uint32_t*>(shared + layout.histogram_offset);
  Entry* entries = reinterpret_cast<Entry*>(shared + layout.entries_offset);
  uint32_t* list = reinterpret_cast<uint32_t*>(shared + layout.list_offset);
  int32_t* shard_begin = reinterpret_cast<int32_t*>(shared + layout.shard_begin_offset);
  const auto distance_row = [&](int32_t s) {
    return static_cast<const Bits*>(p.shards[s].distances) + q * p.shards[s].distance_row_stride;
  };
  const auto id_row = [&](int32_t s) { return p.shards[s].ids + q * p.shards[s].id_row_stride; };
  const auto offset_of = [&](int32_t s) { return p.id_offsets != nullptr ? p.id_offsets[s] : int64_t{0}; };

  // 1. Sorted rows: a bound on the k-th key from S loads: the largest key at row position bound_position - 1
  //    (positions chosen so that the rows' first bound_position candidates number at least k). Only keys up to
  //    it are listed for the passes below; if padding or disorder leaves fewer than needed, they visit all.
  bool use_list = p.bound_position > 0 && sizeof(Bits) <= sizeof(uint32_t);  // (fp64 keys: no scratch words)
  Bits bound = F::kAllOnes;
  if (use_list) {
    for (int32_t base = 0; base < p.num_shards; base += kLanes) {
      KARMA_EACH_LANE(lane) {
        const int32_t s = base + lane;
        if (s >= p.num_shards) continue;
        shard_begin[s] = p.shards[s].begin;
        const int32_t j = (p.bound_position < p.shards[s].width ? p.bound_position : p.shards[s].width) - 1;
        histogram[s] = j >= 0 ? static_cast<uint32_t>(sort_key<F, Largest>(distance_row(s)[j])) : 0u;
      }
    }
    warp::sync_warp();
    bound = 0;
    for (int32_t s = 0; s < p.num_shards; ++s) bound = static_cast<Bits>(histogram[s]) > bound ? static_cast<Bits>(histogram[s]) : bound;
    warp::sync_warp();
  }
  // 2. Stage the keys; list the ones up to the bound.
  int32_t listed = 0;
  for (int32_t s = 0; s < p.num_shards; ++s) {
    const Bits* row = distance_row(s);
    for (int32_t base = 0; base < p.shards[s].width; base += kLanes) {
      Lanes<bool> under;
      KARMA_EACH_LANE(lane) {
        const int32_t j = base + lane;
        under[lane] = false;
        if (j >= p.shards[s].width) continue;
        const Bits key = sort_key<F, Largest>(row[j]);
        keys[p.shards[s].begin + j] = key;
        under[lane] = key <= bound;
      }
      if (use_list) {
        const uint32_t under_mask = warp::ballot(under);
        if (listed + warp::popc(under_mask) > layout.list_capacity) use_list = false;  // too many: visit all
      }
      if (use_list) {
        const uint32_t under_mask = warp::ballot(under);
        KARMA_EACH_LANE(lane) {
          if (under[lane]) {
            list[listed + warp::popc(under_mask & warp::lanes_below(lane))] =
                (static_cast<uint32_t>(s) << 24) | static_cast<uint32_t>(base + lane);
          }
        }
        listed += warp::popc(under_mask);
      }
    }
  }
  warp::sync_warp();

  int32_t live = n;             // candidates not removed (padding, a worse occurrence of an id under dedup)
  int32_t live_listed = listed;  // of them, listed
  uint32_t count = 0;
  while (live > 0) {
    count = static_cast<uint32_t>(live < p.k ? live : p.k);
    if (use_list && live_listed < static_cast<int32_t>(count)) use_list = false;  // the k-th key may lie above the bound
    const auto each_slice = [&](auto&& visit) { for_each_slice(p, shard_begin, list, listed, use_list, visit); };
    // 3. The count-th key.
    const Selection<Bits> threshold = radix_select<Bits>(count, histogram, [&](Bits prefix, Bits mask, int shift) {
      each_slice([&](const Lanes<bool>& valid, const Lanes<int32_t>&, const Lanes<int32_t>&,
                     const Lanes<int32_t>& index) {
        Lanes<Bits> key;
        KARMA_EACH_LANE(lane) { key[lane] = valid[lane] ? keys[index[lane]] : Bits{0}; }
        count_digits(valid, key, prefix, mask, shift, histogram);
      });
    });
    const Bits last_key = threshold.value;
    // 4. The ids of every candidate up to the threshold: padding there is removed and the select repeats.
    int32_t removed = 0;
    int32_t removed_listed = 0;
    each_slice([&](const Lanes<bool>& valid, const Lanes<int32_t>& shard, const Lanes<int32_t>& pos,
                   const Lanes<int32_t>& index) {
      Lanes<bool> drop;
      KARMA_EACH_LANE(lane) {
        drop[lane] = false;
        if (!valid[lane] || keys[index[lane]] > last_key) continue;
        const int32_t s = shard[lane];
        const int64_t local_id = id_row(s)[pos[lane]];
        int64_t global_id;
        if (local_id >= 0 && !translate_id(local_id, offset_of(s), &global_id)) {
          errors.record_overflow(s, local_id, offset_of(s));
        } else if (local_id >= 0) {
          continue;
        }
        drop[lane] = true;
      }
      Lanes<bool> listed_drop;
      KARMA_EACH_LANE(lane) {
        listed_drop[lane] = drop[lane] && keys[index[lane]] <= bound;
        if (drop[lane]) keys[index[lane]] = F::kPaddingKey;
      }
      removed += warp::popc(warp::ballot(drop));
      removed_listed += warp::popc(warp::ballot(listed_drop));
    });
    warp::sync_warp();
    if (removed > 0) {
      live -= removed;
      live_listed -= removed_listed;
      continue;
    }
    // 5. More candidates at the threshold than room: the smallest ids among them.
    const bool cut_ties = threshold.equal > threshold.need;
    Selection<uint64_t> id_cut = {0, 0, 0};
    if (cut_ties) {
      id_cut = radix_select<uint64_t>(threshold.need, histogram, [&](uint64_t prefix, uint64_t mask, int shift) {
        each_slice([&](const Lanes<bool>& valid, const Lanes<int32_t>& shard, const Lanes<int32_t>& pos,
                       const Lanes<int32_t>& index) {
          Lanes<bool> offered;
          Lanes<uint64_t> id;
          KARMA_EACH_LANE(lane) {
            offered[lane] = valid[lane] && keys[index[lane]] == last_key;
            id[lane] = offered[lane] ? static_cast<uint64_t>(id_row(shard[lane])[pos[lane]] + offset_of(shard[lane])) : 0;
          }
          count_digits(offered, id, prefix, mask, shift, histogram);
        });
      });
    }
    // 6. Compact the survivors: keys below the threshold, and at it the chosen ids (equal ids: the first ones).
    uint32_t taken = 0;
    uint32_t taken_at_cut = 0;
    each_slice([&](const Lanes<bool>& valid, const Lanes<int32_t>& shard, const Lanes<int32_t>& pos,
                   const Lanes<int32_t>& index) {
      Lanes<bool> take;
      Lanes<bool> at_cut;
      Lanes<Entry> entry;
      KARMA_EACH_LANE(lane) {
        take[lane] = false;
        at_cut[lane] = false;
        if (!valid[lane]) continue;
        const Bits key = keys[index[lane]];
        if (key > last_key) continue;
        const int32_t s = shard[lane];
        entry[lane] = Entry{key, id_row(s)[pos[lane]] + offset_of(s), s, pos[lane]};
        const uint64_t id = static_cast<uint64_t>(entry[lane].id);
        take[lane] = key < last_key || !cut_ties || id < id_cut.value;
        at_cut[lane] = !take[lane] && id == id_cut.value;
      }
      const uint32_t cut_mask = warp::ballot(at_cut);
      KARMA_EACH_LANE(lane) {
        if (at_cut[lane]) take[lane] = taken_at_cut + warp::popc(cut_mask & warp::lanes_below(lane)) < id_cut.need;
      }
      taken_at_cut += warp::popc(cut_mask);
      const uint32_t take_mask = warp::ballot(take);
      KARMA_EACH_LANE(lane) {
        if (take[lane]) entries[taken + warp::popc(take_mask & warp::lanes_below(lane))] = entry[lane];
      }
      taken += warp::popc(take_mask);
    });
    for (int32_t base = static_cast<int32_t>(count); base < layout.sort_size; base += kLanes) {
      KARMA_EACH_LANE(lane) {
        if (base + lane < layout.sort_size) entries[base + lane] = Entry{~uint64_t{0}, INT64_MAX, 0, 0};
      }
    }
    warp::sync_warp();
    if (!p.dedup) break;
    // dedup: by id, a repeated id's later entries are worse occurrences; remove them and select again.
    bitonic_sort<true>(entries, layout.sort_size);
    for (int32_t base = 1; base < static_cast<int32_t>(count); base += kLanes) {
      Lanes<bool> drop;
      KARMA_EACH_LANE(lane) {
        const int32_t i = base + lane;
        drop[lane] = i < static_cast<int32_t>(count) && entries[i].id == entries[i - 1].id;
        if (drop[lane]) keys[p.shards[entries[i].shard].begin + entries[i].pos] = F::kDroppedKey;
      }
      removed += warp::popc(warp::ballot(drop));
    }
    warp::sync_warp();
    if (removed == 0) break;
    live -= removed;
    live_listed -= removed;  // survivors are at most the threshold, so listed whenever the list is in use
    count = 0;
  }
  if (live == 0) count = 0;
  bitonic_sort<false>(entries, layout.sort_size);

  // 6. sorted=True: each survivor is in order with the real candidates next to it in its row.
  if (p.check_sorted) {
    for (int32_t base = 0; base < static_cast<int32_t>(count); base += kLanes) {
      KARMA_EACH_LANE(lane) {
        if (base + lane >= static_cast<int32_t>(count)) continue;
        const Entry e = entries[base + lane];
        const Bits* row = distance_row(e.shard);
        const int64_t* ids = id_row(e.shard);
        for (int32_t j = e.pos + 1; j < p.shards[e.shard].width; ++j) {  // the next real candidate
          if (ids[j] < 0) continue;
          if (sort_key<F, Largest>(row[j]) < e.key) errors.record_unsorted(e.shard, q);
          break;
        }
        for (int32_t j = e.pos - 1; j >= 0; --j) {  // the previous one
          if (ids[j] < 0) continue;
          if (sort_key<F, Largest>(row[j]) > e.key) errors.record_unsorted(e.shard, q);
          break;
        }
      }
    }
  }
  Bits* out_distances = static_cast<Bits*>(p.out_distances) + q * p.k;
  int64_t* out_ids = p.out_ids + q * p.k;
  for (int32_t base = 0; base < p.k; base += kLanes) {
    KARMA_EACH_LANE(lane) {
      const int32_t i = base + lane;
      if (i >= p.k) continue;
      const bool real = i < static_cast<int32_t>(count);
      out_distances[i] = real ? distance_bits<F, Largest>(static_cast<Bits>(entries[i].key)) : padding_bits<F, Largest>();
      out_ids[i] = real ? entries[i].id : -1;
    }
  }
}

// Calls fn(Format{}, BoolTag<largest>{}) for a KarmaTopkDtype; false for an unknown dtype.
template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

template <typename Fn>
bool dispatch(int32_t dtype, bool largest, Fn&& fn) {
  const auto by_metric = [&](auto format) {
    if (largest) {
      fn(format, BoolTag<true>{});
    } else {
      fn(format, BoolTag<false>{});
    }
  };
  switch (dtype) {
    case KARMA_TOPK_FLOAT32: by_metric(Float32{}); return true;
    case KARMA_TOPK_FLOAT64: by_metric(Float64{}); return true;
    case KARMA_TOPK_FLOAT16: by_metric(Float16{}); return true;
    case KARMA_TOPK_BFLOAT16: by_metric(BFloat16{}); return true;
    default: return false;
  }
}

}  // namespace warp_merge
}  // namespace topk
}  // namespace karma
