// A trainer restored from SaveState (plus the parameters) continues exactly like one that was never
// interrupted: what the SDK relies on when the app is killed mid-training.

#include <catch2/catch.hpp>
#include <functional>

#include "optim/fwdgrad.h"
#include "optim/kseed.h"
#include "optim/lora_bp.h"
#include "optim/mezo.h"
#include "tests/optim/test_util.h"

namespace seedling::optim {
namespace {

using testing::MakeModel;
using testing::MicroConfig;
using testing::RuleBatch;

std::unique_ptr<lora::LoraAdapter> Adapter(const model::ModelConfig& c) {
  lora::LoraConfig lc;
  lc.rank = 2;
  lc.dropout = 0.1;  // dropout masks depend on the step: they must line up after a resume too
  lc.targets = {model::Projection::kQ, model::Projection::kV};
  auto a = lora::LoraAdapter::Create(c, lc);
  REQUIRE(a.ok());
  return std::move(a).value();
}

using Factory = std::function<std::unique_ptr<LocalTrainer>(const model::LlamaModel&, lora::LoraAdapter&)>;

void CheckResume(const Factory& make) {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 1);
  auto batch = [&](int i) { return RuleBatch(2, 10, c.vocab_size, static_cast<uint64_t>(i)); };

  auto straight = Adapter(c);
  auto t1 = make(*m, *straight);
  for (int i = 0; i < 6; ++i) REQUIRE(t1->Step(batch(i)).ok());

  auto first = Adapter(c);
  auto t2 = make(*m, *first);
  for (int i = 0; i < 3; ++i) REQUIRE(t2->Step(batch(i)).ok());
  const TrainerState state = t2->SaveState();
  const at::Tensor params = first->flat().clone();
  t2.reset();

  auto second = Adapter(c);  // a new process: fresh adapter and trainer
  second->flat().copy_(params);
  auto t3 = make(*m, *second);
  REQUIRE(t3->RestoreState(state).ok());
  CHECK(t3->steps() == 3);
  for (int i = 3; i < 6; ++i) REQUIRE(t3->Step(batch(i)).ok());
  CHECK(at::equal(second->flat(), straight->flat()));
  const TrainerState a = t1->SaveState(), b = t3->SaveState();
  CHECK(a.buffers == b.buffers);
  CHECK(a.pairs == b.pairs);
  CHECK(a.seed_pairs == b.seed_pairs);
}

TEST_CASE("lora-bp resumed from its state continues bit for bit", "[optim][resume]") {
  CheckResume([](const model::LlamaModel& m, lora::LoraAdapter& a) -> std::unique_ptr<LocalTrainer> {
    LoraBpOptions o;
    o.lr = 1e-2;
    o.seed = 3;
    return std::move(LoraBpTrainer::Create(m, a, o)).value();
  });
}

TEST_CASE("fwdgrad resumed from its state continues bit for bit", "[optim][resume]") {
  CheckResume([](const model::LlamaModel& m, lora::LoraAdapter& a) -> std::unique_ptr<LocalTrainer> {
    FwdGradOptions o;
    o.perturbations = 2;
    o.seed = 4;
    return std::move(FwdGradTrainer::Create(m, a, o)).value();
  });
}

TEST_CASE("mezo resumed from its state continues bit for bit", "[optim][resume]") {
  CheckResume([](const model::LlamaModel& m, lora::LoraAdapter& a) -> std::unique_ptr<LocalTrainer> {
    MezoOptions o;
    o.seed = 5;
    o.exact_restore = true;
    return std::move(MezoTrainer::Create(m, &a, ParameterSet::Adapter(a), o)).value();
  });
}

TEST_CASE("kseed resumed from its state continues bit for bit", "[optim][resume]") {
  CheckResume([](const model::LlamaModel& m, lora::LoraAdapter& a) -> std::unique_ptr<LocalTrainer> {
    KSeedOptions o;
    o.pool_size = 32;
    o.lr = 1e-2;
    o.epsilon = 1e-2;
    o.seed = 6;
    return std::move(KSeedTrainer::Create(m, &a, ParameterSet::Adapter(a), o)).value();
  });
}

TEST_CASE("A state that does not fit the trainer is refused", "[optim][resume]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 2);
  auto a = Adapter(c);
  auto t = LoraBpTrainer::Create(*m, *a, LoraBpOptions{});
  REQUIRE(t.ok());
  TrainerState bad;
  bad.steps = 2;
  bad.buffers["m"] = std::vector<float>(3, 0.0f);  // wrong size, no "v"
  CHECK((*t)->RestoreState(bad).code() == absl::StatusCode::kInvalidArgument);
  CHECK((*t)->steps() == 0);
}

}  // namespace
}  // namespace seedling::optim
