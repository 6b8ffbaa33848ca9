#pragma once

// One local training job as the planner, the data loader and the trainer see it, built in one place: from
// a server's task (TaskSpecFromTask, the SDK) or from the finetune command's flags (apps/cmd_finetune.cpp).

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "client/local_data.h"
#include "client/local_training.h"
#include "client/memory_planner.h"
#include "client/pseudo_label.h"
#include "comms/proto/seedling.pb.h"
#include "lora/lora_config.h"
#include "model/config.h"
#include "model/weights.h"

namespace seedling::client {

struct TaskSpec {
  TrainingConfig training;          // method, steps, lr, epsilon, seed, perturbations, kseed pool ...
  lora::LoraConfig lora;            // the adapter (ignored with training.full_parameters)
  int64_t seq_len = 256;            // tokens per sequence
  int64_t batch = 1;                // sequences per step
  PseudoLabelOptions pseudo_label;  // off unless the task carries choices and a share > 0
};

// The task's method, hyperparameters (absent ones take the trainer's defaults: steps 20, seq_len 256,
// batch 1, fwdgrad's K 8; federated mezo and kseed probe one seed per step), adapter and pseudo-labelling
// (choices, pseudo_label_share, pseudo_label_threshold; absent: off). InvalidArgument for an unknown method or
// LoRA target, or a pseudo-label share outside [0, 1] or threshold outside [0, 1).
absl::StatusOr<TaskSpec> TaskSpecFromTask(const v1::Task& task);

// The planner's request for `spec` on the model in `model_dir` (config `model`) held as `weights`: the
// weights' resident and streamed bytes included. Budget, runtime and data bytes are the caller's.
absl::StatusOr<PlanRequest> PlanRequestFor(const TaskSpec& spec, const std::string& model_dir,
                                           const model::ModelConfig& model, model::WeightPrecision weights);

// The data loader's options for `spec`: sequence length, batch, the run's seed and the model's first EOS id.
LocalDataOptions DataOptionsFor(const TaskSpec& spec, const model::ModelConfig& model);

}  // namespace seedling::client
