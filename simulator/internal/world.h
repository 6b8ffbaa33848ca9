#pragma once

// What every method of one simulation shares (simulator/simulation.h): the work directory, the population,
// the devices' data on disk, the shared base model and the evaluation set; and the client settings of one
// simulated device. Internal to the simulator.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "model/config.h"
#include "model/dataset.h"
#include "model/eval.h"
#include "simulator/mpi.h"
#include "simulator/population.h"
#include "simulator/simulation.h"

namespace seedling::simulator::internal {

// "phone-00042": the id device `device` registers with and its state directory's name.
std::string DeviceId(int64_t device);

struct WorkDir {
  std::string path;
  bool remove = false;  // made for this run: removed at the end
  bool shared = false;  // every rank sees it
};

// Everything the methods share: the population, the data on disk, the model and the evaluation set.
struct World {
  const SimulationOptions* options = nullptr;
  std::string work_dir;
  bool remove_work_dir = false;
  std::unique_ptr<Population> population;
  std::vector<std::string> data_paths;  // per device
  std::string partition_summary;
  PartitionStats partition_stats;    // of the split partition_summary describes
  client::SharedModel shared;        // loaded with options->server.weights
  std::string weight_cache_dir;      // of the shared model's weight cache, and of any device that needs another
  int64_t weight_bytes = 0;          // resident bytes of the shared model's weights (what each device plans for)
  int64_t device_runtime_bytes = 0;  // each device's planned runtime baseline (SimulationOptions)
  model::ModelConfig model_config;
  std::vector<model::Example> eval_examples;
  std::vector<model::ChoiceItem> choice_items;  // labelled held-out rows (accuracy); empty: no labels
  std::vector<std::string> choice_labels;       // their candidate labels, sorted (pseudo-labelling's choices)
  double end_time_s = 0;
  MpiRanks* ranks = nullptr;  // nullptr: one process
  // Every rank sees work_dir (one machine, or a shared file system): a device's state can be used from
  // any rank, so each activation runs on the least busy rank. Otherwise device d lives on rank d % R.
  bool shared_work_dir = false;

  int rank() const { return ranks == nullptr ? 0 : ranks->rank(); }
  // Static placement (no shared work_dir): the rank that keeps device d's state.
  int Owner(int64_t device) const { return ranks == nullptr ? 0 : static_cast<int>(device % ranks->size()); }
};

// The client settings of simulated device `d` for the method whose state lives in `method_dir`.
client::ClientConfig DeviceClientConfig(const World& world, const std::string& method_dir, int64_t d,
                                        const std::string& token);

// Where rank 0 keeps server and device state: tmpfs when available (fsync-heavy and thrown away).
WorkDir RankZeroWorkDir(const SimulationOptions& options);

// Loads the shared model, builds the population, and writes each device's data (the devices this rank
// writes: all on rank 0 with a shared work directory, else each rank its own). InvalidArgument when no
// held-out example is usable; the loaders' errors otherwise.
absl::StatusOr<World> MakeWorld(const SimulationOptions& options, MpiRanks* ranks, const WorkDir& wd);

}  // namespace seedling::simulator::internal
