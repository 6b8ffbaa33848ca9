#pragma once

// One device's local fine-tuning run: what the SDK does inside a round, and what `seedling finetune` runs
// from the command line. It builds the method's trainer with the memory plan's settings, runs the steps over
// the device's data, and measures the held-out loss before and after.

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "client/local_data.h"
#include "client/memory_planner.h"
#include "lora/adapter.h"
#include "model/llama.h"
#include "optim/fwdgrad.h"
#include "optim/kseed.h"
#include "optim/trainer.h"

namespace seedling::client {

struct TrainingConfig {
  optim::Method method = optim::Method::kLoraBp;
  int64_t steps = 100;           // optimization steps
  double lr = 0;                 // 0 = the method's default (see DefaultLearningRate)
  double epsilon = 0;            // SPSA / central-difference scale; 0 = the method's default
  uint64_t seed = 0;             // perturbation, sampling and dropout seeds derive from it
  bool full_parameters = false;  // mezo / kseed: train every weight instead of the adapter
  // Perturbations per step: fwdgrad's K, mezo / kseed's q (n-SPSA); 0 = the method's default
  // (PerturbationsPerStep: 8 for fwdgrad, 1 for mezo and kseed).
  int64_t perturbations = 0;
  double max_grad_norm = 1.0;         // lora-bp: gradient clipping; pepita: update clipping (0 = off)
  int64_t kseed_pool_size = 4096;     // kseed: K candidate seeds (the server's)
  uint64_t kseed_pool_seed = 0;       // kseed: the server's pool seed
  bool fwdgrad_apply_locally = true;  // false in federated rounds: the server applies the summed estimate
  // pepita: the feedback matrix F's seed (fixed for a run) and scale (optim::PepitaOptions). The variant (PEPITA
  // or MEMPEPITA) is the memory plan's.
  uint64_t pepita_feedback_seed = 0;
  double pepita_feedback_scale = 0.05;
  // Benchmarks: the first `untimed_steps` steps (warming caches, the allocator and lazily built kernels) are
  // left out of `seconds` and the token counts, and steps continue past `steps` until the timed steps took
  // `min_seconds`. Both 0 in training proper.
  int64_t untimed_steps = 0;
  double min_seconds = 0;
  // Benchmarks: after training, time plain forwards (the loss without gradients, the plan's chunking) on
  // training batches for at least this long (one untimed first): the inference figure the steps compare
  // to, in their own shapes. 0 = off.
  double forward_seconds = 0;
};

// config.perturbations, or the method's default when it is 0.
int64_t PerturbationsPerStep(const TrainingConfig& config);

// Published starting points (docs/methods.md): lora-bp 2e-4 (AdamW); fwdgrad 1e-2 (FwdLLM's SGD); mezo 1e-4 on
// LoRA, 1e-6 on full parameters; kseed 1e-4 on LoRA, 3e-7 on full parameters (FedKSeed); pepita 0.1 (PEPITA's
// 0.01 with momentum 0.9).
double DefaultLearningRate(optim::Method method, bool full_parameters);
// mezo 1e-2 on LoRA, 1e-3 full; kseed 1e-2 on LoRA, 5e-4 full (FedKSeed); fwdgrad central difference 1e-2.
double DefaultEpsilon(optim::Method method, bool full_parameters);

// Where a run stood after some step, enough to continue it in a new process (the SDK keeps the latest in
// its state directory). Adapter runs only: with full parameters the model itself would have to be saved.
struct TrainingCheckpoint {
  optim::TrainerState trainer;
  std::vector<float> params;  // the adapter's flat buffer
  IteratorPosition data;      // the next batch
  double loss_start = 0;
  int64_t scored_tokens = 0;
  int64_t processed_tokens = 0;
  double seconds = 0;
};

// Optional controls of a run.
struct TrainingControl {
  int64_t checkpoint_every = 0;                                          // steps between checkpoints (0 = none)
  std::function<absl::Status(const TrainingCheckpoint&)> on_checkpoint;  // an error stops the run
  const TrainingCheckpoint* resume = nullptr;                            // continue from here instead of starting fresh
  std::function<bool()> cancelled;  // polled between steps: Cancelled after a final checkpoint
};

struct TrainingResult {
  double loss_start = 0;  // held-out loss before training (the training data if nothing is held out)
  double loss_end = 0;    // and after
  int64_t steps = 0;
  int64_t skipped_steps = 0;  // non-finite losses or gradients
  // Tokens the steps processed (every token of every row, prompts included: what throughput counts, as
  // `bench forward` and other tools do) and, of those, the ones the loss scored (responses, not prompts).
  int64_t processed_tokens = 0;
  int64_t scored_tokens = 0;
  double seconds = 0;  // training steps only
  // TrainingConfig::forward_seconds: plain forwards timed on training batches after training.
  int64_t forward_processed_tokens = 0;
  double forward_seconds = 0;
  int64_t step_tensor_peak_bytes = 0;          // tensor high-water mark during the steps (TensorMemoryTracker)
  std::vector<optim::SeedScalar> kseed_pairs;  // kseed: the upload (seed index, scalar) per applied step
  optim::ForwardGradient fwdgrad_last;         // fwdgrad: the last step's (seed, derivative) pairs
  std::vector<float> fwdgrad_sum;              // fwdgrad: Σ of the steps' estimates (the FwdLLM upload)
  std::vector<std::pair<uint64_t, float>> fwdgrad_pairs;  // fwdgrad: the same as (seed, d/K) pairs
};

// Called after every step with (steps done, steps total, the step's loss).
using TrainingProgress = std::function<void(int64_t, int64_t, double)>;

// Runs `config.steps` steps. `adapter` is required unless config.full_parameters (then the model's own
// weights are trained in place: the model must be loaded with fp32 weights). `plan` supplies micro-batch,
// recomputation, cross-entropy chunk and method variant. InvalidArgument for inconsistent arguments; model
// errors are passed through. The model and adapter hold the trained parameters afterwards.
absl::StatusOr<TrainingResult> RunLocalTraining(model::LlamaModel& model, lora::LoraAdapter* adapter,
                                                const LocalDataset& data, const TrainingConfig& config,
                                                const MemoryPlan& plan, const TrainingProgress& progress = nullptr,
                                                const TrainingControl& control = {});

// An adapter run on a base model that is only read (one shared by clients, as in the simulator).
// InvalidArgument with config.full_parameters; otherwise as RunLocalTraining.
absl::StatusOr<TrainingResult> RunAdapterTraining(const model::LlamaModel& model, lora::LoraAdapter& adapter,
                                                  const LocalDataset& data, const TrainingConfig& config,
                                                  const MemoryPlan& plan, const TrainingProgress& progress = nullptr,
                                                  const TrainingControl& control = {});

// Process RSS after warming up, as the planner's runtime baseline: a training step of every method on a
// micro model (a few KiB of weights) first touches the BLAS thread buffers and the LibTorch code that
// forward, backward and forward-mode AD run through (tens of MiB of code pages counted in RSS), which
// otherwise appear only during the first real step.
int64_t MeasureRuntimeBytes();

}  // namespace seedling::client
