#pragma once

// `seedling init-model`: writes a randomly initialized model in Hugging Face format (config.json,
// model.safetensors, tokenizer.json, tokenizer_config.json), so tests and demos need no download.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "model/safetensors.h"

namespace seedling::model {

struct InitModelOptions {
  std::string preset = "tiny";  // see PresetNames()
  uint64_t seed = 0;            // weights come from the Philox init stream of this seed
  DType dtype = DType::kF32;    // F32, F16 or BF16 for model.safetensors
  // Target vocabulary of the tokenizer learned from the corpus; 0 = min(vocab_size, 4096). The tokenizer
  // takes the family's style (model/families/family.h TokenizerStyle): byte-level BPE with SmolLM2's special
  // tokens (<|endoftext|> as BOS and EOS, nothing added), or, for Gemma, SentencePiece-style BPE with
  // Gemma's (<pad> 0, <eos> 1, <bos> 2 prepended, <unk> 3). Training stops earlier if the corpus has no
  // pair seen twice; the model's vocab_size stays the preset's.
  int32_t tokenizer_vocab = 0;
  std::string tokenizer_corpus;  // text to learn the tokenizer from; empty = the bundled sample corpus
  bool overwrite = false;        // replace an existing model in out_dir
};

// Creates `out_dir` if needed and writes the model. FailedPrecondition if out_dir already holds a
// config.json and overwrite is false; NotFound for an unknown preset.
absl::Status InitModel(const std::string& out_dir, const InitModelOptions& options);

// The sample text bundled into the binary (data/sample/corpus.txt).
std::string_view BundledSampleCorpus();

}  // namespace seedling::model
