#include "server/internal/robust_aggregation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/check.h"

namespace seedling::server::internal {
namespace {

// Every row and `out` have one length; there is at least one row.
void CheckShape(UpdateRows rows, size_t out_size) {
  SEEDLING_CHECK(!rows.empty(), "robust aggregation of no rows");
  for (const std::span<const float> row : rows) SEEDLING_CHECK(row.size() == out_size, "rows of different lengths");
}

double SquaredDistance(std::span<const float> a, std::span<const float> b) {
  double d2 = 0.0;
  for (size_t j = 0; j < a.size(); ++j) {
    const double d = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    d2 += d * d;
  }
  return d2;
}

}  // namespace

double MedianOf(std::span<double> values) {
  SEEDLING_CHECK(!values.empty(), "median of nothing");
  const size_t n = values.size();
  const auto upper = values.begin() + static_cast<std::ptrdiff_t>(n / 2);
  std::nth_element(values.begin(), upper, values.end());
  if (n % 2 == 1) return *upper;
  // Even count: the lower middle is the largest value below the upper one.
  const double lower = *std::max_element(values.begin(), upper);
  return 0.5 * (lower + *upper);
}

void CoordinateMedian(UpdateRows rows, std::span<float> out) {
  CheckShape(rows, out.size());
  std::vector<double> column(rows.size());  // (n,) one coordinate across the rows
  for (size_t j = 0; j < out.size(); ++j) {
    for (size_t i = 0; i < rows.size(); ++i) column[i] = rows[i][j];
    out[j] = static_cast<float>(MedianOf(column));
  }
}

int64_t TrimmedCount(int64_t n, double beta) {
  SEEDLING_CHECK(n >= 1 && beta >= 0 && beta < 0.5);
  // A small slack so that β·n landing a rounding error above an integer (0.1 · 30) does not trim one more.
  const auto b = static_cast<int64_t>(std::ceil(beta * static_cast<double>(n) - 1e-9));
  return std::min(b, (n - 1) / 2);
}

void TrimmedMean(UpdateRows rows, int64_t trim_each_side, std::span<float> out) {
  CheckShape(rows, out.size());
  const auto n = static_cast<int64_t>(rows.size());
  SEEDLING_CHECK(trim_each_side >= 0 && n - 2 * trim_each_side >= 1, "trimming leaves no value");
  const auto b = static_cast<std::ptrdiff_t>(trim_each_side);
  const double kept = static_cast<double>(n - 2 * trim_each_side);
  std::vector<double> column(rows.size());
  for (size_t j = 0; j < out.size(); ++j) {
    for (size_t i = 0; i < rows.size(); ++i) column[i] = rows[i][j];
    // Step 1: the b smallest values to the front, the b largest to the back (two selections, O(n)).
    if (b > 0) {
      std::nth_element(column.begin(), column.begin() + b, column.end());
      std::nth_element(column.begin() + b, column.end() - b - 1, column.end());
    }
    // Step 2: the mean of what is left in between.
    const double sum = std::accumulate(column.begin() + b, column.end() - b, 0.0);
    out[j] = static_cast<float>(sum / kept);
  }
}

std::vector<double> KrumScores(UpdateRows rows, int64_t f) {
  const size_t n = rows.size();
  SEEDLING_CHECK(f >= 0 && static_cast<int64_t>(n) >= 2 * f + 3, "Krum needs n >= 2f + 3");
  // Step 1: the pairwise squared distances (symmetric, each computed once). (n, n)
  std::vector<double> d2(n * n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    SEEDLING_CHECK(rows[i].size() == rows[0].size(), "rows of different lengths");
    for (size_t k = i + 1; k < n; ++k) d2[i * n + k] = d2[k * n + i] = SquaredDistance(rows[i], rows[k]);
  }
  // Step 2: s_i = the sum of the n − f − 2 smallest distances from row i to the others.
  const auto neighbours = static_cast<std::ptrdiff_t>(static_cast<int64_t>(n) - f - 2);
  std::vector<double> scores(n);
  std::vector<double> others;
  for (size_t i = 0; i < n; ++i) {
    others.clear();
    for (size_t k = 0; k < n; ++k) {
      if (k != i) others.push_back(d2[i * n + k]);
    }
    std::nth_element(others.begin(), others.begin() + (neighbours - 1), others.end());
    scores[i] = std::accumulate(others.begin(), others.begin() + neighbours, 0.0);
  }
  return scores;
}

std::vector<size_t> MultiKrumSelect(UpdateRows rows, int64_t f, int64_t m) {
  SEEDLING_CHECK(m >= 1 && m <= static_cast<int64_t>(rows.size()), "multi-Krum selects 1..n rows");
  const std::vector<double> scores = KrumScores(rows, f);
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return scores[a] < scores[b]; });
  order.resize(static_cast<size_t>(m));
  return order;
}

void MeanOfRows(UpdateRows rows, std::span<const size_t> selected, std::span<float> out) {
  CheckShape(rows, out.size());
  SEEDLING_CHECK(!selected.empty(), "mean of no rows");
  std::vector<double> sum(out.size(), 0.0);
  for (const size_t i : selected) {
    SEEDLING_CHECK(i < rows.size(), "selected row out of range");
    for (size_t j = 0; j < out.size(); ++j) sum[j] += static_cast<double>(rows[i][j]);
  }
  const double count = static_cast<double>(selected.size());
  for (size_t j = 0; j < out.size(); ++j) out[j] = static_cast<float>(sum[j] / count);
}

}  // namespace seedling::server::internal
