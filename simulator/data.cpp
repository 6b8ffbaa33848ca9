#include "simulator/data.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_format.h"
#include "base/check.h"
#include "base/file.h"
#include "base/json.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::simulator {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";
// A row longer than this is skipped and counted (never held whole): far beyond any real example.
constexpr int64_t kMaxRowBytes = int64_t{1} << 30;

// A row's "user" / label field: a string, or an integer as its decimal text (as client/local_data
// reads "topic" and "user"); "" if absent or of another type.
std::string Tag(const Json& row, const std::string& key) {
  const auto it = row.find(key);
  if (it == row.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_number_integer()) return it->dump();
  return "";
}

// Fisher–Yates with draws from `rng`.
template <typename T>
void Shuffle(std::vector<T>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.UniformInt(i));
    std::swap(v[i - 1], v[j]);
  }
}

// Sizes of `devices` equal shares of n: the first n % devices devices get one more.
std::vector<int64_t> BalancedSizes(int64_t n, int64_t devices) {
  std::vector<int64_t> sizes(static_cast<size_t>(devices), n / devices);
  for (int64_t d = 0; d < n % devices; ++d) ++sizes[static_cast<size_t>(d)];
  return sizes;
}

// Consecutive slices of `order` with the given sizes, each sorted ascending.
std::vector<std::vector<uint32_t>> Slice(const std::vector<uint32_t>& order, const std::vector<int64_t>& sizes) {
  std::vector<std::vector<uint32_t>> out(sizes.size());
  size_t pos = 0;
  for (size_t d = 0; d < sizes.size(); ++d) {
    const size_t n = static_cast<size_t>(sizes[d]);
    out[d].assign(order.begin() + static_cast<std::ptrdiff_t>(pos),
                  order.begin() + static_cast<std::ptrdiff_t>(pos + n));
    std::sort(out[d].begin(), out[d].end());
    pos += n;
  }
  SEEDLING_CHECK(pos == order.size());
  return out;
}

std::vector<uint32_t> ShuffledIndices(size_t n, Rng& rng) {
  std::vector<uint32_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  Shuffle(order, rng);
  return order;
}

// log of a Gamma(shape, 1) draw, shape > 0. Marsaglia & Tsang, "A simple method for generating
// gamma variables" (ACM TOMS 2000): squeeze-free acceptance test for shape >= 1, and the boost
// G(a) = G(a + 1) · U^(1/a) for shape < 1, kept in log space because for tiny shapes U^(1/a)
// underflows to 0 (Dirichlet with α = 0.01 needs that range).
double LogGamma(double shape, Rng& rng) {
  double boost = 0;
  if (shape < 1) {
    boost = std::log(1.0 - rng.Uniform()) / shape;  // 1 - U in (0, 1]: log is finite
    shape += 1;
  }
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    const double x = rng.Normal();
    double v = 1.0 + c * x;
    if (v <= 0) continue;
    v = v * v * v;
    const double u = 1.0 - rng.Uniform();
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return std::log(d * v) + boost;
  }
}

// A Dirichlet(concentration) draw, normalized from log-Gammas with log-sum-exp.
std::vector<double> Dirichlet(const std::vector<double>& concentration, Rng& rng) {
  std::vector<double> logs(concentration.size());
  double max_log = -std::numeric_limits<double>::infinity();
  for (size_t k = 0; k < concentration.size(); ++k) {
    logs[k] = LogGamma(concentration[k], rng);
    max_log = std::max(max_log, logs[k]);
  }
  double total = 0;
  for (double& l : logs) {
    l = std::exp(l - max_log);
    total += l;
  }
  for (double& l : logs) l /= total;
  return logs;
}

// Label skew with balanced sizes. Each device draws its label mix q_d ~ Dir(α·K·p); then devices
// take turns (one row per turn, so no device always picks last) drawing a label from q_d restricted
// to labels with rows left, and take a random remaining row of that label.
std::vector<std::vector<uint32_t>> DirichletPartition(const std::vector<DataRow>& rows, int64_t devices, double alpha,
                                                      Rng& rng) {
  std::unordered_map<std::string, size_t> label_index;
  std::vector<std::vector<uint32_t>> pools;  // rows left per label, shuffled
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto [it, inserted] = label_index.try_emplace(rows[i].label, pools.size());
    if (inserted) pools.emplace_back();
    pools[it->second].push_back(static_cast<uint32_t>(i));
  }
  const size_t k_labels = pools.size();
  std::vector<double> concentration(k_labels);
  for (size_t k = 0; k < k_labels; ++k) {
    concentration[k] =
        alpha * static_cast<double>(k_labels) * static_cast<double>(pools[k].size()) / static_cast<double>(rows.size());
    Shuffle(pools[k], rng);
  }
  std::vector<std::vector<double>> mix(static_cast<size_t>(devices));
  for (auto& q : mix) q = Dirichlet(concentration, rng);

  const std::vector<int64_t> sizes = BalancedSizes(static_cast<int64_t>(rows.size()), devices);
  std::vector<std::vector<uint32_t>> out(static_cast<size_t>(devices));
  const int64_t turns = sizes.front();  // the largest share
  for (int64_t t = 0; t < turns; ++t) {
    for (size_t d = 0; d < out.size(); ++d) {
      if (t >= sizes[d]) continue;
      const std::vector<double>& q = mix[d];
      double total = 0;
      for (size_t k = 0; k < k_labels; ++k)
        if (!pools[k].empty()) total += q[k];
      size_t pick = k_labels;
      if (total > 0) {
        double u = rng.Uniform() * total;
        for (size_t k = 0; k < k_labels; ++k) {
          if (pools[k].empty()) continue;
          pick = k;  // the last non-empty label absorbs rounding
          if ((u -= q[k]) < 0) break;
        }
      } else {
        // All of this device's mass is on exhausted labels: fall back to the rows that are left.
        int64_t left = 0;
        for (const auto& p : pools) left += static_cast<int64_t>(p.size());
        auto u = static_cast<int64_t>(rng.UniformInt(static_cast<uint64_t>(left)));
        for (size_t k = 0; k < k_labels; ++k) {
          if ((u -= static_cast<int64_t>(pools[k].size())) < 0) {
            pick = k;
            break;
          }
        }
      }
      SEEDLING_CHECK(pick < k_labels && !pools[pick].empty());
      out[d].push_back(pools[pick].back());
      pools[pick].pop_back();
    }
  }
  for (auto& d : out) std::sort(d.begin(), d.end());
  return out;
}

// Quantity skew: min_rows each, the rest split in proportion to Pareto(exponent) weights
// (largest-remainder rounding), over a shuffled order.
std::vector<std::vector<uint32_t>> PowerLawPartition(size_t n, int64_t devices, int64_t min_rows, double exponent,
                                                     Rng& rng) {
  // w = (1 - U)^(-1/exponent) >= 1, in log space so heavy tails cannot overflow.
  std::vector<double> log_w(static_cast<size_t>(devices));
  double max_log = -std::numeric_limits<double>::infinity();
  for (double& l : log_w) {
    l = -std::log(1.0 - rng.Uniform()) / exponent;
    max_log = std::max(max_log, l);
  }
  double total = 0;
  for (double& l : log_w) {
    l = std::exp(l - max_log);
    total += l;
  }
  const int64_t extra = static_cast<int64_t>(n) - min_rows * devices;
  std::vector<int64_t> sizes(static_cast<size_t>(devices), min_rows);
  std::vector<std::pair<double, size_t>> remainders(sizes.size());
  int64_t given = 0;
  for (size_t d = 0; d < sizes.size(); ++d) {
    const double share = static_cast<double>(extra) * log_w[d] / total;
    const auto whole = std::min(static_cast<int64_t>(std::floor(share)), extra - given);
    sizes[d] += whole;
    given += whole;
    remainders[d] = {share - static_cast<double>(whole), d};
  }
  std::sort(remainders.begin(), remainders.end(),
            [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
  for (size_t i = 0; given < extra; i = (i + 1) % remainders.size(), ++given) ++sizes[remainders[i].second];
  const std::vector<uint32_t> order = ShuffledIndices(n, rng);
  return Slice(order, sizes);
}

absl::StatusOr<std::vector<std::vector<uint32_t>>> UserPartition(const std::vector<DataRow>& rows, int64_t devices,
                                                                 int64_t min_rows) {
  int64_t missing = 0;
  for (const DataRow& r : rows) missing += r.user.empty();
  if (missing > 0) {
    return absl::InvalidArgumentError(StrCat("user partition needs a \"user\" field (string or integer) on every row; ",
                                             missing, " of ", rows.size(), " rows lack it"));
  }
  std::unordered_map<std::string, size_t> device_of;
  std::vector<std::vector<uint32_t>> out;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto [it, inserted] = device_of.try_emplace(rows[i].user, out.size());
    if (inserted) out.emplace_back();
    out[it->second].push_back(static_cast<uint32_t>(i));
  }
  if (static_cast<int64_t>(out.size()) > devices) {
    return absl::InvalidArgumentError(StrCat("user partition: the data has ", out.size(),
                                             " distinct users but devices is ", devices,
                                             "; pass devices >= ", out.size(), " (one device per user)"));
  }
  int64_t small = 0;
  for (const auto& d : out) small += static_cast<int64_t>(d.size()) < min_rows;
  if (small > 0) {
    return absl::InvalidArgumentError(
        StrCat("user partition: ", small, " of ", out.size(), " users have fewer than min_rows = ", min_rows, " rows"));
  }
  return out;
}

}  // namespace

// --- Reading and writing ---------------------------------------------------------------------------

absl::StatusOr<ReadRowsResult> ReadRows(const std::string& path, const std::string& label_field) {
  ReadRowsResult result;
  int64_t nonblank = 0, first_bad_line = 0;
  std::string first_error;
  SEEDLING_RETURN_IF_ERROR(ForEachLine(path, kMaxRowBytes, [&](const Line& read) -> absl::Status {
    std::string_view line = read.text;
    if (read.number == 1 && line.starts_with(kUtf8Bom)) line.remove_prefix(kUtf8Bom.size());
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (!read.too_long && line.find_first_not_of(" \t\r") == std::string_view::npos) return absl::OkStatus();
    ++nonblank;

    Json row;
    const char* error = nullptr;
    if (read.too_long) {
      error = "row longer than 1 GiB";
    } else if (JsonNestingDepth(line) > kMaxJsonDepth) {
      error = "JSON nested too deep";
    } else {
      row = Json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
      if (row.is_discarded()) {
        error = "not valid JSON";
      } else if (!row.is_object()) {
        error = "not a JSON object";
      }
    }
    if (error != nullptr) {
      if (result.skipped++ == 0) {
        first_bad_line = read.number;
        first_error = error;
      }
      return absl::OkStatus();
    }
    result.rows.push_back(DataRow{std::string(line), Tag(row, "user"), Tag(row, label_field)});
    return absl::OkStatus();
  }));
  if (result.skipped > 0) {
    result.message = StrCat("skipped ", result.skipped, " of ", nonblank, " rows; first at line ", first_bad_line, ": ",
                            first_error);
  }
  if (result.rows.empty()) {
    return absl::InvalidArgumentError(StrCat(path, ": no JSON object rows", result.message.empty() ? "" : " (",
                                             result.message, result.message.empty() ? "" : ")"));
  }
  if (result.rows.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        StrCat(path, ": ", result.rows.size(), " rows; at most 4294967295 are supported"));
  }
  return result;
}

absl::Status WriteRowsJsonl(const std::string& path, const std::vector<DataRow>& rows,
                            std::span<const uint32_t> indices) {
  size_t bytes = 0;
  for (const uint32_t i : indices) {
    if (i >= rows.size()) {
      return absl::InvalidArgumentError(StrCat("row index ", i, " out of range: there are ", rows.size(), " rows"));
    }
    bytes += rows[i].json.size() + 1;
  }
  std::string out;
  out.reserve(bytes);
  for (const uint32_t i : indices) {
    out += rows[i].json;
    out += '\n';
  }
  return Annotate(WriteFileAtomic(path, out), StrCat("writing ", path));
}

// --- Partitioning ----------------------------------------------------------------------------------

absl::StatusOr<PartitionKind> ParsePartitionKind(std::string_view name) {
  if (name == "iid") return PartitionKind::kIid;
  if (name == "dirichlet") return PartitionKind::kDirichlet;
  if (name == "power-law" || name == "powerlaw") return PartitionKind::kPowerLaw;
  if (name == "user") return PartitionKind::kUser;
  return absl::InvalidArgumentError(
      StrCat("unknown partition \"", name, "\"; expected iid, dirichlet, power-law or user"));
}

std::string_view PartitionKindName(PartitionKind kind) {
  switch (kind) {
    case PartitionKind::kIid:
      return "iid";
    case PartitionKind::kDirichlet:
      return "dirichlet";
    case PartitionKind::kPowerLaw:
      return "power-law";
    case PartitionKind::kUser:
      return "user";
  }
  return "?";
}

std::string PartitionStats::ToString() const {
  return StrCat(devices, " devices, ", rows, " rows; rows/device min ", min_rows, " median ", median_rows, " mean ",
                absl::StrFormat("%.1f", mean_rows), " max ", max_rows, "; ", labels, " labels, ",
                absl::StrFormat("%.2f", mean_labels_per_device), " per device, label TV distance ",
                absl::StrFormat("%.3f", mean_label_tv_distance));
}

nlohmann::json PartitionStats::ToJson() const {
  return Json{{"devices", devices},
              {"rows", rows},
              {"min_rows", min_rows},
              {"median_rows", median_rows},
              {"max_rows", max_rows},
              {"mean_rows", mean_rows},
              {"labels", labels},
              {"mean_labels_per_device", mean_labels_per_device},
              {"mean_label_tv_distance", mean_label_tv_distance}};
}

PartitionStats ComputePartitionStats(const std::vector<DataRow>& rows,
                                     const std::vector<std::vector<uint32_t>>& device_rows) {
  PartitionStats s;
  s.devices = static_cast<int64_t>(device_rows.size());
  if (device_rows.empty()) return s;
  std::vector<int64_t> sizes;
  sizes.reserve(device_rows.size());
  for (const auto& d : device_rows) {
    sizes.push_back(static_cast<int64_t>(d.size()));
    s.rows += static_cast<int64_t>(d.size());
  }
  std::sort(sizes.begin(), sizes.end());
  s.min_rows = sizes.front();
  s.max_rows = sizes.back();
  s.median_rows = sizes[(sizes.size() - 1) / 2];
  s.mean_rows = static_cast<double>(s.rows) / static_cast<double>(s.devices);

  // Label ids over the assigned rows, and the global mix p.
  std::unordered_map<std::string_view, size_t> label_index;
  std::vector<int64_t> global;
  bool any_label = false;
  for (const auto& d : device_rows) {
    for (const uint32_t i : d) {
      SEEDLING_CHECK(i < rows.size(), "row index out of range");
      const auto [it, inserted] = label_index.try_emplace(rows[i].label, global.size());
      if (inserted) global.push_back(0);
      ++global[it->second];
      any_label |= !rows[i].label.empty();
    }
  }
  if (!any_label || s.rows == 0) return s;
  s.labels = static_cast<int64_t>(global.size());

  // TV_d = ½ (Σ_{k on d} |q_k − p_k| + Σ_{k not on d} p_k), in O(device size).
  std::vector<int64_t> count(global.size(), 0);
  double labels_sum = 0, tv_sum = 0;
  int64_t nonempty = 0;
  for (const auto& d : device_rows) {
    if (d.empty()) continue;
    ++nonempty;
    std::vector<size_t> seen;
    for (const uint32_t i : d) {
      const size_t k = label_index.find(rows[i].label)->second;
      if (count[k]++ == 0) seen.push_back(k);
    }
    double present_p = 0, diff = 0;
    for (const size_t k : seen) {
      const double p = static_cast<double>(global[k]) / static_cast<double>(s.rows);
      const double q = static_cast<double>(count[k]) / static_cast<double>(d.size());
      present_p += p;
      diff += std::abs(q - p);
      count[k] = 0;
    }
    labels_sum += static_cast<double>(seen.size());
    tv_sum += 0.5 * (diff + std::max(0.0, 1.0 - present_p));
  }
  s.mean_labels_per_device = labels_sum / static_cast<double>(s.devices);
  s.mean_label_tv_distance = nonempty > 0 ? tv_sum / static_cast<double>(nonempty) : 0;
  return s;
}

absl::StatusOr<Partition> PartitionRows(const std::vector<DataRow>& rows, int64_t devices,
                                        const PartitionOptions& options) {
  const std::string_view kind = PartitionKindName(options.kind);
  if (devices < 1) {
    return absl::InvalidArgumentError(StrCat("devices must be >= 1, got ", devices));
  }
  if (options.min_rows < 0) {
    return absl::InvalidArgumentError(StrCat("min_rows must be >= 0, got ", options.min_rows));
  }
  if (rows.empty()) return absl::InvalidArgumentError("no rows to partition");
  if (rows.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(StrCat(rows.size(), " rows; at most 4294967295 are supported"));
  }
  const auto n = static_cast<int64_t>(rows.size());
  if (options.kind != PartitionKind::kUser && options.min_rows > 0 && devices > n / options.min_rows) {
    return absl::InvalidArgumentError(StrCat(kind, " partition: ", devices, " devices × min_rows ", options.min_rows,
                                             " needs more rows than the ", n, " there are"));
  }
  if (options.kind == PartitionKind::kDirichlet && !(options.alpha > 0 && std::isfinite(options.alpha))) {
    return absl::InvalidArgumentError(StrCat("dirichlet alpha must be > 0 and finite, got ", options.alpha));
  }
  if (options.kind == PartitionKind::kPowerLaw && !(options.exponent > 0 && std::isfinite(options.exponent))) {
    return absl::InvalidArgumentError(StrCat("power-law exponent must be > 0 and finite, got ", options.exponent));
  }

  Rng rng(options.seed, rng_stream::kData);
  Partition out;
  switch (options.kind) {
    case PartitionKind::kIid: {
      out.device_rows = Slice(ShuffledIndices(rows.size(), rng), BalancedSizes(n, devices));
      break;
    }
    case PartitionKind::kDirichlet: {
      int64_t missing = 0;
      for (const DataRow& r : rows) missing += r.label.empty();
      if (missing > 0) {
        return absl::InvalidArgumentError(
            StrCat("dirichlet partition needs a label on every row (ReadRows' label_field, \"topic\" by "
                   "default); ",
                   missing, " of ", n, " rows lack it"));
      }
      out.device_rows = DirichletPartition(rows, devices, options.alpha, rng);
      break;
    }
    case PartitionKind::kPowerLaw: {
      out.device_rows = PowerLawPartition(rows.size(), devices, options.min_rows, options.exponent, rng);
      break;
    }
    case PartitionKind::kUser: {
      SEEDLING_ASSIGN_OR_RETURN(out.device_rows, UserPartition(rows, devices, options.min_rows));
      break;
    }
  }
  out.stats = ComputePartitionStats(rows, out.device_rows);
  return out;
}

// --- Synthetic corpus ------------------------------------------------------------------------------
//
// Every word below was checked to be a single token of the tiny preset's byte-level BPE (learned
// from data/sample/corpus.txt) when preceded by a space, so a 40-word row is ~55 tokens.

namespace {

using Words = std::span<const std::string_view>;

struct Topic {
  std::string_view name;
  Words nouns, adjectives, verbs, places;
};

constexpr std::string_view kCookingNouns[] = {"bread", "rice",  "flour", "eggs",   "salt", "oil",   "milk",  "garlic",
                                              "beans", "knife", "pot",   "fridge", "cake", "lunch", "coffee"};
constexpr std::string_view kCookingAdjectives[] = {"hot", "warm", "soft", "dry", "white"};
constexpr std::string_view kCookingVerbs[] = {"cook", "mix", "cut", "heat", "add"};
constexpr std::string_view kCookingPlaces[] = {"kitchen", "table", "market", "corner"};

constexpr std::string_view kGardenNouns[] = {"soil",  "seeds",  "leaves", "rain", "sun",
                                             "plant", "spring", "summer", "wind", "water"};
constexpr std::string_view kGardenAdjectives[] = {"green", "red", "dry", "wet", "tall"};
constexpr std::string_view kGardenVerbs[] = {"grow", "plant", "pick", "water", "cut"};
constexpr std::string_view kGardenPlaces[] = {"garden", "park", "window", "corner"};

constexpr std::string_view kTravelNouns[] = {"train", "bus",  "road", "trip", "bag",  "car",
                                             "bike",  "lake", "city", "hour", "line", "street"};
constexpr std::string_view kTravelAdjectives[] = {"early", "late", "far", "long", "fast"};
constexpr std::string_view kTravelVerbs[] = {"take", "carry", "leave", "pack", "find"};
constexpr std::string_view kTravelPlaces[] = {"station", "city", "lake", "road"};

constexpr std::string_view kPhonesNouns[] = {"phone", "battery", "screen", "app",   "apps",
                                             "music", "song",    "sound",  "notes", "call"};
constexpr std::string_view kPhonesAdjectives[] = {"new", "old", "bright", "quiet", "full"};
constexpr std::string_view kPhonesVerbs[] = {"charge", "check", "turn", "open", "play"};
constexpr std::string_view kPhonesPlaces[] = {"room", "car", "bus", "house"};

constexpr std::string_view kMoneyNouns[] = {"money", "savings", "card", "price", "budget",
                                            "cost",  "bill",    "week", "month", "pay"};
constexpr std::string_view kMoneyAdjectives[] = {"small", "cheap", "free", "big", "low"};
constexpr std::string_view kMoneyVerbs[] = {"save", "spend", "pay", "buy", "check"};
constexpr std::string_view kMoneyPlaces[] = {"store", "market", "city", "house"};

constexpr std::string_view kWeatherNouns[] = {"weather", "wind",   "rain",   "sky", "sun",
                                              "cloud",   "winter", "summer", "air", "light"};
constexpr std::string_view kWeatherAdjectives[] = {"cold", "warm", "wet", "sunny", "dark", "clear"};
constexpr std::string_view kWeatherVerbs[] = {"feel", "see", "wait", "notice", "check"};
constexpr std::string_view kWeatherPlaces[] = {"street", "city", "park", "hill"};

constexpr std::string_view kSchoolNouns[] = {"school",   "class", "teacher",  "book", "books",
                                             "children", "notes", "learning", "list", "paper"};
constexpr std::string_view kSchoolAdjectives[] = {"quiet", "long", "easy", "hard", "new"};
constexpr std::string_view kSchoolVerbs[] = {"learn", "read", "explain", "help", "use"};
constexpr std::string_view kSchoolPlaces[] = {"school", "class", "room", "town"};

constexpr std::string_view kHealthNouns[] = {"sleep", "walk",      "exercise", "heart", "rest",
                                             "water", "breakfast", "body",     "day",   "air"};
constexpr std::string_view kHealthAdjectives[] = {"slow", "long", "quiet", "early", "good"};
constexpr std::string_view kHealthVerbs[] = {"rest", "breathe", "walk", "sleep", "eat"};
constexpr std::string_view kHealthPlaces[] = {"park", "room", "house", "street"};

constexpr Topic kTopics[] = {
    {"cooking", kCookingNouns, kCookingAdjectives, kCookingVerbs, kCookingPlaces},
    {"garden", kGardenNouns, kGardenAdjectives, kGardenVerbs, kGardenPlaces},
    {"travel", kTravelNouns, kTravelAdjectives, kTravelVerbs, kTravelPlaces},
    {"phones", kPhonesNouns, kPhonesAdjectives, kPhonesVerbs, kPhonesPlaces},
    {"money", kMoneyNouns, kMoneyAdjectives, kMoneyVerbs, kMoneyPlaces},
    {"weather", kWeatherNouns, kWeatherAdjectives, kWeatherVerbs, kWeatherPlaces},
    {"school", kSchoolNouns, kSchoolAdjectives, kSchoolVerbs, kSchoolPlaces},
    {"health", kHealthNouns, kHealthAdjectives, kHealthVerbs, kHealthPlaces},
};
constexpr std::string_view kTopicNames[] = {"cooking", "garden",  "travel", "phones",
                                            "money",   "weather", "school", "health"};
static_assert(std::size(kTopicNames) == std::size(kTopics));

// Shared by every topic: the common structure all devices have in common.
constexpr std::string_view kSharedNouns[] = {"day",  "morning", "night", "week", "time",   "home",  "water", "light",
                                             "room", "list",    "plan",  "door", "window", "table", "box"};
constexpr std::string_view kSharedAdjectives[] = {"good", "small", "little", "old",  "new",
                                                  "warm", "quiet", "simple", "easy", "big"};
constexpr std::string_view kSharedVerbs[] = {"make", "take", "keep", "bring", "check",
                                             "use",  "move", "hold", "open",  "find"};
constexpr std::string_view kSharedPlaces[] = {"kitchen", "house",  "park",   "corner",
                                              "station", "market", "street", "room"};
constexpr std::string_view kTimes[] = {"every morning",    "every night", "every day",        "at night",
                                       "in the evening",   "after lunch", "before breakfast", "last week",
                                       "in the afternoon", "once a week", "this week",        "early in the morning"};
constexpr std::string_view kOpeners[] = {"well,",  "so,",         "as always,",    "you know,",
                                         "right,", "every time,", "like we said,", "to be fair,"};
constexpr std::string_view kClosers[] = {"that is all.", "more later.", "what a day.",     "and that is the best part.",
                                         "we will see.", "all good.",   "same as always.", "time for bed."};

// Sentence templates. Slots: N noun, A adjective, V verb, P place, T time phrase.
constexpr std::string_view kTemplates[] = {
    "the A N is in the P.",
    "we V the N in the P.",
    "we V the A N T.",
    "my N is A and A.",
    "you can V the N with the N.",
    "T we V the A N.",
    "the N and the N are A today.",
    "they V the N before the N.",
    "there is one A N near the P.",
    "do not V the N after the N.",
};
// Catchphrases, filled once per device from its favourite words.
constexpr std::string_view kCatchphrases[] = {"we love the A N.", "nothing is better than the A N.",
                                              "the A N in the P is the best."};

constexpr double kTopicShare = 0.75;       // chance a slot draws from the topic's words
constexpr double kOpenerRate = 0.6;        // rows starting with the device's opener
constexpr double kCloserRate = 0.6;        // rows ending with the device's closer
constexpr double kCatchphraseRate = 0.35;  // rows containing the device's catchphrase
constexpr int64_t kMinWords = 20, kMaxWords = 60;

// Draws an index with probability ∝ 1/(rank + 1) (Zipf, s = 1): divisions only, no libm, so the
// corpus is bit-identical on every platform.
size_t ZipfIndex(size_t n, Rng& rng) {
  double total = 0;
  for (size_t r = 0; r < n; ++r) total += 1.0 / static_cast<double>(r + 1);
  double u = rng.Uniform() * total;
  for (size_t r = 0; r < n; ++r) {
    if ((u -= 1.0 / static_cast<double>(r + 1)) < 0) return r;
  }
  return n - 1;
}

// A device's preferred words of one kind: a permuted subset (3/4, at least 3) of the list.
std::vector<std::string_view> Favourites(Words words, Rng& rng) {
  std::vector<std::string_view> v(words.begin(), words.end());
  Shuffle(v, rng);
  v.resize(std::max<size_t>(std::min<size_t>(3, v.size()), v.size() * 3 / 4));
  return v;
}

struct Persona {
  size_t topic = 0;
  // [0] topic words, [1] shared words, each in the device's order of preference.
  std::array<std::vector<std::string_view>, 2> nouns, adjectives, verbs, places;
  std::vector<std::string_view> times;
  std::vector<size_t> templates;  // template ids, most favoured first
  std::string_view opener, closer;
  std::string catchphrase;
};

std::string_view Pick(const std::array<std::vector<std::string_view>, 2>& words, Rng& rng) {
  const auto& list = words[rng.Uniform() < kTopicShare ? 0 : 1];
  return list[ZipfIndex(list.size(), rng)];
}

// Fills a template's slots; returns the sentence and adds its word count to `words`.
std::string Fill(std::string_view tmpl, const Persona& p, Rng& rng, int64_t& words) {
  std::string out;
  for (size_t i = 0; i < tmpl.size(); ++i) {
    const char c = tmpl[i];
    const bool slot =
        (i == 0 || tmpl[i - 1] == ' ') && (i + 1 == tmpl.size() || tmpl[i + 1] == ' ' || tmpl[i + 1] == '.');
    if (slot && c == 'N') {
      out += Pick(p.nouns, rng);
    } else if (slot && c == 'A') {
      out += Pick(p.adjectives, rng);
    } else if (slot && c == 'V') {
      out += Pick(p.verbs, rng);
    } else if (slot && c == 'P') {
      out += Pick(p.places, rng);
    } else if (slot && c == 'T') {
      out += p.times[ZipfIndex(p.times.size(), rng)];
    } else {
      out += c;
    }
  }
  words += 1 + static_cast<int64_t>(std::count(out.begin(), out.end(), ' '));
  return out;
}

int64_t WordCount(std::string_view s) {
  return s.empty() ? 0 : 1 + static_cast<int64_t>(std::count(s.begin(), s.end(), ' '));
}

Persona MakePersona(int64_t topics, Rng& rng) {
  Persona p;
  p.topic = static_cast<size_t>(rng.UniformInt(static_cast<uint64_t>(topics)));
  const Topic& t = kTopics[p.topic];
  p.nouns = {Favourites(t.nouns, rng), Favourites(kSharedNouns, rng)};
  p.adjectives = {Favourites(t.adjectives, rng), Favourites(kSharedAdjectives, rng)};
  p.verbs = {Favourites(t.verbs, rng), Favourites(kSharedVerbs, rng)};
  p.places = {Favourites(t.places, rng), Favourites(kSharedPlaces, rng)};
  p.times = Favourites(kTimes, rng);
  for (size_t i = 0; i < std::size(kTemplates); ++i) p.templates.push_back(i);
  Shuffle(p.templates, rng);
  p.templates.resize(6);
  p.opener = kOpeners[rng.UniformInt(std::size(kOpeners))];
  p.closer = kClosers[rng.UniformInt(std::size(kClosers))];
  // The catchphrase uses the device's top topic words, so it is the same in every row.
  std::string c(kCatchphrases[rng.UniformInt(std::size(kCatchphrases))]);
  std::string out;
  for (const char ch : c) {
    if (ch == 'A') {
      out += p.adjectives[0][0];
    } else if (ch == 'N') {
      out += p.nouns[0][0];
    } else if (ch == 'P') {
      out += p.places[0][0];
    } else {
      out += ch;
    }
  }
  p.catchphrase = std::move(out);
  return p;
}

std::string MakeText(const Persona& p, Rng& rng) {
  const int64_t closer_words = WordCount(p.closer);
  std::vector<std::string> parts;
  int64_t words = 0;
  if (rng.Uniform() < kOpenerRate) {
    parts.emplace_back(p.opener);
    words += WordCount(p.opener);
  }
  const bool catchphrase = rng.Uniform() < kCatchphraseRate;
  const auto sentences = static_cast<int64_t>(3 + rng.UniformInt(4));  // 3..6
  const auto catch_at = static_cast<int64_t>(rng.UniformInt(static_cast<uint64_t>(sentences)));
  for (int64_t s = 0; s < sentences || words < kMinWords; ++s) {
    // Longest template: 10 words; stop before a sentence could push past kMaxWords.
    const bool with_catchphrase = catchphrase && s == catch_at;
    const int64_t next = 10 + (with_catchphrase ? WordCount(p.catchphrase) : 0);
    if (words + next + closer_words > kMaxWords) break;
    if (with_catchphrase) {
      parts.push_back(p.catchphrase);
      words += WordCount(p.catchphrase);
    }
    const size_t tmpl = p.templates[ZipfIndex(p.templates.size(), rng)];
    parts.push_back(Fill(kTemplates[tmpl], p, rng, words));
  }
  if (rng.Uniform() < kCloserRate) {
    parts.emplace_back(p.closer);
    words += closer_words;
  }
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) text += ' ';
    text += parts[i];
  }
  return text;
}

constexpr std::string_view kInstructions[] = {"tell me about your day.", "write a short note.",
                                              "what did you do this week?", "write a few lines about your time."};

// Rows of device `device`, appended to `rows`.
void AppendDeviceRows(const SyntheticCorpusOptions& options, int64_t device, std::vector<DataRow>& rows) {
  Rng rng(options.seed, kCorpusStreamBase + static_cast<uint64_t>(device));
  const Persona persona = MakePersona(options.topics, rng);
  const std::string user = StrCat("device-", device);
  const std::string topic(kTopics[persona.topic].name);
  for (int64_t r = 0; r < options.rows_per_device; ++r) {
    const bool instruction = rng.Uniform() < options.instruction_fraction;
    const std::string text = MakeText(persona, rng);
    Json row;
    if (instruction) {
      row["instruction"] = kInstructions[rng.UniformInt(std::size(kInstructions))];
      row["input"] = "";
      row["output"] = text;
    } else {
      row["text"] = text;
    }
    row["topic"] = topic;
    row["user"] = user;
    rows.push_back(DataRow{row.dump(), user, topic});
  }
}

}  // namespace

std::span<const std::string_view> SyntheticTopics() { return kTopicNames; }

FederatedCorpus MakeSyntheticCorpus(const SyntheticCorpusOptions& options) {
  SEEDLING_CHECK(options.devices >= 1, "devices must be >= 1");
  SEEDLING_CHECK(options.heldout_devices >= 0, "heldout_devices must be >= 0");
  SEEDLING_CHECK(options.rows_per_device >= 1, "rows_per_device must be >= 1");
  SEEDLING_CHECK(options.topics >= 1 && options.topics <= static_cast<int64_t>(std::size(kTopics)),
                 "topics out of range");
  SEEDLING_CHECK(options.instruction_fraction >= 0 && options.instruction_fraction <= 0.5,
                 "instruction_fraction must be in [0, 0.5]");
  const int64_t total_devices = options.devices + options.heldout_devices;
  SEEDLING_CHECK(total_devices <= std::numeric_limits<uint32_t>::max() / options.rows_per_device, "too many rows");

  FederatedCorpus corpus;
  corpus.rows.reserve(static_cast<size_t>(total_devices * options.rows_per_device));
  corpus.train.device_rows.resize(static_cast<size_t>(options.devices));
  corpus.heldout.resize(static_cast<size_t>(options.heldout_devices));
  for (int64_t d = 0; d < total_devices; ++d) {
    const auto first = static_cast<uint32_t>(corpus.rows.size());
    AppendDeviceRows(options, d, corpus.rows);
    auto& indices = d < options.devices ? corpus.train.device_rows[static_cast<size_t>(d)]
                                        : corpus.heldout[static_cast<size_t>(d - options.devices)];
    for (auto i = first; i < corpus.rows.size(); ++i) indices.push_back(i);
  }
  corpus.train.stats = ComputePartitionStats(corpus.rows, corpus.train.device_rows);
  return corpus;
}

}  // namespace seedling::simulator
