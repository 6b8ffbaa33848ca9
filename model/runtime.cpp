#include "model/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "base/strings.h"
#include "spdlog/spdlog.h"

namespace seedling::model {

namespace {

using SetThreads = void (*)(int);
using GetThreads = int (*)();
using GetConfig = char* (*)();

}  // namespace

std::string DescribeCompute() {
  auto get_blas_threads = reinterpret_cast<GetThreads>(::dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  auto blas_config = reinterpret_cast<GetConfig>(::dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (get_blas_threads == nullptr) return StrCat("unknown BLAS, ATen ", at::get_num_threads(), " threads");
  return StrCat(blas_config != nullptr ? blas_config() : "OpenBLAS", " (", get_blas_threads(), " threads), ATen ",
                at::get_num_threads(), at::get_num_threads() == 1 ? " thread" : " threads");
}

std::string ConfigureCompute(const ComputeSettings& settings) {
  const int threads =
      settings.threads > 0 ? settings.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Keep freed large blocks in the heap: LibTorch allocates fresh tensors for every intermediate, and each
  // mmap'ed block would be page-faulted in again (about 1 us per 4 KiB) on every forward.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);

  auto set_blas_threads = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set_blas_threads != nullptr) {
    set_blas_threads(threads);
    at::set_num_threads(1);
  } else {
    at::set_num_threads(threads);
    spdlog::warn("libblas is not OpenBLAS: matrix multiplies may be very slow (install libopenblas0-pthread)");
  }
  return DescribeCompute();
}

double MeasureSgemmGflops(int64_t n, double min_seconds) {
  using Clock = std::chrono::steady_clock;
  auto seconds_since = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  const at::Tensor a = at::randn({n, n});
  const at::Tensor b = at::randn({n, n});
  at::Tensor c = at::mm(a, b);  // warm-up
  int iters = 0;
  const auto t0 = Clock::now();
  while (iters < 3 || seconds_since(t0) < min_seconds) {
    at::mm_out(c, a, b);
    ++iters;
  }
  const double dn = static_cast<double>(n);
  return 2.0 * dn * dn * dn * iters / seconds_since(t0) / 1e9;
}

}  // namespace seedling::model
