#pragma once

// The on-device SDK (docs/architecture.md, "The client"): one Client per app. RunOnce() does one step of the
// federated protocol: finish an interrupted upload, or check in, and if the server assigns a task, run it in named
// stages (Client::Train): plan memory (declining tasks that do not fit), sync the global adapter (download it, or
// replay seed sums for kseed), load the device's data, train with checkpoints, clip, encode the update with the
// task's codec and upload it in resumable chunks. Everything it needs to resume after the app is killed lives in
// the state directory (client/internal/state_dir.h).
//
// Network errors are retried with exponential backoff and full jitter; the server's RetryAfter is
// obeyed by returning kRetryLater with its delay. Thread-safety: RunOnce runs one at a time (a second
// concurrent call waits); SetConditions, Cancel and the progress callback may be used from other threads.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "base/clock.h"
#include "client/client_config.h"
#include "client/local_data.h"
#include "comms/transport.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace seedling::lora {
class LoraAdapter;
struct LoraConfig;
}  // namespace seedling::lora
namespace seedling::optim {
enum class Method;
}  // namespace seedling::optim

namespace seedling::client {
namespace internal {
class SecAggParticipant;
struct StateDir;
}  // namespace internal
struct MemoryPlan;
struct TaskSpec;
struct TrainingResult;

struct Conditions {
  bool charging = false;
  bool unmetered = false;
  bool idle = false;
  float battery = 1.0f;
};

enum class RunOutcome {
  kUploaded,    // an update was acknowledged (durable on the server)
  kRetryLater,  // no task now (not selected, no round, conditions): call again after retry_after_seconds
  kDeclined,    // a task was declined (memory budget, unsupported method or model)
  kCancelled,   // Cancel() was called; progress is checkpointed
  kDropped,     // the task's round closed or was aborted (STALE, ABORTED; a straggler's routine fate), or the
                // server refused the update (INVALID_UPDATE): any trained update is discarded, `detail` says
                // why; call again now, the next call checks in afresh
};
const char* RunOutcomeName(RunOutcome o);

struct RunResult {
  RunOutcome outcome = RunOutcome::kRetryLater;
  uint32_t retry_after_seconds = 0;
  uint64_t round_id = 0;
  std::string detail;
  double loss_start = 0;  // kUploaded: held-out loss before and after local training
  double loss_end = 0;
  uint64_t update_bytes = 0;
  uint64_t processed_tokens = 0;  // kUploaded after training: tokens the steps processed (prompts included),
  uint64_t scored_tokens = 0;     // the ones the loss scored,
  double tokens_per_second = 0;   // and processed tokens per second of training
  std::string weights;  // kUploaded after training, and kDeclined for memory: the representation of the frozen
                        // base weights the device planned (and trained) with: "fp32", "stored", "q8_0", "q4_0"
};

struct RunProgress {
  std::string phase;  // "connecting", "syncing", "training", "uploading"
  int64_t done = 0;
  int64_t total = 0;
};

// Models shared between clients in one process (the simulator): a frozen base model and its tokenizer.
// A client uses `model` for tasks that want its `precision`; for another it loads its own copy.
struct SharedModel {
  std::shared_ptr<const model::LlamaModel> model;
  std::shared_ptr<const model::Tokenizer> tokenizer;
  model::WeightPrecision precision = model::WeightPrecision::kFloat32;  // how `model` holds its frozen weights
};

// Simulation only (simulator/): the device's clock and the one random choice that shapes a
// secure-aggregation sum. Never set in an app.
struct SimulationHooks {
  // The device's clock (base/clock.h): a device waiting between protocol steps (a SecAgg stage that is not
  // closed yet, a back-off) passes simulated time with clock->Sleep instead of sleeping. Must outlive the
  // RunOnce calls that use it. Null: the host's SteadyClock and a real, cancellable sleep.
  SimulatedClock* clock = nullptr;
  // Seeds the stochastic rounding of SecAgg inputs (per round) instead of the OS CSPRNG, so that a
  // simulation repeats; the masks and keys still come from the CSPRNG (they cancel out of the sum).
  std::optional<uint64_t> secagg_rounding_seed;
};

class Client {
 public:
  // `transport` defaults to TLS from the config. `shared` (optional) avoids loading the model per client.
  static absl::StatusOr<std::unique_ptr<Client>> Create(ClientConfig config,
                                                        std::unique_ptr<comms::Transport> transport = nullptr,
                                                        SharedModel shared = {});
  ~Client();

  void SetConditions(const Conditions& conditions);
  // Replaces the data file (JSONL, checked when the next task needs it).
  absl::Status SetDataPath(const std::string& path);
  // Appends one JSONL row to the local example store (<state_dir>/examples.jsonl). InvalidArgument if the
  // row is not a JSON object.
  absl::Status AddExample(std::string_view json_row);
  void SetProgressCallback(std::function<void(const RunProgress&)> callback);
  // For tests and the simulator: sees each encoded update before it is uploaded. In a secure-aggregation
  // round: the quantized input before masking (m uint32, little-endian) with its weight; it never leaves
  // the device in that form.
  void SetUploadObserver(std::function<void(const v1::Task&, const std::string& payload, uint64_t num_examples)> f);
  // See SimulationHooks. Waits for a running RunOnce to return.
  void SetSimulationHooks(SimulationHooks hooks);

  // Blocking. Errors: Unauthenticated (bad token), Unavailable / DeadlineExceeded after all retries,
  // DataLoss (corrupt state directory), InvalidArgument (no usable data) ...; the state directory stays
  // consistent whatever happens, so the next call continues.
  absl::StatusOr<RunResult> RunOnce();
  // Makes a running RunOnce return kCancelled at the next step boundary (after a checkpoint), between
  // upload chunks, or during a wait; if no RunOnce is running, the next one returns kCancelled at once.
  // One Cancel() stops one run.
  void Cancel();

 private:
  using State = internal::StateDir;
  Client(ClientConfig config, std::unique_ptr<comms::Transport> transport, SharedModel shared);

  // One run: resume a pending upload, check in, then run the task (or report when to come back).
  absl::StatusOr<RunResult> RunOnceLocked();
  // Check in with this device's conditions, budget and synced version: a task or a retry-after.
  absl::StatusOr<v1::CheckInReply> CheckIn(std::unique_ptr<comms::Channel>& channel, const State& state);
  // Declines a task this device cannot run (another base model, a method not enabled, unknown weights),
  // else trains it.
  absl::StatusOr<RunResult> RunTask(std::unique_ptr<comms::Channel>& channel, const v1::Task& task, State& state);
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect();
  absl::StatusOr<v1::Envelope> Call(std::unique_ptr<comms::Channel>& channel, v1::Envelope request);
  absl::StatusOr<RunResult> Upload(std::unique_ptr<comms::Channel>& channel, State& state);
  // Tells the server this device will not run `task` (it counts the reason) and returns kDeclined.
  absl::StatusOr<RunResult> Decline(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                    v1::Decline::Reason reason, std::string detail);

  // Train runs one task in named stages: plan -> sync -> load data -> train -> clip -> encode -> upload.
  absl::StatusOr<RunResult> Train(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                  model::WeightPrecision weights, State& state);
  // Plan: the memory plan for the task on this device's budget; ResourceExhausted if it cannot fit.
  absl::StatusOr<MemoryPlan> PlanTask(const TaskSpec& spec, const model::ModelConfig& model_config,
                                      model::WeightPrecision weights, const std::string& data_path,
                                      const LocalDataOptions& data_options);
  // Loads the tokenizer, and the base model with `weights` unless model_ already holds it that way (a model
  // held another way is dropped first: one copy at a time).
  absl::Status EnsureModel(model::WeightPrecision weights);
  // Sync: brings adapter.safetensors to the task's global version (seed replay for kseed, else download).
  absl::Status SyncGlobal(std::unique_ptr<comms::Channel>& channel, const v1::Task& task, const lora::LoraConfig& lora,
                          const model::ModelConfig& model_config, State& state);
  // Records the task as the one being trained (phase kTraining), dropping another task's checkpoint.
  absl::Status BeginTask(const v1::Task& task, State& state);
  absl::StatusOr<std::unique_ptr<internal::SecAggParticipant>> JoinSecAgg(std::unique_ptr<comms::Channel>& channel,
                                                                          const v1::Task& task, optim::Method method,
                                                                          const std::vector<float>& global);
  // Train: local steps from the task's checkpoint if there is one, checkpointing as configured. Cancelled
  // if Cancel() came.
  absl::StatusOr<TrainingResult> TrainLocally(const TaskSpec& spec, const MemoryPlan& plan, const LocalDataset& data,
                                              lora::LoraAdapter& adapter, const State& state);
  absl::StatusOr<RunResult> SubmitSecAgg(internal::SecAggParticipant& secagg, const v1::Task& task,
                                         const std::vector<float>& update, uint64_t examples, State& state);
  // Writes the encoded update durably (phase kTrained) before the upload starts.
  absl::Status StageUpload(const std::string& payload, uint64_t examples, const TrainingResult& trained, State& state);
  std::string DataPath();
  LocalDataOptions DataOptions(const TaskSpec& spec, const model::ModelConfig& model_config) const;
  // Shows the upload observer (SetUploadObserver) what is about to leave the device.
  void Observe(const v1::Task& task, const std::string& payload, uint64_t weight);
  // Waits `seconds` on the device's clock (SimulationHooks) or the host's; false if cancelled.
  bool Sleep(double seconds);
  // The device's clock (SimulationHooks) or the host's: monotonic (NowMs, for waits) and the time of day
  // (TimeOfDayMs, for records such as acks.jsonl). A simulated clock serves both.
  int64_t NowMs();
  int64_t TimeOfDayMs();
  void Report(const std::string& phase, int64_t done, int64_t total);

  // Constant after construction.
  const ClientConfig config_;
  std::unique_ptr<comms::Transport> transport_;

  std::mutex run_mu_;  // one RunOnce at a time; guards everything below except the atomics and mu_'s
  SharedModel model_;
  int64_t runtime_bytes_ = -1;  // the planner's runtime baseline, measured before the first model load
  std::string model_id_;
  uint64_t request_id_ = 0;
  uint64_t attempt_counter_ = 0;
  SimulationHooks hooks_;

  std::mutex mu_;  // the settings other threads may change during a run
  Conditions conditions_ ABSL_GUARDED_BY(mu_);
  std::function<void(const RunProgress&)> progress_ ABSL_GUARDED_BY(mu_);
  std::function<void(const v1::Task&, const std::string&, uint64_t)> upload_observer_ ABSL_GUARDED_BY(mu_);
  std::string data_path_ ABSL_GUARDED_BY(mu_);

  std::atomic<bool> cancelled_{false};
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
};

}  // namespace seedling::client
