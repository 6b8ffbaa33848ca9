// server.toml rules that protect operators from configurations that cannot work, the device certificate
// binding of mutual TLS, and metrics that must be right after a restart.

#include "server/config.h"

#include <catch2/catch.hpp>
#include <string>

#include "base/file.h"
#include "base/strings.h"
#include "client/client.h"
#include "comms/in_memory.h"
#include "comms/tls.h"
#include "model/init.h"
#include "server/coordinator.h"
#include "server/metrics.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

using seedling::testing::TempDir;

absl::StatusOr<ServerConfig> Parse(const std::string& text) {
  return ParseServerConfig(StrCat("[model]\ndir = \"m\"\n", text));
}

// `text` is refused as InvalidArgument with a message containing `expected` (the key, or the problem).
void CheckRefused(const std::string& text, const std::string& expected) {
  INFO(text);
  auto c = Parse(text);
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(c.status().message()), Catch::Contains(expected));
}

TEST_CASE("A strategy that cannot read the method's uploads is refused at load", "[server][config]") {
  for (const char* bad : {"[training]\nmethod = \"kseed\"\n[strategy]\nname = \"fedavg\"\n",
                          "[training]\nmethod = \"lora-bp\"\n[strategy]\nname = \"kseed\"\n",
                          "[training]\nmethod = \"fwdgrad\"\ncodec = \"fp16\"\n[strategy]\nname = \"fedadam\"\n",
                          "[training]\nmethod = \"mezo\"\n[strategy]\nname = \"fwdgrad\"\n"}) {
    CheckRefused(bad, "[strategy] name");
  }
  // The strategy follows the method when not given, and compatible pairs load.
  auto kseed = Parse("[training]\nmethod = \"kseed\"\n");
  REQUIRE(kseed.ok());
  CHECK(kseed->strategy.name == "kseed");
  CHECK(Parse("[training]\nmethod = \"mezo\"\n[strategy]\nname = \"fedyogi\"\n").ok());
}

TEST_CASE("fwdgrad pacing keys reach the strategy and bad combinations are refused", "[server][config][pacing]") {
  auto c = Parse(
      "[training]\nmethod = \"fwdgrad\"\nperturbations = 4\nfwdgrad_pacing = true\n"
      "fwdgrad_variance_threshold = 0.25\nmax_perturbations = 32\n");
  REQUIRE(c.ok());
  CHECK(c->strategy.fwdgrad_pacing.enabled);
  CHECK(c->strategy.fwdgrad_pacing.base_perturbations == 4);
  CHECK(c->strategy.fwdgrad_pacing.max_perturbations == 32);
  CHECK(c->strategy.fwdgrad_pacing.variance_threshold == 0.25);
  auto off = Parse("[training]\nmethod = \"fwdgrad\"\n");
  REQUIRE(off.ok());
  CHECK_FALSE(off->strategy.fwdgrad_pacing.enabled);
  CHECK(off->strategy.fwdgrad_pacing.max_perturbations == 64);
  CheckRefused("[training]\nmethod = \"fwdgrad\"\nfwdgrad_pacing = true\n", "fwdgrad_variance_threshold");
  CheckRefused(
      "[training]\nmethod = \"fwdgrad\"\nfwdgrad_pacing = true\nfwdgrad_variance_threshold = 0.1\n"
      "max_perturbations = 4\n",
      "max_perturbations");
  CheckRefused("[training]\nmethod = \"mezo\"\nfwdgrad_pacing = true\nfwdgrad_variance_threshold = 0.1\n",
               "[training] fwdgrad_pacing");
}

TEST_CASE("The pseudo-label curriculum grows linearly with the round and stops at every row", "[server][config]") {
  auto c = Parse("[training]\npseudo_labels = true\npseudo_label_rate = 0.3\n");
  REQUIRE(c.ok());
  CHECK(c->pseudo_label_threshold == 0.5);  // the default
  CHECK(c->PseudoLabelShare(0) == 0);
  CHECK(c->PseudoLabelShare(1) == Approx(0.3));
  CHECK(c->PseudoLabelShare(3) == Approx(0.9));
  CHECK(c->PseudoLabelShare(4) == 1.0);
  CHECK(c->PseudoLabelShare(100) == 1.0);
  auto off = Parse("[training]\npseudo_label_rate = 0.3\n");
  REQUIRE(off.ok());
  CHECK(off->PseudoLabelShare(5) == 0);  // pseudo_labels is off
}

TEST_CASE("Bad pseudo-label settings are refused naming the key", "[server][config]") {
  for (const auto& [text, key] : std::vector<std::pair<std::string, std::string>>{
           {"pseudo_label_rate = 0.0\n", "pseudo_label_rate"},
           {"pseudo_label_rate = 1.5\n", "pseudo_label_rate"},
           {"pseudo_label_threshold = 1.0\n", "pseudo_label_threshold"},
           {"pseudo_label_threshold = -0.1\n", "pseudo_label_threshold"},
           {"pseudo_label_choices = [\"only\"]\n", "pseudo_label_choices"},
           {"pseudo_label_choices = [\"a\", \"a\"]\n", "pseudo_label_choices"},
           {"pseudo_label_choices = [\"a\", \"\"]\n", "pseudo_label_choices"},
           {"pseudo_labels = \"yes\"\n", "pseudo_labels"},
       }) {
    INFO(text);
    auto c = Parse(StrCat("[training]\n", text));
    REQUIRE_FALSE(c.ok());
    CHECK_THAT(std::string(c.status().message()), Catch::Contains(key));
  }
  CHECK(Parse("[training]\npseudo_labels = true\npseudo_label_choices = [\"a\", \"b\"]\n").ok());
}

TEST_CASE("[model] id is refused: devices identify the model by its config.json hash", "[server][config]") {
  auto c = Parse("id = \"smollm2-135m\"\n");
  REQUIRE_FALSE(c.ok());
  CHECK_THAT(std::string(c.status().message()), Catch::Contains("[model] id"));
}

TEST_CASE("[model] weights defaults to fp32 and accepts the four representations", "[server][config]") {
  auto defaults = Parse("");
  REQUIRE(defaults.ok());
  CHECK(defaults->weights == model::WeightPrecision::kFloat32);
  for (const char* name : {"fp32", "stored", "q8_0", "q4_0"}) {
    auto c = Parse(StrCat("weights = \"", name, "\"\n"));
    REQUIRE(c.ok());
    CHECK(model::WeightPrecisionName(c->weights) == std::string(name));
  }
}

TEST_CASE("A bad [model] weights value is refused naming the key", "[server][config]") {
  for (const char* bad : {"weights = \"q5_k\"\n", "weights = \"\"\n", "weights = 4\n"}) {
    CheckRefused(bad, "[model] weights");
  }
}

TEST_CASE("A learning rate, epsilon or perturbation count out of range is refused naming the key", "[server][config]") {
  const std::pair<const char*, const char*> cases[] = {
      {"[training]\nperturbations = 0\n", "[training] perturbations"},
      {"[training]\nperturbations = 4097\n", "[training] perturbations"},
      {"[training]\nlr = -1e-3\n", "[training] lr"},
      {"[training]\nlr = nan\n", "[training] lr"},
      {"[training]\nepsilon = inf\n", "[training] epsilon"},
      {"[training]\nepsilon = -1.0\n", "[training] epsilon"},
  };
  for (const auto& [text, key] : cases) {
    CheckRefused(text, key);
  }
  CHECK(Parse("[training]\nperturbations = 4096\nlr = 1e-5\nepsilon = 1e-3\n").ok());
  CHECK(Parse("[training]\nperturbations = 1\nlr = 0.0\nepsilon = 0.0\n").ok());  // 0: the method's default
}

TEST_CASE("An integer key given a float, a negative or an out-of-range value is refused naming the key",
          "[server][config]") {
  // Found by fuzzing: toml++ converts a float node to an integer with a plain cast, so 4.0e69 for an
  // integer key was undefined behaviour (UBSan: float-cast-overflow) before it could be refused.
  const std::pair<const char*, const char*> cases[] = {
      {"[strategy]\nkseed_pool_size = 4.0e69\n", "must be an integer"},
      {"[strategy]\nkseed_pool_size = 4.0\n", "must be an integer"},
      {"[training]\nsteps = -1e300\n", "must be an integer"},
      {"[training]\nrounds = \"7\"\n", "must be an integer"},
      {"[strategy]\nkseed_pool_size = -3\n", "must not be negative"},
      {"[strategy]\nkseed_pool_size = 9223372036854775807\n", "is out of range"},
  };
  for (const auto& [text, problem] : cases) {
    CheckRefused(text, problem);
  }
}

TEST_CASE("docs/operations.md's server.toml table states the defaults the code has", "[server][config]") {
  auto readme = ReadFile(StrCat(SEEDLING_SOURCE_DIR, "/docs/operations.md"));
  REQUIRE(readme.ok());
  auto d = Parse("");
  REQUIRE(d.ok());
  const std::vector<std::pair<std::string, std::string>> rows = {
      {"codec", StrCat("\"", comms::CodecName(d->codec.codec), "\"")},
      {"max_update_norm", StrCat(d->max_update_norm)},
      {"clients_per_round", StrCat(d->clients_per_round)},
      {"over_selection", StrCat(d->over_selection)},
      {"round_deadline_s", StrCat(d->round_deadline_s)},
      {"clip_norm", StrCat(d->clip_norm)},
      {"perturbations", StrCat(d->perturbations)},
      {"max_update_bytes", StrCat(d->max_update_bytes)},
  };
  for (const auto& [key, value] : rows) {
    INFO(key << " = " << value);
    CHECK(readme->find(StrCat("| `", key, "` | `", value, "`")) != std::string::npos);
  }
  // The choices behind two of them: fp16 halves fp32's bytes, and some cap is always on.
  CHECK(d->codec.codec == v1::CODEC_FP16);
  CHECK(d->max_update_norm == kDefaultMaxUpdateNorm);
  auto kseed = Parse("[training]\nmethod = \"kseed\"\n[strategy]\nname = \"kseed\"");
  REQUIRE(kseed.ok());
  CHECK(kseed->codec.codec == v1::CODEC_SEED_SCALARS);
}

TEST_CASE("[lora] layers is checked at load and resolved against the model's layers", "[server][config]") {
  auto bad = Parse("[lora]\nlayers = \"top:none\"\n");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("[lora] layers") != std::string::npos);
  auto top = Parse("[lora]\nlayers = \"top:2\"\n");
  REQUIRE(top.ok());
  model::ModelConfig model;
  model.num_hidden_layers = 6;
  auto lora = ServerLoraConfig(*top, model);
  REQUIRE(lora.ok());
  CHECK(lora->layers == std::vector<int64_t>{4, 5});
  model.num_hidden_layers = 1;
  CHECK(ServerLoraConfig(*top, model).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Adaptive server optimizers default to server_lr 0.01, the fedavg family to 1", "[server][config]") {
  for (const char* name : {"fedadam", "fedyogi", "fedadagrad"}) {
    auto c = Parse(StrCat("[strategy]\nname = \"", name, "\"\n"));
    REQUIRE(c.ok());
    CHECK(c->strategy.server_lr == 0.01);
  }
  auto avg = Parse("[strategy]\nname = \"fedavgm\"\n");
  REQUIRE(avg.ok());
  CHECK(avg->strategy.server_lr == 1.0);
  auto given = Parse("[strategy]\nname = \"fedadam\"\nserver_lr = 0.1\n");
  REQUIRE(given.ok());
  CHECK(given->strategy.server_lr == 0.1);
}

// A coordinator on a tiny model in `dir`.
ServerConfig TinyConfig(const std::string& dir) {
  model::InitModelOptions init;
  init.preset = "tiny";
  REQUIRE(model::InitModel(JoinPath(dir, "model"), init).ok());
  ServerConfig c;
  c.state_dir = JoinPath(dir, "state");
  c.model_dir = JoinPath(dir, "model");
  c.lora_rank = 2;
  return c;
}

TEST_CASE("The global version gauge is right after a restart, before any new commit", "[server][metrics]") {
  TempDir dir;
  ServerConfig config = TinyConfig(dir.path);
  config.method = "lora-bp";
  config.clients_per_round = 1;
  config.min_reports = 1;
  config.over_selection = 1.0;
  config.steps = 1;
  config.seq_len = 96;
  ManualClock clock;
  {
    // One committed round: a device trains and uploads.
    auto c = Coordinator::Create(config, &clock, nullptr);
    REQUIRE(c.ok());
    auto token = (*c)->RegisterDevice("phone-1");
    REQUIRE(token.ok());
    (*c)->Tick();
    client::ClientConfig cc;
    cc.device_id = "phone-1";
    cc.token = *token;
    cc.state_dir = JoinPath(dir.path, "device");
    cc.model_dir = config.model_dir;
    cc.data_path = JoinPath(SEEDLING_SOURCE_DIR, "data/sample/instructions.jsonl");
    auto client = client::Client::Create(cc, comms::MakeInMemoryTransport((*c)->handler_factory()));
    REQUIRE(client.ok());
    (*client)->SetConditions({true, true, true, 1.0f});
    auto r = (*client)->RunOnce();
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    REQUIRE(r->outcome == client::RunOutcome::kUploaded);
    (*c)->Tick();
    REQUIRE((*c)->Snapshot().global_version == 1);
  }
  Metrics metrics;
  auto restarted = Coordinator::Create(config, &clock, &metrics);
  REQUIRE(restarted.ok());
  CHECK_THAT(metrics.RenderPrometheus(), Catch::Contains("seedling_global_version 1"));
}

TEST_CASE("With mutual TLS a device certificate speaks only for its own device id", "[server][auth]") {
  TempDir dir;
  ServerConfig config = TinyConfig(dir.path);
  ManualClock clock;
  auto c = Coordinator::Create(config, &clock, nullptr);
  REQUIRE(c.ok());
  auto token_a = (*c)->RegisterDevice("phone-a");
  auto token_b = (*c)->RegisterDevice("phone-b");
  REQUIRE(token_a.ok());
  REQUIRE(token_b.ok());
  comms::CertificateOptions co;
  co.dir = JoinPath(dir.path, "certs");
  REQUIRE(comms::CreateCertificates(co).ok());
  REQUIRE(comms::CreateClientCertificate(co.dir, "phone-a").ok());
  comms::TlsServerOptions so;
  so.cert_file = JoinPath(co.dir, "server.crt");
  so.key_file = JoinPath(co.dir, "server.key");
  so.client_ca_file = JoinPath(co.dir, "ca.crt");
  auto server = comms::TlsServer::Start(so, (*c)->handler_factory());
  REQUIRE(server.ok());
  comms::TlsClientOptions tc;
  tc.port = (*server)->port();
  tc.ca_file = JoinPath(co.dir, "ca.crt");
  tc.client_cert_file = JoinPath(co.dir, "phone-a.crt");
  tc.client_key_file = JoinPath(co.dir, "phone-a.key");
  auto transport = comms::MakeTlsTransport(tc);
  REQUIRE(transport.ok());
  auto hello = [&](const std::string& device, const std::string& token) {
    auto ch = (*transport)->Connect(comms::Duration(5000));
    REQUIRE(ch.ok());
    v1::Envelope e;
    e.set_protocol_version(1);
    e.set_request_id(1);
    e.mutable_hello()->set_device_id(device);
    e.mutable_hello()->set_token(token);
    auto r = (*ch)->Call(e, comms::Duration(5000));
    REQUIRE(r.ok());
    return *r;
  };
  CHECK(hello("phone-a", *token_a).has_hello_reply());
  // phone-a's certificate with phone-b's (valid) token: refused.
  const v1::Envelope other = hello("phone-b", *token_b);
  REQUIRE(other.has_reject());
  CHECK(other.reject().code() == v1::UNAUTHENTICATED);
  (*server)->Stop();
}

}  // namespace
}  // namespace seedling::server
