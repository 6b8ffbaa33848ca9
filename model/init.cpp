#include "model/init.h"

#include <nlohmann/json.hpp>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/config.h"
#include "model/families/family.h"
#include "model/tokenizer.h"
#include "model/torch_status.h"
#include "model/weights.h"

namespace seedling::model {
namespace {

// A trained tokenizer.json with its special ids and the tokenizer_config.json entries that name them.
struct InitTokenizer {
  std::string json;
  int64_t bos_id, eos_id;
  nlohmann::json config;
};

// Byte-level BPE, SmolLM2's special tokens at ids 0..2 (<|endoftext|>, <|im_start|>, <|im_end|>);
// <|endoftext|> serves as BOS and EOS, and nothing is added to the text.
absl::StatusOr<InitTokenizer> ByteLevelStyle(std::string_view corpus, int32_t vocab) {
  BpeTrainerOptions options;
  options.vocab_size = vocab;
  SEEDLING_ASSIGN_OR_RETURN(std::string json, TrainByteLevelBpeTokenizerJson(corpus, options));
  return InitTokenizer{std::move(json), 0, 0,
                       nlohmann::json{{"bos_token", "<|endoftext|>"},
                                      {"eos_token", "<|endoftext|>"},
                                      {"unk_token", "<|endoftext|>"},
                                      {"add_bos_token", false},
                                      {"add_eos_token", false},
                                      {"tokenizer_class", "GPT2Tokenizer"}}};
}

// SentencePiece-style BPE with Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2, <unk> 3); BOS is prepended.
absl::StatusOr<InitTokenizer> GemmaStyle(std::string_view corpus, int32_t vocab) {
  SentencePieceTrainerOptions options;
  options.vocab_size = vocab;
  SEEDLING_ASSIGN_OR_RETURN(std::string json, TrainSentencePieceBpeTokenizerJson(corpus, options));
  return InitTokenizer{std::move(json), 2, 1,
                       nlohmann::json{{"bos_token", "<bos>"},
                                      {"eos_token", "<eos>"},
                                      {"unk_token", "<unk>"},
                                      {"pad_token", "<pad>"},
                                      {"add_bos_token", true},
                                      {"add_eos_token", false},
                                      {"tokenizer_class", "PreTrainedTokenizerFast"}}};
}

// SentencePiece-style BPE as Phi-3's (Llama 2's with an end-of-text token): <unk> 0, <s> 1, </s> 2,
// <|endoftext|> 3, the EOS as in Phi-3's config (llama.cpp also looks that token up by name for models named
// Phi-3), a "▁" dummy prefix, BOS prepended.
absl::StatusOr<InitTokenizer> Llama2Style(std::string_view corpus, int32_t vocab) {
  SentencePieceTrainerOptions options;
  options.vocab_size = vocab;
  options.special_tokens = {"<unk>", "<s>", "</s>", "<|endoftext|>"};
  options.bos_token = "<s>";
  options.unk_token = "<unk>";
  options.prepend_space = true;
  SEEDLING_ASSIGN_OR_RETURN(std::string json, TrainSentencePieceBpeTokenizerJson(corpus, options));
  return InitTokenizer{std::move(json), 1, 3,
                       nlohmann::json{{"bos_token", "<s>"},
                                      {"eos_token", "<|endoftext|>"},
                                      {"unk_token", "<unk>"},
                                      {"add_bos_token", true},
                                      {"add_eos_token", false},
                                      {"tokenizer_class", "LlamaTokenizerFast"}}};
}

absl::StatusOr<InitTokenizer> TrainInitTokenizer(families::TokenizerStyle style, std::string_view corpus,
                                                 int32_t vocab) {
  switch (style) {
    case families::TokenizerStyle::kSentencePieceBpe:
      return GemmaStyle(corpus, vocab);
    case families::TokenizerStyle::kSentencePieceBpeWithPrefix:
      return Llama2Style(corpus, vocab);
    case families::TokenizerStyle::kByteLevelBpe:
      break;
  }
  return ByteLevelStyle(corpus, vocab);
}

}  // namespace

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

  const int32_t vocab = options.tokenizer_vocab > 0 ? options.tokenizer_vocab
                                                    : static_cast<int32_t>(std::min<int64_t>(config.vocab_size, 4096));
  if (vocab > config.vocab_size) {
    return absl::InvalidArgumentError(
        StrCat("tokenizer vocabulary ", vocab, " exceeds the model's vocab_size ", config.vocab_size));
  }
  const std::string_view corpus =
      options.tokenizer_corpus.empty() ? BundledSampleCorpus() : std::string_view(options.tokenizer_corpus);
  const families::FamilySpec* family = families::FamilyOfArchitecture(config.architecture);
  const families::TokenizerStyle style =
      family != nullptr ? family->init_tokenizer : families::TokenizerStyle::kByteLevelBpe;
  SEEDLING_ASSIGN_OR_RETURN(const InitTokenizer tokenizer, TrainInitTokenizer(style, corpus, vocab));
  config.bos_token_id = tokenizer.bos_id;
  config.eos_token_ids = {tokenizer.eos_id};
  config.torch_dtype = options.dtype == DType::kF32 ? "float32" : options.dtype == DType::kF16 ? "float16" : "bfloat16";
  nlohmann::json tokenizer_config = tokenizer.config;
  tokenizer_config["model_max_length"] = config.max_position_embeddings;
  tokenizer_config["clean_up_tokenization_spaces"] = false;

  // Weights last: the model is complete only once model.safetensors exists.
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(out_dir, "tokenizer.json"), tokenizer.json));
  SEEDLING_RETURN_IF_ERROR(
      WriteFileAtomic(JoinPath(out_dir, "tokenizer_config.json"), tokenizer_config.dump(2) + "\n"));
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(out_dir, "config.json"), ModelConfigToJson(config)));
  return CatchTorch("init-model", [&]() -> absl::Status {
    const ModelWeights weights = RandomWeights(config, options.seed);
    return SaveWeights(JoinPath(out_dir, "model.safetensors"), weights, config, options.dtype);
  });
}

}  // namespace seedling::model
