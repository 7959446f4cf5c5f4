// C ABI between the plain-CUDA kernel (topk_merge_cuda.cu), its torch binding (topk_merge_cuda_binding.cpp) and the
// host build of the same warp algorithm (topk_merge_warp_host.cpp). Plain C: no torch, no CUDA headers.
#pragma once

#include <stdint.h>

// Shards per call on the warp path: the shard table travels in the kernel's parameters (64 x 40 B, under the
// 4 KiB parameter limit of every driver), so a launch needs no host-to-device copy.
#define KARMA_TOPK_MAX_SHARDS 64

enum KarmaTopkDtype { KARMA_TOPK_FLOAT32 = 0, KARMA_TOPK_FLOAT16 = 1, KARMA_TOPK_BFLOAT16 = 2, KARMA_TOPK_FLOAT64 = 3 };

// One shard's rows: distances[q * distance_row_stride + j], ids[q * id_row_stride + j], j < width (rows contiguous).
// begin: the index of the shard's first candidate among the query's candidates (the widths of the shards before).
typedef struct KarmaTopkShard {
  const void* distances;
  const int64_t* ids;
  int64_t distance_row_stride;
  int64_t id_row_stride;
  int32_t width;
  int32_t begin;
} KarmaTopkShard;

typedef struct KarmaTopkParams {
  int64_t num_queries;
  const int64_t* id_offsets;  // NULL, or num_shards int64 (on the device for the kernel)
  void* out_distances;        // (num_queries, k), the distances' dtype
  int64_t* out_ids;           // (num_queries, k)
  int32_t num_shards;
  int32_t total_width;        // candidates per query: the sum of the widths
  int32_t k;
  int32_t dtype;              // a KarmaTopkDtype
  int32_t largest;            // 1: "ip" (descending score)
  int32_t dedup;
  int32_t check_sorted;       // 1: sorted=True, report a row read out of order
  int32_t bound_position;     // sorted rows: the rows' first bound_position candidates number >= k (0: unused)
  KarmaTopkShard shards[KARMA_TOPK_MAX_SHARDS];
} KarmaTopkParams;

#ifdef __cplusplus
extern "C" {
#endif

// Launches the merge of params->num_queries queries on `stream` (a cudaStream_t), asynchronously: no host sync,
// no copy. A bad id offset or (check_sorted) an unsorted row stops the kernel with a device-side assert, reported
// by the next synchronising CUDA call, like torch's own device-side index checks. Returns a cudaError_t value.
int karma_topk_merge_cuda(const KarmaTopkParams* params, void* stream);

#ifdef __cplusplus
}
#endif
