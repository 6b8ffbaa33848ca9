#include "model/tokenizer.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/file.h"

namespace seedling::model {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

// ---- Helpers ------------------------------------------------------------------------------------

std::string U8(char32_t c) {
  std::string s;
  if (c < 0x80) {
    s += static_cast<char>(c);
  } else if (c < 0x800) {
    s += static_cast<char>(0xC0 | (c >> 6));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += static_cast<char>(0xE0 | (c >> 12));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (c >> 18));
    s += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  }
  return s;
}

const std::string kMeta = "\xE2\x96\x81";  // "▁", SentencePiece's space

// GPT-2's bytes_to_unicode, written plainly as the reference: printable bytes stand for themselves,
// the others take U+0100, U+0101, ... in byte order.
char32_t RefByteChar(int b) {
  auto printable = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255); };
  if (printable(b)) return static_cast<char32_t>(b);
  int n = 0;
  for (int x = 0; x < b; ++x) n += printable(x) ? 0 : 1;
  return static_cast<char32_t>(256 + n);
}

// `bytes` in the byte-level alphabet ("Ġ" for a space).
std::string BL(std::string_view bytes) {
  std::string s;
  for (char c : bytes) s += U8(RefByteChar(static_cast<unsigned char>(c)));
  return s;
}

json ByteLevelPre(bool use_regex = true) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}
json ByteLevelDecoder() { return ByteLevelPre(); }

// A BPE model section under construction: tokens get consecutive ids.
struct BpeBuilder {
  json vocab = json::object();
  json merges = json::array();
  int32_t next_id = 0;

  int32_t Add(const std::string& token) {
    if (!vocab.contains(token)) vocab[token] = next_id++;
    return vocab[token].get<int32_t>();
  }
  // Adds the merge a + b and its result; returns the result's id.
  int32_t Merge(const std::string& a, const std::string& b) {
    merges.push_back(a + " " + b);
    return Add(a + b);
  }
  int32_t Id(const std::string& token) const { return vocab.at(token).get<int32_t>(); }
  json Model() const {
    return {{"type", "BPE"},          {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
            {"byte_fallback", false}, {"vocab", vocab},     {"merges", merges}};
  }
};

// Byte-level vocabulary with id == byte value.
BpeBuilder ByteLevelBuilder() {
  BpeBuilder b;
  for (int i = 0; i < 256; ++i) b.Add(U8(RefByteChar(i)));
  return b;
}

std::string Document(const json& model, const json& normalizer, const json& pre_tokenizer, const json& post_processor,
                     const json& decoder, const json& added_tokens = json::array()) {
  json doc = {{"version", "1.0"},
              {"truncation", nullptr},
              {"padding", nullptr},
              {"added_tokens", added_tokens},
              {"normalizer", normalizer},
              {"pre_tokenizer", pre_tokenizer},
              {"post_processor", post_processor},
              {"decoder", decoder},
              {"model", model}};
  return doc.dump();
}

json AddedToken(int32_t id, const std::string& content, bool special = true) {
  return {{"id", id},        {"content", content},     {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", !special}, {"special", special}};
}

std::unique_ptr<Tokenizer> Parse(const std::string& doc) {
  auto t = ParseTokenizerJson(doc);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return std::move(*t);
}

Ids Enc(const Tokenizer& t, std::string_view text, bool add_special = false) {
  auto ids = t.Encode(text, add_special);
  INFO(ids.status().ToString());
  REQUIRE(ids.ok());
  return *ids;
}

std::string Dec(const Tokenizer& t, const Ids& ids, bool skip_special = false) {
  auto text = t.Decode(ids, skip_special);
  INFO(text.status().ToString());
  REQUIRE(text.ok());
  return *text;
}

// Random valid UTF-8 from a fixed seed: ASCII, accents, CJK, emoji, combining marks, spaces.
std::vector<std::string> RandomTexts(uint32_t seed, int count) {
  // clang-format off
  const std::vector<std::string> fragments = {
      "a", "b", "z", "Q", "the", " ", "  ", "   ", "\n", "\t", "\r\n", "0", "7", "42",
      ".", ",", "!", "'s", "'T", "<", "|", ">", "_",
      "\xC3\xA9", "\xC3\xB1", "\xC3\x9F", "\xCE\xA9", "\xD0\x96",  // é ñ ß Ω Ж
      "\xE4\xB8\xAD", "\xE6\x96\x87",  // 中 文
      "\xF0\x9F\x98\x80", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",  // emoji, one with a skin tone
      "e\xCC\x81", "\xCC\x88",  // combining marks
      "\xC2\xA0", "\xE3\x80\x80"};  // no-break and ideographic spaces
  // clang-format on
  std::mt19937 rng(seed);
  std::vector<std::string> texts;
  for (int i = 0; i < count; ++i) {
    std::string s;
    const int n = static_cast<int>(rng() % 40);
    for (int k = 0; k < n; ++k) s += fragments[rng() % fragments.size()];
    texts.push_back(s);
  }
  return texts;
}

std::string TempDir(const std::string& name) {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("seedling_tokenizer_test_" + std::to_string(getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A small byte-level tokenizer (GPT-2 layout) with a few merges and chat specials at 256..258.
struct ByteLevelFixture {
  BpeBuilder bpe = ByteLevelBuilder();
  int32_t im_start, im_end, eot;
  std::string doc;

  ByteLevelFixture() {
    bpe.Merge(BL(" "), "t");
    bpe.Merge("h", "e");
    bpe.Merge(BL(" t"), "he");
    bpe.Merge("l", "l");
    bpe.Merge("he", "ll");
    bpe.Merge("hell", "o");
    bpe.Merge(BL(" "), "w");
    bpe.Merge("o", "r");
    bpe.Merge(BL(" w"), "or");
    bpe.Merge("l", "d");
    bpe.Merge(BL(" wor"), "ld");
    im_start = bpe.next_id++;
    im_end = bpe.next_id++;
    eot = bpe.next_id++;
    const json added = json::array(
        {AddedToken(im_start, "<|im_start|>"), AddedToken(im_end, "<|im_end|>"), AddedToken(eot, "<|endoftext|>")});
    doc = Document(bpe.Model(), nullptr, ByteLevelPre(), {{"type", "ByteLevel"}}, ByteLevelDecoder(), added);
  }
};

// SentencePiece-style tokenizer.json (Llama-2 / TinyLlama layout): Prepend "▁" + Replace " " ->
// "▁", no pre-tokenizer, BPE with byte fallback, BOS template, Replace / ByteFallback / Fuse /
// Strip decoder.
struct SentencePieceStyleFixture {
  BpeBuilder bpe;
  std::string doc;

  explicit SentencePieceStyleFixture(bool byte_fallback = true, bool fuse_unk = true) {
    bpe.Add("<unk>");
    bpe.Add("<s>");
    bpe.Add("</s>");
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      bpe.Add(name);
    }
    for (const char* c : {"a", "b", "d", "e", "h", "l", "o", "r", "w", "t"}) bpe.Add(c);
    bpe.Add(kMeta);
    bpe.Merge(kMeta, "h");
    bpe.Merge("e", "l");
    bpe.Merge("el", "l");
    bpe.Merge(kMeta + "h", "ell");
    bpe.Merge(kMeta + "hell", "o");
    bpe.Merge(kMeta, "w");
    bpe.Merge("o", "r");
    bpe.Merge(kMeta + "w", "or");
    bpe.Merge(kMeta + "wor", "l");
    bpe.Merge(kMeta + "worl", "d");
    json model = bpe.Model();
    model["unk_token"] = "<unk>";
    model["byte_fallback"] = byte_fallback;
    model["fuse_unk"] = fuse_unk;
    const json normalizer = {{"type", "Sequence"},
                             {"normalizers",
                              {{{"type", "Prepend"}, {"prepend", kMeta}},
                               {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}}}}};
    const json post = {
        {"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", json::array()},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
    const json decoder = {{"type", "Sequence"},
                          {"decoders",
                           {{{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}},
                            {{"type", "ByteFallback"}},
                            {{"type", "Fuse"}},
                            {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
    const json added = json::array({AddedToken(0, "<unk>"), AddedToken(1, "<s>"), AddedToken(2, "</s>")});
    doc = Document(model, normalizer, nullptr, post, decoder, added);
  }
};

// Naive BPE for one word, written for clarity: find the lowest-ranked adjacent pair, merge its
// leftmost occurrence, repeat. The reference for the priority-queue implementation.
Ids NaiveBpe(const std::vector<std::string>& chars, const std::map<std::pair<std::string, std::string>, int>& ranks,
             const std::map<std::string, int32_t>& vocab) {
  std::vector<std::string> symbols = chars;
  while (true) {
    int best_rank = INT32_MAX;
    size_t best = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = ranks.find({symbols[i], symbols[i + 1]});
      if (it != ranks.end() && it->second < best_rank) best_rank = it->second, best = i;
    }
    if (best_rank == INT32_MAX) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  Ids ids;
  for (const auto& s : symbols) ids.push_back(vocab.at(s));
  return ids;
}

// ---- Byte-level BPE -----------------------------------------------------------------------------

TEST_CASE("Byte-level BPE applies merges lowest rank first, so merge order changes the ids", "[model][tokenizer]") {
  auto build = [](bool ll_first) {
    BpeBuilder b = ByteLevelBuilder();
    if (ll_first) {
      b.Merge("l", "l");    // 256 "ll"
      b.Merge("ll", "o");   // 257 "llo"
      b.Merge("h", "e");    // 258 "he"
      b.Merge("he", "ll");  // 259 "hell"
    } else {
      b.Merge("h", "e");    // 256 "he"
      b.Merge("l", "l");    // 257 "ll"
      b.Merge("he", "ll");  // 258 "hell"
      b.Merge("ll", "o");   // 259 "llo"
    }
    return Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder()));
  };
  // h e l l o: "he" then "ll" then "hell"; "llo" never applies because "ll" is gone.
  CHECK(Enc(*build(false), "hello") == Ids{258, 'o'});
  // h e l l o: "ll", then "llo", then "he"; "hell" never applies.
  CHECK(Enc(*build(true), "hello") == Ids{258, 257});
}

TEST_CASE("Byte-level BPE maps bytes through GPT-2's alphabet", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  // The vocabulary gives each byte-level character the id of its byte, so ids equal bytes.
  const std::string text = std::string("\x00\x01 \n\x7F\xC3\xA9\xF0\x9F\x98\x80", 11);
  Ids expected;
  for (unsigned char c : text) expected.push_back(c);
  CHECK(Enc(*t, text) == expected);
  CHECK(t->TokenToId("\xC4\xA0") == ' ');   // "Ġ"
  CHECK(t->TokenToId("\xC4\x8A") == '\n');  // "Ċ"
  CHECK(Dec(*t, expected) == text);
}

TEST_CASE("Byte-level BPE matches a naive BPE on random words", "[model][tokenizer]") {
  // Merges over a 4-letter alphabet build many overlapping tokens, so merge order matters
  // everywhere.
  BpeBuilder b = ByteLevelBuilder();
  std::map<std::pair<std::string, std::string>, int> ranks;
  std::mt19937 rng(7);
  const std::vector<std::string> letters = {"a", "b", "c", "d"};
  std::vector<std::string> tokens = letters;
  for (int i = 0; i < 60; ++i) {
    const std::string& x = tokens[rng() % tokens.size()];
    const std::string& y = tokens[rng() % tokens.size()];
    if (ranks.count({x, y}) || (x + y).size() > 8 || b.vocab.contains(x + y)) continue;
    ranks[{x, y}] = static_cast<int>(b.merges.size());
    b.Merge(x, y);
    tokens.push_back(x + y);
  }
  std::map<std::string, int32_t> vocab;
  for (auto it = b.vocab.begin(); it != b.vocab.end(); ++it) {
    vocab[it.key()] = it.value().get<int32_t>();
  }
  auto t = Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder()));
  for (int i = 0; i < 300; ++i) {
    std::vector<std::string> chars;
    std::string word;
    const int n = 1 + static_cast<int>(rng() % 300);
    for (int k = 0; k < n; ++k) {
      chars.push_back(letters[rng() % 4]);
      word += chars.back();
    }
    INFO(word);
    CHECK(Enc(*t, word) == NaiveBpe(chars, ranks, vocab));
  }
}

TEST_CASE("Merges load in both the 'a b' string and the [a, b] pair formats", "[model][tokenizer]") {
  BpeBuilder b = ByteLevelBuilder();
  b.Merge("h", "i");
  json model = b.Model();
  model["merges"] = json::array({json::array({"h", "i"})});
  auto pairs = Parse(Document(model, nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder()));
  auto strings = Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder()));
  CHECK(Enc(*pairs, "hi") == Ids{256});
  CHECK(Enc(*strings, "hi") == Ids{256});
}

TEST_CASE("The GPT-2 pre-tokenizer splits contractions, letters, digits, punctuation and whitespace",
          "[model][tokenizer]") {
  // With ignore_merges, a pre-token that is in the vocabulary comes out as one id, so the ids show
  // the split.
  BpeBuilder b = ByteLevelBuilder();
  // "  end": the first space stands alone (\s+(?!\S)); "\n  x": "\n " then " x"; trailing spaces
  // stay together.
  const std::vector<std::string> expected = {"Don", "'t",   " stop", " 2024", "now", "!?",
                                             " ",   " end", "\n ",   " x",    "   "};
  Ids expected_ids;
  for (const auto& p : expected) expected_ids.push_back(b.Add(BL(p)));
  json model = b.Model();
  model["ignore_merges"] = true;
  auto t = Parse(Document(model, nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder()));
  CHECK(Enc(*t, "Don't stop 2024now!?  end\n  x   ") == expected_ids);
}

TEST_CASE("Llama-3 style Split regex with ByteLevel(use_regex=false) and ignore_merges", "[model][tokenizer]") {
  const std::string llama3_regex =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  auto build = [&](bool ignore_merges) {
    BpeBuilder b = ByteLevelBuilder();
    b.Merge(BL(" "), "h");   // 256 " h"
    b.Merge(BL(" h"), "e");  // 257 " he"
    b.Merge("1", "2");       // 258 "12"
    b.Merge("12", "3");      // 259 "123"
    b.Add(BL(" hello"));     // 260: in the vocabulary, but no merge sequence reaches it
    b.Add("'S");             // 261
    json model = b.Model();
    model["ignore_merges"] = ignore_merges;
    const json pre = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", llama3_regex}}}, {"behavior", "Isolated"}, {"invert", false}},
          ByteLevelPre(false)}}};
    return Parse(Document(model, nullptr, pre, nullptr, ByteLevelDecoder()));
  };
  // " hello" is emitted whole; "12345" splits as "123" "45" (\p{N}{1,3}); "'S" matches
  // case-insensitively.
  CHECK(Enc(*build(true), " hello12345'S") == Ids{260, 259, '4', '5', 261});
  // Without ignore_merges the same word goes through the merges.
  CHECK(Enc(*build(false), " hello12345'S") == Ids{257, 'l', 'l', 'o', 259, '4', '5', '\'', 'S'});
}

TEST_CASE("The Digits pre-tokenizer with individual_digits keeps digits apart", "[model][tokenizer]") {
  auto build = [](bool digits) {
    BpeBuilder b = ByteLevelBuilder();
    b.Merge("1", "2");  // 256
    json pre = ByteLevelPre();
    if (digits) {
      pre = {{"type", "Sequence"},
             {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, ByteLevelPre()}}};
    }
    return Parse(Document(b.Model(), nullptr, pre, nullptr, ByteLevelDecoder()));
  };
  CHECK(Enc(*build(false), "a 12") == Ids{'a', ' ', 256});
  CHECK(Enc(*build(true), "a 12") == Ids{'a', ' ', '1', '2'});
}

TEST_CASE("Byte-level round trip: Decode(Encode(s)) == s for random UTF-8", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  for (const std::string& s : RandomTexts(11, 300)) {
    INFO(s);
    CHECK(Dec(*t, Enc(*t, s)) == s);
  }
}

// ---- SentencePiece-style tokenizer.json ---------------------------------------------------------

TEST_CASE("SentencePiece-style tokenizer.json gives the expected ids and text", "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  const Ids ids = Enc(*t, "hello world");
  CHECK(ids == Ids{f.bpe.Id(kMeta + "hello"), f.bpe.Id(kMeta + "world")});
  CHECK(Dec(*t, ids) == "hello world");
  // Prepend leaves empty text empty, as in Hugging Face.
  CHECK(Enc(*t, "").empty());
  CHECK(Enc(*t, "<s>") == Ids{1});
  // Two spaces: the first "▁" stands alone, the second starts "▁world".
  CHECK(Enc(*t, "hello  world") == Ids{f.bpe.Id(kMeta + "hello"), f.bpe.Id(kMeta), f.bpe.Id(kMeta + "world")});
}

TEST_CASE("Byte fallback encodes an unknown character as its UTF-8 byte tokens and decodes it back",
          "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  // "é" is C3 A9; byte token <0xXX> has id 3 + XX here.
  const Ids ids = Enc(*t, "h\xC3\xA9");
  CHECK(ids == Ids{f.bpe.Id(kMeta + "h"), 3 + 0xC3, 3 + 0xA9});
  CHECK(Dec(*t, ids) == "h\xC3\xA9");
}

TEST_CASE("Without byte fallback, a run of unknown characters becomes one unk with fuse_unk", "[model][tokenizer]") {
  SentencePieceStyleFixture fused(/*byte_fallback=*/false, /*fuse_unk=*/true);
  SentencePieceStyleFixture unfused(/*byte_fallback=*/false, /*fuse_unk=*/false);
  CHECK(Enc(*Parse(fused.doc), "h\xC3\xA9\xC3\xA9") == Ids{fused.bpe.Id(kMeta + "h"), 0});
  CHECK(Enc(*Parse(unfused.doc), "h\xC3\xA9\xC3\xA9") == Ids{unfused.bpe.Id(kMeta + "h"), 0, 0});
}

TEST_CASE("SentencePiece-style round trip: Decode(Encode(s)) == s for random UTF-8", "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  for (const std::string& s : RandomTexts(12, 300)) {
    INFO(s);
    CHECK(Dec(*t, Enc(*t, s)) == s);
  }
}

TEST_CASE("The Metaspace pre-tokenizer prepends '▁' only at the start with prepend_scheme first",
          "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  json doc = json::parse(f.doc);
  doc["normalizer"] = nullptr;
  doc["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", "first"}, {"split", true}};
  doc["decoder"] = {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", "first"}, {"split", true}};
  auto t = Parse(doc.dump());
  const int32_t hello = f.bpe.Id(kMeta + "hello");
  const int32_t world = f.bpe.Id(kMeta + "world");
  CHECK(Enc(*t, "hello world") == Ids{hello, world});
  CHECK(Dec(*t, Ids{hello, world}) == "hello world");
  // After a special token the text does not start the input, so no "▁" is prepended.
  CHECK(Enc(*t, "<s>hello") == Ids{1, f.bpe.Id("h"), f.bpe.Id("ell"), f.bpe.Id("o")});
}

TEST_CASE("Legacy Metaspace add_prefix_space=true prepends '▁' to every segment", "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  json doc = json::parse(f.doc);
  doc["normalizer"] = nullptr;
  doc["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", kMeta}, {"add_prefix_space", true}};
  auto t = Parse(doc.dump());
  CHECK(Enc(*t, "<s>hello") == Ids{1, f.bpe.Id(kMeta + "hello")});
}

TEST_CASE("An NFC normalizer makes decomposed and precomposed text encode the same", "[model][tokenizer]") {
  ByteLevelFixture f;
  json doc = json::parse(f.doc);
  doc["normalizer"] = {{"type", "NFC"}};
  auto nfc = Parse(doc.dump());
  auto plain = Parse(f.doc);
  CHECK(Enc(*nfc,
            "caf"
            "e\xCC\x81") == Enc(*nfc, "caf\xC3\xA9"));
  CHECK(Enc(*plain,
            "caf"
            "e\xCC\x81") != Enc(*plain, "caf\xC3\xA9"));
}

TEST_CASE("Lowercase and Replace(Regex) normalizers rewrite the text before the model", "[model][tokenizer]") {
  ByteLevelFixture f;
  json doc = json::parse(f.doc);
  doc["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       {{{"type", "Lowercase"}}, {{"type", "Replace"}, {"pattern", {{"Regex", "[0-9]+"}}}, {"content", "#"}}}}};
  auto t = Parse(doc.dump());
  CHECK(Enc(*t, "AB 123") == Enc(*t, "ab #"));
  CHECK(Enc(*t, "AB 123") == Ids{'a', 'b', ' ', '#'});
}

// ---- Added and special tokens -------------------------------------------------------------------

TEST_CASE("Added special tokens in the text encode as single ids", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  const Ids ids = Enc(*t, "<|im_start|>hello<|im_end|>");
  CHECK(ids == Ids{f.im_start, f.bpe.Id("hello"), f.im_end});
  CHECK(t->IsSpecial(f.im_start));
  CHECK_FALSE(t->IsSpecial(f.bpe.Id("hello")));
  CHECK(t->TokenToId("<|im_end|>") == f.im_end);
  CHECK(t->IdToToken(f.eot) == "<|endoftext|>");
  CHECK(t->vocab_size() == f.eot + 1);
}

TEST_CASE("Decode keeps special tokens unless skip_special_tokens", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  const Ids ids = Enc(*t, "<|im_start|>hello world<|im_end|>");
  CHECK(Dec(*t, ids) == "<|im_start|>hello world<|im_end|>");
  CHECK(Dec(*t, ids, /*skip_special=*/true) == "hello world");
}

TEST_CASE("The longest added token wins where several match", "[model][tokenizer]") {
  BpeBuilder b = ByteLevelBuilder();
  const json added = json::array({AddedToken(256, "<a>"), AddedToken(257, "<a><b>")});
  auto t = Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder(), added));
  CHECK(Enc(*t, "x<a><b><a>") == Ids{'x', 257, 256});
}

TEST_CASE("Added tokens honour lstrip, rstrip and single_word", "[model][tokenizer]") {
  BpeBuilder b = ByteLevelBuilder();
  json strip = AddedToken(256, "<m>");
  strip["lstrip"] = true;
  strip["rstrip"] = true;
  json word = AddedToken(257, "cat");
  word["single_word"] = true;
  auto t = Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder(), json::array({strip, word})));
  CHECK(Enc(*t, "a  <m>  b") == Ids{'a', 256, 'b'});
  CHECK(Enc(*t, "a cat") == Ids{'a', ' ', 257});
  CHECK(Enc(*t, "cats") == Ids{'c', 'a', 't', 's'});
}

TEST_CASE("TemplateProcessing prepends BOS only with add_special_tokens", "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  const int32_t hello = f.bpe.Id(kMeta + "hello");
  CHECK(Enc(*t, "hello", /*add_special=*/true) == Ids{1, hello});
  CHECK(Enc(*t, "hello", /*add_special=*/false) == Ids{hello});
  CHECK(t->bos_id() == 1);
  CHECK_FALSE(t->eos_id().has_value());
  CHECK(Dec(*t, Ids{1, hello}, /*skip_special=*/true) == "hello");
}

TEST_CASE("A Sequence post-processor of ByteLevel and TemplateProcessing (Llama-3.2) adds BOS", "[model][tokenizer]") {
  ByteLevelFixture f;
  json doc = json::parse(f.doc);
  doc["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
        {{"type", "TemplateProcessing"},
         {"single",
          {{{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}},
           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
         {"special_tokens",
          {{"<|endoftext|>", {{"id", "<|endoftext|>"}, {"ids", {f.eot}}, {"tokens", {"<|endoftext|>"}}}}}}}}}};
  auto t = Parse(doc.dump());
  CHECK(Enc(*t, "hello", true) == Ids{f.eot, f.bpe.Id("hello")});
  CHECK(t->bos_id() == f.eot);
}

// ---- Errors -------------------------------------------------------------------------------------

TEST_CASE("Encoding invalid UTF-8 is InvalidArgument", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  for (const std::string& bad :
       {std::string("ab\xFF"), std::string("\xC3"), std::string("\xED\xA0\x80"), std::string("\xC0\xAF")}) {
    auto ids = t->Encode(bad);
    REQUIRE_FALSE(ids.ok());
    CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(ids.status().message()), Catch::Contains("not valid UTF-8"));
  }
}

TEST_CASE("Decoding an out-of-range id is InvalidArgument naming the id", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  for (const int32_t id : {t->vocab_size(), -1, 1 << 30}) {
    auto text = t->Decode(Ids{'a', id});
    REQUIRE_FALSE(text.ok());
    CHECK(text.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(text.status().message()), Catch::Contains("token id " + std::to_string(id)));
  }
}

void CheckInvalid(const std::string& doc, const std::string& expected_substring) {
  auto t = ParseTokenizerJson(doc);
  REQUIRE_FALSE(t.ok());
  CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(t.status().message()), Catch::Contains(expected_substring));
}

TEST_CASE("tokenizer.json without a model is InvalidArgument", "[model][tokenizer]") {
  json doc = json::parse(ByteLevelFixture().doc);
  doc.erase("model");
  CheckInvalid(doc.dump(), "tokenizer.json: model is missing");
}

TEST_CASE("tokenizer.json with an unknown pre-tokenizer type is InvalidArgument", "[model][tokenizer]") {
  json doc = json::parse(ByteLevelFixture().doc);
  doc["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {ByteLevelPre(), {{"type", "Foo"}}}}};
  CheckInvalid(doc.dump(), "pre_tokenizer.pretokenizers[1] type 'Foo' is not supported (supported: ");
}

TEST_CASE("tokenizer.json with a merge naming a token missing from the vocab is InvalidArgument",
          "[model][tokenizer]") {
  json doc = json::parse(ByteLevelFixture().doc);
  doc["model"]["merges"].push_back("h zz");
  CheckInvalid(doc.dump(), "names token 'zz', which is not in the vocab");
}

TEST_CASE("tokenizer.json that is not JSON, or has an unsupported model, is InvalidArgument", "[model][tokenizer]") {
  CheckInvalid("{\"model\": ", "not valid JSON");
  json doc = json::parse(ByteLevelFixture().doc);
  doc["model"]["type"] = "Unigram";
  CheckInvalid(doc.dump(), "model type 'Unigram' is not supported (supported: BPE)");
  doc = json::parse(ByteLevelFixture().doc);
  doc["model"]["dropout"] = 0.1;
  CheckInvalid(doc.dump(), "model.dropout");
  doc = json::parse(ByteLevelFixture().doc);
  doc["model"]["byte_fallback"] = "yes";
  CheckInvalid(doc.dump(), "model.byte_fallback must be a boolean, got string");
}

TEST_CASE("tokenizer.json with a Sequence normalizer nested 20,000 deep is refused, not a crash",
          "[model][tokenizer]") {
  // The reader recurses once per Sequence level; a hostile file used to overflow the stack.
  json doc = json::parse(ByteLevelFixture().doc);
  doc["normalizer"] = "@@";
  std::string text = doc.dump();
  std::string nested;
  constexpr int kDepth = 20000;
  for (int i = 0; i < kDepth; ++i) nested += R"({"type":"Sequence","normalizers":[)";
  nested += R"({"type":"NFC"})";
  for (int i = 0; i < kDepth; ++i) nested += "]}";
  text.replace(text.find("\"@@\""), 4, nested);
  CheckInvalid(text, "JSON nested deeper than 128 levels");
}

// ---- Concurrency and scale ----------------------------------------------------------------------

TEST_CASE("Concurrent Encode calls on one tokenizer agree with a serial run", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  const std::vector<std::string> texts = RandomTexts(13, 200);
  std::vector<Ids> serial;
  for (const auto& s : texts) serial.push_back(Enc(*t, s));
  auto fresh = Parse(f.doc);  // empty word cache, so the threads race to fill it
  std::vector<std::vector<Ids>> results(4);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (const auto& s : texts) results[k].push_back(*fresh->Encode(s));
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& r : results) CHECK(r == serial);
}

TEST_CASE("A long text without pre-tokenizer encodes as one word correctly", "[model][tokenizer]") {
  // SentencePiece-style tokenizers make the whole input one word (here 400 KB), which exercises the
  // priority-queue merge loop on a long symbol list. (Speed belongs in benchmarks, not here.)
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  std::string text;
  const int units = 16000;
  for (int i = 0; i < units; ++i) text += "hello world hello  world ";
  const Ids ids = Enc(*t, text);
  // Per unit: meta+hello, meta+world, meta+hello, meta, meta+world; the final space is a lone meta.
  CHECK(ids.size() == 5 * units + 1);
  CHECK(Dec(*t, ids) == text);
}

// ---- SentencePiece tokenizer.model --------------------------------------------------------------

// A SentencePiece ModelProto written field by field (protobuf wire format), so the test controls
// every piece and knows the exact ids. (Training one in-process is not possible: libsentencepiece
// is only reached through the dlopen'ed shim, whose trainer logs through an iostream the shim
// cannot use here.)
std::string ProtoVarint(uint64_t v) {
  std::string out;
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
  return out;
}
std::string ProtoBytes(int field, std::string_view bytes) {
  return ProtoVarint(static_cast<uint64_t>(field) << 3 | 2) + ProtoVarint(bytes.size()) + std::string(bytes);
}
std::string ProtoInt(int field, uint64_t v) { return ProtoVarint(static_cast<uint64_t>(field) << 3) + ProtoVarint(v); }
std::string ProtoFloat(int field, float f) {
  std::string out = ProtoVarint(static_cast<uint64_t>(field) << 3 | 5);
  char bytes[4];
  std::memcpy(bytes, &f, 4);  // little-endian on every platform Seedling builds for
  return out + std::string(bytes, 4);
}

// ModelProto.SentencePiece.Type
enum PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kByte = 6 };

// A BPE model with byte fallback, identity normalization and kept whitespace (so it is lossless):
// <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then merged pieces ("▁hello"=263, "▁world"=268;
// the higher score merges first) and single characters.
struct SentencePieceModel {
  std::vector<std::string> pieces;
  std::string proto;

  SentencePieceModel() {
    auto add = [&](const std::string& piece, float score, PieceType type) {
      pieces.push_back(piece);
      proto += ProtoBytes(1, ProtoBytes(1, piece) + ProtoFloat(2, score) + ProtoInt(3, type));
    };
    add("<unk>", 0, kUnknown);
    add("<s>", 0, kControl);
    add("</s>", 0, kControl);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      add(name, 0, kByte);
    }
    float score = 0;
    for (const std::string& p :
         {kMeta + "h", std::string("el"), std::string("ell"), kMeta + "hell", kMeta + "hello", kMeta + "w",
          std::string("or"), kMeta + "wor", kMeta + "worl", kMeta + "world", kMeta, std::string("h"), std::string("e"),
          std::string("l"), std::string("o"), std::string("w"), std::string("r"), std::string("d")}) {
      add(p, score, kNormal);
      score -= 1;
    }
    const std::string trainer = ProtoInt(3, 2 /*BPE*/) + ProtoInt(4, pieces.size()) + ProtoInt(35, 1 /*byte_fallback*/);
    const std::string normalizer = ProtoBytes(1, "identity") + ProtoBytes(2, "") + ProtoInt(4, 0 /*keep spaces*/);
    proto += ProtoBytes(2, trainer) + ProtoBytes(3, normalizer);
  }
  int32_t Id(const std::string& piece) const {
    return static_cast<int32_t>(std::find(pieces.begin(), pieces.end(), piece) - pieces.begin());
  }
  std::string Write(const std::string& path) const {
    std::ofstream(path, std::ios::binary) << proto;
    return path;
  }
};

std::unique_ptr<Tokenizer> LoadSp(const std::string& path, bool add_bos, bool add_eos) {
  auto t = LoadSentencePieceTokenizer(path, add_bos, add_eos);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return std::move(*t);
}

TEST_CASE("A SentencePiece tokenizer.model encodes with its merges and byte fallback", "[model][tokenizer]") {
  const std::string dir = TempDir("sp_ids");
  SentencePieceModel m;
  auto t = LoadSp(m.Write(dir + "/tokenizer.model"), true, false);
  CHECK(t->vocab_size() == static_cast<int32_t>(m.pieces.size()));
  CHECK(Enc(*t, "hello world") == Ids{m.Id(kMeta + "hello"), m.Id(kMeta + "world")});
  // "é" is not a piece: its bytes C3 A9 become <0xC3> <0xA9>.
  CHECK(Enc(*t, "h\xC3\xA9") == Ids{m.Id(kMeta + "h"), 3 + 0xC3, 3 + 0xA9});
  CHECK(t->IdToToken(3 + 0xC3) == "<0xC3>");
  CHECK(t->TokenToId(kMeta + "world") == m.Id(kMeta + "world"));
  CHECK_FALSE(t->TokenToId("nope").has_value());
  CHECK(Dec(*t, Enc(*t, "h\xC3\xA9")) == "h\xC3\xA9");
  std::filesystem::remove_all(dir);
}

TEST_CASE("A SentencePiece tokenizer.model adds BOS / EOS as asked and treats control pieces as special",
          "[model][tokenizer]") {
  const std::string dir = TempDir("sp_bos");
  SentencePieceModel m;
  const std::string path = m.Write(dir + "/tokenizer.model");
  auto bos = LoadSp(path, /*add_bos=*/true, /*add_eos=*/false);
  auto eos = LoadSp(path, /*add_bos=*/false, /*add_eos=*/true);
  const int32_t hello = m.Id(kMeta + "hello");
  CHECK(bos->bos_id() == 1);
  CHECK(bos->eos_id() == 2);
  CHECK(Enc(*bos, "hello", /*add_special=*/true) == Ids{1, hello});
  CHECK(Enc(*bos, "hello", /*add_special=*/false) == Ids{hello});
  CHECK(Enc(*eos, "hello", /*add_special=*/true) == Ids{hello, 2});
  CHECK(bos->IsSpecial(1));
  CHECK(bos->IsSpecial(0));
  CHECK_FALSE(bos->IsSpecial(hello));
  // Text equal to a control piece is that piece.
  CHECK(Enc(*bos, "hello</s>") == Ids{hello, 2});
  CHECK(Dec(*bos, Ids{1, hello, 2}) == "<s>hello</s>");
  CHECK(Dec(*bos, Ids{1, hello, 2}, /*skip_special=*/true) == "hello");
  std::filesystem::remove_all(dir);
}

TEST_CASE("SentencePiece tokenizer.model round trip: Decode(Encode(s)) == s for random UTF-8", "[model][tokenizer]") {
  const std::string dir = TempDir("sp_rt");
  SentencePieceModel m;
  auto t = LoadSp(m.Write(dir + "/tokenizer.model"), true, false);
  for (const std::string& s : RandomTexts(14, 300)) {
    INFO(s);
    CHECK(Dec(*t, Enc(*t, s)) == s);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Loading a SentencePiece model reports missing and malformed files", "[model][tokenizer]") {
  const std::string dir = TempDir("sp_bad");
  CHECK(LoadSentencePieceTokenizer(dir + "/missing.model").status().code() == absl::StatusCode::kNotFound);
  std::ofstream(dir + "/junk.model") << "not a model";
  auto junk = LoadSentencePieceTokenizer(dir + "/junk.model");
  CHECK(junk.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(junk.status().message()), Catch::Contains("junk.model: not a SentencePiece model"));
  std::filesystem::remove_all(dir);
}

// ---- LoadTokenizer ------------------------------------------------------------------------------

TEST_CASE("LoadTokenizer reads tokenizer.json and takes EOS from tokenizer_config.json", "[model][tokenizer]") {
  const std::string dir = TempDir("dir_json");
  ByteLevelFixture f;
  REQUIRE(WriteFileAtomic(dir + "/tokenizer.json", f.doc).ok());
  REQUIRE(WriteFileAtomic(dir + "/tokenizer_config.json",
                          R"({"add_bos_token": false, "bos_token": null,
                              "eos_token": {"content": "<|im_end|>", "special": true}})")
              .ok());
  auto t = LoadTokenizer(dir);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  CHECK((*t)->eos_id() == f.im_end);
  CHECK_FALSE((*t)->bos_id().has_value());
  CHECK(Enc(**t, "hello") == Ids{f.bpe.Id("hello")});
  std::filesystem::remove_all(dir);
}

TEST_CASE("LoadTokenizer falls back to tokenizer.model and honours add_bos_token", "[model][tokenizer]") {
  const std::string dir = TempDir("dir_sp");
  SentencePieceModel m;
  m.Write(dir + "/tokenizer.model");
  const int32_t hello = m.Id(kMeta + "hello");
  auto with_bos = LoadTokenizer(dir);
  INFO(with_bos.status().ToString());
  REQUIRE(with_bos.ok());
  CHECK(Enc(**with_bos, "hello", true) == Ids{1, hello});
  REQUIRE(WriteFileAtomic(dir + "/tokenizer_config.json",
                          R"({"add_bos_token": false, "add_eos_token": true, "bos_token": "<s>"})")
              .ok());
  auto eos_only = LoadTokenizer(dir);
  REQUIRE(eos_only.ok());
  CHECK(Enc(**eos_only, "hello", true) == Ids{hello, 2});
  std::filesystem::remove_all(dir);
}

TEST_CASE("LoadTokenizer reports a missing tokenizer and a malformed tokenizer_config.json", "[model][tokenizer]") {
  const std::string dir = TempDir("dir_bad");
  CHECK(LoadTokenizer(dir).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(WriteFileAtomic(dir + "/tokenizer.json", ByteLevelFixture().doc).ok());
  REQUIRE(WriteFileAtomic(dir + "/tokenizer_config.json", R"({"add_bos_token": "yes"})").ok());
  auto t = LoadTokenizer(dir);
  REQUIRE_FALSE(t.ok());
  CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(t.status().message()),
             Catch::Contains("tokenizer_config.json: add_bos_token must be a boolean"));
  std::filesystem::remove_all(dir);
}

// ---- Trainer ------------------------------------------------------------------------------------

// About 100 KB of text: a few very common words and a few hundred made-up ones with skewed
// frequencies.
std::string TrainingCorpus() {
  const std::vector<std::string> syllables = {"ka", "lo", "mi", "ne", "ru", "sa",       "to",
                                              "vi", "ze", "qu", "sh", "th", "\xC3\xA9", "\xE4\xB8\xAD"};
  std::mt19937 rng(99);
  std::vector<std::string> words = {"the", "federated", "learning", "and", "phone"};
  while (words.size() < 400) {
    std::string w;
    for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) {
      w += syllables[rng() % syllables.size()];
    }
    words.push_back(w);
  }
  std::string corpus;
  while (corpus.size() < 100000) {
    const int n = 5 + static_cast<int>(rng() % 15);
    for (int i = 0; i < n; ++i) {
      const size_t pick = rng() % 3 == 0 ? rng() % 5 : rng() % (1 + rng() % words.size());
      corpus += (i ? " " : "") + words[pick];
    }
    corpus += rng() % 4 == 0 ? ".\n" : std::to_string(rng() % 100) + ". ";
  }
  return corpus;
}

TEST_CASE("The BPE trainer writes a tokenizer.json that loads, round-trips and learns common words",
          "[model][tokenizer]") {
  BpeTrainerOptions options;
  options.vocab_size = 600;
  auto doc = TrainByteLevelBpeTokenizerJson(TrainingCorpus(), options);
  INFO(doc.status().ToString());
  REQUIRE(doc.ok());
  auto t = Parse(*doc);
  CHECK(t->vocab_size() <= 600);
  CHECK(t->vocab_size() > 256 + 3 + 50);
  CHECK(Enc(*t, " federated").size() == 1);
  CHECK(Enc(*t, " the").size() == 1);
  CHECK(Enc(*t, "<|im_start|>") == Ids{1});
  CHECK(t->IsSpecial(0));
  for (const std::string& s : RandomTexts(15, 200)) {
    INFO(s);
    CHECK(Dec(*t, Enc(*t, s)) == s);
  }
}

TEST_CASE("The BPE trainer output has the Hugging Face layout", "[model][tokenizer]") {
  BpeTrainerOptions options;
  options.vocab_size = 400;
  auto text = TrainByteLevelBpeTokenizerJson(TrainingCorpus(), options);
  REQUIRE(text.ok());
  const json doc = json::parse(*text);
  CHECK(doc["version"] == "1.0");
  CHECK(doc["truncation"].is_null());
  CHECK(doc["padding"].is_null());
  CHECK(doc["normalizer"].is_null());
  CHECK(doc["pre_tokenizer"] == ByteLevelPre());
  CHECK(doc["post_processor"]["type"] == "ByteLevel");
  CHECK(doc["decoder"]["type"] == "ByteLevel");
  REQUIRE(doc["added_tokens"].size() == 3);
  CHECK(doc["added_tokens"][2] == AddedToken(2, "<|im_end|>"));
  const json& model = doc["model"];
  CHECK(model["type"] == "BPE");
  CHECK(model["vocab"].size() == 400);
  CHECK(model["merges"].size() == 400 - 256 - 3);
  // Specials first, then the 256 byte characters in code point order ("!" first), then merged
  // tokens.
  CHECK(model["vocab"]["<|endoftext|>"] == 0);
  CHECK(model["vocab"]["!"] == 3);
  CHECK(model["vocab"][BL(std::string(1, '\xFF'))] == 3 + 187);
  CHECK(model["vocab"][BL(" ")] > 3 + 187);
}

TEST_CASE("The BPE trainer is deterministic and respects vocab_size", "[model][tokenizer]") {
  BpeTrainerOptions options;
  options.vocab_size = 500;
  const std::string corpus = TrainingCorpus();
  auto a = TrainByteLevelBpeTokenizerJson(corpus, options);
  auto b = TrainByteLevelBpeTokenizerJson(corpus, options);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(*a == *b);
  CHECK(Parse(*a)->vocab_size() == 500);
  options.vocab_size = 258;
  CHECK(TrainByteLevelBpeTokenizerJson(corpus, options).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("The BPE trainer breaks count ties towards the pair with the smaller ids", "[model][tokenizer]") {
  BpeTrainerOptions options;
  options.vocab_size = 256 + 3 + 1;
  options.min_frequency = 1;
  // Every pair occurs once; (a, b) has the smallest ids ('Ġ' sorts after the letters).
  auto doc = TrainByteLevelBpeTokenizerJson("cd ab", options);
  REQUIRE(doc.ok());
  CHECK(json::parse(*doc)["model"]["merges"] == json::array({"a b"}));
}

TEST_CASE("The BPE trainer stops when no pair reaches min_frequency", "[model][tokenizer]") {
  BpeTrainerOptions options;
  options.vocab_size = 1000;
  options.min_frequency = 3;
  // "ab" occurs three times and "cd" twice: only the pair (a, b) qualifies.
  auto doc = TrainByteLevelBpeTokenizerJson("ab ab ab cd cd", options);
  REQUIRE(doc.ok());
  const json parsed = json::parse(*doc);
  CHECK(parsed["model"]["merges"] == json::array({"a b"}));
}

TEST_CASE("The SentencePiece-style trainer writes a Gemma-style tokenizer.json that round-trips any text",
          "[model][tokenizer]") {
  SentencePieceTrainerOptions options;
  options.vocab_size = 700;
  auto doc = TrainSentencePieceBpeTokenizerJson(TrainingCorpus(), options);
  INFO(doc.status().ToString());
  REQUIRE(doc.ok());
  const json parsed = json::parse(*doc);
  CHECK(parsed["normalizer"]["type"] == "Replace");
  CHECK(parsed["pre_tokenizer"].is_null());
  CHECK(parsed["model"]["byte_fallback"] == true);
  CHECK(parsed["model"]["unk_token"] == "<unk>");
  const json& vocab = parsed["model"]["vocab"];
  CHECK(vocab["<pad>"] == 0);
  CHECK(vocab["<eos>"] == 1);
  CHECK(vocab["<bos>"] == 2);
  CHECK(vocab["<0x00>"] == 4);
  CHECK(vocab["<0xFF>"] == 4 + 255);
  CHECK(vocab.size() == 700);
  auto t = Parse(*doc);
  // Common words become one token with their leading "▁"; the text gets <bos> only when asked.
  CHECK(Enc(*t, " the federated").size() == 2);
  auto with_bos = t->Encode("the", /*add_special_tokens=*/true);
  REQUIRE(with_bos.ok());
  CHECK(with_bos->front() == 2);
  // Characters the corpus never had fall back to their UTF-8 bytes and decode back.
  const Ids fallback = Enc(*t, "\xE2\x82\xAC");  // €
  CHECK(fallback == Ids{4 + 0xE2, 4 + 0x82, 4 + 0xAC});
  for (const std::string& s : RandomTexts(15, 200)) {
    INFO(s);
    CHECK(Dec(*t, Enc(*t, s)) == s);
  }
  CHECK(Dec(*t, Enc(*t, "  two  spaces, caf\xC3\xA9 \xE2\x82\xAC\n")) == "  two  spaces, caf\xC3\xA9 \xE2\x82\xAC\n");
  auto again = TrainSentencePieceBpeTokenizerJson(TrainingCorpus(), options);
  REQUIRE(again.ok());
  CHECK(*again == *doc);  // deterministic
}

TEST_CASE("The SentencePiece-style trainer refuses options it cannot honour, naming them", "[model][tokenizer]") {
  SentencePieceTrainerOptions small;
  small.vocab_size = 262;  // below 4 specials + 256 bytes + the corpus's characters
  auto s = TrainSentencePieceBpeTokenizerJson(TrainingCorpus(), small);
  CHECK(s.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.status().message()), Catch::Contains("vocab_size"));
  SentencePieceTrainerOptions no_bos;
  no_bos.bos_token = "<s>";
  auto b = TrainSentencePieceBpeTokenizerJson(TrainingCorpus(), no_bos);
  CHECK(b.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(b.status().message()), Catch::Contains("<s>"));
  SentencePieceTrainerOptions byte_name;
  byte_name.special_tokens.push_back("<0x41>");
  CHECK(TrainSentencePieceBpeTokenizerJson(TrainingCorpus(), byte_name).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(TrainSentencePieceBpeTokenizerJson("bad \xFF utf-8", {}).status().code() == absl::StatusCode::kInvalidArgument);
}

// ---- Vocabulary ---------------------------------------------------------------------------------

TokenizerVocabulary Vocab(const Tokenizer& t) {
  auto v = t.Vocabulary();
  INFO(v.status().ToString());
  REQUIRE(v.ok());
  REQUIRE(v->tokens.size() == static_cast<size_t>(t.vocab_size()));
  REQUIRE(v->scores.size() == v->tokens.size());
  REQUIRE(v->types.size() == v->tokens.size());
  return *std::move(v);
}

TEST_CASE("Vocabulary of a byte-level tokenizer.json lists typed tokens and ranked merges", "[model][tokenizer]") {
  ByteLevelFixture f;
  auto t = Parse(f.doc);
  const TokenizerVocabulary v = Vocab(*t);
  CHECK(v.kind == TokenizerVocabulary::Kind::kByteLevelBpe);
  CHECK(v.pre_tokenizer == TokenizerVocabulary::PreTokenizer::kGpt2);
  for (int32_t id = 0; id < t->vocab_size(); ++id) {
    INFO(id);
    CHECK(v.tokens[id] == t->IdToToken(id).value());
    const bool special = id == f.im_start || id == f.im_end || id == f.eot;
    CHECK(v.types[id] == (special ? TokenizerVocabulary::kControl : TokenizerVocabulary::kNormal));
  }
  CHECK(v.tokens[f.eot] == "<|endoftext|>");
  std::vector<std::pair<std::string, std::string>> expected;
  for (const json& m : f.bpe.merges) {
    const std::string s = m.get<std::string>();
    expected.emplace_back(s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1));
  }
  CHECK(v.merges == expected);
  // Merged tokens score minus their merge rank; the rest 0.
  CHECK(v.scores[f.bpe.Id(BL(" t"))] == 0.0f);
  CHECK(v.scores[f.bpe.Id("he")] == -1.0f);
  CHECK(v.scores[f.bpe.Id(BL(" world"))] == -10.0f);
  CHECK(v.scores['a'] == 0.0f);
  // The ByteLevel post-processor adds nothing.
  CHECK_FALSE(v.add_bos);
  CHECK_FALSE(v.add_eos);
  CHECK_FALSE(v.bos_id.has_value());
  CHECK_FALSE(v.unk_id.has_value());
}

TEST_CASE("Vocabulary recognizes the SmolLM, Llama 3 and Qwen2 pre-tokenizers and nothing close to them",
          "[model][tokenizer]") {
  const std::string llama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  const std::string qwen2 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  auto split = [](const std::string& regex, const std::string& behavior = "Isolated") {
    return json{{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", behavior}, {"invert", false}},
                  ByteLevelPre(false)}}};
  };
  const json digits = {{"type", "Sequence"},
                       {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, ByteLevelPre()}}};
  json prefixed = ByteLevelPre();
  prefixed["add_prefix_space"] = true;
  auto pre_of = [](const json& pre) {
    BpeBuilder b = ByteLevelBuilder();
    return Vocab(*Parse(Document(b.Model(), nullptr, pre, nullptr, ByteLevelDecoder()))).pre_tokenizer;
  };
  using Pre = TokenizerVocabulary::PreTokenizer;
  CHECK(pre_of(ByteLevelPre()) == Pre::kGpt2);
  CHECK(pre_of(digits) == Pre::kGpt2Digits);
  CHECK(pre_of(split(llama3)) == Pre::kLlama3);
  CHECK(pre_of(split(qwen2)) == Pre::kQwen2);
  CHECK(pre_of(prefixed) == Pre::kOther);
  CHECK(pre_of(split(llama3, "Removed")) == Pre::kOther);
  CHECK(pre_of(split(R"(\p{L}+|\p{N})")) == Pre::kOther);
  CHECK(pre_of(ByteLevelPre(false)) == Pre::kOther);
}

TEST_CASE("Vocabulary of a SentencePiece-style tokenizer.json types byte and unknown pieces and adds BOS",
          "[model][tokenizer]") {
  SentencePieceStyleFixture f;
  auto t = Parse(f.doc);
  const TokenizerVocabulary v = Vocab(*t);
  CHECK(v.kind == TokenizerVocabulary::Kind::kSentencePieceBpe);
  CHECK(v.pre_tokenizer == TokenizerVocabulary::PreTokenizer::kOther);
  CHECK(v.types[0] == TokenizerVocabulary::kUnknown);
  CHECK(v.types[1] == TokenizerVocabulary::kControl);
  CHECK(v.types[2] == TokenizerVocabulary::kControl);
  CHECK(v.tokens[3 + 0x41] == "<0x41>");
  CHECK(v.types[3 + 0x41] == TokenizerVocabulary::kByte);
  CHECK(v.types[f.bpe.Id("a")] == TokenizerVocabulary::kNormal);
  CHECK(v.unk_id == 0);
  CHECK(v.bos_id == 1);
  CHECK(v.add_bos);
  CHECK_FALSE(v.add_eos);
  // "▁h" is the first merge, "▁world" the tenth.
  CHECK(v.scores[f.bpe.Id(kMeta + "h")] == 0.0f);
  CHECK(v.scores[f.bpe.Id("el")] == -1.0f);
  CHECK(v.scores[f.bpe.Id(kMeta + "world")] == -9.0f);
  CHECK(v.merges.size() == 10);
}

TEST_CASE("Vocabulary of a tokenizer.json with holes in its ids marks them unused", "[model][tokenizer]") {
  BpeBuilder b = ByteLevelBuilder();
  const json added = json::array({AddedToken(300, "<|endoftext|>")});
  auto t = Parse(Document(b.Model(), nullptr, ByteLevelPre(), nullptr, ByteLevelDecoder(), added));
  const TokenizerVocabulary v = Vocab(*t);
  REQUIRE(v.tokens.size() == 301);
  CHECK(v.tokens[256].empty());
  CHECK(v.types[256] == TokenizerVocabulary::kUnused);
  CHECK(v.types[299] == TokenizerVocabulary::kUnused);
  CHECK(v.tokens[300] == "<|endoftext|>");
  CHECK(v.types[300] == TokenizerVocabulary::kControl);
}

TEST_CASE("Vocabulary of a tokenizer.model carries SentencePiece's scores, types and special ids",
          "[model][tokenizer]") {
  const std::string dir = TempDir("sp_vocab");
  SentencePieceModel m;
  auto t = LoadSp(m.Write(dir + "/tokenizer.model"), /*add_bos=*/true, /*add_eos=*/false);
  const TokenizerVocabulary v = Vocab(*t);
  CHECK(v.kind == TokenizerVocabulary::Kind::kSentencePieceModel);
  CHECK(v.tokens == m.pieces);
  CHECK(v.types[0] == TokenizerVocabulary::kUnknown);
  CHECK(v.types[1] == TokenizerVocabulary::kControl);
  CHECK(v.types[3 + 0xC3] == TokenizerVocabulary::kByte);
  CHECK(v.types[m.Id(kMeta + "hello")] == TokenizerVocabulary::kNormal);
  // The model's own scores: 0, -1, -2, ... in the order the merged pieces were added.
  CHECK(v.scores[m.Id(kMeta + "h")] == 0.0f);
  CHECK(v.scores[m.Id(kMeta + "hello")] == -4.0f);
  CHECK(v.scores[m.Id("d")] == -17.0f);
  CHECK(v.merges.empty());
  CHECK(v.bos_id == 1);
  CHECK(v.eos_id == 2);
  CHECK(v.unk_id == 0);
  CHECK(v.add_bos);
  CHECK_FALSE(v.add_eos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Vocabulary takes BOS / EOS from tokenizer_config.json when the tokenizer has none", "[model][tokenizer]") {
  const std::string dir = TempDir("vocab_config");
  ByteLevelFixture f;
  REQUIRE(WriteFileAtomic(dir + "/tokenizer.json", f.doc).ok());
  REQUIRE(
      WriteFileAtomic(dir + "/tokenizer_config.json", R"({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})")
          .ok());
  auto t = LoadTokenizer(dir);
  REQUIRE(t.ok());
  const TokenizerVocabulary v = Vocab(**t);
  CHECK(v.bos_id == f.eot);
  CHECK(v.eos_id == f.im_end);
  CHECK_FALSE(v.add_bos);  // named in the config, but the tokenizer does not add it
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace seedling::model
