// Building the world every method of a simulation shares (simulator/internal/world.h).

#include "simulator/internal/world.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "base/file.h"
#include "base/philox.h"
#include "base/progress.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/local_training.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"
#include "simulator/data.h"

namespace seedling::simulator::internal {

std::string DeviceId(int64_t device) {
  std::string digits = std::to_string(device);
  if (digits.size() < 5) digits.insert(0, 5 - digits.size(), '0');
  return "phone-" + digits;
}

// The client settings of simulated device `d` for the method whose state lives in `method_dir`.
client::ClientConfig DeviceClientConfig(const World& world, const std::string& method_dir, int64_t d,
                                        const std::string& token) {
  client::ClientConfig cc;
  cc.device_id = DeviceId(d);
  cc.token = token;
  cc.state_dir = JoinPath(JoinPath(method_dir, "devices"), DeviceId(d));
  cc.model_dir = world.options->model_dir;
  cc.weight_cache_dir = world.weight_cache_dir;
  cc.data_path = world.data_paths[static_cast<size_t>(d)];
  cc.memory_budget_bytes = world.population->memory_budget_bytes(d);
  cc.runtime_bytes = world.device_runtime_bytes;
  cc.max_attempts = 1;  // a failed request ends the activation; the simulator reschedules the device
  cc.checkpoint_every = 0;
  cc.seed = world.options->seed ^ static_cast<uint64_t>(d);
  return cc;
}
namespace {

std::string DefaultPhoneClassesPath() { return std::string(SEEDLING_DATA_DIR) + "/phones/phone_classes.csv"; }

// Accuracy where the task has labels: a row whose "output" equals its label (the classification form,
// {"instruction": ..., "output": "sports", "topic": "sports"}) is labelled. Each labelled held-out row
// becomes a multiple-choice item over the sorted label set (every candidate label as the output); none
// when fewer than 2 or more than kMaxChoiceLabels labels.
constexpr size_t kMaxChoiceLabels = 64;

// A classification row: its "output" is its label.
bool IsLabelledRow(const DataRow& r, nlohmann::json* parsed) {
  if (r.label.empty() || r.json.find("\"output\"") == std::string::npos) return false;  // most rows: no parse
  nlohmann::json j = nlohmann::json::parse(r.json, nullptr, false);
  if (!j.is_object() || !j.contains("output") || !j["output"].is_string() || j["output"] != r.label) return false;
  if (parsed != nullptr) *parsed = std::move(j);
  return true;
}

// SimulationOptions::labelled_fraction: all but round(fraction × n) of the training devices' n labelled rows
// (at least 1 when fraction > 0), chosen by a Fisher-Yates shuffle on stream (seed, kData), lose their output
// (null) and their label field, so a device can neither train on them nor read their label.
void HideLabels(std::vector<DataRow>& rows, const std::vector<std::vector<uint32_t>>& device_rows, double fraction,
                uint64_t seed) {
  if (fraction >= 1) return;
  std::vector<uint32_t> labelled;
  for (const std::vector<uint32_t>& device : device_rows) {
    for (uint32_t i : device) {
      if (IsLabelledRow(rows[i], nullptr)) labelled.push_back(i);
    }
  }
  std::sort(labelled.begin(), labelled.end());
  const auto n = static_cast<int64_t>(labelled.size());
  int64_t keep = std::llround(fraction * static_cast<double>(n));
  if (fraction > 0 && n > 0) keep = std::max<int64_t>(keep, 1);
  Rng rng(seed ^ 0x6c6162656c6c6564ULL, rng_stream::kData);  // ASCII "labelled"
  for (int64_t i = n - 1; i > 0; --i) {
    std::swap(labelled[static_cast<size_t>(i)], labelled[rng.UniformInt(static_cast<uint64_t>(i) + 1)]);
  }
  for (int64_t k = keep; k < n; ++k) {
    DataRow& r = rows[labelled[static_cast<size_t>(k)]];
    nlohmann::json j;
    IsLabelledRow(r, &j);
    j["output"] = nullptr;
    j.erase("topic");
    r.json = j.dump();
  }
}

absl::StatusOr<std::vector<model::ChoiceItem>> ChoiceItems(const std::vector<DataRow>& rows,
                                                           const std::vector<std::vector<uint32_t>>& heldout,
                                                           const model::Tokenizer& tokenizer,
                                                           const model::DatasetOptions& dso, int64_t limit,
                                                           std::vector<std::string>* labels_out) {
  const auto labelled = IsLabelledRow;
  std::set<std::string> label_set;
  for (const DataRow& r : rows) {
    if (labelled(r, nullptr)) label_set.insert(r.label);
  }
  std::vector<model::ChoiceItem> items;
  if (label_set.size() < 2 || label_set.size() > kMaxChoiceLabels) return items;
  const std::vector<std::string> labels(label_set.begin(), label_set.end());
  *labels_out = labels;
  for (const std::vector<uint32_t>& device : heldout) {
    for (uint32_t i : device) {
      if (static_cast<int64_t>(items.size()) >= limit) return items;
      nlohmann::json j;
      if (!labelled(rows[i], &j)) continue;
      model::ChoiceItem item;
      bool usable = true;
      for (size_t k = 0; k < labels.size() && usable; ++k) {
        j["output"] = labels[k];
        absl::StatusOr<model::Example> e = model::TokenizeRow(j.dump(), tokenizer, dso);
        usable = e.ok() && e->ScoredTokens() > 0;
        if (usable) item.candidates.push_back(*std::move(e));
        if (labels[k] == rows[i].label) item.answer = static_cast<int64_t>(k);
      }
      if (usable) items.push_back(std::move(item));
    }
  }
  return items;
}

}  // namespace

// Where rank 0 keeps server and device state: tmpfs when available (fsync-heavy and thrown away).
WorkDir RankZeroWorkDir(const SimulationOptions& options) {
  WorkDir wd;
  if (options.work_dir.empty()) {
    std::string base = std::filesystem::temp_directory_path().string();
    if (std::filesystem::is_directory("/dev/shm") && access("/dev/shm", W_OK) == 0) base = "/dev/shm";
    wd.path = JoinPath(base, StrCat("seedling-sim-", getpid()));
    wd.remove = true;
  } else {
    wd.path = options.work_dir;
  }
  return wd;
}

absl::StatusOr<World> MakeWorld(const SimulationOptions& options, MpiRanks* ranks, const WorkDir& wd) {
  World w;
  w.options = &options;
  w.ranks = ranks;
  w.work_dir = wd.path;
  w.remove_work_dir = wd.remove;
  w.shared_work_dir = ranks != nullptr && wd.shared;
  std::error_code ec;
  std::filesystem::create_directories(JoinPath(w.work_dir, "data"), ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", w.work_dir, ": ", ec.message()));

  // Model (shared read-only by every device, held as the rounds' tasks say) and its tokenizer.
  SEEDLING_ASSIGN_OR_RETURN(w.model_config, model::LoadModelConfig(options.model_dir));
  w.weight_cache_dir =
      options.weight_cache_dir.empty() ? JoinPath(options.model_dir, ".seedling-cache") : options.weight_cache_dir;
  model::LoadOptions load;
  load.precision = options.server.weights;
  load.cache_dir = w.weight_cache_dir;
  std::unique_ptr<Progress> cache_progress;
  if (options.progress && w.rank() == 0) {
    load.cache_progress = [&](int64_t done, int64_t total) {
      if (cache_progress == nullptr) {
        cache_progress = std::make_unique<Progress>(
            StrCat("building the ", model::WeightPrecisionName(load.precision), " weight cache"), total);
      }
      cache_progress->Update(done);
    };
  }
  // Before the shared model exists: what a device's process holds besides its model.
  w.device_runtime_bytes =
      options.device_runtime_bytes >= 0 ? options.device_runtime_bytes : client::MeasureRuntimeBytes();
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m, model::LlamaModel::Load(options.model_dir, load));
  cache_progress.reset();
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tok, model::LoadTokenizer(options.model_dir));
  w.shared.model = std::shared_ptr<const model::LlamaModel>(std::move(m));
  w.shared.tokenizer = std::shared_ptr<const model::Tokenizer>(std::move(tok));
  w.shared.precision = load.precision;
  SEEDLING_ASSIGN_OR_RETURN(w.weight_bytes,
                            model::ResidentWeightBytes(options.model_dir, w.model_config, load.precision));

  // Population.
  const std::string csv = options.phone_classes.empty() ? DefaultPhoneClassesPath() : options.phone_classes;
  SEEDLING_ASSIGN_OR_RETURN(std::vector<PhoneClass> classes, LoadPhoneClasses(csv));
  PopulationOptions po = options.population;
  po.seed = options.seed;
  SEEDLING_ASSIGN_OR_RETURN(Population pop, Population::Create(std::move(classes), po));
  w.population = std::make_unique<Population>(std::move(pop));
  const int64_t n = w.population->size();

  // Data: each training device's rows as a JSONL file its client loads; held-out devices' rows evaluate.
  std::vector<DataRow> rows;
  std::vector<std::vector<uint32_t>> device_rows, heldout_rows;
  if (options.data_path.empty()) {
    SyntheticCorpusOptions co = options.corpus;
    co.devices = n;
    co.heldout_devices = options.heldout_devices;
    co.seed = options.seed;
    FederatedCorpus corpus = MakeSyntheticCorpus(co);
    rows = std::move(corpus.rows);
    device_rows = std::move(corpus.train.device_rows);
    heldout_rows = std::move(corpus.heldout);
    w.partition_stats = corpus.train.stats;
    w.partition_summary = StrCat("built-in synthetic corpus: ", corpus.train.stats.ToString());
  } else {
    SEEDLING_ASSIGN_OR_RETURN(ReadRowsResult read, ReadRows(options.data_path));
    if (read.skipped > 0) spdlog::warn("{}", read.message);
    rows = std::move(read.rows);
    PartitionOptions po2 = options.partition;
    po2.seed = options.seed;
    SEEDLING_ASSIGN_OR_RETURN(Partition p, PartitionRows(rows, n + options.heldout_devices, po2));
    device_rows.assign(p.device_rows.begin(), p.device_rows.begin() + n);
    heldout_rows.assign(p.device_rows.begin() + n, p.device_rows.end());
    w.partition_stats = p.stats;
    w.partition_summary = StrCat(options.data_path, ": ", p.stats.ToString());
  }
  if (static_cast<int64_t>(device_rows.size()) != n) {
    return absl::InternalError(StrCat("the partition has ", device_rows.size(), " devices, expected ", n));
  }
  HideLabels(rows, device_rows, options.labelled_fraction, options.seed);
  w.data_paths.resize(static_cast<size_t>(n));
  for (int64_t d = 0; d < n; ++d) {
    w.data_paths[static_cast<size_t>(d)] = JoinPath(JoinPath(w.work_dir, "data"), DeviceId(d) + ".jsonl");
    // Shared work directory: rank 0 writes every device's data; otherwise each rank its own devices'.
    if (w.shared_work_dir ? w.rank() != 0 : w.Owner(d) != w.rank()) continue;
    SEEDLING_RETURN_IF_ERROR(
        WriteRowsJsonl(w.data_paths[static_cast<size_t>(d)], rows, device_rows[static_cast<size_t>(d)]));
  }
  model::DatasetOptions dso;
  dso.max_seq_len = options.server.seq_len;
  if (!w.model_config.eos_token_ids.empty()) dso.eos_id = static_cast<int32_t>(w.model_config.eos_token_ids[0]);
  for (const std::vector<uint32_t>& device : heldout_rows) {
    for (uint32_t i : device) {
      if (static_cast<int64_t>(w.eval_examples.size()) >= options.eval_examples) break;
      absl::StatusOr<model::Example> e = model::TokenizeRow(rows[i].json, *w.shared.tokenizer, dso);
      if (e.ok() && e->ScoredTokens() > 0) w.eval_examples.push_back(*std::move(e));
    }
  }
  if (w.eval_examples.empty()) return absl::InvalidArgumentError("no usable held-out example to evaluate on");
  SEEDLING_ASSIGN_OR_RETURN(w.choice_items, ChoiceItems(rows, heldout_rows, *w.shared.tokenizer, dso,
                                                        options.eval_examples, &w.choice_labels));
  w.end_time_s = options.start_time_s + options.max_hours * 3600.0;
  return w;
}
}  // namespace seedling::simulator::internal
