#pragma once

// The pipeline stages of a Hugging Face tokenizer.json around the model: normalizers,
// pre-tokenizers, post-processors and decoders, and their JSON parsers. Semantics follow Hugging
// Face `tokenizers` (the Rust library) so that ids match what `transformers` produces; offsets are
// not tracked (nothing here needs them).

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace seedling::model::internal {

// A piece of text on its way through normalization and pre-tokenization.
struct Piece {
  std::string text;
  // The piece starts at offset 0 of the text given to Encode. Metaspace's prepend_scheme "first"
  // needs it.
  bool at_origin = false;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // Rewrites valid UTF-8 `text` in place (it stays valid UTF-8).
  virtual absl::Status Normalize(std::string* text) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits (and may rewrite) every piece; no empty piece is left.
  virtual absl::Status PreTokenize(std::vector<Piece>* pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Hugging Face's decode_chain: token strings in, strings out; the decoded text is their
  // concatenation. Strings may hold bytes that are not valid UTF-8 (byte tokens that split a
  // character), and stay so.
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens around a single sequence (called only when add_special_tokens is set).
  virtual void Process(std::vector<int32_t>* ids) const = 0;
  // The single token this processor puts before / after the sequence, if it puts exactly one id
  // there.
  virtual std::optional<int32_t> bos_id() const { return std::nullopt; }
  virtual std::optional<int32_t> eos_id() const { return std::nullopt; }
};

// Parsers. `path` names the value in the document ("pre_tokenizer.pretokenizers[1]") for error
// messages. A JSON null yields nullptr (no stage). InvalidArgument naming the path for a malformed
// value or an unsupported type (the message lists the supported ones).
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& j, const std::string& path);
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& j, const std::string& path);
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& j, const std::string& path);
absl::StatusOr<std::unique_ptr<PostProcessor>> ParsePostProcessor(const nlohmann::json& j, const std::string& path);

// JSON field access with errors that name the field ("model.byte_fallback must be a boolean, got
// string"). "Or" variants return `fallback` when the field is absent or null.
namespace json_util {
std::string TypeName(const nlohmann::json& j);
absl::StatusOr<std::string> RequireString(const nlohmann::json& obj, const char* key, const std::string& path);
absl::StatusOr<std::string> StringOr(const nlohmann::json& obj, const char* key, const std::string& path,
                                     std::string fallback);
absl::StatusOr<std::optional<std::string>> OptionalString(const nlohmann::json& obj, const char* key,
                                                          const std::string& path);
absl::StatusOr<bool> BoolOr(const nlohmann::json& obj, const char* key, const std::string& path, bool fallback);
absl::StatusOr<int64_t> IntOr(const nlohmann::json& obj, const char* key, const std::string& path, int64_t fallback);
}  // namespace json_util

}  // namespace seedling::model::internal
