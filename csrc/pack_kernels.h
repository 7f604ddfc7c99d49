// GPU gather of many device segments into one snapshot buffer + FF31 checksums in the same pass.
// Plain CUDA C++ interface: no torch, no Python (bindings.cpp adapts tensors). docs/FORMAT.md
// defines the checksum; pack_cpu.cpp computes the same sums on the CPU.
//
// Work decomposition
//   Every segment is cut into chunks of kCudaChunkBytes (the last one shorter); a thread block
//   handles one chunk at a time (grid-stride, so the grid can be capped to leave SMs to compute).
//   chunk_begin[s] is the prefix sum of the chunk counts, so one launch covers many tiny segments
//   and one huge one alike; a block finds its segment by binary search in that table.
//   Each chunk writes its partial sums (a, b), each < P, to a workspace; pack_cuda_finalize
//   combines them per segment (addition mod P is exact in any order once the parts are reduced).
//
// Chunked issue: pack_cuda_chunks(chunk_lo, chunk_hi) packs a sub-range of the chunks, so a
// snapshot can be issued in several launches (e.g. spread over the next step's forward and
// backward); finalize once after the last range has been issued on the same stream.
//
// Destination: device memory, or pinned host memory through its device pointer (mapped / UVA),
// or nullptr for checksum-only (verification after a restore). Byte k of segment s goes to
// dst + segs[s].dst_offset + k - dst_base: dst_base lets a caller pack a window of the snapshot
// into a small device staging buffer. Nothing between segments is written.
//
// Alignment: 16-byte vector loads/stores. Sources may have any alignment and any size: a
// misaligned source is read as aligned 16-byte blocks (only blocks holding at least one byte of
// the segment, so no access can leave the pages of the allocation) and re-aligned with funnel
// shifts; the last partial vector of a segment is copied bytewise. A destination that is not
// 16-byte aligned (segment offsets are 64-byte aligned in the snapshot format, so only a
// misaligned base) takes a slow bytewise store path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pack.h"

namespace fftrainer {

// Bytes per work item. A multiple of 16 (vectors never straddle chunks) and of 4 (words never
// straddle). 64 KiB x 256 threads = 64 words per thread: sum (j+1)*w < 2^14 * 2^32 * 64 = 2^52.
constexpr uint64_t kCudaChunkBytes = 64 * 1024;
constexpr int kCudaBlockThreads = 256;

// Partial sums of one chunk, each already reduced mod P (so < 2^31).
struct ChunkPartial {
  uint32_t a;
  uint32_t b;
};

inline uint64_t cuda_chunks_of(uint64_t nbytes) { return (nbytes + kCudaChunkBytes - 1) / kCudaChunkBytes; }

// Host: fill chunk_begin[0..num_segs] with the prefix sums of the chunk counts and return the total.
// A segment of 0 bytes has no chunk (its checksum is ff31_finish(0, 0, 0)).
uint64_t cuda_plan_chunks(const Segment* segs, size_t num_segs, uint64_t* chunk_begin);

// Device: pack chunks [chunk_lo, chunk_hi) of the plan. d_segs (num_segs entries, src = device
// pointers), d_chunk_begin (num_segs + 1) and d_partials (one per chunk of the whole plan) are in
// device-accessible memory. dst may be nullptr (checksum only). max_blocks caps the grid (0: one
// block per chunk). Returns the launch error, if any; an empty range launches nothing.
cudaError_t pack_cuda_chunks(uint8_t* dst, uint64_t dst_base, const Segment* d_segs, const uint64_t* d_chunk_begin,
                             size_t num_segs, uint64_t chunk_lo, uint64_t chunk_hi, ChunkPartial* d_partials,
                             int max_blocks, cudaStream_t stream);

// Device: combine the partials of every segment into its 64-bit FF31 checksum (d_checksums has
// num_segs entries, device-accessible). Issue after every chunk range on the same stream.
cudaError_t pack_cuda_finalize(const Segment* d_segs, const uint64_t* d_chunk_begin, size_t num_segs,
                               const ChunkPartial* d_partials, uint64_t* d_checksums, cudaStream_t stream);

// Convenience: all chunks, then finalize.
cudaError_t pack_cuda(uint8_t* dst, const Segment* d_segs, const uint64_t* d_chunk_begin, size_t num_segs,
                      uint64_t num_chunks, ChunkPartial* d_partials, uint64_t* d_checksums, int max_blocks,
                      cudaStream_t stream);

// Host-only emulation of exactly the per-thread code of the kernels (the same functions; the
// threads of a block run one after another). For tests on machines without a GPU: segs[].src and
// dst are host pointers, partials has one entry per chunk of the whole plan and keeps its values
// between calls (so chunk ranges can be packed in several calls); when checksums is not null the
// call ends with the finalize step. Returns the number of chunks of the plan. C linkage, for ctypes.
extern "C" uint64_t fftrainer_pack_emulate_host(uint8_t* dst, uint64_t dst_base, const Segment* segs,
                                                size_t num_segs, uint64_t chunk_lo, uint64_t chunk_hi,
                                                ChunkPartial* partials, uint64_t* checksums);

}  // namespace fftrainer
