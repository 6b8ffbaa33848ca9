#include "client/compute_model.h"

#include <catch2/catch.hpp>

namespace seedling::client {
namespace {

// Forward FLOPs written out for clarity, to check LocalTrainingFlops against, in its three parts.
struct NaiveFlops {
  double projections = 0, attention = 0, head = 0;
  double forward() const { return projections + attention + head; }
};
NaiveFlops NaiveForwardFlops(const model::ModelConfig& c, double tokens, double seq) {
  const double h = static_cast<double>(c.hidden_size);
  const double q = static_cast<double>(c.num_attention_heads * c.head_dim);
  const double kv = static_cast<double>(c.num_key_value_heads * c.head_dim);
  const double mlp = 3.0 * h * static_cast<double>(c.intermediate_size);
  NaiveFlops f;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    f.projections += tokens * 2.0 * (h * q + h * kv + h * kv + q * h + mlp);  // projections and MLP
    f.attention += tokens * (2.0 * seq * q + 2.0 * seq * q);                  // QKᵀ, AV
  }
  f.head = tokens * 2.0 * h * static_cast<double>(c.vocab_size);  // LM head
  return f;
}

TEST_CASE("LocalTrainingFlops counts each method's multiplies and is linear in steps", "[client][compute]") {
  auto config = model::PresetConfig("smollm2-135m");
  REQUIRE(config.ok());
  const NaiveFlops f = NaiveForwardFlops(*config, 4.0 * 128, 128);
  const double forward = f.forward();
  CHECK(LocalTrainingFlops(*config, "mezo", 1, 4, 128, 1) == Approx(2 * forward));
  CHECK(LocalTrainingFlops(*config, "kseed", 1, 4, 128, 1) == Approx(2 * forward));
  CHECK(LocalTrainingFlops(*config, "mezo", 1, 4, 128, 4) == Approx(8 * forward));
  // lora-bp: forward + activation gradients (projections once more, attention twice more, the LM head
  // once more for the hidden-state gradient).
  CHECK(LocalTrainingFlops(*config, "lora-bp", 1, 4, 128, 1) ==
        Approx(2 * f.projections + 3 * f.attention + 2 * f.head));
  // fwdgrad: the primal and K tangents through the projections, four attention products per tangent,
  // and the LM head twice whatever K.
  CHECK(LocalTrainingFlops(*config, "fwdgrad", 1, 4, 128, 1) ==
        Approx(2 * f.projections + 3 * f.attention + 2 * f.head));
  CHECK(LocalTrainingFlops(*config, "fwdgrad", 1, 4, 128, 4) ==
        Approx(5 * f.projections + 9 * f.attention + 2 * f.head));
  // One mezo step (two forwards) costs less than one lora-bp step (its backward's attention is dearer).
  CHECK(LocalTrainingFlops(*config, "mezo", 1, 4, 128, 1) < LocalTrainingFlops(*config, "lora-bp", 1, 4, 128, 1));
  // pepita: the clean forward with its LM head, F e (as dear as the head), the modulated forward's layers;
  // mempepita: one more pass of the layers.
  CHECK(LocalTrainingFlops(*config, "pepita", 1, 4, 128, 1) ==
        Approx(2 * f.projections + 2 * f.attention + 2 * f.head));
  CHECK(LocalTrainingFlops(*config, "mempepita", 1, 4, 128, 1) ==
        Approx(3 * f.projections + 3 * f.attention + 2 * f.head));
  for (const char* method : {"lora-bp", "fwdgrad", "mezo", "kseed", "pepita", "mempepita"}) {
    INFO(method);
    CHECK(LocalTrainingFlops(*config, method, 10, 4, 128, 2) ==
          Approx(10 * LocalTrainingFlops(*config, method, 1, 4, 128, 2)));
  }
  // smollm2-135m: about 2 × 135M × 512 tokens ≈ 1.4e11 per forward, plus attention.
  CHECK(forward > 1.2e11);
  CHECK(forward < 2.5e11);
  CHECK(IsKnownTrainingMethod("kseed"));
  CHECK_FALSE(IsKnownTrainingMethod("sgd"));
}

TEST_CASE("Below an upper-layer adapter no backward, tangents or per-copy probes are counted", "[client][compute]") {
  auto config = model::PresetConfig("smollm2-135m");
  REQUIRE(config.ok());
  const int64_t first = 24;  // lora "top:6" of 30 layers
  REQUIRE(config->num_hidden_layers == 30);
  const NaiveFlops f = NaiveForwardFlops(*config, 4.0 * 128, 128);
  // The six top layers' share of the projections and attention, the 24 below them the rest.
  model::ModelConfig top = *config;
  top.num_hidden_layers = 30 - first;
  const NaiveFlops upper = NaiveForwardFlops(top, 4.0 * 128, 128);
  const double below = f.projections + f.attention - upper.projections - upper.attention;
  // lora-bp: the whole forward; the backward through the top layers only.
  CHECK(LocalTrainingFlops(*config, "lora-bp", 1, 4, 128, 1, first) ==
        Approx(f.forward() + f.head + upper.projections + 2 * upper.attention));
  // fwdgrad, K = 4: the primal everywhere, the four tangents from layer 24 up.
  CHECK(LocalTrainingFlops(*config, "fwdgrad", 1, 4, 128, 4, first) ==
        Approx(f.projections + f.attention + 2 * f.head + 4 * (upper.projections + 2 * upper.attention)));
  // mezo, q = 2: the layers below once for all four copies, the top layers and the head per copy.
  CHECK(LocalTrainingFlops(*config, "mezo", 1, 4, 128, 2, first) ==
        Approx(below + 4 * (upper.projections + upper.attention + f.head)));
  // pepita runs every layer either way; first layer 0 is every layer.
  CHECK(LocalTrainingFlops(*config, "pepita", 1, 4, 128, 1, first) ==
        Approx(LocalTrainingFlops(*config, "pepita", 1, 4, 128, 1)));
  for (const char* method : {"lora-bp", "fwdgrad", "mezo", "kseed"}) {
    INFO(method);
    CHECK(LocalTrainingFlops(*config, method, 1, 4, 128, 2, 0) == LocalTrainingFlops(*config, method, 1, 4, 128, 2));
    CHECK(LocalTrainingFlops(*config, method, 1, 4, 128, 2, first) < LocalTrainingFlops(*config, method, 1, 4, 128, 2));
  }
}

TEST_CASE("TrainingMfu is the model FLOP rate over the sgemm rate, scaled to the tokens processed",
          "[client][compute]") {
  auto config = model::PresetConfig("smollm2-135m");
  REQUIRE(config.ok());
  const double flops = LocalTrainingFlops(*config, "mezo", 2, 1, 256, 1);
  // All 512 tokens in one second at exactly the model's FLOP count per second: MFU 1 against that rate.
  CHECK(TrainingMfu(*config, "mezo", 2, 1, 256, 1, 512, 1.0, flops / 1e9) == Approx(1.0));
  // Half the tokens (short rows) in the same time is half the utilization.
  CHECK(TrainingMfu(*config, "mezo", 2, 1, 256, 1, 256, 1.0, flops / 1e9) == Approx(0.5));
  CHECK(TrainingMfu(*config, "mezo", 2, 1, 256, 1, 512, 0.0, 10.0) == 0);
  CHECK(TrainingMfu(*config, "sgd", 2, 1, 256, 1, 512, 1.0, 10.0) == 0);
}

TEST_CASE("ForwardMfu counts one forward per token: half a mezo step's FLOPs", "[client][compute]") {
  auto config = model::PresetConfig("smollm2-135m");
  REQUIRE(config.ok());
  const double step_flops = LocalTrainingFlops(*config, "mezo", 1, 1, 256, 1);  // two forwards of 256 tokens
  CHECK(ForwardMfu(*config, 256, 256, 1.0, step_flops / 2 / 1e9) == Approx(1.0));
  CHECK(ForwardMfu(*config, 256, 128, 1.0, step_flops / 2 / 1e9) == Approx(0.5));
  CHECK(ForwardMfu(*config, 256, 256, 0.0, 10.0) == 0);
  CHECK(ForwardMfu(*config, 256, 0, 1.0, 10.0) == 0);
}

}  // namespace
}  // namespace seedling::client
