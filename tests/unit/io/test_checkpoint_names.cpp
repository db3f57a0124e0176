#include "io/checkpoint_names.hpp"

#include <gtest/gtest.h>

using dsv4::canonicalize_tensor_name;
using dsv4::CanonicalName;
using dsv4::TensorRole;

namespace {
CanonicalName W(std::string name) { return {std::move(name), TensorRole::Weight}; }
CanonicalName S(std::string name) { return {std::move(name), TensorRole::BlockScale}; }
}  // namespace

TEST(CheckpointNames, ReleaseNamesAreCanonical) {
  for (const char* name :
       {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
        "layers.0.attn_norm.weight", "layers.0.hc_attn_fn", "layers.0.hc_ffn_scale", "layers.7.attn.wq_a.weight",
        "layers.7.attn.attn_sink", "layers.7.attn.compressor.ape", "layers.2.attn.indexer.compressor.norm.weight",
        "layers.2.attn.indexer.weights_proj.weight", "layers.3.ffn.gate.tid2eid", "layers.3.ffn.gate.bias",
        "layers.4.ffn.experts.255.w2.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head_fn"})
    EXPECT_EQ(canonicalize_tensor_name(name), W(name)) << name;
  EXPECT_EQ(canonicalize_tensor_name("layers.7.attn.wq_a.scale"), S("layers.7.attn.wq_a.weight"));
  EXPECT_EQ(canonicalize_tensor_name("layers.4.ffn.experts.12.w1.scale"), S("layers.4.ffn.experts.12.w1.weight"));
  EXPECT_EQ(canonicalize_tensor_name("mtp.0.h_proj.scale"), S("mtp.0.h_proj.weight"));
}

TEST(CheckpointNames, HuggingFaceFileNames) {
  EXPECT_EQ(canonicalize_tensor_name("model.embed_tokens.weight"), W("embed.weight"));
  EXPECT_EQ(canonicalize_tensor_name("lm_head.weight"), W("head.weight"));
  EXPECT_EQ(canonicalize_tensor_name("model.norm.weight"), W("norm.weight"));
  EXPECT_EQ(canonicalize_tensor_name("model.hc_head.hc_fn"), W("hc_head_fn"));
  EXPECT_EQ(canonicalize_tensor_name("model.hc_head.hc_scale"), W("hc_head_scale"));
  EXPECT_EQ(canonicalize_tensor_name("model.layers.5.attn.norm.weight"), W("layers.5.attn.kv_norm.weight"));
  EXPECT_EQ(canonicalize_tensor_name("model.layers.5.hc_attn_scale"), W("layers.5.hc_attn_scale"));
  EXPECT_EQ(canonicalize_tensor_name("model.layers.5.ffn.experts.3.w3.weight"), W("layers.5.ffn.experts.3.w3.weight"));
}

TEST(CheckpointNames, TransformersModuleNames) {
  const std::pair<const char*, const char*> cases[] = {
      {"model.layers.1.self_attn.q_a_proj.weight", "layers.1.attn.wq_a.weight"},
      {"model.layers.1.self_attn.q_a_norm.weight", "layers.1.attn.q_norm.weight"},
      {"model.layers.1.self_attn.q_b_proj.weight", "layers.1.attn.wq_b.weight"},
      {"model.layers.1.self_attn.kv_proj.weight", "layers.1.attn.wkv.weight"},
      {"model.layers.1.self_attn.kv_norm.weight", "layers.1.attn.kv_norm.weight"},
      {"model.layers.1.self_attn.o_a_proj.weight", "layers.1.attn.wo_a.weight"},
      {"model.layers.1.self_attn.o_b_proj.weight", "layers.1.attn.wo_b.weight"},
      {"model.layers.1.self_attn.sinks", "layers.1.attn.attn_sink"},
      {"model.layers.1.self_attn.compressor.kv_proj.weight", "layers.1.attn.compressor.wkv.weight"},
      {"model.layers.1.self_attn.compressor.gate_proj.weight", "layers.1.attn.compressor.wgate.weight"},
      {"model.layers.1.self_attn.compressor.position_bias", "layers.1.attn.compressor.ape"},
      {"model.layers.1.self_attn.compressor.kv_norm.weight", "layers.1.attn.compressor.norm.weight"},
      {"model.layers.2.self_attn.compressor.indexer.kv_proj.weight", "layers.2.attn.indexer.compressor.wkv.weight"},
      {"model.layers.2.self_attn.compressor.indexer.gate_proj.weight",
       "layers.2.attn.indexer.compressor.wgate.weight"},
      {"model.layers.2.self_attn.compressor.indexer.position_bias", "layers.2.attn.indexer.compressor.ape"},
      {"model.layers.2.self_attn.compressor.indexer.kv_norm.weight", "layers.2.attn.indexer.compressor.norm.weight"},
      {"model.layers.2.self_attn.compressor.indexer.q_b_proj.weight", "layers.2.attn.indexer.wq_b.weight"},
      {"model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight",
       "layers.2.attn.indexer.weights_proj.weight"},
      {"model.layers.1.input_layernorm.weight", "layers.1.attn_norm.weight"},
      {"model.layers.1.post_attention_layernorm.weight", "layers.1.ffn_norm.weight"},
      {"model.layers.1.attn_hc.fn", "layers.1.hc_attn_fn"},
      {"model.layers.1.attn_hc.base", "layers.1.hc_attn_base"},
      {"model.layers.1.attn_hc.scale", "layers.1.hc_attn_scale"},
      {"model.layers.1.ffn_hc.scale", "layers.1.hc_ffn_scale"},
      {"model.layers.1.mlp.gate.weight", "layers.1.ffn.gate.weight"},
      {"model.layers.1.mlp.gate.e_score_correction_bias", "layers.1.ffn.gate.bias"},
      {"model.layers.1.mlp.gate.tid2eid", "layers.1.ffn.gate.tid2eid"},
      {"model.layers.1.mlp.experts.gate_up_proj", "layers.1.ffn.experts.gate_up_proj"},
      {"model.layers.1.mlp.experts.down_proj", "layers.1.ffn.experts.down_proj"},
      {"model.layers.1.mlp.experts.7.gate_proj.weight", "layers.1.ffn.experts.7.w1.weight"},
      {"model.layers.1.mlp.experts.7.up_proj.weight", "layers.1.ffn.experts.7.w3.weight"},
      {"model.layers.1.mlp.experts.7.down_proj.weight", "layers.1.ffn.experts.7.w2.weight"},
      {"model.layers.1.mlp.shared_experts.gate_proj.weight", "layers.1.ffn.shared_experts.w1.weight"},
      {"model.layers.1.mlp.shared_experts.up_proj.weight", "layers.1.ffn.shared_experts.w3.weight"},
      {"model.layers.1.mlp.shared_experts.down_proj.weight", "layers.1.ffn.shared_experts.w2.weight"},
  };
  for (const auto& [stored, canonical] : cases) EXPECT_EQ(canonicalize_tensor_name(stored), W(canonical)) << stored;
}

TEST(CheckpointNames, ScaleRoles) {
  EXPECT_EQ(canonicalize_tensor_name("model.layers.1.self_attn.q_a_proj.weight_scale_inv"),
            S("layers.1.attn.wq_a.weight"));
  EXPECT_EQ(canonicalize_tensor_name("layers.3.ffn.experts.0.w1.weight_scale"),
            (CanonicalName{"layers.3.ffn.experts.0.w1.weight", TensorRole::Nvfp4Scale}));
  EXPECT_EQ(canonicalize_tensor_name("model.layers.3.mlp.experts.0.gate_proj.weight_scale_2"),
            (CanonicalName{"layers.3.ffn.experts.0.w1.weight", TensorRole::Nvfp4Global}));
  EXPECT_EQ(canonicalize_tensor_name("layers.3.ffn.experts.0.w2.input_scale"),
            (CanonicalName{"layers.3.ffn.experts.0.w2.weight", TensorRole::InputScale}));
}

TEST(CheckpointNames, UnknownNamesPassThrough) {
  EXPECT_EQ(canonicalize_tensor_name("model.rotary_emb.main_inv_freq"), W("rotary_emb.main_inv_freq"));
  EXPECT_EQ(canonicalize_tensor_name("layers.x.attn.wq_a.weight"), W("layers.x.attn.wq_a.weight"));
  EXPECT_EQ(canonicalize_tensor_name(""), W(""));
}
