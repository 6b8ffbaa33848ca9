#include "model/gguf_model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"
#include "model/internal/gguf_util.h"
#include "model/kernels.h"
#include "model/quant.h"
#include "model/torch_status.h"

namespace seedling::model {
namespace {

using internal::FileError;
using internal::Optional;
using internal::ShapeString;

}  // namespace

// ---- Weights ------------------------------------------------------------------------------------

bool GgufPermutesQk(const ModelConfig& config) {
  const families::FamilySpec* family = families::FamilyOfArchitecture(config.architecture);
  return family != nullptr && family->gguf_architecture == "llama";
}

std::vector<GgufWeightSlot> GgufWeightSlots(const ModelConfig& c, ModelWeights& w) {
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  const bool permuted = GgufPermutesQk(c);
  const int64_t q_heads = permuted ? c.num_attention_heads : 0;
  const int64_t k_heads = permuted ? c.num_key_value_heads : 0;
  const int64_t qkv_heads = c.fused.qkv_per_head ? c.num_attention_heads : 0;
  const bool layer_norm = c.norm_kind == NormKind::kLayerNorm;
  std::vector<GgufWeightSlot> out;
  auto add = [&](std::string name, std::vector<int64_t> shape, at::Tensor* slot, int64_t rope_heads = 0) {
    out.push_back({std::move(name), std::move(shape), slot, rope_heads});
  };
  // A norm's weight and, for a LayerNorm, its bias ("<name>.weight", "<name>.bias").
  auto norm = [&](const std::string& name, int64_t size, at::Tensor* weight, at::Tensor* bias = nullptr) {
    out.push_back({name + ".weight", {size}, weight, 0, /*norm=*/true});
    if (layer_norm && bias != nullptr) out.push_back({name + ".bias", {size}, bias});
  };
  add("token_embd.weight", {V, H}, &w.embed);
  if (c.positions == PositionKind::kLearned) {
    out.push_back({"position_embd.weight", {c.position_rows(), H}, &w.positions, 0, false, 0, /*f32=*/true});
  }
  w.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const std::string b = StrCat("blk.", i, ".");
    if (c.norms.pre_attention) norm(b + "attn_norm", H, &l.input_norm, &l.input_norm_bias);
    if (c.fused.qkv) {  // llama.cpp's phi3 and gptneox: rows q | k | v
      out.push_back({b + "attn_qkv.weight", {q + 2 * kv, H}, &l.qkv, 0, false, qkv_heads});
      if (c.qkv_bias) out.push_back({b + "attn_qkv.bias", {q + 2 * kv}, &l.qkv_bias, 0, false, qkv_heads});
    } else {
      add(b + "attn_q.weight", {q, H}, &l.q, q_heads);
      if (c.qkv_bias) add(b + "attn_q.bias", {q}, &l.q_bias, q_heads);
      add(b + "attn_k.weight", {kv, H}, &l.k, k_heads);
      if (c.qkv_bias) add(b + "attn_k.bias", {kv}, &l.k_bias, k_heads);
      add(b + "attn_v.weight", {kv, H}, &l.v);
      if (c.qkv_bias) add(b + "attn_v.bias", {kv}, &l.v_bias);
    }
    add(b + "attn_output.weight", {H, q}, &l.o);
    if (c.o_bias) add(b + "attn_output.bias", {H}, &l.o_bias);
    if (c.qk_norm != QkNorm::kNone) {
      norm(b + "attn_q_norm", c.q_norm_size(), &l.q_norm);
      norm(b + "attn_k_norm", c.k_norm_size(), &l.k_norm);
    }
    if (c.norms.attention_output) {
      norm(b + "post_attention_norm", H, &l.attention_output_norm, &l.attention_output_norm_bias);
    }
    if (c.norms.pre_mlp) norm(b + "ffn_norm", H, &l.pre_mlp_norm, &l.pre_mlp_norm_bias);
    if (c.fused.gate_up) {  // llama.cpp's phi3: ffn_up holds gate | up
      add(b + "ffn_up.weight", {2 * I, H}, &l.gate_up);
      if (c.mlp_bias) add(b + "ffn_up.bias", {2 * I}, &l.gate_up_bias);
    } else {
      if (c.gated_mlp) add(b + "ffn_gate.weight", {I, H}, &l.gate);
      if (c.gated_mlp && c.mlp_bias) add(b + "ffn_gate.bias", {I}, &l.gate_bias);
      add(b + "ffn_up.weight", {I, H}, &l.up);
      if (c.mlp_bias) add(b + "ffn_up.bias", {I}, &l.up_bias);
    }
    add(b + "ffn_down.weight", {H, I}, &l.down);
    if (c.mlp_bias) add(b + "ffn_down.bias", {H}, &l.down_bias);
    if (c.norms.mlp_output) norm(b + "post_ffw_norm", H, &l.mlp_output_norm, &l.mlp_output_norm_bias);
  }
  if (c.norms.final) norm("output_norm", H, &w.final_norm, &w.final_norm_bias);
  // A tied head is left out: llama.cpp then reads token_embd.weight for the output projection.
  if (!c.tie_word_embeddings) add("output.weight", {V, H}, &w.lm_head);
  if (c.lm_head_bias) add("output.bias", {V}, &w.lm_head_bias);  // llama.cpp's phi2
  return out;
}

namespace {

// A per-head q | k | v tensor's rows as (first, second, D, rest...) for a swap of the first two.
std::vector<int64_t> QkvSplit(const at::Tensor& t, int64_t first, int64_t second) {
  std::vector<int64_t> split = {first, second, t.size(0) / (first * second)};
  split.insert(split.end(), t.sizes().begin() + 1, t.sizes().end());
  return split;
}

}  // namespace

at::Tensor QkvRowsToBlocks(const at::Tensor& t, int64_t heads) {
  return t.reshape(QkvSplit(t, heads, 3)).transpose(0, 1).reshape(t.sizes());
}

at::Tensor QkvRowsToHeads(const at::Tensor& t, int64_t heads) {
  return t.reshape(QkvSplit(t, 3, heads)).transpose(0, 1).reshape(t.sizes());
}

namespace {

struct Storage {
  at::ScalarType dtype;
  int64_t element_bytes;  // the alignment a from_blob view needs
};

// The weight format a matrix of ggml type `type` is held in, if Seedling loads that type.
std::optional<WeightFormat> MatrixFormatOf(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return WeightFormat::kF32;
    case GgmlType::kF16:
      return WeightFormat::kF16;
    case GgmlType::kBF16:
      return WeightFormat::kBF16;
    case GgmlType::kQ8_0:
      return WeightFormat::kQ8_0;
    case GgmlType::kQ4_0:
      return WeightFormat::kQ4_0;
    default:
      return std::nullopt;
  }
}

// How a tensor of ggml type `type` is held in memory, if Seedling loads that type: 16-bit and fp32 as
// their dtype, blocks as bytes (model/quant.h).
std::optional<Storage> StorageOf(GgmlType type) {
  const std::optional<WeightFormat> format = MatrixFormatOf(type);
  if (!format.has_value()) return std::nullopt;
  switch (*format) {
    case WeightFormat::kF32:
      return Storage{at::kFloat, 4};
    case WeightFormat::kF16:
      return Storage{at::kHalf, 2};
    case WeightFormat::kBF16:
      return Storage{at::kBFloat16, 2};
    case WeightFormat::kQ8_0:
    case WeightFormat::kQ4_0:
      return Storage{at::kByte, 1};
  }
  return std::nullopt;
}

// The tensor's bytes as a tensor (model/quant.h layout): a view of the mapping whose deleter keeps
// the file mapped, or a copy when the bytes are not aligned for the dtype. Sets `copied`.
at::Tensor MappedTensor(const GgufTensorInfo& t, const Storage& storage, bool& copied) {
  std::vector<int64_t> sizes = t.shape;
  if (storage.dtype == at::kByte) {
    const int64_t block_bytes = t.type == GgmlType::kQ8_0 ? sizeof(BlockQ8_0) : sizeof(BlockQ4_0);
    sizes = {t.shape[0], t.shape[1] / kQuantBlock, block_bytes};
  }
  const at::TensorOptions options = at::TensorOptions().dtype(storage.dtype);
  copied = reinterpret_cast<uintptr_t>(t.data) % storage.element_bytes != 0;
  if (copied) {
    at::Tensor out = at::empty(sizes, options);
    std::memcpy(out.data_ptr(), t.data, t.nbytes);
    return out;
  }
  std::shared_ptr<MappedFile> keep = t.file;
  return at::from_blob(
      const_cast<uint8_t*>(t.data), sizes, [keep](void*) mutable { keep.reset(); }, options);
}

// model/gguf.h: export row h*D + 2i + j holds original row h*D + j*D/2 + i. Rows move whole, so a
// block matrix (rows, blocks, bytes) is un-permuted without touching its blocks.
at::Tensor UndoRopeInterleave(const at::Tensor& w, int64_t heads) {
  std::vector<int64_t> split = {heads, w.size(0) / heads / 2, 2};
  split.insert(split.end(), w.sizes().begin() + 1, w.sizes().end());
  return w.reshape(split).transpose(1, 2).reshape(w.sizes()).contiguous();
}

absl::Status UnsupportedType(const GgufFile& f, const GgufTensorInfo& t) {
  return FileError(f, StrCat("tensor '", t.name, "' has type ", GgmlTypeName(t.type),
                             ", which Seedling cannot load (supported: f32, f16, bf16, q8_0, q4_0); convert the "
                             "model with `llama-quantize --pure` to q8_0 or q4_0 (add --allow-requantize for an "
                             "already quantized file), or export it as f16"));
}

absl::StatusOr<at::Tensor> LoadTensor(const GgufFile& f, const GgufTensorInfo& t, const GgufWeightSlot& e,
                                      WeightPrecision precision) {
  if (t.shape != e.shape) {
    return FileError(
        f, StrCat("tensor '", t.name, "' has shape ", ShapeString(t.shape), ", config implies ", ShapeString(e.shape)));
  }
  const std::optional<Storage> storage = StorageOf(t.type);
  if (!storage.has_value()) return UnsupportedType(f, t);
  const bool matrix = e.shape.size() == 2;
  if (!matrix && storage->dtype == at::kByte) {
    return FileError(f, StrCat("tensor '", t.name, "' is 1-D but has block type ", GgmlTypeName(t.type),
                               "; norms and biases must be f32, f16 or bf16"));
  }
  bool copied = false;
  at::Tensor out = MappedTensor(t, *storage, copied);
  if (e.rope_heads > 0) {
    out = UndoRopeInterleave(out, e.rope_heads);
    copied = true;
  }
  if (e.qkv_heads > 0) {
    out = QkvRowsToHeads(out, e.qkv_heads).contiguous();
    copied = true;
  }
  const bool to_fp32 = !matrix || precision == WeightPrecision::kFloat32;
  if (to_fp32 && out.scalar_type() != at::kFloat) {
    out = matrix ? DequantizeMatrix(out) : out.to(at::kFloat);
    copied = true;
  }
  // The mapped source is no longer referenced: let its pages leave RSS.
  if (copied) t.file->Release(t.data, t.nbytes);
  return out;
}

std::string NameList(const std::vector<std::string>& names) {
  std::string list;
  for (size_t i = 0; i < names.size() && i < 5; ++i) list += StrCat(i ? ", " : "", "'", names[i], "'");
  if (names.size() > 5) list += StrCat(" and ", names.size() - 5, " more");
  return list;
}

absl::StatusOr<ModelWeights> LoadGgufWeights(const GgufFile& f, const ModelConfig& c, WeightPrecision precision) {
  ModelWeights w;
  std::vector<std::string> missing;
  std::set<std::string, std::less<>> used;
  for (const GgufWeightSlot& e : GgufWeightSlots(c, w)) {
    const GgufTensorInfo* t = f.FindTensor(e.name);
    if (t == nullptr) {
      missing.push_back(e.name);
      continue;
    }
    used.insert(e.name);
    SEEDLING_ASSIGN_OR_RETURN(*e.slot, LoadTensor(f, *t, e, precision));
    // llama.cpp's Gemma graphs scale by the stored weight, Hugging Face's by (1 + w).
    if (e.norm && c.norm_weight_offset != 0) *e.slot = *e.slot - c.norm_weight_offset;
  }
  // Llama 3 scaling is carried by rope_freqs.weight and LongRoPE by rope_factors_{long,short}.weight, which
  // ConfigFromGguf reads.
  std::vector<const char*> rope_tensors;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) rope_tensors = {"rope_freqs.weight"};
  if (c.rope_scaling.type == RopeScaling::Type::kLongRope) {
    rope_tensors = {"rope_factors_long.weight", "rope_factors_short.weight"};
  }
  for (const char* name : rope_tensors) {
    if (f.FindTensor(name) == nullptr) missing.push_back(name);
    used.insert(name);
  }
  if (!missing.empty()) {
    return absl::NotFoundError(StrCat("GGUF file '", f.path(), "': ", missing.size(), " tensor(s) the ", c.architecture,
                                      " config requires are missing: ", NameList(missing)));
  }
  std::vector<std::string> unexpected;
  for (const GgufTensorInfo& t : f.tensors()) {
    if (!used.contains(t.name)) unexpected.push_back(t.name);
  }
  if (!unexpected.empty()) {
    return FileError(f, StrCat(unexpected.size(), " tensor(s) are not part of a ", c.architecture,
                               " with this config: ", NameList(unexpected)));
  }
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

// ---- Tokenizer ----------------------------------------------------------------------------------

using Vocab = TokenizerVocabulary;

// llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp) of the byte-level pre-tokenizers Seedling
// implements the same way.
struct PreTokenizerName {
  std::string_view name;
  Vocab::PreTokenizer pre;
};
constexpr PreTokenizerName kPreTokenizers[] = {
    {"gpt-2", Vocab::PreTokenizer::kGpt2},
    {"smollm", Vocab::PreTokenizer::kGpt2Digits},
    {"llama-bpe", Vocab::PreTokenizer::kLlama3},
    {"llama3", Vocab::PreTokenizer::kLlama3},
    {"llama-v3", Vocab::PreTokenizer::kLlama3},
    {"qwen2", Vocab::PreTokenizer::kQwen2},
    {"deepseek-r1-qwen", Vocab::PreTokenizer::kQwen2},
};

absl::StatusOr<Vocab::PreTokenizer> ReadPreTokenizer(const GgufFile& f) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<std::string_view> name, Optional(f.GetString("tokenizer.ggml.pre")));
  std::string known;
  for (const PreTokenizerName& p : kPreTokenizers) {
    if (name == p.name) return p.pre;
    known += StrCat(known.empty() ? "" : ", ", p.name);
  }
  return FileError(
      f, StrCat("tokenizer.ggml.pre ", name.has_value() ? StrCat("'", *name, "' is not supported") : "is missing",
                " for a gpt2 tokenizer (supported: ", known, ")"));
}

absl::Status ReadMerges(const GgufFile& f, Vocab& v) {
  SEEDLING_ASSIGN_OR_RETURN(const std::vector<std::string_view> merges, f.GetStringArray("tokenizer.ggml.merges"));
  v.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    // llama.cpp splits at the first space after the first byte (a token may be a space).
    const size_t space = merges[i].find(' ', 1);
    if (space == std::string_view::npos) {
      return FileError(
          f, StrCat("tokenizer.ggml.merges[", i, "] '", merges[i], "' is not two tokens separated by a space"));
    }
    v.merges.emplace_back(merges[i].substr(0, space), merges[i].substr(space + 1));
  }
  return absl::OkStatus();
}

absl::Status ReadTokens(const GgufFile& f, Vocab& v) {
  SEEDLING_ASSIGN_OR_RETURN(const std::vector<std::string_view> tokens, f.GetStringArray("tokenizer.ggml.tokens"));
  v.tokens.assign(tokens.begin(), tokens.end());
  const size_t n = tokens.size();
  if (f.Has("tokenizer.ggml.token_type")) {
    SEEDLING_ASSIGN_OR_RETURN(v.types, f.GetI32Array("tokenizer.ggml.token_type"));
    // llama.cpp reads type 0 (UNDEFINED) as a normal token.
    std::replace(v.types.begin(), v.types.end(), 0, static_cast<int32_t>(Vocab::kNormal));
  } else {
    v.types.assign(n, Vocab::kNormal);
  }
  if (f.Has("tokenizer.ggml.scores")) {
    SEEDLING_ASSIGN_OR_RETURN(v.scores, f.GetF32Array("tokenizer.ggml.scores"));
  }
  if (v.types.size() != n || (!v.scores.empty() && v.scores.size() != n)) {
    return FileError(f, StrCat("tokenizer.ggml.tokens has ", n, " entries but token_type has ", v.types.size(),
                               " and scores ", v.scores.size()));
  }
  return absl::OkStatus();
}

absl::Status ReadTokenizerFlags(const GgufFile& f, Vocab& v, bool& add_space_prefix) {
  const std::pair<const char*, std::optional<int32_t>*> ids[] = {{"tokenizer.ggml.bos_token_id", &v.bos_id},
                                                                 {"tokenizer.ggml.eos_token_id", &v.eos_id},
                                                                 {"tokenizer.ggml.unknown_token_id", &v.unk_id},
                                                                 {"tokenizer.ggml.padding_token_id", &v.pad_id}};
  for (const auto& [key, id] : ids) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> value, Optional(f.GetU32(key)));
    if (value.has_value() && *value >= v.tokens.size()) {
      return FileError(f, StrCat(key, " ", *value, " is outside the vocabulary of ", v.tokens.size(), " tokens"));
    }
    if (value.has_value()) *id = static_cast<int32_t>(*value);
  }
  const bool spm = v.kind != Vocab::Kind::kByteLevelBpe;
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> add_bos, Optional(f.GetBool("tokenizer.ggml.add_bos_token")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> add_eos, Optional(f.GetBool("tokenizer.ggml.add_eos_token")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> prefix, Optional(f.GetBool("tokenizer.ggml.add_space_prefix")));
  // llama.cpp adds BOS by default for SentencePiece vocabularies (when they name one).
  v.add_bos = add_bos.value_or(spm && v.bos_id.has_value());
  v.add_eos = add_eos.value_or(false);
  add_space_prefix = prefix.value_or(spm);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelWeights> WeightsFromGguf(const GgufFile& file, const ModelConfig& config,
                                             WeightPrecision precision) {
  return CatchTorch(StrCat("GGUF file '", file.path(), "'"), [&] { return LoadGgufWeights(file, config, precision); });
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& file) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string_view model, file.GetString("tokenizer.ggml.model"));
  Vocab v;
  if (model == "gpt2") {
    v.kind = Vocab::Kind::kByteLevelBpe;
    SEEDLING_ASSIGN_OR_RETURN(v.pre_tokenizer, ReadPreTokenizer(file));
    SEEDLING_RETURN_IF_ERROR(ReadMerges(file, v));
  } else if (model == "llama") {
    v.kind = Vocab::Kind::kSentencePieceBpe;
  } else {
    return FileError(file, StrCat("tokenizer.ggml.model '", model, "' is not supported (supported: gpt2, llama)"));
  }
  SEEDLING_RETURN_IF_ERROR(ReadTokens(file, v));
  VocabularyTokenizerOptions options;
  SEEDLING_RETURN_IF_ERROR(ReadTokenizerFlags(file, v, options.add_space_prefix));
  options.source = StrCat("GGUF file '", file.path(), "': tokenizer");
  return TokenizerFromVocabulary(v, options);
}

std::vector<HeldMatrix> GgufStreamableMatrices(const GgufFile& file, const ModelConfig& config,
                                               WeightPrecision precision) {
  std::vector<HeldMatrix> out;
  if (precision == WeightPrecision::kFloat32) return out;
  const std::optional<WeightFormat> block = BlockFormatOf(precision);
  ModelWeights slots;
  for (const GgufWeightSlot& e : GgufWeightSlots(config, slots)) {
    const bool head = e.name == "output.weight" || (config.tie_word_embeddings && e.name == "token_embd.weight");
    const bool reordered = e.rope_heads > 0 || e.qkv_heads > 0;  // copied at load
    if (e.shape.size() != 2 || (!head && !e.name.starts_with("blk.")) || reordered) continue;
    const GgufTensorInfo* t = file.FindTensor(e.name);
    if (t == nullptr || t->shape != e.shape) continue;
    const std::optional<WeightFormat> held = MatrixFormatOf(t->type);
    if (!held.has_value() || *held == WeightFormat::kF32) continue;
    if (reinterpret_cast<uintptr_t>(t->data) % StorageOf(t->type)->element_bytes != 0) continue;  // copied
    if (block.has_value() && *held != MatrixFormatFor(*block, e.shape[1])) continue;              // converted at load
    out.push_back({e.shape[0], e.shape[1], static_cast<int64_t>(t->nbytes), e.name == "token_embd.weight"});
  }
  return out;
}

absl::StatusOr<GgufModel> LoadGgufModel(const std::string& path, WeightPrecision precision) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path, MappedFile::Mode::kCopyOnWrite));
  GgufModel model;
  SEEDLING_ASSIGN_OR_RETURN(model.config, ConfigFromGguf(*file));
  SEEDLING_ASSIGN_OR_RETURN(model.tokenizer, TokenizerFromGguf(*file));
  SEEDLING_ASSIGN_OR_RETURN(model.weights, WeightsFromGguf(*file, model.config, precision));
  return model;
}

}  // namespace seedling::model
