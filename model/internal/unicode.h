#pragma once

// Unicode helpers for the tokenizers: strict UTF-8, the character classes Hugging Face `tokenizers`
// uses (it is written in Rust, so "whitespace" means Rust's char::is_whitespace, and so on), ICU
// normalization, GPT-2's byte-level alphabet, and a PCRE2 regex wrapper.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct pcre2_real_code_8;  // pcre2.h stays out of this header (it needs PCRE2_CODE_UNIT_WIDTH
                           // first).

namespace seedling::model::internal {

// ---- UTF-8 --------------------------------------------------------------------------------------

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (RFC 3629: no
// overlong forms, no surrogates, nothing above U+10FFFF), or std::string_view::npos if `s` is
// valid.
size_t FindInvalidUtf8(std::string_view s);
inline bool IsValidUtf8(std::string_view s) { return FindInvalidUtf8(s) == std::string_view::npos; }
// OK, or InvalidArgument "<what> is not valid UTF-8: byte 0xC3 at offset 17".
absl::Status CheckUtf8(std::string_view s, std::string_view what);

// Length of the sequence that starts with `lead` (1 for ASCII and, defensively, for stray bytes).
inline int Utf8SequenceLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

// Decodes the code point at s[*pos] and advances *pos past it. `s` must be valid UTF-8 from *pos
// on.
char32_t NextCodePoint(std::string_view s, size_t* pos);

void AppendUtf8(char32_t c, std::string* out);
inline std::string Utf8(char32_t c) {
  std::string s;
  AppendUtf8(c, &s);
  return s;
}

// ---- Character classes (Rust's definitions) -----------------------------------------------------

bool IsWhitespace(char32_t c);   // White_Space property (char::is_whitespace)
bool IsNumeric(char32_t c);      // general category Nd, Nl or No (char::is_numeric)
bool IsPunctuation(char32_t c);  // ASCII punctuation or general category P* (tokenizers' is_punc)
bool IsMark(char32_t c);         // general category Mn, Mc or Me
bool IsWordChar(char32_t c);     // the Rust regex crate's \w: Alphabetic, M*, Nd, Pc, Join_Control

// ---- Normalization (ICU) ------------------------------------------------------------------------

enum class NormalizationForm { kNfc, kNfd, kNfkc, kNfkd };

// Normalizes valid UTF-8 `s`. Internal if ICU's normalization data is unavailable.
absl::StatusOr<std::string> NormalizeUnicode(std::string_view s, NormalizationForm form);

// Full Unicode lowercasing with the root locale (Rust's str::to_lowercase, including final sigma).
std::string ToLowerUnicode(std::string_view s);

// ---- GPT-2 byte-level alphabet ------------------------------------------------------------------

// GPT-2's bytes_to_unicode: the printable bytes '!'..'~', '¡'..'¬' and '®'..'ÿ' stand for
// themselves; the other 68 bytes, in increasing order, become U+0100, U+0101, ... so every byte is
// a visible character.
char32_t ByteToUnicode(uint8_t b);
// The inverse: the byte a character of that alphabet stands for, or -1 if `c` is not in the
// alphabet.
int UnicodeToByte(char32_t c);
// ByteToUnicode of every byte of `bytes`, as UTF-8.
std::string BytesToByteLevel(std::string_view bytes);

// ---- Regular expressions (PCRE2) ----------------------------------------------------------------

// A compiled PCRE2 pattern with Unicode semantics (PCRE2_UTF | PCRE2_UCP, so \s, \w and \d are
// Unicode aware and \p{L} / \p{N} work), JIT-compiled when the library supports it. Immutable and
// thread-safe: each search allocates its own match data.
class Regex {
 public:
  // InvalidArgument with PCRE2's message and the offset if `pattern` does not compile.
  static absl::StatusOr<Regex> Compile(std::string_view pattern);
  // A regex that matches `literal` exactly (metacharacters escaped).
  static absl::StatusOr<Regex> Literal(std::string_view literal);

  Regex(Regex&&) noexcept = default;
  Regex& operator=(Regex&&) noexcept = default;

  // Byte ranges [begin, end) of the successive non-overlapping, non-empty matches in `text`, which
  // must be valid UTF-8 (it is not re-checked, so that scanning a long text stays linear). Internal
  // if PCRE2 gives up (match or depth limit).
  absl::Status FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>* matches) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct CodeDeleter {
    void operator()(pcre2_real_code_8* code) const;
  };
  Regex(std::string pattern, std::unique_ptr<pcre2_real_code_8, CodeDeleter> code)
      : pattern_(std::move(pattern)), code_(std::move(code)) {}

  std::string pattern_;
  std::unique_ptr<pcre2_real_code_8, CodeDeleter> code_;
};

}  // namespace seedling::model::internal
