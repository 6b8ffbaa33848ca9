#include "base/json.h"

#include <catch2/catch.hpp>
#include <string>

namespace seedling {
namespace {

std::string Nested(int depth, std::string_view open = "[", std::string_view close = "]") {
  std::string s;
  for (int i = 0; i < depth; ++i) s += open;
  for (int i = 0; i < depth; ++i) s += close;
  return s;
}

TEST_CASE("JsonNestingDepth counts arrays and objects and skips strings", "[base][json]") {
  CHECK(JsonNestingDepth("1") == 0);
  CHECK(JsonNestingDepth("{\"a\": [1, {\"b\": []}]}") == 4);
  CHECK(JsonNestingDepth("[\"[[[[\", \"\\\"[[[\"]") == 1);
  CHECK(JsonNestingDepth(Nested(5)) == 5);
  // The scan stops one past the limit: a huge document costs no more than it must.
  CHECK(JsonNestingDepth(Nested(100000), 10) == 11);
}

TEST_CASE("ParseJson refuses a document nested deeper than the bound with a clear error", "[base][json]") {
  auto ok = ParseJson(Nested(kMaxJsonDepth), "x.json");
  REQUIRE(ok.ok());
  CHECK(ok->is_array());

  // 20,000 levels: what a hostile tokenizer.json carried. It must fail fast, without recursing.
  auto deep = ParseJson(Nested(20000, "{\"a\":", "}"), "x.json");
  REQUIRE_FALSE(deep.ok());
  CHECK(deep.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(deep.status().message()).find("x.json: JSON nested deeper than 128 levels") != std::string::npos);
}

TEST_CASE("ParseJson's syntax errors give the place, not the text", "[base][json]") {
  auto bad = ParseJson("{\"a\": 1,\n \"secret-value\" }", "row");
  REQUIRE_FALSE(bad.ok());
  const std::string message(bad.status().message());
  CHECK(message.find("row: not valid JSON (syntax error at line 2") != std::string::npos);
  CHECK(message.find("secret-value") == std::string::npos);
  auto unnamed = ParseJson("[1,", "");
  REQUIRE_FALSE(unnamed.ok());
  CHECK(std::string(unnamed.status().message()).starts_with("not valid JSON"));
}

}  // namespace
}  // namespace seedling
