#include "model/internal/unicode.h"

#include <cstdio>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/bytestream.h>
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include "base/check.h"
#include "base/strings.h"

namespace seedling::model::internal {

// ---- UTF-8 --------------------------------------------------------------------------------------

absl::Status CheckUtf8(std::string_view s, std::string_view what) {
  const size_t bad = FindInvalidUtf8(s);
  if (bad == std::string_view::npos) return absl::OkStatus();
  char hex[8];
  std::snprintf(hex, sizeof(hex), "0x%02X", static_cast<unsigned char>(s[bad]));
  return absl::InvalidArgumentError(StrCat(what, " is not valid UTF-8: byte ", hex, " at offset ", bad));
}

size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Ranges of the second byte per lead byte follow RFC 3629 §4 (they exclude overlongs and
    // surrogates).
    int len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c == 0xE0) {
      len = 3, lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      len = 3;
    } else if (c == 0xED) {
      len = 3, hi = 0x9F;
    } else if (c == 0xF0) {
      len = 4, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      len = 4;
    } else if (c == 0xF4) {
      len = 4, hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (int k = 2; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

char32_t NextCodePoint(std::string_view s, size_t* pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + *pos;
  const int len = Utf8SequenceLength(p[0]);
  char32_t c;
  switch (len) {
    case 1:
      c = p[0];
      break;
    case 2:
      c = ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
      break;
    case 3:
      c = ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
      break;
    default:
      c = ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
      break;
  }
  *pos += len;
  return c;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// ---- Character classes --------------------------------------------------------------------------

bool IsWhitespace(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }

bool IsNumeric(char32_t c) {
  constexpr uint32_t kNumbers = U_GC_ND_MASK | U_GC_NL_MASK | U_GC_NO_MASK;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & kNumbers) != 0;
}

bool IsPunctuation(char32_t c) {
  if (c < 0x80) {
    return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
  }
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_P_MASK) != 0;
}

bool IsMark(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_M_MASK) != 0; }

bool IsWordChar(char32_t c) {
  const auto u = static_cast<UChar32>(c);
  return u_hasBinaryProperty(u, UCHAR_ALPHABETIC) ||
         (U_GET_GC_MASK(u) & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) != 0 ||
         u_hasBinaryProperty(u, UCHAR_JOIN_CONTROL);
}

// ---- Normalization ------------------------------------------------------------------------------

absl::StatusOr<std::string> NormalizeUnicode(std::string_view s, NormalizationForm form) {
  UErrorCode error = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = nullptr;
  switch (form) {
    case NormalizationForm::kNfc:
      normalizer = icu::Normalizer2::getNFCInstance(error);
      break;
    case NormalizationForm::kNfd:
      normalizer = icu::Normalizer2::getNFDInstance(error);
      break;
    case NormalizationForm::kNfkc:
      normalizer = icu::Normalizer2::getNFKCInstance(error);
      break;
    case NormalizationForm::kNfkd:
      normalizer = icu::Normalizer2::getNFKDInstance(error);
      break;
  }
  if (U_FAILURE(error) || normalizer == nullptr) {
    return absl::InternalError(StrCat("ICU normalizer unavailable: ", u_errorName(error)));
  }
  std::string out;
  out.reserve(s.size());
  icu::StringByteSink<std::string> sink(&out);
  normalizer->normalizeUTF8(0, icu::StringPiece(s.data(), static_cast<int32_t>(s.size())), sink, nullptr, error);
  if (U_FAILURE(error)) {
    return absl::InternalError(StrCat("ICU normalization failed: ", u_errorName(error)));
  }
  return out;
}

std::string ToLowerUnicode(std::string_view s) {
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), static_cast<int32_t>(s.size())));
  u.toLower(icu::Locale::getRoot());
  std::string out;
  u.toUTF8String(out);
  return out;
}

// ---- GPT-2 byte-level alphabet ------------------------------------------------------------------

namespace {

constexpr bool IsSelfMappedByte(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct ByteLevelTables {
  std::array<char32_t, 256> to_unicode{};
  std::array<int16_t, 256 + 68> to_byte{};  // indexed by code point; every mapped code point is below 324
};

constexpr ByteLevelTables MakeByteLevelTables() {
  ByteLevelTables t;
  for (auto& b : t.to_byte) b = -1;
  int next = 0;
  for (int b = 0; b < 256; ++b) {
    const char32_t c = IsSelfMappedByte(b) ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++);
    t.to_unicode[b] = c;
    t.to_byte[c] = static_cast<int16_t>(b);
  }
  return t;
}

constexpr ByteLevelTables kByteLevel = MakeByteLevelTables();

}  // namespace

char32_t ByteToUnicode(uint8_t b) { return kByteLevel.to_unicode[b]; }

int UnicodeToByte(char32_t c) { return c < kByteLevel.to_byte.size() ? kByteLevel.to_byte[c] : -1; }

std::string BytesToByteLevel(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char b : bytes) AppendUtf8(ByteToUnicode(static_cast<uint8_t>(b)), &out);
  return out;
}

// ---- Regex --------------------------------------------------------------------------------------

void Regex::CodeDeleter::operator()(pcre2_real_code_8* code) const { pcre2_code_free(code); }

absl::StatusOr<Regex> Regex::Compile(std::string_view pattern) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                                   &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    return absl::InvalidArgumentError(StrCat("regex '", pattern, "' does not compile at offset ", error_offset, ": ",
                                             reinterpret_cast<const char*>(message)));
  }
  // JIT is an optimization: without it (unsupported CPU, or a build without JIT) pcre2_match
  // interprets.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return Regex(std::string(pattern), std::unique_ptr<pcre2_real_code_8, CodeDeleter>(code));
}

absl::StatusOr<Regex> Regex::Literal(std::string_view literal) {
  // \Q...\E quotes everything except a literal "\E", which is spliced in as \\E.
  std::string pattern = "\\Q";
  size_t pos = 0;
  while (true) {
    const size_t e = literal.find("\\E", pos);
    if (e == std::string_view::npos) {
      pattern.append(literal.substr(pos));
      break;
    }
    pattern.append(literal.substr(pos, e - pos));
    pattern.append("\\E\\\\E\\Q");
    pos = e + 2;
  }
  pattern.append("\\E");
  return Compile(pattern);
}

absl::Status Regex::FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>* matches) const {
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
      pcre2_match_data_create_from_pattern(code_.get(), nullptr), &pcre2_match_data_free);
  SEEDLING_CHECK(data != nullptr, "out of memory");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos <= text.size()) {
    const int rc = pcre2_match(code_.get(), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, data.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      return absl::InternalError(StrCat("regex '", pattern_, "' failed: ", reinterpret_cast<const char*>(message)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const size_t begin = ovector[0], end = ovector[1];
    if (end > begin) {
      matches->emplace_back(begin, end);
      pos = end;
    } else {
      // An empty match: step over one character, as Rust's and Oniguruma's find_iter do.
      if (begin >= text.size()) break;
      pos = begin + Utf8SequenceLength(static_cast<unsigned char>(text[begin]));
    }
  }
  return absl::OkStatus();
}

}  // namespace seedling::model::internal
