#include "optim/lora_bp.h"

#include <cmath>
#include <cstring>

#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"

namespace seedling::optim {

LoraBpTrainer::LoraBpTrainer(const model::LlamaModel& model, lora::LoraAdapter& adapter, const LoraBpOptions& options)
    : model_(model), adapter_(adapter), options_(options) {
  m_ = at::zeros_like(adapter.flat());
  v_ = at::zeros_like(adapter.flat());
}

absl::StatusOr<std::unique_ptr<LoraBpTrainer>> LoraBpTrainer::Create(const model::LlamaModel& model,
                                                                     lora::LoraAdapter& adapter,
                                                                     const LoraBpOptions& options) {
  if (!(options.lr > 0)) return absl::InvalidArgumentError(StrCat("lr must be > 0, got ", options.lr));
  if (!(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1)) {
    return absl::InvalidArgumentError("AdamW betas must be in [0, 1)");
  }
  if (options.max_grad_norm < 0) return absl::InvalidArgumentError("max_grad_norm must be >= 0");
  if (options.micro_batch < 0) return absl::InvalidArgumentError("micro_batch must be >= 0");
  if (options.stored_layers < 0 || options.stored_layers > model.config().num_hidden_layers) {
    return absl::InvalidArgumentError(
        StrCat("stored_layers must be in [0, ", model.config().num_hidden_layers, "], got ", options.stored_layers));
  }
  return std::unique_ptr<LoraBpTrainer>(new LoraBpTrainer(model, adapter, options));
}

namespace {

std::vector<float> ToVector(const at::Tensor& t) {
  const at::Tensor c = t.detach().contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

absl::Status FromVector(const std::map<std::string, std::vector<float>>& buffers, const char* name, at::Tensor& out) {
  auto it = buffers.find(name);
  if (it == buffers.end() || static_cast<int64_t>(it->second.size()) != out.numel()) {
    return absl::InvalidArgumentError(StrCat("trainer state lacks buffer '", name, "' of ", out.numel(), " values"));
  }
  std::memcpy(out.data_ptr<float>(), it->second.data(), it->second.size() * sizeof(float));
  return absl::OkStatus();
}

}  // namespace

TrainerState LoraBpTrainer::SaveState() const {
  TrainerState s = LocalTrainer::SaveState();
  s.counter = t_;
  s.buffers["m"] = ToVector(m_);
  s.buffers["v"] = ToVector(v_);
  return s;
}

absl::Status LoraBpTrainer::RestoreState(const TrainerState& state) {
  if (state.counter < 0) return absl::InvalidArgumentError("negative AdamW step count");
  at::Tensor m = at::empty_like(m_), v = at::empty_like(v_);
  SEEDLING_RETURN_IF_ERROR(FromVector(state.buffers, "m", m));
  SEEDLING_RETURN_IF_ERROR(FromVector(state.buffers, "v", v));
  SEEDLING_RETURN_IF_ERROR(LocalTrainer::RestoreState(state));
  m_ = m;
  v_ = v;
  t_ = state.counter;
  return absl::OkStatus();
}

absl::StatusOr<StepResult> LoraBpTrainer::Step(const model::Batch& batch) {
  adapter_.BeginGradients();
  adapter_.SetTraining(true);
  adapter_.SetStep(options_.seed, static_cast<uint64_t>(steps()));
  model::ForwardOptions fo;
  fo.adapter = &adapter_;
  fo.recompute = options_.recompute;
  fo.stored_layers = options_.stored_layers;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;

  const int64_t rows = batch.tokens.size(0);
  const int64_t micro = options_.micro_batch > 0 ? std::min(options_.micro_batch, rows) : rows;
  // Token-weighted mean over the whole batch: each micro-batch's summed loss is divided by the batch's
  // scored-token count, so accumulation gives exactly the full-batch gradient.
  const int64_t total_tokens =
      batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(model::kIgnoreIndex).sum().item<int64_t>();
  StepResult result;
  result.tokens = total_tokens;
  double loss_sum = 0;
  auto fail = [&](absl::Status status) {  // a failed step leaves the adapter as it was
    adapter_.SetTraining(false);
    adapter_.EndGradients();
    return status;
  };
  for (int64_t start = 0; start < rows; start += micro) {
    const int64_t len = std::min(micro, rows - start);
    const at::Tensor tokens = batch.tokens.narrow(0, start, len);
    const at::Tensor labels = batch.labels.narrow(0, start, len);
    absl::StatusOr<model::LossOutput> loss = model_.Loss(tokens, labels, fo);
    if (!loss.ok()) return fail(loss.status());
    if (loss->tokens == 0) continue;
    absl::Status st = model::CatchTorch("backward", [&]() -> absl::Status {
      loss_sum += loss->sum.item<double>();
      (loss->sum / static_cast<double>(std::max<int64_t>(total_tokens, 1))).backward();
      return absl::OkStatus();
    });
    if (!st.ok()) return fail(st);
  }
  adapter_.SetTraining(false);
  result.loss = total_tokens > 0 ? loss_sum / static_cast<double>(total_tokens) : 0.0;
  at::Tensor grad = adapter_.TakeGradients();
  at::Tensor& flat = adapter_.flat();

  at::NoGradGuard no_grad;
  const double norm = grad.norm().item<double>();
  last_grad_norm_ = norm;
  if (!std::isfinite(result.loss) || !std::isfinite(norm)) {
    result.skipped = true;  // parameters and optimizer state untouched
    return Count(result);
  }
  if (options_.max_grad_norm > 0 && norm > options_.max_grad_norm) grad.mul_(options_.max_grad_norm / (norm + 1e-6));

  // AdamW (decoupled weight decay), bias-corrected.
  ++t_;
  m_.mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
  v_.mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t_));
  if (options_.weight_decay > 0) flat.mul_(1.0 - options_.lr * options_.weight_decay);
  const at::Tensor denom = (v_ / bc2).sqrt_().add_(options_.eps);
  flat.addcdiv_(m_, denom, -options_.lr / bc1);
  return Count(result);
}

}  // namespace seedling::optim
