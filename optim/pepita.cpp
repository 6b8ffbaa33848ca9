#include "optim/pepita.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "base/check.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"

namespace seedling::optim {
namespace {

using Variant = PepitaOptions::Variant;

// Bytes of one chunk's logits when error_chunk_tokens is 0, and of one generated block of F.
constexpr int64_t kLogitChunkBytes = int64_t{16} << 20;
constexpr int64_t kFeedbackBlockBytes = int64_t{1} << 20;

// PEPITA's bound for F's entries: scale · sqrt(6 / d_in), d_in the modulated input's width.
double FeedbackBound(const model::ModelConfig& config, double scale) {
  return scale * std::sqrt(6.0 / static_cast<double>(config.hidden_size));
}

// Columns [first, first + count) of F, transposed: (count, H), row v = column first + v of F.
at::Tensor FeedbackColumns(const model::ModelConfig& config, uint64_t seed, double scale, int64_t first,
                           int64_t count) {
  const int64_t h = config.hidden_size;
  at::Tensor block = at::empty({count, h}, at::kFloat);
  std::span<float> values(block.data_ptr<float>(), static_cast<size_t>(block.numel()));
  FillUniform({seed, rng_stream::kFeedback}, static_cast<uint64_t>(first * h), values);
  const float bound = static_cast<float>(FeedbackBound(config, scale));
  for (float& v : values) v = (2.0f * v - 1.0f) * bound;
  return block;
}

// e (rows, V) -> F e (rows, H), F generated a block of columns at a time.
at::Tensor TimesFeedback(const model::ModelConfig& config, const at::Tensor& error, uint64_t seed, double scale) {
  const int64_t vocab = config.vocab_size, h = config.hidden_size;
  const int64_t block = std::max<int64_t>(1, kFeedbackBlockBytes / (4 * h));
  at::Tensor out = at::zeros({error.size(0), h}, at::kFloat);
  for (int64_t first = 0; first < vocab; first += block) {
    const int64_t count = std::min(block, vocab - first);
    out.addmm_(error.narrow(1, first, count), FeedbackColumns(config, seed, scale, first, count));
  }
  return out;
}

// Pass 1's products: the input modulation F e at every position, and the clean loss.
struct ErrorPass {
  at::Tensor offset;  // (B, T, H)
  double loss_sum = 0;
  int64_t tokens = 0;
};

// From the clean final hidden states (B, T, H): e_t = softmax(logits_t) − onehot(labels_{t+1}) on the scored
// positions, zero elsewhere, and its image F e_t, chunk by chunk of scored rows.
ErrorPass ModulationFromHidden(const model::LlamaModel& model, const at::Tensor& hidden, const at::Tensor& labels,
                               const PepitaOptions& options) {
  const model::ModelConfig& config = model.config();
  const int64_t b = hidden.size(0), t = hidden.size(1), h = hidden.size(2);
  ErrorPass pass;
  at::Tensor offset = at::zeros({b * t, h}, at::kFloat);
  // Position t predicts labels[t + 1]; the last position predicts nothing.
  at::Tensor targets = at::full({b, t}, model::kIgnoreIndex, at::kLong);
  if (t > 1) targets.narrow(1, 0, t - 1).copy_(labels.narrow(1, 1, t - 1));
  targets = targets.reshape({-1});
  const at::Tensor rows = targets.ne(model::kIgnoreIndex).nonzero().reshape({-1});  // scored rows
  pass.tokens = rows.numel();
  const at::Tensor flat_hidden = hidden.reshape({-1, h});
  const int64_t chunk = options.error_chunk_tokens > 0
                            ? options.error_chunk_tokens
                            : std::max<int64_t>(1, kLogitChunkBytes / (4 * config.vocab_size));
  for (int64_t start = 0; start < pass.tokens; start += chunk) {
    const at::Tensor index = rows.narrow(0, start, std::min(chunk, pass.tokens - start));
    const at::Tensor target = targets.index_select(0, index).unsqueeze(1);                               // (c, 1)
    const at::Tensor log_probs = at::log_softmax(model.LmHead(flat_hidden.index_select(0, index)), -1);  // (c, V)
    pass.loss_sum -= log_probs.gather(1, target).sum().item<double>();
    at::Tensor error = log_probs.exp_();  // PEPITA's e = softmax − onehot(target)
    error.scatter_add_(1, target, at::full({target.size(0), 1}, -1.0f, error.options()));
    offset.index_copy_(0, index, TimesFeedback(config, error, options.feedback_seed, options.feedback_scale));
  }
  pass.offset = offset.view({b, t, h});
  return pass;
}

// Wraps the adapter during PEPITA's passes: computes exactly what the adapter computes, and at every adapted
// projection either records the clean output (pass 1 of kStored), or adds the projection's share of the update
// from δ = y_clean − y_err and x_err (pass 2 of kStored, or the paired pass 2+3 of kMem, whose batch is the
// clean rows followed by the modulated rows).
class PassRecorder : public model::ProjectionAdapter {
 public:
  enum class Mode { kRecordClean, kModulated, kPaired };

  // `adapter`, `clean` and `delta` must outlive the recorder; `delta` is flat()'s layout.
  PassRecorder(const lora::LoraAdapter& adapter, Mode mode, std::vector<at::Tensor>* clean, at::Tensor* delta)
      : adapter_(adapter), mode_(mode), clean_(clean), delta_(delta) {
    index_.assign(static_cast<size_t>(adapter.model().num_hidden_layers * model::kNumProjections), -1);
    const std::vector<lora::LoraView>& views = adapter.views();
    for (size_t i = 0; i < views.size(); ++i) {
      if (views[i].is_a) index_[Key(views[i].layer, views[i].projection)] = static_cast<int32_t>(i);
    }
  }

  at::Tensor Apply(int64_t layer, model::Projection p, const at::Tensor& x, const at::Tensor& base_out) const override {
    at::Tensor y = adapter_.Apply(layer, p, x, base_out);
    const int32_t a = index_[Key(layer, p)];
    if (a < 0) return y;
    switch (mode_) {
      case Mode::kRecordClean:
        clean_->push_back(y.clone());
        break;
      case Mode::kModulated: {
        SEEDLING_CHECK(next_ < clean_->size(), "the modulated pass reached more projections than the clean one");
        const at::Tensor& clean = (*clean_)[next_++];
        SEEDLING_CHECK(clean.sizes() == y.sizes(), "clean and modulated outputs differ in shape");
        Accumulate(static_cast<size_t>(a), clean - y, x);
        break;
      }
      case Mode::kPaired: {
        const int64_t half = y.size(0) / 2;
        Accumulate(static_cast<size_t>(a), y.narrow(0, 0, half) - y.narrow(0, half, half), x.narrow(0, half, half));
        break;
      }
    }
    return y;
  }
  std::vector<at::Tensor> LayerTensors(int64_t layer) const override { return adapter_.LayerTensors(layer); }
  int64_t TangentCount() const override { return 0; }
  at::Tensor ApplyTangents(int64_t, model::Projection, const at::Tensor&, const at::Tensor&) const override {
    SEEDLING_CHECK(false, "PEPITA's passes carry no tangents");
    return {};
  }

 private:
  size_t Key(int64_t layer, model::Projection p) const {
    return static_cast<size_t>(layer * model::kNumProjections + static_cast<int>(p));
  }

  // Our LoRA adaptation of PEPITA's hidden-layer rule: G = δᵀ x_err summed over tokens, projected by the chain
  // rule onto the factors, ΔA += s Bᵀ G = s (δ B)ᵀ x_err and ΔB += s G Aᵀ = s δᵀ (x_err Aᵀ).
  void Accumulate(size_t a_index, const at::Tensor& delta_out, const at::Tensor& x_err) const {
    const lora::LoraView& va = adapter_.views()[a_index];
    const lora::LoraView& vb = adapter_.views()[a_index + 1];
    const double s = adapter_.config().scale();
    const at::Tensor a = adapter_.Matrix(va);               // (r, in)
    const at::Tensor b = adapter_.Matrix(vb);               // (out, r)
    const at::Tensor d = delta_out.reshape({-1, vb.rows});  // (N, out)
    const at::Tensor xe = x_err.reshape({-1, va.cols});     // (N, in)
    at::Tensor da = delta_->narrow(0, va.offset, va.numel()).view({va.rows, va.cols});
    at::Tensor db = delta_->narrow(0, vb.offset, vb.numel()).view({vb.rows, vb.cols});
    da.addmm_(at::mm(d, b).t(), xe, 1.0, s);      // (r, N)(N, in)
    db.addmm_(d.t(), at::mm(xe, a.t()), 1.0, s);  // (out, N)(N, r)
  }

  const lora::LoraAdapter& adapter_;
  const Mode mode_;
  std::vector<at::Tensor>* clean_;
  at::Tensor* delta_;
  std::vector<int32_t> index_;  // (layer, projection) -> index of its A view, or -1
  mutable size_t next_ = 0;     // kModulated: the next recorded clean output
};

model::ForwardOptions PassOptions(const model::ProjectionAdapter* adapter, const PepitaOptions& options) {
  model::ForwardOptions fo;
  fo.adapter = adapter;
  fo.mlp_chunk_tokens = options.mlp_chunk_tokens;
  return fo;
}

// Passes 2 (and 3) for the modulation `offset`. `clean` holds kStored's clean outputs from pass 1, or is empty
// (then a clean pass records them first).
absl::StatusOr<at::Tensor> ModulatedPasses(const model::LlamaModel& model, const lora::LoraAdapter& adapter,
                                           const at::Tensor& tokens, const at::Tensor& offset, int64_t divisor,
                                           const PepitaOptions& options, std::vector<at::Tensor> clean) {
  at::Tensor delta = at::zeros_like(adapter.flat());
  if (options.variant == Variant::kStored) {
    if (clean.empty()) {
      PassRecorder record(adapter, PassRecorder::Mode::kRecordClean, &clean, &delta);
      SEEDLING_RETURN_IF_ERROR(model.Hidden(tokens, PassOptions(&record, options)).status());
    }
    PassRecorder modulated(adapter, PassRecorder::Mode::kModulated, &clean, &delta);
    model::ForwardOptions fo = PassOptions(&modulated, options);
    fo.input_offset = offset;
    SEEDLING_RETURN_IF_ERROR(model.Hidden(tokens, fo).status());
  } else {
    // MEMPEPITA: pass 3 (clean, recomputed) and pass 2 (modulated) as one forward over [clean rows; modulated
    // rows], so each layer's clean and modulated outputs meet where they are computed and are dropped there.
    PassRecorder paired(adapter, PassRecorder::Mode::kPaired, nullptr, &delta);
    model::ForwardOptions fo = PassOptions(&paired, options);
    fo.input_offset = at::cat({at::zeros_like(offset), offset}, 0);
    SEEDLING_RETURN_IF_ERROR(model.Hidden(at::cat({tokens, tokens}, 0), fo).status());
  }
  return delta.div_(static_cast<double>(std::max<int64_t>(divisor, 1)));
}

}  // namespace

absl::StatusOr<PepitaOptions::Variant> ParsePepitaVariant(std::string_view name) {
  for (Variant v : {Variant::kStored, Variant::kMem}) {
    if (name == PepitaVariantName(v)) return v;
  }
  return absl::InvalidArgumentError(StrCat("unknown PEPITA variant '", name, "' (expected pepita or mem)"));
}

const char* PepitaVariantName(PepitaOptions::Variant variant) { return variant == Variant::kMem ? "mem" : "pepita"; }

absl::Status ValidatePepitaOptions(const PepitaOptions& options) {
  if (!(options.lr > 0 && std::isfinite(options.lr))) {
    return absl::InvalidArgumentError(StrCat("pepita lr must be > 0, got ", options.lr));
  }
  if (!(options.feedback_scale > 0 && std::isfinite(options.feedback_scale))) {
    return absl::InvalidArgumentError(StrCat("pepita feedback_scale must be > 0, got ", options.feedback_scale));
  }
  if (!(options.max_update_norm >= 0 && std::isfinite(options.max_update_norm))) {
    return absl::InvalidArgumentError(StrCat("pepita max_update_norm must be >= 0, got ", options.max_update_norm));
  }
  if (options.error_chunk_tokens < 0) {
    return absl::InvalidArgumentError(
        StrCat("pepita error_chunk_tokens must be >= 0, got ", options.error_chunk_tokens));
  }
  if (options.mlp_chunk_tokens < 0) {
    return absl::InvalidArgumentError(StrCat("pepita mlp_chunk_tokens must be >= 0, got ", options.mlp_chunk_tokens));
  }
  return absl::OkStatus();
}

at::Tensor FeedbackMatrix(const model::ModelConfig& config, uint64_t seed, double scale) {
  return FeedbackColumns(config, seed, scale, 0, config.vocab_size).t().contiguous();
}

absl::StatusOr<at::Tensor> ModulatedUpdate(const model::LlamaModel& model, const lora::LoraAdapter& adapter,
                                           const at::Tensor& tokens, const at::Tensor& offset, int64_t divisor,
                                           const PepitaOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidatePepitaOptions(options));
  at::NoGradGuard no_grad;
  return ModulatedPasses(model, adapter, tokens, offset, divisor, options, {});
}

absl::StatusOr<PepitaUpdate> ComputePepitaUpdate(const model::LlamaModel& model, const lora::LoraAdapter& adapter,
                                                 const model::Batch& batch, const PepitaOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidatePepitaOptions(options));
  if (!batch.labels.defined() || batch.labels.sizes() != batch.tokens.sizes()) {
    return absl::InvalidArgumentError("pepita needs labels with the tokens' shape");
  }
  at::NoGradGuard no_grad;
  // PEPITA Alg. 1, pass 1 (clean): the output error; kStored also keeps every adapted projection's output.
  std::vector<at::Tensor> clean;
  at::Tensor unused;
  PassRecorder record(adapter, PassRecorder::Mode::kRecordClean, &clean, &unused);
  const model::ProjectionAdapter* first =
      options.variant == Variant::kStored ? static_cast<const model::ProjectionAdapter*>(&record) : &adapter;
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor hidden, model.Hidden(batch.tokens, PassOptions(first, options)));
  SEEDLING_ASSIGN_OR_RETURN(ErrorPass error, model::CatchTorch("pepita error", [&]() -> absl::StatusOr<ErrorPass> {
                              return ModulationFromHidden(model, hidden, batch.labels, options);
                            }));
  hidden = at::Tensor();
  PepitaUpdate update;
  update.tokens = error.tokens;
  update.loss = error.tokens > 0 ? error.loss_sum / static_cast<double>(error.tokens) : 0.0;
  update.offset_norm = error.offset.norm().item<double>();
  // Pass 2 on the modulated input x + F e (and MEMPEPITA's pass 3), and the update.
  SEEDLING_ASSIGN_OR_RETURN(update.delta, ModulatedPasses(model, adapter, batch.tokens, error.offset, error.tokens,
                                                          options, std::move(clean)));
  return update;
}

absl::StatusOr<std::unique_ptr<PepitaTrainer>> PepitaTrainer::Create(const model::LlamaModel& model,
                                                                     lora::LoraAdapter& adapter,
                                                                     const PepitaOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidatePepitaOptions(options));
  if (adapter.numel() == 0) return absl::InvalidArgumentError("nothing to train: the adapter is empty");
  if (adapter.config().kind != lora::AdapterKind::kLora) {
    return absl::InvalidArgumentError(
        "pepita updates LoRA matrices from each projection's input and output; a BitFit adapter has none");
  }
  return std::unique_ptr<PepitaTrainer>(new PepitaTrainer(model, adapter, options));
}

absl::StatusOr<StepResult> PepitaTrainer::Step(const model::Batch& batch) {
  adapter_.SetTraining(false);  // no dropout: the passes may differ only by the modulation
  SEEDLING_ASSIGN_OR_RETURN(PepitaUpdate update, ComputePepitaUpdate(model_, adapter_, batch, options_));
  StepResult result;
  result.loss = update.loss;
  result.tokens = update.tokens;
  at::NoGradGuard no_grad;
  const double norm = update.delta.norm().item<double>();
  last_update_norm_ = norm;
  if (!std::isfinite(result.loss) || !std::isfinite(norm)) {
    result.skipped = true;  // the adapter is untouched
    return Count(result);
  }
  if (options_.max_update_norm > 0 && norm > options_.max_update_norm) {
    update.delta.mul_(options_.max_update_norm / norm);
  }
  // PEPITA Alg. 1, update: W ← W − η ΔW.
  adapter_.flat().add_(update.delta, -options_.lr);
  return Count(result);
}

}  // namespace seedling::optim
