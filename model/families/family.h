#pragma once

// A model family: how its Hugging Face config.json maps onto ModelConfig's block description. The shared
// fields (sizes, RoPE, eps, token ids, dtype) are read by ParseModelConfig (model/config.cpp); a family reads
// and writes only what is its own: which projections have biases, where the block normalizes, q/k norms,
// sliding windows. Tensor names follow from the description (model/weights.h), so a family that reuses the
// Llama names needs nothing more. To add a family: a file here with its FamilySpec, listed in families.cpp.
// No LibTorch (the fuzzing build compiles the config parser with clang).

#include <array>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/internal/config_json.h"

namespace seedling::model::families {

// The tokenizer `seedling init-model` trains for a random model of the family, in the style the family's
// published tokenizers have.
enum class TokenizerStyle {
  kByteLevelBpe,                // GPT-2 style (SmolLM, Qwen, Llama 3, OLMo 2)
  kSentencePieceBpe,            // "▁" for spaces, byte fallback, <pad> <eos> <bos> <unk> (Gemma)
  kSentencePieceBpeWithPrefix,  // the same with a "▁" dummy prefix, <unk> <s> </s> <|endoftext|> (Phi-3)
};

// Hugging Face's tensor and module names of a family. The defaults are Llama's, which most families share.
struct ModuleNames {
  std::string_view embed = "model.embed_tokens.weight";
  std::string_view positions = "";           // the learned position table (ModelConfig::positions kLearned)
  std::string_view layers = "model.layers";  // layer l's tensors start "<layers>.<l>."
  std::string_view final_norm = "model.norm";
  std::string_view lm_head = "lm_head.weight";
  std::string_view lm_head_bias = "lm_head.bias";  // read when ModelConfig::lm_head_bias says so
  // The projections between a narrower embedding and the blocks (ModelConfig::word_embed_proj_dim).
  std::string_view project_in = "";
  std::string_view project_out = "";
  // Each projection's module path in a layer, indexed by Projection ("" for one the family's blocks lack).
  std::array<std::string_view, kNumProjections> projections = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",   "self_attn.o_proj", "mlp.gate_proj",
      "mlp.up_proj",      "mlp.down_proj",    "self_attn.qkv_proj", "mlp.gate_up_proj"};
  // The norm before attention and, in a block without one on attention's output, the MLP's input norm (in one
  // with it, Llama's names mean the output norm and pre_feedforward_layernorm the MLP's input norm).
  std::string_view input_norm = "input_layernorm";
  std::string_view pre_mlp_norm = "post_attention_layernorm";
  // Tensor-name suffixes of buffers old checkpoints carry and the loader skips (besides rotary_emb.inv_freq).
  std::array<std::string_view, 2> buffers = {};
  // A prefix of every name that checkpoints saved from the bare model lack (GPT-2's "transformer.").
  std::string_view optional_prefix = "";
  // The layers' projections are stored (in, out), as GPT-2's Conv1D keeps them, and transposed at load.
  bool conv1d = false;
};

struct FamilySpec {
  std::string_view architecture;  // config.json "architectures"[0], e.g. "Olmo2ForCausalLM"
  std::string_view model_type;    // config.json "model_type", e.g. "olmo2"
  // llama.cpp's name for the architecture (GGUF general.architecture), e.g. "olmo2"; several families may
  // share one (Mistral exports as "llama"), and the first listed is what a GGUF file reads back as. Empty for a
  // family llama.cpp does not run (OPT).
  std::string_view gguf_architecture;
  // Reads the family's own fields of config.json `j` into `c` (the shared ones are read already). An empty
  // object gives the family's defaults (what a GGUF file of the family starts from).
  absl::Status (*read)(const internal::Json& j, ModelConfig& c);
  // Writes them back, so that Hugging Face transformers builds the same block from the file.
  void (*write)(const ModelConfig& c, internal::Json& j);
  TokenizerStyle init_tokenizer = TokenizerStyle::kByteLevelBpe;
  const ModuleNames* names = nullptr;  // null: Llama's
  // Copies the family's own names of shared fields onto the shared ones (GPT-2's n_embd to hidden_size) where
  // those are absent, before the shared fields are read. Null: none.
  absl::Status (*prepare)(internal::Json& j) = nullptr;
};

// Every supported family, in the order error messages list them.
std::span<const FamilySpec> Families();
// Their architecture names, comma-separated, for error messages.
std::string ArchitectureNames();
// The family of an architecture or a model_type; null when none matches.
const FamilySpec* FamilyOfArchitecture(std::string_view architecture);
const FamilySpec* FamilyOfModelType(std::string_view model_type);
const FamilySpec* FamilyOfGgufArchitecture(std::string_view gguf_architecture);
// The module names of an architecture's family (Llama's for an unknown one).
const ModuleNames& ModuleNamesOf(std::string_view architecture);

// The families, one per file.
const FamilySpec& Llama();    // LlamaForCausalLM (SmolLM, TinyLlama, MobileLLM, Llama 3.2)
const FamilySpec& Mistral();  // MistralForCausalLM
const FamilySpec& Qwen2();    // Qwen2ForCausalLM (Qwen2, Qwen2.5)
const FamilySpec& Qwen3();    // Qwen3ForCausalLM
const FamilySpec& Olmo2();    // Olmo2ForCausalLM
const FamilySpec& Gemma2();   // Gemma2ForCausalLM
const FamilySpec& Gemma3();   // Gemma3ForCausalLM (text)
const FamilySpec& Phi3();     // Phi3ForCausalLM (Phi-3, Phi-3.5)
const FamilySpec& GptNeoX();  // GPTNeoXForCausalLM (Pythia)
const FamilySpec& Gpt2();     // GPT2LMHeadModel (GPT-2, Cerebras-GPT)
const FamilySpec& Opt();      // OPTForCausalLM (OPT)
const FamilySpec& Phi();      // PhiForCausalLM (Phi-1, Phi-1.5, Phi-2)

}  // namespace seedling::model::families
