// Gather many segments into one snapshot buffer and checksum them in the same pass.
// Plain C/C++ interface: no torch, no Python. The checksum is "FF31" (docs/FORMAT.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fftrainer {

constexpr uint64_t kFF31Prime = (1ull << 31) - 1;

struct Segment {
  const uint8_t* src;  // source bytes (host memory for the CPU kernel)
  uint64_t dst_offset; // byte offset in the destination buffer
  uint64_t nbytes;     // exact size in bytes
};

// Finish partial sums (a, b) of a whole segment of nbytes into the 64-bit checksum.
inline uint64_t ff31_finish(uint64_t a, uint64_t b, uint64_t nbytes) {
  a = (1 + a) % kFF31Prime;
  b = (nbytes % kFF31Prime + b) % kFF31Prime;
  return (b << 32) | a;
}

// CPU: copy segs[i].src -> dst + segs[i].dst_offset and write checksums[i].
// Work is split into chunks spread over num_threads threads (0 = hardware concurrency).
void pack_cpu(uint8_t* dst, const Segment* segs, size_t num_segs, uint64_t* checksums, int num_threads);

// CPU: checksum of one buffer (used by readers to verify without copying).
uint64_t checksum_cpu(const uint8_t* data, uint64_t nbytes, int num_threads);

}  // namespace fftrainer
