// CUDA kernel of karma::topk_merge: one warp per query merges the S sorted shard rows. Plain CUDA (no torch
// headers, which do not compile with every CUDA toolkit); the torch-facing binding in
// topk_merge_cuda_binding.cpp calls the C-ABI launcher at the bottom.
//
// Lane l owns shards l, l + 32, ... (at most kMaxShardsPerLane each). Each step the lanes reduce their best
// heads to the warp's best with shuffles, lane 0 feeds it to the shared TopKCollector (topk_merge.h), and the
// owning lane advances that shard. Reads about k + S candidates per query, like the CPU merge. Unsorted rows are
// sorted per shard by the binding first.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "topk_merge.h"
#include "topk_merge_cuda.h"

namespace karma {
namespace topk {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float load_key(const float* p) { return *p; }
__device__ __forceinline__ double load_key(const double* p) { return *p; }
__device__ __forceinline__ float load_key(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_key(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

template <typename scalar_t, typename Key, bool Largest>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    topk_merge_sorted_kernel(const KarmaTopkShard* __restrict__ shards, const int64_t* __restrict__ id_offsets,
                             int32_t num_shards, int64_t num_queries, int64_t k, int32_t dedup,
                             Candidate* __restrict__ scratch, scalar_t* __restrict__ out_distances,
                             int64_t* __restrict__ out_ids, int32_t* __restrict__ error_flag) {
  const int lane = threadIdx.x % kWarp;
  // 64-bit index math throughout: Q * k may exceed 2^31.
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (query >= num_queries) return;

  int64_t positions[KARMA_TOPK_MAX_SHARDS_PER_LANE] = {};
  Candidate heads[KARMA_TOPK_MAX_SHARDS_PER_LANE];
  bool alive[KARMA_TOPK_MAX_SHARDS_PER_LANE] = {};
  bool failed = false;

  // Moves owned slot j (shard lane + 32 j) to its next real candidate at or after positions[j].
  auto advance = [&](int j) {
    const int s = lane + kWarp * j;
    const KarmaTopkShard shard = shards[s];
    const int64_t* row_ids = shard.ids + query * shard.id_row_stride;
    int64_t pos = positions[j];
    while (pos < shard.width && row_ids[pos] < 0) ++pos;
    positions[j] = pos;
    alive[j] = pos < shard.width;
    if (!alive[j]) return;
    int64_t global_id;
    const int64_t offset = id_offsets != nullptr ? id_offsets[s] : 0;
    if (!translate_id(row_ids[pos], offset, &global_id)) {
      atomicExch(error_flag, 1);
      failed = true;
      alive[j] = false;
      return;
    }
    const scalar_t* row_distances = static_cast<const scalar_t*>(shard.distances) + query * shard.distance_row_stride;
    heads[j].key = sort_key<Largest>(static_cast<Key>(load_key(row_distances + pos)));
    heads[j].id = global_id;
  };

#pragma unroll
  for (int j = 0; j < KARMA_TOPK_MAX_SHARDS_PER_LANE; ++j) {
    positions[j] = 0;
    alive[j] = false;
    if (lane + kWarp * j < num_shards) advance(j);
  }

  Candidate* collected = scratch + query * k;
  TopKCollector collector(collected, k);  // only lane 0 feeds it
  while (true) {
    if (__any_sync(0xffffffffu, failed)) break;
    // This lane's best head.
    int best_slot = -1;
#pragma unroll
    for (int j = 0; j < KARMA_TOPK_MAX_SHARDS_PER_LANE; ++j) {
      if (alive[j] && (best_slot < 0 || ranks_before(heads[j], heads[best_slot]))) best_slot = j;
    }
    Candidate best;
    best.key = 0;
    best.id = 0;
    bool has_best = best_slot >= 0;
    int best_lane = lane;
    if (has_best) best = heads[best_slot];
    // Butterfly reduction: every lane ends with the warp's best head and the lane that owns it.
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask /= 2) {
      Candidate other;
      other.key = shfl_xor(best.key, mask);
      other.id = shfl_xor(best.id, mask);
      const bool other_has = shfl_xor(static_cast<int>(has_best), mask) != 0;
      const int other_lane = shfl_xor(best_lane, mask);
      const bool take = other_has && (!has_best || ranks_before(other, best) ||
                                      (!ranks_before(best, other) && other_lane < best_lane));
      if (take) {
        best = other;
        best_lane = other_lane;
        has_best = true;
      }
    }
    if (!has_best) break;
    // Dedup: is the id already among the collected ones? Each lane scans a strided part.
    bool duplicate = false;
    if (dedup) {
      const int64_t collected_count = __shfl_sync(0xffffffffu, collector.count, 0);
      bool found = false;
      for (int64_t i = lane; i < collected_count; i += kWarp) found |= collected[i].id == best.id;
      __syncwarp();
      duplicate = __any_sync(0xffffffffu, found);
    }
    int keep_going = 1;
    if (lane == 0 && !duplicate) keep_going = collector.offer(best) ? 1 : 0;
    __syncwarp();
    keep_going = __shfl_sync(0xffffffffu, keep_going, 0);
    if (!keep_going) break;
    if (lane == best_lane) {
      ++positions[best_slot];
      advance(best_slot);
    }
  }
  __syncwarp();
  const int64_t count = __shfl_sync(0xffffffffu, collector.count, 0);
  if (lane == 0) order_ties(collected, count);
  __syncwarp();
  const Key padding = static_cast<Key>(padding_distance<Largest>());
  for (int64_t i = lane; i < k; i += kWarp) {
    const bool real = i < count;
    store(out_distances + query * k + i, real ? distance_of<Largest, Key>(collected[i].key) : padding);
    out_ids[query * k + i] = real ? collected[i].id : -1;
  }
}

template <typename scalar_t, typename Key, bool Largest>
cudaError_t launch(const KarmaTopkShard* shards, const int64_t* id_offsets, int32_t num_shards,
                   int64_t num_queries, int64_t k, int32_t dedup, void* scratch, void* out_distances,
                   int64_t* out_ids, int32_t* error_flag, cudaStream_t stream) {
  if (num_queries == 0) return cudaSuccess;
  const int64_t blocks = (num_queries + kWarpsPerBlock - 1) / kWarpsPerBlock;
  topk_merge_sorted_kernel<scalar_t, Key, Largest><<<static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, 0,
                                                    stream>>>(
      shards, id_offsets, num_shards, num_queries, k, dedup, static_cast<Candidate*>(scratch),
      static_cast<scalar_t*>(out_distances), out_ids, error_flag);
  return cudaGetLastError();
}

template <typename scalar_t, typename Key>
cudaError_t launch_metric(int32_t largest, const KarmaTopkShard* shards, const int64_t* id_offsets,
                          int32_t num_shards, int64_t num_queries, int64_t k, int32_t dedup, void* scratch,
                          void* out_distances, int64_t* out_ids, int32_t* error_flag, cudaStream_t stream) {
  return largest ? launch<scalar_t, Key, true>(shards, id_offsets, num_shards, num_queries, k, dedup, scratch,
                                               out_distances, out_ids, error_flag, stream)
                 : launch<scalar_t, Key, false>(shards, id_offsets, num_shards, num_queries, k, dedup, scratch,
                                                out_distances, out_ids, error_flag, stream);
}

}  // namespace
}  // namespace topk
}  // namespace karma

extern "C" int64_t karma_topk_merge_cuda_scratch_bytes(int32_t dtype, int64_t num_queries, int64_t k) {
  (void)dtype;  // one candidate layout (sort key, id) for every distance precision
  return static_cast<int64_t>(sizeof(karma::topk::Candidate)) * num_queries * k;
}

extern "C" int karma_topk_merge_cuda(const KarmaTopkShard* shards_device, const int64_t* id_offsets_device,
                                     int32_t num_shards, int64_t num_queries, int64_t k, int32_t dtype,
                                     int32_t largest, int32_t dedup, void* scratch, void* out_distances,
                                     int64_t* out_ids, int32_t* error_flag_device, void* stream) {
  using namespace karma::topk;
  if (num_shards < 1 || num_shards > KARMA_TOPK_MAX_SHARDS || k < 1) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t status;
  switch (dtype) {
    case KARMA_TOPK_FLOAT32:
      status = launch_metric<float, float>(largest, shards_device, id_offsets_device, num_shards, num_queries, k,
                                           dedup, scratch, out_distances, out_ids, error_flag_device, s);
      break;
    case KARMA_TOPK_FLOAT64:
      status = launch_metric<double, double>(largest, shards_device, id_offsets_device, num_shards, num_queries, k,
                                             dedup, scratch, out_distances, out_ids, error_flag_device, s);
      break;
    case KARMA_TOPK_FLOAT16:
      status = launch_metric<__half, float>(largest, shards_device, id_offsets_device, num_shards, num_queries, k,
                                            dedup, scratch, out_distances, out_ids, error_flag_device, s);
      break;
    case KARMA_TOPK_BFLOAT16:
      status = launch_metric<__nv_bfloat16, float>(largest, shards_device, id_offsets_device, num_shards,
                                                   num_queries, k, dedup, scratch, out_distances, out_ids,
                                                   error_flag_device, s);
      break;
    default:
      status = cudaErrorInvalidValue;
  }
  return static_cast<int>(status);
}
