#include "base/toml.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

namespace seedling {
namespace {

TEST_CASE("TomlKeyParts finds the longest dotted key and ignores values, strings and comments", "[base][toml]") {
  CHECK(TomlKeyParts("a = 1") == 1);
  CHECK(TomlKeyParts("[server]\nport = 8443\n") == 1);
  CHECK(TomlKeyParts("rate = 1.5") == 2);  // a float's one dot counts: values never reach the bound
  CHECK(TomlKeyParts("model.lora.rank = 8") == 3);
  CHECK(TomlKeyParts("[a . \"b.c\" . d]\nx = 1") == 3);
  CHECK(TomlKeyParts("x = \"a.b.c.d.e\" # f.g.h.i.j\ny = '''k.l.m.n.o'''") == 1);
  CHECK(TomlKeyParts("t = 1979-05-27T07:32:00.999Z") == 2);
}

TEST_CASE("ParseToml refuses keys 50,000 parts deep instead of overflowing the stack", "[base][toml]") {
  std::string key = "a";
  for (int i = 0; i < 50000; ++i) key += ".b";
  for (const std::string& doc : {key + " = 1", "[" + key + "]\nx = 1"}) {
    auto t = ParseToml(doc);
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("has 50001 parts; at most 64"));
  }
  auto ok = ParseToml("[server]\nport = 8443\nmodel.name = \"x\"");
  REQUIRE(ok.ok());
  CHECK((*ok)["server"]["model"]["name"].value<std::string>() == "x");
  auto bad = ParseToml("[server\nport = 1");
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::StartsWith("not valid TOML: ") && Catch::Contains("(line 1)"));
}

TEST_CASE("TomlInteger takes integer nodes within the type and refuses floats, negatives and overflow",
          "[base][toml]") {
  auto table = ParseToml(
      "byte = 255\nwide = 256\nnegative = -1\nhuge_float = 4.0e69\nwhole_float = 4.0\n"
      "text = \"7\"\n");
  REQUIRE(table.ok());
  auto read = [&](const char* key) { return TomlInteger<uint8_t>(*table->get(key)); };
  REQUIRE(read("byte").ok());
  CHECK(*read("byte") == 255);
  CHECK(read("wide").status().message() == "is out of range");
  CHECK(read("negative").status().message() == "must not be negative");
  // toml++'s value<int64_t>() would cast these (4.0e69 is undefined behaviour); only integer nodes count.
  CHECK(read("huge_float").status().message() == "must be an integer");
  CHECK(read("whole_float").status().message() == "must be an integer");
  CHECK(read("text").status().message() == "must be an integer");
  CHECK(*TomlInteger<int64_t>(*table->get("negative")) == -1);
}

TEST_CASE("TomlSection reads each type, names the table and key in errors, and refuses unknown keys", "[base][toml]") {
  auto root = ParseToml(
      "[t]\nflag = true\nname = \"x\"\nrate = 2\nlist = [\"a\", \"b\"]\nsmall = 7\n"
      "typo = 1\n");
  REQUIRE(root.ok());
  TomlSection t(root->get_as<toml::table>("t"), "t");
  bool flag = false;
  std::string name;
  double rate = 0;
  std::vector<std::string> list;
  uint8_t small = 0;
  int missing = 42;
  REQUIRE(t.Get("flag", flag).ok());
  REQUIRE(t.Get("name", name).ok());
  REQUIRE(t.Get("rate", rate).ok());  // an integer converts to a number
  REQUIRE(t.Get("list", list).ok());
  REQUIRE(t.Get("small", small).ok());
  REQUIRE(t.Get("missing", missing).ok());
  CHECK(flag);
  CHECK(name == "x");
  CHECK(rate == 2.0);
  CHECK(list == std::vector<std::string>{"a", "b"});
  CHECK(small == 7);
  CHECK(missing == 42);  // absent keys leave the default
  CHECK(t.CheckNoUnknownKeys().message() == "[t] typo: is not a known key");

  // A wrong type names the table and key, and leaves the value as it was.
  CHECK(t.Get("name", flag).message() == "[t] name: must be true or false");
  CHECK(t.Get("flag", name).message() == "[t] flag: must be a string");
  CHECK(t.Get("name", rate).message() == "[t] name: must be a number");
  CHECK(t.Get("rate", list).message() == "[t] rate: must be an array of strings");
  CHECK(t.Get("rate", small).ok());
  CHECK(t.Get("list", small).message() == "[t] list: must be an integer");
  CHECK(flag);
  CHECK(name == "x");

  TomlSection absent(nullptr, "none");
  CHECK(absent.Get("anything", missing).ok());
  CHECK(absent.CheckNoUnknownKeys().ok());
}

}  // namespace
}  // namespace seedling
