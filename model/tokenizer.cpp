#include "model/tokenizer.h"

#include <nlohmann/json.hpp>
#include <utility>

#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/gguf_model.h"
#include "model/internal/bpe_trainer.h"
#include "model/internal/sentencepiece_tokenizer.h"
#include "model/internal/tokenizer_json.h"
#include "model/internal/tokenizer_vocabulary.h"

namespace seedling::model {
namespace {

// What tokenizer_config.json says (transformers' tokenizer settings); every field is optional.
struct TokenizerConfig {
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
};

// bos_token / eos_token: a string, an AddedToken object {"content": ...}, or null.
absl::StatusOr<std::optional<std::string>> TokenName(const nlohmann::json& doc, const char* key,
                                                     const std::string& path) {
  auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return std::optional<std::string>(content->get<std::string>());
    }
  }
  return absl::InvalidArgumentError(
      StrCat(path, ": ", key, " must be a string or an object with a string \"content\", got ", it->dump()));
}

absl::StatusOr<std::optional<bool>> OptionalBool(const nlohmann::json& doc, const char* key, const std::string& path) {
  auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) return std::optional<bool>();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(StrCat(path, ": ", key, " must be a boolean, got ", it->dump()));
  }
  return std::optional<bool>(it->get<bool>());
}

absl::StatusOr<TokenizerConfig> ReadTokenizerConfig(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  SEEDLING_ASSIGN_OR_RETURN(const nlohmann::json doc, ParseJson(text, path));
  if (!doc.is_object()) {
    return absl::InvalidArgumentError(StrCat(path, ": the document must be a JSON object"));
  }
  TokenizerConfig config;
  SEEDLING_ASSIGN_OR_RETURN(config.add_bos_token, OptionalBool(doc, "add_bos_token", path));
  SEEDLING_ASSIGN_OR_RETURN(config.add_eos_token, OptionalBool(doc, "add_eos_token", path));
  SEEDLING_ASSIGN_OR_RETURN(config.bos_token, TokenName(doc, "bos_token", path));
  SEEDLING_ASSIGN_OR_RETURN(config.eos_token, TokenName(doc, "eos_token", path));
  return config;
}

// Forwards everything to the wrapped tokenizer except the BOS / EOS ids, which
// tokenizer_config.json supplied because the tokenizer itself does not define them.
class WithSpecialIds final : public Tokenizer {
 public:
  WithSpecialIds(std::unique_ptr<Tokenizer> inner, std::optional<int32_t> bos, std::optional<int32_t> eos)
      : inner_(std::move(inner)), bos_(bos), eos_(eos) {}
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens) const override {
    return inner_->Encode(text, add_special_tokens);
  }
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    return inner_->Decode(ids, skip_special_tokens);
  }
  int32_t vocab_size() const override { return inner_->vocab_size(); }
  std::optional<int32_t> TokenToId(std::string_view token) const override { return inner_->TokenToId(token); }
  std::optional<std::string> IdToToken(int32_t id) const override { return inner_->IdToToken(id); }
  bool IsSpecial(int32_t id) const override { return inner_->IsSpecial(id); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }
  absl::StatusOr<TokenizerVocabulary> Vocabulary() const override {
    SEEDLING_ASSIGN_OR_RETURN(TokenizerVocabulary vocab, inner_->Vocabulary());
    // Only the ids come from tokenizer_config.json; whether they are added is still the inner
    // tokenizer's.
    vocab.bos_id = bos_;
    vocab.eos_id = eos_;
    return vocab;
  }

 private:
  const std::unique_ptr<Tokenizer> inner_;
  const std::optional<int32_t> bos_;
  const std::optional<int32_t> eos_;
};

// Fills in BOS / EOS from the config where the tokenizer defines none.
absl::StatusOr<std::unique_ptr<Tokenizer>> ApplyConfigIds(std::unique_ptr<Tokenizer> tokenizer,
                                                          const TokenizerConfig& config,
                                                          const std::string& config_path) {
  auto resolve = [&](const std::optional<int32_t>& own, const std::optional<std::string>& name,
                     const char* key) -> absl::StatusOr<std::optional<int32_t>> {
    if (own.has_value() || !name.has_value()) return own;
    std::optional<int32_t> id = tokenizer->TokenToId(*name);
    if (!id.has_value()) {
      return absl::InvalidArgumentError(
          StrCat(config_path, ": ", key, " '", *name, "' is not in the tokenizer's vocabulary"));
    }
    return id;
  };
  SEEDLING_ASSIGN_OR_RETURN(std::optional<int32_t> bos, resolve(tokenizer->bos_id(), config.bos_token, "bos_token"));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<int32_t> eos, resolve(tokenizer->eos_id(), config.eos_token, "eos_token"));
  if (bos == tokenizer->bos_id() && eos == tokenizer->eos_id()) return tokenizer;
  return std::make_unique<WithSpecialIds>(std::move(tokenizer), bos, eos);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir) {
  if (IsGgufPath(model_dir)) {
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_dir));
    return TokenizerFromGguf(*file);
  }
  const std::string json_path = JoinPath(model_dir, "tokenizer.json");
  const std::string sp_path = JoinPath(model_dir, "tokenizer.model");
  const std::string config_path = JoinPath(model_dir, "tokenizer_config.json");
  TokenizerConfig config;
  if (FileExists(config_path)) {
    SEEDLING_ASSIGN_OR_RETURN(config, ReadTokenizerConfig(config_path));
  }

  std::unique_ptr<Tokenizer> tokenizer;
  if (FileExists(json_path)) {
    // The post-processor in tokenizer.json already says whether BOS / EOS are added, so
    // add_bos_token and add_eos_token are not consulted here.
    SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(json_path));
    SEEDLING_ASSIGN_OR_RETURN(tokenizer, internal::ParseTokenizerJson(text, json_path));
  } else if (FileExists(sp_path)) {
    SEEDLING_ASSIGN_OR_RETURN(tokenizer, internal::LoadSentencePiece(sp_path, config.add_bos_token.value_or(true),
                                                                     config.add_eos_token.value_or(false)));
  } else {
    return absl::NotFoundError(StrCat(model_dir, ": neither tokenizer.json nor tokenizer.model exists"));
  }
  return ApplyConfigIds(std::move(tokenizer), config, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json) {
  return internal::ParseTokenizerJson(json, "tokenizer.json");
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path, bool add_bos,
                                                                      bool add_eos) {
  return internal::LoadSentencePiece(path, add_bos, add_eos);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromVocabulary(const TokenizerVocabulary& vocab,
                                                                   const VocabularyTokenizerOptions& options) {
  absl::StatusOr<nlohmann::json> doc = internal::TokenizerJsonFromVocabulary(vocab, options.add_space_prefix);
  if (!doc.ok()) return Annotate(doc.status(), options.source);
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                            internal::ParseTokenizerJsonDocument(*doc, options.source));
  // The post-processor defines BOS / EOS only when it adds them.
  if (tokenizer->bos_id() == vocab.bos_id && tokenizer->eos_id() == vocab.eos_id) return tokenizer;
  return std::make_unique<WithSpecialIds>(std::move(tokenizer), vocab.bos_id, vocab.eos_id);
}

absl::StatusOr<std::string> TrainByteLevelBpeTokenizerJson(std::string_view corpus, const BpeTrainerOptions& options) {
  return internal::TrainByteLevelBpe(corpus, options);
}

absl::StatusOr<std::string> TrainSentencePieceBpeTokenizerJson(std::string_view corpus,
                                                               const SentencePieceTrainerOptions& options) {
  return internal::TrainSentencePieceBpe(corpus, options);
}

}  // namespace seedling::model
