// Multithreaded CPU gather + FF31 checksum. See pack.h and docs/FORMAT.md.
#include "pack.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

namespace fftrainer {
namespace {

constexpr uint64_t P = kFF31Prime;
// Words per inner block: (j+1)*w < 2^10 * 2^32, and 2^10 of those sum below 2^53, so the inner
// loop needs no modulo and vectorizes; w and (w mod P) agree modulo P, so reducing once per block
// gives the same sums as the per-word definition in docs/FORMAT.md.
constexpr uint64_t kBlockWords = 1024;
// Chunk = unit of work handed to a thread; a multiple of the block so blocks never straddle.
constexpr uint64_t kChunkBytes = 1ull << 20;

struct Parts {
  uint64_t a = 0, b = 0;
};

inline uint64_t mod_p(uint64_t x) { return x % P; }

// Sums over words [first_word, first_word + n) read from src (already 4-byte complete), and
// optionally stores them to dst: one pass, data stays in registers. Cloned for AVX2 so a
// portable build still runs the wide version where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
Parts block_sums(const uint32_t* src, uint32_t* dst, uint64_t n, uint64_t first_word) {
  Parts out;
  for (uint64_t base = 0; base < n; base += kBlockWords) {
    const uint64_t len = std::min(kBlockWords, n - base);
    uint64_t a = 0, b = 0;
    if (dst) {
      for (uint64_t j = 0; j < len; ++j) {
        const uint64_t w = src[base + j];
        dst[base + j] = static_cast<uint32_t>(w);
        a += w;
        b += (j + 1) * w;
      }
    } else {
      for (uint64_t j = 0; j < len; ++j) {
        const uint64_t w = src[base + j];
        a += w;
        b += (j + 1) * w;
      }
    }
    // Re-base the block: word j has global index first_word + base + j, weight (index + 1).
    const uint64_t offset = mod_p(first_word + base);
    const uint64_t am = mod_p(a);
    out.a = mod_p(out.a + am);
    out.b = mod_p(out.b + mod_p(b) + mod_p(offset * am));
  }
  return out;
}

// Sums over an arbitrary byte range [byte_off, byte_off + len) of a segment; byte_off is a
// multiple of 4. Handles a partial last word by zero padding.
Parts range_sums(const uint8_t* src, uint8_t* dst, uint64_t byte_off, uint64_t len) {
  const uint64_t full = len / 4;
  Parts p;
  if (full) {
    // Unaligned sources are legal for memcpy-style access; go through a temporary when the
    // pointer is not 4-byte aligned.
    if ((reinterpret_cast<uintptr_t>(src + byte_off) % 4) == 0 &&
        (dst == nullptr || (reinterpret_cast<uintptr_t>(dst + byte_off) % 4) == 0)) {
      p = block_sums(reinterpret_cast<const uint32_t*>(src + byte_off),
                     dst ? reinterpret_cast<uint32_t*>(dst + byte_off) : nullptr, full, byte_off / 4);
    } else {
      std::vector<uint32_t> tmp(full);
      std::memcpy(tmp.data(), src + byte_off, full * 4);
      if (dst) std::memcpy(dst + byte_off, tmp.data(), full * 4);
      p = block_sums(tmp.data(), nullptr, full, byte_off / 4);
    }
  }
  const uint64_t rest = len - full * 4;
  if (rest) {
    uint32_t w = 0;
    std::memcpy(&w, src + byte_off + full * 4, rest);
    if (dst) std::memcpy(dst + byte_off + full * 4, src + byte_off + full * 4, rest);
    Parts t = block_sums(&w, nullptr, 1, byte_off / 4 + full);
    p.a = mod_p(p.a + t.a);
    p.b = mod_p(p.b + t.b);
  }
  return p;
}

struct Chunk {
  size_t seg;
  uint64_t off, len;
};

int pick_threads(int requested, size_t chunks) {
  int n = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
  n = std::max(1, n);
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(n), std::max<size_t>(chunks, 1)));
}

template <typename F>
void run_parallel(int threads, size_t n, F&& fn) {
  if (threads <= 1 || n <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace

void pack_cpu(uint8_t* dst, const Segment* segs, size_t num_segs, uint64_t* checksums, int num_threads) {
  std::vector<Chunk> chunks;
  for (size_t s = 0; s < num_segs; ++s) {
    const uint64_t n = segs[s].nbytes;
    if (n == 0) chunks.push_back({s, 0, 0});
    for (uint64_t off = 0; off < n; off += kChunkBytes) chunks.push_back({s, off, std::min(kChunkBytes, n - off)});
  }
  std::vector<Parts> parts(chunks.size());
  run_parallel(pick_threads(num_threads, chunks.size()), chunks.size(), [&](size_t i) {
    const Chunk& c = chunks[i];
    const Segment& s = segs[c.seg];
    if (c.len) parts[i] = range_sums(s.src, dst + s.dst_offset, c.off, c.len);
  });
  std::vector<Parts> per_seg(num_segs);
  for (size_t i = 0; i < chunks.size(); ++i) {
    Parts& p = per_seg[chunks[i].seg];
    p.a = mod_p(p.a + parts[i].a);
    p.b = mod_p(p.b + parts[i].b);
  }
  for (size_t s = 0; s < num_segs; ++s) checksums[s] = ff31_finish(per_seg[s].a, per_seg[s].b, segs[s].nbytes);
}

uint64_t checksum_cpu(const uint8_t* data, uint64_t nbytes, int num_threads) {
  const size_t nchunks = static_cast<size_t>((nbytes + kChunkBytes - 1) / kChunkBytes);
  std::vector<Parts> parts(nchunks);
  run_parallel(pick_threads(num_threads, nchunks), nchunks, [&](size_t i) {
    const uint64_t off = i * kChunkBytes;
    parts[i] = range_sums(data, nullptr, off, std::min(kChunkBytes, nbytes - off));
  });
  Parts total;
  for (const Parts& p : parts) {
    total.a = mod_p(total.a + p.a);
    total.b = mod_p(total.b + p.b);
  }
  return ff31_finish(total.a, total.b, nbytes);
}

}  // namespace fftrainer
