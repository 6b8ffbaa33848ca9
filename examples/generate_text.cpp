// Loads a Hugging Face model directory and continues a prompt, using only Seedling's public headers.
//
//   generate_text <model dir> "<prompt>" [max new tokens]

#include <cstdio>
#include <cstdlib>
#include <string>

#include "model/generate.h"
#include "model/llama.h"
#include "model/runtime.h"
#include "model/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <model dir> <prompt> [max new tokens]\n", argv[0]);
    return 2;
  }
  seedling::model::ConfigureCompute({});  // BLAS threads for matrix multiplies, see model/runtime.h

  auto model = seedling::model::LlamaModel::Load(argv[1]);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  auto tokenizer = seedling::model::LoadTokenizer(argv[1]);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "%s\n", std::string(tokenizer.status().message()).c_str());
    return 1;
  }

  seedling::model::GenerateOptions options;
  options.max_new_tokens = argc > 3 ? std::atoi(argv[3]) : 16;
  options.temperature = 0;  // greedy
  auto result = seedling::model::Generate(**model, **tokenizer, argv[2], options, [](std::string_view text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
  });
  if (!result.ok()) {
    std::fprintf(stderr, "%s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  std::printf("\n%zu tokens\n", result->tokens.size());
  return 0;
}
