#include "io/checkpoint_names.hpp"

#include <array>
#include <utility>

namespace dsv4 {

std::string_view to_string(TensorRole role) {
  switch (role) {
    case TensorRole::Weight: return "weight";
    case TensorRole::BlockScale: return "block scale";
    case TensorRole::Nvfp4Scale: return "nvfp4 scale";
    case TensorRole::Nvfp4Global: return "nvfp4 global scale";
    case TensorRole::InputScale: return "input scale";
  }
  return "unknown";
}

namespace {

using Rule = std::pair<std::string_view, std::string_view>;

// Whole-name renames outside the blocks.
constexpr std::array kTopLevel = {
    Rule{"embed_tokens.weight", "embed.weight"}, Rule{"lm_head.weight", "head.weight"},
    Rule{"hc_head.hc_fn", "hc_head_fn"},         Rule{"hc_head.hc_base", "hc_head_base"},
    Rule{"hc_head.hc_scale", "hc_head_scale"},
};

// Prefix rewrites inside a block ("layers.N." / "mtp.N." stripped), applied in order, each at most once.
// Module renames come first so the later rules only see DeepSeek's module names.
constexpr std::array kBlock = {
    Rule{"self_attn.", "attn."},
    Rule{"mlp.", "ffn."},
    Rule{"input_layernorm.", "attn_norm."},
    Rule{"post_attention_layernorm.", "ffn_norm."},
    Rule{"attn_hc.fn", "hc_attn_fn"},
    Rule{"attn_hc.base", "hc_attn_base"},
    Rule{"attn_hc.scale", "hc_attn_scale"},
    Rule{"ffn_hc.fn", "hc_ffn_fn"},
    Rule{"ffn_hc.base", "hc_ffn_base"},
    Rule{"ffn_hc.scale", "hc_ffn_scale"},
    // transformers nests the indexer inside the CSA compressor; DeepSeek keeps it beside it.
    Rule{"attn.compressor.indexer.", "attn.indexer."},
    Rule{"attn.indexer.q_b_proj.", "attn.indexer.wq_b."},
    Rule{"attn.indexer.scorer.weights_proj.", "attn.indexer.weights_proj."},
    Rule{"attn.indexer.kv_proj.", "attn.indexer.compressor.wkv."},
    Rule{"attn.indexer.gate_proj.", "attn.indexer.compressor.wgate."},
    Rule{"attn.indexer.position_bias", "attn.indexer.compressor.ape"},
    Rule{"attn.indexer.kv_norm.", "attn.indexer.compressor.norm."},
    Rule{"attn.compressor.kv_proj.", "attn.compressor.wkv."},
    Rule{"attn.compressor.gate_proj.", "attn.compressor.wgate."},
    Rule{"attn.compressor.position_bias", "attn.compressor.ape"},
    Rule{"attn.compressor.kv_norm.", "attn.compressor.norm."},
    Rule{"attn.q_a_proj.", "attn.wq_a."},
    Rule{"attn.q_a_norm.", "attn.q_norm."},
    Rule{"attn.q_b_proj.", "attn.wq_b."},
    Rule{"attn.kv_proj.", "attn.wkv."},
    Rule{"attn.norm.", "attn.kv_norm."},
    Rule{"attn.o_a_proj.", "attn.wo_a."},
    Rule{"attn.o_b_proj.", "attn.wo_b."},
    Rule{"attn.sinks", "attn.attn_sink"},
    Rule{"ffn.gate.e_score_correction_bias", "ffn.gate.bias"},
    Rule{"ffn.shared_experts.gate_proj.", "ffn.shared_experts.w1."},
    Rule{"ffn.shared_experts.up_proj.", "ffn.shared_experts.w3."},
    Rule{"ffn.shared_experts.down_proj.", "ffn.shared_experts.w2."},
};

// Per-expert HF spellings: "ffn.experts.<e>.gate_proj." -> "ffn.experts.<e>.w1." (the fused 3-D
// `experts.gate_up_proj` / `experts.down_proj` keep their names; the loader splits them).
constexpr std::array kExpert = {
    Rule{"gate_proj.", "w1."},
    Rule{"up_proj.", "w3."},
    Rule{"down_proj.", "w2."},
};

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Length of a "layers.N." / "mtp.N." prefix, or 0.
size_t block_prefix_length(std::string_view name) {
  for (std::string_view head : {std::string_view("layers."), std::string_view("mtp.")}) {
    if (!name.starts_with(head)) continue;
    size_t i = head.size();
    size_t digits = 0;
    while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i, ++digits;
    if (digits > 0 && i < name.size() && name[i] == '.') return i + 1;
  }
  return 0;
}

std::string rewrite_block(std::string rest) {
  for (const auto& [from, to] : kBlock)
    if (rest.starts_with(from)) rest = std::string(to) + rest.substr(from.size());
  constexpr std::string_view experts = "ffn.experts.";
  if (rest.starts_with(experts)) {
    size_t dot = rest.find('.', experts.size());
    if (dot != std::string::npos && dot > experts.size()) {
      std::string tail = rest.substr(dot + 1);
      for (const auto& [from, to] : kExpert)
        if (tail.starts_with(from)) {
          rest = rest.substr(0, dot + 1) + std::string(to) + tail.substr(from.size());
          break;
        }
    }
  }
  return rest;
}

}  // namespace

CanonicalName canonicalize_tensor_name(std::string_view stored_name) {
  std::string name(stored_name);
  if (name.starts_with("model.")) name.erase(0, 6);

  CanonicalName out;
  // The role is read off the suffix before renaming: `.weight_scale_2` must not be taken for `.weight_scale`.
  struct Suffix {
    std::string_view suffix;
    TensorRole role;
  };
  for (const Suffix& s : {Suffix{".weight_scale_inv", TensorRole::BlockScale},
                          Suffix{".weight_scale_2", TensorRole::Nvfp4Global},
                          Suffix{".weight_scale", TensorRole::Nvfp4Scale},
                          Suffix{".input_scale", TensorRole::InputScale}}) {
    if (ends_with(name, s.suffix)) {
      name = name.substr(0, name.size() - s.suffix.size()) + ".weight";
      out.role = s.role;
      break;
    }
  }

  for (const auto& [from, to] : kTopLevel)
    if (name == from) name = to;

  if (size_t prefix = block_prefix_length(name)) name = name.substr(0, prefix) + rewrite_block(name.substr(prefix));

  // DeepSeek's release spells block scales `<module>.scale` beside `<module>.weight`. The only other names that
  // end in "scale" are the mHC parameters, which the rules above turned into `hc_*_scale` (no dot before).
  if (out.role == TensorRole::Weight && ends_with(name, ".scale")) {
    name = name.substr(0, name.size() - 6) + ".weight";
    out.role = TensorRole::BlockScale;
  }
  out.weight = std::move(name);
  return out;
}

}  // namespace dsv4
