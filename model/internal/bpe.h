#pragma once

// The BPE model of a Hugging Face tokenizer.json ("model": {"type": "BPE", ...}): turns one
// pre-token (a "word") into ids by applying the ranked merges, lowest rank first (Sennrich et al.
// 2016, as implemented by Hugging Face `tokenizers`).

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::model::internal {

// Transparent hash so maps keyed by std::string can be searched with a std::string_view.
struct StringViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringViewHash, std::equal_to<>>;

struct BpeOptions {
  // Token emitted for characters that are neither in the vocabulary nor byte-fallback encodable.
  // Without one, such characters are dropped (as Hugging Face does). Must name a vocabulary entry
  // if set.
  std::optional<std::string> unk_token;
  bool fuse_unk = false;                  // consecutive unknown characters become one unk token
  bool byte_fallback = false;             // unknown characters become their UTF-8 bytes as "<0xXX>" tokens
  bool ignore_merges = false;             // a word that is itself in the vocabulary is emitted whole (Llama-3)
  std::string continuing_subword_prefix;  // prepended to every non-initial character; empty = none
  std::string end_of_word_suffix;         // appended to the final character; empty = none
};

class BpeModel {
 public:
  // `merges` are in rank order. InvalidArgument (the message names the merge or token) if a merge
  // names a token missing from `vocab`, if a merge's result is missing, if an id is negative or
  // absurdly large
  // (> 2^24), or if `options.unk_token` is not in `vocab`.
  static absl::StatusOr<std::unique_ptr<BpeModel>> Create(
      std::vector<std::pair<std::string, int32_t>> vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options);

  // Appends the ids of `word` to `ids`. `word` must be valid UTF-8. Thread-safe.
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // nullptr if no token has this id.
  const std::string* IdToToken(int32_t id) const;
  // Highest id in the vocabulary, -1 if it is empty.
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  // Pair of ids -> Merge with open addressing and linear probing: the lookup sits in MergeWord's
  // innermost loop, where a flat table avoids std::unordered_map's pointer chasing.
  class MergeTable {
   public:
    void Reserve(size_t n);
    void Insert(uint64_t key, Merge merge);  // overwrites an existing key
    const Merge* Find(uint64_t key) const {
      for (size_t i = Slot(key);; i = (i + 1) & mask_) {
        if (keys_[i] == key) return &values_[i];
        if (keys_[i] == kEmpty) return nullptr;
      }
    }

   private:
    static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are non-negative int32, so never a real key
    size_t Slot(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_); }
    std::vector<uint64_t> keys_;
    std::vector<Merge> values_;
    size_t mask_ = 0;
    int shift_ = 64;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  BpeModel() = default;
  void MergeWord(std::string_view word, std::vector<int32_t>* ids) const;

  // Constant after construction.
  BpeOptions options_;
  StringMap<int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> id_assigned_;
  MergeTable merges_;
  std::vector<bool> in_merge_;  // by id: the token is one side of some merge
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};  // id of "<0xXX>" per byte, -1 if absent (only with byte_fallback)

  // Word -> ids for short words, filled until full (no eviction keeps it simple and deterministic).
  static constexpr size_t kCacheCapacity = 16384;
  static constexpr size_t kCacheMaxWordBytes = 64;
  mutable std::shared_mutex cache_mu_;
  mutable StringMap<std::vector<int32_t>> cache_;  // guarded by cache_mu_
};

}  // namespace seedling::model::internal
