#include "optim/fwdgrad.h"

#include <catch2/catch.hpp>
#include <cmath>

#include "tests/optim/test_util.h"

namespace seedling::optim {
namespace {

using testing::BiasedMicroConfig;
using testing::EveryProjection;
using testing::Gemma2StyleMicroConfig;
using testing::GemmaStyleMicroConfig;
using testing::Gpt2StyleMicroConfig;
using testing::GptNeoXStyleMicroConfig;
using testing::MakeModel;
using testing::MicroConfig;
using testing::Opt350StyleMicroConfig;
using testing::Phi3StyleMicroConfig;
using testing::PhiStyleMicroConfig;
using testing::PostNormMicroConfig;
using testing::RuleBatch;

// A float64 copy of the model: every weight converted to double.
std::unique_ptr<model::LlamaModel> DoubleCopy(const model::LlamaModel& m) {
  model::ModelWeights w = m.weights();
  model::ForEachWeightSlot(w, m.config(), [](const std::string&, at::Tensor& t) { t = t.to(at::kDouble); });
  if (m.config().tie_word_embeddings) w.lm_head = w.embed;  // the tied head is not a slot of its own
  auto d = model::LlamaModel::Create(m.config(), std::move(w));
  REQUIRE(d.ok());
  return std::move(d).value();
}

// LoRA of `rank`, or BitFit's biases, on `targets` with random values.
// `layers` as LoraConfig::layers (empty = all).
std::unique_ptr<lora::LoraAdapter> RandomAdapter(const model::ModelConfig& c, int64_t rank,
                                                 std::vector<model::Projection> targets,
                                                 lora::AdapterKind kind = lora::AdapterKind::kLora,
                                                 std::vector<int64_t> layers = {}) {
  lora::LoraConfig lc;
  lc.kind = kind;
  lc.layers = std::move(layers);
  lc.rank = rank;
  lc.alpha = 2.0 * static_cast<double>(rank);
  lc.targets = std::move(targets);
  auto a = lora::LoraAdapter::Create(c, lc);
  REQUIRE(a.ok());
  at::manual_seed(3);
  (*a)->flat().copy_(at::randn({(*a)->numel()}) * 0.3);  // B != 0 so every entry has a gradient
  return std::move(a).value();
}

double Loss(const model::LlamaModel& m, lora::LoraAdapter& a, const model::Batch& b) {
  model::ForwardOptions fo;
  fo.adapter = &a;
  auto l = ProbeLoss(m, b, fo);
  REQUIRE(l.ok());
  return l->mean().item<double>();
}

TEST_CASE("The forward-mode JVP equals a float64 central finite difference", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 1);
  const lora::AdapterKind kind = GENERATE(lora::AdapterKind::kLora, lora::AdapterKind::kBias);
  INFO("adapter " << lora::AdapterKindName(kind));
  auto a = RandomAdapter(c, 2, {model::Projection::kQ, model::Projection::kV, model::Projection::kDown}, kind);
  const model::Batch batch = RuleBatch(2, 12, c.vocab_size, 4);
  FwdGradOptions o;
  auto trainer = FwdGradTrainer::Create(*m, *a, o);
  REQUIRE(trainer.ok());

  auto md = DoubleCopy(*m);
  const at::Tensor flat64 = a->flat().to(at::kDouble);
  for (uint64_t seed : {11u, 12u, 13u}) {
    double loss = 0;
    auto jvp = (*trainer)->DirectionalDerivative(batch, seed, &loss);
    REQUIRE(jvp.ok());
    at::Tensor z = at::zeros({a->numel()}, at::kFloat);
    AddSeededNormal(z, seed, 1.0f);
    const at::Tensor v = z.to(at::kDouble);
    const double h = 1e-5;
    a->SetFlatOverride(flat64 + h * v);
    const double plus = Loss(*md, *a, batch);
    a->SetFlatOverride(flat64 - h * v);
    const double minus = Loss(*md, *a, batch);
    a->SetFlatOverride(at::Tensor());
    const double fd = (plus - minus) / (2 * h);
    INFO("seed " << seed << ": jvp " << *jvp << ", float64 finite difference " << fd);
    CHECK(std::abs(fd) > 1e-3);
    CHECK(std::abs(*jvp - fd) < 1e-3 * std::abs(fd) + 1e-5);
    CHECK(std::abs(loss - Loss(*m, *a, batch)) < 1e-6);  // the primal is the plain loss
  }
}

TEST_CASE("The batched forward gradient equals per-tangent forward-mode AD", "[optim][fwdgrad][tangents]") {
  // Qwen3-style per-head q/k norms with every bias, OLMo 2's block, or the options Gemma 2 and 3 add.
  const int block = GENERATE(0, 1, 2, 3, 4, 5, 6, 7, 8);
  const char* const names[] = {"pre-norm block, biases, q/k norms per head",
                               "OLMo 2 block",
                               "Gemma-style block (GeGLU, 1 + w norms, local/global layers)",
                               "Gemma 2-style block (soft-capped attention scores and logits)",
                               "Phi-3-style block (fused qkv and gate_up with biases, LongRoPE)",
                               "GPT-NeoX-style block (LayerNorms, parallel residual, partial rotary, GELU MLP)",
                               "GPT-2-style block (learned positions, fused c_attn, tanh-GELU MLP)",
                               "Phi-style block (one LayerNorm for parallel attention and MLP, LM head bias)",
                               "OPT-350m-style block (post-LN, no final norm, projected embeddings, ReLU)"};
  INFO(names[block]);
  const model::ModelConfig c = block == 0   ? BiasedMicroConfig()
                               : block == 1 ? PostNormMicroConfig()
                               : block == 2 ? GemmaStyleMicroConfig()
                               : block == 3 ? Gemma2StyleMicroConfig()
                               : block == 4 ? Phi3StyleMicroConfig()
                               : block == 5 ? GptNeoXStyleMicroConfig()
                               : block == 6 ? Gpt2StyleMicroConfig()
                               : block == 7 ? PhiStyleMicroConfig()
                                            : Opt350StyleMicroConfig();
  auto m = MakeModel(c, 4);
  const lora::AdapterKind kind = GENERATE(lora::AdapterKind::kLora, lora::AdapterKind::kBias);
  // On the top layer only, the batched pass carries no tangents through the layer below.
  const bool top_only = GENERATE(false, true);
  INFO("adapter " << lora::AdapterKindName(kind) << (top_only ? " on the top layer" : " on every layer"));
  auto a = RandomAdapter(c, 2, EveryProjection(), kind,
                         top_only ? std::vector<int64_t>{c.num_hidden_layers - 1} : std::vector<int64_t>{});
  const model::Batch batch = RuleBatch(2, 12, c.vocab_size, 7);
  const std::vector<uint64_t> seeds = {31, 32, 33, 34, 35};

  // Float64 (model, adapter and tangents): the two computations differ only by rounding, so they agree
  // to 1e-9 relative; a wrong or missing rule term changes the derivative at order 1.
  SECTION("float64") {
    auto md = DoubleCopy(*m);
    FwdGradOptions o;
    auto t = FwdGradTrainer::Create(*md, *a, o);
    REQUIRE(t.ok());
    a->flat() = a->flat().to(at::kDouble);  // after Create (which trains fp32); derivatives read flat()
    double batched_loss = 0;
    auto batched = (*t)->DirectionalDerivatives(batch, seeds, &batched_loss);
    REQUIRE(batched.ok());
    REQUIRE(batched->size() == seeds.size());
    for (size_t i = 0; i < seeds.size(); ++i) {
      double loss = 0;
      auto one = (*t)->DirectionalDerivative(batch, seeds[i], &loss);
      REQUIRE(one.ok());
      INFO("seed " << seeds[i] << ": batched " << (*batched)[i] << ", forward AD " << *one);
      CHECK(std::abs(*one) > 1e-3);
      CHECK(std::abs((*batched)[i] - *one) <= 1e-9 * std::abs(*one));
      CHECK(std::abs(batched_loss - loss) <= 1e-12 * loss);
    }
  }
  // Float32, as trained: relative 1e-5 (fp32 rounding over two layers, summed in a different order),
  // whether the tangents go in one pass or several and whether the MLP runs in token chunks.
  SECTION("float32, tangents per pass and MLP chunks") {
    for (int64_t per_pass : {0, 2}) {
      for (int64_t mlp_chunk : {0, 5}) {
        FwdGradOptions o;
        o.tangents_per_pass = per_pass;
        o.mlp_chunk_tokens = mlp_chunk;
        auto t = FwdGradTrainer::Create(*m, *a, o);
        REQUIRE(t.ok());
        auto batched = (*t)->DirectionalDerivatives(batch, seeds, nullptr);
        REQUIRE(batched.ok());
        for (size_t i = 0; i < seeds.size(); ++i) {
          auto one = (*t)->DirectionalDerivative(batch, seeds[i], nullptr);
          REQUIRE(one.ok());
          INFO("per pass " << per_pass << ", MLP chunk " << mlp_chunk << ", seed " << seeds[i] << ": batched "
                           << (*batched)[i] << ", forward AD " << *one);
          CHECK(std::abs((*batched)[i] - *one) <= 1e-5 * std::abs(*one) + 1e-6);
        }
      }
    }
  }
}

TEST_CASE("Batched and per-tangent training steps give the same losses and parameters", "[optim][fwdgrad][tangents]") {
  const model::ModelConfig c = BiasedMicroConfig();
  auto m = MakeModel(c, 5);
  auto a1 = RandomAdapter(c, 2, EveryProjection());
  auto a2 = RandomAdapter(c, 2, EveryProjection());
  FwdGradOptions batched, per_tangent;
  batched.perturbations = per_tangent.perturbations = 4;
  batched.lr = per_tangent.lr = 1e-3;
  per_tangent.mode = FwdGradOptions::Mode::kForwardAD;
  auto t1 = FwdGradTrainer::Create(*m, *a1, batched);
  auto t2 = FwdGradTrainer::Create(*m, *a2, per_tangent);
  REQUIRE(t1.ok());
  REQUIRE(t2.ok());
  const at::Tensor start = a1->flat().clone();
  for (int step = 0; step < 3; ++step) {
    const model::Batch batch = RuleBatch(2, 12, c.vocab_size, 20 + static_cast<uint64_t>(step));
    auto r1 = (*t1)->Step(batch);
    auto r2 = (*t2)->Step(batch);
    REQUIRE(r1.ok());
    REQUIRE(r2.ok());
    CHECK(std::abs(r1->loss - r2->loss) <= 1e-6 * r2->loss);
    CHECK((*t1)->last_gradient().seeds == (*t2)->last_gradient().seeds);
  }
  // The parameters moved, and moved alike (relative to the distance travelled).
  const double moved = (a2->flat() - start).norm().item<double>();
  CHECK(moved > 1e-4);
  CHECK((a1->flat() - a2->flat()).norm().item<double>() <= 1e-4 * moved);
}

TEST_CASE("The central-difference variant agrees with forward-mode AD", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 2);
  auto a = RandomAdapter(c, 2, {model::Projection::kQ, model::Projection::kV});
  const model::Batch batch = RuleBatch(2, 12, c.vocab_size, 5);
  FwdGradOptions ad, cd;
  cd.mode = FwdGradOptions::Mode::kCentralDifference;
  cd.fd_epsilon = 1e-3;  // small enough that third-order terms vanish, large for fp32 noise
  auto t_ad = FwdGradTrainer::Create(*m, *a, ad);
  auto t_cd = FwdGradTrainer::Create(*m, *a, cd);
  REQUIRE(t_ad.ok());
  REQUIRE(t_cd.ok());
  const at::Tensor before = a->flat().clone();
  auto d_ad = (*t_ad)->DirectionalDerivative(batch, 21, nullptr);
  auto d_cd = (*t_cd)->DirectionalDerivative(batch, 21, nullptr);
  REQUIRE(d_ad.ok());
  REQUIRE(d_cd.ok());
  CHECK(std::abs(*d_ad - *d_cd) < 0.02 * std::abs(*d_ad) + 1e-4);
  CHECK((a->flat() - before).abs().max().item<double>() < 1e-6);  // θ restored after the probes
}

TEST_CASE("The mean forward gradient over many perturbations points along the true gradient", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 3);
  lora::LoraConfig lc;
  lc.rank = 1;
  lc.targets = {model::Projection::kQ};
  lc.layers = {1};
  auto created = lora::LoraAdapter::Create(c, lc);
  REQUIRE(created.ok());
  lora::LoraAdapter& a = **created;
  at::manual_seed(9);
  a.flat().copy_(at::randn({a.numel()}) * 0.5);
  REQUIRE(a.numel() == 64);
  const model::Batch batch = RuleBatch(2, 12, c.vocab_size, 6);

  // True gradient by backprop.
  a.flat().requires_grad_(true);
  model::ForwardOptions fo;
  fo.adapter = &a;
  auto loss = m->Loss(batch.tokens, batch.labels, fo);
  REQUIRE(loss.ok());
  loss->mean().backward();
  const at::Tensor truth = a.flat().grad().clone();
  a.flat().requires_grad_(false);
  a.flat().mutable_grad() = at::Tensor();

  FwdGradOptions o;
  o.perturbations = 1500;
  o.apply_locally = false;
  auto t = FwdGradTrainer::Create(*m, a, o);
  REQUIRE(t.ok());
  auto step = (*t)->Step(batch);
  REQUIRE(step.ok());
  const at::Tensor g = (*t)->last_estimate();
  const double cosine = (g.dot(truth) / (g.norm() * truth.norm())).item<double>();
  INFO("cosine " << cosine);
  CHECK(cosine > 0.9);
  // A broken estimator (e.g. using fresh perturbations instead of the measured ones) would be ~0.
}

TEST_CASE("The (seed, derivative) pairs rebuild the dense estimate bit for bit", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 4);
  auto a = RandomAdapter(c, 2, {model::Projection::kQ, model::Projection::kV});
  FwdGradOptions o;
  o.perturbations = 5;
  auto t = FwdGradTrainer::Create(*m, *a, o);
  REQUIRE(t.ok());
  const at::Tensor before = a->flat().clone();
  REQUIRE((*t)->Step(RuleBatch(2, 10, c.vocab_size, 7)).ok());
  const ForwardGradient& pairs = (*t)->last_gradient();
  REQUIRE(pairs.seeds.size() == 5);
  CHECK(at::equal(RebuildEstimate(pairs), (*t)->last_estimate()));
  // And the local update applied exactly θ − lr g.
  CHECK(at::allclose(a->flat(), before - o.lr * (*t)->last_estimate(), 0, 1e-7));
}

TEST_CASE("Discriminative sampling keeps perturbations aligned with the reference", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 5);
  auto a = RandomAdapter(c, 1, {model::Projection::kQ});
  FwdGradOptions o;
  o.perturbations = 4;
  o.apply_locally = false;
  auto t = FwdGradTrainer::Create(*m, *a, o);
  REQUIRE(t.ok());
  at::manual_seed(1);
  const at::Tensor reference = at::randn({a->numel()});
  auto mean_cosine = [&]() {
    REQUIRE((*t)->Step(RuleBatch(1, 8, c.vocab_size, 8)).ok());
    double sum = 0;
    for (uint64_t seed : (*t)->last_gradient().seeds) {
      at::Tensor z = at::zeros({a->numel()}, at::kFloat);
      AddSeededNormal(z, seed, 1.0f);
      sum += (z.dot(reference) / (z.norm() * reference.norm())).item<double>();
    }
    return sum / 4;
  };
  const double plain = mean_cosine();
  REQUIRE((*t)->SetReference(reference).ok());
  const double discriminative = mean_cosine();
  INFO("plain " << plain << ", discriminative " << discriminative);
  CHECK(discriminative > plain + 0.1);
  CHECK((*t)->SetReference(at::zeros({3})).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A NaN loss skips the forward-gradient step and leaves the adapter untouched", "[optim][fwdgrad]") {
  const model::ModelConfig c = MicroConfig();
  auto m = MakeModel(c, 6);
  m->mutable_weights().final_norm.fill_(std::numeric_limits<float>::quiet_NaN());
  auto a = RandomAdapter(c, 1, {model::Projection::kQ});
  auto t = FwdGradTrainer::Create(*m, *a, FwdGradOptions{});
  REQUIRE(t.ok());
  const at::Tensor before = a->flat().clone();
  auto r = (*t)->Step(RuleBatch(1, 8, c.vocab_size, 9));
  REQUIRE(r.ok());
  CHECK(r->skipped);
  CHECK((*t)->skipped_steps() == 1);
  CHECK(at::equal(a->flat(), before));
}

}  // namespace
}  // namespace seedling::optim
