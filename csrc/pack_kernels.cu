// GPU gather + FF31 checksum. See pack_kernels.h for the scheme and docs/FORMAT.md for the sums.
//
// The per-thread work (locate the chunk, load/re-align/store 16-byte vectors, accumulate) is in
// __host__ __device__ functions shared by the kernels and by fftrainer_pack_emulate_host, so the
// logic is tested byte for byte against the pure-torch reference on machines without a GPU.
#include <cuda_runtime.h>

#include <algorithm>

#include "pack_kernels.h"

namespace fftrainer {
namespace {

constexpr uint64_t P = kFF31Prime;
constexpr unsigned kFullMask = 0xffffffffu;

// Running sums of one thread over words with chunk-local index j: a = sum w, b = sum (j+1) w.
// At most 64 words per thread (kCudaChunkBytes / 4 / kCudaBlockThreads): b < 2^52, no overflow.
struct Sums {
  uint64_t a;
  uint64_t b;
};

// One chunk as seen by a block: bytes [0, len) of src go to dst (nullptr: checksum only).
struct ChunkRef {
  const uint8_t* src;
  uint8_t* dst;
  uint64_t len;
  uint64_t first_word;  // index of the chunk's first word within its segment
};

__host__ __device__ __forceinline__ uint32_t funnel_r(uint32_t lo, uint32_t hi, uint32_t r) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, r);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (r & 31));
#endif
}

// Aligned source read once: streaming (evict-first) so the snapshot does not flush compute's L2.
__host__ __device__ __forceinline__ uint4 load16_stream(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldcs(p);
#else
  return *p;
#endif
}

// Misaligned source: neighbouring threads read the same block, keep it cached for them.
__host__ __device__ __forceinline__ uint4 load16_shared(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

__host__ __device__ __forceinline__ void store16(uint8_t* d, uint4 v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<uint4*>(d) = v;
    return;
  }
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int i = 0; i < 4; ++i) d[4 * k + i] = static_cast<uint8_t>(w[k] >> (8 * i));
  }
}

__host__ __device__ __forceinline__ void add_word(Sums& s, uint32_t w, uint64_t j) {
  s.a += w;
  s.b += (j + 1) * static_cast<uint64_t>(w);
}

__host__ __device__ __forceinline__ void add_vec(Sums& s, uint4 v, uint64_t j0) {
  add_word(s, v.x, j0);
  add_word(s, v.y, j0 + 1);
  add_word(s, v.z, j0 + 2);
  add_word(s, v.w, j0 + 3);
}

// 16 bytes starting at byte 4*Q + r/8 of the 32-byte window lo|hi (little-endian words).
template <int Q>
__host__ __device__ __forceinline__ uint4 extract(uint4 lo, uint4 hi, uint32_t r) {
  const uint32_t x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  return make_uint4(funnel_r(x[Q], x[Q + 1], r), funnel_r(x[Q + 1], x[Q + 2], r), funnel_r(x[Q + 2], x[Q + 3], r),
                    funnel_r(x[Q + 3], x[Q + 4], r));
}

__host__ __device__ __forceinline__ void vectors_aligned(const ChunkRef& c, uint64_t nvec, bool dst_al, uint32_t tid,
                                                         uint32_t nthreads, Sums& s) {
  const uint4* src = reinterpret_cast<const uint4*>(c.src);
#pragma unroll 4
  for (uint64_t v = tid; v < nvec; v += nthreads) {
    const uint4 x = load16_stream(src + v);
    if (c.dst) store16(c.dst + 16 * v, x, dst_al);
    add_vec(s, x, 4 * v);
  }
}

// Source address = 16k + shift, shift in 1..15, Q = shift / 4. Vector v needs the aligned blocks
// v and v + 1 of base = src - shift; both hold at least one byte of vector v (shift > 0), so every
// block read belongs to the segment's own pages.
template <int Q>
__host__ __device__ __forceinline__ void vectors_shifted(const ChunkRef& c, uint64_t nvec, uint32_t shift, bool dst_al,
                                                         uint32_t tid, uint32_t nthreads, Sums& s) {
  const uint4* base = reinterpret_cast<const uint4*>(c.src - shift);
  const uint32_t r = (shift & 3) * 8;
#pragma unroll 4
  for (uint64_t v = tid; v < nvec; v += nthreads) {
    const uint4 x = extract<Q>(load16_shared(base + v), load16_shared(base + v + 1), r);
    if (c.dst) store16(c.dst + 16 * v, x, dst_al);
    add_vec(s, x, 4 * v);
  }
}

// Bytes [from, len) of the chunk (fewer than 16, only in a segment's last chunk), the last word
// zero-padded as the format defines.
__host__ __device__ __forceinline__ void tail_bytes(const ChunkRef& c, uint64_t from, Sums& s) {
  for (uint64_t w0 = from; w0 < c.len; w0 += 4) {
    uint32_t w = 0;
    for (uint64_t i = 0; i < 4 && w0 + i < c.len; ++i) {
      const uint8_t byte = c.src[w0 + i];
      if (c.dst) c.dst[w0 + i] = byte;
      w |= static_cast<uint32_t>(byte) << (8 * i);
    }
    add_word(s, w, w0 / 4);
  }
}

// Everything thread tid of nthreads does for one chunk; returns its sums reduced mod P.
__host__ __device__ __forceinline__ Sums chunk_thread(const ChunkRef& c, uint32_t tid, uint32_t nthreads) {
  Sums s{0, 0};
  const uint64_t nvec = c.len / 16;
  const uint32_t shift = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(c.src) & 15);
  const bool dst_al = c.dst == nullptr || (reinterpret_cast<uintptr_t>(c.dst) & 15) == 0;
  if (nvec) {
    if (shift == 0) {
      vectors_aligned(c, nvec, dst_al, tid, nthreads, s);
    } else {
      switch (shift >> 2) {
        case 0: vectors_shifted<0>(c, nvec, shift, dst_al, tid, nthreads, s); break;
        case 1: vectors_shifted<1>(c, nvec, shift, dst_al, tid, nthreads, s); break;
        case 2: vectors_shifted<2>(c, nvec, shift, dst_al, tid, nthreads, s); break;
        default: vectors_shifted<3>(c, nvec, shift, dst_al, tid, nthreads, s); break;
      }
    }
  }
  if (tid == 0 && nvec * 16 < c.len) tail_bytes(c, nvec * 16, s);
  s.a %= P;
  s.b %= P;
  return s;
}

// Largest s in [0, n) with chunk_begin[s] <= c: the segment holding chunk c (empty segments,
// whose begin equals the next one's, are skipped).
__host__ __device__ __forceinline__ size_t find_segment(const uint64_t* chunk_begin, size_t n, uint64_t c) {
  size_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    if (chunk_begin[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__host__ __device__ __forceinline__ ChunkRef make_chunk(uint8_t* dst, uint64_t dst_base, const Segment* segs,
                                                        const uint64_t* chunk_begin, size_t n, uint64_t c) {
  const size_t s = find_segment(chunk_begin, n, c);
  const Segment seg = segs[s];
  const uint64_t off = (c - chunk_begin[s]) * kCudaChunkBytes;
  ChunkRef r;
  r.src = seg.src + off;
  r.dst = dst ? dst + (seg.dst_offset + off - dst_base) : nullptr;
  r.len = seg.nbytes - off < kCudaChunkBytes ? seg.nbytes - off : kCudaChunkBytes;
  r.first_word = off / 4;
  return r;
}

// Block sums (each thread's part < P, so the block total < 2^39) re-based to the segment's word
// index: word j of the chunk has weight first_word + j + 1.
__host__ __device__ __forceinline__ ChunkPartial rebase(uint64_t a, uint64_t b, uint64_t first_word) {
  a %= P;
  b = (b % P + (first_word % P) * a) % P;
  return ChunkPartial{static_cast<uint32_t>(a), static_cast<uint32_t>(b)};
}

__host__ __device__ __forceinline__ uint64_t finish(uint64_t a, uint64_t b, uint64_t nbytes) {
  a = (1 + a) % P;
  b = (nbytes % P + b) % P;
  return (b << 32) | a;
}

__global__ void __launch_bounds__(kCudaBlockThreads)
    pack_chunks_kernel(uint8_t* dst, uint64_t dst_base, const Segment* segs, const uint64_t* chunk_begin, size_t n,
                       uint64_t chunk_lo, uint64_t chunk_hi, ChunkPartial* partials) {
  constexpr int kWarps = kCudaBlockThreads / 32;
  __shared__ uint64_t red_a[kWarps];
  __shared__ uint64_t red_b[kWarps];
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (uint64_t c = chunk_lo + blockIdx.x; c < chunk_hi; c += gridDim.x) {
    const ChunkRef ref = make_chunk(dst, dst_base, segs, chunk_begin, n, c);
    Sums s = chunk_thread(ref, threadIdx.x, blockDim.x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s.a += __shfl_down_sync(kFullMask, s.a, o);
      s.b += __shfl_down_sync(kFullMask, s.b, o);
    }
    if (lane == 0) {
      red_a[warp] = s.a;
      red_b[warp] = s.b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t a = 0, b = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        a += red_a[w];
        b += red_b[w];
      }
      partials[c] = rebase(a, b, ref.first_word);
    }
    __syncthreads();  // red_a/red_b are reused by the next chunk
  }
}

// One warp per segment: lanes stride over its chunks' partials (each < 2^31; at most 2^27 per
// lane for a 2^48-byte segment, so the lane sums stay below 2^58).
__global__ void finalize_kernel(const Segment* segs, const uint64_t* chunk_begin, size_t n,
                                const ChunkPartial* partials, uint64_t* out) {
  const uint64_t s = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x & 31;
  if (s >= n) return;  // warp-uniform
  uint64_t a = 0, b = 0;
  for (uint64_t c = chunk_begin[s] + lane; c < chunk_begin[s + 1]; c += 32) {
    a += partials[c].a;
    b += partials[c].b;
  }
  a %= P;
  b %= P;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(kFullMask, a, o);
    b += __shfl_down_sync(kFullMask, b, o);
  }
  if (lane == 0) out[s] = finish(a % P, b % P, segs[s].nbytes);
}

}  // namespace

uint64_t cuda_plan_chunks(const Segment* segs, size_t num_segs, uint64_t* chunk_begin) {
  uint64_t total = 0;
  for (size_t s = 0; s < num_segs; ++s) {
    chunk_begin[s] = total;
    total += cuda_chunks_of(segs[s].nbytes);
  }
  chunk_begin[num_segs] = total;
  return total;
}

cudaError_t pack_cuda_chunks(uint8_t* dst, uint64_t dst_base, const Segment* d_segs, const uint64_t* d_chunk_begin,
                             size_t num_segs, uint64_t chunk_lo, uint64_t chunk_hi, ChunkPartial* d_partials,
                             int max_blocks, cudaStream_t stream) {
  if (chunk_hi < chunk_lo) return cudaErrorInvalidValue;
  if (chunk_hi == chunk_lo || num_segs == 0) return cudaSuccess;
  uint64_t grid = chunk_hi - chunk_lo;
  if (max_blocks > 0) grid = std::min<uint64_t>(grid, static_cast<uint64_t>(max_blocks));
  grid = std::min<uint64_t>(grid, 0x7fffffffull);
  pack_chunks_kernel<<<static_cast<unsigned>(grid), kCudaBlockThreads, 0, stream>>>(
      dst, dst_base, d_segs, d_chunk_begin, num_segs, chunk_lo, chunk_hi, d_partials);
  return cudaGetLastError();
}

cudaError_t pack_cuda_finalize(const Segment* d_segs, const uint64_t* d_chunk_begin, size_t num_segs,
                               const ChunkPartial* d_partials, uint64_t* d_checksums, cudaStream_t stream) {
  if (num_segs == 0) return cudaSuccess;
  constexpr unsigned kThreads = 256;
  const uint64_t blocks = (num_segs * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffull) return cudaErrorInvalidValue;
  finalize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(d_segs, d_chunk_begin, num_segs,
                                                                          d_partials, d_checksums);
  return cudaGetLastError();
}

cudaError_t pack_cuda(uint8_t* dst, const Segment* d_segs, const uint64_t* d_chunk_begin, size_t num_segs,
                      uint64_t num_chunks, ChunkPartial* d_partials, uint64_t* d_checksums, int max_blocks,
                      cudaStream_t stream) {
  cudaError_t err =
      pack_cuda_chunks(dst, 0, d_segs, d_chunk_begin, num_segs, 0, num_chunks, d_partials, max_blocks, stream);
  if (err != cudaSuccess) return err;
  return pack_cuda_finalize(d_segs, d_chunk_begin, num_segs, d_partials, d_checksums, stream);
}

extern "C" uint64_t fftrainer_pack_emulate_host(uint8_t* dst, uint64_t dst_base, const Segment* segs,
                                                size_t num_segs, uint64_t chunk_lo, uint64_t chunk_hi,
                                                ChunkPartial* partials, uint64_t* checksums) {
  if (num_segs == 0) return 0;
  // Small host-side table, like the one bindings.cpp uploads (no std::vector across the C ABI).
  uint64_t* chunk_begin = new uint64_t[num_segs + 1];
  const uint64_t total = cuda_plan_chunks(segs, num_segs, chunk_begin);
  chunk_hi = std::min(chunk_hi, total);
  for (uint64_t c = chunk_lo; c < chunk_hi; ++c) {
    const ChunkRef ref = make_chunk(dst, dst_base, segs, chunk_begin, num_segs, c);
    uint64_t a = 0, b = 0;
    for (uint32_t t = 0; t < static_cast<uint32_t>(kCudaBlockThreads); ++t) {
      const Sums s = chunk_thread(ref, t, kCudaBlockThreads);
      a += s.a;
      b += s.b;
    }
    partials[c] = rebase(a, b, ref.first_word);
  }
  if (checksums) {
    for (size_t s = 0; s < num_segs; ++s) {
      uint64_t a = 0, b = 0;
      for (uint32_t lane = 0; lane < 32; ++lane) {
        uint64_t la = 0, lb = 0;
        for (uint64_t c = chunk_begin[s] + lane; c < chunk_begin[s + 1]; c += 32) {
          la += partials[c].a;
          lb += partials[c].b;
        }
        a += la % P;
        b += lb % P;
      }
      checksums[s] = finish(a % P, b % P, segs[s].nbytes);
    }
  }
  delete[] chunk_begin;
  return total;
}

}  // namespace fftrainer
