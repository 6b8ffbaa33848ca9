// finetune, export.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <span>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "apps/commands.h"
#include "apps/weight_flags.h"
#include "base/check.h"
#include "base/file.h"
#include "base/memory.h"
#include "base/progress.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/compute_model.h"
#include "client/local_data.h"
#include "client/local_training.h"
#include "client/memory_planner.h"
#include "client/task_spec.h"
#include "lora/adapter.h"
#include "model/gguf.h"
#include "model/gguf_model.h"
#include "model/llama.h"
#include "model/quant.h"
#include "model/runtime.h"
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

// A Hugging Face directory needs the source's tokenizer files; a GGUF file holds its tokenizer as metadata,
// which Seedling does not write back as tokenizer.json. Checked before any work is done.
absl::Status CheckModelDirSource(const std::string& source, std::string_view what) {
  if (!model::IsGgufPath(source)) return absl::OkStatus();
  return absl::InvalidArgumentError(StrCat(what,
                                           " writes a Hugging Face model directory, whose tokenizer files a GGUF ",
                                           "model (", source, ") does not have: use the model's directory"));
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

namespace {

// --recompute: "auto" (the planner decides), "on" (every layer), "off", or N (the first N layers).
struct RecomputeFlag {
  bool automatic = true;
  bool on = false;
  int64_t stored_layers = 0;
};

absl::StatusOr<RecomputeFlag> ParseRecompute(const std::string& text, int64_t layers) {
  if (text == "auto") return RecomputeFlag{};
  if (text == "on") return RecomputeFlag{false, true, 0};
  if (text == "off") return RecomputeFlag{false, false, 0};
  int64_t n = -1;
  if (!absl::SimpleAtoi(ToAbsl(text), &n) || n < 0 || n > layers) {
    return absl::InvalidArgumentError(
        StrCat("--recompute must be auto, on, off or a number of layers in [0, ", layers, "], got '", text, "'"));
  }
  return RecomputeFlag{false, n > 0, n > 0 ? layers - n : 0};
}

}  // namespace

void RegisterFinetune(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, data, method = "lora-bp", budget, out, targets = "q_proj,v_proj", layers = "all",
                                 adapter = "lora";
    WeightFlags weights;
    std::string recompute = "auto";
    std::string stream_weights = "auto";
    std::string variant, pepita_variant;
    int64_t ce_chunk = 0;
    client::TrainingConfig training;
    lora::LoraConfig lora;
    int64_t seq_len = 256, batch = 1;
    double heldout = 0.1;
    int64_t max_row_bytes = client::LocalDataOptions{}.max_row_bytes;
    bool full = false, pack = true;
  };
  auto f = std::make_shared<Flags>();
  f->training.steps = 100;
  CLI::App* cmd = app.add_subcommand(
      "finetune", "Fine-tune on one device's data under a memory budget (what the SDK does inside a round)");
  cmd->add_option("--model", f->model_dir, "Hugging Face model directory or GGUF file")->required();
  cmd->add_option("--data", f->data, "JSONL: text, instruction/input/output or Dolly rows")->required();
  cmd->add_option("--method", f->method,
                  "lora-bp, fwdgrad, mezo, kseed or pepita (forward-only PEPITA / MEMPEPITA, docs/methods.md)")
      ->capture_default_str();
  cmd->add_option("--steps", f->training.steps, "Optimization steps")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--untimed-steps", f->training.untimed_steps,
                  "Benchmarks: leave the first N steps (warm-up) out of seconds and tokens/s")
      ->capture_default_str();
  cmd->add_option("--min-seconds", f->training.min_seconds,
                  "Benchmarks: keep stepping past --steps until the timed steps took this long")
      ->capture_default_str();
  cmd->add_option("--forward-seconds", f->training.forward_seconds,
                  "Benchmarks: after training, time plain forwards on training batches this long "
                  "(forward_tokens_per_second)");
  cmd->add_option("--memory-budget", f->budget, "Peak process memory allowed, e.g. 600M or 1.5G (default: none)");
  cmd->add_option("--out", f->out, "Output directory (PEFT adapter, or full model with --full)")->required();
  cmd->add_option("--lr", f->training.lr, "Learning rate (default: the method's published value)");
  cmd->add_option("--epsilon", f->training.epsilon, "Perturbation scale for mezo/kseed/central differences");
  cmd->add_option("--seed", f->training.seed, "Seed of perturbations, sampling, dropout and data order")
      ->capture_default_str();
  cmd->add_option("--seq-len", f->seq_len, "Tokens per sequence (truncation and packing)")->capture_default_str();
  cmd->add_option("--batch", f->batch, "Sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_flag("!--no-pack", f->pack, "Do not pack examples into full sequences");
  cmd->add_option("--heldout", f->heldout, "Fraction of rows held out for loss_start/loss_end")->capture_default_str();
  cmd->add_option("--max-row-bytes", f->max_row_bytes, "Skip (and count) data rows longer than this")
      ->capture_default_str();
  cmd->add_option("--lora-rank", f->lora.rank, "LoRA rank")->capture_default_str();
  cmd->add_option("--lora-alpha", f->lora.alpha, "LoRA alpha")->capture_default_str();
  cmd->add_option("--lora-dropout", f->lora.dropout, "LoRA dropout (lora-bp)")->capture_default_str();
  cmd->add_option("--lora-targets", f->targets,
                  "Projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all")
      ->capture_default_str();
  cmd->add_option("--adapter", f->adapter,
                  "What to train on each target: lora (matrices A, B) or bitfit (one bias vector each)")
      ->capture_default_str()
      ->check(CLI::IsMember({"lora", "bitfit"}));
  cmd->add_option("--lora-layers", f->layers,
                  "Decoder layers to adapt: all, top:N (the N nearest the output) or indices like 0,5,11")
      ->capture_default_str();
  cmd->add_flag("--full", f->full, "mezo/kseed: train every weight instead of a LoRA adapter");
  cmd->add_option(
      "--perturbations", f->training.perturbations,
      "Perturbations per step: fwdgrad's K tangents (default 8), mezo/kseed's q probes, batched (default 1)");
  cmd->add_option("--pool-size", f->training.kseed_pool_size, "kseed: candidate seeds")->capture_default_str();
  cmd->add_option("--pool-seed", f->training.kseed_pool_seed, "kseed: the pool's seed")->capture_default_str();
  cmd->add_option("--pepita-variant", f->pepita_variant,
                  "pepita: 'pepita' (two forwards, the clean outputs kept) or 'mem' (MEMPEPITA: a third forward "
                  "recomputes them, activation memory of one layer); default: the planner decides (same as --variant)")
      ->check(CLI::IsMember({"pepita", "mem"}));
  cmd->add_option("--feedback-scale", f->training.pepita_feedback_scale,
                  "pepita: the fixed random feedback matrix F's scale, F ~ scale * U[-sqrt(6/hidden), sqrt(6/hidden)]")
      ->capture_default_str();
  cmd->add_option("--feedback-seed", f->training.pepita_feedback_seed, "pepita: F's seed (fixed for the run)")
      ->capture_default_str();
  AddWeightFlags(cmd, f->weights);
  cmd->add_option("--recompute", f->recompute,
                  "lora-bp: per-layer recomputation auto (the planner decides), on, off, or a number of layers "
                  "(the first ones; the rest keep their activations)")
      ->capture_default_str();
  cmd->add_option("--stream-weights", f->stream_weights,
                  "q8_0/q4_0: release the layers' weight pages after each tile, keeping RSS near one tile per "
                  "matrix: auto (the planner streams when the budget needs it), on, off")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "on", "off"}));
  cmd->add_option("--variant", f->variant,
                  "How the method runs (default: the planner decides): fwdgrad batched-jvp or central-difference; "
                  "mezo batched or in-place-restore; kseed batched, exact-restore or in-place-restore; "
                  "pepita pepita or mem");
  cmd->add_option("--ce-chunk", f->ce_chunk, "Cross-entropy chunk in tokens (0 = the planner decides)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(f->training.method, optim::ParseMethod(f->method));
      if (!f->pepita_variant.empty()) {
        if (f->training.method != optim::Method::kPepita) {
          return absl::InvalidArgumentError(StrCat("--pepita-variant is for --method pepita, not ", f->method));
        }
        if (!f->variant.empty() && f->variant != f->pepita_variant) {
          return absl::InvalidArgumentError(
              StrCat("--pepita-variant ", f->pepita_variant, " contradicts --variant ", f->variant));
        }
        f->variant = f->pepita_variant;
      }
      if (!(f->training.pepita_feedback_scale > 0 && std::isfinite(f->training.pepita_feedback_scale))) {
        return absl::InvalidArgumentError(
            StrCat("--feedback-scale must be > 0, got ", f->training.pepita_feedback_scale));
      }
      SEEDLING_ASSIGN_OR_RETURN(f->lora.targets, lora::ParseTargets(f->targets));
      SEEDLING_ASSIGN_OR_RETURN(f->lora.kind, lora::ParseAdapterKind(f->adapter));
      f->lora.init_seed = f->training.seed;
      f->training.full_parameters = f->full;
      SEEDLING_ASSIGN_OR_RETURN(model::LoadOptions load, LoadOptionsFromFlags(f->weights, f->model_dir));
      if (f->full && load.precision != model::WeightPrecision::kFloat32) {
        return absl::InvalidArgumentError("--full trains the weights themselves: use --weights fp32");
      }
      if (f->full) SEEDLING_RETURN_IF_ERROR(CheckModelDirSource(f->model_dir, "--full"));
      int64_t budget = 0;
      if (!f->budget.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(budget, ParseByteSize(f->budget));
      }

      // Everything but the weights first: the planner's runtime baseline includes tokenizer and data.
      SEEDLING_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(f->model_dir));
      SEEDLING_ASSIGN_OR_RETURN(const lora::LayerSelection layers, lora::ParseLayerSelection(f->layers));
      SEEDLING_ASSIGN_OR_RETURN(f->lora.layers, lora::ResolveLayers(layers, config.num_hidden_layers));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer, model::LoadTokenizer(f->model_dir));
      client::TaskSpec spec;
      spec.training = f->training;
      spec.lora = f->lora;
      spec.seq_len = f->seq_len;
      spec.batch = f->batch;
      client::LocalDataOptions data_options = client::DataOptionsFor(spec, config);
      data_options.pack = f->pack;
      data_options.heldout_fraction = f->heldout;
      data_options.max_row_bytes = f->max_row_bytes;
      SEEDLING_ASSIGN_OR_RETURN(client::LocalDataset data,
                                client::LocalDataset::Load(f->data, *tokenizer, data_options));
      std::fprintf(stderr, "%s\n", data.Summary().c_str());
      if (data.stats().skipped > 0) std::fprintf(stderr, "%s\n", data.stats().SkipMessage().c_str());

      SEEDLING_ASSIGN_OR_RETURN(client::PlanRequest request,
                                client::PlanRequestFor(spec, f->model_dir, config, load.precision));
      request.budget_bytes = budget;
      request.runtime_bytes = client::MeasureRuntimeBytes();
      if (f->stream_weights != "auto" && request.streamed_weight_bytes < 0) {
        return absl::InvalidArgumentError(
            StrCat("--stream-weights ", f->stream_weights, ": --weights ", model::WeightPrecisionName(load.precision),
                   " cannot be streamed (a directory's q8_0 / q4_0 weights can, and a GGUF file's with any "
                   "--weights but fp32)"));
      }
      if (f->stream_weights == "off") request.streamed_weight_bytes = -1;
      SEEDLING_ASSIGN_OR_RETURN(const RecomputeFlag recompute, ParseRecompute(f->recompute, config.num_hidden_layers));
      const std::vector<std::string> variants = client::PlanVariants(f->training.method, f->full);
      if (!f->variant.empty() && std::find(variants.begin(), variants.end(), f->variant) == variants.end()) {
        return absl::InvalidArgumentError(StrCat("--variant ", f->variant, " is not one of ", f->method,
                                                 f->full ? " --full" : "", "'s: ", absl::StrJoin(variants, ", ")));
      }
      SEEDLING_ASSIGN_OR_RETURN(client::MemoryPlan plan, client::PlanMemory(request));
      const bool force_stream = f->stream_weights == "on";
      if (!recompute.automatic || f->ce_chunk > 0 || !f->variant.empty() || force_stream) {
        // Settings forced by the user: re-estimate them (and still refuse what cannot fit).
        plan = client::EstimatePlan(
            request, f->variant.empty() ? plan.variant : f->variant, plan.micro_batch,
            recompute.automatic ? plan.recompute : recompute.on, f->ce_chunk > 0 ? f->ce_chunk : plan.ce_chunk_tokens,
            plan.mlp_chunk_tokens, plan.tangents_per_pass,
            recompute.automatic ? plan.stored_layers : recompute.stored_layers, plan.stream_weights || force_stream);
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

      RssPeakSampler rss;  // anonymous and file-backed peaks, reported apart
      Progress progress(StrCat("finetune ", f->method), f->training.steps);
      double last_loss = 0;
      SEEDLING_ASSIGN_OR_RETURN(client::TrainingResult r,
                                client::RunLocalTraining(*model, adapter.get(), data, f->training, plan,
                                                         [&](int64_t done, int64_t, double loss) {
                                                           last_loss = loss;
                                                           progress.Update(done);
                                                         }));
      progress.Finish();
      // Peaks first: the in-run sgemm reference for MFU comes after training and must not count in them.
      const int64_t peak_rss = PeakRssBytes();
      const RssParts peak_parts = rss.Peak();
      const double sgemm_gflops = model::MeasureSgemmGflops(1024, 0.25);
      const int64_t passes_k = client::PerturbationsPerStep(f->training);
      // The compute model counts MEMPEPITA's third forward under its own name.
      const std::string compute_method = f->training.method == optim::Method::kPepita && plan.variant == "mem"
                                             ? "mempepita"
                                             : optim::MethodName(f->training.method);
      const int64_t first_layer = f->full ? 0 : lora::FirstAdaptedLayer(f->lora);
      const double mfu = client::TrainingMfu(config, compute_method, r.steps, f->batch, f->seq_len, passes_k,
                                             r.processed_tokens, r.seconds, sgemm_gflops, first_layer);

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
        update = {{"method", "kseed"},
                  {"pool_seed", f->training.kseed_pool_seed},
                  {"pool_size", f->training.kseed_pool_size},
                  {"pairs", pairs}};
        SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(f->out, "kseed_update.json"), update.dump() + "\n"));
      }
      nlohmann::json out = {
          {"method", f->method},
          {"loss_start", r.loss_start},
          {"loss_end", r.loss_end},
          {"steps", r.steps},
          {"skipped_steps", r.skipped_steps},
          {"tokens", r.processed_tokens},
          {"scored_tokens", r.scored_tokens},
          {"tokens_per_second", r.seconds > 0 ? static_cast<double>(r.processed_tokens) / r.seconds : 0.0},
          {"mfu", mfu},
          {"forward_tokens", r.forward_processed_tokens},
          {"forward_tokens_per_second",
           r.forward_seconds > 0 ? static_cast<double>(r.forward_processed_tokens) / r.forward_seconds : 0.0},
          {"forward_mfu",
           client::ForwardMfu(config, f->seq_len, r.forward_processed_tokens, r.forward_seconds, sgemm_gflops)},
          {"sgemm_gflops", sgemm_gflops},
          {"seconds", r.seconds},
          {"peak_rss_bytes", peak_rss},
          {"peak_rss_anon_bytes", peak_parts.anon},
          {"peak_rss_file_bytes", peak_parts.file},
          {"weights", model::WeightPrecisionName(load.precision)},
          {"step_tensor_peak_bytes", r.step_tensor_peak_bytes},
          {"planned_peak_bytes", plan.total_bytes()},
          {"plan", nlohmann::json::parse(plan.ToJson())},
          {"out", f->out}};
      std::cout << out.dump() << std::endl;
      return absl::OkStatus();
    };
  });
}

// `seedling export --format`: what each writes and the --dtype values it takes (the first is the
// default).
struct ExportFormat {
  const char* name;
  std::span<const model::WeightFormat> dtypes;
};
constexpr model::WeightFormat kSafetensorsDtypes[] = {model::WeightFormat::kF32, model::WeightFormat::kF16,
                                                      model::WeightFormat::kBF16};
constexpr model::WeightFormat kGgufDtypes[] = {model::WeightFormat::kF16, model::WeightFormat::kF32,
                                               model::WeightFormat::kQ8_0, model::WeightFormat::kQ4_0};
constexpr model::WeightFormat kGgufLoraDtypes[] = {model::WeightFormat::kF32, model::WeightFormat::kF16};
constexpr ExportFormat kExportFormats[] = {
    {"safetensors", kSafetensorsDtypes}, {"gguf", kGgufDtypes}, {"gguf-lora", kGgufLoraDtypes}};

// The --dtype for --format `format` (the format's default when `dtype` is empty). InvalidArgument for an
// unknown format or a dtype the format does not take, naming the ones it does.
absl::StatusOr<model::WeightFormat> ParseExportDtype(const std::string& format, const std::string& dtype) {
  const auto* f = std::find_if(std::begin(kExportFormats), std::end(kExportFormats),
                               [&](const ExportFormat& e) { return format == e.name; });
  if (f == std::end(kExportFormats)) {
    return absl::InvalidArgumentError(StrCat("--format must be safetensors, gguf or gguf-lora, got '", format, "'"));
  }
  if (dtype.empty()) return f->dtypes.front();
  std::string names;
  for (model::WeightFormat d : f->dtypes) {
    if (dtype == model::WeightFormatName(d)) return d;
    names += StrCat(names.empty() ? "" : ", ", model::WeightFormatName(d));
  }
  const bool block = dtype == "q8_0" || dtype == "q4_0";
  return absl::InvalidArgumentError(StrCat("--format ", format, " takes --dtype ", names, ", got '", dtype, "'",
                                           block ? " (q8_0 and q4_0 are for --format gguf)" : ""));
}

model::DType SafetensorsDType(model::WeightFormat format) {
  return format == model::WeightFormat::kF32   ? model::DType::kF32
         : format == model::WeightFormat::kF16 ? model::DType::kF16
                                               : model::DType::kBF16;
}

// --format gguf-lora: the PEFT adapter in `adapter_dir` as a GGUF LoRA adapter for llama.cpp. Only the base
// model's config is read (for the architecture and the shapes), not its weights.
absl::Status ExportGgufLora(const std::string& model_dir, const std::string& adapter_dir, const std::string& out,
                            model::WeightFormat dtype) {
  if (adapter_dir.empty()) {
    return absl::InvalidArgumentError("--format gguf-lora exports an adapter: give --adapter DIR");
  }
  SEEDLING_ASSIGN_OR_RETURN(const model::ModelConfig config, model::LoadModelConfig(model_dir));
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> adapter, lora::LoadPeft(adapter_dir, config));
  if (adapter->config().kind != lora::AdapterKind::kLora) {
    return absl::InvalidArgumentError(
        "--format gguf-lora holds LoRA matrix pairs; a BitFit adapter has none (export --format safetensors "
        "merges it into a model whose targets have biases)");
  }
  std::vector<model::GgufLoraPair> pairs;
  for (const lora::LoraView& view : adapter->views()) {  // each projection's A, then its B
    if (view.is_a) {
      pairs.push_back({view.layer, view.projection, adapter->Matrix(view), at::Tensor()});
    } else {
      SEEDLING_CHECK(!pairs.empty() && pairs.back().layer == view.layer && pairs.back().projection == view.projection);
      pairs.back().b = adapter->Matrix(view);
    }
  }
  model::GgufLoraOptions options;
  options.format = dtype;
  // scale() is alpha / r, or alpha / sqrt(r) with rsLoRA: WriteGgufLora turns it into llama.cpp's alpha.
  return model::WriteGgufLora(out, config, pairs, adapter->config().scale(), options);
}

// --format safetensors / gguf: the model, with the adapter in `adapter_dir` (if any) merged in.
absl::Status ExportModel(const std::string& model_dir, const std::string& adapter_dir, const std::string& format,
                         const std::string& out, model::WeightFormat dtype) {
  if (format == "safetensors") SEEDLING_RETURN_IF_ERROR(CheckModelDirSource(model_dir, "--format safetensors"));
  // Without an adapter to merge, GGUF converts each matrix from its stored dtype, one at a time.
  model::LoadOptions load;
  if (adapter_dir.empty() && format == "gguf") load.precision = model::WeightPrecision::kStored;
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model, model::LlamaModel::Load(model_dir, load));
  if (!adapter_dir.empty()) {
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> adapter, lora::LoadPeft(adapter_dir, model->config()));
    SEEDLING_RETURN_IF_ERROR(adapter->Merge(model->mutable_weights()));
  }
  if (format == "safetensors") {
    return SaveModelDir(out, model_dir, model->config(), model->weights(), SafetensorsDType(dtype));
  }
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer, model::LoadTokenizer(model_dir));
  model::GgufOptions options;
  options.format = dtype;
  return model::WriteGguf(out, model->config(), model->weights(), *tokenizer, options);
}

void RegisterExport(CLI::App& app, Action& action) {
  struct Flags {
    std::string model_dir, adapter_dir, format = "safetensors", out, dtype;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand(
      "export", "Export a model (with a LoRA adapter merged in) as safetensors or GGUF, or an adapter as GGUF");
  cmd->add_option("--model", f->model_dir, "Hugging Face model directory or GGUF file (gguf-lora: the adapter's base)")
      ->required();
  cmd->add_option("--adapter", f->adapter_dir,
                  "PEFT adapter directory: merged (safetensors, gguf) or exported (gguf-lora)");
  cmd->add_option("--format", f->format,
                  "safetensors (a model directory), gguf (one model file) or gguf-lora (a llama.cpp --lora file)")
      ->capture_default_str();
  cmd->add_option("--out", f->out, "Output directory (safetensors) or file (gguf, gguf-lora)")->required();
  cmd->add_option("--dtype", f->dtype,
                  "safetensors: f32 (default), f16, bf16; gguf: f16 (default), f32, q8_0, q4_0; gguf-lora: f32 "
                  "(default), f16");
  cmd->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(const model::WeightFormat dtype, ParseExportDtype(f->format, f->dtype));
      if (f->format == "gguf-lora") {
        SEEDLING_RETURN_IF_ERROR(ExportGgufLora(f->model_dir, f->adapter_dir, f->out, dtype));
      } else {
        SEEDLING_RETURN_IF_ERROR(ExportModel(f->model_dir, f->adapter_dir, f->format, f->out, dtype));
      }
      const char* what = f->format == "gguf-lora" ? ", adapter only" : f->adapter_dir.empty() ? "" : ", adapter merged";
      std::printf("wrote %s (%s%s) to %s\n", f->format.c_str(), model::WeightFormatName(dtype), what, f->out.c_str());
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
