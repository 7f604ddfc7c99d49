// The only file that knows about torch and Python: converts tensors to raw pointers and calls
// the plain kernels in pack_cpu.cpp (and pack_kernels.cu when built with CUDA).
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "pack.h"
#ifdef FFTRAINER_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>

#include "pack_kernels.h"
#endif

namespace {

#define FF_CHECK(cond, ...) TORCH_CHECK(cond, "fftrainer_ds._C: ", __VA_ARGS__)

std::vector<fftrainer::Segment> make_segments(const torch::Tensor& dst, const std::vector<torch::Tensor>& srcs,
                                              const std::vector<int64_t>& offsets) {
  FF_CHECK(dst.scalar_type() == torch::kUInt8 && dst.dim() == 1 && dst.is_contiguous(),
           "dst must be a contiguous 1-D uint8 tensor");
  FF_CHECK(srcs.size() == offsets.size(), "srcs (", srcs.size(), ") and offsets (", offsets.size(),
           ") differ in length");
  std::vector<fftrainer::Segment> segs(srcs.size());
  const int64_t cap = dst.numel();
  for (size_t i = 0; i < srcs.size(); ++i) {
    const auto& s = srcs[i];
    FF_CHECK(s.is_contiguous(), "srcs[", i, "] must be contiguous");
    FF_CHECK(s.device() == dst.device(), "srcs[", i, "] is on ", s.device(), " but dst is on ", dst.device());
    const int64_t n = s.numel() * s.element_size();
    FF_CHECK(offsets[i] >= 0 && offsets[i] + n <= cap, "offsets[", i, "]=", offsets[i], " with ", n,
             " bytes exceeds dst of ", cap, " bytes");
    segs[i] = {static_cast<const uint8_t*>(s.data_ptr()), static_cast<uint64_t>(offsets[i]), static_cast<uint64_t>(n)};
  }
  return segs;
}

std::vector<uint64_t> pack(torch::Tensor dst, std::vector<torch::Tensor> srcs, std::vector<int64_t> offsets,
                           int64_t num_threads) {
  auto segs = make_segments(dst, srcs, offsets);
  std::vector<uint64_t> sums(segs.size());
  FF_CHECK(dst.device().is_cpu(), "pack: dst must be on the CPU (use pack_cuda for device sources)");
  {
    pybind11::gil_scoped_release release;
    fftrainer::pack_cpu(dst.data_ptr<uint8_t>(), segs.data(), segs.size(), sums.data(),
                        static_cast<int>(num_threads));
  }
  return sums;
}

uint64_t checksum(torch::Tensor data, int64_t num_threads) {
  FF_CHECK(data.device().is_cpu() && data.is_contiguous(), "checksum: data must be a contiguous CPU tensor");
  const uint8_t* p = static_cast<const uint8_t*>(data.data_ptr());
  const uint64_t n = static_cast<uint64_t>(data.numel() * data.element_size());
  pybind11::gil_scoped_release release;
  return fftrainer::checksum_cpu(p, n, static_cast<int>(num_threads));
}

#ifdef FFTRAINER_WITH_CUDA
// ---- CUDA: gather device tensors into device or pinned host memory + FF31 (pack_kernels.cu) ----

// The stream a call runs on: the given raw cudaStream_t handle (torch.cuda.Stream.cuda_stream), or
// the current stream of `device` when none is given.
c10::cuda::CUDAStream resolve_stream(const std::optional<int64_t>& stream, c10::DeviceIndex device) {
  if (!stream) return c10::cuda::getCurrentCUDAStream(device);
  return c10::cuda::getStreamFromExternal(reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(*stream)), device);
}

// Device-accessible address of dst: a CUDA tensor on `device`, or pinned (page-locked, mapped)
// host memory, whose device pointer is the host pointer under UVA.
uint8_t* device_address(const torch::Tensor& dst, const c10::Device& device, const char* what) {
  FF_CHECK(dst.scalar_type() == torch::kUInt8 && dst.dim() == 1 && dst.is_contiguous(), what,
           " must be a contiguous 1-D uint8 tensor");
  if (dst.is_cuda()) {
    FF_CHECK(dst.device() == device, what, " is on ", dst.device(), " but the sources are on ", device);
    return dst.data_ptr<uint8_t>();
  }
  FF_CHECK(dst.is_cpu() && dst.is_pinned(), what, " must be a CUDA tensor or pinned CPU memory (pin_memory()), got ",
           dst.is_cpu() ? "pageable CPU memory" : dst.device().str());
  if (dst.numel() == 0) return nullptr;
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, dst.data_ptr()));
  FF_CHECK(attr.devicePointer != nullptr, what, " (pinned host memory) is not mapped into the device address space");
  return static_cast<uint8_t*>(attr.devicePointer);
}

// A pack of fixed sources: segment table and chunk prefix sums uploaded once, then packed in one or
// several chunk ranges, each possibly into another destination window, then finalized.
// Device layout of plan_ (uint8): Segment[n] | chunk_begin u64[n+1] | ChunkPartial[chunks] | u64[n].
class CudaPackPlan {
 public:
  CudaPackPlan(std::vector<torch::Tensor> srcs, std::vector<int64_t> offsets, std::optional<int64_t> stream)
      : srcs_(std::move(srcs)) {
    FF_CHECK(!srcs_.empty(), "CudaPackPlan: srcs is empty");
    FF_CHECK(srcs_.size() == offsets.size(), "CudaPackPlan: srcs (", srcs_.size(), ") and offsets (", offsets.size(),
             ") differ in length");
    device_ = srcs_[0].device();
    segs_.resize(srcs_.size());
    for (size_t i = 0; i < srcs_.size(); ++i) {
      const auto& s = srcs_[i];
      FF_CHECK(s.is_cuda(), "CudaPackPlan: srcs[", i, "] must be a CUDA tensor, got ", s.device());
      FF_CHECK(s.device() == device_, "CudaPackPlan: srcs[", i, "] is on ", s.device(), " but srcs[0] is on ", device_);
      FF_CHECK(s.is_contiguous(), "CudaPackPlan: srcs[", i, "] must be contiguous");
      FF_CHECK(offsets[i] >= 0, "CudaPackPlan: offsets[", i, "]=", offsets[i], " is negative");
      const uint64_t n = static_cast<uint64_t>(s.numel()) * static_cast<uint64_t>(s.element_size());
      segs_[i] = {n ? static_cast<const uint8_t*>(s.data_ptr()) : nullptr, static_cast<uint64_t>(offsets[i]), n};
    }
    begin_.resize(segs_.size() + 1);
    chunks_ = fftrainer::cuda_plan_chunks(segs_.data(), segs_.size(), begin_.data());
    const size_t n = segs_.size();
    begin_off_ = n * sizeof(fftrainer::Segment);
    parts_off_ = begin_off_ + (n + 1) * sizeof(uint64_t);
    sums_off_ = parts_off_ + chunks_ * sizeof(fftrainer::ChunkPartial);
    const int64_t total = static_cast<int64_t>(sums_off_ + n * sizeof(uint64_t));

    c10::cuda::CUDAGuard guard(device_);
    const auto s = resolve_stream(stream, device_.index());
    c10::cuda::CUDAStreamGuard stream_guard(s);  // allocate on, and upload in, the stream of the pack
    auto host = torch::empty({static_cast<int64_t>(parts_off_)}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
    std::memcpy(host.data_ptr(), segs_.data(), begin_off_);
    std::memcpy(host.data_ptr<uint8_t>() + begin_off_, begin_.data(), parts_off_ - begin_off_);
    plan_ = torch::empty({total}, torch::TensorOptions().dtype(torch::kUInt8).device(device_));
    plan_.narrow(0, 0, static_cast<int64_t>(parts_off_)).copy_(host, /*non_blocking=*/true);
  }

  const c10::Device& device() const { return device_; }
  int64_t num_segments() const { return static_cast<int64_t>(segs_.size()); }
  int64_t num_chunks() const { return static_cast<int64_t>(chunks_); }
  std::vector<int64_t> chunk_begin() const { return {begin_.begin(), begin_.end()}; }

  // Bytes [lo, hi) of the destination written by chunks [chunk_lo, chunk_hi) (0, 0 when none).
  std::tuple<int64_t, int64_t> dst_range(int64_t chunk_lo, int64_t chunk_hi) const {
    check_range(chunk_lo, chunk_hi);
    uint64_t lo = UINT64_MAX, hi = 0;
    const uint64_t c0 = static_cast<uint64_t>(chunk_lo), c1 = static_cast<uint64_t>(chunk_hi);
    size_t s = static_cast<size_t>(std::upper_bound(begin_.begin(), begin_.end() - 1, c0) - begin_.begin());
    s = s ? s - 1 : 0;
    for (; s < segs_.size() && begin_[s] < c1; ++s) {
      const uint64_t b = std::max(begin_[s], c0), e = std::min(begin_[s + 1], c1);
      if (b >= e) continue;
      const uint64_t first = (b - begin_[s]) * fftrainer::kCudaChunkBytes;
      const uint64_t last = std::min((e - begin_[s]) * fftrainer::kCudaChunkBytes, segs_[s].nbytes);
      lo = std::min(lo, segs_[s].dst_offset + first);
      hi = std::max(hi, segs_[s].dst_offset + last);
    }
    if (hi == 0) return {0, 0};
    return {static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
  }

  // Pack chunks [chunk_lo, chunk_hi) (chunk_hi < 0: to the end); byte k of segment s goes to
  // dst[offsets[s] + k - dst_base]. dst None: checksum only.
  void pack(const std::optional<torch::Tensor>& dst, int64_t chunk_lo, int64_t chunk_hi, int64_t dst_base,
            std::optional<int64_t> stream, int64_t max_blocks) {
    if (chunk_hi < 0) chunk_hi = num_chunks();
    check_range(chunk_lo, chunk_hi);
    FF_CHECK(dst_base >= 0, "pack: dst_base=", dst_base, " is negative");
    FF_CHECK(max_blocks >= 0 && max_blocks <= INT32_MAX, "pack: max_blocks=", max_blocks, " out of range");
    uint8_t* d = nullptr;
    if (dst) {
      d = device_address(*dst, device_, "dst");
      int64_t lo = 0, hi = 0;
      std::tie(lo, hi) = dst_range(chunk_lo, chunk_hi);
      FF_CHECK(hi == 0 || (lo >= dst_base && hi - dst_base <= dst->numel()), "pack: chunks [", chunk_lo, ", ",
               chunk_hi, ") write bytes [", lo, ", ", hi, ") but dst covers [", dst_base, ", ",
               dst_base + dst->numel(), ")");
    }
    c10::cuda::CUDAGuard guard(device_);
    const auto s = resolve_stream(stream, device_.index());
    keep_alive_on(s, dst);
    auto* base = plan_.data_ptr<uint8_t>();
    pybind11::gil_scoped_release release;
    C10_CUDA_CHECK(fftrainer::pack_cuda_chunks(
        d, static_cast<uint64_t>(dst_base), reinterpret_cast<const fftrainer::Segment*>(base),
        reinterpret_cast<const uint64_t*>(base + begin_off_), segs_.size(), static_cast<uint64_t>(chunk_lo),
        static_cast<uint64_t>(chunk_hi), reinterpret_cast<fftrainer::ChunkPartial*>(base + parts_off_),
        static_cast<int>(max_blocks), s.stream()));
  }

  // Combine the partials into the checksums; returns an int64 CUDA view of n checksums inside the
  // plan (overwritten by the next finalize). Asynchronous: read it after the stream's work.
  torch::Tensor finalize(std::optional<int64_t> stream) {
    c10::cuda::CUDAGuard guard(device_);
    const auto s = resolve_stream(stream, device_.index());
    keep_alive_on(s, std::nullopt);
    auto* base = plan_.data_ptr<uint8_t>();
    {
      pybind11::gil_scoped_release release;
      C10_CUDA_CHECK(fftrainer::pack_cuda_finalize(
          reinterpret_cast<const fftrainer::Segment*>(base), reinterpret_cast<const uint64_t*>(base + begin_off_),
          segs_.size(), reinterpret_cast<const fftrainer::ChunkPartial*>(base + parts_off_),
          reinterpret_cast<uint64_t*>(base + sums_off_), s.stream()));
    }
    return plan_.narrow(0, static_cast<int64_t>(sums_off_), num_segments() * 8).view(torch::kInt64);
  }

 private:
  void check_range(int64_t lo, int64_t hi) const {
    FF_CHECK(0 <= lo && lo <= hi && hi <= num_chunks(), "chunk range [", lo, ", ", hi, ") outside [0, ", num_chunks(),
             "]");
  }

  // The caching allocator must not hand out the sources, the plan or a device dst to other work
  // before this stream is done with them.
  void keep_alive_on(const c10::cuda::CUDAStream& s, const std::optional<torch::Tensor>& dst) {
    plan_.record_stream(s);
    for (auto& src : srcs_)
      if (src.numel()) src.record_stream(s);
    if (dst && dst->is_cuda() && dst->numel()) dst->record_stream(s);
  }

  std::vector<torch::Tensor> srcs_;  // held so the pointers in the table stay valid
  c10::Device device_{c10::kCUDA};
  std::vector<fftrainer::Segment> segs_;
  std::vector<uint64_t> begin_;
  uint64_t chunks_ = 0;
  size_t begin_off_ = 0, parts_off_ = 0, sums_off_ = 0;
  torch::Tensor plan_;
};

// The checksums of a plan about to be destroyed, copied on the plan's stream (ordered after it).
torch::Tensor finalized_copy(CudaPackPlan& plan, const std::optional<int64_t>& stream) {
  c10::cuda::CUDAGuard guard(plan.device());
  c10::cuda::CUDAStreamGuard stream_guard(resolve_stream(stream, plan.device().index()));
  return plan.finalize(stream).clone();
}

torch::Tensor pack_cuda(torch::Tensor dst, std::vector<torch::Tensor> srcs, std::vector<int64_t> offsets,
                        std::optional<int64_t> stream, int64_t max_blocks) {
  CudaPackPlan plan(std::move(srcs), std::move(offsets), stream);
  plan.pack(dst, 0, -1, 0, stream, max_blocks);
  return finalized_copy(plan, stream);
}

torch::Tensor checksum_cuda(torch::Tensor data, std::optional<int64_t> stream) {
  FF_CHECK(data.is_cuda() && data.is_contiguous(), "checksum_cuda: data must be a contiguous CUDA tensor, got ",
           data.device());
  CudaPackPlan plan({data}, {0}, stream);
  plan.pack(std::nullopt, 0, -1, 0, stream, 0);
  return finalized_copy(plan, stream);
}
#endif  // FFTRAINER_WITH_CUDA

bool has_cuda() {
#ifdef FFTRAINER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // `import fftrainer_ds._C` may come before any `import torch`: the tensor type casters below need
  // torch's Python bindings initialized (torch.Tensor registered) before a tensor crosses the
  // boundary, and only importing torch does that.
  pybind11::module_::import("torch");
  m.doc() = "fftrainer_ds native kernels: snapshot gather + FF31 checksum";
  m.def("pack", &pack, "Copy each CPU source into dst at its byte offset and return the FF31 checksum of each, "
        "in one multithreaded pass (GIL released).",
        pybind11::arg("dst"), pybind11::arg("srcs"), pybind11::arg("offsets"), pybind11::arg("num_threads") = 0);
  m.def("checksum", &checksum, "FF31 checksum of a contiguous CPU tensor's bytes (GIL released).",
        pybind11::arg("data"), pybind11::arg("num_threads") = 0);
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled into this module.");
#ifdef FFTRAINER_WITH_CUDA
  namespace py = pybind11;
  m.attr("CUDA_CHUNK_BYTES") = static_cast<int64_t>(fftrainer::kCudaChunkBytes);
  py::class_<CudaPackPlan>(m, "CudaPackPlan",
                           "A pack of fixed CUDA sources into a snapshot buffer: the segment table is uploaded once "
                           "(on `stream`, default the current stream), then chunk ranges are packed with pack() and "
                           "the checksums combined with finalize(). Holds references to the sources.")
      .def(py::init<std::vector<torch::Tensor>, std::vector<int64_t>, std::optional<int64_t>>(), py::arg("srcs"),
           py::arg("offsets"), py::arg("stream") = py::none())
      .def_property_readonly("num_segments", &CudaPackPlan::num_segments)
      .def_property_readonly("num_chunks", &CudaPackPlan::num_chunks, "Work chunks of CUDA_CHUNK_BYTES (last of each segment shorter).")
      .def("chunk_begin", &CudaPackPlan::chunk_begin, "Prefix sums of the chunk counts (num_segments + 1 entries).")
      .def("dst_range", &CudaPackPlan::dst_range, "Destination bytes [lo, hi) written by chunks [chunk_lo, chunk_hi).",
           py::arg("chunk_lo"), py::arg("chunk_hi"))
      .def("pack", &CudaPackPlan::pack,
           "Gather chunks [chunk_lo, chunk_hi) (chunk_hi=-1: to the end) into dst (CUDA or pinned CPU uint8; None: "
           "checksum only) at offsets[s] - dst_base, accumulating their checksum parts. Asynchronous on `stream` "
           "(raw handle, default current); max_blocks caps the grid (0: one block per chunk). GIL released.",
           py::arg("dst"), py::arg("chunk_lo") = 0, py::arg("chunk_hi") = -1, py::arg("dst_base") = 0,
           py::arg("stream") = py::none(), py::arg("max_blocks") = 0)
      .def("finalize", &CudaPackPlan::finalize,
           "Combine the parts into the FF31 checksums: an int64 CUDA view of num_segments values (asynchronous, "
           "overwritten by the next finalize).",
           py::arg("stream") = py::none());
  m.def("pack_cuda", &pack_cuda,
        "Gather CUDA srcs into dst (CUDA or pinned CPU uint8) at byte offsets with FF31 checksums, one pass; returns "
        "the checksums as an int64 CUDA tensor. Asynchronous on `stream` (default current). GIL released.",
        py::arg("dst"), py::arg("srcs"), py::arg("offsets"), py::arg("stream") = py::none(), py::arg("max_blocks") = 0);
  m.def("checksum_cuda", &checksum_cuda,
        "FF31 checksum of a contiguous CUDA tensor's bytes as an int64 CUDA tensor of one element (asynchronous).",
        py::arg("data"), py::arg("stream") = py::none());
#endif
}
