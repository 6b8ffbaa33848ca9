#include "client/task_spec.h"

#include <catch2/catch.hpp>

#include "model/init.h"
#include "tests/test_util.h"

namespace seedling::client {
namespace {

v1::Task FwdGradTask() {
  v1::Task task;
  task.set_method("fwdgrad");
  task.set_seed(77);
  (*task.mutable_hyperparameters())["steps"] = 5;
  (*task.mutable_hyperparameters())["seq_len"] = 64;
  (*task.mutable_hyperparameters())["batch"] = 2;
  (*task.mutable_hyperparameters())["lr"] = 0.01;
  (*task.mutable_hyperparameters())["perturbations"] = 4;
  (*task.mutable_hyperparameters())["apply_locally"] = 0;
  task.mutable_lora()->set_rank(4);
  task.mutable_lora()->set_alpha(8);
  task.mutable_lora()->add_targets("q_proj");
  task.mutable_lora()->add_targets("down_proj");
  task.mutable_lora()->set_init_seed(9);
  task.set_kseed_pool_size(128);
  task.set_kseed_pool_seed(5);
  return task;
}

TEST_CASE("A task's hyperparameters and adapter become one TaskSpec", "[client][task_spec]") {
  absl::StatusOr<TaskSpec> spec = TaskSpecFromTask(FwdGradTask());
  REQUIRE(spec.ok());
  CHECK(spec->training.method == optim::Method::kFwdGrad);
  CHECK(spec->training.steps == 5);
  CHECK(spec->training.lr == 0.01);
  CHECK(spec->training.seed == 77);
  CHECK(spec->training.perturbations == 4);
  CHECK_FALSE(spec->training.fwdgrad_apply_locally);
  CHECK(spec->training.kseed_pool_size == 128);
  CHECK(spec->training.kseed_pool_seed == 5);
  CHECK(spec->seq_len == 64);
  CHECK(spec->batch == 2);
  CHECK(spec->lora.rank == 4);
  CHECK(spec->lora.alpha == 8.0);
  CHECK(spec->lora.init_seed == 9);
  const bool q_and_down =
      spec->lora.targets == std::vector<model::Projection>{model::Projection::kQ, model::Projection::kDown};
  CHECK(q_and_down);
  CHECK(spec->lora.layers.empty());  // all layers

  v1::Task top = FwdGradTask();
  top.mutable_lora()->add_layers(2);
  top.mutable_lora()->add_layers(3);
  absl::StatusOr<TaskSpec> top_spec = TaskSpecFromTask(top);
  REQUIRE(top_spec.ok());
  CHECK(top_spec->lora.layers == std::vector<int64_t>{2, 3});
}

TEST_CASE("Absent hyperparameters take the trainer's defaults, mezo probes one seed per step", "[client][task_spec]") {
  v1::Task task = FwdGradTask();
  task.set_method("mezo");
  task.mutable_hyperparameters()->clear();
  absl::StatusOr<TaskSpec> spec = TaskSpecFromTask(task);
  REQUIRE(spec.ok());
  CHECK(spec->training.steps == 20);
  CHECK(spec->training.lr == 0);  // the method's default, chosen by the trainer
  CHECK(spec->training.perturbations == 1);
  CHECK(spec->training.fwdgrad_apply_locally);
  CHECK(spec->seq_len == 256);
  CHECK(spec->batch == 1);
}

TEST_CASE("A task with an unknown method or LoRA target is refused by name", "[client][task_spec]") {
  v1::Task task = FwdGradTask();
  task.set_method("sgd-on-everything");
  absl::StatusOr<TaskSpec> spec = TaskSpecFromTask(task);
  REQUIRE_FALSE(spec.ok());
  CHECK(std::string(spec.status().message()).find("sgd-on-everything") != std::string::npos);

  task = FwdGradTask();
  task.mutable_lora()->add_targets("attn_c_proj");
  spec = TaskSpecFromTask(task);
  REQUIRE_FALSE(spec.ok());
  CHECK(spec.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(spec.status().message()).find("attn_c_proj") != std::string::npos);
}

TEST_CASE("The plan request and data options follow the spec and the model on disk", "[client][task_spec]") {
  testing::TempDir dir;
  model::InitModelOptions init;
  REQUIRE(model::InitModel(dir.path, init).ok());
  absl::StatusOr<model::ModelConfig> config = model::LoadModelConfig(dir.path);
  REQUIRE(config.ok());
  absl::StatusOr<TaskSpec> spec = TaskSpecFromTask(FwdGradTask());
  REQUIRE(spec.ok());

  absl::StatusOr<PlanRequest> fp32 = PlanRequestFor(*spec, dir.path, *config, model::WeightPrecision::kFloat32);
  REQUIRE(fp32.ok());
  CHECK(fp32->method == optim::Method::kFwdGrad);
  CHECK(fp32->seq_len == 64);
  CHECK(fp32->batch == 2);
  CHECK(fp32->perturbations == 4);
  CHECK(fp32->lora.rank == 4);
  CHECK(fp32->weight_bytes == 4 * config->NumParameters());
  CHECK_FALSE(fp32->weights_decoded_per_tile);
  absl::StatusOr<PlanRequest> q8 = PlanRequestFor(*spec, dir.path, *config, model::WeightPrecision::kQ8_0);
  REQUIRE(q8.ok());
  CHECK(q8->weights_decoded_per_tile);
  CHECK(q8->weight_bytes < fp32->weight_bytes);

  const LocalDataOptions data = DataOptionsFor(*spec, *config);
  CHECK(data.seq_len == 64);
  CHECK(data.batch_size == 2);
  CHECK(data.seed == 77);
  REQUIRE(data.eos_id.has_value());
  CHECK(*data.eos_id == config->eos_token_ids[0]);
}

}  // namespace
}  // namespace seedling::client
