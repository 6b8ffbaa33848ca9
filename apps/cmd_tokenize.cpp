// tokenize: text to token ids (one JSON list per input line) and, with --decode, back.

#include <cstdio>
#include <filesystem>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_split.h"
#include "apps/commands.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/tokenizer.h"

namespace seedling::apps {
namespace {

// Longer lines are refused rather than held: no real prompt or id list comes near it.
constexpr int64_t kMaxLineBytes = 64 << 20;

struct TokenizeFlags {
  std::string tokenizer_file;  // --tokenizer: tokenizer.json, tokenizer.model or a GGUF file
  std::string model_dir;       // --model: a model directory or GGUF file (as LoadTokenizer takes it)
  std::string text;            // --text, when given
  std::string text_file;       // --text-file, when given
  bool text_given = false;     // --text was on the command line (its value may be empty)
  bool special = false;        // encode: add the tokenizer's special tokens; decode: keep them in the text
  bool decode = false;
};

// --tokenizer FILE: the kind follows the file name; anything but *.model and *.gguf is read as tokenizer.json.
absl::StatusOr<std::unique_ptr<model::Tokenizer>> LoadTokenizerFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(
        StrCat("--tokenizer '", path, "' is a directory; give a file, or the directory as --model"));
  }
  if (path.ends_with(".gguf")) return model::LoadTokenizer(path);
  if (path.ends_with(".model")) {
    if (!FileExists(path)) return absl::NotFoundError(StrCat("--tokenizer '", path, "' does not exist"));
    return model::LoadSentencePieceTokenizer(path);
  }
  SEEDLING_ASSIGN_OR_RETURN(std::string json, ReadFile(path));
  absl::StatusOr<std::unique_ptr<model::Tokenizer>> tokenizer = model::ParseTokenizerJson(json);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), path);
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<model::Tokenizer>> LoadTokenizerFromFlags(const TokenizeFlags& flags) {
  if (flags.tokenizer_file.empty() && flags.model_dir.empty()) {
    return absl::InvalidArgumentError("give --tokenizer FILE or --model DIR");
  }
  if (!flags.tokenizer_file.empty()) return LoadTokenizerFile(flags.tokenizer_file);
  return model::LoadTokenizer(flags.model_dir);
}

// One line of input as a JSON list of ids, each in [0, vocab_size).
absl::StatusOr<std::vector<int32_t>> ParseIdList(std::string_view line, int32_t vocab_size) {
  SEEDLING_ASSIGN_OR_RETURN(nlohmann::json doc, ParseJson(line, ""));
  if (!doc.is_array()) {
    return absl::InvalidArgumentError(StrCat("expected a JSON list of token ids, got a JSON ", doc.type_name()));
  }
  std::vector<int32_t> ids;
  ids.reserve(doc.size());
  for (const nlohmann::json& id : doc) {
    if (!id.is_number_integer()) {
      return absl::InvalidArgumentError(
          StrCat("expected integer token ids, got a JSON ", id.type_name(), " at position ", ids.size()));
    }
    const int64_t value = id.get<int64_t>();
    if (value < 0 || value >= vocab_size) {  // (an id past INT64_MAX reads as negative)
      return absl::InvalidArgumentError(
          StrCat("token id ", id.dump(), " is out of range (the vocabulary has ids 0 to ", vocab_size - 1, ")"));
    }
    ids.push_back(static_cast<int32_t>(value));
  }
  return ids;
}

// Encodes or decodes one line and prints the result on its own line.
absl::Status ConvertLine(const model::Tokenizer& tokenizer, const TokenizeFlags& flags, std::string_view text) {
  if (flags.decode) {
    SEEDLING_ASSIGN_OR_RETURN(std::vector<int32_t> ids, ParseIdList(text, tokenizer.vocab_size()));
    SEEDLING_ASSIGN_OR_RETURN(std::string decoded, tokenizer.Decode(ids, /*skip_special_tokens=*/!flags.special));
    std::fwrite(decoded.data(), 1, decoded.size(), stdout);
    std::fputc('\n', stdout);
    return absl::OkStatus();
  }
  SEEDLING_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(text, flags.special));
  std::printf("%s\n", nlohmann::json(ids).dump().c_str());
  return absl::OkStatus();
}

// Runs ConvertLine on every line of the input (--text, --text-file or stdin); an error names the line.
absl::Status ConvertInput(const model::Tokenizer& tokenizer, const TokenizeFlags& flags) {
  std::string source = "stdin";
  auto convert = [&](const Line& line) -> absl::Status {
    const std::string where = StrCat(source, " line ", line.number);
    if (line.too_long) return absl::InvalidArgumentError(StrCat(where, ": longer than ", kMaxLineBytes, " bytes"));
    return Annotate(ConvertLine(tokenizer, flags, line.text), where);
  };
  if (flags.text_given) {
    source = "--text";
    // An empty --text is one empty line (it encodes to []), not no input at all.
    if (flags.text.empty()) {
      Line empty;
      empty.number = 1;
      return convert(empty);
    }
    return ForEachLineIn(flags.text, kMaxLineBytes, convert);
  }
  // A file or stdin is read line by line, so its size never decides the memory this takes; a read error
  // names the flag, a line's error its line.
  const std::string path = flags.text_file.empty() ? "/dev/stdin" : flags.text_file;
  if (!flags.text_file.empty()) source = flags.text_file;
  bool line_failed = false;
  const absl::Status read = ForEachLine(path, kMaxLineBytes, [&](const Line& line) {
    absl::Status converted = convert(line);
    line_failed = !converted.ok();
    return converted;
  });
  if (read.ok() || line_failed) return read;
  return Annotate(read, flags.text_file.empty() ? "stdin" : "--text-file");
}

absl::Status RunTokenize(const TokenizeFlags& flags) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer, LoadTokenizerFromFlags(flags));
  const absl::Status converted = ConvertInput(*tokenizer, flags);
  std::fflush(stdout);
  return converted;
}

}  // namespace

void RegisterTokenizeCommands(CLI::App& app, Action& action) {
  auto flags = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Print the token ids of each input line as a JSON list; with --decode, the text of each id list");
  CLI::Option* tokenizer = cmd->add_option("--tokenizer", flags->tokenizer_file,
                                           "tokenizer.json, tokenizer.model or GGUF file (no tokenizer_config.json)");
  CLI::Option* model = cmd->add_option("--model", flags->model_dir, "Model directory or GGUF file");
  tokenizer->excludes(model);
  CLI::Option* text = cmd->add_option("--text", flags->text, "Input text (default: stdin)");
  CLI::Option* text_file = cmd->add_option("--text-file", flags->text_file, "Input file (default: stdin)");
  text->excludes(text_file);
  cmd->add_flag("--special", flags->special,
                "Encode: add the tokenizer's special tokens (e.g. BOS); decode: keep special tokens in the text");
  cmd->add_flag("--decode", flags->decode, "Input lines are JSON lists of ids; print their text");
  cmd->callback([flags, text, &action] {
    flags->text_given = text->count() > 0;
    action = [flags]() -> absl::Status { return RunTokenize(*flags); };
  });
}

}  // namespace seedling::apps
