// finetune, export.

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "base/file.h"
#include "base/memory.h"
#include "base/progress.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/local_data.h"
#include "client/local_training.h"
#include "client/memory_planner.h"
#include "lora/adapter.h"
#include "model/gguf.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace seedling::apps {
namespace {

// Files of a Hugging Face model directory besides config.json and the weights.
constexpr const char* kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                           "special_tokens_map.json", "generation_config.json"};

absl::Status CopyTokenizerFiles(const std::string& from, const std::string& to) {
  for (const char* name : kTokenizerFiles) {
    const std::string src = JoinPath(from, name);
    if (!FileExists(src)) continue;
    SEEDLING_ASSIGN_OR_RETURN(std::string bytes, ReadFile(src));
    SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(to, name), bytes));
  }
  return absl::OkStatus();
}

// Writes a full Hugging Face model directory: config.json, model.safetensors and the tokenizer files.
absl::Status SaveModelDir(const std::string& out, const std::string& source_dir, const model::ModelConfig& config,
                          const model::ModelWeights& weights, model::DType dtype) {
  SEEDLING_RETURN_IF_ERROR(MakeDirs(out));
  model::ModelConfig c = config;
  c.torch_dtype = dtype == model::DType::kF32 ? "float32" : dtype == model::DType::kF16 ? "float16" : "bfloat16";
  SEEDLING_RETURN_IF_ERROR(model::SaveWeights(JoinPath(out, "model.safetensors"), weights, c, dtype));
  SEEDLING_RETURN_IF_ERROR(CopyTokenizerFiles(source_dir, out));
  return WriteFileAtomic(JoinPath(out, "config.json"), model::ModelConfigToJson(c));
}

absl::StatusOr<model::DType> ParseDtype(const std::string& s) {
  if (s == "f32") return model::DType::kF32;
  if (s == "f16") return model::DType::kF16;
  if (s == "bf16") return model::DType::kBF16;
  return absl::InvalidArgumentError(StrCat("--dtype must be f32, f16 or bf16, got '", s, "'"));
}

void RegisterFinetune(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, data, method = "lora-bp", budget, out, targets = "q_proj,v_proj", weights = "fp32";
    std::string recompute = "auto";
    int64_t ce_chunk = 0;
    client::TrainingConfig training;
    lora::LoraConfig lora;
    int64_t seq_len = 256, batch = 1;
    double heldout = 0.1;
    bool full = false, pack = true;
  };
  auto f = std::make_shared<Flags>();
  f->training.steps = 100;
  CLI::App* cmd = app.add_subcommand(
      "finetune", "Fine-tune on one device's data under a memory budget (what the SDK does inside a round)");
  cmd->add_option("--model", f->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--data", f->data, "JSONL: text, instruction/input/output or Dolly rows")->required();
  cmd->add_option("--method", f->method, "lora-bp, fwdgrad, mezo or kseed")->capture_default_str();
  cmd->add_option("--steps", f->training.steps, "Optimization steps")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--memory-budget", f->budget, "Peak process memory allowed, e.g. 600M or 1.5G (default: none)");
  cmd->add_option("--out", f->out, "Output directory (PEFT adapter, or full model with --full)")->required();
  cmd->add_option("--lr", f->training.lr, "Learning rate (default: the method's published value)");
  cmd->add_option("--epsilon", f->training.epsilon, "Perturbation scale for mezo/kseed/central differences");
  cmd->add_option("--seed", f->training.seed, "Seed of perturbations, sampling, dropout and data order")->capture_default_str();
  cmd->add_option("--seq-len", f->seq_len, "Tokens per sequence (truncation and packing)")->capture_default_str();
  cmd->add_option("--batch", f->batch, "Sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_flag("!--no-pack", f->pack, "Do not pack examples into full sequences");
  cmd->add_option("--heldout", f->heldout, "Fraction of rows held out for loss_start/loss_end")->capture_default_str();
  cmd->add_option("--lora-rank", f->lora.rank, "LoRA rank")->capture_default_str();
  cmd->add_option("--lora-alpha", f->lora.alpha, "LoRA alpha")->capture_default_str();
  cmd->add_option("--lora-dropout", f->lora.dropout, "LoRA dropout (lora-bp)")->capture_default_str();
  cmd->add_option("--lora-targets", f->targets, "Projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all")
      ->capture_default_str();
  cmd->add_flag("--full", f->full, "mezo/kseed: train every weight instead of a LoRA adapter");
  cmd->add_option("--perturbations", f->training.perturbations, "fwdgrad: perturbations per step")->capture_default_str();
  cmd->add_option("--pool-size", f->training.kseed_pool_size, "kseed: candidate seeds")->capture_default_str();
  cmd->add_option("--pool-seed", f->training.kseed_pool_seed, "kseed: the pool's seed")->capture_default_str();
  cmd->add_option("--weights", f->weights, "fp32 or stored (keep 16-bit weights; not with --full)")->capture_default_str();
  cmd->add_option("--recompute", f->recompute, "lora-bp: per-layer recomputation auto (the planner decides), on or off")
      ->capture_default_str();
  cmd->add_option("--ce-chunk", f->ce_chunk, "Cross-entropy chunk in tokens (0 = the planner decides)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(f->training.method, optim::ParseMethod(f->method));
      SEEDLING_ASSIGN_OR_RETURN(f->lora.targets, lora::ParseTargets(f->targets));
      f->lora.init_seed = f->training.seed;
      f->training.full_parameters = f->full;
      if (f->weights != "fp32" && f->weights != "stored") {
        return absl::InvalidArgumentError(StrCat("--weights must be fp32 or stored, got '", f->weights, "'"));
      }
      model::LoadOptions load;
      load.precision = f->weights == "stored" ? model::WeightPrecision::kStored : model::WeightPrecision::kFloat32;
      if (f->full && load.precision == model::WeightPrecision::kStored) {
        return absl::InvalidArgumentError("--full trains the weights themselves: use --weights fp32");
      }
      int64_t budget = 0;
      if (!f->budget.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(budget, client::ParseByteSize(f->budget));
      }

      // Everything but the weights first: the planner's runtime baseline includes tokenizer and data.
      SEEDLING_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(f->model_dir));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer, model::LoadTokenizer(f->model_dir));
      client::LocalDataOptions data_options;
      data_options.seq_len = f->seq_len;
      data_options.pack = f->pack;
      data_options.heldout_fraction = f->heldout;
      data_options.seed = f->training.seed;
      data_options.batch_size = f->batch;
      if (!config.eos_token_ids.empty()) data_options.eos_id = static_cast<int32_t>(config.eos_token_ids[0]);
      SEEDLING_ASSIGN_OR_RETURN(client::LocalDataset data, client::LocalDataset::Load(f->data, *tokenizer, data_options));
      std::fprintf(stderr, "%s\n", data.Summary().c_str());
      if (data.stats().skipped > 0) std::fprintf(stderr, "%s\n", data.stats().SkipMessage().c_str());

      client::PlanRequest request;
      request.model = config;
      request.method = f->training.method;
      request.lora = f->lora;
      request.full_parameters = f->full;
      request.seq_len = f->seq_len;
      request.batch = f->batch;
      request.budget_bytes = budget;
      request.runtime_bytes = client::MeasureRuntimeBytes();
      request.weight_bytes = client::ResidentWeightBytes(config, load.precision);
      request.weights_16bit = load.precision == model::WeightPrecision::kStored &&
                              (config.torch_dtype == "bfloat16" || config.torch_dtype == "float16");
      request.perturbations = f->training.perturbations;
      if (f->recompute != "auto" && f->recompute != "on" && f->recompute != "off") {
        return absl::InvalidArgumentError(StrCat("--recompute must be auto, on or off, got '", f->recompute, "'"));
      }
      SEEDLING_ASSIGN_OR_RETURN(client::MemoryPlan plan, client::PlanMemory(request));
      if (f->recompute != "auto" || f->ce_chunk > 0) {
        // Settings forced by the user: re-estimate them (and still refuse what cannot fit).
        plan = client::EstimatePlan(request, plan.variant, plan.micro_batch,
                                    f->recompute == "auto" ? plan.recompute : f->recompute == "on",
                                    f->ce_chunk > 0 ? f->ce_chunk : plan.ce_chunk_tokens);
        if (budget > 0 && plan.total_bytes() > budget) {
          return absl::ResourceExhaustedError(StrCat("the forced settings do not fit the budget: ", plan.Describe()));
        }
      }
      std::fprintf(stderr, "plan: %s\n", plan.Describe().c_str());

      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model, model::LlamaModel::Load(f->model_dir, load));
      std::unique_ptr<lora::LoraAdapter> adapter;
      if (!f->full) {
        SEEDLING_ASSIGN_OR_RETURN(adapter, lora::LoraAdapter::Create(config, f->lora));
      }

      Progress progress(StrCat("finetune ", f->method), f->training.steps);
      double last_loss = 0;
      SEEDLING_ASSIGN_OR_RETURN(
          client::TrainingResult r,
          client::RunLocalTraining(*model, adapter.get(), data, f->training, plan, [&](int64_t done, int64_t, double loss) {
            last_loss = loss;
            progress.Update(done);
          }));
      progress.Finish();

      SEEDLING_RETURN_IF_ERROR(MakeDirs(f->out));
      if (f->full) {
        SEEDLING_RETURN_IF_ERROR(SaveModelDir(f->out, f->model_dir, config, model->weights(), model::DType::kF32));
      } else {
        SEEDLING_RETURN_IF_ERROR(lora::SavePeft(*adapter, f->out, f->model_dir));
      }
      nlohmann::json update;  // what the device would upload besides (or instead of) the weights
      if (f->training.method == optim::Method::kKSeed) {
        nlohmann::json pairs = nlohmann::json::array();
        for (const optim::SeedScalar& p : r.kseed_pairs) pairs.push_back({p.index, p.value});
        update = {{"method", "kseed"}, {"pool_seed", f->training.kseed_pool_seed},
                  {"pool_size", f->training.kseed_pool_size}, {"pairs", pairs}};
        SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(f->out, "kseed_update.json"), update.dump() + "\n"));
      }
      nlohmann::json out = {{"method", f->method},
                            {"loss_start", r.loss_start},
                            {"loss_end", r.loss_end},
                            {"steps", r.steps},
                            {"skipped_steps", r.skipped_steps},
                            {"tokens", r.tokens},
                            {"tokens_per_second", r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0},
                            {"seconds", r.seconds},
                            {"peak_rss_bytes", PeakRssBytes()},
                            {"step_tensor_peak_bytes", r.step_tensor_peak_bytes},
                            {"planned_peak_bytes", plan.total_bytes()},
                            {"plan", nlohmann::json::parse(plan.ToJson())},
                            {"out", f->out}};
      std::cout << out.dump() << std::endl;
      return absl::OkStatus();
    };
  });
}

void RegisterExport(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, adapter_dir, format = "safetensors", out, dtype;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("export", "Export a model (with a LoRA adapter merged in) as safetensors or GGUF");
  cmd->add_option("--model", f->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", f->adapter_dir, "PEFT adapter directory to merge");
  cmd->add_option("--format", f->format, "safetensors (a model directory) or gguf (one file)")->capture_default_str();
  cmd->add_option("--out", f->out, "Output directory (safetensors) or file (gguf)")->required();
  cmd->add_option("--dtype", f->dtype, "f32, f16 or bf16 (safetensors; default f32) / f32 or f16 (gguf; default f16)");
  cmd->callback([f, &action] {
    action = [f]() -> absl::Status {
      if (f->format != "safetensors" && f->format != "gguf") {
        return absl::InvalidArgumentError(StrCat("--format must be safetensors or gguf, got '", f->format, "'"));
      }
      const std::string dtype_name = !f->dtype.empty() ? f->dtype : (f->format == "gguf" ? "f16" : "f32");
      SEEDLING_ASSIGN_OR_RETURN(model::DType dtype, ParseDtype(dtype_name));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model, model::LlamaModel::Load(f->model_dir));
      if (!f->adapter_dir.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> adapter,
                                  lora::LoadPeft(f->adapter_dir, model->config()));
        SEEDLING_RETURN_IF_ERROR(adapter->Merge(model->mutable_weights()));
      }
      if (f->format == "safetensors") {
        SEEDLING_RETURN_IF_ERROR(SaveModelDir(f->out, f->model_dir, model->config(), model->weights(), dtype));
      } else {
        SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer, model::LoadTokenizer(f->model_dir));
        model::GgufOptions options;
        options.dtype = dtype;
        SEEDLING_RETURN_IF_ERROR(model::WriteGguf(f->out, model->config(), model->weights(), *tokenizer, options));
      }
      std::printf("wrote %s (%s%s) to %s\n", f->format.c_str(), dtype_name.c_str(),
                  f->adapter_dir.empty() ? "" : ", adapter merged", f->out.c_str());
      return absl::OkStatus();
    };
  });
}

}  // namespace

void RegisterFinetuneCommands(CLI::App& app, Action& action) {
  RegisterFinetune(app, action);
  RegisterExport(app, action);
}

}  // namespace seedling::apps
