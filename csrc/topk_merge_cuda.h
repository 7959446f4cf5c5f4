// C ABI between the plain-CUDA kernel (topk_merge_cuda.cu) and the torch binding (topk_merge_cuda_binding.cpp).
#pragma once

#include <stdint.h>

#define KARMA_TOPK_MAX_SHARDS_PER_LANE 8
#define KARMA_TOPK_MAX_SHARDS (32 * KARMA_TOPK_MAX_SHARDS_PER_LANE)

enum KarmaTopkDtype { KARMA_TOPK_FLOAT32 = 0, KARMA_TOPK_FLOAT16 = 1, KARMA_TOPK_BFLOAT16 = 2, KARMA_TOPK_FLOAT64 = 3 };

// One shard's rows, on the device: distances[q * distance_row_stride + j], ids[q * id_row_stride + j], j < width.
typedef struct KarmaTopkShard {
  const void* distances;
  const int64_t* ids;
  int64_t distance_row_stride;
  int64_t id_row_stride;
  int64_t width;
} KarmaTopkShard;

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of device scratch the launcher needs (one row of k candidates per query).
int64_t karma_topk_merge_cuda_scratch_bytes(int32_t dtype, int64_t num_queries, int64_t k);

// Merges rows sorted by distance. shards_device: num_shards entries in device memory; id_offsets_device: NULL or
// num_shards int64 on the device; error_flag_device: one int32, set to 1 when an offset overflows int64.
// Returns a cudaError_t value (0 on success). Asynchronous on `stream` (a cudaStream_t).
int karma_topk_merge_cuda(const KarmaTopkShard* shards_device, const int64_t* id_offsets_device, int32_t num_shards,
                          int64_t num_queries, int64_t k, int32_t dtype, int32_t largest, int32_t dedup,
                          void* scratch, void* out_distances, int64_t* out_ids, int32_t* error_flag_device,
                          void* stream);

#ifdef __cplusplus
}
#endif
