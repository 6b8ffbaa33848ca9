#include "server/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "base/file.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/init.h"
#include "nlohmann/json.hpp"
#include "privacy/accountant.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/dp_strategy.h"
#include "server/metrics.h"
#include "server/store.h"
#include "tests/server/store_rounds.h"
#include "tests/test_util.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using seedling::server::Counter;
using seedling::server::DashboardRound;
using seedling::server::DashboardSnapshot;
using seedling::server::Histogram;
using seedling::server::HttpOptions;
using seedling::server::HttpServer;
using seedling::server::Metrics;
using Clock = std::chrono::steady_clock;

// ---- A strict parser for the Prometheus text format 0.0.4, written for clarity
// ------------------------

struct PromSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct PromText {
  std::map<std::string, std::string> help;
  std::map<std::string, std::string> type;
  std::vector<std::string> family_order;  // in order of appearance
  std::vector<PromSample> samples;
};

bool IsMetricNameChar(char c, bool first) {
  return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':' ||
         (!first && std::isdigit(static_cast<unsigned char>(c)));
}
bool IsLabelNameChar(char c, bool first) {
  return std::isalpha(static_cast<unsigned char>(c)) || c == '_' ||
         (!first && std::isdigit(static_cast<unsigned char>(c)));
}

// Reads [a-zA-Z_:][a-zA-Z0-9_:]* (or the label-name set) at `pos`; empty on failure.
std::string ReadName(const std::string& s, size_t& pos, bool label) {
  const size_t start = pos;
  while (pos < s.size() && (label ? IsLabelNameChar(s[pos], pos == start) : IsMetricNameChar(s[pos], pos == start))) {
    ++pos;
  }
  return s.substr(start, pos - start);
}

// Go's ParseFloat spellings that Prometheus accepts; nullopt for anything else.
std::optional<double> ParseValue(const std::string& v) {
  if (v == "NaN") return NAN;
  if (v == "+Inf") return INFINITY;
  if (v == "-Inf") return -INFINITY;
  if (v.empty()) return std::nullopt;
  char* end = nullptr;
  const double d = std::strtod(v.c_str(), &end);
  if (end != v.c_str() + v.size()) return std::nullopt;
  return d;
}

// The family a sample name belongs to: itself, or a histogram's base name for _bucket/_sum/_count.
std::string FamilyOf(const PromText& t, const std::string& sample) {
  if (t.type.count(sample)) return sample;
  for (const std::string suffix : {"_bucket", "_sum", "_count"}) {
    if (sample.size() > suffix.size() && sample.compare(sample.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const std::string base = sample.substr(0, sample.size() - suffix.size());
      const auto it = t.type.find(base);
      if (it != t.type.end() && it->second == "histogram") return base;
    }
  }
  return "";
}

// Parses the whole text; every malformed line fails the test with the line in the message.
PromText ParseProm(const std::string& text) {
  PromText t;
  REQUIRE(!text.empty());
  REQUIRE(text.back() == '\n');
  std::set<std::string> finished_families;
  std::string current_family;
  size_t line_start = 0;
  while (line_start < text.size()) {
    const size_t nl = text.find('\n', line_start);
    const std::string line = text.substr(line_start, nl - line_start);
    line_start = nl + 1;
    INFO("line: " << line);
    REQUIRE(!line.empty());
    std::string family;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      size_t pos = 7;
      const std::string name = ReadName(line, pos, false);
      REQUIRE(!name.empty());
      REQUIRE(pos < line.size());
      REQUIRE(line[pos] == ' ');
      const std::string rest = line.substr(pos + 1);
      if (line[2] == 'H') {
        std::string help;
        for (size_t i = 0; i < rest.size(); ++i) {
          if (rest[i] != '\\') {
            help += rest[i];
            continue;
          }
          REQUIRE(i + 1 < rest.size());
          const char e = rest[++i];
          REQUIRE((e == '\\' || e == 'n'));
          help += e == 'n' ? '\n' : '\\';
        }
        REQUIRE(t.help.emplace(name, help).second);  // one HELP per metric
      } else {
        REQUIRE(
            (rest == "counter" || rest == "gauge" || rest == "histogram" || rest == "summary" || rest == "untyped"));
        REQUIRE(t.type.emplace(name, rest).second);  // one TYPE per metric, before its samples
        t.family_order.push_back(name);
      }
      family = name;
    } else {
      REQUIRE(line[0] != '#');  // no other comments are emitted
      PromSample s;
      size_t pos = 0;
      s.name = ReadName(line, pos, false);
      REQUIRE(!s.name.empty());
      REQUIRE(pos < line.size());
      if (line[pos] == '{') {
        ++pos;
        while (true) {
          REQUIRE(pos < line.size());
          if (line[pos] == '}') break;
          const std::string lname = ReadName(line, pos, true);
          REQUIRE(!lname.empty());
          REQUIRE(line.compare(pos, 2, "=\"") == 0);
          pos += 2;
          std::string value;
          while (true) {
            REQUIRE(pos < line.size());
            const char c = line[pos++];
            if (c == '"') break;
            if (c == '\\') {
              REQUIRE(pos < line.size());
              const char e = line[pos++];
              REQUIRE((e == '\\' || e == '"' || e == 'n'));
              value += e == 'n' ? '\n' : e;
            } else {
              value += c;
            }
          }
          REQUIRE(s.labels.emplace(lname, value).second);  // no duplicate label names
          REQUIRE(pos < line.size());
          if (line[pos] == ',') ++pos;
        }
        ++pos;  // '}'
      }
      REQUIRE(pos < line.size());
      REQUIRE(line[pos] == ' ');
      const std::string rest = line.substr(pos + 1);
      const size_t space = rest.find(' ');
      const std::string value = rest.substr(0, space);
      if (space != std::string::npos) {  // optional integer timestamp
        const std::string ts = rest.substr(space + 1);
        REQUIRE(!ts.empty());
        REQUIRE(std::all_of(ts.begin(), ts.end(), [](char c) { return std::isdigit(c) || c == '-'; }));
      }
      const std::optional<double> v = ParseValue(value);
      REQUIRE(v.has_value());
      s.value = *v;
      family = FamilyOf(t, s.name);
      REQUIRE(!family.empty());  // every sample belongs to a TYPE declared before it
      t.samples.push_back(std::move(s));
    }
    // All lines of one metric are consecutive.
    if (family != current_family) {
      REQUIRE(finished_families.count(family) == 0);
      if (!current_family.empty()) finished_families.insert(current_family);
      current_family = family;
    }
  }
  return t;
}

const PromSample* FindSample(const PromText& t, const std::string& name,
                             const std::map<std::string, std::string>& labels) {
  for (const PromSample& s : t.samples) {
    if (s.name == name && s.labels == labels) return &s;
  }
  return nullptr;
}

double SampleValue(const PromText& t, const std::string& name, const std::map<std::string, std::string>& labels) {
  const PromSample* s = FindSample(t, name, labels);
  INFO("sample " << name);
  REQUIRE(s != nullptr);
  return s->value;
}

// The _bucket samples of one histogram series, in output order, as (le, cumulative count).
std::vector<std::pair<std::string, double>> Buckets(const PromText& t, const std::string& name,
                                                    const std::map<std::string, std::string>& labels) {
  std::vector<std::pair<std::string, double>> out;
  for (const PromSample& s : t.samples) {
    if (s.name != name + "_bucket") continue;
    auto rest = s.labels;
    const auto le = rest.find("le");
    REQUIRE(le != rest.end());
    const std::string le_value = le->second;
    rest.erase(le);
    if (rest == labels) out.emplace_back(le_value, s.value);
  }
  return out;
}

// ---- HTTP helpers
// --------------------------------------------------------------------------------------

struct Reply {
  unsigned status = 0;
  std::string content_type;
  std::string allow;
  std::string body;
};

// One request on a fresh connection (Beast's synchronous client).
Reply Fetch(uint16_t port, const std::string& target, http::verb verb = http::verb::get) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (verb == http::verb::post) req.body() = "{}";
  req.prepare_payload();
  http::write(stream, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(stream, buffer, res);
  beast::error_code ec;
  stream.socket().shutdown(tcp::socket::shutdown_both, ec);
  Reply r;
  r.status = res.result_int();
  r.content_type = std::string(res[http::field::content_type]);
  r.allow = std::string(res[http::field::allow]);
  r.body = res.body();
  return r;
}

// A raw TCP client whose reads give up after `recv_timeout`, so a server that fails to close a
// connection fails the test instead of hanging it.
class RawClient {
 public:
  RawClient(uint16_t port, std::chrono::milliseconds recv_timeout) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    timeval tv{};
    tv.tv_sec = recv_timeout.count() / 1000;
    tv.tv_usec = (recv_timeout.count() % 1000) * 1000;
    REQUIRE(::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  }
  ~RawClient() { ::close(fd_); }

  void Send(const std::string& data) {
    REQUIRE(::send(fd_, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size()));
  }

  enum class End { kData, kClosed, kTimedOut };
  // One recv(): appends what came to `out`.
  End Receive(std::string& out) {
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n > 0) {
      out.append(buf, n);
      return End::kData;
    }
    if (n == 0 || errno == ECONNRESET) return End::kClosed;
    return End::kTimedOut;
  }

  // Reads until `out` contains `needle`; false if the connection closed or timed out first.
  bool ReceiveUntil(std::string& out, const std::string& needle) {
    while (out.find(needle) == std::string::npos) {
      if (Receive(out) != End::kData) return false;
    }
    return true;
  }

 private:
  int fd_ = -1;
};

DashboardRound Round(uint64_t id, double loss_start, double loss_end, uint64_t up, uint64_t down) {
  DashboardRound r;
  r.round_id = id;
  r.state = "committed";
  r.method = "fedavg";
  r.selected = 12;
  r.accepted = 10;
  r.rejected = 2;
  r.loss_start = loss_start;
  r.loss_end = loss_end;
  r.bytes_up = up;
  r.bytes_down = down;
  r.opened_ms = 1'700'000'000'000 + static_cast<int64_t>(id) * 60'000;
  r.closed_ms = r.opened_ms + 45'000;
  return r;
}

DashboardSnapshot TestSnapshot() {
  DashboardSnapshot s;
  s.server_version = "0.3.1-test";
  s.global_version = 42;
  DashboardRound current = Round(1005, NAN, NAN, 0, 0);
  current.state = "collecting";
  current.method = "mezo";
  current.selected = 9;
  current.accepted = 4;
  current.rejected = 1;
  current.closed_ms = 0;
  current.deadline_ms = current.opened_ms + 300'000;
  s.current = current;
  // Newest first, as the coordinator hands them over.
  s.recent = {Round(1004, 1.70, 1.55, 3u << 20, 5u << 20), Round(1003, 1.90, 1.72, 3u << 20, 5u << 20),
              Round(1002, 2.20, 1.95, 2u << 20, 5u << 20), Round(1001, 2.60, 2.25, 1u << 20, 5u << 20)};
  s.rejected_by_reason = {{"stale", 3}, {"bad_shape", 1}};
  s.devices_registered = 17;
  s.connections = 3;
  s.epsilon = 2.5;
  return s;
}

// A started server on an OS-chosen port with the test snapshot.
struct ServerFixture {
  explicit ServerFixture(HttpOptions options = {}, seedling::server::HealthCheck health = {},
                         seedling::server::SnapshotProvider provider = TestSnapshot)
      : server(metrics) {
    metrics.AddCounter("seedling_test_events_total", "Events seen by the test.").Get().Increment(7);
    options.port = 0;
    const absl::Status st = server.Start(options, std::move(provider), std::move(health));
    INFO(st.ToString());
    REQUIRE(st.ok());
    REQUIRE(server.port() != 0);
  }
  Metrics metrics;
  HttpServer server;
};

// The part of `html` from the <svg> with class `css_class` to its </svg>.
std::string SvgWithClass(const std::string& html, const std::string& css_class) {
  const size_t start = html.find("<svg class=\"" + css_class + "\"");
  REQUIRE(start != std::string::npos);
  const size_t end = html.find("</svg>", start);
  REQUIRE(end != std::string::npos);
  return html.substr(start, end - start);
}

size_t CountOf(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t p = haystack.find(needle); p != std::string::npos; p = haystack.find(needle, p + 1)) ++n;
  return n;
}

}  // namespace

// ---- Metrics registry
// ----------------------------------------------------------------------------------

TEST_CASE("Prometheus output of counters, labels and gauges parses back with the values set", "[server][http]") {
  Metrics m;
  auto& rejected = m.AddCounter("seedling_updates_rejected_total", "Updates refused, by reason.", {"reason"});
  rejected.WithLabels({"stale"}).Increment(3);
  rejected.WithLabels({"bad_shape"}).Increment();
  m.AddCounter("seedling_rounds_total", "Rounds closed.").Get().Increment(12);
  m.AddGauge("seedling_connections", "Open device connections.").Get().Set(4.5);
  auto& temp = m.AddGauge("seedling_test_gauge", "A gauge that goes negative.", {"kind", "zone"});
  temp.WithLabels({"a", "b"}).Set(-2.25);
  temp.WithLabels({"a", "b"}).Add(0.25);

  const PromText t = ParseProm(m.RenderPrometheus());
  CHECK(t.type.at("seedling_updates_rejected_total") == "counter");
  CHECK(t.type.at("seedling_connections") == "gauge");
  CHECK(t.help.at("seedling_updates_rejected_total") == "Updates refused, by reason.");
  CHECK(SampleValue(t, "seedling_updates_rejected_total", {{"reason", "stale"}}) == 3);
  CHECK(SampleValue(t, "seedling_updates_rejected_total", {{"reason", "bad_shape"}}) == 1);
  CHECK(SampleValue(t, "seedling_rounds_total", {}) == 12);
  CHECK(SampleValue(t, "seedling_connections", {}) == 4.5);
  CHECK(SampleValue(t, "seedling_test_gauge", {{"kind", "a"}, {"zone", "b"}}) == -2.0);
  CHECK(t.samples.size() == 5);
}

TEST_CASE("Histogram buckets are cumulative and the +Inf bucket equals the count", "[server][http]") {
  Metrics m;
  auto& latency = m.AddHistogram("seedling_request_seconds", "Request latency.", {0.1, 0.5, 1}, {"kind"});
  Histogram& h = latency.WithLabels({"upload"});
  for (double v : {0.05, 0.1, 0.3, 2.0}) h.Observe(v);  // 0.1 lands in le="0.1": bounds are inclusive
  h.Observe(NAN);                                       // ignored
  latency.WithLabels({"hello"}).Observe(0.7);

  const PromText t = ParseProm(m.RenderPrometheus());
  CHECK(t.type.at("seedling_request_seconds") == "histogram");
  const auto buckets = Buckets(t, "seedling_request_seconds", {{"kind", "upload"}});
  const std::vector<std::pair<std::string, double>> expected = {{"0.1", 2}, {"0.5", 3}, {"1", 3}, {"+Inf", 4}};
  CHECK(buckets == expected);
  for (size_t i = 1; i < buckets.size(); ++i) CHECK(buckets[i].second >= buckets[i - 1].second);
  CHECK(SampleValue(t, "seedling_request_seconds_count", {{"kind", "upload"}}) == 4);
  CHECK(SampleValue(t, "seedling_request_seconds_sum", {{"kind", "upload"}}) == Approx(2.45));
  const auto other = Buckets(t, "seedling_request_seconds", {{"kind", "hello"}});
  REQUIRE(other.size() == 4);
  CHECK(other.back().second == SampleValue(t, "seedling_request_seconds_count", {{"kind", "hello"}}));
  CHECK(other[1].second == 0);  // 0.7 is above 0.5
  CHECK(other[2].second == 1);
}

TEST_CASE("Help text and label values are escaped in the Prometheus output", "[server][http]") {
  Metrics m;
  const std::string help = "Back\\slash and\nnewline \"quoted\"";
  const std::string value = "a\"b\\c\nd";
  m.AddCounter("seedling_escape_total", help, {"what"}).WithLabels({value}).Increment(2);
  const std::string text = m.RenderPrometheus();
  CHECK(text.find("# HELP seedling_escape_total Back\\\\slash and\\nnewline \"quoted\"\n") != std::string::npos);
  CHECK(text.find("{what=\"a\\\"b\\\\c\\nd\"} 2\n") != std::string::npos);
  const PromText t = ParseProm(text);
  CHECK(t.help.at("seedling_escape_total") == help);
  CHECK(SampleValue(t, "seedling_escape_total", {{"what", value}}) == 2);
}

TEST_CASE("Invalid UTF-8 in a label value is replaced so the scrape stays valid", "[server][http]") {
  Metrics m;
  m.AddCounter("seedling_reason_total", "By reason.", {"reason"}).WithLabels({"bad\xff\xfe"}).Increment();
  const PromText t = ParseProm(m.RenderPrometheus());
  CHECK(SampleValue(t, "seedling_reason_total", {{"reason", "bad\xEF\xBF\xBD\xEF\xBF\xBD"}}) == 1);
}

TEST_CASE("Prometheus output is sorted by metric name and label values, and stable", "[server][http]") {
  Metrics m;
  auto& b = m.AddCounter("seedling_b_total", "B.", {"k"});
  b.WithLabels({"z"}).Increment();
  b.WithLabels({"a"}).Increment();
  m.AddGauge("seedling_a", "A.").Get().Set(1);
  m.AddHistogram("seedling_c_bytes", "C.", Histogram::SizeBytesBuckets()).Get().Observe(5000);
  const std::string first = m.RenderPrometheus();
  const PromText t = ParseProm(first);
  CHECK(t.family_order == std::vector<std::string>{"seedling_a", "seedling_b_total", "seedling_c_bytes"});
  CHECK(first.find("seedling_b_total{k=\"a\"}") < first.find("seedling_b_total{k=\"z\"}"));
  CHECK(m.RenderPrometheus() == first);
}

TEST_CASE("Registering a metric again returns the same series", "[server][http]") {
  Metrics m;
  m.AddCounter("seedling_x_total", "X.", {"k"}).WithLabels({"v"}).Increment();
  Counter& again = m.AddCounter("seedling_x_total", "X.", {"k"}).WithLabels({"v"});
  again.Increment();
  CHECK(again.Value() == 2);
  CHECK(CountOf(m.RenderPrometheus(), "# TYPE seedling_x_total") == 1);
}

TEST_CASE("Counters incremented from 8 threads sum exactly", "[server][http]") {
  Metrics m;
  auto& family = m.AddCounter("seedling_concurrent_total", "Concurrent increments.", {"thread"});
  Counter& shared = m.AddCounter("seedling_shared_total", "One series, many writers.").Get();
  auto& hist = m.AddHistogram("seedling_concurrent_seconds", "Concurrent observations.", {0.5, 1.5});
  constexpr int kThreads = 8, kPerThread = 50'000;
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      while (!go.load()) {
      }
      for (int k = 0; k < kPerThread; ++k) {
        shared.Increment();
        // Lookups and first-use creation of label sets race with each other and with rendering.
        family.WithLabels({std::to_string(i % 3)}).Increment();
        hist.Get().Observe(1.0);
        if (k % 10'000 == 0) (void)m.RenderPrometheus();
      }
    });
  }
  go = true;
  for (auto& t : threads) t.join();
  CHECK(shared.Value() == uint64_t{kThreads} * kPerThread);
  const PromText t = ParseProm(m.RenderPrometheus());
  double per_label = 0;
  for (const char* l : {"0", "1", "2"}) per_label += SampleValue(t, "seedling_concurrent_total", {{"thread", l}});
  CHECK(per_label == double{kThreads} * kPerThread);
  CHECK(SampleValue(t, "seedling_concurrent_seconds_count", {}) == double{kThreads} * kPerThread);
  CHECK(SampleValue(t, "seedling_concurrent_seconds_sum", {}) == double{kThreads} * kPerThread);
}

// ---- Dashboard rendering
// -------------------------------------------------------------------------------

TEST_CASE("The dashboard HTML-escapes every string from the snapshot", "[server][http]") {
  DashboardSnapshot s = TestSnapshot();
  s.recent[0].abort_reason = "<script>alert('x')</script>";
  s.rejected_by_reason["<b>&"] = 1;
  s.server_version = "\"><img src=x>";
  const std::string html = seedling::server::RenderDashboardHtml(s, 0);
  CHECK(html.find("<script") == std::string::npos);
  CHECK(html.find("<img") == std::string::npos);
  CHECK(html.find("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") != std::string::npos);
  CHECK(html.find("&lt;b&gt;&amp;") != std::string::npos);
  CHECK(html.find("http-equiv=\"refresh\"") == std::string::npos);  // refresh 0: none
}

TEST_CASE("A round without a reported loss leaves no point in the loss chart", "[server][http]") {
  DashboardSnapshot s = TestSnapshot();
  s.recent.insert(s.recent.begin(), Round(1006, NAN, NAN, 0, 0));
  s.recent[0].state = "aborted";
  s.recent[0].abort_reason = "too few reports";
  const std::string html = seedling::server::RenderDashboardHtml(s, 5);
  const std::string loss = SvgWithClass(html, "chart-loss");
  CHECK(CountOf(loss, "class=\"pt-end\"") == 4);
  CHECK(CountOf(loss, "class=\"pt-start\"") == 4);
  CHECK(loss.find("round 1006") == std::string::npos);
  CHECK(CountOf(SvgWithClass(html, "chart-bytes"), "class=\"bar-up\"") == 5);
  CHECK(html.find("<meta http-equiv=\"refresh\" content=\"5\">") != std::string::npos);
}

TEST_CASE("Status JSON writes NaN losses and epsilon as null and an absent round as null", "[server][http]") {
  DashboardSnapshot s = TestSnapshot();
  s.current.reset();
  s.epsilon = NAN;
  const nlohmann::json j = nlohmann::json::parse(seedling::server::RenderStatusJson(s));
  CHECK(j.at("current").is_null());
  CHECK(j.at("epsilon").is_null());
  // DP off: no mechanism and no DP-FTRL figures.
  CHECK(j.at("dp_mechanism").is_null());
  CHECK(j.at("dp_rho").is_null());
  CHECK(j.at("dp_epsilon_delta_1e-10").is_null());
  s = TestSnapshot();
  const nlohmann::json k = nlohmann::json::parse(seedling::server::RenderStatusJson(s));
  CHECK(k.at("current").at("loss_start").is_null());
  CHECK(k.at("current").at("round_id") == 1005);
}

// ---- HTTP server
// ---------------------------------------------------------------------------------------

TEST_CASE("GET /healthz answers 200 ok while the server runs", "[server][http]") {
  ServerFixture f;
  const Reply r = Fetch(f.server.port(), "/healthz");
  CHECK(r.status == 200);
  CHECK(r.body == "ok");
}

TEST_CASE("GET /healthz answers 503 when the health callback reports a failure", "[server][http]") {
  std::atomic<bool> healthy{true};
  ServerFixture f({}, [&]() -> absl::Status {
    if (healthy) return absl::OkStatus();
    return absl::UnavailableError("store: database is locked");
  });
  CHECK(Fetch(f.server.port(), "/healthz").status == 200);
  healthy = false;
  const Reply r = Fetch(f.server.port(), "/healthz");
  CHECK(r.status == 503);
  CHECK(r.body.find("store: database is locked") != std::string::npos);
}

TEST_CASE("GET /metrics serves the registry in the Prometheus text format", "[server][http]") {
  ServerFixture f;
  (void)Fetch(f.server.port(), "/healthz");
  const Reply r = Fetch(f.server.port(), "/metrics");
  CHECK(r.status == 200);
  CHECK(r.content_type.rfind("text/plain; version=0.0.4", 0) == 0);
  const PromText t = ParseProm(r.body);
  CHECK(SampleValue(t, "seedling_test_events_total", {}) == 7);
  // The server counts its own requests (the /healthz above has finished by now).
  CHECK(SampleValue(t, "seedling_http_requests_total", {{"route", "/healthz"}, {"code", "200"}}) == 1);
}

TEST_CASE("GET / shows the round ids and one loss point per round", "[server][http]") {
  ServerFixture f;
  const Reply r = Fetch(f.server.port(), "/");
  REQUIRE(r.status == 200);
  CHECK(r.content_type.rfind("text/html", 0) == 0);
  const std::string& html = r.body;
  for (const char* id : {"1001", "1002", "1003", "1004", "1005"}) {
    INFO("round " << id);
    CHECK(html.find(std::string(">") + id + "<") != std::string::npos);
  }
  const std::string loss = SvgWithClass(html, "chart-loss");
  CHECK(CountOf(loss, "class=\"pt-end\"") == 4);
  CHECK(CountOf(loss, "class=\"pt-start\"") == 4);
  for (const char* id : {"1001", "1002", "1003", "1004"}) {
    INFO("round " << id);
    CHECK(loss.find(std::string("round ") + id + ": end loss") != std::string::npos);
  }
  // Oldest on the left: the first end-loss point is round 1001's.
  CHECK(loss.find("round 1001: end loss") < loss.find("round 1004: end loss"));
  const std::string bytes = SvgWithClass(html, "chart-bytes");
  CHECK(CountOf(bytes, "class=\"bar-up\"") == 4);
  CHECK(CountOf(bytes, "class=\"bar-down\"") == 4);
  CHECK(html.find("bad_shape") != std::string::npos);
  CHECK(html.find("collecting") != std::string::npos);
  CHECK(html.find("<script") == std::string::npos);
}

TEST_CASE("GET /api/status serves the snapshot as JSON", "[server][http]") {
  ServerFixture f;
  const Reply r = Fetch(f.server.port(), "/api/status");
  REQUIRE(r.status == 200);
  CHECK(r.content_type == "application/json");
  const nlohmann::json j = nlohmann::json::parse(r.body);
  CHECK(j.at("server_version") == "0.3.1-test");
  CHECK(j.at("global_version") == 42);
  CHECK(j.at("current").at("round_id") == 1005);
  CHECK(j.at("current").at("state") == "collecting");
  CHECK(j.at("current").at("accepted") == 4);
  REQUIRE(j.at("recent").size() == 4);
  CHECK(j.at("recent")[0].at("round_id") == 1004);
  CHECK(j.at("recent")[0].at("loss_end").get<double>() == Approx(1.55));
  CHECK(j.at("recent")[3].at("bytes_up") == (1u << 20));
  CHECK(j.at("rejected_by_reason").at("stale") == 3);
  CHECK(j.at("devices_registered") == 17);
  CHECK(j.at("connections") == 3);
  CHECK(j.at("epsilon").get<double>() == 2.5);
}

TEST_CASE("An unknown path gets 404", "[server][http]") {
  ServerFixture f;
  CHECK(Fetch(f.server.port(), "/nope").status == 404);
  CHECK(Fetch(f.server.port(), "/metrics/extra").status == 404);
}

TEST_CASE("A POST to a known route gets 405 with Allow: GET", "[server][http]") {
  ServerFixture f;
  const Reply r = Fetch(f.server.port(), "/metrics", http::verb::post);
  CHECK(r.status == 405);
  CHECK(r.allow == "GET");
}

TEST_CASE("A provider that throws yields 500 and the server keeps serving", "[server][http]") {
  ServerFixture f({}, {}, []() -> DashboardSnapshot { throw std::runtime_error("boom"); });
  CHECK(Fetch(f.server.port(), "/api/status").status == 500);
  CHECK(Fetch(f.server.port(), "/healthz").status == 200);
}

TEST_CASE("A client that connects and sends nothing is dropped after the read timeout", "[server][http]") {
  HttpOptions options;
  options.read_timeout = std::chrono::milliseconds(300);
  ServerFixture f(options);
  RawClient client(f.server.port(), std::chrono::seconds(5));
  const auto start = Clock::now();
  std::string got;
  const RawClient::End end = client.Receive(got);
  const auto elapsed = Clock::now() - start;
  CHECK(end == RawClient::End::kClosed);
  CHECK(got.empty());
  CHECK(elapsed >= std::chrono::milliseconds(250));
  CHECK(elapsed < std::chrono::seconds(3));
}

TEST_CASE("Stop returns promptly with an idle keep-alive connection open", "[server][http]") {
  HttpOptions options;
  options.threads = 2;
  ServerFixture f(options);  // 30 s read timeout: only Stop closing the connection ends it quickly
  RawClient client(f.server.port(), std::chrono::seconds(5));
  const std::string request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  std::string got;
  client.Send(request);
  REQUIRE(client.ReceiveUntil(got, "\r\n\r\nok"));
  got.clear();
  client.Send(request);  // still open: the connection is kept alive
  REQUIRE(client.ReceiveUntil(got, "\r\n\r\nok"));

  const auto start = Clock::now();
  f.server.Stop();
  CHECK(Clock::now() - start < std::chrono::seconds(2));
  got.clear();
  CHECK(client.Receive(got) == RawClient::End::kClosed);
  f.server.Stop();  // idempotent
}

TEST_CASE("A request body over the limit gets 413 and the connection is closed", "[server][http]") {
  ServerFixture f;
  RawClient client(f.server.port(), std::chrono::seconds(5));
  client.Send("POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n");
  std::string got;
  while (client.Receive(got) == RawClient::End::kData) {
  }
  CHECK(got.rfind("HTTP/1.1 413 ", 0) == 0);
  CHECK(got.find("Connection: close") != std::string::npos);
}

TEST_CASE("Connections beyond max_connections are closed while the others are served", "[server][http]") {
  HttpOptions options;
  options.max_connections = 1;
  ServerFixture f(options);
  RawClient first(f.server.port(), std::chrono::seconds(5));
  const std::string request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  std::string got;
  first.Send(request);  // answered: `first` is accepted and registered before `second` is accepted
  REQUIRE(first.ReceiveUntil(got, "\r\n\r\nok"));
  RawClient second(f.server.port(), std::chrono::seconds(5));
  std::string nothing;
  CHECK(second.Receive(nothing) == RawClient::End::kClosed);
  CHECK(nothing.empty());
  got.clear();
  first.Send(request);
  CHECK(first.ReceiveUntil(got, "\r\n\r\nok"));
}

TEST_CASE("Start rejects an address that is not an IP and a port already in use", "[server][http]") {
  Metrics m;
  HttpServer bad(m);
  HttpOptions options;
  options.bind_address = "localhost:80";
  CHECK(bad.Start(options, TestSnapshot).code() == absl::StatusCode::kInvalidArgument);

  ServerFixture f;
  HttpServer second(m);
  options.bind_address = "127.0.0.1";
  options.port = f.server.port();
  CHECK(second.Start(options, TestSnapshot).code() == absl::StatusCode::kUnavailable);
}

// ---- The coordinator's privacy figures, served
// ----------------------------------------------------------

namespace {

using seedling::server::Coordinator;
using seedling::server::DpSpend;
using seedling::server::PrivacyConfig;
using seedling::server::RoundRecord;
using seedling::server::RoundState;
using seedling::server::ServerConfig;
using seedling::server::Store;

// A coordinator restarted over a state directory whose store holds `rounds` committed rounds, each recorded
// with `spend` (its round id filled in), and served by an HttpServer sharing the coordinator's metrics.
struct DpServerWorld {
  seedling::testing::TempDir dir;
  ServerConfig config;
  seedling::ManualClock clock;
  Metrics metrics;
  std::unique_ptr<Coordinator> coordinator;
  HttpServer http{metrics};

  DpServerWorld(const PrivacyConfig& privacy, int rounds, DpSpend spend) {
    const std::string model_dir = seedling::JoinPath(dir.path, "model");
    seedling::model::InitModelOptions init;
    init.preset = "tiny";
    init.seed = 3;
    REQUIRE(seedling::model::InitModel(model_dir, init).ok());
    config.state_dir = seedling::JoinPath(dir.path, "state");
    config.model_dir = model_dir;
    config.lora_rank = 4;
    config.clients_per_round = 1;
    config.min_reports = 1;
    config.privacy = privacy;
    REQUIRE(seedling::MakeDirs(config.state_dir).ok());
    if (privacy.dp_ftrl()) {
      // The tree's state, as the first start of a DP-FTRL run creates it before any round commits.
      REQUIRE(seedling::server::OpenTreeNoise(config.state_dir, privacy, 1, 0).ok());
    }
    CommitRounds(rounds, spend);
    auto c = Coordinator::Create(config, &clock, &metrics);
    INFO(c.status().ToString());
    REQUIRE(c.ok());
    coordinator = std::move(c).value();
    HttpOptions options;
    options.port = 0;
    REQUIRE(http.Start(options, [this] { return coordinator->Snapshot(); }).ok());
  }
  ~DpServerWorld() { http.Stop(); }

  void CommitRounds(int rounds, DpSpend spend) {
    auto mc = seedling::model::LoadModelConfig(config.model_dir);
    REQUIRE(mc.ok());
    seedling::lora::LoraConfig lc;
    lc.rank = config.lora_rank;
    lc.alpha = config.lora_alpha;
    auto adapter = seedling::lora::LoraAdapter::Create(*mc, lc);
    REQUIRE(adapter.ok());
    auto store = Store::Open(config.state_dir);
    REQUIRE(store.ok());
    // 10 devices and 1 client per round: the Gaussian mechanism's q = 0.1.
    for (int d = 0; d < 10; ++d) {
      REQUIRE(seedling::server::AddDevice(**store, "dev-" + std::to_string(d), 1000).ok());
    }
    for (int version = 1; version <= rounds; ++version) {
      const uint64_t id = seedling::server::testing::AggregatingRound(**store);
      REQUIRE((*store)->WriteCheckpoint(version, {{"params", std::vector<float>((*adapter)->numel(), 0.0f)}}).ok());
      spend.round_id = id;
      REQUIRE((*store)->CommitRound(id, version, 3, "{}", "", spend).ok());
    }
  }
};

PrivacyConfig DpPrivacy() {
  PrivacyConfig p;
  p.dp = true;
  p.clip_norm = 1.0;
  p.noise_multiplier = 1.0;
  p.target_epsilon = 100;
  p.delta = 1e-5;
  p.noise = "seeded";
  return p;
}

// Levels of a tree with `leaves` rounds in use: floor(log2 leaves) + 1, 0 for none (the tree's level l has
// nodes once 2^l leaves exist).
int NaiveLevels(int64_t leaves) {
  int levels = 0;
  while (leaves >= (int64_t{1} << levels)) ++levels;
  return levels;
}

// DP-FTRL's zCDP, written out (docs/methods.md, "DP-FTRL"): k^2 / (2 z^2) * (floor(r / R) L(R) + L(r mod R)).
double NaiveFtrlRho(int64_t rounds, int64_t per_tree, double z, int64_t k) {
  const double levels =
      static_cast<double>((rounds / per_tree) * NaiveLevels(per_tree) + NaiveLevels(rounds % per_tree));
  return static_cast<double>(k * k) / (2 * z * z) * levels;
}

double ZcdpEpsilon(double rho, double delta) { return rho + 2 * std::sqrt(rho * std::log(1 / delta)); }

}  // namespace

TEST_CASE("A DP-FTRL coordinator serves its mechanism, rho and epsilon at both deltas", "[server][http][dp][ftrl]") {
  PrivacyConfig privacy = DpPrivacy();
  privacy.mechanism = "dp-ftrl";
  privacy.tree_restart_rounds = 4;
  privacy.max_participations_per_tree = 2;
  // 5 rounds, k = 2 (recorded as k^2 = 4 unamplified steps each): trees of 4 and 1 rounds, 3 + 1 levels,
  // rho = 4 / 2 * 4 = 8.
  DpServerWorld w(privacy, 5, DpSpend{0, 1.0, 1.0, 4});
  const double rho = NaiveFtrlRho(5, 4, 1.0, 2);
  REQUIRE(rho == 8.0);
  REQUIRE(rho == Approx(*seedling::privacy::TreeAggregationZcdp(5, 4, 1.0, 2)).epsilon(1e-12));
  const double eps = ZcdpEpsilon(rho, 1e-5);
  const double eps_1e10 = ZcdpEpsilon(rho, 1e-10);
  REQUIRE(eps_1e10 > eps);

  const Reply metrics = Fetch(w.http.port(), "/metrics");
  REQUIRE(metrics.status == 200);
  const PromText t = ParseProm(metrics.body);
  CHECK(SampleValue(t, "seedling_dp_rho", {}) == Approx(rho).epsilon(1e-12));
  CHECK(SampleValue(t, "seedling_dp_epsilon", {}) == Approx(eps).epsilon(1e-12));
  CHECK(SampleValue(t, "seedling_dp_epsilon_delta_1e_10", {}) == Approx(eps_1e10).epsilon(1e-12));
  CHECK(SampleValue(t, "seedling_dp_mechanism", {{"mechanism", "dp-ftrl"}}) == 1.0);

  const Reply status = Fetch(w.http.port(), "/api/status");
  REQUIRE(status.status == 200);
  const nlohmann::json j = nlohmann::json::parse(status.body);
  CHECK(j.at("dp_mechanism") == "dp-ftrl");
  CHECK(j.at("dp_rho").get<double>() == Approx(rho).epsilon(1e-12));
  CHECK(j.at("epsilon").get<double>() == Approx(eps).epsilon(1e-12));
  CHECK(j.at("dp_epsilon_delta_1e-10").get<double>() == Approx(eps_1e10).epsilon(1e-12));
  CHECK(j.at("dp_delta").get<double>() == 1e-5);

  const Reply page = Fetch(w.http.port(), "/");
  REQUIRE(page.status == 200);
  CHECK_THAT(page.body, Catch::Contains("DP-FTRL"));
  CHECK_THAT(page.body, Catch::Contains("ρ = 8 (zCDP)"));
  CHECK_THAT(page.body, Catch::Contains("at δ = 1e-10"));
}

TEST_CASE("A Gaussian DP coordinator serves its RDP epsilon and no rho", "[server][http][dp]") {
  // 3 rounds at q = 0.1, z = 1: the RDP accountant's epsilon at the configured delta.
  DpServerWorld w(DpPrivacy(), 3, DpSpend{0, 0.1, 1.0, 1});
  const double eps = seedling::privacy::ComputeEpsilon(0.1, 1.0, 3, 1e-5)->epsilon;
  REQUIRE(eps > 0);

  const PromText t = ParseProm(Fetch(w.http.port(), "/metrics").body);
  CHECK(SampleValue(t, "seedling_dp_epsilon", {}) == Approx(eps).epsilon(1e-12));
  CHECK(SampleValue(t, "seedling_dp_mechanism", {{"mechanism", "gaussian"}}) == 1.0);
  CHECK(FindSample(t, "seedling_dp_rho", {}) == nullptr);
  CHECK(FindSample(t, "seedling_dp_epsilon_delta_1e_10", {}) == nullptr);

  const nlohmann::json j = nlohmann::json::parse(Fetch(w.http.port(), "/api/status").body);
  CHECK(j.at("dp_mechanism") == "gaussian");
  CHECK(j.at("epsilon").get<double>() == Approx(eps).epsilon(1e-12));
  CHECK(j.at("dp_rho").is_null());
  CHECK(j.at("dp_epsilon_delta_1e-10").is_null());

  const std::string page = Fetch(w.http.port(), "/").body;
  CHECK_THAT(page, Catch::Contains("privacy spent ε = "));
  CHECK(page.find("ρ") == std::string::npos);
  CHECK(page.find("1e-10") == std::string::npos);
}
