#include "client/memory_planner.h"

#include <catch2/catch.hpp>
#include <map>

#include "client/local_training.h"
#include "model/memory_tracker.h"
#include "optim/fwdgrad.h"
#include "optim/lora_bp.h"
#include "optim/mezo.h"
#include "optim/pepita.h"

namespace seedling::client {
namespace {

PlanRequest SmolRequest(optim::Method method) {
  PlanRequest r;
  auto c = model::PresetConfig("smollm2-135m");
  REQUIRE(c.ok());
  r.model = *c;
  r.method = method;
  r.seq_len = 256;
  r.batch = 4;
  r.runtime_bytes = 160 << 20;
  return r;
}

TEST_CASE("Without a budget the planner picks the fastest settings", "[client][planner]") {
  auto plan = PlanMemory(SmolRequest(optim::Method::kLoraBp));
  REQUIRE(plan.ok());
  CHECK(plan->micro_batch == 4);
  CHECK_FALSE(plan->recompute);
  CHECK(plan->weight_bytes == 4 * SmolRequest(optim::Method::kLoraBp).model.NumParameters());
  auto fwd = PlanMemory(SmolRequest(optim::Method::kFwdGrad));
  REQUIRE(fwd.ok());
  CHECK(fwd->variant == "batched-jvp");
  CHECK(fwd->tangents_per_pass == 8);  // every perturbation in one pass
}

TEST_CASE("A tighter budget recomputes more layers, then uses smaller micro-batches", "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kLoraBp);
  r.batch = 1;  // first one sequence: no smaller micro-batch to fall back on
  const int64_t layers = r.model.num_hidden_layers;
  MemoryPlan fastest = *PlanMemory(r);
  CHECK_FALSE(fastest.recompute);
  MemoryPlan all = EstimatePlan(r, "", 1, true, fastest.ce_chunk_tokens);
  REQUIRE(all.total_bytes() < fastest.total_bytes());
  // Budgets between recomputing every layer and none: the planner keeps as many of the last layers'
  // activations as fit, more with more memory, before it would shrink the micro-batch.
  int64_t previous_stored = -1;
  for (double fraction : {0.25, 0.5, 0.75}) {
    r.budget_bytes = all.total_bytes() +
                     static_cast<int64_t>(fraction * static_cast<double>(fastest.total_bytes() - all.total_bytes()));
    auto plan = PlanMemory(r);
    REQUIRE(plan.ok());
    INFO("budget fraction " << fraction << ": " << plan->Describe());
    CHECK(plan->total_bytes() <= r.budget_bytes);
    CHECK(plan->recompute);
    CHECK(plan->stored_layers > previous_stored);
    CHECK(plan->stored_layers < layers);
    // One more stored layer would not have fit.
    CHECK(EstimatePlan(r, "", 1, true, plan->ce_chunk_tokens, 0, 0, plan->stored_layers + 1).total_bytes() >
          r.budget_bytes);
    previous_stored = plan->stored_layers;
  }
  CHECK(previous_stored > 0);
  // Four sequences with the budget of recomputing every layer at micro-batch 4: smaller micro-batches
  // free room for stored layers, and recomputing fewer layers saves more time than larger multiplies.
  r.budget_bytes = 0;
  r.batch = 4;
  fastest = *PlanMemory(r);
  all = EstimatePlan(r, "", 4, true, fastest.ce_chunk_tokens);
  r.budget_bytes = all.total_bytes();
  auto plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->total_bytes() <= r.budget_bytes);
  CHECK(plan->recompute);
  CHECK(plan->stored_layers > 0);
  // Below that, smaller micro-batches.
  r.budget_bytes = EstimatePlan(r, "", 1, true, fastest.ce_chunk_tokens).total_bytes();
  plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->micro_batch == 1);
  CHECK(plan->stored_layers == 0);
  CHECK(plan->total_bytes() <= r.budget_bytes);
}

TEST_CASE("The slack follows the heap allocator, and tcmalloc's smaller slack stores more layers",
          "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kLoraBp);
  r.batch = 1;
  r.heap = HeapAllocator::kSystem;
  const MemoryPlan system = EstimatePlan(r, "", 1, false, 0);
  const MemoryPlan system_recompute = EstimatePlan(r, "", 1, true, 0, 0, 0, 10);
  r.heap = HeapAllocator::kTcmalloc;
  const MemoryPlan tcmalloc = EstimatePlan(r, "", 1, false, 0);
  // Only the fixed 16 MiB for small objects with tcmalloc; glibc's holes scale with the activations.
  CHECK(tcmalloc.slack_bytes == 16 << 20);
  CHECK(system.slack_bytes > tcmalloc.slack_bytes + system.activation_bytes / 2);
  CHECK(system_recompute.slack_bytes > 16 << 20);
  CHECK(tcmalloc.activation_bytes == system.activation_bytes);
  CHECK(tcmalloc.ToJson().find(R"("heap":"tcmalloc")") != std::string::npos);
  CHECK(system.Describe().find("(system heap)") != std::string::npos);
  // One budget, between the two allocators' full-recompute and no-recompute estimates.
  r.budget_bytes = (EstimatePlan(r, "", 1, true, 0).total_bytes() + tcmalloc.total_bytes()) / 2;
  const auto with_tcmalloc = PlanMemory(r);
  r.heap = HeapAllocator::kSystem;
  const auto with_system = PlanMemory(r);
  REQUIRE(with_tcmalloc.ok());
  REQUIRE(with_system.ok());
  CHECK(with_tcmalloc->stored_layers > with_system->stored_layers);
}

TEST_CASE("A tighter budget makes fwdgrad carry fewer tangents per pass", "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kFwdGrad);
  // The lightest settings (MLP chunk 32, CE chunk 16) with all 8 tangents, and with 4.
  const MemoryPlan all = EstimatePlan(r, "batched-jvp", r.batch, false, 16, 32, 8);
  const MemoryPlan half = EstimatePlan(r, "batched-jvp", r.batch, false, 16, 32, 4);
  REQUIRE(half.total_bytes() < all.total_bytes());
  r.budget_bytes = half.total_bytes();
  auto plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->variant == "batched-jvp");
  CHECK(plan->tangents_per_pass == 4);
  CHECK(plan->Describe().find("4 tangents per pass") != std::string::npos);
  CHECK(plan->ToJson().find("\"tangents_per_pass\":4") != std::string::npos);
}

TEST_CASE("fwdgrad falls back to central differences when one tangent per pass does not fit", "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kFwdGrad);
  const MemoryPlan cd = EstimatePlan(r, "central-difference", r.batch, false, 16);
  REQUIRE(cd.total_bytes() < EstimatePlan(r, "batched-jvp", r.batch, false, 16, 32, 1).total_bytes());
  r.budget_bytes = cd.total_bytes();
  auto plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->variant == "central-difference");
}

TEST_CASE("mezo and kseed batch their probes when it fits, and probe in place when not", "[client][planner]") {
  for (optim::Method method : {optim::Method::kMezo, optim::Method::kKSeed}) {
    PlanRequest r = SmolRequest(method);
    r.perturbations = 4;
    const MemoryPlan fastest = *PlanMemory(r);
    CHECK(fastest.variant == "batched");
    const MemoryPlan in_place = EstimatePlan(r, "in-place-restore", r.batch, false, 16, 32);
    REQUIRE(in_place.total_bytes() < EstimatePlan(r, "batched", r.batch, false, 16, 32).total_bytes());
    r.budget_bytes = in_place.total_bytes();
    auto plan = PlanMemory(r);
    REQUIRE(plan.ok());
    CHECK(plan->variant != "batched");
    // Full-parameter runs have no adapter copies to batch.
    r.budget_bytes = 0;
    r.full_parameters = true;
    CHECK(PlanMemory(r)->variant != "batched");
  }
}

TEST_CASE("Streamed weights come after resident ones at each setting and before slower settings", "[client][planner]") {
  for (optim::Method method : {optim::Method::kLoraBp, optim::Method::kMezo}) {
    INFO(optim::MethodName(method));
    PlanRequest r = SmolRequest(method);
    r.batch = 1;
    r.weight_bytes = 200 << 20;
    r.streamed_weight_bytes = 40 << 20;
    const MemoryPlan fastest = *PlanMemory(r);  // no budget: resident weights
    CHECK_FALSE(fastest.stream_weights);
    CHECK(fastest.weight_bytes == r.weight_bytes);
    // A budget the fastest settings fit only with streamed weights: stream them, change nothing else.
    r.budget_bytes = fastest.total_bytes() - (100 << 20);
    auto streamed = PlanMemory(r);
    REQUIRE(streamed.ok());
    CHECK(streamed->stream_weights);
    CHECK(streamed->weight_bytes == r.streamed_weight_bytes);
    CHECK(streamed->variant == fastest.variant);
    CHECK(streamed->recompute == fastest.recompute);
    CHECK(streamed->mlp_chunk_tokens == fastest.mlp_chunk_tokens);
    CHECK(streamed->ToJson().find("\"stream_weights\":true") != std::string::npos);
    CHECK(streamed->Describe().find("weights streamed") != std::string::npos);
    // Weights that cannot be streamed (-1) never are: the same budget then needs slower settings or fails.
    r.streamed_weight_bytes = -1;
    auto resident = PlanMemory(r);
    if (resident.ok()) {
      CHECK_FALSE(resident->stream_weights);
    } else {
      CHECK(resident.status().code() == absl::StatusCode::kResourceExhausted);
    }
  }
  // Full-parameter runs perturb the weights themselves: never streamed.
  PlanRequest full = SmolRequest(optim::Method::kMezo);
  full.full_parameters = true;
  full.streamed_weight_bytes = 1 << 20;
  CHECK_FALSE(EstimatePlan(full, "in-place-restore", 4, false, 0, 0, 0, 0, true).stream_weights);
}

TEST_CASE("An impossible budget is ResourceExhausted with the smallest budget that fits", "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kMezo);
  r.budget_bytes = 300 << 20;  // less than the weights alone
  auto plan = PlanMemory(r);
  REQUIRE_FALSE(plan.ok());
  CHECK(plan.status().code() == absl::StatusCode::kResourceExhausted);
  const std::string msg(plan.status().message());
  CHECK(msg.find("does not fit a budget of 300.0 MiB") != std::string::npos);
  CHECK(msg.find("the lightest plan needs") != std::string::npos);
  // That smallest budget really is enough.
  r.budget_bytes = 0;
  const int64_t lightest = EstimatePlan(r, "in-place-restore", r.batch, false, 1).total_bytes();
  r.budget_bytes = lightest;
  CHECK(PlanMemory(r).ok());
}

TEST_CASE("Full-parameter zeroth-order plans count the weights once and an exact restore twice", "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kKSeed);
  r.full_parameters = true;
  const MemoryPlan exact = EstimatePlan(r, "exact-restore", r.batch, false, 64);
  const MemoryPlan in_place = EstimatePlan(r, "in-place-restore", r.batch, false, 64);
  CHECK(exact.trainable_bytes == 4 * r.model.NumParameters());
  CHECK(in_place.trainable_bytes == 0);
  r.budget_bytes = in_place.total_bytes();
  auto plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->variant == "in-place-restore");
  r.method = optim::Method::kFwdGrad;
  CHECK(PlanMemory(r).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Absurd plan inputs are refused, never wrapped into a size", "[client][planner]") {
  // An unvalidated config with a 2^62-token vocabulary used to wrap a byte count to 0 and die of SIGFPE.
  PlanRequest huge_vocab = SmolRequest(optim::Method::kMezo);
  huge_vocab.model.vocab_size = int64_t{1} << 62;
  auto plan = PlanMemory(huge_vocab);
  REQUIRE_FALSE(plan.ok());
  CHECK(plan.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(plan.status().message()), Catch::Contains("vocab_size"));

  PlanRequest long_seq = SmolRequest(optim::Method::kLoraBp);
  long_seq.seq_len = int64_t{1} << 40;
  CHECK_THAT(std::string(PlanMemory(long_seq).status().message()), Catch::Contains("tokens per step"));
  PlanRequest many = SmolRequest(optim::Method::kFwdGrad);
  many.perturbations = int64_t{1} << 40;
  CHECK_THAT(std::string(PlanMemory(many).status().message()), Catch::Contains("perturbations"));

  // The largest accepted request still plans to a positive total below 2^62.
  PlanRequest largest = SmolRequest(optim::Method::kLoraBp);
  largest.seq_len = kMaxPlanTokens;
  largest.batch = 1;
  largest.model.vocab_size = model::kMaxVocabSize;
  largest.model.num_hidden_layers = model::kMaxLayers;
  auto big = PlanMemory(largest);
  REQUIRE(big.ok());
  CHECK(big->total_bytes() > 0);
  CHECK(big->total_bytes() < (int64_t{1} << 62));
}

// The activation estimate against the exact tensor high-water mark of a real step on the tiny model.
TEST_CASE("Activation estimates bound the measured tensor peak of each method on the tiny model", "[client][planner]") {
  auto c = model::PresetConfig("tiny");
  REQUIRE(c.ok());
  auto m = model::LlamaModel::Create(*c, model::RandomWeights(*c, 1));
  REQUIRE(m.ok());
  lora::LoraConfig lc;
  const at::Tensor tokens = at::randint(0, c->vocab_size, {2, 128}, at::kLong);
  const model::Batch batch{tokens, tokens.clone()};
  PlanRequest r;
  r.model = *c;
  r.lora = lc;
  r.seq_len = 128;
  r.batch = 2;
  r.runtime_bytes = 0;
  r.weight_bytes = 0;
  auto measure = [&](optim::LocalTrainer& t) {
    REQUIRE(t.Step(batch).ok());  // warm-up
    model::TensorMemoryTracker tracker;
    REQUIRE(t.Step(batch).ok());
    return tracker.peak_bytes();
  };
  auto check = [&](const char* what, int64_t measured, const MemoryPlan& plan) {
    const int64_t estimate = plan.activation_bytes + plan.trainable_bytes;
    INFO(what << ": measured " << measured << " B, estimated " << estimate << " B");
    CHECK(estimate >= measured * 9 / 10);
    CHECK(estimate <= measured * 2);
  };
  // No recomputation, every layer recomputed, and the last two of the tiny model's four layers stored.
  std::map<bool, std::pair<int64_t, int64_t>> every_layer;  // recompute -> (measured, estimated)
  for (auto [recompute, stored] : {std::pair<bool, int64_t>{false, 0}, {true, 0}, {true, 2}}) {
    auto a = lora::LoraAdapter::Create(*c, lc);
    optim::LoraBpOptions o;
    o.recompute = recompute;
    o.stored_layers = stored;
    auto t = optim::LoraBpTrainer::Create(**m, **a, o);
    r.method = optim::Method::kLoraBp;
    const MemoryPlan plan = EstimatePlan(r, "", 2, recompute, 2048, 0, 0, stored);
    REQUIRE(plan.stored_layers == stored);
    const int64_t measured = measure(**t);
    check(recompute ? (stored > 0 ? "lora-bp, 2 layers stored" : "lora-bp recompute") : "lora-bp", measured, plan);
    if (stored == 0) every_layer[recompute] = {measured, plan.activation_bytes + plan.trainable_bytes};
  }
  // LoRA on the top layer only: the backward stops there, so one layer's activations (or input) are kept,
  // not four. The estimate still bounds the peak, and what it saves against every layer is what the
  // measured peak saves. (The 2x bound above does not hold here: the part every plan has, one layer's
  // backward and the cross-entropy, is estimated high on this tiny model and is most of this peak.)
  for (bool recompute : {false, true}) {
    INFO((recompute ? "lora-bp on the top layer, recompute" : "lora-bp on the top layer"));
    lora::LoraConfig top = lc;
    top.layers = {c->num_hidden_layers - 1};
    PlanRequest rt = r;
    rt.lora = top;
    rt.method = optim::Method::kLoraBp;
    auto a = lora::LoraAdapter::Create(*c, top);
    optim::LoraBpOptions o;
    o.recompute = recompute;
    auto t = optim::LoraBpTrainer::Create(**m, **a, o);
    const MemoryPlan plan = EstimatePlan(rt, "", 2, recompute, 2048);
    const int64_t measured = measure(**t);
    const int64_t estimate = plan.activation_bytes + plan.trainable_bytes;
    const auto [measured_all, estimate_all] = every_layer.at(recompute);
    const double saved_measured = static_cast<double>(measured_all - measured);
    const double saved_estimated = static_cast<double>(estimate_all - estimate);
    INFO("measured " << measured << " B, estimated " << estimate << " B; saved against every layer: measured "
                     << saved_measured << " B, estimated " << saved_estimated << " B");
    CHECK(estimate >= measured * 9 / 10);
    CHECK(saved_measured > 0);
    CHECK(saved_estimated >= 0.5 * saved_measured);
    CHECK(saved_estimated <= 2.0 * saved_measured);
  }
  {
    auto a = lora::LoraAdapter::Create(*c, lc);
    optim::FwdGradOptions o;
    o.perturbations = 4;
    auto t = optim::FwdGradTrainer::Create(**m, **a, o);
    r.method = optim::Method::kFwdGrad;
    r.perturbations = 4;
    check("fwdgrad", measure(**t), EstimatePlan(r, "batched-jvp", 2, false, 2048));
    o.tangents_per_pass = 1;
    o.mlp_chunk_tokens = 64;
    auto one = optim::FwdGradTrainer::Create(**m, **a, o);
    check("fwdgrad, one tangent per pass", measure(**one), EstimatePlan(r, "batched-jvp", 2, false, 2048, 64, 1));
  }
  {
    auto a = lora::LoraAdapter::Create(*c, lc);
    auto t = optim::MezoTrainer::Create(**m, a->get(), optim::ParameterSet::Adapter(**a), optim::MezoOptions{});
    r.method = optim::Method::kMezo;
    check("mezo", measure(**t), EstimatePlan(r, "in-place-restore", 2, false, 2048));
    optim::MezoOptions o;
    o.batched = true;
    o.perturbations = 2;
    auto b = optim::MezoTrainer::Create(**m, a->get(), optim::ParameterSet::Adapter(**a), o);
    r.perturbations = 2;
    check("mezo, batched q = 2", measure(**b), EstimatePlan(r, "batched", 2, false, 2048));
  }
  {
    auto a = lora::LoraAdapter::Create(*c, lc);
    r.method = optim::Method::kPepita;
    optim::PepitaOptions o;
    auto stored = optim::PepitaTrainer::Create(**m, **a, o);
    check("pepita", measure(**stored), EstimatePlan(r, "pepita", 2, false, 0));
    o.variant = optim::PepitaOptions::Variant::kMem;
    auto mem = optim::PepitaTrainer::Create(**m, **a, o);
    check("mempepita", measure(**mem), EstimatePlan(r, "mem", 2, false, 0));
  }
}

TEST_CASE("EstimatePlan counts the projections the adapter will have, as PlanMemory does", "[client][planner]") {
  // "all" lists q|k|v and gate|up fused beside their parts; a Llama model has only the parts.
  for (optim::Method method : {optim::Method::kLoraBp, optim::Method::kPepita}) {
    INFO(optim::MethodName(method));
    PlanRequest all = SmolRequest(method);
    all.lora.targets = *lora::ParseTargets("all");
    PlanRequest mapped = all;
    mapped.lora.targets = lora::TargetsFor(all.model, all.lora.targets);
    REQUIRE(mapped.lora.targets.size() == 7);
    const std::string variant = method == optim::Method::kPepita ? "pepita" : "";
    CHECK(EstimatePlan(all, variant, 4, false, 0).total_bytes() ==
          EstimatePlan(mapped, variant, 4, false, 0).total_bytes());
  }
}

TEST_CASE("pepita keeps the clean outputs when they fit and recomputes them (MEMPEPITA) when not",
          "[client][planner]") {
  PlanRequest r = SmolRequest(optim::Method::kPepita);
  r.lora.targets = {model::Projection::kQ, model::Projection::kV, model::Projection::kUp, model::Projection::kDown};
  const MemoryPlan fastest = *PlanMemory(r);
  CHECK(fastest.variant == "pepita");
  const MemoryPlan mem = EstimatePlan(r, "mem", r.batch, false, 0);
  // MEMPEPITA keeps no layer's outputs: less activation memory than PEPITA, which keeps 30 layers' worth.
  REQUIRE(mem.activation_bytes < fastest.activation_bytes);
  r.budget_bytes = mem.total_bytes();
  auto plan = PlanMemory(r);
  REQUIRE(plan.ok());
  CHECK(plan->variant == "mem");
  r.full_parameters = true;
  CHECK(PlanMemory(r).status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace seedling::client
