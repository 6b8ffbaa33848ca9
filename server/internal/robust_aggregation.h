#pragma once

// The arithmetic of robust aggregation (server/robust_strategy.h) over one round's client updates, as pure
// functions: n rows of P floats in, one aggregate of P floats (or a selection of rows) out. Every client
// counts once (no example weights). Internal to the server.
//
//   coordinate-wise median        a_j = median_i x_ij; for even n the mean of the two middle values
//                                  (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
//                                  Statistical Rates", ICML'18)
//   coordinate-wise trimmed mean   per coordinate, drop the b smallest and the b largest values and average
//                                  the n − 2b left (Yin et al. 2018)
//   Krum / multi-Krum              s_i = Σ_{j ∈ N_i} ‖x_i − x_j‖², N_i the n − f − 2 rows nearest to x_i
//                                  (j ≠ i); Krum keeps the row of the lowest score, multi-Krum averages the
//                                  m rows of the lowest scores (Blanchard et al., "Machine Learning with
//                                  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS'17; El Mhamdi
//                                  et al., "The Hidden Vulnerability of Distributed Learning in Byzantium",
//                                  ICML'18). Krum needs n ≥ 2f + 3.
//
// Sums and means are taken in double and rounded to fp32 once. Cost: median and trimmed mean O(n·P) time
// (a selection per coordinate) and O(n) extra memory; Krum O(n²·P) time and O(n²) memory.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace seedling::server::internal {

// n ≥ 1 rows, all of one length P.
using UpdateRows = std::span<const std::span<const float>>;

// out[j] = the median of rows[i][j] over i. Requires rows non-empty, every row and `out` of one length.
void CoordinateMedian(UpdateRows rows, std::span<float> out);

// Values trimmed on each side for n rows and fraction β: b = ⌈β·n⌉, at most ⌊(n − 1)/2⌋ so that one value
// per coordinate is left. β = 0 trims nothing.
int64_t TrimmedCount(int64_t n, double beta);

// out[j] = the mean of rows[i][j] after dropping the `trim_each_side` smallest and as many largest values
// (ties broken arbitrarily: they hold equal values). Requires n − 2·trim_each_side ≥ 1.
void TrimmedMean(UpdateRows rows, int64_t trim_each_side, std::span<float> out);

// Krum scores, one per row. Requires n ≥ 2f + 3 and f ≥ 0.
std::vector<double> KrumScores(UpdateRows rows, int64_t f);

// The m rows of the lowest Krum scores, in ascending score order (equal scores: lower index first).
// Requires 1 ≤ m ≤ n and KrumScores' conditions.
std::vector<size_t> MultiKrumSelect(UpdateRows rows, int64_t f, int64_t m);

// out[j] = the mean of rows[i][j] over the `selected` indices (non-empty, each < n).
void MeanOfRows(UpdateRows rows, std::span<const size_t> selected, std::span<float> out);

// The median of `values` (non-empty; the mean of the two middle values for an even count). Reorders them.
double MedianOf(std::span<double> values);

}  // namespace seedling::server::internal
