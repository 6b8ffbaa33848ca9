#include "client/task_spec.h"

#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "optim/method.h"

namespace seedling::client {
namespace {

double Hyperparameter(const v1::Task& task, const char* key, double fallback) {
  auto it = task.hyperparameters().find(key);
  return it == task.hyperparameters().end() ? fallback : it->second;
}

}  // namespace

absl::StatusOr<TaskSpec> TaskSpecFromTask(const v1::Task& task) {
  TaskSpec spec;
  TrainingConfig& tc = spec.training;
  SEEDLING_ASSIGN_OR_RETURN(tc.method, optim::ParseMethod(task.method()));
  tc.steps = static_cast<int64_t>(Hyperparameter(task, "steps", 20));
  tc.lr = Hyperparameter(task, "lr", 0);
  tc.epsilon = Hyperparameter(task, "epsilon", 0);
  tc.seed = task.seed();
  // The server's `perturbations` is fwdgrad's K; federated mezo / kseed probe one seed per step.
  tc.perturbations =
      tc.method == optim::Method::kFwdGrad ? static_cast<int64_t>(Hyperparameter(task, "perturbations", 8)) : 1;
  tc.kseed_pool_size = task.kseed_pool_size();
  tc.kseed_pool_seed = task.kseed_pool_seed();
  tc.fwdgrad_apply_locally = Hyperparameter(task, "apply_locally", 1) != 0;
  spec.seq_len = static_cast<int64_t>(Hyperparameter(task, "seq_len", 256));
  spec.batch = static_cast<int64_t>(Hyperparameter(task, "batch", 1));
  PseudoLabelOptions& pseudo = spec.pseudo_label;
  pseudo.choices.assign(task.pseudo_label_choices().begin(), task.pseudo_label_choices().end());
  pseudo.share = Hyperparameter(task, "pseudo_label_share", 0);
  pseudo.threshold = Hyperparameter(task, "pseudo_label_threshold", 0);
  if (!(pseudo.share >= 0 && pseudo.share <= 1)) {
    return absl::InvalidArgumentError(StrCat("pseudo_label_share must be in [0, 1], got ", pseudo.share));
  }
  if (!(pseudo.threshold >= 0 && pseudo.threshold < 1)) {
    return absl::InvalidArgumentError(StrCat("pseudo_label_threshold must be in [0, 1), got ", pseudo.threshold));
  }
  const std::vector<std::string> targets(task.lora().targets().begin(), task.lora().targets().end());
  // Indices are checked against the model by LoraConfig::Validate (no layer beyond it, none twice).
  std::vector<int64_t> layers(task.lora().layers().begin(), task.lora().layers().end());
  SEEDLING_ASSIGN_OR_RETURN(const lora::AdapterKind kind,
                            lora::ParseAdapterKind(task.lora().kind().empty() ? "lora" : task.lora().kind()));
  SEEDLING_ASSIGN_OR_RETURN(spec.lora, lora::MakeLoraConfig(task.lora().rank(), task.lora().alpha(), targets,
                                                            task.lora().init_seed(), std::move(layers), kind));
  return spec;
}

absl::StatusOr<PlanRequest> PlanRequestFor(const TaskSpec& spec, const std::string& model_dir,
                                           const model::ModelConfig& model, model::WeightPrecision weights) {
  PlanRequest request;
  request.model = model;
  request.method = spec.training.method;
  request.lora = spec.lora;
  request.full_parameters = spec.training.full_parameters;
  request.seq_len = spec.seq_len;
  request.batch = spec.batch;
  request.perturbations = PerturbationsPerStep(spec.training);
  // The weights as this job will hold them, whether or not a model is loaded yet: the budget is for the
  // whole process.
  SEEDLING_ASSIGN_OR_RETURN(request.weight_bytes, model::ResidentWeightBytes(model_dir, model, weights));
  request.weights_decoded_per_tile = weights != model::WeightPrecision::kFloat32;
  SEEDLING_ASSIGN_OR_RETURN(request.streamed_weight_bytes,
                            model::StreamedWeightBytes(model_dir, model, weights, request.weight_bytes));
  return request;
}

LocalDataOptions DataOptionsFor(const TaskSpec& spec, const model::ModelConfig& model) {
  LocalDataOptions options;
  options.seq_len = spec.seq_len;
  options.batch_size = spec.batch;
  options.seed = spec.training.seed;
  if (!model.eos_token_ids.empty()) options.eos_id = static_cast<int32_t>(model.eos_token_ids[0]);
  return options;
}

}  // namespace seedling::client
