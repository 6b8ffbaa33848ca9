#pragma once

// `--weights` and `--cache-dir`, shared by finetune, eval, generate and bench.

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "base/progress.h"
#include "model/weights.h"

namespace seedling::apps {

struct WeightFlags {
  std::string weights;                 // fp32 | stored | q8_0 | q4_0; empty = fp32 for safetensors, stored for GGUF
  std::string cache_dir;               // weight cache directory for q8_0 / q4_0; empty = <model>/.seedling-cache
  std::shared_ptr<Progress> progress;  // the cache build's progress line, once it starts
};

// Adds --weights and --cache-dir to `cmd`; `flags` must outlive parsing.
void AddWeightFlags(CLI::App* cmd, WeightFlags& flags);

// The load options the flags ask for, for the model at `model_path`. Building a weight cache shows a
// progress line on stderr. InvalidArgument for an unknown --weights value.
absl::StatusOr<model::LoadOptions> LoadOptionsFromFlags(WeightFlags& flags, const std::string& model_path);

}  // namespace seedling::apps
