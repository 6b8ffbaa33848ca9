#include "model/internal/sentencepiece_tokenizer.h"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/internal/spm_library.h"
#include "model/internal/unicode.h"

namespace seedling::model::internal {
namespace {

// Owns a loaded model of the shim (libsentencepiece is only reached through it; see
// spm_shim_api.h).
struct SpmDeleter {
  const SpmLibrary* lib;
  void operator()(seedling_spm* spm) const { lib->free(spm); }
};
using SpmHandle = std::unique_ptr<seedling_spm, SpmDeleter>;

// A buffer malloc'ed by the shim.
struct ShimBufferDeleter {
  const SpmLibrary* lib;
  void operator()(void* p) const { lib->free_buffer(p); }
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const SpmLibrary* lib, SpmHandle spm, bool add_bos, bool add_eos)
      : lib_(lib), spm_(std::move(spm)), add_bos_(add_bos), add_eos_(add_eos) {
    vocab_size_ = lib_->piece_size(spm_.get());
    pieces_.reserve(vocab_size_);
    special_.assign(vocab_size_, false);
    special_first_byte_.fill(false);
    for (int32_t id = 0; id < vocab_size_; ++id) {
      size_t len = 0;
      const char* piece = lib_->id_to_piece(spm_.get(), id, &len);
      pieces_.emplace_back(piece == nullptr ? "" : std::string(piece, len));
      const int type = lib_->piece_type(spm_.get(), id);
      if (type == SEEDLING_SPM_CONTROL || type == SEEDLING_SPM_UNKNOWN) {
        special_[id] = true;
        // SentencePiece never produces control pieces from text; Encode matches their text itself.
        if (!pieces_.back().empty()) {
          special_pieces_.emplace_back(pieces_.back(), id);
          special_first_byte_[static_cast<unsigned char>(pieces_.back()[0])] = true;
        }
      }
    }
    // Longest first, so that the first piece found at a position is the longest one there.
    std::stable_sort(special_pieces_.begin(), special_pieces_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    if (const int32_t id = lib_->bos_id(spm_.get()); id >= 0 && id < vocab_size_) bos_id_ = id;
    if (const int32_t id = lib_->eos_id(spm_.get()); id >= 0 && id < vocab_size_) eos_id_ = id;
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens) const override {
    SEEDLING_RETURN_IF_ERROR(CheckUtf8(text, "text to encode"));
    std::vector<int32_t> ids;
    if (add_special_tokens && add_bos_ && bos_id_.has_value()) ids.push_back(*bos_id_);
    // The text between special pieces goes to SentencePiece; each stretch gets its own dummy
    // prefix, as with transformers' LlamaTokenizer.
    size_t start = 0;
    for (size_t pos = 0; pos < text.size(); ++pos) {
      const int32_t special = SpecialAt(text, pos);
      if (special < 0) continue;
      SEEDLING_RETURN_IF_ERROR(EncodeText(text.substr(start, pos - start), &ids));
      ids.push_back(special);
      pos += pieces_[special].size() - 1;
      start = pos + 1;
    }
    SEEDLING_RETURN_IF_ERROR(EncodeText(text.substr(start), &ids));
    if (add_special_tokens && add_eos_ && eos_id_.has_value()) ids.push_back(*eos_id_);
    return ids;
  }

  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::string out;
    std::vector<int32_t> run;  // ordinary pieces, decoded together so SentencePiece joins them
    for (const int32_t id : ids) {
      if (id < 0 || id >= vocab_size_) {
        return absl::InvalidArgumentError(StrCat("token id ", id, " is out of range [0, ", vocab_size_, ")"));
      }
      if (!special_[id]) {
        run.push_back(id);
        continue;
      }
      SEEDLING_RETURN_IF_ERROR(DecodeRun(&run, &out));
      if (!skip_special_tokens) out += pieces_[id];
    }
    SEEDLING_RETURN_IF_ERROR(DecodeRun(&run, &out));
    return out;
  }

  int32_t vocab_size() const override { return vocab_size_; }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    const int32_t id = lib_->piece_to_id(spm_.get(), token.data(), token.size());
    if (id < 0 || id >= vocab_size_) return std::nullopt;
    return id;
  }

  std::optional<std::string> IdToToken(int32_t id) const override {
    if (id < 0 || id >= vocab_size_) return std::nullopt;
    return pieces_[id];
  }

  bool IsSpecial(int32_t id) const override { return id >= 0 && id < vocab_size_ && special_[id]; }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }

  absl::StatusOr<TokenizerVocabulary> Vocabulary() const override {
    TokenizerVocabulary v;
    v.kind = TokenizerVocabulary::Kind::kSentencePieceModel;
    v.tokens = pieces_;
    v.scores.resize(vocab_size_);
    v.types.resize(vocab_size_);
    for (int32_t id = 0; id < vocab_size_; ++id) {
      v.scores[id] = lib_->piece_score(spm_.get(), id);
      // The SEEDLING_SPM_* values are SentencePiece's piece types, as TokenType is.
      const int type = lib_->piece_type(spm_.get(), id);
      v.types[id] = type == 0 ? TokenizerVocabulary::kNormal : type;
    }
    v.bos_id = bos_id_;
    v.eos_id = eos_id_;
    if (const int32_t id = lib_->unk_id(spm_.get()); id >= 0 && id < vocab_size_) v.unk_id = id;
    v.add_bos = add_bos_ && bos_id_.has_value();
    v.add_eos = add_eos_ && eos_id_.has_value();
    return v;
  }

 private:
  // Id of the longest special piece whose text starts at text[pos], or -1.
  int32_t SpecialAt(std::string_view text, size_t pos) const {
    if (!special_first_byte_[static_cast<unsigned char>(text[pos])]) return -1;
    for (const auto& [piece, id] : special_pieces_) {
      if (text.compare(pos, piece.size(), piece) == 0) return id;
    }
    return -1;
  }

  absl::Status EncodeText(std::string_view text, std::vector<int32_t>* ids) const {
    if (text.empty()) return absl::OkStatus();
    int32_t* raw = nullptr;
    size_t n = 0;
    char err[256];
    if (lib_->encode(spm_.get(), text.data(), text.size(), &raw, &n, err, sizeof(err)) != 0) {
      return absl::InternalError(StrCat("SentencePiece encode failed: ", err));
    }
    std::unique_ptr<void, ShimBufferDeleter> owned(raw, ShimBufferDeleter{lib_});
    ids->insert(ids->end(), raw, raw + n);
    return absl::OkStatus();
  }

  absl::Status DecodeRun(std::vector<int32_t>* run, std::string* out) const {
    if (run->empty()) return absl::OkStatus();
    char* text = nullptr;
    size_t len = 0;
    char err[256];
    if (lib_->decode(spm_.get(), run->data(), run->size(), &text, &len, err, sizeof(err)) != 0) {
      return absl::InternalError(StrCat("SentencePiece decode failed: ", err));
    }
    std::unique_ptr<void, ShimBufferDeleter> owned(text, ShimBufferDeleter{lib_});
    out->append(text, len);
    run->clear();
    return absl::OkStatus();
  }

  // Constant after construction. The shim's functions only read the model, so they are thread-safe.
  const SpmLibrary* lib_;  // process lifetime
  SpmHandle spm_;
  bool add_bos_;
  bool add_eos_;
  int32_t vocab_size_;
  std::vector<std::string> pieces_;  // by id
  std::vector<bool> special_;        // by id: control or unknown piece
  std::vector<std::pair<std::string, int32_t>> special_pieces_;
  std::array<bool, 256> special_first_byte_;  // bytes that start some special piece (a cheap skip)
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& path, bool add_bos, bool add_eos) {
  if (!FileExists(path)) return absl::NotFoundError(StrCat(path, ": no such file"));
  SEEDLING_ASSIGN_OR_RETURN(std::string data, ReadFile(path));
  SEEDLING_ASSIGN_OR_RETURN(const SpmLibrary* lib, OpenSpmLibrary());
  seedling_spm* raw = nullptr;
  char err[512];
  if (lib->load(data.data(), data.size(), &raw, err, sizeof(err)) != 0) {
    return absl::InvalidArgumentError(StrCat(path, ": not a SentencePiece model: ", err));
  }
  SpmHandle spm(raw, SpmDeleter{lib});
  if (lib->piece_size(spm.get()) <= 0) {
    return absl::InvalidArgumentError(StrCat(path, ": the model has no pieces"));
  }
  return std::make_unique<SentencePieceTokenizer>(lib, std::move(spm), add_bos, add_eos);
}

}  // namespace seedling::model::internal
