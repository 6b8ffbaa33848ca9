#include "model/internal/tokenizer_json.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/internal/bpe.h"
#include "model/internal/tokenizer_components.h"
#include "model/internal/unicode.h"

namespace seedling::model::internal {
namespace {

using nlohmann::json;

// An entry of "added_tokens".
struct AddedToken {
  int32_t id;
  std::string content;
  bool single_word;
  bool lstrip;
  bool rstrip;
  bool normalized;  // matched in the normalized text rather than the raw text
  bool special;     // dropped by Decode(skip_special_tokens)
};

// A stretch of text between added tokens, or one added token.
struct Segment {
  size_t begin, end;
  int32_t id;  // -1 for text
};

// Finds added tokens in text: leftmost match first, longest among those starting there, no overlaps
// (the Aho-Corasick LeftmostLongest semantics Hugging Face uses), then applies each token's
// single_word, lstrip and rstrip options.
class AddedTokenMatcher {
 public:
  // `tokens` must outlive the matcher.
  explicit AddedTokenMatcher(const std::vector<AddedToken>* tokens) : tokens_(tokens) {
    nodes_.push_back(-1);
    first_byte_.fill(false);
  }

  void Add(std::string_view pattern, int32_t token_index) {
    if (pattern.empty()) return;
    first_byte_[static_cast<unsigned char>(pattern[0])] = true;
    int32_t node = 0;
    for (char c : pattern) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(c);
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        it = edges_.emplace(key, static_cast<int32_t>(nodes_.size())).first;
        nodes_.push_back(-1);
      }
      node = it->second;
    }
    if (nodes_[node] < 0) {
      nodes_[node] = token_index;  // first definition of a duplicate content wins
      empty_ = false;
    }
  }

  bool empty() const { return empty_; }

  // Splits `text` (valid UTF-8) into text segments and added-token segments, covering it in order.
  std::vector<Segment> Split(std::string_view text) const {
    std::vector<Segment> out;
    if (text.empty()) return out;
    size_t start_offset = 0;
    size_t pos = 0;
    while (pos < text.size()) {
      int32_t index = -1;
      size_t end = 0;
      if (first_byte_[static_cast<unsigned char>(text[pos])]) LongestAt(text, pos, &index, &end);
      if (index < 0) {
        ++pos;
        continue;
      }
      const AddedToken& token = (*tokens_)[index];
      size_t begin = pos;
      pos = end;  // the scan resumes after this match even if the match is discarded below
      if (token.single_word) {
        // A whole word: no word character (Rust regex \w, as Hugging Face checks) on either side.
        const bool start_ok = begin == 0 || !IsWordChar(LastCharBefore(text, begin));
        size_t p = end;
        const bool stop_ok = end == text.size() || !IsWordChar(NextCodePoint(text, &p));
        if (!start_ok || !stop_ok) continue;
      }
      if (token.lstrip) {
        size_t b = begin;
        while (b > start_offset) {
          size_t s = b - 1;
          while (s > 0 && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
          size_t p = s;
          if (!IsWhitespace(NextCodePoint(text, &p))) break;
          b = s;
        }
        begin = std::max(b, start_offset);
      }
      if (token.rstrip) {
        while (end < text.size()) {
          size_t p = end;
          if (!IsWhitespace(NextCodePoint(text, &p))) break;
          end = p;
        }
        pos = end;
      }
      if (start_offset < begin) out.push_back(Segment{start_offset, begin, -1});
      out.push_back(Segment{begin, end, token.id});
      start_offset = end;
    }
    if (start_offset < text.size()) out.push_back(Segment{start_offset, text.size(), -1});
    return out;
  }

 private:
  static char32_t LastCharBefore(std::string_view text, size_t pos) {
    size_t s = pos - 1;
    while (s > 0 && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
    return NextCodePoint(text, &s);
  }

  void LongestAt(std::string_view text, size_t pos, int32_t* index, size_t* end) const {
    int32_t node = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[i]);
      auto it = edges_.find(key);
      if (it == edges_.end()) return;
      node = it->second;
      if (nodes_[node] >= 0) {
        *index = nodes_[node];
        *end = i + 1;
      }
    }
  }

  const std::vector<AddedToken>* tokens_;
  std::vector<int32_t> nodes_;                   // trie node -> index into *tokens_ of the token ending here
  std::unordered_map<uint64_t, int32_t> edges_;  // (node << 8 | byte) -> child node
  std::array<bool, 256> first_byte_;             // bytes that start some pattern (a cheap skip)
  bool empty_ = true;
};

class JsonTokenizer final : public Tokenizer {
 public:
  // Builds the tokenizer of a parsed tokenizer.json document. nlohmann::json exceptions may escape
  // (the caller converts).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Parse(const nlohmann::json& doc);

  JsonTokenizer(const JsonTokenizer&) = delete;
  JsonTokenizer& operator=(const JsonTokenizer&) = delete;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens) const override {
    SEEDLING_RETURN_IF_ERROR(CheckUtf8(text, "text to encode"));
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    std::vector<Segment> raw_segments;
    if (raw_matcher_.empty()) {
      if (!text.empty()) raw_segments.push_back(Segment{0, text.size(), -1});
    } else {
      raw_segments = raw_matcher_.Split(text);
    }
    for (const Segment& raw : raw_segments) {
      if (raw.id >= 0) {
        ids.push_back(raw.id);
        continue;
      }
      std::string normalized(text.substr(raw.begin, raw.end - raw.begin));
      if (normalizer_ != nullptr) SEEDLING_RETURN_IF_ERROR(normalizer_->Normalize(&normalized));
      std::vector<Segment> segments;
      if (normalized_matcher_.empty()) {
        if (!normalized.empty()) segments.push_back(Segment{0, normalized.size(), -1});
      } else {
        segments = normalized_matcher_.Split(normalized);
      }
      for (const Segment& seg : segments) {
        if (seg.id >= 0) {
          ids.push_back(seg.id);
          continue;
        }
        std::vector<Piece> pieces;
        pieces.push_back(Piece{normalized.substr(seg.begin, seg.end - seg.begin), raw.begin == 0 && seg.begin == 0});
        if (pre_tokenizer_ != nullptr) {
          SEEDLING_RETURN_IF_ERROR(pre_tokenizer_->PreTokenize(&pieces));
        }
        for (const Piece& piece : pieces) model_->Tokenize(piece.text, &ids);
      }
    }
    if (add_special_tokens && post_processor_ != nullptr) post_processor_->Process(&ids);
    return ids;
  }

  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (const int32_t id : ids) {
      if (id < 0 || id >= vocab_size_) {
        return absl::InvalidArgumentError(StrCat("token id ", id, " is out of range [0, ", vocab_size_, ")"));
      }
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        const AddedToken& token = added_[it->second];
        if (!(skip_special_tokens && token.special)) tokens.push_back(token.content);
        continue;
      }
      const std::string* token = model_->IdToToken(id);
      if (token == nullptr) {
        return absl::InvalidArgumentError(StrCat("token id ", id, " has no token"));
      }
      tokens.push_back(*token);
    }
    if (decoder_ == nullptr) {
      // Hugging Face joins undecoded tokens with spaces.
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i > 0) out.push_back(' ');
        out += tokens[i];
      }
      return out;
    }
    decoder_->DecodeChain(&tokens);
    std::string out;
    for (const std::string& t : tokens) out += t;
    return out;
  }

  int32_t vocab_size() const override { return vocab_size_; }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
    return model_->TokenToId(token);
  }

  std::optional<std::string> IdToToken(int32_t id) const override {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      return added_[it->second].content;
    }
    if (const std::string* token = model_->IdToToken(id)) return *token;
    return std::nullopt;
  }

  bool IsSpecial(int32_t id) const override {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && added_[it->second].special;
  }

  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }

  absl::StatusOr<TokenizerVocabulary> Vocabulary() const override;

 private:
  JsonTokenizer() : raw_matcher_(&added_), normalized_matcher_(&added_) {}
  absl::Status ParseAddedTokens(const nlohmann::json& doc);

  // Filled once by Parse, before the tokenizer is handed out; constant afterwards.
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<PostProcessor> post_processor_;
  std::unique_ptr<Decoder> decoder_;
  std::vector<AddedToken> added_;
  std::unordered_map<int32_t, size_t> added_by_id_;  // id -> index into added_
  StringMap<int32_t> added_by_content_;
  AddedTokenMatcher raw_matcher_;         // tokens with normalized == false, matched before normalization
  AddedTokenMatcher normalized_matcher_;  // tokens with normalized == true, matched after it
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  // What Vocabulary() needs beyond the model. Merges are kept as id pairs, not strings: a few bytes
  // each, since tokenizers for 150k-token vocabularies live on phones that never export.
  std::vector<std::pair<int32_t, int32_t>> merge_ids_;  // rank order
  std::optional<int32_t> unk_id_;
  bool byte_fallback_ = false;
  std::string continuing_subword_prefix_;
  TokenizerVocabulary::Kind kind_ = TokenizerVocabulary::Kind::kByteLevelBpe;
  TokenizerVocabulary::PreTokenizer pre_tokenizer_kind_ = TokenizerVocabulary::PreTokenizer::kOther;
  bool space_prefix_ = false;  // a "▁" is prepended to the text (TokenizerVocabulary::add_space_prefix)
};

constexpr int64_t kMaxId = 1 << 24;

// The BPE model with what the tokenizer keeps for Vocabulary().
struct ParsedModel {
  std::unique_ptr<BpeModel> model;
  std::vector<std::pair<std::string, std::string>> merges;  // rank order
  BpeOptions options;
};

absl::StatusOr<ParsedModel> ParseModel(const json& m) {
  if (!m.is_object()) {
    return absl::InvalidArgumentError(StrCat("model must be an object, got ", json_util::TypeName(m)));
  }
  std::string type;
  if (auto t = m.find("type"); t != m.end() && !t->is_null()) {
    if (!t->is_string()) return absl::InvalidArgumentError("model.type must be a string");
    type = t->get<std::string>();
  } else if (m.contains("merges")) {
    type = "BPE";  // old files leave the type out; Hugging Face infers it from the fields
  } else {
    return absl::InvalidArgumentError("model.type is missing");
  }
  if (type != "BPE") {
    return absl::InvalidArgumentError(StrCat("model type '", type, "' is not supported (supported: BPE)"));
  }
  if (auto d = m.find("dropout"); d != m.end() && !d->is_null()) {
    if (!d->is_number()) {
      return absl::InvalidArgumentError("model.dropout must be null or a number");
    }
    if (d->get<double>() != 0.0) {
      return absl::InvalidArgumentError(StrCat("model.dropout is ", d->get<double>(),
                                               "; only null or 0 is supported (encoding must be deterministic)"));
    }
  }
  BpeOptions options;
  SEEDLING_ASSIGN_OR_RETURN(options.unk_token, json_util::OptionalString(m, "unk_token", "model"));
  SEEDLING_ASSIGN_OR_RETURN(options.fuse_unk, json_util::BoolOr(m, "fuse_unk", "model", false));
  SEEDLING_ASSIGN_OR_RETURN(options.byte_fallback, json_util::BoolOr(m, "byte_fallback", "model", false));
  SEEDLING_ASSIGN_OR_RETURN(options.ignore_merges, json_util::BoolOr(m, "ignore_merges", "model", false));
  SEEDLING_ASSIGN_OR_RETURN(options.continuing_subword_prefix,
                            json_util::StringOr(m, "continuing_subword_prefix", "model", ""));
  SEEDLING_ASSIGN_OR_RETURN(options.end_of_word_suffix, json_util::StringOr(m, "end_of_word_suffix", "model", ""));

  auto v = m.find("vocab");
  if (v == m.end() || !v->is_object()) {
    return absl::InvalidArgumentError("model.vocab must be an object mapping tokens to ids");
  }
  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(v->size());
  for (auto it = v->begin(); it != v->end(); ++it) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > kMaxId) {
      return absl::InvalidArgumentError(
          StrCat("model.vocab['", it.key(), "'] must be an id in [0, ", kMaxId, "], got ", it->dump()));
    }
    vocab.emplace_back(it.key(), static_cast<int32_t>(it->get<int64_t>()));
  }

  std::vector<std::pair<std::string, std::string>> merges;
  if (auto ms = m.find("merges"); ms != m.end() && !ms->is_null()) {
    if (!ms->is_array()) return absl::InvalidArgumentError("model.merges must be an array");
    merges.reserve(ms->size());
    for (size_t i = 0; i < ms->size(); ++i) {
      const json& e = (*ms)[i];
      if (e.is_string()) {
        // The older format: "a b", the two tokens separated by exactly one space.
        const std::string& s = e.get_ref<const std::string&>();
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          return absl::InvalidArgumentError(
              StrCat("model.merges[", i, "] must be two tokens separated by one space, got '", s, "'"));
        }
        merges.emplace_back(s.substr(0, space), s.substr(space + 1));
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
      } else {
        return absl::InvalidArgumentError(
            StrCat("model.merges[", i, "] must be \"a b\" or [\"a\", \"b\"], got ", e.dump()));
      }
    }
  }
  auto model = BpeModel::Create(std::move(vocab), merges, options);
  if (!model.ok()) return Annotate(model.status(), "model");
  return ParsedModel{*std::move(model), std::move(merges), std::move(options)};
}

// ---- Vocabulary export -------------------------------------------------------------------

bool IsType(const json& j, std::string_view type) {
  if (!j.is_object()) return false;
  auto t = j.find("type");
  return t != j.end() && t->is_string() && t->get_ref<const std::string&>() == type;
}

bool BoolField(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// The stages of a pre-tokenizer or decoder with Sequences flattened (`list_key` names a Sequence's
// children: "pretokenizers" or "decoders"). Null and malformed values contribute nothing: the
// parsers already validated the document.
void FlattenStages(const json& j, const char* list_key, std::vector<const json*>* out) {
  if (!j.is_object()) return;
  if (IsType(j, "Sequence")) {
    auto children = j.find(list_key);
    if (children == j.end() || !children->is_array()) return;
    for (const json& child : *children) FlattenStages(child, list_key, out);
    return;
  }
  out->push_back(&j);
}

// Recognizes the pre-tokenizers llama.cpp implements by name. Anything not exactly one of them is
// kOther: a near miss (say, add_prefix_space=true) would tokenize differently there.
TokenizerVocabulary::PreTokenizer ClassifyPreTokenizer(const json& pre) {
  using Pre = TokenizerVocabulary::PreTokenizer;
  std::vector<const json*> stages;
  FlattenStages(pre, "pretokenizers", &stages);
  auto gpt2_byte_level = [](const json& j, bool use_regex) {
    return IsType(j, "ByteLevel") && !BoolField(j, "add_prefix_space", true) &&
           BoolField(j, "use_regex", true) == use_regex;
  };
  if (stages.size() == 1 && gpt2_byte_level(*stages[0], true)) return Pre::kGpt2;
  if (stages.size() != 2) return Pre::kOther;
  const json& first = *stages[0];
  const json& second = *stages[1];
  if (IsType(first, "Digits") && BoolField(first, "individual_digits", false) && gpt2_byte_level(second, true)) {
    return Pre::kGpt2Digits;
  }
  if (!IsType(first, "Split") || !gpt2_byte_level(second, false) || BoolField(first, "invert", false)) {
    return Pre::kOther;
  }
  auto behavior = first.find("behavior");
  if (behavior == first.end() || !behavior->is_string() || behavior->get<std::string>() != "Isolated") {
    return Pre::kOther;
  }
  auto pattern = first.find("pattern");
  if (pattern == first.end() || !pattern->is_object()) return Pre::kOther;
  auto regex = pattern->find("Regex");
  if (regex == pattern->end() || !regex->is_string()) return Pre::kOther;
  const std::string& r = regex->get_ref<const std::string&>();
  if (r == kLlama3SplitRegex) return Pre::kLlama3;
  if (r == kQwen2SplitRegex) return Pre::kQwen2;
  return Pre::kOther;
}

// Byte-level when GPT-2's byte alphabet is in play: a ByteLevel pre-tokenizer or decoder.
TokenizerVocabulary::Kind ClassifyKind(const json& pre, const json& decoder) {
  std::vector<const json*> stages;
  FlattenStages(pre, "pretokenizers", &stages);
  FlattenStages(decoder, "decoders", &stages);
  for (const json* stage : stages) {
    if (IsType(*stage, "ByteLevel")) return TokenizerVocabulary::Kind::kByteLevelBpe;
  }
  return TokenizerVocabulary::Kind::kSentencePieceBpe;
}

// Whether the text gets a leading "▁" (SentencePiece's dummy prefix): a Prepend normalizer (Llama 2 as
// converted by Hugging Face) or a Metaspace pre-tokenizer that prepends (older conversions). Gemma has
// neither.
bool PrependsSpace(const json& normalizer, const json& pre) {
  std::vector<const json*> stages;
  FlattenStages(normalizer, "normalizers", &stages);
  for (const json* stage : stages) {
    if (IsType(*stage, "Prepend")) return true;
  }
  stages.clear();
  FlattenStages(pre, "pretokenizers", &stages);
  for (const json* stage : stages) {
    if (!IsType(*stage, "Metaspace")) continue;
    auto scheme = stage->find("prepend_scheme");
    if (scheme != stage->end() && scheme->is_string()) return scheme->get<std::string>() != "never";
    return BoolField(*stage, "add_prefix_space", true);
  }
  return false;
}

// "<0x0A>" and the like: SentencePiece's byte-fallback pieces.
bool IsBytePiece(std::string_view t) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f'); };
  return t.size() == 6 && t.substr(0, 3) == "<0x" && hex(t[3]) && hex(t[4]) && t[5] == '>';
}

absl::StatusOr<TokenizerVocabulary> JsonTokenizer::Vocabulary() const {
  using V = TokenizerVocabulary;
  V v;
  v.kind = kind_;
  v.pre_tokenizer = kind_ == V::Kind::kByteLevelBpe ? pre_tokenizer_kind_ : V::PreTokenizer::kOther;
  v.add_space_prefix = kind_ == V::Kind::kSentencePieceBpe && space_prefix_;
  v.tokens.resize(vocab_size_);
  v.scores.assign(vocab_size_, 0.0f);
  v.types.assign(vocab_size_, V::kUnused);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    if (const std::string* token = model_->IdToToken(id)) {
      v.tokens[id] = *token;
      v.types[id] = byte_fallback_ && IsBytePiece(*token) ? V::kByte : V::kNormal;
    }
  }
  // Added tokens override the model's entry for their id (the same precedence as IdToToken).
  for (const AddedToken& token : added_) {
    v.tokens[token.id] = token.content;
    v.types[token.id] = token.special ? V::kControl : V::kUserDefined;
  }
  if (unk_id_.has_value()) v.types[*unk_id_] = V::kUnknown;

  v.merges.reserve(merge_ids_.size());
  for (size_t rank = 0; rank < merge_ids_.size(); ++rank) {
    const auto [a, b] = merge_ids_[rank];
    const std::string* left = model_->IdToToken(a);
    const std::string* right = model_->IdToToken(b);
    if (left == nullptr || right == nullptr) {
      return absl::InternalError(StrCat("merge ", rank, " names an id without a token"));
    }
    v.merges.emplace_back(*left, *right);
    // The token the merge produces; BPE strips the continuing-subword prefix of the right part.
    std::string_view tail = *right;
    if (!continuing_subword_prefix_.empty() && tail.starts_with(continuing_subword_prefix_)) {
      tail.remove_prefix(continuing_subword_prefix_.size());
    }
    const std::optional<int32_t> result = model_->TokenToId(StrCat(*left, tail));
    if (result.has_value() && v.scores[*result] == 0.0f) {
      v.scores[*result] = -static_cast<float>(rank);
    }
  }
  v.bos_id = bos_id_;
  v.eos_id = eos_id_;
  v.unk_id = unk_id_;
  if (post_processor_ != nullptr) {
    v.add_bos = post_processor_->bos_id().has_value();
    v.add_eos = post_processor_->eos_id().has_value();
  }
  return v;
}

absl::Status JsonTokenizer::ParseAddedTokens(const json& doc) {
  auto a = doc.find("added_tokens");
  if (a == doc.end() || a->is_null()) return absl::OkStatus();
  if (!a->is_array()) return absl::InvalidArgumentError("added_tokens must be an array");
  for (size_t i = 0; i < a->size(); ++i) {
    const json& e = (*a)[i];
    const std::string path = StrCat("added_tokens[", i, "]");
    if (!e.is_object()) return absl::InvalidArgumentError(StrCat(path, " must be an object"));
    AddedToken token;
    SEEDLING_ASSIGN_OR_RETURN(int64_t id, json_util::IntOr(e, "id", path, -1));
    if (id < 0 || id > kMaxId) {
      return absl::InvalidArgumentError(StrCat(path, ".id must be an id in [0, ", kMaxId, "]"));
    }
    token.id = static_cast<int32_t>(id);
    SEEDLING_ASSIGN_OR_RETURN(token.content, json_util::RequireString(e, "content", path));
    if (token.content.empty()) return absl::InvalidArgumentError(StrCat(path, ".content is empty"));
    SEEDLING_ASSIGN_OR_RETURN(token.single_word, json_util::BoolOr(e, "single_word", path, false));
    SEEDLING_ASSIGN_OR_RETURN(token.lstrip, json_util::BoolOr(e, "lstrip", path, false));
    SEEDLING_ASSIGN_OR_RETURN(token.rstrip, json_util::BoolOr(e, "rstrip", path, false));
    SEEDLING_ASSIGN_OR_RETURN(token.special, json_util::BoolOr(e, "special", path, false));
    SEEDLING_ASSIGN_OR_RETURN(token.normalized, json_util::BoolOr(e, "normalized", path, !token.special));
    added_by_id_[token.id] = added_.size();
    added_by_content_.try_emplace(token.content, token.id);
    added_.push_back(std::move(token));
  }
  // The matchers point into added_, which no longer changes.
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& token = added_[i];
    if (!token.normalized) {
      raw_matcher_.Add(token.content, static_cast<int32_t>(i));
      continue;
    }
    // Normalized tokens are looked for in normalized text, so they are normalized the same way.
    std::string pattern = token.content;
    if (normalizer_ != nullptr) SEEDLING_RETURN_IF_ERROR(normalizer_->Normalize(&pattern));
    normalized_matcher_.Add(pattern, static_cast<int32_t>(i));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> JsonTokenizer::Parse(const json& doc) {
  if (!doc.is_object()) return absl::InvalidArgumentError("the document must be a JSON object");
  std::unique_ptr<JsonTokenizer> t(new JsonTokenizer());
  auto m = doc.find("model");
  if (m == doc.end() || m->is_null()) return absl::InvalidArgumentError("model is missing");
  SEEDLING_ASSIGN_OR_RETURN(ParsedModel parsed, ParseModel(*m));
  t->model_ = std::move(parsed.model);
  t->merge_ids_.reserve(parsed.merges.size());
  for (const auto& [a, b] : parsed.merges) {
    // BpeModel::Create checked that both sides are in the vocabulary.
    t->merge_ids_.emplace_back(t->model_->TokenToId(a).value_or(-1), t->model_->TokenToId(b).value_or(-1));
  }
  if (parsed.options.unk_token.has_value()) {
    t->unk_id_ = t->model_->TokenToId(*parsed.options.unk_token);
  }
  t->byte_fallback_ = parsed.options.byte_fallback;
  t->continuing_subword_prefix_ = parsed.options.continuing_subword_prefix;
  static const json kNull;
  auto field = [&doc](const char* key) -> const json& {
    auto it = doc.find(key);
    return it == doc.end() ? kNull : *it;
  };
  SEEDLING_ASSIGN_OR_RETURN(t->normalizer_, ParseNormalizer(field("normalizer"), "normalizer"));
  SEEDLING_ASSIGN_OR_RETURN(t->pre_tokenizer_, ParsePreTokenizer(field("pre_tokenizer"), "pre_tokenizer"));
  SEEDLING_ASSIGN_OR_RETURN(t->post_processor_, ParsePostProcessor(field("post_processor"), "post_processor"));
  SEEDLING_ASSIGN_OR_RETURN(t->decoder_, ParseDecoder(field("decoder"), "decoder"));
  t->kind_ = ClassifyKind(field("pre_tokenizer"), field("decoder"));
  t->pre_tokenizer_kind_ = ClassifyPreTokenizer(field("pre_tokenizer"));
  t->space_prefix_ = PrependsSpace(field("normalizer"), field("pre_tokenizer"));
  SEEDLING_RETURN_IF_ERROR(t->ParseAddedTokens(doc));

  int32_t max_id = t->model_->max_id();
  for (const AddedToken& token : t->added_) max_id = std::max(max_id, token.id);
  t->vocab_size_ = max_id + 1;
  if (t->post_processor_ != nullptr) {
    t->bos_id_ = t->post_processor_->bos_id();
    t->eos_id_ = t->post_processor_->eos_id();
    for (const auto& id : {t->bos_id_, t->eos_id_}) {
      if (id.has_value() && *id >= t->vocab_size_) {
        return absl::InvalidArgumentError(
            StrCat("post_processor uses special token id ", *id, ", beyond the vocabulary (", t->vocab_size_, " ids)"));
      }
    }
  }
  return t;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json, std::string_view source) {
  auto doc = ParseJson(json, "");
  if (!doc.ok()) return Annotate(doc.status(), source);
  return ParseTokenizerJsonDocument(*doc, source);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJsonDocument(const nlohmann::json& doc,
                                                                      std::string_view source) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> result;
  try {
    result = JsonTokenizer::Parse(doc);
  } catch (const nlohmann::json::exception& e) {
    // The parser checks every type before reading; this only guards against a missed case.
    result = absl::InvalidArgumentError(e.what());
  }
  if (!result.ok()) return Annotate(result.status(), source);
  return result;
}

}  // namespace seedling::model::internal
