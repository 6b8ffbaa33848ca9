// init-model, eval, generate.

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_format.h"
#include "apps/commands.h"
#include "apps/weight_flags.h"
#include "base/file.h"
#include "base/memory.h"
#include "base/progress.h"
#include "base/status.h"
#include "base/strings.h"
#include "lora/adapter.h"
#include "model/dataset.h"
#include "model/eval.h"
#include "model/generate.h"
#include "model/init.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace seedling::apps {
namespace {

absl::StatusOr<model::DType> ParseDtypeFlag(const std::string& s) {
  if (s == "f32" || s == "float32") return model::DType::kF32;
  if (s == "f16" || s == "float16") return model::DType::kF16;
  if (s == "bf16" || s == "bfloat16") return model::DType::kBF16;
  return absl::InvalidArgumentError(StrCat("--dtype must be f32, f16 or bf16, got '", s, "'"));
}

void RegisterInitModel(CLI::App& app, Action& action) {
  struct Flags {
    std::string out, dtype = "f32", corpus;
    model::InitModelOptions options;
  };
  auto flags = std::make_shared<Flags>();
  std::string presets;
  for (const std::string& p : model::PresetNames()) presets += (presets.empty() ? "" : ", ") + p;
  CLI::App* cmd = app.add_subcommand("init-model", "Write a randomly initialized model in Hugging Face format");
  cmd->add_option("--preset", flags->options.preset, "Architecture preset: " + presets)->capture_default_str();
  cmd->add_option("--out", flags->out, "Output directory")->required();
  cmd->add_option("--seed", flags->options.seed, "Seed of the weights")->capture_default_str();
  cmd->add_option("--dtype", flags->dtype, "Weight dtype in model.safetensors: f32, f16 or bf16")
      ->capture_default_str();
  cmd->add_option("--tokenizer-vocab", flags->options.tokenizer_vocab,
                  "Tokenizer vocabulary to learn (0 = min(model vocab, 4096))");
  cmd->add_option("--tokenizer-corpus", flags->corpus,
                  "Text file to learn the tokenizer from (default: bundled sample)");
  cmd->add_flag("--force", flags->options.overwrite, "Overwrite a model already in --out");
  cmd->callback([flags, &action] {
    action = [flags]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(flags->options.dtype, ParseDtypeFlag(flags->dtype));
      if (!flags->corpus.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(flags->options.tokenizer_corpus, ReadFile(flags->corpus));
      }
      SEEDLING_RETURN_IF_ERROR(model::InitModel(flags->out, flags->options));
      SEEDLING_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(flags->out));
      std::printf("wrote %s (%.1fM parameters, %s) to %s\n", flags->options.preset.c_str(),
                  static_cast<double>(config.NumParameters()) / 1e6, flags->dtype.c_str(), flags->out.c_str());
      return absl::OkStatus();
    };
  });
}

void RegisterEval(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, data, adapter;
    WeightFlags weights;
    int64_t max_seq_len = 512, batch_size = 8;
  };
  auto flags = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Loss and perplexity of a model on a JSONL file; prints one JSON line with tokens, loss, perplexity");
  cmd->add_option("--model", flags->model_dir, "Hugging Face model directory or GGUF file")->required();
  cmd->add_option("--data", flags->data, R"(JSONL: {"text": ...} or {"instruction", "input", "output"} rows)")
      ->required();
  cmd->add_option("--max-seq-len", flags->max_seq_len, "Truncate examples to this many tokens")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--batch-size", flags->batch_size, "Examples per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  AddWeightFlags(cmd, flags->weights);
  cmd->add_option("--adapter", flags->adapter, "PEFT LoRA adapter directory to apply");
  cmd->callback([flags, &action] {
    action = [flags]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(model::LoadOptions load, LoadOptionsFromFlags(flags->weights, flags->model_dir));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m, model::LlamaModel::Load(flags->model_dir, load));
      std::unique_ptr<lora::LoraAdapter> adapter;
      if (!flags->adapter.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(adapter, lora::LoadPeft(flags->adapter, m->config()));
      }
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tok, model::LoadTokenizer(flags->model_dir));
      model::DatasetOptions data_options;
      data_options.max_seq_len = flags->max_seq_len;
      if (!m->config().eos_token_ids.empty()) data_options.eos_id = static_cast<int32_t>(m->config().eos_token_ids[0]);
      SEEDLING_ASSIGN_OR_RETURN(std::vector<model::Example> examples,
                                model::LoadJsonlExamples(flags->data, *tok, data_options));
      Progress progress("eval", static_cast<int64_t>(examples.size()));
      model::EvalOptions eo;
      eo.batch_size = flags->batch_size;
      eo.forward.adapter = adapter.get();
      eo.progress = [&progress](int64_t done, int64_t) { progress.Update(done); };
      SEEDLING_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(*m, examples, eo));
      progress.Finish();
      nlohmann::json out = {{"examples", r.examples},     {"tokens", r.tokens},   {"loss", r.loss},
                            {"perplexity", r.perplexity}, {"seconds", r.seconds}, {"peak_rss_bytes", PeakRssBytes()}};
      std::cout << out.dump() << std::endl;
      return absl::OkStatus();
    };
  });
}

void RegisterGenerate(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, prompt;
    WeightFlags weights;
    bool greedy = false;
    model::GenerateOptions options;
  };
  auto flags = std::make_shared<Flags>();
  flags->options.temperature = 0.8;
  flags->options.top_p = 0.95;
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt (streams to stdout)");
  cmd->add_option("--model", flags->model_dir, "Hugging Face model directory or GGUF file")->required();
  cmd->add_option("--prompt", flags->prompt, "Prompt text")->required();
  cmd->add_option("--max-new-tokens", flags->options.max_new_tokens, "Tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", flags->options.seed, "Seed of the sampling stream")->capture_default_str();
  cmd->add_option("--temperature", flags->options.temperature, "Sampling temperature (0 = greedy)")
      ->capture_default_str();
  cmd->add_option("--top-p", flags->options.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str();
  cmd->add_option("--top-k", flags->options.top_k, "Sample among the k most likely tokens (0 = all)")
      ->capture_default_str();
  cmd->add_flag("--greedy", flags->greedy, "Always pick the most likely token");
  AddWeightFlags(cmd, flags->weights);
  cmd->callback([flags, &action] {
    action = [flags]() -> absl::Status {
      if (flags->greedy) flags->options.temperature = 0;
      SEEDLING_ASSIGN_OR_RETURN(model::LoadOptions load, LoadOptionsFromFlags(flags->weights, flags->model_dir));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m, model::LlamaModel::Load(flags->model_dir, load));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tok, model::LoadTokenizer(flags->model_dir));
      SEEDLING_ASSIGN_OR_RETURN(model::GenerateResult r,
                                model::Generate(*m, *tok, flags->prompt, flags->options, [](std::string_view text) {
                                  std::fwrite(text.data(), 1, text.size(), stdout);
                                  std::fflush(stdout);
                                }));
      std::printf("\n");
      std::fprintf(
          stderr, "[%zu prompt tokens, %zu generated (%s); prefill %.0f tok/s, decode %.1f tok/s; peak RSS %s]\n",
          r.prompt_tokens.size(), r.tokens.size(), model::StopReasonName(r.stop),
          static_cast<double>(r.prompt_tokens.size()) / std::max(r.prefill_seconds, 1e-9),
          static_cast<double>(r.tokens.size()) / std::max(r.decode_seconds, 1e-9), FormatBytes(PeakRssBytes()).c_str());
      return absl::OkStatus();
    };
  });
}

}  // namespace

void RegisterModelCommands(CLI::App& app, Action& action) {
  RegisterInitModel(app, action);
  RegisterEval(app, action);
  RegisterGenerate(app, action);
}

}  // namespace seedling::apps
