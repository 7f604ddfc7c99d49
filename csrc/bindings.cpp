// The only file that knows about torch and Python: converts tensors to raw pointers and calls
// the plain kernels in pack_cpu.cpp (and pack_kernels.cu when built with CUDA).
#include <torch/extension.h>

#include <vector>

#include "pack.h"
#ifdef FFTRAINER_WITH_CUDA
#include "cuda_glue.h"
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

bool has_cuda() {
#ifdef FFTRAINER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fftrainer_ds native kernels: snapshot gather + FF31 checksum";
  m.def("pack", &pack, "Copy each CPU source into dst at its byte offset and return the FF31 checksum of each, "
        "in one multithreaded pass (GIL released).",
        pybind11::arg("dst"), pybind11::arg("srcs"), pybind11::arg("offsets"), pybind11::arg("num_threads") = 0);
  m.def("checksum", &checksum, "FF31 checksum of a contiguous CPU tensor's bytes (GIL released).",
        pybind11::arg("data"), pybind11::arg("num_threads") = 0);
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled into this module.");
#ifdef FFTRAINER_WITH_CUDA
  fftrainer::register_cuda(m);
#endif
}
