#include "model/weight_cache.h"

#include <ATen/ATen.h>
#include <torch/optim/adam.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "base/file.h"
#include "base/status.h"
#include "model/config.h"
#include "model/eval.h"
#include "model/frozen_linear.h"
#include "model/init.h"
#include "model/llama.h"
#include "model/quant.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

using testing::TempDir;

// A `tiny` model directory in BF16 (so the cache really converts).
std::string WriteTinyModel(const std::string& root, uint64_t seed = 0) {
  const std::string dir = JoinPath(root, "tiny");
  InitModelOptions options;
  options.seed = seed;
  options.dtype = DType::kBF16;
  options.overwrite = true;
  REQUIRE(InitModel(dir, options).ok());
  return dir;
}

LoadOptions Quantized(WeightPrecision precision, const std::string& cache_dir) {
  LoadOptions o;
  o.precision = precision;
  o.cache_dir = cache_dir;
  return o;
}

absl::StatusOr<WeightCache> OpenCache(const std::string& model_dir, WeightFormat format, const std::string& cache_dir) {
  SEEDLING_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCollection> source, SafetensorsCollection::Open(model_dir));
  WeightCacheOptions options;
  options.dir = cache_dir;
  return OpenWeightCache(*source, model_dir, config, format, options);
}

void Overwrite(const std::string& path, uint64_t offset, char byte) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(byte);
}

TEST_CASE("The weight cache holds GGUF blocks of the source and F16 for matrices that cannot be blocked",
          "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  auto model = LlamaModel::Load(dir, Quantized(WeightPrecision::kQ4_0, JoinPath(tmp.path, "cache")));
  REQUIRE(model.ok());
  auto source = LlamaModel::Load(dir, {});
  REQUIRE(source.ok());
  const LayerWeights& q = (*model)->weights().layers[1];
  const LayerWeights& f = (*source)->weights().layers[1];
  CHECK(FormatOf(q.q) == WeightFormat::kQ4_0);
  CHECK(FormatOf(q.gate) == WeightFormat::kQ4_0);
  CHECK(FormatOf(q.down) == WeightFormat::kF16);  // 688 columns
  CHECK(FormatOf((*model)->weights().embed) == WeightFormat::kQ4_0);
  CHECK(q.input_norm.scalar_type() == at::kFloat);
  CHECK(at::equal(q.q, *QuantizeMatrix(f.q, WeightFormat::kQ4_0)));
  CHECK(at::equal(q.down, f.down.to(at::kHalf)));
  // The mapping is read-only file pages: the tensor's bytes live in the cache file.
  CHECK(FileExists(JoinPath(JoinPath(tmp.path, "cache"), "weights-q4_0.safetensors")));
}

TEST_CASE("An intact weight cache is reused, not rebuilt", "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  const std::string cache_dir = JoinPath(tmp.path, "cache");
  auto first = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
  REQUIRE(first.ok());
  CHECK(first->built);
  CHECK(first->rebuild_reason == "missing");
  auto second = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
  REQUIRE(second.ok());
  CHECK_FALSE(second->built);
  CHECK(second->rebuild_reason.empty());
}

TEST_CASE("A damaged, truncated or stale weight cache is rebuilt", "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  const std::string cache_dir = JoinPath(tmp.path, "cache");
  auto built = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
  REQUIRE(built.ok());
  const std::string path = built->path;
  const auto good_size = std::filesystem::file_size(path);
  built->files.reset();

  SECTION("a flipped byte in the data") {
    Overwrite(path, good_size - 100, '\x55');
    auto again = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
    REQUIRE(again.ok());
    CHECK(again->built);
    CHECK(again->rebuild_reason == "damaged: the data does not match its SHA-256");
  }
  SECTION("a truncated file") {
    std::filesystem::resize_file(path, good_size / 2);
    auto again = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
    REQUIRE(again.ok());
    CHECK(again->built);
    CHECK(again->rebuild_reason.rfind("damaged: ", 0) == 0);
    CHECK(std::filesystem::file_size(path) == good_size);
  }
  SECTION("garbage instead of a header") {
    Overwrite(path, 10, '\x01');
    auto again = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
    REQUIRE(again.ok());
    CHECK(again->built);
    CHECK(again->rebuild_reason.rfind("damaged: ", 0) == 0);
  }
  SECTION("the model's weights changed") {
    WriteTinyModel(tmp.path, /*seed=*/5);
    auto again = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
    REQUIRE(again.ok());
    CHECK(again->built);
    CHECK(again->rebuild_reason == "stale: the model's weights changed");
  }
  SECTION("another format under this format's name") {
    auto q4 = OpenCache(dir, WeightFormat::kQ4_0, cache_dir);
    REQUIRE(q4.ok());
    const std::string q4_path = q4->path;
    q4->files.reset();
    std::filesystem::copy_file(q4_path, path, std::filesystem::copy_options::overwrite_existing);
    auto again = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
    REQUIRE(again.ok());
    CHECK(again->built);
    CHECK(again->rebuild_reason == "stale: holds 'q4_0'");
  }
  // Whatever was wrong, the rebuilt cache is intact and reused from now on.
  auto reused = OpenCache(dir, WeightFormat::kQ8_0, cache_dir);
  REQUIRE(reused.ok());
  CHECK_FALSE(reused->built);
}

TEST_CASE("A model over a weight cache computes what its decoded weights compute", "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  for (WeightPrecision p : {WeightPrecision::kQ8_0, WeightPrecision::kQ4_0}) {
    INFO(WeightPrecisionName(p));
    auto quantized = LlamaModel::Load(dir, Quantized(p, JoinPath(tmp.path, "cache")));
    REQUIRE(quantized.ok());
    const ModelWeights& dense = (*quantized)->weights();
    ModelWeights decoded;  // every matrix decoded to fp32
    decoded.embed = DequantizeMatrix(dense.embed);
    decoded.final_norm = dense.final_norm;
    for (const LayerWeights& l : dense.layers) {
      LayerWeights d = l;
      for (at::Tensor* t : {&d.q, &d.k, &d.v, &d.o, &d.gate, &d.up, &d.down}) *t = DequantizeMatrix(*t);
      decoded.layers.push_back(d);
    }
    decoded.lm_head = decoded.embed;
    auto reference = LlamaModel::Create((*quantized)->config(), decoded);
    REQUIRE(reference.ok());
    const at::Tensor tokens = at::arange(0, 40, at::kLong).view({2, 20}) * 37 % 2000;
    const at::Tensor a = *(*quantized)->Logits(tokens);
    const at::Tensor b = *(*reference)->Logits(tokens);
    CHECK((a - b).abs().max().item<double>() < 1e-4);
  }
}

TEST_CASE("A model over a weight cache streams its layers with the same results, others cannot stream",
          "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  auto quantized = LlamaModel::Load(dir, Quantized(WeightPrecision::kQ4_0, JoinPath(tmp.path, "cache")));
  REQUIRE(quantized.ok());
  LlamaModel& model = **quantized;
  REQUIRE(model.streamable());
  const at::Tensor tokens = at::arange(0, 40, at::kLong).view({2, 20}) * 37 % 2000;
  const at::Tensor resident = *model.Logits(tokens);
  model.set_stream_weights(true);
  CHECK(model.stream_weights());
  CHECK(model.Logits(tokens)->equal(resident));
  CHECK(model.Logits(tokens)->equal(resident));  // the released pages fault back in from the cache

  auto fp32 = LlamaModel::Load(dir, {});
  REQUIRE(fp32.ok());
  CHECK_FALSE((*fp32)->streamable());
  (*fp32)->set_stream_weights(true);
  CHECK_FALSE((*fp32)->stream_weights());
}

TEST_CASE("Streamed weight bytes keep everything but the layers' matrices and the LM head, for q8_0 and q4_0 only",
          "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  const ModelConfig c = *LoadModelConfig(dir);
  for (WeightPrecision p : {WeightPrecision::kFloat32, WeightPrecision::kStored}) {
    CHECK(*StreamedWeightBytes(dir, c, p, *ResidentWeightBytes(dir, c, p)) == -1);
  }
  for (WeightPrecision p : {WeightPrecision::kQ8_0, WeightPrecision::kQ4_0}) {
    INFO(WeightPrecisionName(p));
    const int64_t resident = *ResidentWeightBytes(dir, c, p);
    auto model = LlamaModel::Load(dir, Quantized(p, JoinPath(tmp.path, "cache")));
    REQUIRE(model.ok());
    REQUIRE(c.tie_word_embeddings);
    // The layers' matrices and the LM head (here the tied embedding) as the loaded model holds them; of
    // each, a page per tile (plus one) stays, and of the embedding a page per gathered token row (256);
    // the largest decoded tile is held too.
    const int64_t page = 4096;
    int64_t matrices = 0, kept_pages = 256, largest_tile = 0;
    for (const NamedWeight& w : NamedWeights((*model)->weights(), c)) {
      if (LogicalShape(w.tensor).size() != 2) continue;  // norms and biases stay resident
      const std::vector<int64_t> shape = LogicalShape(w.tensor);
      const int64_t rows = shape[0], cols = shape[1], bytes = MatrixBytes(w.tensor);
      const int64_t tile_rows = DefaultTileRows(rows, cols);
      matrices += bytes;
      kept_pages += (rows + tile_rows - 1) / tile_rows + 1;
      largest_tile = std::max(largest_tile, bytes / rows * tile_rows);
    }
    REQUIRE(::sysconf(_SC_PAGESIZE) == page);
    CHECK(*StreamedWeightBytes(dir, c, p, resident) == resident - matrices + kept_pages * page + largest_tile);
  }
}

TEST_CASE("Resident weight bytes follow the representation", "[model][weight_cache]") {
  TempDir tmp;
  const std::string dir = WriteTinyModel(tmp.path);
  const ModelConfig c = *LoadModelConfig(dir);
  const int64_t fp32 = *ResidentWeightBytes(dir, c, WeightPrecision::kFloat32);
  const int64_t stored = *ResidentWeightBytes(dir, c, WeightPrecision::kStored);
  const int64_t q8 = *ResidentWeightBytes(dir, c, WeightPrecision::kQ8_0);
  const int64_t q4 = *ResidentWeightBytes(dir, c, WeightPrecision::kQ4_0);
  CHECK(fp32 == 4 * c.NumParameters());
  CHECK(stored < fp32 / 2 + 64 * 1024);  // BF16 matrices, fp32 norms
  CHECK(q4 < q8);
  CHECK(q8 < stored);
  // Exactly what the loaded q4_0 model holds.
  auto model = LlamaModel::Load(dir, Quantized(WeightPrecision::kQ4_0, JoinPath(tmp.path, "cache")));
  REQUIRE(model.ok());
  int64_t held = 0;
  for (const NamedWeight& w : NamedWeights((*model)->weights(), c)) held += MatrixBytes(w.tensor);
  CHECK(held == q4);
}

}  // namespace
}  // namespace seedling::model
