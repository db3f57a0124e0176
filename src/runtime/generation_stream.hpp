// One generation's token-by-token bookkeeping, shared by Engine::generate and the BatchGenerator so that both end and
// stream a generation the same way: its Sampler (the request's random stream), stop token ids (the request's and the
// model's EOS) and max_tokens, stop strings over the UTF-8-safe detokenized stream, and the text callback.
#pragma once

#include "runtime/sampler.hpp"
#include "runtime/stop_condition.hpp"
#include "tokenizer/bpe_tokenizer.hpp"
#include "tokenizer/streaming_decoder.hpp"

#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids, the stop token included when one ended the generation
  std::string text;             // the streamed text (stop string removed)
  FinishReason finish = FinishReason::Length;
  int64_t prompt_tokens = 0;      // tokens of the prompt
  int64_t prefilled_tokens = 0;   // of those, run this time (the rest were reused from the previous call)
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Called with each piece of text as soon as it is final (complete UTF-8, not part of a stop string).
using TextCallback = std::function<void(std::string_view text)>;

class GenerationStream {
 public:
  // Throws dsv4::Error for parameters out of range (validate) or an empty stop string. Borrows the tokenizer.
  GenerationStream(const Tokenizer& tokenizer, const SamplingParams& params, std::span<const int32_t> eos_ids,
                   int32_t vocab_size, TextCallback on_text);

  Sampler& sampler() { return sampler_; }
  const std::vector<int32_t>& tokens() const { return result_.tokens; }
  GenerationResult& result() { return result_; }

  // Takes the next generated token: its text goes to the callback (a stop token shows none), and the reason the
  // generation ends with it, if it does (stop token, stop string, max_tokens). Exceptions of the callback pass
  // through.
  std::optional<FinishReason> push(int32_t token);
  // Ends the generation for `reason`: the held-back text is final now (a stop string completed by the decoder's
  // last bytes turns the reason into Stop). Sets result().finish.
  void finish(FinishReason reason);

 private:
  void emit(const std::string& text);

  std::vector<int32_t> stop_ids_;  // sorted: the request's stop token ids and the model's EOS ids
  StopCondition stop_;
  StopStringMatcher stop_strings_;
  StreamingDecoder decoder_;
  Sampler sampler_;
  TextCallback on_text_;
  GenerationResult result_;
};

}  // namespace dsv4
