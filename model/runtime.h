#pragma once

// Process-wide compute settings for LibTorch on CPU. Call once from main() (the SDK's host app, the
// `seedling` binary, benchmarks) before running models.
//
// Why ATen gets one thread and BLAS gets the rest: Debian's LibTorch runs its element-wise kernels on an
// OpenMP pool and its matrix multiplies in OpenBLAS's own pthread pool. With both pools sized to the core
// count, OpenBLAS workers spin after each GEMM while OpenMP workers wait for a core, and every element-wise
// op pays a scheduler time slice: on 2 cores a SmolLM2-135M forward ran 3-5x slower (bench/forward_bench).
// Element-wise work is a few percent of a forward, so ATen runs it on the calling thread and GEMMs get all
// cores.

#include <cstdint>
#include <string>

namespace seedling::model {

struct ComputeSettings {
  // BLAS threads; 0 = all cores. Use 1 in processes that run models from several threads at once (the
  // simulator, tests with many in-process clients): OpenBLAS 0.3.21's pthread pool deadlocks when several
  // threads call sgemm concurrently (seen here: four client threads stuck in sgemm_thread_tn).
  int threads = 0;
};

// Applies the settings and returns a one-line description ("OpenBLAS 0.3.21 (2 threads), ATen 1 thread").
// Also raises glibc's mmap threshold so that large temporaries are reused instead of being mapped, faulted
// in and unmapped on every call. If libblas is not OpenBLAS, ATen gets all threads instead and the
// description says so (and warns when it looks like the slow reference BLAS).
std::string ConfigureCompute(const ComputeSettings& settings);

// Describes the current settings in the same form, without changing them.
std::string DescribeCompute();

// GFLOP/s of an n x n x n fp32 matrix multiply with the current settings, timed for at least
// `min_seconds` (and 3 multiplies): the in-run reference that MFU figures divide by.
double MeasureSgemmGflops(int64_t n, double min_seconds);

}  // namespace seedling::model
