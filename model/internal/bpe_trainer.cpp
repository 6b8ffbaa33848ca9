#include "model/internal/bpe_trainer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <queue>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "model/internal/bpe.h"
#include "model/internal/unicode.h"

namespace seedling::model::internal {
namespace {

// Same pattern as the ByteLevel pre-tokenizer the trained tokenizer.json declares.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct Word {
  std::vector<int32_t> symbols;
  int64_t count;
  int32_t last_merge = -1;  // index of the last merge that visited this word (skips duplicate visits)
};

// A heap entry: the pair's count when pushed. Higher counts first; among equal counts the smaller
// pair.
struct Candidate {
  int64_t count;
  uint64_t pair;
  bool operator<(const Candidate& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

// Special tokens must be non-empty, valid UTF-8 and distinct; `is_base_token` says whether one would also be
// a base token of the style (a byte-level byte character, a <0xNN> byte token).
template <typename IsBaseToken>
absl::Status ValidateSpecials(const std::vector<std::string>& specials, const IsBaseToken& is_base_token) {
  std::unordered_set<std::string> seen;
  for (const std::string& s : specials) {
    if (s.empty()) return absl::InvalidArgumentError("special_tokens: a special token is empty");
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' is not valid UTF-8"));
    }
    if (!seen.insert(s).second) {
      return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' appears twice"));
    }
    if (is_base_token(s)) return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' is also a base token"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSizes(int32_t vocab_size, int32_t min_frequency, int64_t base_tokens, const char* base_what) {
  if (vocab_size < base_tokens) {
    return absl::InvalidArgumentError(
        StrCat("vocab_size is ", vocab_size, "; at least ", base_tokens, " is needed (", base_what, ")"));
  }
  if (min_frequency < 0) {
    return absl::InvalidArgumentError(StrCat("min_frequency is ", min_frequency, "; it must be >= 0"));
  }
  return absl::OkStatus();
}

// The vocabulary being learned: tokens by id, and each token's id.
struct Vocabulary {
  std::vector<std::string> tokens;
  StringMap<int32_t> ids;

  // The id of `token`, added at the end if new.
  int32_t Add(const std::string& token) {
    if (auto it = ids.find(token); it != ids.end()) return it->second;
    const auto id = static_cast<int32_t>(tokens.size());
    tokens.push_back(token);
    ids[token] = id;
    return id;
  }
};

// Words sorted by their text, so that nothing depends on hash-map iteration order, as symbol sequences.
template <typename Symbols>
std::vector<Word> SortedWords(const StringMap<int64_t>& counts, const Symbols& symbols_of) {
  std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<Word> words;
  words.reserve(sorted.size());
  for (const auto& [text, count] : sorted) words.push_back(Word{symbols_of(text), count});
  return words;
}

// Repeatedly merges the most frequent adjacent pair of symbols in `words` (ties: the smaller ids) until
// `vocab` reaches vocab_size or no pair occurs min_frequency times; returns the merges in rank order.
// Pair counts are updated incrementally, touching only the words that contain the merged pair.
std::vector<std::pair<int32_t, int32_t>> LearnMerges(std::vector<Word> words, Vocabulary& vocab, int32_t vocab_size,
                                                     int32_t min_frequency_option) {
  std::unordered_map<uint64_t, int64_t> pair_counts;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;
  for (size_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].symbols;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t key = PairKey(s[i], s[i + 1]);
      pair_counts[key] += words[w].count;
      auto& list = where[key];
      if (list.empty() || list.back() != static_cast<int32_t>(w)) {
        list.push_back(static_cast<int32_t>(w));
      }
    }
  }
  std::priority_queue<Candidate> heap;
  for (const auto& [key, count] : pair_counts) heap.push(Candidate{count, key});

  // Heap entries go stale as counts change: an entry above the pair's current count is re-queued at the
  // current count when popped; every increase pushes a fresh entry, so the top is always exact.
  const int64_t min_frequency = std::max<int64_t>(1, min_frequency_option);
  std::vector<std::pair<int32_t, int32_t>> merges;
  while (static_cast<int64_t>(vocab.tokens.size()) < vocab_size && !heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    auto count_it = pair_counts.find(top.pair);
    const int64_t current = count_it == pair_counts.end() ? 0 : count_it->second;
    if (current != top.count) {
      if (current > 0 && current < top.count) heap.push(Candidate{current, top.pair});
      continue;
    }
    if (current < min_frequency) break;

    const auto a = static_cast<int32_t>(top.pair >> 32);
    const auto b = static_cast<int32_t>(top.pair & 0xFFFFFFFFu);
    // Reached before through another split of the same string, or new.
    const int32_t new_id = vocab.Add(vocab.tokens[a] + vocab.tokens[b]);
    const auto merge_index = static_cast<int32_t>(merges.size());
    merges.emplace_back(a, b);

    std::vector<int32_t> holders = std::move(where[top.pair]);
    where.erase(top.pair);
    std::unordered_set<uint64_t> grown;
    for (const int32_t w : holders) {
      Word& word = words[w];
      if (word.last_merge == merge_index) continue;
      word.last_merge = merge_index;
      std::vector<int32_t>& s = word.symbols;
      bool found = false;
      for (size_t i = 0; i + 1 < s.size() && !found; ++i) found = s[i] == a && s[i + 1] == b;
      if (!found) continue;  // a stale entry: an earlier merge consumed the pair
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        auto it = pair_counts.find(PairKey(s[i], s[i + 1]));
        it->second -= word.count;
        if (it->second == 0) pair_counts.erase(it);
      }
      std::vector<int32_t> next;
      next.reserve(s.size());
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          next.push_back(new_id);
          ++i;
        } else {
          next.push_back(s[i]);
        }
      }
      s = std::move(next);
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t key = PairKey(s[i], s[i + 1]);
        pair_counts[key] += word.count;
        if (s[i] == new_id || s[i + 1] == new_id) {
          grown.insert(key);
          auto& list = where[key];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      }
    }
    for (const uint64_t key : grown) heap.push(Candidate{pair_counts[key], key});
  }
  return merges;
}

using ojson = nlohmann::ordered_json;

ojson AddedTokens(const std::vector<std::string>& specials) {
  ojson added = ojson::array();
  for (size_t i = 0; i < specials.size(); ++i) {
    added.push_back({{"id", i},
                     {"content", specials[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  return added;
}

// The BPE model section, in the layout Hugging Face writes (vocab in id order; merges as "a b" strings,
// which every version of `tokenizers` reads: neither style's tokens hold a space).
ojson BpeModelJson(const Vocabulary& vocab, const std::vector<std::pair<int32_t, int32_t>>& merges,
                   const std::string& unk_token) {
  ojson ids = ojson::object();
  for (size_t i = 0; i < vocab.tokens.size(); ++i) ids[vocab.tokens[i]] = i;
  ojson merge_list = ojson::array();
  for (const auto& [x, y] : merges) merge_list.push_back(StrCat(vocab.tokens[x], " ", vocab.tokens[y]));
  const bool fallback = !unk_token.empty();
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", fallback ? ojson(unk_token) : ojson(nullptr)},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", fallback},
          {"byte_fallback", fallback},
          {"ignore_merges", false},
          {"vocab", std::move(ids)},
          {"merges", std::move(merge_list)}};
}

// "▁" (U+2581), SentencePiece's stand-in for a space.
constexpr std::string_view kSpaceMark = "\xE2\x96\x81";

std::string ByteTokenName(int b) {
  char name[8];
  std::snprintf(name, sizeof(name), "<0x%02X>", b);
  return name;
}

}  // namespace

absl::StatusOr<std::string> TrainByteLevelBpe(std::string_view corpus, const BpeTrainerOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateSpecials(options.special_tokens, [](const std::string& s) {
    size_t pos = 0;
    const char32_t first = NextCodePoint(s, &pos);
    return pos == s.size() && UnicodeToByte(first) >= 0;
  }));
  SEEDLING_RETURN_IF_ERROR(ValidateSizes(options.vocab_size, options.min_frequency,
                                         256 + static_cast<int64_t>(options.special_tokens.size()),
                                         "256 byte tokens + the special tokens"));
  SEEDLING_RETURN_IF_ERROR(CheckUtf8(corpus, "corpus"));

  // 1. Count pre-tokens (as raw bytes).
  SEEDLING_ASSIGN_OR_RETURN(Regex regex, Regex::Compile(kGpt2Pattern));
  std::vector<std::pair<size_t, size_t>> matches;
  SEEDLING_RETURN_IF_ERROR(regex.FindAll(corpus, &matches));
  StringMap<int64_t> word_counts;
  for (const auto& [b, e] : matches) ++word_counts[std::string(corpus.substr(b, e - b))];

  // 2. Initial vocabulary: special tokens, then the 256 byte tokens in the order of their characters.
  Vocabulary vocab;
  for (const std::string& s : options.special_tokens) vocab.Add(s);
  std::vector<int> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[b] = b;
  std::sort(bytes.begin(), bytes.end(), [](int x, int y) {
    return ByteToUnicode(static_cast<uint8_t>(x)) < ByteToUnicode(static_cast<uint8_t>(y));
  });
  std::array<int32_t, 256> byte_id{};
  for (int b : bytes) byte_id[b] = vocab.Add(Utf8(ByteToUnicode(static_cast<uint8_t>(b))));

  // 3. Merges over the words' bytes.
  const auto merges = LearnMerges(SortedWords(word_counts,
                                              [&](const std::string& text) {
                                                std::vector<int32_t> symbols;
                                                for (char c : text) symbols.push_back(byte_id[static_cast<uint8_t>(c)]);
                                                return symbols;
                                              }),
                                  vocab, options.vocab_size, options.min_frequency);

  // 4. tokenizer.json.
  const ojson byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  ojson doc = {{"version", "1.0"},
               {"truncation", nullptr},
               {"padding", nullptr},
               {"added_tokens", AddedTokens(options.special_tokens)},
               {"normalizer", nullptr},
               {"pre_tokenizer", byte_level},
               {"post_processor", byte_level},
               {"decoder", byte_level},
               {"model", BpeModelJson(vocab, merges, "")}};
  return doc.dump(2);
}

absl::StatusOr<std::string> TrainSentencePieceBpe(std::string_view corpus, const SentencePieceTrainerOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateSpecials(options.special_tokens, [](const std::string& s) {
    return s.size() == 6 && s.starts_with("<0x") && s.ends_with(">");
  }));
  for (const std::string* t : {&options.bos_token, &options.unk_token}) {
    if (std::find(options.special_tokens.begin(), options.special_tokens.end(), *t) == options.special_tokens.end()) {
      return absl::InvalidArgumentError(StrCat("'", *t, "' (bos_token / unk_token) is not among special_tokens"));
    }
  }
  SEEDLING_RETURN_IF_ERROR(CheckUtf8(corpus, "corpus"));

  // 1. Spaces become "▁"; each word starts at one (or at the start of the text).
  StringMap<int64_t> word_counts;
  StringMap<int64_t> char_counts;
  std::string word;
  for (size_t pos = 0; pos < corpus.size();) {
    const size_t start = pos;
    NextCodePoint(corpus, &pos);
    const std::string ch =
        corpus[start] == ' ' ? std::string(kSpaceMark) : std::string(corpus.substr(start, pos - start));
    if (ch == kSpaceMark && !word.empty()) {
      ++word_counts[word];
      word.clear();
    }
    word += ch;
    ++char_counts[ch];
  }
  if (!word.empty()) ++word_counts[word];

  // 2. Initial vocabulary: special tokens, the 256 byte-fallback tokens, then the corpus's characters in
  // code point order (every one of them: the vocabulary must hold them all).
  const int64_t base = static_cast<int64_t>(options.special_tokens.size()) + 256 + char_counts.size();
  SEEDLING_RETURN_IF_ERROR(ValidateSizes(options.vocab_size, options.min_frequency, base,
                                         "the special tokens, 256 byte tokens and the corpus's characters"));
  Vocabulary vocab;
  for (const std::string& s : options.special_tokens) vocab.Add(s);
  for (int b = 0; b < 256; ++b) vocab.Add(ByteTokenName(b));
  std::vector<std::string> chars;
  for (const auto& [ch, count] : char_counts) chars.push_back(ch);
  std::sort(chars.begin(), chars.end());  // UTF-8 byte order is code point order
  for (const std::string& ch : chars) vocab.Add(ch);

  // 3. Merges over the words' characters.
  const auto merges = LearnMerges(SortedWords(word_counts,
                                              [&](const std::string& text) {
                                                std::vector<int32_t> symbols;
                                                for (size_t pos = 0; pos < text.size();) {
                                                  const size_t start = pos;
                                                  NextCodePoint(text, &pos);
                                                  symbols.push_back(vocab.ids.at(text.substr(start, pos - start)));
                                                }
                                                return symbols;
                                              }),
                                  vocab, options.vocab_size, options.min_frequency);

  // 4. tokenizer.json as Hugging Face converts Gemma's: spaces replaced by "▁" (a dummy prefix only with
  // prepend_space, as Llama 2's), no pre-tokenizer, byte fallback, BOS added by the post-processor.
  const int64_t bos_id = vocab.ids.at(options.bos_token);
  const ojson bos = {{"SpecialToken", {{"id", options.bos_token}, {"type_id", 0}}}};
  const ojson replace_spaces = {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpaceMark}};
  ojson decoders = {{{"type", "Replace"}, {"pattern", {{"String", kSpaceMark}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}}};
  if (options.prepend_space) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  ojson doc = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", AddedTokens(options.special_tokens)},
      {"normalizer", options.prepend_space
                         ? ojson{{"type", "Sequence"},
                                 {"normalizers", {{{"type", "Prepend"}, {"prepend", kSpaceMark}}, replace_spaces}}}
                         : replace_spaces},
      {"pre_tokenizer", nullptr},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, bos, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens",
         {{options.bos_token, {{"id", options.bos_token}, {"ids", {bos_id}}, {"tokens", {options.bos_token}}}}}}}},
      {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
      {"model", BpeModelJson(vocab, merges, options.unk_token)}};
  return doc.dump(2);
}

}  // namespace seedling::model::internal
