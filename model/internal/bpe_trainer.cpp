#include "model/internal/bpe_trainer.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <queue>
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

absl::Status ValidateOptions(const BpeTrainerOptions& options) {
  std::unordered_set<std::string> seen;
  for (const std::string& s : options.special_tokens) {
    if (s.empty()) return absl::InvalidArgumentError("special_tokens: a special token is empty");
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' is not valid UTF-8"));
    }
    if (!seen.insert(s).second) {
      return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' appears twice"));
    }
    size_t pos = 0;
    const char32_t first = NextCodePoint(s, &pos);
    if (pos == s.size() && UnicodeToByte(first) >= 0) {
      return absl::InvalidArgumentError(StrCat("special_tokens: '", s, "' is also the byte-level token of a byte"));
    }
  }
  const int64_t minimum = 256 + static_cast<int64_t>(options.special_tokens.size());
  if (options.vocab_size < minimum) {
    return absl::InvalidArgumentError(StrCat("vocab_size is ", options.vocab_size, "; it must be at least ", minimum,
                                             " (256 byte tokens + ", options.special_tokens.size(),
                                             " special tokens)"));
  }
  if (options.min_frequency < 0) {
    return absl::InvalidArgumentError(StrCat("min_frequency is ", options.min_frequency, "; it must be >= 0"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> TrainByteLevelBpe(std::string_view corpus, const BpeTrainerOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateOptions(options));
  SEEDLING_RETURN_IF_ERROR(CheckUtf8(corpus, "corpus"));

  // 1. Count pre-tokens (as raw bytes).
  SEEDLING_ASSIGN_OR_RETURN(Regex regex, Regex::Compile(kGpt2Pattern));
  std::vector<std::pair<size_t, size_t>> matches;
  SEEDLING_RETURN_IF_ERROR(regex.FindAll(corpus, &matches));
  StringMap<int64_t> word_counts;
  for (const auto& [b, e] : matches) ++word_counts[std::string(corpus.substr(b, e - b))];
  // Sorted so that nothing depends on hash-map iteration order.
  std::vector<std::pair<std::string, int64_t>> sorted_words(word_counts.begin(), word_counts.end());
  std::sort(sorted_words.begin(), sorted_words.end());

  // 2. Initial vocabulary: special tokens, then the 256 byte tokens in the order of their
  // characters.
  std::vector<std::string> id_to_token(options.special_tokens.begin(), options.special_tokens.end());
  StringMap<int32_t> token_to_id;
  for (size_t i = 0; i < id_to_token.size(); ++i) {
    token_to_id[id_to_token[i]] = static_cast<int32_t>(i);
  }
  std::vector<int> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[b] = b;
  std::sort(bytes.begin(), bytes.end(), [](int x, int y) {
    return ByteToUnicode(static_cast<uint8_t>(x)) < ByteToUnicode(static_cast<uint8_t>(y));
  });
  std::array<int32_t, 256> byte_id{};
  for (int b : bytes) {
    byte_id[b] = static_cast<int32_t>(id_to_token.size());
    id_to_token.push_back(Utf8(ByteToUnicode(static_cast<uint8_t>(b))));
    token_to_id[id_to_token.back()] = byte_id[b];
  }

  // 3. Words as symbol sequences, pair counts, and which words hold each pair.
  std::vector<Word> words;
  words.reserve(sorted_words.size());
  for (const auto& [text, count] : sorted_words) {
    Word w{{}, count};
    for (char c : text) w.symbols.push_back(byte_id[static_cast<unsigned char>(c)]);
    words.push_back(std::move(w));
  }
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

  // 4. Merge. Heap entries go stale as counts change: an entry above the pair's current count is
  // re-queued at the current count when popped; every increase pushes a fresh entry, so the top is
  // always exact.
  const int64_t min_frequency = std::max<int64_t>(1, options.min_frequency);
  std::vector<std::pair<int32_t, int32_t>> merges;
  while (static_cast<int64_t>(id_to_token.size()) < options.vocab_size && !heap.empty()) {
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
    const std::string merged = id_to_token[a] + id_to_token[b];
    int32_t new_id;
    if (auto it = token_to_id.find(merged); it != token_to_id.end()) {
      new_id = it->second;  // reached before through another split of the same string
    } else {
      new_id = static_cast<int32_t>(id_to_token.size());
      id_to_token.push_back(merged);
      token_to_id[merged] = new_id;
    }
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

  // 5. tokenizer.json, in the layout Hugging Face writes (ordered keys; vocab in id order).
  using ojson = nlohmann::ordered_json;
  const ojson byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  ojson added = ojson::array();
  for (size_t i = 0; i < options.special_tokens.size(); ++i) {
    added.push_back({{"id", i},
                     {"content", options.special_tokens[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  ojson vocab = ojson::object();
  for (size_t i = 0; i < id_to_token.size(); ++i) vocab[id_to_token[i]] = i;
  ojson merge_list = ojson::array();
  // "a b" strings: every version of Hugging Face `tokenizers` reads them, and byte-level tokens
  // never hold a space (the space byte is 'Ġ').
  for (const auto& [x, y] : merges) {
    merge_list.push_back(StrCat(id_to_token[x], " ", id_to_token[y]));
  }
  ojson doc = {{"version", "1.0"},
               {"truncation", nullptr},
               {"padding", nullptr},
               {"added_tokens", std::move(added)},
               {"normalizer", nullptr},
               {"pre_tokenizer", byte_level},
               {"post_processor", byte_level},
               {"decoder", byte_level},
               {"model",
                {{"type", "BPE"},
                 {"dropout", nullptr},
                 {"unk_token", nullptr},
                 {"continuing_subword_prefix", nullptr},
                 {"end_of_word_suffix", nullptr},
                 {"fuse_unk", false},
                 {"byte_fallback", false},
                 {"ignore_merges", false},
                 {"vocab", std::move(vocab)},
                 {"merges", std::move(merge_list)}}}};
  return doc.dump(2);
}

}  // namespace seedling::model::internal
