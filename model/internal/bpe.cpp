#include "model/internal/bpe.h"

#include <cstdio>
#include <mutex>
#include <queue>

#include "base/strings.h"
#include "model/internal/unicode.h"

namespace seedling::model::internal {

namespace {
// Ids above this are surely a corrupt file; refusing them keeps id-indexed tables small.
constexpr int64_t kMaxTokenId = 1 << 24;
}  // namespace

void BpeModel::MergeTable::Reserve(size_t n) {
  size_t capacity = 16;
  int bits = 4;
  while (capacity < 2 * n) capacity <<= 1, ++bits;  // load factor <= 1/2 keeps probe runs short
  keys_.assign(capacity, kEmpty);
  values_.assign(capacity, Merge{});
  mask_ = capacity - 1;
  shift_ = 64 - bits;
}

void BpeModel::MergeTable::Insert(uint64_t key, Merge merge) {
  size_t i = Slot(key);
  while (keys_[i] != kEmpty && keys_[i] != key) i = (i + 1) & mask_;
  keys_[i] = key;
  values_[i] = merge;
}

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(
    std::vector<std::pair<std::string, int32_t>> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
    BpeOptions options) {
  std::unique_ptr<BpeModel> model(new BpeModel());
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab) {
    if (id < 0 || id > kMaxTokenId) {
      return absl::InvalidArgumentError(
          StrCat("vocab id ", id, " of token '", token, "' is out of range [0, ", kMaxTokenId, "]"));
    }
    max_id = std::max(max_id, id);
  }
  model->id_to_token_.resize(max_id + 1);
  model->id_assigned_.assign(max_id + 1, false);
  model->vocab_.reserve(vocab.size());
  for (auto& [token, id] : vocab) {
    model->id_to_token_[id] = token;
    model->id_assigned_[id] = true;
    model->vocab_[std::move(token)] = id;
  }

  const std::string& prefix = options.continuing_subword_prefix;
  model->merges_.Reserve(merges.size());
  model->in_merge_.assign(max_id + 1, false);
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    // Named references, not a structured binding: clang before 16 cannot capture one in a lambda.
    const std::string& a = merges[rank].first;
    const std::string& b = merges[rank].second;
    auto describe = [&] { return StrCat("merge ", rank, " ('", a, "', '", b, "')"); };
    auto a_it = model->vocab_.find(a);
    if (a_it == model->vocab_.end()) {
      return absl::InvalidArgumentError(StrCat(describe(), " names token '", a, "', which is not in the vocab"));
    }
    auto b_it = model->vocab_.find(b);
    if (b_it == model->vocab_.end()) {
      return absl::InvalidArgumentError(StrCat(describe(), " names token '", b, "', which is not in the vocab"));
    }
    std::string_view b_tail = b;
    if (!prefix.empty() && b_tail.substr(0, prefix.size()) == prefix) {
      b_tail.remove_prefix(prefix.size());
    }
    const std::string merged = StrCat(a, b_tail);
    auto m_it = model->vocab_.find(merged);
    if (m_it == model->vocab_.end()) {
      return absl::InvalidArgumentError(StrCat(describe(), " produces '", merged, "', which is not in the vocab"));
    }
    // A repeated pair takes its last rank, as Hugging Face's map construction does.
    model->merges_.Insert(PairKey(a_it->second, b_it->second), Merge{static_cast<int32_t>(rank), m_it->second});
    model->in_merge_[a_it->second] = true;
    model->in_merge_[b_it->second] = true;
  }

  if (options.unk_token.has_value()) {
    auto it = model->vocab_.find(*options.unk_token);
    if (it == model->vocab_.end()) {
      return absl::InvalidArgumentError(StrCat("unk_token '", *options.unk_token, "' is not in the vocab"));
    }
    model->unk_id_ = it->second;
  }
  model->byte_ids_.fill(-1);
  if (options.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = model->vocab_.find(std::string_view(name));
      if (it != model->vocab_.end()) model->byte_ids_[b] = it->second;
    }
  }
  model->options_ = std::move(options);
  return model;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id > max_id() || !id_assigned_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids->size();
  MergeWord(word, ids);
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() < kCacheCapacity) {
      cache_.try_emplace(std::string(word), ids->begin() + first, ids->end());
    }
  }
}

void BpeModel::MergeWord(std::string_view word, std::vector<int32_t>* ids) const {
  // The word as a doubly linked list of symbols; a merge keeps the left symbol and unlinks the
  // right one.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&symbols](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{id, index - 1, -1, true});
    if (index > 0) symbols[index - 1].next = index;
  };

  // 1. Initial symbols: one per character (or per byte with byte fallback, or a run of unknowns as
  // unk).
  const std::string& prefix = options_.continuing_subword_prefix;
  const std::string& suffix = options_.end_of_word_suffix;
  bool pending_unk = false;
  std::string buffer;
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    pos += Utf8SequenceLength(static_cast<unsigned char>(word[pos]));
    std::string_view piece = word.substr(start, pos - start);
    if ((!prefix.empty() && start > 0) || (!suffix.empty() && pos >= word.size())) {
      buffer.clear();
      if (!prefix.empty() && start > 0) buffer += prefix;
      buffer += piece;
      if (!suffix.empty() && pos >= word.size()) buffer += suffix;
      piece = buffer;
    }
    if (auto it = vocab_.find(piece); it != vocab_.end()) {
      if (pending_unk) add(*unk_id_), pending_unk = false;
      add(it->second);
      continue;
    }
    if (options_.byte_fallback) {
      bool all_bytes = true;
      for (char c : piece) all_bytes = all_bytes && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all_bytes) {
        if (pending_unk) add(*unk_id_), pending_unk = false;
        for (char c : piece) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_id_.has_value()) {
      if (!options_.fuse_unk && pending_unk) add(*unk_id_);
      pending_unk = true;
    }
    // Without an unk token the character is dropped, as in Hugging Face `tokenizers`.
  }
  if (pending_unk) add(*unk_id_);
  if (symbols.empty()) return;

  // 2. Merge the lowest-ranked adjacent pair first (leftmost among equals) until none applies.
  // Queue entries go stale when a neighbour merges; they are recognised and skipped when popped.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push_pair = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    if (const Merge* m = merges_.Find(PairKey(symbols[left].id, symbols[right].id))) {
      queue.push(Candidate{m->rank, left, m->new_id});
    }
  };
  // A symbol that takes part in no merge (a byte-fallback byte, say) never changes and no merge
  // crosses it, so the stretches between such symbols are merged one at a time: a text without a
  // pre-tokenizer (SentencePiece style) is then not one huge queue.
  const auto n = static_cast<int32_t>(symbols.size());
  for (int32_t begin = 0; begin < n;) {
    int32_t end = begin;
    while (end < n && in_merge_[symbols[end].id]) ++end;
    for (int32_t i = begin; i + 1 < end; ++i) push_pair(i);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = symbols[top.pos];
      if (!left.alive || left.next < 0) continue;
      Symbol& right = symbols[left.next];
      const Merge* m = merges_.Find(PairKey(left.id, right.id));
      if (m == nullptr || m->new_id != top.new_id) continue;
      left.id = top.new_id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (left.prev >= 0) push_pair(left.prev);
      push_pair(top.pos);
    }
    begin = end + 1;
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

}  // namespace seedling::model::internal
