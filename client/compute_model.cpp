#include "client/compute_model.h"

#include <algorithm>

#include "base/check.h"

namespace seedling::client {

bool IsKnownTrainingMethod(std::string_view method) {
  return method == "lora-bp" || method == "fwdgrad" || method == "mezo" || method == "kseed" || method == "pepita" ||
         method == "mempepita";
}

namespace {

// The per-token FLOPs of one forward in the three parts compute_model.h names.
struct ForwardParts {
  double projections = 0;  // P
  double attention = 0;    // A
  double head = 0;         // H
};

ForwardParts PartsOf(const model::ModelConfig& config, int64_t seq_len) {
  const double hidden = static_cast<double>(config.hidden_size);
  const double head_dim = config.head_dim > 0
                              ? static_cast<double>(config.head_dim)
                              : hidden / static_cast<double>(std::max<int64_t>(1, config.num_attention_heads));
  const double q_dim = static_cast<double>(config.num_attention_heads) * head_dim;
  const double layers = static_cast<double>(config.num_hidden_layers);
  // Per layer: the attention and MLP projections (q, k, v, o; gate, up, down, or their fused and plain forms).
  const double matmul_params = static_cast<double>(model::LayerMatrixParameters(config));
  ForwardParts parts;
  parts.projections = 2.0 * layers * matmul_params;
  parts.attention = 4.0 * static_cast<double>(seq_len) * q_dim * layers;
  const double embedding = static_cast<double>(config.embedding_dim());
  parts.head = 2.0 * embedding * static_cast<double>(config.vocab_size);
  // project_out before the LM head (and project_in after the embedding) when the embeddings are narrower.
  if (config.projects_embeddings()) parts.head += 4.0 * embedding * hidden;
  return parts;
}

}  // namespace

double LocalTrainingFlops(const model::ModelConfig& config, std::string_view method, int64_t steps, int64_t batch,
                          int64_t seq_len, int64_t perturbations, int64_t first_adapted_layer) {
  SEEDLING_CHECK(IsKnownTrainingMethod(method), "unknown training method");
  const ForwardParts f = PartsOf(config, seq_len);
  const double p = static_cast<double>(std::max<int64_t>(1, perturbations));
  const double layers = static_cast<double>(std::max<int64_t>(1, config.num_hidden_layers));
  // The share of the layers at or above the lowest adapted one (compute_model.h).
  const double u =
      1.0 - static_cast<double>(std::clamp<int64_t>(first_adapted_layer, 0, config.num_hidden_layers)) / layers;
  const double body = f.projections + f.attention;
  double per_token = 0;
  if (method == "lora-bp") {
    per_token = body + 2.0 * f.head + u * (f.projections + 2.0 * f.attention);
  } else if (method == "fwdgrad") {
    per_token = body + 2.0 * f.head + u * p * (f.projections + 2.0 * f.attention);
  } else if (method == "pepita") {
    per_token = 2.0 * (body + f.head);
  } else if (method == "mempepita") {
    per_token = 3.0 * body + 2.0 * f.head;
  } else {  // mezo, kseed
    per_token = (1.0 - u + 2.0 * p * u) * body + 2.0 * p * f.head;
  }
  return static_cast<double>(steps) * static_cast<double>(batch) * static_cast<double>(seq_len) * per_token;
}

double ForwardMfu(const model::ModelConfig& config, int64_t seq_len, int64_t processed_tokens, double seconds,
                  double sgemm_gflops) {
  if (seq_len < 1 || processed_tokens <= 0 || !(seconds > 0) || !(sgemm_gflops > 0)) return 0;
  const ForwardParts f = PartsOf(config, seq_len);
  const double flops = static_cast<double>(processed_tokens) * (f.projections + f.attention + f.head);
  return flops / seconds / (sgemm_gflops * 1e9);
}

double TrainingMfu(const model::ModelConfig& config, std::string_view method, int64_t steps, int64_t batch,
                   int64_t seq_len, int64_t perturbations, int64_t processed_tokens, double seconds,
                   double sgemm_gflops, int64_t first_adapted_layer) {
  if (!IsKnownTrainingMethod(method) || steps < 1 || batch < 1 || seq_len < 1 || processed_tokens <= 0 ||
      !(seconds > 0) || !(sgemm_gflops > 0)) {
    return 0;
  }
  const double shaped_tokens = static_cast<double>(steps) * static_cast<double>(batch) * static_cast<double>(seq_len);
  const double flops = LocalTrainingFlops(config, method, steps, batch, seq_len, perturbations, first_adapted_layer) *
                       (static_cast<double>(processed_tokens) / shaped_tokens);
  return flops / seconds / (sgemm_gflops * 1e9);
}

}  // namespace seedling::client
