#include "client/local_training.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/eval.h"
#include "model/memory_tracker.h"
#include "model/torch_status.h"
#include "optim/lora_bp.h"
#include "optim/mezo.h"
#include "optim/parameters.h"
#include "optim/pepita.h"

namespace seedling::client {
namespace {

using optim::Method;

// Held-out loss (the first training examples when nothing is held out) with the adapter, no gradients.
absl::StatusOr<double> HeldoutLoss(const model::LlamaModel& model, lora::LoraAdapter* adapter, const LocalDataset& data,
                                   const MemoryPlan& plan) {
  std::vector<model::Example> examples;
  std::span<const LocalExample> source = data.heldout().empty() ? data.train() : data.heldout();
  for (size_t i = 0; i < source.size() && (!data.heldout().empty() || i < 32); ++i) {
    examples.push_back(source[i].example);
  }
  model::EvalOptions eo;
  eo.batch_size = std::max<int64_t>(1, plan.micro_batch);
  eo.forward.adapter = adapter;
  eo.forward.ce_chunk_tokens = plan.ce_chunk_tokens;
  eo.forward.mlp_chunk_tokens = plan.mlp_chunk_tokens;
  SEEDLING_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(model, examples, eo));
  return r.loss;
}

// Benchmarks: plain forwards (the loss, no gradients) on training batches, one untimed, then for at least
// `seconds`: the inference reference in the shapes the steps use.
absl::Status TimeForwards(const model::LlamaModel& model, lora::LoraAdapter* adapter, BatchIterator& batches,
                          const MemoryPlan& plan, double seconds, TrainingResult& result) {
  model::ForwardOptions fo;
  fo.adapter = adapter;
  fo.ce_chunk_tokens = plan.ce_chunk_tokens;
  fo.mlp_chunk_tokens = plan.mlp_chunk_tokens;
  SEEDLING_RETURN_IF_ERROR(optim::ProbeLoss(model, batches.Next().batch, fo).status());  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  for (int64_t n = 0; elapsed < seconds && n < 100000; ++n) {
    const LocalBatch batch = batches.Next();
    SEEDLING_RETURN_IF_ERROR(optim::ProbeLoss(model, batch.batch, fo).status());
    result.forward_processed_tokens += batch.tokens;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  result.forward_seconds = elapsed;
  return absl::OkStatus();
}

}  // namespace

double DefaultLearningRate(Method method, bool full_parameters) {
  switch (method) {
    case Method::kLoraBp:
      return 2e-4;
    case Method::kFwdGrad:
      return 1e-2;
    case Method::kMezo:
      return full_parameters ? 1e-6 : 1e-4;
    case Method::kKSeed:
      return full_parameters ? 3e-7 : 1e-4;
    case Method::kPepita:
      return 0.1;
  }
  return 1e-4;
}

int64_t PerturbationsPerStep(const TrainingConfig& config) {
  if (config.perturbations > 0) return config.perturbations;
  return config.method == Method::kFwdGrad ? 8 : 1;
}

double DefaultEpsilon(Method method, bool full_parameters) {
  switch (method) {
    case Method::kMezo:
      return full_parameters ? 1e-3 : 1e-2;
    case Method::kKSeed:
      return full_parameters ? 5e-4 : 1e-2;
    default:
      return 1e-2;
  }
}

namespace {

// One training step of every method on `model` (a micro model) with `adapter`.
void WarmUpMethods(const model::LlamaModel& model, lora::LoraAdapter& adapter) {
  const at::Tensor tokens = at::arange(0, 16, at::kLong).view({2, 8});
  const model::Batch batch{tokens, tokens.clone()};
  for (bool recompute : {false, true}) {
    optim::LoraBpOptions o;
    o.recompute = recompute;
    if (auto t = optim::LoraBpTrainer::Create(model, adapter, o); t.ok()) (void)(*t)->Step(batch);
  }
  optim::FwdGradOptions f;
  f.perturbations = 1;
  if (auto t = optim::FwdGradTrainer::Create(model, adapter, f); t.ok()) (void)(*t)->Step(batch);
  if (auto t = optim::MezoTrainer::Create(model, &adapter, optim::ParameterSet::Adapter(adapter), {}); t.ok()) {
    (void)(*t)->Step(batch);
  }
  if (auto t = optim::PepitaTrainer::Create(model, adapter, {}); t.ok()) (void)(*t)->Step(batch);
}

}  // namespace

int64_t MeasureRuntimeBytes() {
  {
    // OpenBLAS allocates and touches its per-thread buffers, and a multiply this large runs the threaded
    // driver and the large-matrix kernels that real steps use (small ones take other code paths).
    at::NoGradGuard no_grad;
    const at::Tensor a = at::ones({1024, 1024});
    (void)at::mm(a, a);
  }
  model::ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = 64;
  c.hidden_size = 32;  // a multiple of 32, so the block formats' decoders run too
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 8;
  lora::LoraConfig lc;
  lc.rank = 2;
  lc.targets = {model::Projection::kQ, model::Projection::kV, model::Projection::kDown};
  for (model::WeightFormat format :
       {model::WeightFormat::kF32, model::WeightFormat::kQ8_0, model::WeightFormat::kQ4_0}) {
    model::ModelWeights weights = model::RandomWeights(c, 0);
    if (format != model::WeightFormat::kF32 && !model::QuantizeMatrices(weights, c, format).ok()) continue;
    auto model = model::LlamaModel::Create(c, std::move(weights));
    auto adapter = lora::LoraAdapter::Create(c, lc);
    if (model.ok() && adapter.ok()) WarmUpMethods(**model, **adapter);
  }
  return CurrentRssBytes();
}

namespace {

// The arguments RunTraining refuses before it touches anything.
absl::Status CheckTrainingArgs(const lora::LoraAdapter* adapter, const TrainingConfig& config, const MemoryPlan& plan,
                               const TrainingControl& control) {
  if (config.steps < 0) return absl::InvalidArgumentError("steps must be >= 0");
  if (config.untimed_steps < 0 || config.untimed_steps > config.steps) {
    return absl::InvalidArgumentError(StrCat("untimed_steps must be in [0, steps], got ", config.untimed_steps));
  }
  if (!(config.min_seconds >= 0 && config.min_seconds <= 3600)) {
    return absl::InvalidArgumentError(StrCat("min_seconds must be in [0, 3600], got ", config.min_seconds));
  }
  if (!(config.forward_seconds >= 0 && config.forward_seconds <= 3600)) {
    return absl::InvalidArgumentError(StrCat("forward_seconds must be in [0, 3600], got ", config.forward_seconds));
  }
  if (!config.full_parameters && adapter == nullptr) {
    return absl::InvalidArgumentError("training an adapter needs one (or full_parameters)");
  }
  if (config.full_parameters &&
      (config.method == Method::kLoraBp || config.method == Method::kFwdGrad || config.method == Method::kPepita)) {
    return absl::InvalidArgumentError(
        StrCat(optim::MethodName(config.method), " trains a LoRA adapter, not full parameters"));
  }
  if (plan.method != config.method) return absl::InvalidArgumentError("the memory plan is for another method");
  if (config.perturbations < 0 || config.perturbations > kMaxPlanPerturbations) {
    return absl::InvalidArgumentError(
        StrCat("perturbations must be in [0, ", kMaxPlanPerturbations, "], got ", config.perturbations));
  }
  if (config.full_parameters && (control.resume != nullptr || control.checkpoint_every > 0)) {
    return absl::InvalidArgumentError("checkpoints and resume are for adapter runs");
  }
  return absl::OkStatus();
}

// The method's trainer, with typed views of the two whose results carry more than the parameters.
struct MethodTrainer {
  std::unique_ptr<optim::LocalTrainer> trainer;
  optim::FwdGradTrainer* fwdgrad = nullptr;
  optim::KSeedTrainer* kseed = nullptr;
};

absl::StatusOr<MethodTrainer> MakeTrainer(const model::LlamaModel& model, lora::LoraAdapter* adapter,
                                          const optim::ParameterSet& params, const TrainingConfig& config,
                                          const MemoryPlan& plan) {
  const double lr = config.lr > 0 ? config.lr : DefaultLearningRate(config.method, config.full_parameters);
  const double eps = config.epsilon > 0 ? config.epsilon : DefaultEpsilon(config.method, config.full_parameters);
  lora::LoraAdapter* forward_adapter = config.full_parameters ? nullptr : adapter;
  MethodTrainer made;
  switch (config.method) {
    case Method::kLoraBp: {
      optim::LoraBpOptions o;
      o.lr = lr;
      o.max_grad_norm = config.max_grad_norm;
      o.micro_batch = plan.micro_batch;
      o.recompute = plan.recompute;
      o.stored_layers = plan.stored_layers;
      o.ce_chunk_tokens = plan.ce_chunk_tokens;
      o.seed = config.seed;
      SEEDLING_ASSIGN_OR_RETURN(made.trainer, optim::LoraBpTrainer::Create(model, *adapter, o));
      break;
    }
    case Method::kFwdGrad: {
      optim::FwdGradOptions o;
      o.mode = plan.variant == "central-difference" ? optim::FwdGradOptions::Mode::kCentralDifference
                                                    : optim::FwdGradOptions::Mode::kBatchedJvp;
      o.tangents_per_pass = plan.tangents_per_pass;
      o.mlp_chunk_tokens = plan.mlp_chunk_tokens;
      o.perturbations = PerturbationsPerStep(config);
      o.lr = lr;
      o.fd_epsilon = eps;
      o.ce_chunk_tokens = plan.ce_chunk_tokens;
      o.seed = config.seed;
      o.apply_locally = config.fwdgrad_apply_locally;
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<optim::FwdGradTrainer> t,
                                optim::FwdGradTrainer::Create(model, *adapter, o));
      made.fwdgrad = t.get();
      made.trainer = std::move(t);
      break;
    }
    case Method::kMezo: {
      optim::MezoOptions o;
      o.lr = lr;
      o.epsilon = eps;
      o.exact_restore = plan.variant == "exact-restore";
      o.perturbations = PerturbationsPerStep(config);
      o.batched = plan.variant == "batched";
      o.ce_chunk_tokens = plan.ce_chunk_tokens;
      o.mlp_chunk_tokens = plan.mlp_chunk_tokens;
      o.seed = config.seed;
      SEEDLING_ASSIGN_OR_RETURN(made.trainer, optim::MezoTrainer::Create(model, forward_adapter, params, o));
      break;
    }
    case Method::kKSeed: {
      optim::KSeedOptions o;
      o.pool_size = config.kseed_pool_size;
      o.pool_seed = config.kseed_pool_seed;
      o.lr = lr;
      o.epsilon = eps;
      o.exact_restore = plan.variant == "exact-restore";
      o.perturbations = PerturbationsPerStep(config);
      o.batched = plan.variant == "batched";
      o.ce_chunk_tokens = plan.ce_chunk_tokens;
      o.mlp_chunk_tokens = plan.mlp_chunk_tokens;
      o.seed = config.seed;
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<optim::KSeedTrainer> t,
                                optim::KSeedTrainer::Create(model, forward_adapter, params, o));
      made.kseed = t.get();
      made.trainer = std::move(t);
      break;
    }
    case Method::kPepita: {
      optim::PepitaOptions o;
      SEEDLING_ASSIGN_OR_RETURN(o.variant, optim::ParsePepitaVariant(plan.variant.empty() ? "pepita" : plan.variant));
      o.lr = lr;
      o.feedback_seed = config.pepita_feedback_seed;
      o.feedback_scale = config.pepita_feedback_scale;
      o.max_update_norm = config.max_grad_norm;
      o.error_chunk_tokens = plan.ce_chunk_tokens;
      o.mlp_chunk_tokens = plan.mlp_chunk_tokens;
      SEEDLING_ASSIGN_OR_RETURN(made.trainer, optim::PepitaTrainer::Create(model, *adapter, o));
      break;
    }
  }
  return made;
}

// Puts a cancelled run's state back: the adapter's values, the data position, the trainer's state and the
// counts so far.
absl::Status RestoreCheckpoint(const TrainingCheckpoint& cp, lora::LoraAdapter& adapter, BatchIterator& batches,
                               optim::LocalTrainer& trainer, TrainingResult& result, double* seconds_before) {
  if (static_cast<int64_t>(cp.params.size()) != adapter.numel()) {
    return absl::InvalidArgumentError(
        StrCat("the checkpoint holds ", cp.params.size(), " parameters; the adapter has ", adapter.numel()));
  }
  SEEDLING_RETURN_IF_ERROR(batches.Restore(cp.data));
  SEEDLING_RETURN_IF_ERROR(trainer.RestoreState(cp.trainer));
  std::memcpy(adapter.flat().data_ptr<float>(), cp.params.data(), cp.params.size() * sizeof(float));
  result.loss_start = cp.loss_start;
  result.scored_tokens = cp.scored_tokens;
  result.processed_tokens = cp.processed_tokens;
  *seconds_before = cp.seconds;
  return absl::OkStatus();
}

// What the run hands back beyond the parameters: kseed's (seed, scalar) pairs, fwdgrad's estimates.
void CollectMethodOutputs(const MethodTrainer& t, TrainingResult& result) {
  result.steps = t.trainer->steps();
  result.skipped_steps = t.trainer->skipped_steps();
  if (t.kseed != nullptr) result.kseed_pairs = t.kseed->pairs();
  if (t.fwdgrad != nullptr) {
    result.fwdgrad_last = t.fwdgrad->last_gradient();
    const at::Tensor& sum = t.fwdgrad->accumulated_estimate();
    result.fwdgrad_sum.assign(sum.data_ptr<float>(), sum.data_ptr<float>() + sum.numel());
    result.fwdgrad_pairs = t.fwdgrad->all_pairs();
  }
}

// RunLocalTraining and RunAdapterTraining: the model is written only with full_parameters (through the
// tensors ParameterSet::AllWeights shares with it), which only RunLocalTraining's mutable model allows.
absl::StatusOr<TrainingResult> RunTraining(const model::LlamaModel& model, lora::LoraAdapter* adapter,
                                           const LocalDataset& data, const TrainingConfig& config,
                                           const MemoryPlan& plan, const TrainingProgress& progress,
                                           const TrainingControl& control) {
  SEEDLING_RETURN_IF_ERROR(CheckTrainingArgs(adapter, config, plan, control));
  if (data.train().empty()) {
    return absl::InvalidArgumentError(
        StrCat("no training example: all ", data.unlabelled().size(), " usable rows are unlabelled"));
  }
  lora::LoraAdapter* forward_adapter = config.full_parameters ? nullptr : adapter;
  // The plan holds the layers' weights to a page per tile when it streams them (model::WeightPages).
  model.set_stream_weights(plan.stream_weights);

  // The trained parameters: the adapter's flat buffer or every weight.
  optim::ParameterSet params;
  if (config.full_parameters) {
    SEEDLING_ASSIGN_OR_RETURN(params, optim::ParameterSet::AllWeights(model.weights(), model.config()));
  } else {
    params = optim::ParameterSet::Adapter(*adapter);
  }
  SEEDLING_ASSIGN_OR_RETURN(MethodTrainer made, MakeTrainer(model, adapter, params, config, plan));
  optim::LocalTrainer& trainer = *made.trainer;

  TrainingResult result;
  BatchIterator batches(data);
  double seconds_before = 0;  // time spent before a resume
  if (control.resume != nullptr) {
    SEEDLING_RETURN_IF_ERROR(RestoreCheckpoint(*control.resume, *adapter, batches, trainer, result, &seconds_before));
  } else {
    SEEDLING_ASSIGN_OR_RETURN(result.loss_start, HeldoutLoss(model, forward_adapter, data, plan));
  }
  auto checkpoint = [&](double seconds) -> absl::Status {
    if (!control.on_checkpoint) return absl::OkStatus();
    TrainingCheckpoint cp;
    cp.trainer = trainer.SaveState();
    const float* p = adapter->flat().data_ptr<float>();
    cp.params.assign(p, p + adapter->numel());
    cp.data = batches.position();
    cp.loss_start = result.loss_start;
    cp.scored_tokens = result.scored_tokens;
    cp.processed_tokens = result.processed_tokens;
    cp.seconds = seconds;
    return control.on_checkpoint(cp);
  };
  auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  model::TensorMemoryTracker tracker;
  // Past `steps` only while a benchmark's timed steps are shorter than min_seconds (bounded all the same).
  auto more = [&](int64_t step) {
    return step < config.steps || (config.min_seconds > 0 && step > config.untimed_steps &&
                                   elapsed() < config.min_seconds && step < 1000 * std::max<int64_t>(config.steps, 1));
  };
  for (int64_t step = trainer.steps(); more(step); ++step) {
    if (step == config.untimed_steps && step > 0) {  // warm-up done: time from here
      t0 = std::chrono::steady_clock::now();
      seconds_before = 0;
      result.scored_tokens = 0;
      result.processed_tokens = 0;
    }
    if (control.cancelled && control.cancelled()) {
      SEEDLING_RETURN_IF_ERROR(checkpoint(elapsed()));
      return absl::CancelledError(StrCat("cancelled after ", step, " of ", config.steps, " steps"));
    }
    // Packed blocks can, rarely, hold no scored token; such batches teach nothing and are passed over.
    LocalBatch batch = batches.Next();
    for (int tries = 0; batch.scored_tokens == 0 && tries < 64; ++tries) batch = batches.Next();
    SEEDLING_ASSIGN_OR_RETURN(optim::StepResult r, trainer.Step(batch.batch));
    result.scored_tokens += r.tokens;
    result.processed_tokens += batch.tokens;
    if (progress) progress(step + 1, std::max(config.steps, step + 1), r.loss);
    if (control.checkpoint_every > 0 && (step + 1) % control.checkpoint_every == 0 && step + 1 < config.steps) {
      SEEDLING_RETURN_IF_ERROR(checkpoint(elapsed()));
    }
  }
  result.seconds = elapsed();
  result.step_tensor_peak_bytes = tracker.peak_bytes();
  CollectMethodOutputs(made, result);
  SEEDLING_ASSIGN_OR_RETURN(result.loss_end, HeldoutLoss(model, forward_adapter, data, plan));
  if (config.forward_seconds > 0) {
    SEEDLING_RETURN_IF_ERROR(TimeForwards(model, forward_adapter, batches, plan, config.forward_seconds, result));
  }
  return result;
}

}  // namespace

absl::StatusOr<TrainingResult> RunLocalTraining(model::LlamaModel& model, lora::LoraAdapter* adapter,
                                                const LocalDataset& data, const TrainingConfig& config,
                                                const MemoryPlan& plan, const TrainingProgress& progress,
                                                const TrainingControl& control) {
  return RunTraining(model, adapter, data, config, plan, progress, control);
}

absl::StatusOr<TrainingResult> RunAdapterTraining(const model::LlamaModel& model, lora::LoraAdapter& adapter,
                                                  const LocalDataset& data, const TrainingConfig& config,
                                                  const MemoryPlan& plan, const TrainingProgress& progress,
                                                  const TrainingControl& control) {
  if (config.full_parameters) {
    return absl::InvalidArgumentError("full-parameter training writes the model: use RunLocalTraining");
  }
  return RunTraining(model, &adapter, data, config, plan, progress, control);
}

}  // namespace seedling::client
