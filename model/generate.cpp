#include "model/generate.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"

namespace seedling::model {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Length of the longest prefix of `s` that does not end inside a UTF-8 sequence.
size_t CompleteUtf8Prefix(std::string_view s) {
  size_t end = s.size();
  // Look back at most 3 bytes for a lead byte whose sequence is cut short.
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const auto c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (need > back) end = s.size() - back;
    break;
  }
  return end;
}

}  // namespace

int64_t SampleToken(const at::Tensor& logits, const GenerateOptions& options, Rng& rng) {
  const at::Tensor l = logits.reshape({-1}).to(at::kDouble).contiguous();
  const int64_t v = l.numel();
  const double* p = l.data_ptr<double>();
  if (options.temperature <= 0) return static_cast<int64_t>(std::max_element(p, p + v) - p);
  // Softmax at the given temperature, then sort by probability (ties by id, so the order is deterministic).
  const double mx = *std::max_element(p, p + v);
  std::vector<double> prob(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) prob[static_cast<size_t>(i)] = std::exp((p[i] - mx) / options.temperature);
  std::vector<int64_t> order(static_cast<size_t>(v));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const double pa = prob[static_cast<size_t>(a)], pb = prob[static_cast<size_t>(b)];
    return pa != pb ? pa > pb : a < b;
  });
  const double total = std::accumulate(prob.begin(), prob.end(), 0.0);
  size_t keep = order.size();
  if (options.top_k > 0) keep = std::min<size_t>(keep, static_cast<size_t>(options.top_k));
  // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) {
    mass += prob[static_cast<size_t>(order[i])] / total;
    if (mass >= options.top_p) {
      keep = i + 1;
      break;
    }
  }
  double kept_mass = 0;
  for (size_t i = 0; i < keep; ++i) kept_mass += prob[static_cast<size_t>(order[i])];
  double u = rng.Uniform() * kept_mass;
  for (size_t i = 0; i < keep; ++i) {
    u -= prob[static_cast<size_t>(order[i])];
    if (u < 0) return order[i];
  }
  return order[keep - 1];
}

const char* StopReasonName(StopReason reason) {
  switch (reason) {
    case StopReason::kMaxTokens:
      return "max tokens";
    case StopReason::kEos:
      return "eos";
    case StopReason::kContext:
      return "context full";
  }
  return "?";
}

absl::StatusOr<GenerateResult> GenerateTokens(const LlamaModel& model, std::vector<int32_t> prompt,
                                              const GenerateOptions& options, const TokenCallback& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (options.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  if (!(options.top_p > 0 && options.top_p <= 1)) {
    return absl::InvalidArgumentError(StrCat("top_p must be in (0, 1], got ", options.top_p));
  }
  if (options.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  const ModelConfig& config = model.config();
  if (options.sampled_ids < 0) return absl::InvalidArgumentError("sampled_ids must be >= 0");
  const int64_t sampled =
      options.sampled_ids > 0 ? std::min(options.sampled_ids, config.vocab_size) : config.vocab_size;
  GenerateResult result;
  result.prompt_tokens = prompt;
  // A learned position table ends: the last token needs no forward, so it may take the position after it.
  const auto prompt_length = static_cast<int64_t>(prompt.size());
  const int64_t room = config.positions == PositionKind::kLearned
                           ? std::max<int64_t>(0, config.max_position_embeddings - prompt_length + 1)
                           : options.max_new_tokens;
  const int64_t max_new = std::min(options.max_new_tokens, room);
  if (max_new < options.max_new_tokens) result.stop = StopReason::kContext;
  const int64_t total = prompt_length + max_new;
  KvCache cache(config, 1, std::max<int64_t>(total, 1));
  Rng rng(options.seed, rng_stream::kSampling);

  auto t0 = std::chrono::steady_clock::now();
  const at::Tensor prompt_tensor =
      at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).view({1, -1});
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor logits,
                            model.ForwardCached(prompt_tensor, cache, /*last_only=*/true, options.forward));
  result.prefill_seconds = SecondsSince(t0);
  t0 = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < max_new; ++step) {
    const int64_t next = SampleToken(logits[0][0].narrow(0, 0, sampled), options, rng);
    result.tokens.push_back(static_cast<int32_t>(next));
    const auto& eos = config.eos_token_ids;
    const bool at_eos = options.stop_at_eos && std::find(eos.begin(), eos.end(), next) != eos.end();
    const bool last = at_eos || step + 1 == max_new;
    if (on_token) SEEDLING_RETURN_IF_ERROR(on_token(result.tokens, last));
    if (at_eos) result.stop = StopReason::kEos;
    if (last) break;
    const at::Tensor next_tensor = at::full({1, 1}, next, at::kLong);
    SEEDLING_ASSIGN_OR_RETURN(logits, model.ForwardCached(next_tensor, cache, /*last_only=*/true, options.forward));
  }
  result.decode_seconds = SecondsSince(t0);
  return result;
}

absl::StatusOr<GenerateResult> Generate(const LlamaModel& model, const Tokenizer& tokenizer, std::string_view prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text) {
  SEEDLING_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(prompt, /*add_special_tokens=*/true));
  if (ids.empty()) return absl::InvalidArgumentError("the prompt encodes to no tokens");
  for (int32_t id : ids) {
    if (id >= model.config().vocab_size) {
      return absl::InvalidArgumentError(StrCat("the tokenizer produced id ", id, " but the model's vocabulary has ",
                                               model.config().vocab_size, " entries"));
    }
  }
  GenerateOptions decodable = options;
  if (decodable.sampled_ids == 0 && tokenizer.vocab_size() < model.config().vocab_size) {
    decodable.sampled_ids = tokenizer.vocab_size();
  }
  // Streaming: decode the growing output after each token and hand over the new complete UTF-8 text.
  size_t emitted = 0;
  TokenCallback stream = [&](const std::vector<int32_t>& generated, bool last) -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(std::string text, tokenizer.Decode(generated, /*skip_special_tokens=*/true));
    const size_t complete = last ? text.size() : CompleteUtf8Prefix(text);
    if (complete > emitted) {
      on_text(std::string_view(text).substr(emitted, complete - emitted));
      emitted = complete;
    }
    return absl::OkStatus();
  };
  SEEDLING_ASSIGN_OR_RETURN(GenerateResult result,
                            GenerateTokens(model, std::move(ids), decodable, on_text ? stream : TokenCallback()));
  SEEDLING_ASSIGN_OR_RETURN(result.text, tokenizer.Decode(result.tokens, /*skip_special_tokens=*/true));
  return result;
}

}  // namespace seedling::model
