#include "model/init.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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

// A SentencePiece-style tokenizer's special tokens (lowest ids, in this order), which of them are BOS, EOS and
// unknown (and padding, if any), its dummy prefix and the class tokenizer_config.json names.
struct SentencePieceStyle {
  std::vector<std::string> specials;
  std::string bos, eos, unk, pad;  // pad: empty for none
  bool prepend_space;
  const char* tokenizer_class;
};

// Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3, no dummy prefix.
const SentencePieceStyle& GemmaStyle() {
  static const SentencePieceStyle kStyle{
      {"<pad>", "<eos>", "<bos>", "<unk>"}, "<bos>", "<eos>", "<unk>", "<pad>", false, "PreTrainedTokenizerFast"};
  return kStyle;
}

// Phi-3's (Llama 2's with an end-of-text token): <unk> 0, <s> 1, </s> 2, <|endoftext|> 3, which is the EOS as in
// Phi-3's config (llama.cpp also looks that token up by name for models named Phi-3), a "▁" dummy prefix.
const SentencePieceStyle& Phi3Style() {
  static const SentencePieceStyle kStyle{
      {"<unk>", "<s>", "</s>", "<|endoftext|>"}, "<s>", "<|endoftext|>", "<unk>", "", true, "LlamaTokenizerFast"};
  return kStyle;
}

// SentencePiece-style BPE in `style`; BOS is prepended. The special ids are the tokens' places in the list.
absl::StatusOr<InitTokenizer> TrainSentencePieceStyle(const SentencePieceStyle& style, std::string_view corpus,
                                                      int32_t vocab) {
  SentencePieceTrainerOptions options;
  options.vocab_size = vocab;
  options.special_tokens = style.specials;
  options.bos_token = style.bos;
  options.unk_token = style.unk;
  options.prepend_space = style.prepend_space;
  SEEDLING_ASSIGN_OR_RETURN(std::string json, TrainSentencePieceBpeTokenizerJson(corpus, options));
  auto id_of = [&](const std::string& token) {
    return static_cast<int64_t>(std::find(style.specials.begin(), style.specials.end(), token) -
                                style.specials.begin());
  };
  nlohmann::json config = {{"bos_token", style.bos}, {"eos_token", style.eos},
                           {"unk_token", style.unk}, {"add_bos_token", true},
                           {"add_eos_token", false}, {"tokenizer_class", style.tokenizer_class}};
  if (!style.pad.empty()) config["pad_token"] = style.pad;
  return InitTokenizer{std::move(json), id_of(style.bos), id_of(style.eos), std::move(config)};
}

absl::StatusOr<InitTokenizer> TrainInitTokenizer(families::TokenizerStyle style, std::string_view corpus,
                                                 int32_t vocab) {
  switch (style) {
    case families::TokenizerStyle::kSentencePieceBpe:
      return TrainSentencePieceStyle(GemmaStyle(), corpus, vocab);
    case families::TokenizerStyle::kSentencePieceBpeWithPrefix:
      return TrainSentencePieceStyle(Phi3Style(), corpus, vocab);
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
