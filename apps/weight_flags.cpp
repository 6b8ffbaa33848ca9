#include "apps/weight_flags.h"

#include "base/strings.h"
#include "model/gguf_model.h"

namespace seedling::apps {

void AddWeightFlags(CLI::App* cmd, WeightFlags& flags) {
  cmd->add_option("--weights", flags.weights,
                  "Frozen weights in memory: fp32, stored (as in the file), q8_0 or q4_0 (GGUF blocks, "
                  "quantized once into a cache file). Default: fp32, or stored for a GGUF model");
  cmd->add_option("--cache-dir", flags.cache_dir,
                  "Where q8_0/q4_0 weight caches live (default: <model>/.seedling-cache)");
}

absl::StatusOr<model::LoadOptions> LoadOptionsFromFlags(WeightFlags& flags, const std::string& model_path) {
  model::LoadOptions options;
  const std::string name = flags.weights.empty() ? (model::IsGgufPath(model_path) ? "stored" : "fp32") : flags.weights;
  absl::StatusOr<model::WeightPrecision> precision = model::ParseWeightPrecision(name);
  if (!precision.ok()) return absl::InvalidArgumentError(StrCat("--", precision.status().message()));
  options.precision = *precision;
  options.cache_dir = flags.cache_dir;
  options.cache_progress = [&flags, name](int64_t done, int64_t total) {
    if (!flags.progress) flags.progress = std::make_shared<Progress>(StrCat("quantizing weights to ", name), total);
    flags.progress->Update(done);
    if (done == total) flags.progress->Finish();
  };
  return options;
}

}  // namespace seedling::apps
