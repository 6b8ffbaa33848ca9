#pragma once

// Tokenizers for Hugging Face model directories:
//   * tokenizer.json with a BPE model, byte-level (GPT-2 / Llama-3 / Qwen2 / SmolLM) or SentencePiece-style
//     with byte fallback (Llama-2 / TinyLlama), with its normalizer, pre-tokenizer, added/special tokens,
//     post-processor and decoder;
//   * tokenizer.model (SentencePiece protobuf) through libsentencepiece.
// Also a byte-level BPE trainer, used by `seedling init-model` to write a real tokenizer.json.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::model {

// Everything a tokenizer knows about its ids, for exporting it to another runtime (model/gguf.h
// writes it as llama.cpp's tokenizer.ggml.* keys). Every per-id vector has Tokenizer::vocab_size()
// entries.
struct TokenizerVocabulary {
  enum class Kind {
    kByteLevelBpe,        // tokenizer.json BPE on GPT-2's byte alphabet (Llama 3, Qwen2, SmolLM)
    kSentencePieceBpe,    // tokenizer.json BPE on "▁"-escaped text, byte fallback (Llama 2)
    kSentencePieceModel,  // tokenizer.model, run by libsentencepiece
  };
  // Well-known pre-tokenizers of byte-level tokenizer.json files, recognized by their exact layout
  // (llama.cpp re-implements each one by name, so an approximate match would tokenize differently).
  enum class PreTokenizer {
    kOther,       // anything else
    kGpt2,        // ByteLevel(use_regex=true, add_prefix_space=false): GPT-2's regex
    kGpt2Digits,  // Digits(individual_digits=true) then the GPT-2 ByteLevel (SmolLM / SmolLM2)
    kLlama3,      // Split(Llama 3 regex, Isolated) then ByteLevel(use_regex=false)
    kQwen2,       // the same with Qwen2's regex (Llama 3's, but single digits)
  };
  // Token types: SentencePiece's ModelProto.SentencePiece.Type values, which GGUF also uses.
  enum TokenType : int32_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,      // special tokens (BOS, EOS, chat markers)
    kUserDefined = 4,  // added tokens that are not special
    kUnused = 5,       // ids without a token
    kByte = 6,         // "<0xXX>" byte-fallback pieces
  };

  Kind kind = Kind::kByteLevelBpe;
  PreTokenizer pre_tokenizer = PreTokenizer::kOther;  // kOther for the SentencePiece kinds
  // By id. An id without a token (a hole in a tokenizer.json vocabulary) has "" and type kUnused.
  // Byte-level tokens are in GPT-2's byte alphabet ("Ġthe"), SentencePiece ones use "▁"; added
  // tokens are their text.
  std::vector<std::string> tokens;
  // By id. SentencePiece models: the model's scores. tokenizer.json BPE: minus the rank of the
  // first merge that produces the token (so higher scores merge first, as in a SentencePiece BPE
  // model), 0 for other tokens.
  std::vector<float> scores;
  std::vector<int32_t> types;  // by id, TokenType values
  // tokenizer.json BPE merges in rank order (first merges first); empty for tokenizer.model.
  std::vector<std::pair<std::string, std::string>> merges;
  std::optional<int32_t> bos_id, eos_id, unk_id, pad_id;
  bool add_bos = false;  // Encode(text, add_special_tokens=true) prepends bos_id
  bool add_eos = false;  // ... and appends eos_id
  // SentencePiece kinds: "▁" is prepended to the text (the dummy prefix: Llama 2 yes, Gemma no; GGUF's
  // tokenizer.ggml.add_space_prefix). Always false for byte-level tokenizers.
  bool add_space_prefix = false;
};

// A loaded tokenizer. Immutable after loading; all methods are thread-safe.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Encodes UTF-8 `text` into token ids. With `add_special_tokens`, applies the tokenizer's post-processor
  // (e.g. prepends BOS for Llama-2/3 style tokenizers). Text equal to an added/special token's content is
  // encoded as that token. InvalidArgument if `text` is not valid UTF-8.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens = false) const = 0;

  // Decodes ids back to text (bytes; may be invalid UTF-8 if the ids split a character: byte tokens are
  // returned as they are, never replaced by U+FFFD). With `skip_special_tokens`, special tokens are
  // dropped. InvalidArgument naming the id if one is out of range.
  // For any valid UTF-8 `s`: Decode(Encode(s, false), false) == s, provided the tokenizer does not
  // normalize lossily. Byte-level tokenizers without a normalizer, SentencePiece-style tokenizer.json files
  // (for text without "▁") and tokenizer.model files with identity normalization are lossless; NFC /
  // lowercasing normalizers, Metaspace pre-tokenizers and add_prefix_space are not.
  virtual absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const = 0;

  // Number of ids (highest id + 1), including added tokens.
  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
  // True for added tokens marked special (e.g. "<s>", "<|endoftext|>").
  virtual bool IsSpecial(int32_t id) const = 0;

  // BOS / EOS as the tokenizer defines them (post-processor template, tokenizer_config.json, or the
  // SentencePiece model), if it defines them.
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;

  // The whole vocabulary with types, scores and merges (see TokenizerVocabulary). Built on each
  // call (it copies every token), so call it once per export, not per token.
  virtual absl::StatusOr<TokenizerVocabulary> Vocabulary() const = 0;
};

// Loads the tokenizer of a Hugging Face model directory: tokenizer.json if present, else tokenizer.model.
// tokenizer_config.json, when present, supplies add_bos_token / add_eos_token and bos/eos token names.
// NotFound if neither file exists; InvalidArgument (naming the file and the field) if a file is malformed or
// uses a component this implementation does not support. A GGUF file's path gives its tokenizer.ggml.* tokenizer
// (model/gguf_model.h).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir);

// Parses a tokenizer.json document (the file's contents).
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json);

// Loads a SentencePiece `tokenizer.model` file.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path, bool add_bos = true,
                                                                      bool add_eos = false);

// What a TokenizerVocabulary leaves implicit, for TokenizerFromVocabulary.
struct VocabularyTokenizerOptions {
  // SentencePiece kinds: prepend "▁" to the text and after every added token, and strip it again
  // when decoding (SentencePiece's add_dummy_prefix, GGUF's tokenizer.ggml.add_space_prefix).
  // Default true, as in Llama 2.
  bool add_space_prefix = true;
  std::string source = "vocabulary";  // names the vocabulary in error messages
};

// Builds a tokenizer from a vocabulary, the inverse of Tokenizer::Vocabulary() as llama.cpp
// interprets a GGUF vocabulary (model/gguf_model.h reads one):
//   * kByteLevelBpe: BPE on GPT-2's byte alphabet with `merges` and the pre-tokenizer
//     `pre_tokenizer` names (kOther is InvalidArgument); Llama 3's ignores merges for whole words.
//   * kSentencePieceBpe / kSentencePieceModel: BPE on "▁"-escaped text, with byte fallback when
//     there are kByte tokens. `merges`, or when empty every split of a token into two tokens
//     ranked by the token's score (llama.cpp's SentencePiece tokenizer joins the best-scoring
//     pair first).
// Tokens of type kControl and kUnknown are special added tokens, kUserDefined ones non-special
// added tokens; all are matched in the raw text first. Encode(text, true) adds bos_id / eos_id as
// add_bos / add_eos say; bos_id() / eos_id() are the vocabulary's. kUnused tokens are in the
// vocabulary but never produced.
// InvalidArgument, prefixed with options.source: per-id vectors of different lengths, an empty or
// duplicate token, an unknown type, a non-finite score, a special id outside the vocabulary,
// add_bos / add_eos without the id, or merges naming tokens that do not exist.
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromVocabulary(const TokenizerVocabulary& vocab,
                                                                   const VocabularyTokenizerOptions& options = {});

// Options for training a byte-level BPE tokenizer (GPT-2 style: bytes mapped to printable characters,
// GPT-2 pre-tokenizer regex).
struct BpeTrainerOptions {
  int32_t vocab_size = 4096;  // target number of ids including the 256 byte tokens and special tokens
  int32_t min_frequency = 2;  // a pair must occur at least this often to be merged
  // Added as special tokens with the lowest ids, in this order (SmolLM2 style).
  std::vector<std::string> special_tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
};

// Trains a byte-level BPE tokenizer on `corpus` and returns a complete tokenizer.json document (model,
// pre-tokenizer, decoder, added tokens) that ParseTokenizerJson and Hugging Face `tokenizers` both load.
// Stops early if no pair reaches min_frequency. InvalidArgument if vocab_size < 256 + specials.
absl::StatusOr<std::string> TrainByteLevelBpeTokenizerJson(std::string_view corpus, const BpeTrainerOptions& options);

// Options for training a SentencePiece-style BPE tokenizer (Gemma, Llama 2): spaces become "▁" (U+2581),
// the corpus's characters are the base symbols, bytes outside them fall back to <0xNN> tokens.
struct SentencePieceTrainerOptions {
  int32_t vocab_size = 4096;  // target number of ids including specials, the 256 byte tokens and characters
  int32_t min_frequency = 2;  // a pair must occur at least this often to be merged
  // Added as special tokens with the lowest ids, in this order: Gemma's <pad> 0, <eos> 1, <bos> 2, <unk> 3.
  std::vector<std::string> special_tokens = {"<pad>", "<eos>", "<bos>", "<unk>"};
  std::string bos_token = "<bos>";  // prepended by the post-processor
  std::string unk_token = "<unk>";  // the BPE model's unknown token
  // SentencePiece's dummy prefix: "▁" prepended to the text (a Prepend normalizer) and the decoder strips
  // the leading space again, as Llama 2's and Phi-3's converted tokenizers do; Gemma's has none.
  bool prepend_space = false;
};

// Trains a SentencePiece-style BPE tokenizer on `corpus` and returns a tokenizer.json document in the layout
// Hugging Face converts Gemma's tokenizer to: a Replace(" ", "▁") normalizer (with prepend_space, after a
// Prepend("▁"), as Llama 2's), no
// pre-tokenizer, merges learned within words (each starts at a "▁"), byte fallback, BOS added by the
// post-processor. Ids: the special tokens, <0x00>..<0xFF>, every character of the corpus in code point
// order, then the merges' results. InvalidArgument for invalid UTF-8, bad special tokens (empty, duplicate,
// a <0xNN> name, bos / unk not among them), or a vocab_size below the base tokens' count.
absl::StatusOr<std::string> TrainSentencePieceBpeTokenizerJson(std::string_view corpus,
                                                               const SentencePieceTrainerOptions& options);

}  // namespace seedling::model
