#include "model/init.h"

#include <nlohmann/json.hpp>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "model/torch_status.h"
#include "model/weights.h"

namespace seedling::model {

absl::Status InitModel(const std::string& out_dir, const InitModelOptions& options) {
  SEEDLING_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(options.preset));
  if (options.dtype != DType::kF32 && options.dtype != DType::kF16 && options.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(StrCat("dtype must be F32, F16 or BF16, got ", DTypeName(options.dtype)));
  }
  if (!options.overwrite && FileExists(JoinPath(out_dir, "config.json"))) {
    return absl::FailedPreconditionError(
        StrCat("'", out_dir, "' already holds a model (config.json); pass --force to overwrite it"));
  }
  SEEDLING_RETURN_IF_ERROR(MakeDirs(out_dir));

  // Tokenizer: byte-level BPE learned from the corpus. Its special tokens take ids 0..2
  // (<|endoftext|>, <|im_start|>, <|im_end|>), as in SmolLM2; <|endoftext|> serves as BOS and EOS.
  BpeTrainerOptions tok;
  tok.vocab_size = options.tokenizer_vocab > 0 ? options.tokenizer_vocab
                                               : static_cast<int32_t>(std::min<int64_t>(config.vocab_size, 4096));
  if (tok.vocab_size > config.vocab_size) {
    return absl::InvalidArgumentError(
        StrCat("tokenizer vocabulary ", tok.vocab_size, " exceeds the model's vocab_size ", config.vocab_size));
  }
  const std::string_view corpus =
      options.tokenizer_corpus.empty() ? BundledSampleCorpus() : std::string_view(options.tokenizer_corpus);
  SEEDLING_ASSIGN_OR_RETURN(std::string tokenizer_json, TrainByteLevelBpeTokenizerJson(corpus, tok));
  config.bos_token_id = 0;
  config.eos_token_ids = {0};
  config.torch_dtype = options.dtype == DType::kF32 ? "float32" : options.dtype == DType::kF16 ? "float16" : "bfloat16";

  nlohmann::json tokenizer_config = {{"bos_token", "<|endoftext|>"},
                                     {"eos_token", "<|endoftext|>"},
                                     {"unk_token", "<|endoftext|>"},
                                     {"add_bos_token", false},
                                     {"add_eos_token", false},
                                     {"model_max_length", config.max_position_embeddings},
                                     {"tokenizer_class", "GPT2Tokenizer"},
                                     {"clean_up_tokenization_spaces", false}};

  // Weights last: the model is complete only once model.safetensors exists.
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(out_dir, "tokenizer.json"), tokenizer_json));
  SEEDLING_RETURN_IF_ERROR(
      WriteFileAtomic(JoinPath(out_dir, "tokenizer_config.json"), tokenizer_config.dump(2) + "\n"));
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(out_dir, "config.json"), ModelConfigToJson(config)));
  return CatchTorch("init-model", [&]() -> absl::Status {
    const ModelWeights weights = RandomWeights(config, options.seed);
    return SaveWeights(JoinPath(out_dir, "model.safetensors"), weights, config, options.dtype);
  });
}

}  // namespace seedling::model
