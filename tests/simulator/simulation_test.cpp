// The simulator end to end: real coordinator, real clients, simulated clock (simulator/simulation.h).

#include "simulator/simulation.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "base/file.h"
#include "base/strings.h"
#include "client/compute_model.h"
#include "client/memory_planner.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/init.h"
#include "model/weights.h"
#include "privacy/accountant.h"
#include "server/fwdgrad_pacing.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace seedling::simulator {
namespace {

using seedling::testing::TempDir;

// One tiny model for every test in this file.
const std::string& TinyModel() { return seedling::testing::TinyModelDir(5); }

SimulationOptions Small(const std::string& out) {
  SimulationOptions o;
  o.model_dir = TinyModel();
  o.out_dir = out;
  o.methods = {"lora-bp", "kseed"};
  o.seed = 11;
  o.population.devices = 60;
  o.population.dropout_mean = 0.1;
  o.heldout_devices = 4;
  o.eval_examples = 16;
  o.corpus.rows_per_device = 6;
  o.server.rounds = 3;
  o.server.clients_per_round = 4;
  o.server.steps = 2;
  o.server.seq_len = 32;
  o.server.lora_rank = 4;
  o.progress = false;
  return o;
}

// The last held-out loss a run measured (rounds that aborted repeat none).
double LastEvalLoss(const MethodResult& m) {
  double last = NAN;
  for (const RoundRecord& round : m.rounds) {
    if (!std::isnan(round.eval_loss)) last = round.eval_loss;
  }
  return last;
}

// Everything a round reports except host time.
std::string Deterministic(const RoundRecord& r) {
  nlohmann::json j = ToJson(r);
  j.erase("wall_seconds");
  return j.dump();
}

std::string WriteClasses(const std::string& dir, const std::string& rows) {
  const std::string path = JoinPath(dir, "classes.csv");
  std::ofstream(path) << "name,share,gflops,ram_bytes,app_memory_bytes,uplink_mbps,downlink_mbps,rtt_ms,"
                         "train_watts,source\n"
                      << rows;
  return path;
}

// Runs both simulations; each must succeed with every method.
std::pair<SimulationResult, SimulationResult> RunBoth(const SimulationOptions& a, const SimulationOptions& b) {
  auto ra = RunSimulation(a);
  INFO(ra.status().ToString());
  REQUIRE(ra.ok());
  auto rb = RunSimulation(b);
  INFO(rb.status().ToString());
  REQUIRE(rb.ok());
  REQUIRE(ra->methods.size() == a.methods.size());
  REQUIRE(rb->methods.size() == b.methods.size());
  return {*std::move(ra), *std::move(rb)};
}

TEST_CASE("The same seed gives identical rounds with 1 and 2 threads", "[simulator]") {
  TempDir dir;
  SimulationOptions a = Small(JoinPath(dir.path, "a"));
  a.threads = 1;
  SimulationOptions b = Small(JoinPath(dir.path, "b"));
  b.threads = 2;
  const auto [ra, rb] = RunBoth(a, b);
  int64_t participants = 0;
  for (size_t m = 0; m < 2; ++m) {
    const MethodResult& x = ra.methods[m];
    const MethodResult& y = rb.methods[m];
    CHECK(x.client_errors == 0);
    REQUIRE(x.rounds.size() == 3);
    REQUIRE(y.rounds.size() == x.rounds.size());
    CHECK(x.initial_eval_loss == y.initial_eval_loss);
    for (size_t i = 0; i < x.rounds.size(); ++i) {
      CHECK(Deterministic(x.rounds[i]) == Deterministic(y.rounds[i]));
      participants += x.rounds[i].participants;
      CHECK(x.rounds[i].selected >= x.rounds[i].participants);
      if (x.rounds[i].committed && x.rounds[i].participants > 0) {
        // The participants' processed tokens over their simulated compute time: the phones' speed.
        CHECK(x.rounds[i].processed_tokens > 0);
        CHECK(x.rounds[i].device_tokens_per_second > 0);
      }
      CHECK(x.rounds[i].end_time_s >= x.rounds[i].start_time_s);
    }
  }
  CHECK(participants > 0);
  // The files on disk hold the same records.
  const auto lines = [](const std::string& path) {
    auto text = ReadFile(path);
    REQUIRE(text.ok());
    return static_cast<int64_t>(std::count(text->begin(), text->end(), '\n'));
  };
  CHECK(lines(JoinPath(a.out_dir, "rounds.jsonl")) == 6);
  CHECK(lines(JoinPath(a.out_dir, "rounds.csv")) == 7);
  auto html = ReadFile(ra.report_path);
  REQUIRE(html.ok());
  CHECK(html->find("<svg") != std::string::npos);
  CHECK(html->find("kseed") != std::string::npos);
}

TEST_CASE("The report opens with what ran and tabulates the population it ran on", "[simulator]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"kseed"};
  o.server.rounds = 2;
  o.phone_classes = WriteClasses(dir.path,
                                 "slow & <old>,0.5,5,3000000000,1500000000,5,20,80,3,test\n"
                                 "fast,0.5,50,8000000000,3000000000,20,100,30,5,test\n");
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  auto html = ReadFile(r->report_path);
  REQUIRE(html.ok());
  const MethodSummary& s = r->methods[0].summary;
  // The opening paragraph, from the options and the method's outcome (final loss as the summary table has it).
  char loss[32];
  std::snprintf(loss, sizeof(loss), "%.4g", s.final_eval_loss);
  CHECK_THAT(*html, Catch::Contains("<p class=\"run-summary\">Ran kseed fine-tuning "));
  CHECK_THAT(*html, Catch::Contains("on 60 simulated phones (+4 held out for evaluation): 2 rounds of 4 clients per "
                                    "round, on the built-in synthetic corpus, one topic and one writing persona per "
                                    "device; label total-variation distance from the global mix "));
  CHECK_THAT(*html, Catch::Contains(StrCat("kseed committed ", s.committed_rounds, " of 2 rounds in ")));
  CHECK_THAT(*html, Catch::Contains(StrCat(", ", loss, " at the end.")));
  // One row per class and one for every device, the class names escaped.
  CHECK_THAT(*html, Catch::Contains("<table class=\"population\">"));
  CHECK_THAT(*html, Catch::Contains("<tr><td>slow &amp; &lt;old&gt;</td>"));
  CHECK_THAT(*html, Catch::Contains("<tr><td>fast</td>"));
  CHECK_THAT(*html, Catch::Contains("<tr class=\"total\"><td>all</td><td class=\"num\">60</td>"));
  CHECK(html->find("slow & <old>") == std::string::npos);
}

TEST_CASE("A federation of phones of each newer family lowers the held-out loss", "[simulator][families]") {
  // Qwen3 (q/k norms per head), OLMo 2 (norms on the sub-blocks' outputs, q/k norms over the projections),
  // Gemma 3 (GeGLU, 1 + w norms before and after, scaled embeddings, local and global layers), Gemma 2
  // (soft-capped attention scores and logits, alternating local and global layers), Phi-3 (fused qkv_proj and
  // gate_up_proj, which the server's default q_proj, v_proj targets map to, LongRoPE), GPT-NeoX (LayerNorms,
  // parallel residual, partial rotary, query_key_value fused per head, a plain GELU MLP), GPT-2 (learned
  // positions, Conv1D-stored projections, c_attn), OPT (a position table with two unused rows, ReLU), Phi (one
  // LayerNorm feeding attention and the MLP side by side, an LM head with a bias).
  const std::string preset = GENERATE(as<std::string>{}, "tiny-qwen3", "tiny-olmo2", "tiny-gemma3", "tiny-gemma2",
                                      "tiny-phi3", "tiny-gptneox", "tiny-gpt2", "tiny-opt", "tiny-phi");
  INFO(preset);
  TempDir dir;
  model::InitModelOptions init;
  init.preset = preset;
  init.seed = 5;
  const std::string model_dir = JoinPath(dir.path, preset);
  REQUIRE(model::InitModel(model_dir, init).ok());
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.model_dir = model_dir;
  o.methods = {"lora-bp"};
  o.server.rounds = 5;
  o.server.steps = 8;
  o.server.lr = 1e-3;
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  const MethodResult& m = r->methods.at(0);
  CHECK(m.client_errors == 0);
  const double last = LastEvalLoss(m);
  INFO("initial " << m.initial_eval_loss << ", last " << last);
  REQUIRE_FALSE(std::isnan(last));
  CHECK(last < m.initial_eval_loss - 0.02);
}

TEST_CASE("Loopback TLS and in-memory transports give the same rounds and aggregates", "[simulator]") {
  TempDir dir;
  SimulationOptions a = Small(JoinPath(dir.path, "memory"));
  a.server.rounds = 2;
  a.threads = 2;
  SimulationOptions b = a;
  b.out_dir = JoinPath(dir.path, "tls");
  b.loopback = true;
  const auto [ra, rb] = RunBoth(a, b);
  int64_t committed = 0;
  for (size_t m = 0; m < 2; ++m) {
    const MethodResult& x = ra.methods[m];
    const MethodResult& y = rb.methods[m];
    CHECK(x.client_errors == 0);
    CHECK(y.client_errors == 0);
    REQUIRE(x.rounds.size() == 2);
    REQUIRE(y.rounds.size() == 2);
    for (size_t i = 0; i < x.rounds.size(); ++i) {
      // Includes the SHA-256 of the global parameters after the round: the same aggregate, bit for bit.
      CHECK(Deterministic(x.rounds[i]) == Deterministic(y.rounds[i]));
      if (x.rounds[i].committed) {
        ++committed;
        CHECK(x.rounds[i].global_sha256.size() == 64);
        CHECK(x.rounds[i].global_sha256 == y.rounds[i].global_sha256);
      }
    }
    // Each committed round changed the model.
    if (x.rounds[0].committed && x.rounds[1].committed) {
      CHECK(x.rounds[0].global_sha256 != x.rounds[1].global_sha256);
    }
  }
  CHECK(committed >= 2);
}

TEST_CASE("Accuracy is reported where held-out rows are labelled and only there", "[simulator]") {
  TempDir dir;
  // A 3-way topic classification task: the output is the row's label.
  const std::string data = JoinPath(dir.path, "topics.jsonl");
  {
    std::ofstream f(data);
    const char* topics[] = {"sports", "music", "food"};
    const char* words[] = {"the match ended late", "the band played loud", "the soup was hot"};
    for (int i = 0; i < 300; ++i) {
      f << R"({"instruction": "Topic of: )" << words[i % 3] << R"(", "output": ")" << topics[i % 3]
        << R"(", "topic": ")" << topics[i % 3] << "\"}\n";
    }
  }
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"lora-bp"};
  o.server.rounds = 2;
  o.data_path = data;
  o.server.seq_len = 128;  // the instruction template takes most of 32 tokens
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  int64_t measured = 0;
  for (const RoundRecord& rec : r->methods[0].rounds) {
    if (!rec.committed) continue;
    ++measured;
    CHECK(rec.accuracy >= 0.0);
    CHECK(rec.accuracy <= 1.0);
  }
  CHECK(measured > 0);
  // The model before training is scored too: the accuracy figures start at round 0.
  CHECK(r->methods[0].initial_accuracy >= 0.0);
  CHECK(r->methods[0].initial_accuracy <= 1.0);
  auto html = ReadFile(r->report_path);
  REQUIRE(html.ok());
  CHECK(html->find("<figure id=\"fig-accuracy\">") != std::string::npos);
  CHECK(html->find("<figure id=\"fig-accuracy-time\">") != std::string::npos);
  CHECK_THAT(*html, Catch::Contains(" before training)."));  // the opening paragraph's accuracy
  // The built-in corpus has topics but its rows are not classification rows: no accuracy.
  SimulationOptions plain = Small(JoinPath(dir.path, "plain"));
  plain.methods = {"lora-bp"};
  plain.server.rounds = 1;
  auto p = RunSimulation(plain);
  REQUIRE(p.ok());
  for (const RoundRecord& rec : p->methods[0].rounds) CHECK(std::isnan(rec.accuracy));
  CHECK(std::isnan(p->methods[0].initial_accuracy));
  auto plain_html = ReadFile(p->report_path);
  REQUIRE(plain_html.ok());
  CHECK(plain_html->find("fig-accuracy") == std::string::npos);
}

TEST_CASE("With DP on the records carry the epsilon spent, and seeded noise repeats", "[simulator]") {
  TempDir dir;
  SimulationOptions a = Small(JoinPath(dir.path, "a"));
  a.methods = {"lora-bp"};
  a.server.rounds = 2;
  a.server.privacy.dp = true;
  a.server.privacy.clip_norm = 0.5;
  a.server.privacy.noise_multiplier = 1.0;
  a.server.privacy.target_epsilon = 50;
  a.server.privacy.noise = "seeded";
  SimulationOptions b = a;
  b.out_dir = JoinPath(dir.path, "b");
  const auto [ra, rb] = RunBoth(a, b);
  const std::vector<RoundRecord>& x = ra.methods[0].rounds;
  const std::vector<RoundRecord>& y = rb.methods[0].rounds;
  REQUIRE(x.size() == 2);
  REQUIRE(y.size() == 2);
  double last = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    CHECK(Deterministic(x[i]) == Deterministic(y[i]));
    if (!x[i].committed) continue;
    CHECK(std::isfinite(x[i].epsilon));
    CHECK(std::isnan(x[i].rho));  // the Gaussian mechanism has no zCDP rho
    CHECK(std::isnan(x[i].epsilon_delta_1e10));
    CHECK(x[i].epsilon > last);  // every committed round spends
    last = x[i].epsilon;
  }
  CHECK(last > 0);
  auto html = ReadFile(ra.report_path);
  REQUIRE(html.ok());
  CHECK(html->find("fig-epsilon") != std::string::npos);
}

TEST_CASE("DP-FTRL runs in the simulator with a finite loss and its zCDP epsilon in the summary", "[simulator][ftrl]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "ftrl"));
  o.methods = {"lora-bp"};
  o.server.rounds = 4;
  o.server.privacy.dp = true;
  o.server.privacy.mechanism = "dp-ftrl";
  o.server.privacy.tree_restart_rounds = 2;
  o.server.privacy.clip_norm = 0.5;
  o.server.privacy.noise_multiplier = 1.0;
  o.server.privacy.target_epsilon = 50;
  o.server.privacy.noise = "seeded";
  auto r = RunSimulation(o);
  REQUIRE(r.ok());
  const MethodSummary& summary = r->methods[0].summary;
  REQUIRE(summary.committed_rounds >= 2);
  CHECK(std::isfinite(summary.final_eval_loss));
  // ρ after the committed rounds (trees of 2 rounds, z = 1, k = 1) and ε = ρ + 2√(ρ ln(1/δ)), δ = 1e-5:
  // e.g. 4 rounds: 2 trees of 2 levels, ρ = 4/2 = 2, ε = 2 + 2√(2 ln 1e5) = 11.597.
  const double rho = *privacy::TreeAggregationZcdp(summary.committed_rounds, 2, 1.0, 1);
  CHECK(summary.epsilon == Approx(rho + 2 * std::sqrt(rho * std::log(1e5))).epsilon(1e-9));
  if (summary.committed_rounds == 4) CHECK(summary.epsilon == Approx(11.5970518).epsilon(1e-6));
  CHECK_THAT(r->summary_table, Catch::Contains("epsilon"));
  // ρ and ε at δ = 1e-10 per committed round and in the summary table.
  int64_t committed = 0;
  for (const RoundRecord& rec : r->methods[0].rounds) {
    if (!rec.committed) continue;
    const double rho_now = *privacy::TreeAggregationZcdp(++committed, 2, 1.0, 1);
    CHECK(rec.rho == Approx(rho_now).epsilon(1e-12));
    CHECK(rec.epsilon_delta_1e10 == Approx(rho_now + 2 * std::sqrt(rho_now * std::log(1e10))).epsilon(1e-12));
  }
  CHECK(summary.rho == Approx(rho).epsilon(1e-12));
  CHECK(summary.epsilon_delta_1e10 == Approx(rho + 2 * std::sqrt(rho * std::log(1e10))).epsilon(1e-12));
  CHECK_THAT(r->summary_table, Catch::Contains("rho"));
  CHECK_THAT(r->summary_table, Catch::Contains("epsilon@1e-10"));
}

// SecAgg+ rounds (privacy/secagg.h) run in the simulator: the devices wait for stages on their simulated
// clocks and round their inputs from seeded streams, so runs repeat; the unmasked sum is the plaintext
// aggregate of the same devices up to the quantization step.
SimulationOptions WithSecAgg(SimulationOptions o) {
  o.methods = {"lora-bp"};
  o.server.secagg.enabled = true;
  o.server.secagg.max_weight = 64;  // w = the device's examples, as FedAvg weighs a plaintext update
  return o;
}

TEST_CASE("SecAgg+ rounds in the simulator repeat with 1 and 2 threads despite dropouts", "[simulator]") {
  TempDir dir;
  SimulationOptions a = WithSecAgg(Small(JoinPath(dir.path, "a")));
  a.population.dropout_mean = 0.2;
  a.server.secagg.max_dropout_fraction = 0.4;
  a.threads = 1;
  SimulationOptions b = a;
  b.out_dir = JoinPath(dir.path, "b");
  b.threads = 2;
  const auto [ra, rb] = RunBoth(a, b);
  const std::vector<RoundRecord>& x = ra.methods[0].rounds;
  const std::vector<RoundRecord>& y = rb.methods[0].rounds;
  CHECK(ra.methods[0].client_errors == 0);
  REQUIRE(x.size() == 3);
  REQUIRE(y.size() == 3);
  int64_t committed = 0, dropouts = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    CHECK(Deterministic(x[i]) == Deterministic(y[i]));
    dropouts += x[i].dropouts;
    if (!x[i].committed) continue;
    ++committed;
    CHECK(x[i].participants > 0);
    CHECK(x[i].participants + x[i].dropouts + x[i].stragglers + x[i].declined == x[i].selected);
    CHECK(x[i].bytes_up_per_client > 0);
  }
  CHECK(committed >= 2);
  CHECK(dropouts > 0);            // the sessions did lose devices
  std::set<std::string> globals;  // every committed round moved the model
  for (const RoundRecord& r : x) {
    if (r.committed) globals.insert(r.global_sha256);
  }
  CHECK(static_cast<int64_t>(globals.size()) == committed);
  CHECK(x.back().eval_loss < ra.methods[0].initial_eval_loss);
}

TEST_CASE("SecAgg+ in the simulator gives the plaintext aggregate of the same devices", "[simulator]") {
  TempDir dir;
  // One round, no dropouts, no over-selection: both runs aggregate the same devices' updates.
  SimulationOptions plain = Small(JoinPath(dir.path, "plain"));
  plain.methods = {"lora-bp"};
  plain.method_settings["lora-bp"].codec = "fp32";
  plain.method_settings["lora-bp"].lr = 0.02;
  plain.population.dropout_mean = 0;
  plain.server.over_selection = 1.0;
  plain.server.rounds = 1;
  plain.server.steps = 4;
  SimulationOptions masked = WithSecAgg(plain);
  masked.out_dir = JoinPath(dir.path, "masked");
  const auto [rp, rm] = RunBoth(plain, masked);
  const RoundRecord& p = rp.methods[0].rounds.at(0);
  const RoundRecord& m = rm.methods[0].rounds.at(0);
  REQUIRE(p.committed);
  REQUIRE(m.committed);
  CHECK(m.participants == p.participants);
  CHECK(m.participants == plain.server.clients_per_round);
  const double moved = rp.methods[0].initial_eval_loss - p.eval_loss;
  INFO("plaintext " << p.eval_loss << ", SecAgg+ " << m.eval_loss << ", initial " << rp.methods[0].initial_eval_loss);
  REQUIRE(moved > 1e-3);  // the round changed the model measurably
  // Q = 2^20 over [-0.5, 0.5]: a step of ~1e-6 per entry, rounded without bias; any device missing from
  // the sum, or weighed wrongly, moves the loss by a sizeable share of `moved`.
  CHECK(std::abs(m.eval_loss - p.eval_loss) < 1e-3 * moved);
  CHECK(m.global_sha256 != p.global_sha256);  // really a different path (quantized, masked)
}

TEST_CASE("Running again into the same output directory replaces the round log", "[simulator]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"lora-bp"};
  o.server.rounds = 1;
  REQUIRE(RunSimulation(o).ok());
  REQUIRE(RunSimulation(o).ok());
  auto jsonl = ReadFile(JoinPath(o.out_dir, "rounds.jsonl"));
  REQUIRE(jsonl.ok());
  CHECK(std::count(jsonl->begin(), jsonl->end(), '\n') == 1);
  auto csv = ReadFile(JoinPath(o.out_dir, "rounds.csv"));
  REQUIRE(csv.ok());
  CHECK(std::count(csv->begin(), csv->end(), '\n') == 2);  // header + 1 round
}

TEST_CASE("A different seed gives different rounds", "[simulator]") {
  TempDir dir;
  SimulationOptions a = Small(JoinPath(dir.path, "a"));
  a.methods = {"lora-bp"};
  SimulationOptions b = a;
  b.out_dir = JoinPath(dir.path, "b");
  b.seed = 12;
  auto ra = RunSimulation(a);
  auto rb = RunSimulation(b);
  REQUIRE(ra.ok());
  REQUIRE(rb.ok());
  std::string x, y;
  for (const RoundRecord& r : ra->methods[0].rounds) x += Deterministic(r);
  for (const RoundRecord& r : rb->methods[0].rounds) y += Deterministic(r);
  CHECK(x != y);
}

TEST_CASE("Devices too slow for the deadline are stragglers and never counted", "[simulator]") {
  TempDir dir;
  // Training the tiny model for 2 steps of 32 tokens takes about a GFLOP: ~1 ms at 1000 GFLOP/s and
  // ~1000 s at 0.001 GFLOP/s, beyond the 120 s deadline.
  const std::string fast = "fast,1,1000,8000000000,4000000000,100,100,10,3,test\n";
  const std::string slow = "slow,1,0.001,8000000000,4000000000,100,100,10,3,test\n";
  SimulationOptions o = Small(JoinPath(dir.path, "x"));
  o.methods = {"lora-bp"};
  o.population.dropout_mean = 0;
  o.population.variation = 0;
  o.server.round_deadline_s = 120;
  o.server.selection_window_s = 30;
  o.server.retry_base_s = 20;
  o.server.rounds = 2;

  SECTION("only slow devices: every selected device straggles and every round aborts") {
    o.phone_classes = WriteClasses(dir.path, slow);
    auto r = RunSimulation(o);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    for (const RoundRecord& rec : r->methods[0].rounds) {
      CHECK_FALSE(rec.committed);
      CHECK(rec.participants == 0);
      CHECK(rec.selected > 0);
      CHECK(rec.stragglers == rec.selected);
      CHECK(rec.end_time_s - rec.start_time_s == Approx(120).margin(1.5));
    }
  }
  SECTION("only fast devices: every round commits at its target, before the deadline") {
    o.phone_classes = WriteClasses(dir.path, fast);
    auto r = RunSimulation(o);
    REQUIRE(r.ok());
    for (const RoundRecord& rec : r->methods[0].rounds) {
      INFO(Deterministic(rec));
      CHECK(rec.committed);
      CHECK(rec.participants == 4);
      CHECK(rec.end_time_s - rec.start_time_s < 60);
      // Only over-selected devices still running when the target was reached count as stragglers.
      CHECK(rec.stragglers == rec.selected - 4);
    }
  }
  SECTION("half and half: the round commits with the fast ones and the slow ones straggle") {
    o.phone_classes = WriteClasses(dir.path, fast + slow);
    auto r = RunSimulation(o);
    REQUIRE(r.ok());
    int64_t stragglers = 0;
    for (const RoundRecord& rec : r->methods[0].rounds) {
      INFO(Deterministic(rec));
      CHECK(rec.committed);
      CHECK(rec.participants + rec.stragglers == rec.selected);
      stragglers += rec.stragglers;
    }
    CHECK(stragglers > 0);
  }
}

// A budget that a lora-bp step of Small()'s rounds fits with q8_0 base weights and does not with fp32 ones:
// the q8_0 plan's fastest settings, with the devices' runtime baseline (o.device_runtime_bytes).
int64_t BudgetForQ8ButNotFp32(const SimulationOptions& o) {
  auto config = model::LoadModelConfig(o.model_dir);
  REQUIRE(config.ok());
  client::PlanRequest request;
  request.model = *config;
  request.method = optim::Method::kLoraBp;
  request.lora.rank = o.server.lora_rank;
  request.lora.alpha = o.server.lora_alpha;
  auto targets = lora::ParseTargets("q_proj,v_proj");
  REQUIRE(targets.ok());
  request.lora.targets = *targets;
  request.seq_len = o.server.seq_len;
  request.batch = o.server.batch;
  request.runtime_bytes = o.device_runtime_bytes;
  auto plan_with = [&](model::WeightPrecision weights, int64_t budget) {
    client::PlanRequest r = request;
    auto bytes = model::ResidentWeightBytes(o.model_dir, *config, weights);
    REQUIRE(bytes.ok());
    r.weight_bytes = *bytes;
    r.weights_decoded_per_tile = weights != model::WeightPrecision::kFloat32;
    r.budget_bytes = budget;
    return client::PlanMemory(r);
  };
  auto q8 = plan_with(model::WeightPrecision::kQ8_0, 0);
  REQUIRE(q8.ok());
  const int64_t budget = q8->total_bytes();
  REQUIRE(plan_with(model::WeightPrecision::kFloat32, budget).status().code() == absl::StatusCode::kResourceExhausted);
  return budget;
}

// Half the phones have room to spare; the other half have BudgetForQ8ButNotFp32 as their app budget.
SimulationOptions RoomyAndTight(const std::string& dir, model::WeightPrecision weights) {
  SimulationOptions o = Small(JoinPath(dir, "out"));
  o.methods = {"lora-bp"};
  o.population.dropout_mean = 0;
  o.population.variation = 0;
  o.server.weights = weights;
  o.weight_cache_dir = JoinPath(dir, "cache");
  // The devices plan with this runtime: if the simulator dropped it, the tight phones' budget would hold
  // fp32 weights too and the test below would fail.
  o.device_runtime_bytes = int64_t{150} << 20;
  const int64_t tight = BudgetForQ8ButNotFp32(o);
  o.phone_classes = WriteClasses(dir, StrCat("roomy,1,100,8000000000,4000000000,100,100,10,3,test\n", "tight,1,100,",
                                             tight, ",", tight, ",100,100,10,3,test\n"));
  return o;
}

TEST_CASE("Phones whose budget cannot hold the base weights decline with MEMORY, counted per round and reported",
          "[simulator][weights]") {
  TempDir dir;
  const SimulationOptions o = RoomyAndTight(dir.path, model::WeightPrecision::kFloat32);
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  int64_t memory = 0, participants = 0;
  for (const RoundRecord& rec : r->methods[0].rounds) {
    INFO(Deterministic(rec));
    CHECK(rec.declined == rec.declined_memory);
    memory += rec.declined_memory;
    participants += rec.participants;
  }
  CHECK(memory > 0);
  CHECK(participants > 0);  // the roomy half trains
  CHECK(r->methods[0].client_errors == 0);
  auto jsonl = ReadFile(JoinPath(o.out_dir, "rounds.jsonl"));
  REQUIRE(jsonl.ok());
  int64_t logged = 0;
  std::istringstream lines(*jsonl);
  for (std::string line; std::getline(lines, line);)
    logged += nlohmann::json::parse(line)["declined_memory"].get<int64_t>();
  CHECK(logged == memory);
  auto html = ReadFile(r->report_path);
  REQUIRE(html.ok());
  CHECK_THAT(*html, Catch::Contains("<table class=\"declines\">"));
  CHECK_THAT(*html, Catch::Contains(StrCat("<td>total</td><td class=\"num\">", memory, "</td><td class=\"num\">",
                                           memory, "</td>")));
  CHECK_THAT(*html, Catch::Contains("<th>base weights</th><td>fp32: "));
}

TEST_CASE("With q8_0 base weights the same phones fit the model and nobody declines", "[simulator][weights]") {
  TempDir dir;
  const SimulationOptions o = RoomyAndTight(dir.path, model::WeightPrecision::kQ8_0);
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  int64_t participants = 0;
  for (const RoundRecord& rec : r->methods[0].rounds) {
    INFO(Deterministic(rec));
    CHECK(rec.committed);
    CHECK(rec.declined == 0);
    participants += rec.participants;
  }
  CHECK(participants > 0);
  CHECK(r->methods[0].client_errors == 0);
  CHECK(FileExists(JoinPath(o.weight_cache_dir, "weights-q8_0.safetensors")));  // the shared model's cache
  auto html = ReadFile(r->report_path);
  REQUIRE(html.ok());
  CHECK_THAT(*html, Catch::Contains("<th>base weights</th><td>q8_0: "));
  CHECK_THAT(*html, Catch::Contains("No selected device declined its task."));
}

TEST_CASE("Ten thousand devices with 50 clients per round run 2 rounds", "[simulator]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "big"));
  o.methods = {"lora-bp"};
  o.population.devices = 10000;
  o.server.clients_per_round = 50;
  o.server.rounds = 2;
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(r->methods[0].rounds.size() == 2);
  for (const RoundRecord& rec : r->methods[0].rounds) {
    CHECK(rec.committed);
    CHECK(rec.participants == 50);
    CHECK(rec.available > 1000);
  }
  CHECK(r->methods[0].client_errors == 0);
  CHECK(r->bytes_per_idle_device <= 2048);
}

TEST_CASE("The shipped simulation configs parse, and SecAgg+ with a method without a dense delta is refused",
          "[simulator]") {
  // Every sim.toml in configs/ (the experiments' configs too).
  int configs = 0;
  for (const auto& entry : std::filesystem::directory_iterator(JoinPath(SEEDLING_SOURCE_DIR, "configs"))) {
    if (entry.path().extension() != ".toml") continue;
    auto text = ReadFile(entry.path().string());
    REQUIRE(text.ok());
    auto o = ParseSimulationConfig(*text);
    INFO(entry.path().filename().string() << ": " << o.status().ToString());
    CHECK(o.ok());
    ++configs;
  }
  CHECK(configs >= 3);
  auto secagg = ReadFile(JoinPath(JoinPath(SEEDLING_SOURCE_DIR, "configs"), "simulate-secagg.toml"));
  REQUIRE(secagg.ok());
  auto o = ParseSimulationConfig(*secagg);
  REQUIRE(o.ok());
  CHECK(o->server.secagg.enabled);
  o->model_dir = "m";  // from --model
  CHECK(o->Validate().ok());
  o->methods = {"lora-bp", "kseed"};
  const absl::Status st = o->Validate();
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(st.message()), Catch::Contains("[methods.kseed]") && Catch::Contains("got kseed"));
}

TEST_CASE("sim.toml is parsed on top of the simulator's defaults and bad keys are named", "[simulator]") {
  auto o = ParseSimulationConfig(R"(
[simulation]
model = "m"
methods = ["kseed", "lora-bp"]
devices = 300
seed = 4
[methods.kseed]
lr = 0.002
[training]
rounds = 7
)");
  INFO(o.status().ToString());
  REQUIRE(o.ok());
  CHECK(o->model_dir == "m");
  CHECK(o->methods == std::vector<std::string>{"kseed", "lora-bp"});
  CHECK(o->population.devices == 300);
  CHECK(o->seed == 4);
  CHECK(o->method_settings.at("kseed").lr == 0.002);
  CHECK(o->server.rounds == 7);
  CHECK(o->server.seq_len == DefaultSimulationServerConfig().seq_len);
  CHECK(o->server.retry_base_s == 300);

  auto bad = ParseSimulationConfig("[simulation]\nmodel = \"m\"\ndevicez = 3\n");
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("devicez") != std::string::npos);
  auto bad_method = ParseSimulationConfig("[simulation]\nmodel = \"m\"\nmethods = [\"sgd\"]\n");
  REQUIRE_FALSE(bad_method.ok());
  CHECK(std::string(bad_method.status().message()).find("sgd") != std::string::npos);
  // Integers are range-checked, never cast (a float for an integer key was undefined behaviour; fuzzing).
  for (const char* text :
       {"[simulation]\nmodel = \"m\"\nthreads = 4294967296\n", "[simulation]\nmodel = \"m\"\ndevices = 1.0e300\n",
        "[simulation]\nmodel = \"m\"\n[training]\nsteps = 1.0e300\n"}) {
    INFO(text);
    auto bad_integer = ParseSimulationConfig(text);
    REQUIRE_FALSE(bad_integer.ok());
    CHECK(bad_integer.status().code() == absl::StatusCode::kInvalidArgument);
  }
  auto bad_server = ParseSimulationConfig("[simulation]\nmodel = \"m\"\n[training]\nroundz = 1\n");
  REQUIRE_FALSE(bad_server.ok());
  CHECK(std::string(bad_server.status().message()).find("roundz") != std::string::npos);
  // [secagg] passes through to the rounds; a method in sim.toml that cannot take part is named.
  auto secagg = ParseSimulationConfig("[simulation]\nmodel = \"m\"\n[secagg]\nenabled = true\n");
  REQUIRE(secagg.ok());
  CHECK(secagg->server.secagg.enabled);
  auto secagg_kseed =
      ParseSimulationConfig("[simulation]\nmodel = \"m\"\nmethods = [\"kseed\"]\n[secagg]\nenabled = true\n");
  REQUIRE_FALSE(secagg_kseed.ok());
  CHECK_THAT(std::string(secagg_kseed.status().message()),
             Catch::Contains("[methods.kseed]") && Catch::Contains("got kseed"));
}

TEST_CASE("sim.toml runs: a label names a method and overrides round settings for that run only", "[simulator]") {
  auto o = ParseSimulationConfig(R"(
[simulation]
model = "m"
methods = ["lora-bp", "lora-adam", "kseed"]
[strategy]
server_lr = 0.7
[methods.lora-adam]
method = "lora-bp"
lr = 0.003
[methods.lora-adam.strategy]
name = "fedadam"
server_lr = 0.02
[methods.lora-adam.training]
steps = 4
)");
  INFO(o.status().ToString());
  REQUIRE(o.ok());
  CHECK(o->MethodOf("lora-adam") == "lora-bp");
  CHECK(o->MethodOf("kseed") == "kseed");
  auto plain = o->RunServerConfig("lora-bp");
  auto adam = o->RunServerConfig("lora-adam");
  auto kseed = o->RunServerConfig("kseed");
  REQUIRE(plain.ok());
  REQUIRE(adam.ok());
  REQUIRE(kseed.ok());
  CHECK(plain->strategy.name == "fedavg");
  CHECK(plain->strategy.server_lr == 0.7);
  CHECK(plain->steps == DefaultSimulationServerConfig().steps);
  CHECK(adam->method == "lora-bp");
  CHECK(adam->strategy.name == "fedadam");
  CHECK(adam->strategy.server_lr == 0.02);
  CHECK(adam->steps == 4);
  CHECK(adam->lr == 0.003);
  CHECK(kseed->strategy.name == "kseed");
  CHECK(kseed->codec.codec == v1::CODEC_SEED_SCALARS);
  CHECK_THAT(o->DescribeRun("lora-adam"), Catch::Contains("strategy.name = 'fedadam'") &&
                                              Catch::Contains("training.steps = 4") && Catch::Contains("lr 0.003"));

  const std::string head = "[simulation]\nmodel = \"m\"\n";
  const std::pair<std::string, std::string> bad[] = {
      {"methods = [\"fast\"]\n", "run 'fast' is not a method"},
      {"methods = [\"fast\"]\n[methods.fast]\nmethod = \"sgd\"\n", "[methods.fast] method"},
      {"methods = [\"lora-bp\", \"lora-bp\"]\n", "listed twice"},
      {"methods = [\"a/b\"]\n[methods.\"a/b\"]\nmethod = \"mezo\"\n", "not a plain name"},
      {"methods = [\"x\"]\n[methods.x]\nmethod = \"mezo\"\n[methods.x.training]\nmethod = \"kseed\"\n",
       "[methods.x.training] method"},
      {"methods = [\"x\"]\n[methods.x]\nmethod = \"mezo\"\n[methods.x.model]\nweights = \"q8_0\"\n",
       "share one base model"},
      {"methods = [\"x\"]\n[methods.x]\nmethod = \"mezo\"\n[methods.x.strategy]\nspeed = 2\n", "speed"},
      {"methods = [\"x\"]\n[methods.x]\nmethod = \"mezo\"\n[methods.x.strategy]\nname = \"kseed\"\n", "[methods.x]"},
      {"methods = [\"x\"]\n[methods.x]\nmethod = \"mezo\"\nspeed = 2\n", "speed"},
  };
  for (const auto& [text, message] : bad) {
    INFO(text);
    auto r = ParseSimulationConfig(head + text);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(message));
  }
}

TEST_CASE("A labelled run of a method repeats the method's run, and its overrides change only that run",
          "[simulator]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"lora-bp", "again", "adam"};
  o.method_settings["again"].method = "lora-bp";
  o.method_settings["adam"].method = "lora-bp";
  o.method_settings["adam"].server_overrides = "[strategy]\nname = \"fedadam\"\nserver_lr = 0.05\n";
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(r->methods.size() == 3);
  CHECK(r->methods[1].method == "again");
  CHECK(r->methods[2].method == "adam");
  // The same method on the same population and seed: the same rounds, record for record, under its label.
  auto records = [&](size_t i) {
    std::string all;
    for (RoundRecord rec : r->methods[i].rounds) {
      CHECK(rec.method == r->methods[i].method);
      rec.method = "";
      all += Deterministic(rec);
    }
    return all;
  };
  const std::string plain = records(0);
  CHECK_FALSE(plain.empty());
  CHECK(records(1) == plain);
  CHECK(records(2) != plain);
  // FedAdam's step is not FedAvg's: the held-out losses part.
  CHECK(r->methods[2].rounds.back().eval_loss != r->methods[0].rounds.back().eval_loss);
  auto html = ReadFile(r->report_path);
  REQUIRE(html.ok());
  CHECK_THAT(*html, Catch::Contains("run adam") && Catch::Contains("strategy.name = &#39;fedadam&#39;"));
}

TEST_CASE("Adapters on the top layer only or of biases only (FeS's capacity options) train and send less",
          "[simulator][fes]") {
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"lora-bp", "top1", "bitfit", "bitfit-mezo"};
  o.population.dropout_mean = 0;
  o.server.rounds = 4;
  o.server.steps = 8;
  o.server.lr = 1e-3;
  o.method_settings["top1"].method = "lora-bp";
  o.method_settings["top1"].server_overrides = "[lora]\nlayers = \"top:1\"\n";
  o.method_settings["bitfit"].method = "lora-bp";
  o.method_settings["bitfit"].lr = 1e-2;
  o.method_settings["bitfit"].server_overrides = "[lora]\nkind = \"bitfit\"\n";
  o.method_settings["bitfit-mezo"].method = "mezo";
  o.method_settings["bitfit-mezo"].server_overrides = "[lora]\nkind = \"bitfit\"\n";
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(r->methods.size() == 4);
  auto last_loss = [&](size_t i) { return LastEvalLoss(r->methods[i]); };
  auto bytes_down = [&](size_t i) { return r->methods[i].rounds.back().bytes_down_per_client; };
  for (size_t i = 0; i < 4; ++i) {
    INFO(r->methods[i].method << ": initial " << r->methods[i].initial_eval_loss << ", last " << last_loss(i)
                              << ", bytes down " << bytes_down(i));
    CHECK(r->methods[i].client_errors == 0);
    // Each learns (measured from 7.628: lora-bp 7.033, top1 7.503, bitfit 7.101); mezo on 1,280 biases moves
    // least (7.621), so its bar is only that the loss moved down at all.
    CHECK(last_loss(i) < r->methods[i].initial_eval_loss - (i == 3 ? 1e-4 : 0.02));
  }
  // The tiny model's 4 layers with q and v at rank 4: 13,312 numbers; the top layer's 3,328; biases 1,280.
  // The global model a device downloads shrinks with them.
  CHECK(bytes_down(1) < 0.3 * bytes_down(0));
  CHECK(bytes_down(2) < 0.5 * bytes_down(1));
}

TEST_CASE("sim.toml [model] sets the base weights, fp32 by default, and their cache directory", "[simulator]") {
  auto defaults = ParseSimulationConfig("[simulation]\nmodel = \"m\"\n");
  REQUIRE(defaults.ok());
  CHECK(defaults->server.weights == model::WeightPrecision::kFloat32);
  CHECK(defaults->weight_cache_dir.empty());
  auto q4 =
      ParseSimulationConfig("[simulation]\nmodel = \"m\"\n[model]\nweights = \"q4_0\"\nweight_cache_dir = \"c\"\n");
  INFO(q4.status().ToString());
  REQUIRE(q4.ok());
  CHECK(q4->server.weights == model::WeightPrecision::kQ4_0);
  CHECK(q4->weight_cache_dir == "c");
  CHECK(q4->model_dir == "m");
}

TEST_CASE("sim.toml device_runtime is measured by default, or a size, anything else is refused", "[simulator]") {
  auto defaults = ParseSimulationConfig("[simulation]\nmodel = \"m\"\n");
  REQUIRE(defaults.ok());
  CHECK(defaults->device_runtime_bytes == -1);
  auto sized = ParseSimulationConfig("[simulation]\nmodel = \"m\"\ndevice_runtime = \"180M\"\n");
  REQUIRE(sized.ok());
  CHECK(sized->device_runtime_bytes == int64_t{180} << 20);
  CHECK(ParseSimulationConfig("[simulation]\nmodel = \"m\"\ndevice_runtime = \"auto\"\n")->device_runtime_bytes == -1);
  for (const char* bad : {"\"lots\"", "\"-5M\"", "12"}) {
    auto o = ParseSimulationConfig(StrCat("[simulation]\nmodel = \"m\"\ndevice_runtime = ", bad, "\n"));
    INFO(bad);
    REQUIRE_FALSE(o.ok());
    CHECK_THAT(std::string(o.status().message()), Catch::Contains("device_runtime"));
  }
}

TEST_CASE("A bad sim.toml [model] key or value is refused naming it", "[simulator]") {
  for (const auto& [text, key] : std::vector<std::pair<std::string, std::string>>{
           {"weights = \"q5_k\"\n", "weights"},
           {"weight_cache_dir = 3\n", "weight_cache_dir"},
           {"weight_cache = \"c\"\n", "weight_cache"},
       }) {
    INFO(text);
    auto o = ParseSimulationConfig("[simulation]\nmodel = \"m\"\n[model]\n" + text);
    REQUIRE_FALSE(o.ok());
    CHECK(o.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(o.status().message()), Catch::Contains(StrCat("[model] ", key)));
  }
}

TEST_CASE("labelled_fraction is read from sim.toml and refused outside [0, 1]", "[simulator][fes]") {
  auto o = ParseSimulationConfig("[simulation]\nmodel = \"m\"\nlabelled_fraction = 0.01\n");
  REQUIRE(o.ok());
  CHECK(o->labelled_fraction == 0.01);
  for (const char* bad : {"1.5", "-0.1"}) {
    auto b = ParseSimulationConfig(StrCat("[simulation]\nmodel = \"m\"\nlabelled_fraction = ", bad, "\n"));
    INFO(bad);
    REQUIRE_FALSE(b.ok());
    CHECK_THAT(std::string(b.status().message()), Catch::Contains("labelled_fraction"));
  }
}

// ---- fwdgrad pacing (server/fwdgrad_pacing.h)

// fwdgrad runs on the Small population with no dropouts (an aborted round would leave K as it was).
SimulationOptions FwdGradRuns(const std::string& out, const std::map<std::string, std::string>& runs) {
  SimulationOptions o = Small(out);
  o.population.dropout_mean = 0;
  o.server.rounds = 8;
  o.server.perturbations = 4;
  o.methods.clear();
  for (const auto& [label, overrides] : runs) {
    o.methods.push_back(label);
    o.method_settings[label].method = "fwdgrad";
    o.method_settings[label].server_overrides = overrides;
  }
  return o;
}

const MethodResult& Run(const SimulationResult& r, const std::string& label) {
  for (const MethodResult& m : r.methods) {
    if (m.method == label) return m;
  }
  FAIL("no run " << label);
  return r.methods.front();
}

TEST_CASE("fwdgrad pacing holds noisy rounds, raises K by the rule, and a raised K costs its FLOPs",
          "[simulator][pacing]") {
  TempDir dir;
  auto model_config = model::LoadModelConfig(TinyModel());
  REQUIRE(model_config.ok());
  // 1. Fixed K, and pacing whose threshold no round exceeds: every round applies, so the two runs must agree
  //    bit for bit (the pooled bookkeeping changes nothing), and the latter reports each round's variance.
  const std::string never = "[training]\nfwdgrad_pacing = true\nfwdgrad_variance_threshold = 1e30\n";
  auto first = RunSimulation(FwdGradRuns(JoinPath(dir.path, "a"), {{"fixed", ""}, {"never-held", never}}));
  INFO(first.status().ToString());
  REQUIRE(first.ok());
  const MethodResult& fixed = Run(*first, "fixed");
  const MethodResult& calibration = Run(*first, "never-held");
  REQUIRE(fixed.rounds.size() == 8);
  REQUIRE(calibration.rounds.size() == fixed.rounds.size());
  std::vector<double> variances;
  for (size_t i = 0; i < fixed.rounds.size(); ++i) {
    CHECK(calibration.rounds[i].global_sha256 == fixed.rounds[i].global_sha256);
    CHECK(calibration.rounds[i].perturbations == 4);
    CHECK(std::isnan(fixed.rounds[i].gradient_variance));  // only pacing measures it
    if (std::isfinite(calibration.rounds[i].gradient_variance)) {
      variances.push_back(calibration.rounds[i].gradient_variance);
    }
  }
  REQUIRE(variances.size() >= 4);
  std::sort(variances.begin(), variances.end());

  // 2. Pacing with a threshold between the two middle variances (no round sits on it), same seed. The TOML
  //    text carries every digit, so the server's threshold is the test's.
  char text[64];
  std::snprintf(text, sizeof(text), "%.17g",
                0.5 * (variances[variances.size() / 2 - 1] + variances[variances.size() / 2]));
  const double threshold = std::stod(text);
  const std::string paced_overrides =
      StrCat("[training]\nfwdgrad_pacing = true\nmax_perturbations = 16\nfwdgrad_variance_threshold = ", text, "\n");
  auto second = RunSimulation(FwdGradRuns(JoinPath(dir.path, "b"), {{"paced", paced_overrides}}));
  INFO(second.status().ToString());
  REQUIRE(second.ok());
  const std::vector<RoundRecord>& paced = Run(*second, "paced").rounds;
  REQUIRE(paced.size() == 8);

  // The K of each round and whether it applied follow DecidePacing on the variances the server measured.
  server::FwdGradPacingOptions rule;
  rule.enabled = true;
  rule.base_perturbations = 4;
  rule.max_perturbations = 16;
  rule.variance_threshold = threshold;
  std::vector<double> measured;
  for (const RoundRecord& r : paced) {
    REQUIRE(r.committed);
    measured.push_back(r.gradient_variance);
  }
  const std::vector<server::PacingStep> want = server::PacingSchedule(rule, measured);
  std::string previous_sha = "initial";
  int held = 0;
  for (size_t i = 0; i < paced.size(); ++i) {
    INFO("round " << i + 1 << " variance " << measured[i]);
    CHECK(paced[i].perturbations == want[i].perturbations);
    // A held round leaves the global model as it was; an applied one moves it.
    if (i > 0) CHECK((paced[i].global_sha256 == previous_sha) == !want[i].apply);
    held += want[i].apply ? 0 : 1;
    previous_sha = paced[i].global_sha256;
    // Every device that trained ran K perturbations: the round's FLOPs are a whole number of K-runs.
    const double per_device = client::LocalTrainingFlops(*model_config, "fwdgrad", 2, 1, 32, paced[i].perturbations);
    const double devices = paced[i].device_flops / per_device;
    CHECK(std::abs(devices - std::round(devices)) < 1e-6);
    CHECK(std::round(devices) >= static_cast<double>(paced[i].participants));
  }
  CHECK(held >= 1);
  CHECK(std::any_of(paced.begin(), paced.end(), [](const RoundRecord& r) { return r.perturbations > 4; }));

  // Both runs' cost to reach the fixed run's final loss (reported, not asserted: at this scale the extra
  // perturbations need not pay for themselves).
  const double target = fixed.summary.final_eval_loss;
  const TargetCost fixed_cost = CostToTarget("fixed", target, fixed.rounds);
  const TargetCost paced_cost = CostToTarget("paced", target, paced);
  CHECK(fixed_cost.reached());
  WARN("target " << target << ": fixed K reaches it in round " << fixed_cost.round << " (" << fixed_cost.device_flops
                 << " FLOPs), pacing in round " << paced_cost.round << " (" << paced_cost.device_flops << " FLOPs); "
                 << held << " of 8 paced rounds held");
}

TEST_CASE("FedBuff reaches sync rounds' held-out loss in less simulated time when half the phones straggle",
          "[simulator][fedbuff]") {
  // Half the phones train 4 steps of 32 tokens (about 2 GFLOP) in ~2 ms, half in ~100 s. A synchronous round
  // of 4 reports from 6 tasks waits for its slow members; FedBuff (buffers of 4, up to 30 tasks out) commits
  // whenever 4 updates are in, the slow ones arriving later, stale and down-weighted (Nguyen et al. 2022).
  TempDir dir;
  SimulationOptions o = Small(JoinPath(dir.path, "out"));
  o.methods = {"sync", "fedbuff"};
  o.population.dropout_mean = 0;
  o.population.variation = 0;
  o.phone_classes = WriteClasses(dir.path,
                                 "fast,1,1000,8000000000,4000000000,100,100,10,3,test\n"
                                 "slow,1,0.02,8000000000,4000000000,100,100,10,3,test\n");
  o.server.rounds = 8;
  o.server.retry_base_s = 20;
  o.server.steps = 4;
  for (const char* label : {"sync", "fedbuff"}) {
    o.method_settings[label].method = "lora-bp";
    o.method_settings[label].lr = 0.01;
  }
  o.method_settings["fedbuff"].server_overrides =
      "[training]\nrounds = 16\n[strategy]\nmode = \"fedbuff\"\nbuffer_size = 4\nconcurrency = 30\n";
  auto r = RunSimulation(o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  REQUIRE(r->methods.size() == 2);
  const MethodResult& sync = r->methods[0];
  const MethodResult& fedbuff = r->methods[1];
  REQUIRE(sync.rounds.size() == 8);
  REQUIRE(fedbuff.rounds.size() == 16);
  for (const RoundRecord& rec : fedbuff.rounds) {
    INFO(Deterministic(rec));
    CHECK(rec.committed);
    CHECK(rec.participants >= 4);  // a flush holds at least K updates
  }
  // The loss the synchronous run ends with: FedBuff must reach it, in under half the simulated time.
  const double target = sync.summary.final_eval_loss;
  REQUIRE(target < sync.initial_eval_loss - 0.05);
  const TargetCost sync_cost = CostToTarget("sync", target, sync.rounds);
  const TargetCost fedbuff_cost = CostToTarget("fedbuff", target, fedbuff.rounds);
  REQUIRE(sync_cost.reached());
  INFO("target " << target << ": sync in round " << sync_cost.round << " at " << sync_cost.simulated_hours * 3600
                 << " s, fedbuff in flush " << fedbuff_cost.round << " at " << fedbuff_cost.simulated_hours * 3600
                 << " s");
  REQUIRE(fedbuff_cost.reached());
  CHECK(fedbuff_cost.simulated_hours < 0.5 * sync_cost.simulated_hours);
  WARN("target " << target << ": sync in round " << sync_cost.round << " at " << sync_cost.simulated_hours * 3600
                 << " s, fedbuff in flush " << fedbuff_cost.round << " at " << fedbuff_cost.simulated_hours * 3600
                 << " s");
}

}  // namespace
}  // namespace seedling::simulator
