// Maps the tensor names of every checkpoint layout we accept onto one canonical spelling: DeepSeek's release names
// (dsv4-model.md §6.1). Layouts: the DeepSeek release; HuggingFace transformers' files (`model.` prefix,
// `embed_tokens`, `hc_head.hc_fn`, `attn.norm`); transformers' in-memory module names that older or third-party
// exports use (`self_attn.q_a_proj`, `mlp.experts.gate_up_proj`, `e_score_correction_bias`, `weight_scale_inv`);
// NVIDIA ModelOpt NVFP4 exports (`weight_scale` e4m3 per 16, `weight_scale_2`, `input_scale`).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace dsv4 {

// What a stored tensor is to the weight it belongs to.
enum class TensorRole {
  Weight,          // the values (any dtype)
  BlockScale,      // fp8 128x128 / MXFP4 1x32 scales: `.scale` (release) or `.weight_scale_inv`
  Nvfp4Scale,      // ModelOpt `.weight_scale`: e4m3 per 16 values along K
  Nvfp4Global,     // ModelOpt `.weight_scale_2`: fp32 scalar
  InputScale,      // ModelOpt `.input_scale`: activation calibration, unused by a weight-only engine
};

std::string_view to_string(TensorRole role);

struct CanonicalName {
  std::string weight;  // canonical name of the weight this tensor belongs to, e.g. "layers.3.attn.wq_a.weight"
  TensorRole role = TensorRole::Weight;
  bool operator==(const CanonicalName&) const = default;
};

// The canonical name and role of a stored tensor name. Names outside the model (e.g. rotary caches) come back
// unchanged with role Weight; the loader reports whatever fills no slot as unexpected.
CanonicalName canonicalize_tensor_name(std::string_view stored_name);

}  // namespace dsv4
