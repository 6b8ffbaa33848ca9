#include "model/internal/tokenizer_components.h"

#include <algorithm>
#include <utility>

#include "base/status.h"
#include "base/strings.h"
#include "model/internal/unicode.h"

namespace seedling::model::internal {

using nlohmann::json;

// ---- JSON helpers -------------------------------------------------------------------------------

namespace json_util {

std::string TypeName(const json& j) {
  switch (j.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::object:
      return "object";
    case json::value_t::array:
      return "array";
    case json::value_t::string:
      return "string";
    case json::value_t::boolean:
      return "boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "integer";
    case json::value_t::number_float:
      return "number";
    default:
      return "binary";
  }
}

namespace {
const json* FindField(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::Status WrongType(const std::string& path, const char* key, const char* expected, const json& got) {
  return absl::InvalidArgumentError(StrCat(path, ".", key, " must be ", expected, ", got ", TypeName(got)));
}
}  // namespace

absl::StatusOr<std::string> RequireString(const json& obj, const char* key, const std::string& path) {
  const json* v = FindField(obj, key);
  if (v == nullptr) return absl::InvalidArgumentError(StrCat(path, ".", key, " is missing"));
  if (!v->is_string()) return WrongType(path, key, "a string", *v);
  return v->get<std::string>();
}

absl::StatusOr<std::string> StringOr(const json& obj, const char* key, const std::string& path, std::string fallback) {
  const json* v = FindField(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_string()) return WrongType(path, key, "a string", *v);
  return v->get<std::string>();
}

absl::StatusOr<std::optional<std::string>> OptionalString(const json& obj, const char* key, const std::string& path) {
  const json* v = FindField(obj, key);
  if (v == nullptr) return std::optional<std::string>();
  if (!v->is_string()) return WrongType(path, key, "a string", *v);
  return std::optional<std::string>(v->get<std::string>());
}

absl::StatusOr<bool> BoolOr(const json& obj, const char* key, const std::string& path, bool fallback) {
  const json* v = FindField(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return WrongType(path, key, "a boolean", *v);
  return v->get<bool>();
}

absl::StatusOr<int64_t> IntOr(const json& obj, const char* key, const std::string& path, int64_t fallback) {
  const json* v = FindField(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer()) return WrongType(path, key, "an integer", *v);
  return v->get<int64_t>();
}

}  // namespace json_util

namespace {

using json_util::BoolOr;
using json_util::IntOr;
using json_util::RequireString;
using json_util::StringOr;

// The "type" of a component object, or an error if `j` is not an object with a string "type".
absl::StatusOr<std::string> ComponentType(const json& j, const std::string& path) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(StrCat(path, " must be an object or null, got ", json_util::TypeName(j)));
  }
  return RequireString(j, "type", path);
}

absl::Status Unsupported(const std::string& path, const std::string& type, std::string_view supported) {
  return absl::InvalidArgumentError(StrCat(path, " type '", type, "' is not supported (supported: ", supported, ")"));
}

// A child array of a Sequence component.
absl::StatusOr<const json*> ChildArray(const json& j, const char* key, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) {
    return absl::InvalidArgumentError(StrCat(path, ".", key, " must be an array"));
  }
  return &*it;
}

// A single character given as a one-character string (Metaspace replacement, Strip content).
absl::StatusOr<char32_t> SingleChar(const json& j, const char* key, const std::string& path, std::string fallback) {
  SEEDLING_ASSIGN_OR_RETURN(std::string s, StringOr(j, key, path, std::move(fallback)));
  size_t pos = 0;
  if (s.empty() || !IsValidUtf8(s) || (NextCodePoint(s, &pos), pos != s.size())) {
    return absl::InvalidArgumentError(StrCat(path, ".", key, " must be exactly one character, got '", s, "'"));
  }
  pos = 0;
  return NextCodePoint(s, &pos);
}

// ---- Patterns and splitting ---------------------------------------------------------------------

using Matches = std::vector<std::pair<size_t, size_t>>;

// A Split / Replace pattern: {"String": "..."} (literal) or {"Regex": "..."} (PCRE2, Unicode mode).
class Pattern {
 public:
  static absl::StatusOr<Pattern> Parse(const json& obj, const std::string& path) {
    const std::string field = StrCat(path, ".pattern");
    auto it = obj.find("pattern");
    if (it == obj.end() || !it->is_object() || it->size() != 1) {
      return absl::InvalidArgumentError(StrCat(field, " must be {\"String\": ...} or {\"Regex\": ...}"));
    }
    Pattern p;
    if (auto s = it->find("String"); s != it->end()) {
      if (!s->is_string() || s->get<std::string>().empty()) {
        return absl::InvalidArgumentError(StrCat(field, ".String must be a non-empty string"));
      }
      p.literal_ = s->get<std::string>();
      return p;
    }
    if (auto r = it->find("Regex"); r != it->end()) {
      if (!r->is_string()) {
        return absl::InvalidArgumentError(StrCat(field, ".Regex must be a string"));
      }
      auto regex = Regex::Compile(r->get<std::string>());
      if (!regex.ok()) return Annotate(regex.status(), field);
      p.regex_.emplace(*std::move(regex));
      return p;
    }
    return absl::InvalidArgumentError(
        StrCat(field, " kind '", it->begin().key(), "' is not supported (supported: String, Regex)"));
  }

  absl::Status FindAll(std::string_view text, Matches* matches) const {
    if (regex_.has_value()) return regex_->FindAll(text, matches);
    for (size_t pos = text.find(literal_); pos != std::string_view::npos;
         pos = text.find(literal_, pos + literal_.size())) {
      matches->emplace_back(pos, pos + literal_.size());
    }
    return absl::OkStatus();
  }

 private:
  Pattern() = default;
  std::string literal_;
  std::optional<Regex> regex_;
};

absl::Status ReplaceAll(const Pattern& pattern, std::string_view content, std::string* text) {
  Matches matches;
  SEEDLING_RETURN_IF_ERROR(pattern.FindAll(*text, &matches));
  if (matches.empty()) return absl::OkStatus();
  std::string out;
  out.reserve(text->size());
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    out.append(*text, prev, b - prev);
    out.append(content);
    prev = e;
  }
  out.append(*text, prev, std::string::npos);
  *text = std::move(out);
  return absl::OkStatus();
}

// Every character satisfying `pred`, each as its own match (Hugging Face's char patterns).
template <typename Pred>
Matches CharMatches(std::string_view text, Pred pred) {
  Matches matches;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    if (pred(NextCodePoint(text, &pos))) matches.emplace_back(start, pos);
  }
  return matches;
}

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

absl::StatusOr<SplitBehavior> ParseBehavior(const json& j, const std::string& path, std::string fallback) {
  SEEDLING_ASSIGN_OR_RETURN(std::string name, StringOr(j, "behavior", path, std::move(fallback)));
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return absl::InvalidArgumentError(StrCat(path, ".behavior '", name,
                                           "' is not supported (supported: Removed, Isolated, "
                                           "MergedWithPrevious, MergedWithNext, Contiguous)"));
}

// Splits `piece` around the sorted, non-overlapping `matches` (delimiters) as `behavior` says,
// appending the non-empty parts to `out`. With `invert`, the matches are the content and the gaps
// the delimiters.
void SplitByMatches(const Piece& piece, const Matches& matches, SplitBehavior behavior, bool invert,
                    std::vector<Piece>* out) {
  struct Span {
    size_t begin, end;
    bool is_match;
  };
  const size_t n = piece.text.size();
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (b > prev) spans.push_back({prev, b, invert});
    spans.push_back({b, e, !invert});
    prev = e;
  }
  if (prev < n) spans.push_back({prev, n, invert});

  std::vector<Span> parts;
  parts.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) parts.push_back(s);
      }
      break;
    case SplitBehavior::kIsolated:
      parts = spans;
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !parts.empty()) {
          parts.back().end = s.end;
        } else {
          parts.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !parts.empty()) {
          parts.back().begin = it->begin;
        } else {
          parts.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !parts.empty()) {
          parts.back().end = s.end;
        } else {
          parts.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
  }
  for (const Span& s : parts) {
    if (s.end > s.begin) {
      out->push_back(Piece{piece.text.substr(s.begin, s.end - s.begin), piece.at_origin && s.begin == 0});
    }
  }
}

// Applies `split_one(piece, out)` to every piece.
template <typename F>
absl::Status SplitEach(std::vector<Piece>* pieces, F split_one) {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  for (const Piece& piece : *pieces) SEEDLING_RETURN_IF_ERROR(split_one(piece, &out));
  *pieces = std::move(out);
  return absl::OkStatus();
}

// ---- Normalizers --------------------------------------------------------------------------------

constexpr std::string_view kSupportedNormalizers =
    "Sequence, NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase, Strip, StripAccents";

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> stages) : stages_(std::move(stages)) {}
  absl::Status Normalize(std::string* text) const override {
    for (const auto& s : stages_) SEEDLING_RETURN_IF_ERROR(s->Normalize(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> stages_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalizationForm form) : form_(form) {}
  absl::Status Normalize(std::string* text) const override {
    SEEDLING_ASSIGN_OR_RETURN(*text, NormalizeUnicode(*text, form_));
    return absl::OkStatus();
  }

 private:
  NormalizationForm form_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  absl::Status Normalize(std::string* text) const override {
    if (!text->empty()) text->insert(0, prepend_);  // Hugging Face leaves empty text empty
    return absl::OkStatus();
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string* text) const override { return ReplaceAll(pattern_, content_, text); }

 private:
  Pattern pattern_;
  std::string content_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  absl::Status Normalize(std::string* text) const override {
    *text = ToLowerUnicode(*text);
    return absl::OkStatus();
  }
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Normalize(std::string* text) const override {
    size_t begin = 0, end = text->size();
    if (left_) {
      size_t pos = 0;
      while (pos < end) {
        const size_t start = pos;
        if (!IsWhitespace(NextCodePoint(*text, &pos))) {
          begin = start;
          break;
        }
        begin = pos;
      }
    }
    if (right_) {
      // Walk back over whole characters: find each character's start by skipping continuation
      // bytes.
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>((*text)[start]) & 0xC0) == 0x80) {
          --start;
        }
        size_t pos = start;
        if (!IsWhitespace(NextCodePoint(*text, &pos))) break;
        end = start;
      }
    }
    *text = text->substr(begin, end - begin);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

class StripAccentsNormalizer final : public Normalizer {
 public:
  absl::Status Normalize(std::string* text) const override {
    std::string out;
    out.reserve(text->size());
    size_t pos = 0;
    while (pos < text->size()) {
      const size_t start = pos;
      if (!IsMark(NextCodePoint(*text, &pos))) out.append(*text, start, pos - start);
    }
    *text = std::move(out);
    return absl::OkStatus();
  }
};

// ---- Pre-tokenizers -----------------------------------------------------------------------------

constexpr std::string_view kSupportedPreTokenizers =
    "Sequence, ByteLevel, Split, Digits, Metaspace, Whitespace, WhitespaceSplit, Punctuation, "
    "BertPreTokenizer, "
    "CharDelimiterSplit";

// GPT-2's pre-tokenization regex (contractions, optional space + letters / digits / other,
// whitespace that does not precede a non-space, other whitespace), as Hugging Face's ByteLevel
// pre-tokenizer uses it.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> stages) : stages_(std::move(stages)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    for (const auto& s : stages_) SEEDLING_RETURN_IF_ERROR(s->PreTokenize(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> stages_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitEach(pieces, [this](const Piece& in, std::vector<Piece>* out) -> absl::Status {
      Piece piece = in;
      if (add_prefix_space_ && (piece.text.empty() || piece.text[0] != ' ')) {
        piece.text.insert(piece.text.begin(), ' ');
      }
      const size_t first = out->size();
      if (regex_.has_value()) {
        Matches matches;
        SEEDLING_RETURN_IF_ERROR(regex_->FindAll(piece.text, &matches));
        SplitByMatches(piece, matches, SplitBehavior::kIsolated, false, out);
      } else if (!piece.text.empty()) {
        out->push_back(std::move(piece));
      }
      for (size_t i = first; i < out->size(); ++i) {
        (*out)[i].text = BytesToByteLevel((*out)[i].text);
      }
      return absl::OkStatus();
    });
  }

 private:
  bool add_prefix_space_;
  std::optional<Regex> regex_;  // GPT-2 pattern when use_regex
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitEach(pieces, [this](const Piece& piece, std::vector<Piece>* out) -> absl::Status {
      Matches matches;
      SEEDLING_RETURN_IF_ERROR(pattern_.FindAll(piece.text, &matches));
      SplitByMatches(piece, matches, behavior_, invert_, out);
      return absl::OkStatus();
    });
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

// Splits on characters that satisfy a predicate (Digits, WhitespaceSplit, Punctuation,
// CharDelimiterSplit).
template <typename Pred>
class CharSplitPreTokenizer final : public PreTokenizer {
 public:
  CharSplitPreTokenizer(Pred pred, SplitBehavior behavior) : pred_(std::move(pred)), behavior_(behavior) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitEach(pieces, [this](const Piece& piece, std::vector<Piece>* out) -> absl::Status {
      SplitByMatches(piece, CharMatches(piece.text, pred_), behavior_, false, out);
      return absl::OkStatus();
    });
  }

 private:
  Pred pred_;
  SplitBehavior behavior_;
};

template <typename Pred>
std::unique_ptr<PreTokenizer> MakeCharSplit(Pred pred, SplitBehavior behavior) {
  return std::make_unique<CharSplitPreTokenizer<Pred>>(std::move(pred), behavior);
}

// Keeps only the matches of a regex (Whitespace: \w+|[^\w\s]+).
class RegexKeepPreTokenizer final : public PreTokenizer {
 public:
  explicit RegexKeepPreTokenizer(Regex regex) : regex_(std::move(regex)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitEach(pieces, [this](const Piece& piece, std::vector<Piece>* out) -> absl::Status {
      Matches matches;
      SEEDLING_RETURN_IF_ERROR(regex_.FindAll(piece.text, &matches));
      SplitByMatches(piece, matches, SplitBehavior::kRemoved, true, out);
      return absl::OkStatus();
    });
  }

 private:
  Regex regex_;
};

enum class PrependScheme { kFirst, kAlways, kNever };

// Metaspace's replacement character and prepend scheme, shared by the pre-tokenizer and the
// decoder.
struct MetaspaceConfig {
  char32_t replacement;
  PrependScheme scheme;
  bool split;
};

absl::StatusOr<MetaspaceConfig> ParseMetaspace(const json& j, const std::string& path) {
  MetaspaceConfig c;
  SEEDLING_ASSIGN_OR_RETURN(c.replacement, SingleChar(j, "replacement", path, "\xE2\x96\x81"));
  SEEDLING_ASSIGN_OR_RETURN(c.split, BoolOr(j, "split", path, true));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<std::string> scheme, json_util::OptionalString(j, "prepend_scheme", path));
  if (scheme.has_value()) {
    if (*scheme == "first") {
      c.scheme = PrependScheme::kFirst;
    } else if (*scheme == "always") {
      c.scheme = PrependScheme::kAlways;
    } else if (*scheme == "never") {
      c.scheme = PrependScheme::kNever;
    } else {
      return absl::InvalidArgumentError(
          StrCat(path, ".prepend_scheme '", *scheme, "' is not supported (supported: first, always, never)"));
    }
  } else {
    // Files written before prepend_scheme existed say add_prefix_space.
    SEEDLING_ASSIGN_OR_RETURN(bool add_prefix_space, BoolOr(j, "add_prefix_space", path, true));
    c.scheme = add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
  }
  return c;
}

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  explicit MetaspacePreTokenizer(MetaspaceConfig config) : config_(config), replacement_(Utf8(config.replacement)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitEach(pieces, [this](const Piece& in, std::vector<Piece>* out) -> absl::Status {
      Piece piece{std::string(), in.at_origin};
      piece.text.reserve(in.text.size() + replacement_.size());
      for (char c : in.text) {
        if (c == ' ') {
          piece.text += replacement_;
        } else {
          piece.text.push_back(c);
        }
      }
      const bool starts_with_replacement = piece.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts_with_replacement &&
          (config_.scheme == PrependScheme::kAlways || (config_.scheme == PrependScheme::kFirst && piece.at_origin))) {
        piece.text.insert(0, replacement_);
      }
      if (!config_.split) {
        if (!piece.text.empty()) out->push_back(std::move(piece));
        return absl::OkStatus();
      }
      const char32_t r = config_.replacement;
      SplitByMatches(piece, CharMatches(piece.text, [r](char32_t c) { return c == r; }), SplitBehavior::kMergedWithNext,
                     false, out);
      return absl::OkStatus();
    });
  }

 private:
  MetaspaceConfig config_;
  std::string replacement_;
};

// ---- Decoders -----------------------------------------------------------------------------------

constexpr std::string_view kSupportedDecoders =
    "Sequence, ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, BPEDecoder";

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> stages) : stages_(std::move(stages)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& s : stages_) s->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> stages_;
};

class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string out;
    for (const std::string& token : *tokens) {
      const size_t mark = out.size();
      bool mapped = IsValidUtf8(token);
      size_t pos = 0;
      while (mapped && pos < token.size()) {
        const int b = UnicodeToByte(NextCodePoint(token, &pos));
        if (b < 0) {
          mapped = false;
        } else {
          out.push_back(static_cast<char>(b));
        }
      }
      // A token outside the byte alphabet (an added token such as "<|im_start|>" with a space, say)
      // is taken as it is written.
      if (!mapped) {
        out.resize(mark);
        out += token;
      }
    }
    tokens->assign(1, std::move(out));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  explicit MetaspaceDecoder(MetaspaceConfig config) : config_(config), replacement_(Utf8(config.replacement)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string& token = (*tokens)[i];
      // Hugging Face drops the replacement characters of the first token (the prepended one,
      // normally) unless the scheme is "never"; elsewhere they become spaces.
      const std::string_view with = (i == 0 && config_.scheme != PrependScheme::kNever) ? "" : " ";
      std::string out;
      out.reserve(token.size());
      for (size_t pos = 0; pos < token.size();) {
        if (token.compare(pos, replacement_.size(), replacement_) == 0) {
          out.append(with);
          pos += replacement_.size();
        } else {
          out.push_back(token[pos++]);
        }
      }
      token = std::move(out);
    }
  }

 private:
  MetaspaceConfig config_;
  std::string replacement_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) {
      // Token strings come from the vocabulary (valid UTF-8) unless an earlier stage made raw
      // bytes; the regex engine needs valid UTF-8, so such strings are left alone.
      if (!IsValidUtf8(token)) continue;
      // A regex can only fail on resource limits, impossible for the short strings decoders see;
      // the token stays unchanged in that case.
      (void)ReplaceAll(pattern_, content_, &token);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// "<0x41>" -> 0x41, or -1.
int ParseByteToken(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  int value = 0;
  for (char c : token.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') {
      value |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      value |= c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      value |= c - 'a' + 10;
    } else {
      return -1;
    }
  }
  return value;
}

class ByteFallbackDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    // Runs of "<0xXX>" tokens become their bytes. Hugging Face replaces a run that is not valid
    // UTF-8 by U+FFFD; Seedling keeps the bytes (Tokenizer::Decode returns bytes, and a streaming
    // caller may be holding half a character).
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    bool in_run = false;
    for (std::string& token : *tokens) {
      const int b = ParseByteToken(token);
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
        in_run = true;
        continue;
      }
      if (in_run) {
        out.push_back(std::move(bytes));
        bytes.clear();
        in_run = false;
      }
      out.push_back(std::move(token));
    }
    if (in_run) out.push_back(std::move(bytes));
    *tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string out;
    for (const std::string& t : *tokens) out += t;
    tokens->assign(1, std::move(out));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, int64_t start, int64_t stop) : content_(Utf8(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    const size_t n = content_.size();
    for (std::string& token : *tokens) {
      size_t begin = 0, end = token.size();
      for (int64_t i = 0; i < start_ && end - begin >= n && token.compare(begin, n, content_) == 0; ++i) begin += n;
      for (int64_t i = 0; i < stop_ && end - begin >= n && token.compare(end - n, n, content_) == 0; ++i) end -= n;
      token = token.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;
  int64_t start_, stop_;
};

class BpeSuffixDecoder final : public Decoder {
 public:
  explicit BpeSuffixDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    // The end-of-word suffix becomes a space, except on the last token.
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string& token = (*tokens)[i];
      const std::string_view with = i + 1 == tokens->size() ? "" : " ";
      std::string out;
      for (size_t pos = 0; pos < token.size();) {
        if (!suffix_.empty() && token.compare(pos, suffix_.size(), suffix_) == 0) {
          out.append(with);
          pos += suffix_.size();
        } else {
          out.push_back(token[pos++]);
        }
      }
      token = std::move(out);
    }
  }

 private:
  std::string suffix_;
};

// ---- Post-processors ----------------------------------------------------------------------------

constexpr std::string_view kSupportedPostProcessors =
    "Sequence, TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing";

class SequencePostProcessor final : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> stages) : stages_(std::move(stages)) {}
  void Process(std::vector<int32_t>* ids) const override {
    for (const auto& s : stages_) s->Process(ids);
  }
  std::optional<int32_t> bos_id() const override {
    for (const auto& s : stages_) {
      if (auto id = s->bos_id()) return id;
    }
    return std::nullopt;
  }
  std::optional<int32_t> eos_id() const override {
    for (const auto& s : stages_) {
      if (auto id = s->eos_id()) return id;
    }
    return std::nullopt;
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> stages_;
};

class NoOpPostProcessor final : public PostProcessor {
 public:
  void Process(std::vector<int32_t>*) const override {}
};

// TemplateProcessing's "single" template, and RobertaProcessing / BertProcessing (cls $A sep) as
// templates.
class TemplatePostProcessor final : public PostProcessor {
 public:
  TemplatePostProcessor(std::vector<int32_t> before, std::vector<int32_t> after, std::optional<int32_t> bos,
                        std::optional<int32_t> eos)
      : before_(std::move(before)), after_(std::move(after)), bos_(bos), eos_(eos) {}
  void Process(std::vector<int32_t>* ids) const override {
    ids->insert(ids->begin(), before_.begin(), before_.end());
    ids->insert(ids->end(), after_.begin(), after_.end());
  }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }

 private:
  std::vector<int32_t> before_, after_;  // ids around the sequence
  std::optional<int32_t> bos_, eos_;
};

absl::StatusOr<std::unique_ptr<PostProcessor>> ParseTemplate(const json& j, const std::string& path) {
  auto single = j.find("single");
  if (single == j.end() || !single->is_array()) {
    return absl::InvalidArgumentError(StrCat(path, ".single must be an array"));
  }
  auto specials = j.find("special_tokens");
  if (specials != j.end() && !specials->is_null() && !specials->is_object()) {
    return absl::InvalidArgumentError(StrCat(path, ".special_tokens must be an object"));
  }
  std::vector<int32_t> before, after;
  std::vector<std::vector<int32_t>> before_items, after_items;
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const json& item = (*single)[i];
    const std::string item_path = StrCat(path, ".single[", i, "]");
    if (!item.is_object() || item.size() != 1) {
      return absl::InvalidArgumentError(StrCat(item_path, " must be {\"SpecialToken\": ...} or {\"Sequence\": ...}"));
    }
    const std::string kind = item.begin().key();
    if (kind == "Sequence") {
      // Only "A" exists in a single-sequence template; a stray "B" contributes nothing.
      seen_sequence = true;
      continue;
    }
    if (kind != "SpecialToken") {
      return absl::InvalidArgumentError(
          StrCat(item_path, " kind '", kind, "' is not supported (supported: SpecialToken, Sequence)"));
    }
    SEEDLING_ASSIGN_OR_RETURN(std::string name, RequireString(item.begin().value(), "id", item_path + ".SpecialToken"));
    const json* entry = nullptr;
    if (specials != j.end() && specials->is_object()) {
      auto it = specials->find(name);
      if (it != specials->end()) entry = &*it;
    }
    if (entry == nullptr) {
      return absl::InvalidArgumentError(
          StrCat(item_path, " names special token '", name, "', which is not in ", path, ".special_tokens"));
    }
    auto ids = entry->find("ids");
    if (ids == entry->end() || !ids->is_array()) {
      return absl::InvalidArgumentError(StrCat(path, ".special_tokens['", name, "'].ids must be an array"));
    }
    std::vector<int32_t> item_ids;
    for (const json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        return absl::InvalidArgumentError(
            StrCat(path, ".special_tokens['", name, "'].ids must hold non-negative integers"));
      }
      item_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
    (seen_sequence ? after : before).insert((seen_sequence ? after : before).end(), item_ids.begin(), item_ids.end());
    (seen_sequence ? after_items : before_items).push_back(std::move(item_ids));
  }
  // BOS is the special token right before the sequence, EOS the one right after, when each is one
  // id.
  std::optional<int32_t> bos, eos;
  if (!before_items.empty() && before_items.back().size() == 1) bos = before_items.back()[0];
  if (!after_items.empty() && after_items.front().size() == 1) eos = after_items.front()[0];
  return std::make_unique<TemplatePostProcessor>(std::move(before), std::move(after), bos, eos);
}

// RobertaProcessing / BertProcessing: "cls": ["<s>", 0], "sep": ["</s>", 2].
absl::StatusOr<std::unique_ptr<PostProcessor>> ParseClsSep(const json& j, const std::string& path) {
  int32_t ids[2];
  const char* keys[2] = {"cls", "sep"};
  for (int k = 0; k < 2; ++k) {
    auto it = j.find(keys[k]);
    if (it == j.end() || !it->is_array() || it->size() != 2 || !(*it)[1].is_number_integer() ||
        (*it)[1].get<int64_t>() < 0 || (*it)[1].get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(StrCat(path, ".", keys[k], " must be [token, id]"));
    }
    ids[k] = static_cast<int32_t>((*it)[1].get<int64_t>());
  }
  return std::make_unique<TemplatePostProcessor>(std::vector<int32_t>{ids[0]}, std::vector<int32_t>{ids[1]}, ids[0],
                                                 ids[1]);
}

}  // namespace

// ---- Parsers ------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  SEEDLING_ASSIGN_OR_RETURN(std::string type, ComponentType(j, path));
  if (type == "Sequence") {
    SEEDLING_ASSIGN_OR_RETURN(const json* children, ChildArray(j, "normalizers", path));
    std::vector<std::unique_ptr<Normalizer>> stages;
    for (size_t i = 0; i < children->size(); ++i) {
      SEEDLING_ASSIGN_OR_RETURN(auto stage, ParseNormalizer((*children)[i], StrCat(path, ".normalizers[", i, "]")));
      if (stage != nullptr) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequenceNormalizer>(std::move(stages));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfc);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfd);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfkc);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfkd);
  if (type == "Prepend") {
    SEEDLING_ASSIGN_OR_RETURN(std::string prepend, RequireString(j, "prepend", path));
    return std::make_unique<PrependNormalizer>(std::move(prepend));
  }
  if (type == "Replace") {
    SEEDLING_ASSIGN_OR_RETURN(Pattern pattern, Pattern::Parse(j, path));
    SEEDLING_ASSIGN_OR_RETURN(std::string content, RequireString(j, "content", path));
    return std::make_unique<ReplaceNormalizer>(std::move(pattern), std::move(content));
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Strip") {
    SEEDLING_ASSIGN_OR_RETURN(bool left, BoolOr(j, "strip_left", path, true));
    SEEDLING_ASSIGN_OR_RETURN(bool right, BoolOr(j, "strip_right", path, true));
    return std::make_unique<StripNormalizer>(left, right);
  }
  if (type == "StripAccents") return std::make_unique<StripAccentsNormalizer>();
  return Unsupported(path, type, kSupportedNormalizers);
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  SEEDLING_ASSIGN_OR_RETURN(std::string type, ComponentType(j, path));
  if (type == "Sequence") {
    SEEDLING_ASSIGN_OR_RETURN(const json* children, ChildArray(j, "pretokenizers", path));
    std::vector<std::unique_ptr<PreTokenizer>> stages;
    for (size_t i = 0; i < children->size(); ++i) {
      SEEDLING_ASSIGN_OR_RETURN(auto stage, ParsePreTokenizer((*children)[i], StrCat(path, ".pretokenizers[", i, "]")));
      if (stage != nullptr) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(stages));
  }
  if (type == "ByteLevel") {
    SEEDLING_ASSIGN_OR_RETURN(bool add_prefix_space, BoolOr(j, "add_prefix_space", path, true));
    SEEDLING_ASSIGN_OR_RETURN(bool use_regex, BoolOr(j, "use_regex", path, true));
    std::optional<Regex> regex;
    if (use_regex) {
      SEEDLING_ASSIGN_OR_RETURN(Regex compiled, Regex::Compile(kGpt2Pattern));
      regex.emplace(std::move(compiled));
    }
    return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex));
  }
  if (type == "Split") {
    SEEDLING_ASSIGN_OR_RETURN(Pattern pattern, Pattern::Parse(j, path));
    SEEDLING_ASSIGN_OR_RETURN(SplitBehavior behavior, ParseBehavior(j, path, "Removed"));
    SEEDLING_ASSIGN_OR_RETURN(bool invert, BoolOr(j, "invert", path, false));
    return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert);
  }
  if (type == "Digits") {
    SEEDLING_ASSIGN_OR_RETURN(bool individual, BoolOr(j, "individual_digits", path, false));
    return MakeCharSplit([](char32_t c) { return IsNumeric(c); },
                         individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous);
  }
  if (type == "Metaspace") {
    SEEDLING_ASSIGN_OR_RETURN(MetaspaceConfig config, ParseMetaspace(j, path));
    return std::make_unique<MetaspacePreTokenizer>(config);
  }
  if (type == "Whitespace") {
    // Hugging Face's \w+|[^\w\s]+ with the Rust regex crate's classes spelled out (PCRE2's \w
    // leaves out combining marks and takes all of \p{N}).
    SEEDLING_ASSIGN_OR_RETURN(Regex regex,
                              Regex::Compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}]+|)"
                                             R"([^\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}\p{White_Space}]+)"));
    return std::make_unique<RegexKeepPreTokenizer>(std::move(regex));
  }
  if (type == "WhitespaceSplit") {
    return MakeCharSplit([](char32_t c) { return IsWhitespace(c); }, SplitBehavior::kRemoved);
  }
  if (type == "Punctuation") {
    SEEDLING_ASSIGN_OR_RETURN(SplitBehavior behavior, ParseBehavior(j, path, "Isolated"));
    return MakeCharSplit([](char32_t c) { return IsPunctuation(c); }, behavior);
  }
  if (type == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> stages;
    stages.push_back(MakeCharSplit([](char32_t c) { return IsWhitespace(c); }, SplitBehavior::kRemoved));
    stages.push_back(MakeCharSplit([](char32_t c) { return IsPunctuation(c); }, SplitBehavior::kIsolated));
    return std::make_unique<SequencePreTokenizer>(std::move(stages));
  }
  if (type == "CharDelimiterSplit") {
    SEEDLING_ASSIGN_OR_RETURN(char32_t delimiter, SingleChar(j, "delimiter", path, ""));
    return MakeCharSplit([delimiter](char32_t c) { return c == delimiter; }, SplitBehavior::kRemoved);
  }
  return Unsupported(path, type, kSupportedPreTokenizers);
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  SEEDLING_ASSIGN_OR_RETURN(std::string type, ComponentType(j, path));
  if (type == "Sequence") {
    SEEDLING_ASSIGN_OR_RETURN(const json* children, ChildArray(j, "decoders", path));
    std::vector<std::unique_ptr<Decoder>> stages;
    for (size_t i = 0; i < children->size(); ++i) {
      SEEDLING_ASSIGN_OR_RETURN(auto stage, ParseDecoder((*children)[i], StrCat(path, ".decoders[", i, "]")));
      if (stage != nullptr) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequenceDecoder>(std::move(stages));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    SEEDLING_ASSIGN_OR_RETURN(MetaspaceConfig config, ParseMetaspace(j, path));
    return std::make_unique<MetaspaceDecoder>(config);
  }
  if (type == "Replace") {
    SEEDLING_ASSIGN_OR_RETURN(Pattern pattern, Pattern::Parse(j, path));
    SEEDLING_ASSIGN_OR_RETURN(std::string content, RequireString(j, "content", path));
    return std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    SEEDLING_ASSIGN_OR_RETURN(char32_t content, SingleChar(j, "content", path, " "));
    SEEDLING_ASSIGN_OR_RETURN(int64_t start, IntOr(j, "start", path, 0));
    SEEDLING_ASSIGN_OR_RETURN(int64_t stop, IntOr(j, "stop", path, 0));
    if (start < 0 || stop < 0) {
      return absl::InvalidArgumentError(StrCat(path, ".start and .stop must be non-negative"));
    }
    return std::make_unique<StripDecoder>(content, start, stop);
  }
  if (type == "BPEDecoder") {
    SEEDLING_ASSIGN_OR_RETURN(std::string suffix, StringOr(j, "suffix", path, "</w>"));
    return std::make_unique<BpeSuffixDecoder>(std::move(suffix));
  }
  return Unsupported(path, type, kSupportedDecoders);
}

absl::StatusOr<std::unique_ptr<PostProcessor>> ParsePostProcessor(const json& j, const std::string& path) {
  if (j.is_null()) return nullptr;
  SEEDLING_ASSIGN_OR_RETURN(std::string type, ComponentType(j, path));
  if (type == "Sequence") {
    SEEDLING_ASSIGN_OR_RETURN(const json* children, ChildArray(j, "processors", path));
    std::vector<std::unique_ptr<PostProcessor>> stages;
    for (size_t i = 0; i < children->size(); ++i) {
      SEEDLING_ASSIGN_OR_RETURN(auto stage, ParsePostProcessor((*children)[i], StrCat(path, ".processors[", i, "]")));
      if (stage != nullptr) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequencePostProcessor>(std::move(stages));
  }
  if (type == "TemplateProcessing") return ParseTemplate(j, path);
  // ByteLevel only trims offsets, which Seedling does not compute.
  if (type == "ByteLevel") return std::make_unique<NoOpPostProcessor>();
  if (type == "RobertaProcessing" || type == "BertProcessing") return ParseClsSep(j, path);
  return Unsupported(path, type, kSupportedPostProcessors);
}

}  // namespace seedling::model::internal
