#include "model/internal/tokenizer_vocabulary.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "model/internal/tokenizer_json.h"

namespace seedling::model::internal {
namespace {

using json = nlohmann::json;
using Vocab = TokenizerVocabulary;

const std::string kMeta = "\xE2\x96\x81";  // "▁", SentencePiece's escaped space

absl::Status CheckVocabulary(const Vocab& v) {
  const size_t n = v.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("the vocabulary has no tokens");
  if (v.types.size() != n || (!v.scores.empty() && v.scores.size() != n)) {
    return absl::InvalidArgumentError(StrCat("the vocabulary has ", n, " tokens but ", v.types.size(),
                                             " token types and ", v.scores.size(), " scores"));
  }
  for (size_t id = 0; id < v.scores.size(); ++id) {
    if (!std::isfinite(v.scores[id])) {
      return absl::InvalidArgumentError(StrCat("token ", id, " has score ", v.scores[id]));
    }
  }
  std::unordered_map<std::string_view, size_t> seen;
  seen.reserve(n);
  for (size_t id = 0; id < n; ++id) {
    if (v.tokens[id].empty()) return absl::InvalidArgumentError(StrCat("token ", id, " is empty"));
    if (v.types[id] < Vocab::kNormal || v.types[id] > Vocab::kByte) {
      return absl::InvalidArgumentError(StrCat("token ", id, " has type ", v.types[id], ", not one of 1..6"));
    }
    auto [it, inserted] = seen.emplace(v.tokens[id], id);
    if (!inserted) {
      return absl::InvalidArgumentError(StrCat("token '", v.tokens[id], "' has two ids, ", it->second, " and ", id));
    }
  }
  const std::pair<const char*, std::optional<int32_t>> ids[] = {
      {"bos", v.bos_id}, {"eos", v.eos_id}, {"unknown", v.unk_id}, {"padding", v.pad_id}};
  for (const auto& [what, id] : ids) {
    if (id.has_value() && (*id < 0 || static_cast<size_t>(*id) >= n)) {
      return absl::InvalidArgumentError(StrCat(what, " token id ", *id, " is outside the vocabulary [0, ", n, ")"));
    }
  }
  if ((v.add_bos && !v.bos_id.has_value()) || (v.add_eos && !v.eos_id.has_value())) {
    return absl::InvalidArgumentError("the vocabulary adds BOS / EOS but does not say which id");
  }
  return absl::OkStatus();
}

bool IsSentencePiece(const Vocab& v) { return v.kind != Vocab::Kind::kByteLevelBpe; }

bool IsUtf8Continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// SentencePiece vocabularies in GGUF carry scores, not merges. llama.cpp's SentencePiece tokenizer
// (llm_tokenizer_spm) repeatedly joins the adjacent pair whose concatenation is a token with the
// highest score. As BPE merges: every split of a token into two tokens, ranked by the token's
// score (highest first; ties by id, then by split point). Unlike llama.cpp, BPE cannot join two
// characters that are not tokens themselves; SentencePiece vocabularies hold their characters.
std::vector<std::pair<std::string, std::string>> MergesFromScores(const Vocab& v) {
  std::unordered_map<std::string_view, int32_t> ids;
  ids.reserve(v.tokens.size());
  for (size_t id = 0; id < v.tokens.size(); ++id) ids.emplace(v.tokens[id], id);
  struct Candidate {
    float score;
    int32_t id;
    size_t split;
  };
  std::vector<Candidate> candidates;
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const std::string_view t = v.tokens[id];
    for (size_t split = 1; split < t.size(); ++split) {
      if (IsUtf8Continuation(t[split])) continue;
      if (ids.contains(t.substr(0, split)) && ids.contains(t.substr(split))) {
        candidates.push_back({v.scores.empty() ? 0.0f : v.scores[id], static_cast<int32_t>(id), split});
      }
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    return std::tie(b.score, a.id, a.split) < std::tie(a.score, b.id, b.split);
  });
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(candidates.size());
  for (const Candidate& c : candidates) {
    const std::string& t = v.tokens[c.id];
    merges.emplace_back(t.substr(0, c.split), t.substr(c.split));
  }
  return merges;
}

json Model(const Vocab& v) {
  json vocab = json::object();
  for (size_t id = 0; id < v.tokens.size(); ++id) vocab[v.tokens[id]] = id;
  const bool spm = IsSentencePiece(v);
  json merges = json::array();
  for (const auto& [a, b] : spm&& v.merges.empty() ? MergesFromScores(v) : v.merges) {
    merges.push_back(json::array({a, b}));
  }
  json model = {{"type", "BPE"},
                {"vocab", std::move(vocab)},
                {"merges", std::move(merges)},
                {"byte_fallback", std::find(v.types.begin(), v.types.end(), Vocab::kByte) != v.types.end()},
                {"fuse_unk", spm},
                // llama.cpp sets ignore_merges for Llama 3's pre-tokenizer, as its tokenizer.json does.
                {"ignore_merges", v.pre_tokenizer == Vocab::PreTokenizer::kLlama3}};
  if (v.unk_id.has_value()) model["unk_token"] = v.tokens[*v.unk_id];
  return model;
}

// Control, unknown and user-defined tokens are matched in the raw text before anything else, as
// llama.cpp's tokenizer_st_partition does; only the first two are special.
json AddedTokens(const Vocab& v) {
  json added = json::array();
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const int32_t type = v.types[id];
    if (type != Vocab::kControl && type != Vocab::kUnknown && type != Vocab::kUserDefined) continue;
    added.push_back({{"id", id},
                     {"content", v.tokens[id]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", type != Vocab::kUserDefined}});
  }
  return added;
}

json ByteLevelStage(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

json SplitStage(std::string_view regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", std::string(regex)}}}, {"behavior", "Isolated"}, {"invert", false}};
}

absl::StatusOr<json> ByteLevelPreTokenizer(Vocab::PreTokenizer pre) {
  switch (pre) {
    case Vocab::PreTokenizer::kGpt2:
      return ByteLevelStage(true);
    case Vocab::PreTokenizer::kGpt2Digits:
      return json{{"type", "Sequence"},
                  {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, ByteLevelStage(true)}}};
    case Vocab::PreTokenizer::kLlama3:
    case Vocab::PreTokenizer::kQwen2:
      return json{{"type", "Sequence"},
                  {"pretokenizers",
                   {SplitStage(pre == Vocab::PreTokenizer::kLlama3 ? kLlama3SplitRegex : kQwen2SplitRegex),
                    ByteLevelStage(false)}}};
    case Vocab::PreTokenizer::kOther:
      break;
  }
  return absl::InvalidArgumentError(
      "a byte-level vocabulary needs a known pre-tokenizer (GPT-2, SmolLM, Llama 3 or Qwen2)");
}

json SentencePieceNormalizer(bool add_space_prefix) {
  json replace = {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}};
  if (!add_space_prefix) return replace;
  return {{"type", "Sequence"}, {"normalizers", {{{"type", "Prepend"}, {"prepend", kMeta}}, std::move(replace)}}};
}

json SentencePieceDecoder(bool add_space_prefix) {
  json decoders = {{{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}},
                   {{"type", "ByteFallback"}},
                   {{"type", "Fuse"}}};
  if (add_space_prefix) {
    decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  }
  return {{"type", "Sequence"}, {"decoders", std::move(decoders)}};
}

// BOS / EOS around the sequence when the vocabulary adds them; null otherwise.
json PostProcessor(const Vocab& v) {
  if (!v.add_bos && !v.add_eos) return nullptr;
  json single = json::array();
  json specials = json::object();
  auto special = [&](int32_t id) {
    const std::string& name = v.tokens[id];
    specials[name] = {{"id", name}, {"ids", {id}}, {"tokens", {name}}};
    single.push_back({{"SpecialToken", {{"id", name}, {"type_id", 0}}}});
  };
  if (v.add_bos) special(*v.bos_id);
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (v.add_eos) special(*v.eos_id);
  return {{"type", "TemplateProcessing"},
          {"single", std::move(single)},
          {"pair", json::array()},
          {"special_tokens", std::move(specials)}};
}

}  // namespace

absl::StatusOr<json> TokenizerJsonFromVocabulary(const Vocab& vocab, bool add_space_prefix) {
  SEEDLING_RETURN_IF_ERROR(CheckVocabulary(vocab));
  json doc = {{"version", "1.0"},
              {"added_tokens", AddedTokens(vocab)},
              {"post_processor", PostProcessor(vocab)},
              {"model", Model(vocab)}};
  if (IsSentencePiece(vocab)) {
    doc["normalizer"] = SentencePieceNormalizer(add_space_prefix);
    doc["pre_tokenizer"] = nullptr;
    doc["decoder"] = SentencePieceDecoder(add_space_prefix);
  } else {
    SEEDLING_ASSIGN_OR_RETURN(doc["pre_tokenizer"], ByteLevelPreTokenizer(vocab.pre_tokenizer));
    doc["normalizer"] = nullptr;
    doc["decoder"] = {{"type", "ByteLevel"}};
  }
  return doc;
}

}  // namespace seedling::model::internal
