#include "simulator/report.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "base/file.h"
#include "nlohmann/json.hpp"

namespace seedling::simulator {
namespace {

std::string TempDir(const std::string& name) {
  std::string dir =
      std::filesystem::temp_directory_path() / ("seedling_report_test_" + std::to_string(getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// RFC 4180 fields of one line (no embedded newlines in these tests), written for clarity.
std::vector<std::string> CsvFields(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        out.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        out.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

RoundRecord Rec(std::string method, int64_t round, double eval_loss, bool committed = true) {
  RoundRecord r;
  r.method = std::move(method);
  r.round = round;
  r.committed = committed;
  r.start_time_s = (round - 1) * 600.0;
  r.end_time_s = round * 600.0 - 30;
  r.available = 400;
  r.selected = 60;
  r.participants = committed ? 50 : 5;
  r.dropouts = 6;
  r.stragglers = committed ? 4 : 49;
  r.declined = 1;
  r.declined_memory = 1;
  r.train_loss = eval_loss + 0.1;
  r.eval_loss = eval_loss;
  r.bytes_up_per_client = 1000;
  r.bytes_down_per_client = 2000;
  r.energy_joules = 1500;
  r.processed_tokens = 12800;
  r.device_tokens_per_second = 64;
  r.wall_seconds = 0.5;
  return r;
}

// A two-method run: LoRA moves tens of KB per client, kseed a few hundred bytes.
ReportInput TwoMethodInput() {
  ReportInput in;
  in.title = "Seedling simulation: 1000 phones, tiny model";
  in.settings = {{"devices", "1000"}, {"rounds", "6"}, {"seed", "42"}};
  in.notes = {"Dirichlet alpha = 0.3 over topics."};
  for (const std::string m : {"lora-bp", "kseed"}) {
    in.initial_eval_loss[m] = 3.0;
    for (int64_t round = 1; round <= 6; ++round) {
      RoundRecord r = Rec(m, round, 3.0 - 0.2 * round * (m == "kseed" ? 0.5 : 1.0));
      r.bytes_up_per_client = m == "kseed" ? 320 : 45000;
      r.bytes_down_per_client = m == "kseed" ? 2400 : 45000;
      if (m == "kseed") r.end_time_s *= 0.5;
      in.rounds.push_back(r);
    }
    in.summaries.push_back(Summarize(m, 3.0, in.rounds));
  }
  return in;
}

// The text of <figure id="id">...</figure>, or "" when absent.
std::string FigureText(const std::string& html, const std::string& id) {
  const size_t begin = html.find("<figure id=\"" + id + "\">");
  if (begin == std::string::npos) return "";
  const size_t end = html.find("</figure>", begin);
  REQUIRE(end != std::string::npos);
  return html.substr(begin, end - begin);
}

size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) ++n;
  return n;
}

struct XY {
  double x, y;
};
struct PathLine {
  std::string method;
  std::string metric;
  std::vector<std::vector<XY>> subpaths;  // one per "M"
  size_t points() const {
    size_t n = 0;
    for (const auto& s : subpaths) n += s.size();
    return n;
  }
};

std::vector<PathLine> Lines_(const std::string& figure) {
  static const std::regex kPath(
      R"re(<path class="line" data-method="([^"]*)" data-metric="([^"]*)"[^>]* d="([^"]*)"/>)re");
  std::vector<PathLine> out;
  for (std::sregex_iterator it(figure.begin(), figure.end(), kPath), end; it != end; ++it) {
    PathLine p{(*it)[1], (*it)[2], {}};
    std::istringstream d((*it)[3].str());
    for (std::string tok; d >> tok;) {
      const char cmd = tok[0];
      REQUIRE((cmd == 'M' || cmd == 'L'));
      const size_t comma = tok.find(',');
      REQUIRE(comma != std::string::npos);
      const XY xy{std::stod(tok.substr(1, comma - 1)), std::stod(tok.substr(comma + 1))};
      if (cmd == 'M') p.subpaths.emplace_back();
      REQUIRE(!p.subpaths.empty());
      p.subpaths.back().push_back(xy);
    }
    out.push_back(std::move(p));
  }
  return out;
}

XY ViewBoxSize(const std::string& figure) {
  static const std::regex kViewBox(R"re(viewBox="0 0 ([0-9.]+) ([0-9.]+)")re");
  std::smatch m;
  REQUIRE(std::regex_search(figure, m, kViewBox));
  return {std::stod(m[1]), std::stod(m[2])};
}

std::vector<double> TickValues(const std::string& figure, const std::string& axis) {
  const std::regex re("<g class=\"" + axis + "\" data-v=\"([^\"]+)\"");
  std::vector<double> out;
  for (std::sregex_iterator it(figure.begin(), figure.end(), re), end; it != end; ++it) {
    out.push_back(std::stod((*it)[1]));
  }
  return out;
}

// A "nan" or "inf" word, as printed for a non-finite coordinate ("dominant" is fine).
bool HasNonFinite(const std::string& html) {
  static const std::regex kWord(R"re((^|[^a-zA-Z])-?(nan|inf)([^a-zA-Z]|$))re", std::regex::icase);
  return std::regex_search(html, kWord);
}

TEST_CASE("A record's JSONL line parses back to the same values with NaN as null", "[simulator][report]") {
  RoundRecord r = Rec("mezo", 7, 2.75, /*committed=*/false);
  r.accuracy = 0.625;
  r.start_time_s = 0.1;  // not exactly representable: must survive the round trip
  r.epsilon = NAN;
  r.train_loss = NAN;
  r.global_sha256 = std::string(64, 'c');
  r.device_flops = 2.5e12;
  r.perturbations = 16;
  r.rho = 0.75;
  const std::string line = ToJson(r).dump();
  REQUIRE(line.find('\n') == std::string::npos);
  const nlohmann::json j = nlohmann::json::parse(line);
  CHECK(j["method"] == "mezo");
  CHECK(j["round"] == 7);
  CHECK(j["committed"] == false);
  CHECK(j["start_time_s"].get<double>() == 0.1);
  CHECK(j["end_time_s"].get<double>() == r.end_time_s);
  CHECK(j["participants"] == 5);
  CHECK(j["stragglers"] == 49);
  CHECK(j["declined"] == 1);
  CHECK(j["declined_memory"] == 1);
  CHECK(j["declined_unsupported"] == 0);
  CHECK(j["eval_loss"].get<double>() == 2.75);
  CHECK(j["accuracy"].get<double>() == 0.625);
  CHECK(j["bytes_up_per_client"].get<double>() == 1000);
  CHECK(j["energy_joules"].get<double>() == 1500);
  CHECK(j["epsilon"].is_null());
  CHECK(j["train_loss"].is_null());
  CHECK(j["global_sha256"] == std::string(64, 'c'));
  CHECK(j["processed_tokens"] == 12800);
  CHECK(j["device_tokens_per_second"].get<double>() == 64);
  CHECK(j["device_flops"].get<double>() == 2.5e12);
  CHECK(j["perturbations"] == 16);
  CHECK(j["gradient_variance"].is_null());
  CHECK(j["rho"].get<double>() == 0.75);
  CHECK(j["epsilon_delta_1e10"].is_null());
  CHECK(j.size() == 29);

  auto back = RoundRecordFromJson(j);
  REQUIRE(back.ok());
  CHECK(back->method == r.method);
  CHECK(back->round == r.round);
  CHECK(back->committed == r.committed);
  CHECK(back->start_time_s == r.start_time_s);
  CHECK(back->dropouts == r.dropouts);
  CHECK(back->device_flops == r.device_flops);
  CHECK(back->perturbations == 16);
  CHECK(std::isnan(back->gradient_variance));
  CHECK(back->declined_memory == r.declined_memory);
  CHECK(back->eval_loss == r.eval_loss);
  CHECK(std::isnan(back->epsilon));
  CHECK(back->rho == 0.75);
  CHECK(std::isnan(back->epsilon_delta_1e10));
  CHECK(std::isnan(back->train_loss));
  CHECK(back->wall_seconds == r.wall_seconds);
  CHECK(back->processed_tokens == r.processed_tokens);
  CHECK(back->device_tokens_per_second == r.device_tokens_per_second);
  CHECK(back->global_sha256 == r.global_sha256);
}

TEST_CASE("RoundRecordFromJson names the field that has the wrong type", "[simulator][report]") {
  nlohmann::json j = ToJson(Rec("lora-bp", 1, 2.0));
  j["eval_loss"] = "low";
  auto r = RoundRecordFromJson(j);
  REQUIRE(!r.ok());
  CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find("eval_loss") != std::string::npos);
}

TEST_CASE("CSV has the header and one row per record with every field", "[simulator][report]") {
  const std::vector<std::string> header = CsvFields(Lines(CsvHeader()).at(0));
  REQUIRE(header.size() == 29);
  CHECK(header.front() == "method");
  CHECK(header.back() == "wall_seconds");
  CHECK(CsvHeader().back() == '\n');

  RoundRecord r = Rec("fwdgrad", 3, 2.5);
  r.epsilon = NAN;
  r.accuracy = 0.5;
  r.global_sha256 = "00ff";
  const std::string row = ToCsvRow(r);
  CHECK(row.back() == '\n');
  REQUIRE(Lines(row).size() == 1);
  const std::vector<std::string> fields = CsvFields(Lines(row)[0]);
  REQUIRE(fields.size() == header.size());
  auto field = [&](const std::string& name) {
    const auto it = std::find(header.begin(), header.end(), name);
    REQUIRE(it != header.end());
    return fields[it - header.begin()];
  };
  CHECK(field("method") == "fwdgrad");
  CHECK(field("round") == "3");
  CHECK(field("committed") == "true");
  CHECK(field("epsilon").empty());  // NaN
  CHECK(field("rho").empty());
  CHECK(std::stod(field("eval_loss")) == 2.5);
  CHECK(std::stod(field("accuracy")) == 0.5);
  CHECK(field("processed_tokens") == "12800");
  CHECK(std::stod(field("device_tokens_per_second")) == 64);
  CHECK(std::stod(field("end_time_s")) == r.end_time_s);
  CHECK(field("global_sha256") == "00ff");
  CHECK(field("declined_memory") == "1");
  CHECK(field("declined_unsupported") == "0");
  CHECK(field("gradient_variance").empty());  // NaN
  CHECK(field("perturbations") == "0");
}

TEST_CASE("CSV quotes a method name containing a comma or a quote", "[simulator][report]") {
  RoundRecord r = Rec("lora,\"int8\"", 1, 2.0);
  const std::string row = ToCsvRow(r);
  CHECK(row.rfind("\"lora,\"\"int8\"\"\",", 0) == 0);
  const std::vector<std::string> fields = CsvFields(Lines(row)[0]);
  REQUIRE(fields.size() == 29);
  CHECK(fields[0] == "lora,\"int8\"");
}

TEST_CASE("RoundLog appends and flushes every record while it is still open", "[simulator][report]") {
  const std::string dir = JoinPath(TempDir("log"), "run/nested");  // created by Open
  auto log = RoundLog::Open(dir);
  REQUIRE(log.ok());
  REQUIRE(log->Append(Rec("lora-bp", 1, 2.9)).ok());
  {
    auto jsonl = ReadFile(JoinPath(dir, "rounds.jsonl"));
    auto csv = ReadFile(JoinPath(dir, "rounds.csv"));
    REQUIRE(jsonl.ok());
    REQUIRE(csv.ok());
    REQUIRE(Lines(*jsonl).size() == 1);
    CHECK(nlohmann::json::parse(Lines(*jsonl)[0])["eval_loss"].get<double>() == 2.9);
    REQUIRE(Lines(*csv).size() == 2);
    CHECK(Lines(*csv)[0] + "\n" == CsvHeader());
  }
  RoundRecord second = Rec("lora-bp", 2, NAN);
  REQUIRE(log->Append(second).ok());
  auto jsonl = ReadFile(log->jsonl_path());
  auto csv = ReadFile(log->csv_path());
  REQUIRE(jsonl.ok());
  REQUIRE(csv.ok());
  const auto jl = Lines(*jsonl);
  REQUIRE(jl.size() == 2);
  CHECK(nlohmann::json::parse(jl[1])["round"] == 2);
  CHECK(nlohmann::json::parse(jl[1])["eval_loss"].is_null());
  const auto cl = Lines(*csv);
  REQUIRE(cl.size() == 3);
  CHECK(CsvFields(cl[2]).size() == 29);
  std::filesystem::remove_all(std::filesystem::path(dir).parent_path().parent_path());
}

TEST_CASE("A reopened RoundLog continues the files without a second header", "[simulator][report]") {
  const std::string dir = TempDir("reopen");
  {
    auto log = RoundLog::Open(dir);
    REQUIRE(log.ok());
    REQUIRE(log->Append(Rec("kseed", 1, 2.9)).ok());
  }
  {
    auto log = RoundLog::Open(dir);
    REQUIRE(log.ok());
    REQUIRE(log->Append(Rec("kseed", 2, 2.8)).ok());
  }
  const auto cl = Lines(*ReadFile(JoinPath(dir, "rounds.csv")));
  REQUIRE(cl.size() == 3);
  CHECK(cl[1].rfind("kseed,1,", 0) == 0);
  CHECK(cl[2].rfind("kseed,2,", 0) == 0);
  CHECK(Lines(*ReadFile(JoinPath(dir, "rounds.jsonl"))).size() == 2);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A reopened RoundLog starts a new line after a partial record of a killed run", "[simulator][report]") {
  const std::string dir = TempDir("partial");
  REQUIRE(WriteFileAtomic(JoinPath(dir, "rounds.jsonl"), "{\"method\":\"kseed\",\"rou").ok());
  REQUIRE(WriteFileAtomic(JoinPath(dir, "rounds.csv"), CsvHeader() + "kseed,1,tr").ok());
  {
    auto log = RoundLog::Open(dir);
    REQUIRE(log.ok());
    REQUIRE(log->Append(Rec("kseed", 2, 2.8)).ok());
  }
  const auto jl = Lines(*ReadFile(JoinPath(dir, "rounds.jsonl")));
  REQUIRE(jl.size() == 2);
  CHECK(nlohmann::json::parse(jl[1])["round"] == 2);
  const auto cl = Lines(*ReadFile(JoinPath(dir, "rounds.csv")));
  REQUIRE(cl.size() == 3);
  CHECK(cl[2].rfind("kseed,2,", 0) == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("RoundLog refuses to append to a rounds.csv with another header", "[simulator][report]") {
  const std::string dir = TempDir("header");
  REQUIRE(WriteFileAtomic(JoinPath(dir, "rounds.csv"), "method,round\nx,1\n").ok());
  auto log = RoundLog::Open(dir);
  REQUIRE(!log.ok());
  CHECK(log.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(log.status().message()).find("rounds.csv") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Summarize takes finals in round order and weights bytes by participants of committed rounds",
          "[simulator][report]") {
  std::vector<RoundRecord> rs;
  RoundRecord r3 = Rec("mezo", 3, NAN);  // last round: no eval → final loss from round 2
  r3.participants = 30;
  r3.bytes_up_per_client = 400;
  r3.bytes_down_per_client = 100;
  r3.end_time_s = 7200;
  r3.energy_joules = 3000;
  r3.accuracy = NAN;
  RoundRecord r1 = Rec("mezo", 1, 2.5);
  r1.participants = 10;
  r1.bytes_up_per_client = 100;
  r1.bytes_down_per_client = 1000;
  r1.accuracy = 0.25;
  r1.epsilon = 0.5;
  RoundRecord r2 = Rec("mezo", 2, 2.0, /*committed=*/false);  // aborted: bytes ignored, energy counted
  r2.participants = 1;
  r2.bytes_up_per_client = 1e6;
  r2.bytes_down_per_client = 1e6;
  r2.accuracy = 0.5;
  r2.epsilon = 1.5;
  r1.rho = 0.25;  // DP-FTRL figures: the last non-NaN ones in round order
  r1.epsilon_delta_1e10 = 3.0;
  RoundRecord other = Rec("kseed", 4, 0.1);  // another method: skipped
  rs = {r3, other, r1, r2};

  const MethodSummary s = Summarize("mezo", 3.0, rs);
  CHECK(s.method == "mezo");
  CHECK(s.rounds == 3);
  CHECK(s.committed_rounds == 2);
  CHECK(s.initial_eval_loss == 3.0);
  CHECK(s.final_eval_loss == 2.0);  // round 2's (aborted rounds still evaluate the unchanged model)
  CHECK(s.bytes_up_per_client_per_round == Approx((100.0 * 10 + 400.0 * 30) / 40));     // 325
  CHECK(s.bytes_down_per_client_per_round == Approx((1000.0 * 10 + 100.0 * 30) / 40));  // 325
  CHECK(s.simulated_hours == Approx(2.0));
  CHECK(s.energy_kj == Approx(1.5 + 1.5 + 3.0));
  CHECK(s.wall_seconds == Approx(1.5));
  CHECK(s.final_accuracy == 0.5);
  CHECK(s.epsilon == 1.5);
  CHECK(s.rho == 0.25);
  CHECK(s.epsilon_delta_1e10 == 3.0);
}

TEST_CASE("Summarize without records keeps the initial loss and has no byte means", "[simulator][report]") {
  const MethodSummary s = Summarize("kseed", 3.25, {});
  CHECK(s.rounds == 0);
  CHECK(s.final_eval_loss == 3.25);
  CHECK(std::isnan(s.bytes_up_per_client_per_round));
  CHECK(std::isnan(s.final_accuracy));
  CHECK(s.simulated_hours == 0);
}

TEST_CASE("CostToTarget finds the first round at or under the target and sums what was spent until then",
          "[simulator][report]") {
  // fwdgrad: 3.0 → 2.6 → 2.4 (aborted: unchanged model) → 2.1 → 1.9; another run's records interleaved.
  std::vector<RoundRecord> rs;
  const double losses[] = {2.6, 2.4, 2.1, 1.9};
  for (int64_t round = 1; round <= 4; ++round) {
    RoundRecord r = Rec("fwdgrad", round, losses[round - 1], /*committed=*/round != 2);
    r.device_flops = 1e12 * static_cast<double>(round);  // 1, 2, 3, 4 TFLOPs
    r.energy_joules = 100.0 * static_cast<double>(round);
    rs.push_back(r);
    RoundRecord other = Rec("mezo", round, 0.5);
    other.device_flops = 1e20;
    rs.push_back(other);
  }
  std::reverse(rs.begin(), rs.end());  // records in any order

  const TargetCost hit = CostToTarget("fwdgrad", 2.2, rs);
  CHECK(hit.method == "fwdgrad");
  CHECK(hit.reached());
  CHECK(hit.round == 3);                    // 2.1 is the first loss <= 2.2
  CHECK(hit.device_flops == Approx(6e12));  // rounds 1-3, the aborted one included
  CHECK(hit.energy_kj == Approx(0.6));      // 100 + 200 + 300 J
  CHECK(hit.simulated_hours == Approx((3 * 600.0 - 30) / 3600));
  const TargetCost exact = CostToTarget("fwdgrad", 2.6, rs);  // reached by equality in round 1
  CHECK(exact.round == 1);
  CHECK(exact.device_flops == Approx(1e12));

  const TargetCost missed = CostToTarget("fwdgrad", 1.5, rs);
  CHECK_FALSE(missed.reached());
  CHECK(std::isnan(missed.device_flops));
  CHECK(std::isnan(missed.energy_kj));
  CHECK(std::isnan(missed.simulated_hours));
  CHECK_FALSE(CostToTarget("fwdgrad", NAN, rs).reached());

  const std::vector<TargetCost> costs = {hit, CostToTarget("mezo", 2.2, rs), missed};
  const std::string table = TargetTable(costs);
  const auto lines = Lines(table);
  REQUIRE(lines.size() == 6);  // target line, header, rule, three runs
  CHECK(lines[0].find("2.2") != std::string::npos);
  for (size_t i = 2; i < lines.size(); ++i) CHECK(lines[i].size() == lines[1].size());
  CHECK(lines[3].find("6e+12") != std::string::npos);
  CHECK(lines[4].find("1e+20") != std::string::npos);  // mezo reached it in round 1
  CHECK(lines[5].find("not reached") != std::string::npos);
  CHECK(TargetTable({}).empty());
}

TEST_CASE("The default target is the largest final loss among the runs that learned", "[simulator][report]") {
  std::vector<MethodSummary> s(3);
  s[0].initial_eval_loss = 3.0;
  s[0].final_eval_loss = 2.0;
  s[1].initial_eval_loss = 3.0;
  s[1].final_eval_loss = 2.5;
  s[2].initial_eval_loss = 3.0;
  s[2].final_eval_loss = 3.4;  // got worse: left out
  CHECK(DefaultTargetLoss(s) == 2.5);
  s[0].final_eval_loss = 3.1;
  s[1].final_eval_loss = NAN;
  CHECK(std::isnan(DefaultTargetLoss(s)));
}

TEST_CASE("The report shows the cost-to-target table when given one", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  CHECK(RenderReportHtml(in).find("class=\"target\"") == std::string::npos);
  const double target = DefaultTargetLoss(in.summaries);
  for (const MethodSummary& s : in.summaries) in.targets.push_back(CostToTarget(s.method, target, in.rounds));
  const std::string html = RenderReportHtml(in);
  CHECK(html.find("<table class=\"target\">") != std::string::npos);
  CHECK(html.find("Cost to reach the target loss") != std::string::npos);
}

TEST_CASE("SummaryTable lists each method in aligned columns", "[simulator][report]") {
  const ReportInput in = TwoMethodInput();
  const std::string table = SummaryTable(in.summaries);
  const auto lines = Lines(table);
  REQUIRE(lines.size() == 4);  // header, rule, two methods
  for (const auto& line : lines) CHECK(line.size() == lines[0].size());
  CHECK(lines[1].find_first_not_of('-') == std::string::npos);
  CHECK(lines[2].rfind("lora-bp ", 0) == 0);
  CHECK(lines[3].rfind("kseed ", 0) == 0);
  // Numeric columns are right-aligned under their header.
  const size_t final_end = lines[0].find("final loss") + std::string("final loss").size();
  CHECK(lines[2][final_end - 1] != ' ');
  CHECK(lines[3][final_end - 1] != ' ');
  CHECK(lines[2].substr(final_end, 2) == "  ");
  CHECK(table.find("43.9 KiB") != std::string::npos);  // 45000 B
  CHECK(table.find("320 B") != std::string::npos);
  CHECK(lines[0].find("accuracy") == std::string::npos);  // no method has one
  CHECK(lines[0].find("rho") == std::string::npos);       // nor a DP-FTRL rho
}

TEST_CASE("SummaryTable shows rho and epsilon at 1e-10 for a DP-FTRL run next to a Gaussian one",
          "[simulator][report]") {
  std::vector<MethodSummary> summaries(2);
  summaries[0].method = "gaussian";
  summaries[0].epsilon = 1.25;
  summaries[1].method = "ftrl";
  summaries[1].epsilon = 7.5;
  summaries[1].rho = 0.875;
  summaries[1].epsilon_delta_1e10 = 9.625;
  const auto lines = Lines(SummaryTable(summaries));
  REQUIRE(lines.size() == 4);
  for (const auto& line : lines) CHECK(line.size() == lines[0].size());
  const size_t rho_end = lines[0].find("rho") + 3;
  const size_t eps_end = lines[0].find("epsilon@1e-10") + std::string("epsilon@1e-10").size();
  REQUIRE(rho_end < eps_end);
  REQUIRE(eps_end == lines[0].size());
  // Right-aligned under their headers; the Gaussian run has neither.
  CHECK(lines[2].substr(0, rho_end).substr(rho_end - 1) == "-");
  CHECK(lines[2].substr(eps_end - 1) == "-");
  CHECK(lines[3].substr(rho_end - 5, 5) == "0.875");
  CHECK(lines[3].substr(eps_end - 5, 5) == "9.625");
  CHECK(lines[2].find("1.25") != std::string::npos);
  CHECK(lines[3].find("7.5") != std::string::npos);
}

TEST_CASE("The report has one svg per figure and the accuracy figure only with accuracy", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  std::string html = RenderReportHtml(in);
  CHECK(Count(html, "<svg") == 5);
  for (const char* id : {"fig-loss-round", "fig-loss-time", "fig-bytes", "fig-participation", "fig-device-speed"}) {
    const std::string fig = FigureText(html, id);
    CHECK(Count(fig, "<svg") == 1);
  }
  CHECK(FigureText(html, "fig-accuracy").empty());
  CHECK(html.find("<table class=\"summary\">") != std::string::npos);
  CHECK(html.find("<th>seed</th><td>42</td>") != std::string::npos);

  CHECK(FigureText(html, "fig-accuracy-time").empty());
  CHECK(html.find("accuracy") == std::string::npos);  // no axes, caption or column either

  in.rounds[3].accuracy = 0.4;
  html = RenderReportHtml(in);
  CHECK(Count(html, "<svg") == 7);
  const auto acc = Lines_(FigureText(html, "fig-accuracy"));
  REQUIRE(acc.size() == 2);
  CHECK(acc[0].points() == 1);  // lora-bp round 4
  CHECK(acc[1].points() == 0);
  CHECK(Lines_(FigureText(html, "fig-accuracy-time")).size() == 2);
}

TEST_CASE("The accuracy figures plot each round's accuracy from the initial one at round 0 and time 0",
          "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) {
    if (r.method == "lora-bp") r.accuracy = 0.25 + 0.05 * static_cast<double>(r.round);
  }
  in.rounds[2].accuracy = NAN;  // lora-bp round 3 was not scored: a gap
  in.initial_accuracy["lora-bp"] = 0.25;
  const std::string html = RenderReportHtml(in);

  const std::string by_round = FigureText(html, "fig-accuracy");
  const auto lines = Lines_(by_round);
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].method == "lora-bp");
  REQUIRE(lines[0].subpaths.size() == 2);                        // rounds 0-2, then 4-6
  CHECK(lines[0].subpaths[0].size() == 3);                       // the initial point and rounds 1, 2
  CHECK(lines[0].subpaths[1].size() == 3);                       // rounds 4, 5, 6
  CHECK(lines[1].points() == 0);                                 // kseed measured no accuracy
  CHECK(lines[0].subpaths[0][0].y > lines[0].subpaths[1][2].y);  // SVG y grows downwards: accuracy rose
  const std::vector<double> x_ticks = TickValues(by_round, "xtick");
  REQUIRE(!x_ticks.empty());
  CHECK(x_ticks.front() == 0);
  CHECK(by_round.find(">accuracy<") != std::string::npos);  // the y axis label

  const auto by_time = Lines_(FigureText(html, "fig-accuracy-time"));
  REQUIRE(by_time.size() == 2);
  CHECK(by_time[0].points() == 6);  // time 0 and the five scored rounds
  // The figures follow the loss figures.
  CHECK(html.find("<figure id=\"fig-accuracy\">") > html.find("<figure id=\"fig-loss-time\">"));
}

// The cells of each row of <table class="cls">: the text, and whether it is a right-aligned number.
struct Cell {
  std::string text;
  bool numeric;
};
std::vector<std::vector<Cell>> TableRows(const std::string& html, const std::string& cls) {
  const size_t begin = html.find("<table class=\"" + cls + "\">");
  if (begin == std::string::npos) return {};
  const size_t end = html.find("</table>", begin);
  REQUIRE(end != std::string::npos);
  const std::string table = html.substr(begin, end - begin);
  static const std::regex kRow(R"re(<tr[^>]*>(.*?)</tr>)re");
  static const std::regex kCell(R"re(<t[hd]( class="num")?>([^<]*)</t[hd]>)re");
  std::vector<std::vector<Cell>> rows;
  for (std::sregex_iterator row(table.begin(), table.end(), kRow), stop; row != stop; ++row) {
    const std::string cells = (*row)[1];
    rows.emplace_back();
    for (std::sregex_iterator c(cells.begin(), cells.end(), kCell); c != stop; ++c) {
      rows.back().push_back({(*c)[2], (*c)[1].matched});
    }
  }
  return rows;
}

std::vector<ClassStats> ThreeRowPopulation() {
  ClassStats low;
  low.name = "android-low";
  low.devices = 600;
  low.share = 0.6;
  low.median_gflops = 12.5;
  low.median_ram_bytes = 3.0 * (1 << 30);
  low.median_budget_bytes = 1.5 * (1 << 30);
  low.median_downlink_mbps = 20;
  low.median_uplink_mbps = 5;
  low.median_rtt_ms = 80;
  low.mean_dropout = 0.05;
  low.mean_available_hours = 6.3;
  ClassStats pro = low;
  pro.name = "iphone <pro> & \"max\"";
  pro.devices = 400;
  pro.share = 0.4;
  pro.median_gflops = 150;
  pro.median_ram_bytes = 8.0 * (1 << 30);
  pro.median_budget_bytes = 3.0 * (1 << 30);
  pro.median_rtt_ms = 45.5;
  pro.mean_dropout = 0.02;
  pro.mean_available_hours = 7.1;
  ClassStats all = low;
  all.name = "all";
  all.whole_population = true;
  all.devices = 1000;
  all.share = 1;
  all.median_gflops = 40;
  all.mean_available_hours = NAN;
  return {low, pro, all};
}

TEST_CASE("The population table has a header and one row per class with right-aligned numbers", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  in.population = ThreeRowPopulation();
  const std::string html = RenderReportHtml(in);
  const auto rows = TableRows(html, "population");
  REQUIRE(rows.size() == 4);
  const std::vector<std::string> header = {"class",  "devices",       "share",          "GFLOP/s",
                                           "RAM",    "memory budget", "down Mbit/s",    "up Mbit/s",
                                           "RTT ms", "dropout",       "available h/day"};
  REQUIRE(rows[0].size() == header.size());
  for (size_t c = 0; c < header.size(); ++c) {
    CHECK(rows[0][c].text == header[c]);
    CHECK(rows[0][c].numeric == (c > 0));
  }
  const std::vector<std::vector<std::string>> expected = {
      {"android-low", "600", "60.0%", "12.5", "3.0 GiB", "1.5 GiB", "20", "5", "80", "5.0%", "6.3"},
      {"iphone &lt;pro&gt; &amp; &quot;max&quot;", "400", "40.0%", "150", "8.0 GiB", "3.0 GiB", "20", "5", "45.5",
       "2.0%", "7.1"},
      {"all", "1000", "100.0%", "40", "3.0 GiB", "1.5 GiB", "20", "5", "80", "5.0%", "-"},
  };
  for (size_t r = 0; r < expected.size(); ++r) {
    CAPTURE(r);
    REQUIRE(rows[r + 1].size() == expected[r].size());
    for (size_t c = 0; c < expected[r].size(); ++c) {
      CHECK(rows[r + 1][c].text == expected[r][c]);
      CHECK(rows[r + 1][c].numeric == (c > 0));
    }
  }
  CHECK(html.find("<tr class=\"total\"><td>all</td>") != std::string::npos);
  CHECK(html.find("<tr><td>android-low</td>") != std::string::npos);
  CHECK(html.find("iphone <pro>") == std::string::npos);
  // Between the settings and the method summary.
  CHECK(html.find("<table class=\"population\">") > html.find("<table class=\"settings\">"));
  CHECK(html.find("<table class=\"population\">") < html.find("<table class=\"summary\">"));

  in.population.pop_back();
  CHECK(TableRows(RenderReportHtml(in), "population").size() == 3);
  in.population.clear();
  const std::string none = RenderReportHtml(in);
  CHECK(none.find("class=\"population\"") == std::string::npos);
  CHECK(none.find("<h2>Population</h2>") == std::string::npos);
}

// The text of the opening paragraph, or "" when absent.
std::string RunSummary(const std::string& html) {
  const std::string open = "<p class=\"run-summary\">";
  const size_t begin = html.find(open);
  if (begin == std::string::npos) return "";
  const size_t end = html.find("</p>", begin);
  REQUIRE(end != std::string::npos);
  return html.substr(begin + open.size(), end - begin - open.size());
}

RunDescription TinyRun() {
  RunDescription run;
  run.model = "llama (models/tiny)";
  run.devices = 1000;
  run.heldout_devices = 50;
  run.rounds = 6;
  run.clients_per_round = 10;
  run.data = "the built-in synthetic corpus";
  run.partition = "one topic per device";
  run.label_tv_distance = 0.7123;
  return run;
}

TEST_CASE("The report opens with a paragraph naming what ran and how each method ended", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  in.run = TinyRun();
  std::string html = RenderReportHtml(in);
  std::string text = RunSummary(html);
  REQUIRE(!text.empty());
  CHECK(html.find("<p class=\"run-summary\">") < html.find("<h2>Settings</h2>"));
  CHECK(html.find("<p class=\"run-summary\">") > html.find("<h1>"));
  CHECK_THAT(text, Catch::StartsWith("Ran lora-bp and kseed, one after the other, fine-tuning llama (models/tiny) "
                                     "on 1000 simulated phones (+50 held out for evaluation): 6 rounds of 10 clients "
                                     "per round each, on the built-in synthetic corpus, one topic per device; label "
                                     "total-variation distance from the global mix 0.7123 (0 is IID)."));
  // lora-bp ends at 3 - 0.2 × 6 = 1.8 after 6 × 600 - 30 s; kseed at 2.4 after half that.
  CHECK_THAT(text, Catch::Contains("lora-bp committed 6 of 6 rounds in 0.9917 simulated hours; held-out eval loss 3 "
                                   "before training, 1.8 at the end."));
  CHECK_THAT(text, Catch::Contains("kseed committed 6 of 6 rounds in 0.4958 simulated hours; held-out eval loss 3 "
                                   "before training, 2.4 at the end."));
  CHECK(text.find("accuracy") == std::string::npos);

  // Other inputs, other numbers: nothing in the paragraph is fixed text.
  in.run.devices = 37;
  in.run.heldout_devices = 0;
  in.run.rounds = 1;
  in.run.clients_per_round = 4;
  in.run.label_tv_distance = NAN;
  in.summaries[0].final_eval_loss = 1.234567;
  in.summaries[0].committed_rounds = 5;
  in.summaries[0].final_accuracy = 0.4375;
  in.initial_accuracy["lora-bp"] = 0.25;
  text = RunSummary(RenderReportHtml(in));
  CHECK_THAT(text, Catch::Contains("on 37 simulated phones: 1 round of 4 clients per round each, on the built-in "
                                   "synthetic corpus, one topic per device. lora-bp"));
  CHECK(text.find("held out") == std::string::npos);
  CHECK(text.find("total-variation") == std::string::npos);
  CHECK_THAT(text, Catch::Contains("lora-bp committed 5 of 6 rounds in 0.9917 simulated hours; held-out eval loss 3 "
                                   "before training, 1.235 at the end, accuracy 0.4375 (0.25 before training)."));
  CHECK_THAT(text, Catch::EndsWith("before training, 2.4 at the end."));  // kseed: no accuracy

  // One method, nothing described: the outcome alone.
  ReportInput one;
  one.summaries.push_back(in.summaries[1]);
  text = RunSummary(RenderReportHtml(one));
  CHECK(text ==
        "Ran kseed. kseed committed 6 of 6 rounds in 0.4958 simulated hours; held-out eval loss 3 before "
        "training, 2.4 at the end.");
  CHECK(RunSummary(RenderReportHtml(ReportInput{})).empty());
}

TEST_CASE("The opening paragraph escapes the model, data and method names", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  in.run = TinyRun();
  in.run.model = "a<b>&c";
  in.run.data = "data/<x>&y.jsonl";
  in.run.partition = "split by \"user\" <id>";
  in.summaries[1].method = "k<seed>&";
  in.initial_eval_loss.erase("kseed");
  in.initial_eval_loss["k<seed>&"] = 3.0;
  for (RoundRecord& r : in.rounds) {
    if (r.method == "kseed") r.method = "k<seed>&";
  }
  const std::string text = RunSummary(RenderReportHtml(in));
  CHECK_THAT(text, Catch::Contains("fine-tuning a&lt;b&gt;&amp;c on"));
  CHECK_THAT(text, Catch::Contains("on data/&lt;x&gt;&amp;y.jsonl, split by &quot;user&quot; &lt;id&gt;;"));
  CHECK_THAT(text, Catch::Contains("Ran lora-bp and k&lt;seed&gt;&amp;, one after the other"));
  CHECK_THAT(text, Catch::Contains(" k&lt;seed&gt;&amp; committed 6 of 6 rounds"));
  CHECK(text.find('<') == std::string::npos);
  CHECK(text.find('>') == std::string::npos);
}

TEST_CASE("The device-speed figure plots each method's tokens per second, and is left out without any",
          "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) r.device_tokens_per_second = r.method == "kseed" ? 200 + r.round : NAN;
  in.rounds[1].device_tokens_per_second = 90;  // lora-bp round 2: its only finite figure
  std::string html = RenderReportHtml(in);
  const auto lines = Lines_(FigureText(html, "fig-device-speed"));
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].points() == 1);  // lora-bp
  CHECK(lines[1].points() == 6);  // kseed
  for (RoundRecord& r : in.rounds) r.device_tokens_per_second = NAN;
  html = RenderReportHtml(in);
  CHECK(FigureText(html, "fig-device-speed").empty());
  CHECK(Count(html, "<svg") == 4);
}

TEST_CASE("The epsilon figure adds a dashed line at delta 1e-10 only when a DP-FTRL run states one",
          "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) {
    r.epsilon = 0.5 * r.round;                                          // both runs spend budget
    r.epsilon_delta_1e10 = r.method == "kseed" ? 0.75 * r.round : NAN;  // kseed stands for the DP-FTRL run
  }
  std::string html = RenderReportHtml(in);
  std::string fig = FigureText(html, "fig-epsilon");
  // One line per method and metric: epsilon for both, epsilon at 1e-10 for kseed only.
  auto lines = Lines_(fig);
  REQUIRE(lines.size() == 4);
  CHECK(lines[0].points() == 6);  // lora-bp, epsilon
  CHECK(lines[1].points() == 0);  // lora-bp, no 1e-10 guarantee
  CHECK(lines[2].points() == 6);  // kseed, epsilon
  CHECK(lines[3].points() == 6);  // kseed, epsilon at 1e-10
  CHECK(fig.find("delta = 1e-10 (dashed)") != std::string::npos);
  for (RoundRecord& r : in.rounds) r.epsilon_delta_1e10 = NAN;
  fig = FigureText(RenderReportHtml(in), "fig-epsilon");
  CHECK(Lines_(fig).size() == 2);
  CHECK(fig.find("1e-10") == std::string::npos);
}

// The rows of <table class="declines"> as their cell texts.
std::vector<std::vector<std::string>> DeclineRows(const std::string& html) {
  const size_t begin = html.find("<table class=\"declines\">");
  if (begin == std::string::npos) return {};
  const std::string table = html.substr(begin, html.find("</table>", begin) - begin);
  static const std::regex kRow(R"re(<tr[^>]*>(.*?)</tr>)re");
  static const std::regex kCell(R"re(<t[dh][^>]*>([^<]*)</t[dh]>)re");
  std::vector<std::vector<std::string>> rows;
  for (std::sregex_iterator it(table.begin(), table.end(), kRow), end; it != end; ++it) {
    const std::string row = (*it)[1];
    rows.emplace_back();
    for (std::sregex_iterator c(row.begin(), row.end(), kCell); c != end; ++c) rows.back().push_back((*c)[1]);
  }
  return rows;
}

TEST_CASE("The report lists declines by reason for each round with one and a total per method", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) {
    r.declined = r.declined_memory = r.declined_unsupported = 0;
    if (r.method == "lora-bp" && r.round == 2) r.declined = r.declined_memory = 3;
    if (r.method == "lora-bp" && r.round == 5) {
      r.declined = 4;  // 2 memory, 1 unsupported, 1 other
      r.declined_memory = 2;
      r.declined_unsupported = 1;
    }
  }
  const auto rows = DeclineRows(RenderReportHtml(in));
  const std::vector<std::vector<std::string>> expected = {
      {"method", "round", "declined", "memory", "unsupported", "other"},
      {"lora-bp", "2", "3", "3", "0", "0"},
      {"lora-bp", "5", "4", "2", "1", "1"},
      {"lora-bp", "total", "7", "5", "1", "1"},
  };
  CHECK(rows == expected);  // kseed declined nothing: no rows
}

TEST_CASE("Without a declined task the report says so instead of a table", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) r.declined = r.declined_memory = 0;
  const std::string html = RenderReportHtml(in);
  CHECK(DeclineRows(html).empty());
  CHECK(html.find("No selected device declined its task.") != std::string::npos);
}

TEST_CASE("The loss figure has one line per method with one point per round inside the view box",
          "[simulator][report]") {
  const ReportInput in = TwoMethodInput();
  const std::string html = RenderReportHtml(in);
  for (const char* id : {"fig-loss-round", "fig-loss-time"}) {
    const std::string fig = FigureText(html, id);
    const XY box = ViewBoxSize(fig);
    const auto lines = Lines_(fig);
    REQUIRE(lines.size() == 2);
    CHECK(lines[0].method == "lora-bp");
    CHECK(lines[1].method == "kseed");
    for (const PathLine& l : lines) {
      REQUIRE(l.subpaths.size() == 1);
      CHECK(l.points() == 7);  // round 0 (initial) + 6 rounds
      const auto& pts = l.subpaths[0];
      for (size_t i = 0; i < pts.size(); ++i) {
        CHECK(pts[i].x >= 0);
        CHECK(pts[i].x <= box.x);
        CHECK(pts[i].y >= 0);
        CHECK(pts[i].y <= box.y);
        if (i > 0) CHECK(pts[i].x > pts[i - 1].x);
        if (i > 0) CHECK(pts[i].y > pts[i - 1].y);  // loss falls: SVG y grows downwards
      }
    }
  }
  // Linear axes use 1/2/5 × 10^k steps.
  const std::vector<double> ticks = TickValues(FigureText(html, "fig-loss-round"), "ytick");
  REQUIRE(ticks.size() >= 3);
  const double step = ticks[1] - ticks[0];
  const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
  CHECK((std::abs(mantissa - 1) < 1e-6 || std::abs(mantissa - 2) < 1e-6 || std::abs(mantissa - 5) < 1e-6));
  for (size_t i = 1; i < ticks.size(); ++i) CHECK(ticks[i] - ticks[i - 1] == Approx(step));
  CHECK(ticks.front() <= 1.8);  // covers lora-bp's final 1.8
  CHECK(ticks.back() >= 3.0);
}

TEST_CASE("A NaN eval loss breaks the line and an aborted round gets a marker", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  in.rounds[2].eval_loss = NAN;    // lora-bp round 3
  in.rounds[4].committed = false;  // lora-bp round 5
  const std::string fig = FigureText(RenderReportHtml(in), "fig-loss-round");
  const auto lines = Lines_(fig);
  REQUIRE(lines.size() == 2);
  REQUIRE(lines[0].subpaths.size() == 2);
  CHECK(lines[0].subpaths[0].size() == 3);  // rounds 0..2
  CHECK(lines[0].subpaths[1].size() == 3);  // rounds 4..6
  CHECK(lines[1].subpaths.size() == 1);
  CHECK(Count(fig, "class=\"aborted\"") == 2);  // the marker and its legend entry
  CHECK(fig.find("lora-bp: round 5 aborted") != std::string::npos);
}

TEST_CASE("The report escapes every input string and references nothing outside the file", "[simulator][report]") {
  ReportInput in = TwoMethodInput();
  for (RoundRecord& r : in.rounds) {
    if (r.method == "kseed") r.method = "<script>alert(1)</script>";
  }
  in.summaries[1].method = "<script>alert(1)</script>";
  in.title = "A & B <b>";
  in.settings.push_back({"model\"", "<img src=x>"});
  in.notes.push_back("plain <i>note</i> & <style>");
  const std::string html = RenderReportHtml(in);
  CHECK(html.find("<script") == std::string::npos);
  CHECK(html.find("&lt;script&gt;alert(1)&lt;/script&gt;") != std::string::npos);
  CHECK(html.find("<img") == std::string::npos);
  CHECK(html.find("<i>") == std::string::npos);
  CHECK(html.find("plain &lt;i&gt;note&lt;/i&gt; &amp; &lt;style&gt;") != std::string::npos);
  CHECK(html.find("A &amp; B &lt;b&gt;") != std::string::npos);
  CHECK(html.find("http://") == std::string::npos);
  CHECK(html.find("https://") == std::string::npos);
  CHECK(html.find("url(") == std::string::npos);
  CHECK(html.find(" src=\"") == std::string::npos);
  CHECK(html.find(" href=\"") == std::string::npos);
}

TEST_CASE("The bytes figure switches to a log axis with power-of-ten ticks", "[simulator][report]") {
  ReportInput in = TwoMethodInput();  // 320 B vs 45000 B: auto picks log
  std::string fig = FigureText(RenderReportHtml(in), "fig-bytes");
  CHECK(fig.find("log scale") != std::string::npos);
  std::vector<double> ticks = TickValues(fig, "ytick");
  REQUIRE(ticks.size() >= 3);
  for (double t : ticks) {
    const double e = std::log10(t);
    CHECK(e == Approx(std::round(e)).margin(1e-12));
  }
  CHECK(ticks.front() <= 320);
  CHECK(ticks.back() >= 45000);

  in.bytes_axis = AxisScale::kLinear;
  fig = FigureText(RenderReportHtml(in), "fig-bytes");
  CHECK(fig.find("log scale") == std::string::npos);
  ticks = TickValues(fig, "ytick");
  CHECK(ticks.front() == 0);
}

TEST_CASE("The report renders empty, single-point and all-NaN inputs with finite coordinates", "[simulator][report]") {
  ReportInput empty;
  const std::string e = RenderReportHtml(empty);
  CHECK(Count(e, "<svg") == 4);
  CHECK(!HasNonFinite(e));

  ReportInput one;
  one.rounds.push_back(Rec("a-method-with-a-very-long-name-indeed", 1, NAN));
  one.rounds.push_back(Rec("b", 1, 2.0));
  one.rounds.back().bytes_up_per_client = 0;
  one.bytes_axis = AxisScale::kLog;
  const std::string o = RenderReportHtml(one);
  CHECK(!HasNonFinite(o));
  const std::string fig = FigureText(o, "fig-loss-round");
  const auto lines = Lines_(fig);
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].points() == 0);
  CHECK(lines[1].points() == 1);
  CHECK(Count(fig, "<circle") == 1);  // a lone point is drawn as a dot
  // The legend cuts the long name; the full name stays in the tooltip.
  CHECK(fig.find("a-method-with-a-very\u2026<title>a-method-with-a-very-long-name-indeed</title>") !=
        std::string::npos);
}

TEST_CASE("RenderReportHtml is deterministic", "[simulator][report]") {
  const ReportInput in = TwoMethodInput();
  const std::string a = RenderReportHtml(in);
  const std::string b = RenderReportHtml(TwoMethodInput());
  CHECK(a == b);
}

TEST_CASE("WriteReport replaces the file atomically and reports a missing directory", "[simulator][report]") {
  const std::string dir = TempDir("write");
  const std::string path = JoinPath(dir, "report.html");
  REQUIRE(WriteFileAtomic(path, "old").ok());
  const ReportInput in = TwoMethodInput();
  REQUIRE(WriteReport(path, in).ok());
  auto got = ReadFile(path);
  REQUIRE(got.ok());
  CHECK(*got == RenderReportHtml(in));
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    (void)e;
    ++entries;
  }
  CHECK(entries == 1);  // no temporary file left behind

  const std::string missing = JoinPath(dir, "no/such/dir/report.html");
  const absl::Status st = WriteReport(missing, in);
  REQUIRE(!st.ok());
  CHECK(st.code() == absl::StatusCode::kNotFound);
  CHECK(std::string(st.message()).find(JoinPath(dir, "no/such/dir")) != std::string::npos);
  CHECK(!FileExists(missing));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace seedling::simulator
