"""DeepSeek-V4 checkpoints in DeepSeek's release layout, written from HuggingFace transformers tensors.

Shared by scripts/make_golden.py (random fixtures) and scripts/train_tiny.py (the trained tiny model):
  release names and storage rules     fp8 e4m3 + e8m0 128x128 blocks, packed e2m1 + e8m0/32 experts, bf16, fp32
  quantizers (torch, any device)      exact DeepSeek scale rules; each returns the dequantized tensor too
  an independent numpy decoder        to prove the written bytes decode to those dequantized tensors
  NVFP4 (ModelOpt) re-encoding        of the MXFP4 experts, exact scale rewrite, with its own decoder
  config.json in release spelling, sharded safetensors + index, hf_quant_config.json
  HF evaluation helpers               dequantized weights through HF's loader; indexer/router top-k margins
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek release layout: names, dtypes, quantization


FP8_BLOCK = 128
FP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

RELEASE_RULES = (  # (pattern on the release name, storage)
    (r"^layers\.\d+\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$", "fp8"),
    (r"^layers\.\d+\.attn\.indexer\.wq_b\.weight$", "fp8"),
    (r"^layers\.\d+\.ffn\.shared_experts\.w[123]\.weight$", "fp8"),
    (r"^layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$", "fp4"),
    (r"^(embed|head|norm)\.weight$", "bf16"),
    (r"^layers\.\d+\.(attn_norm|ffn_norm)\.weight$", "bf16"),
    (r"^layers\.\d+\.attn\.(q_norm|kv_norm)\.weight$", "bf16"),
    (r"^layers\.\d+\.attn\.(indexer\.)?compressor\.(wkv|wgate|norm)\.weight$", "bf16"),
    (r"^layers\.\d+\.attn\.indexer\.weights_proj\.weight$", "bf16"),
    (r"^layers\.\d+\.ffn\.gate\.weight$", "bf16"),
    (r"^hc_head_(fn|base|scale)$", "fp32"),
    (r"^layers\.\d+\.hc_(attn|ffn)_(fn|base|scale)$", "fp32"),
    (r"^layers\.\d+\.attn\.attn_sink$", "fp32"),
    (r"^layers\.\d+\.attn\.(indexer\.)?compressor\.ape$", "fp32"),
    (r"^layers\.\d+\.ffn\.gate\.bias$", "fp32"),
    (r"^layers\.\d+\.ffn\.gate\.tid2eid$", "int64"),
)


def release_name(hf_name: str) -> str:
    """HF save_pretrained name -> DeepSeek release name (dsv4-model.md section 6.2 lists the differences)."""
    special = {
        "head.weight": "head.weight",
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "model.hc_head.hc_fn": "hc_head_fn",
        "model.hc_head.hc_base": "hc_head_base",
        "model.hc_head.hc_scale": "hc_head_scale",
    }
    if hf_name in special:
        return special[hf_name]
    if not hf_name.startswith("model."):
        raise SystemExit(f"release layout: unexpected HF tensor name {hf_name}")
    name = hf_name[len("model.") :]
    return re.sub(r"^(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight", name)


def storage_of(name: str) -> str:
    matches = [storage for pattern, storage in RELEASE_RULES if re.match(pattern, name)]
    if len(matches) != 1:
        raise SystemExit(f"release layout: {len(matches)} storage rules match {name}")
    return matches[0]


def pow2_ceil_exponent(values: torch.Tensor) -> torch.Tensor:
    """ceil(log2(v)) for positive fp32 v, exact (from the binary exponent, as DeepSeek's kernels do)."""
    mantissa, exponent = torch.frexp(values)  # v = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def quantize_fp8_blocks(weight: torch.Tensor):
    """fp8 e4m3 with one e8m0 scale per 128x128 block: s = 2^ceil(log2(max(amax, 1e-4) / 448))."""
    rows, cols = weight.shape
    block_rows, block_cols = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    padded = torch.zeros(block_rows * FP8_BLOCK, block_cols * FP8_BLOCK, device=weight.device)
    padded[:rows, :cols] = weight
    blocks = padded.view(block_rows, FP8_BLOCK, block_cols, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    exponent = pow2_ceil_exponent(torch.clamp(amax, min=1e-4) / 448.0)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    codes = torch.clamp(weight / expanded, -448.0, 448.0).to(torch.float8_e4m3fn)
    scale_bytes = (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return codes, scale_bytes, codes.to(torch.float32) * expanded


def quantize_fp4_rows(weight: torch.Tensor):
    """e2m1 packed two per byte along K (low nibble = even element), one e8m0 scale per 32 along K:
    s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)), value rounded to nearest, ties to the even code."""
    rows, cols = weight.shape
    if cols % FP4_BLOCK:
        raise SystemExit(f"fp4 experts need K % 32 == 0, got {tuple(weight.shape)}")
    blocks = weight.view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    amax = blocks.abs().amax(dim=2)
    exponent = pow2_ceil_exponent(torch.clamp(amax, min=6.0 * 2.0**-126) / 6.0)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    scaled = (blocks / scale.unsqueeze(-1)).reshape(rows, cols)
    magnitude = scaled.abs()
    # Midpoints between neighbouring e2m1 magnitudes; at a tie the even code wins, which is the upper
    # neighbour exactly when the lower code is odd (0.75, 1.75, 3.5).
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=weight.device)
    ties_round_up = torch.tensor([False, True, False, True, False, True, False], device=weight.device)
    above = magnitude.unsqueeze(-1) > midpoints
    tie_up = (magnitude.unsqueeze(-1) == midpoints) & ties_round_up
    code = (above | tie_up).sum(dim=-1).to(torch.uint8)
    code = code | (scaled < 0).to(torch.uint8) << 3
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    table = torch.tensor(E2M1_VALUES, device=weight.device)
    value = table[(code & 7).long()] * torch.where(code >= 8, -1.0, 1.0)
    dequantized = (value.view(rows, cols // FP4_BLOCK, FP4_BLOCK) * scale.unsqueeze(-1)).reshape(rows, cols)
    scale_bytes = (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed, scale_bytes, dequantized


def to_release(hf_tensors: dict[str, torch.Tensor]):
    """Return (release tensors, dequantized HF tensors, per-storage counts)."""
    release, dequantized, counts = {}, {}, {}
    for hf_name in sorted(hf_tensors):
        tensor = hf_tensors[hf_name]
        name = release_name(hf_name)
        storage = storage_of(name)
        counts[storage] = counts.get(storage, 0) + 1
        if storage == "fp8":
            codes, scale, dequantized[hf_name] = quantize_fp8_blocks(tensor)
            release[name], release[name[: -len("weight")] + "scale"] = codes, scale
        elif storage == "fp4":
            packed, scale, dequantized[hf_name] = quantize_fp4_rows(tensor)
            release[name], release[name[: -len("weight")] + "scale"] = packed, scale
        elif storage == "bf16":
            release[name] = tensor.to(torch.bfloat16)
            dequantized[hf_name] = release[name].to(torch.float32)
        else:  # fp32 and int64 stay as they are
            release[name] = tensor.clone()
            dequantized[hf_name] = tensor.clone()
    return release, dequantized, counts


def decode_release_tensor(release: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """Independent decoder working on raw bytes (numpy), to check the packing written by to_release (and, for the
    routed experts, by to_nvfp4_experts)."""
    tensor = release[name]
    if name[: -len("weight")] + "weight_scale_2" in release:
        return decode_nvfp4_tensor(release, name)
    storage = storage_of(name)
    if storage in ("fp32", "int64"):
        return tensor.numpy().astype(np.float64)
    if storage == "bf16":
        bits = tensor.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
        return (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    scale_bytes = release[name[: -len("weight")] + "scale"].view(torch.uint8).numpy().astype(np.int64)
    scale = np.ldexp(1.0, scale_bytes - 127)
    if storage == "fp8":
        raw = tensor.view(torch.uint8).numpy().astype(np.int64)
        sign = np.where(raw >> 7, -1.0, 1.0)
        exponent, mantissa = (raw >> 3) & 15, raw & 7
        value = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1.0 + mantissa / 8.0) * np.ldexp(1.0, exponent - 7))
        rows, cols = raw.shape
        full_scale = np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]
        return sign * value * full_scale
    raw = tensor.view(torch.uint8).numpy().astype(np.int64)
    codes = np.empty((raw.shape[0], raw.shape[1] * 2), dtype=np.int64)
    codes[:, 0::2], codes[:, 1::2] = raw & 15, raw >> 4
    value = np.asarray(E2M1_VALUES)[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    return value * np.repeat(scale, FP4_BLOCK, 1)


def release_config(config: DeepseekV4Config) -> dict:
    """config.json in the spelling of DeepSeek's release (dsv4-model.md section 1)."""
    compress = config.rope_parameters["compress"]
    ratio_of_kind = {SWA: 0, CSA: config.compress_rates[CSA], HCA: config.compress_rates[HCA]}
    num_hash_layers = sum(1 for kind in config.mlp_layer_types if kind == "hash_moe")
    if config.mlp_layer_types != ["hash_moe"] * num_hash_layers + ["moe"] * (config.num_hidden_layers - num_hash_layers):
        raise SystemExit("release layout: hash MoE layers must come first to be expressed as num_hash_layers")
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "q_lora_rank": config.q_lora_rank,
        "o_groups": config.o_groups,
        "o_lora_rank": config.o_lora_rank,
        "sliding_window": config.sliding_window,
        "compress_ratios": [ratio_of_kind[kind] for kind in config.layer_types],
        "rope_theta": config.rope_parameters["main"]["rope_theta"],
        "compress_rope_theta": compress["rope_theta"],
        "rope_scaling": {
            "type": "yarn",
            "factor": compress["factor"],
            "original_max_position_embeddings": compress["original_max_position_embeddings"],
            "beta_fast": compress["beta_fast"],
            "beta_slow": compress["beta_slow"],
        },
        "max_position_embeddings": config.max_position_embeddings,
        "index_n_heads": config.index_n_heads,
        "index_head_dim": config.index_head_dim,
        "index_topk": config.index_topk,
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "n_shared_experts": config.n_shared_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hash_layers": num_hash_layers,
        "scoring_func": config.scoring_func,
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "swiglu_limit": config.swiglu_limit,
        "hidden_act": config.hidden_act,
        "hc_mult": config.hc_mult,
        "hc_sinkhorn_iters": config.hc_sinkhorn_iters,
        "hc_eps": config.hc_eps,
        "rms_norm_eps": config.rms_norm_eps,
        "num_nextn_predict_layers": 0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "scale_fmt": "ue8m0",
        },
        "expert_dtype": "fp4",
    }


def write_release_shards(release: dict[str, torch.Tensor], num_layers: int, directory: Path) -> None:
    """Two shards (globals and the first half of the layers, then the rest) plus model.safetensors.index.json."""

    def shard_of(name: str) -> int:
        layer = re.match(r"^layers\.(\d+)\.", name)
        return 2 if layer and int(layer.group(1)) >= (num_layers + 1) // 2 else 1

    shard_names = {index: f"model-0000{index}-of-00002.safetensors" for index in (1, 2)}
    weight_map, total_size = {}, 0
    for index, file_name in shard_names.items():
        tensors = {name: tensor.contiguous() for name, tensor in release.items() if shard_of(name) == index}
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
    index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / "model.safetensors.index.json", index_json)



def read_shards(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file_name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / file_name))
    return tensors


def check_shards_decode(directory: Path, written: dict[str, torch.Tensor], dequantized: dict[str, torch.Tensor]):
    """Read the shards back and decode them independently: the result must be the dequantized weights, bit for bit."""
    reread = read_shards(directory)
    if set(reread) != set(written):
        raise SystemExit(f"{directory.name}: shards hold {sorted(set(reread) ^ set(written))} unexpectedly")
    for hf_name, expected in dequantized.items():
        decoded = decode_release_tensor(reread, release_name(hf_name))
        if not np.array_equal(decoded, expected.numpy().astype(np.float64)):
            raise SystemExit(f"{directory.name}: {release_name(hf_name)} does not decode to its dequantized value")


# ---------------------------------------------------------------------------------------------------------------
# NVFP4 (NVIDIA ModelOpt) routed experts: the same e2m1 payload, scales rewritten exactly

NVFP4_BLOCK = 16
E4M3_POWERS_OF_TWO = range(-9, 9)  # 2^-9 (smallest subnormal) .. 2^8 are exact e4m3 values


def mxfp4_to_nvfp4(packed: torch.Tensor, e8m0_scale: torch.Tensor, name: str):
    """One MXFP4 expert matrix -> (U8 payload, F8_E4M3 weight_scale [N, K/16], F32 weight_scale_2).

    Each 32-block's 2^e becomes two 16-block e4m3 scales 2^(e - G) under the global 2^G, so the values do not
    change. G is the highest exponent that places every non-zero block's scale within e4m3's powers of two; a
    matrix whose non-zero block scales span more than those 18 powers cannot be rewritten exactly and is refused.
    """
    exponent = e8m0_scale.view(torch.uint8).to(torch.int64) - 127  # [N, K/32]
    nonzero = (packed.view(torch.uint8).view(packed.shape[0], -1, FP4_BLOCK // 2) & 0x77).amax(dim=2) > 0
    used = exponent[nonzero]
    global_exponent = int(used.max()) - E4M3_POWERS_OF_TWO[-1] if used.numel() else 0
    if used.numel() and int(used.min()) - global_exponent < E4M3_POWERS_OF_TWO[0]:
        raise SystemExit(f"nvfp4: {name} has block scales 2^{int(used.min())} .. 2^{int(used.max())}, more than e4m3 "
                         f"holds under one global scale; the MXFP4 -> NVFP4 rewrite would not be exact")
    relative = torch.clamp(exponent - global_exponent, E4M3_POWERS_OF_TWO[0], E4M3_POWERS_OF_TWO[-1])
    block_scale = torch.ldexp(torch.ones(relative.shape), relative).to(torch.float8_e4m3fn)
    block_scale = block_scale.repeat_interleave(FP4_BLOCK // NVFP4_BLOCK, dim=1)
    global_scale = torch.tensor(math.ldexp(1.0, global_exponent), dtype=torch.float32)
    return packed.view(torch.uint8).clone(), block_scale, global_scale


def to_nvfp4_experts(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release tensors with every routed expert re-encoded as ModelOpt NVFP4 (.weight U8, .weight_scale,
    .weight_scale_2); everything else unchanged."""
    out = {}
    for name, tensor in release.items():
        if name.endswith(".scale") and storage_of(name[: -len("scale")] + "weight") == "fp4":
            continue
        if name.endswith(".weight") and storage_of(name) == "fp4":
            base = name[: -len("weight")]
            out[name], out[base + "weight_scale"], out[base + "weight_scale_2"] = mxfp4_to_nvfp4(
                tensor, release[base + "scale"], name)
        else:
            out[name] = tensor
    return out


def decode_nvfp4_tensor(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """e2m1 (low nibble = even element) * e4m3 weight_scale per 16 * weight_scale_2, decoded from raw bytes."""
    base = name[: -len("weight")]
    raw = tensors[name].view(torch.uint8).numpy().astype(np.int64)
    codes = np.empty((raw.shape[0], raw.shape[1] * 2), dtype=np.int64)
    codes[:, 0::2], codes[:, 1::2] = raw & 15, raw >> 4
    value = np.asarray(E2M1_VALUES)[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    scale_bits = tensors[base + "weight_scale"].view(torch.uint8).numpy().astype(np.int64)
    exponent, mantissa = (scale_bits >> 3) & 15, scale_bits & 7
    block_scale = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6,
                           (1.0 + mantissa / 8.0) * np.ldexp(1.0, exponent - 7))
    global_scale = float(tensors[base + "weight_scale_2"])
    return value * np.repeat(block_scale, NVFP4_BLOCK, 1) * global_scale


def nvfp4_quant_config() -> dict:
    """hf_quant_config.json as ModelOpt writes it for an NVFP4 export (16-wide blocks)."""
    return {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": NVFP4_BLOCK}}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation through HuggingFace transformers


def load_dequantized_model(config_dir: Path, dequantized: dict[str, torch.Tensor], scratch: Path):
    """Load the dequantized weights through HF's own loader (same path as the fp32 fixture)."""
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", scratch / "config.json")
    save_file({name: tensor.contiguous() for name, tensor in dequantized.items()}, scratch / "model.safetensors",
              metadata={"format": "pt"})
    return DeepseekV4ForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__}


class MarginProbe:
    """Smallest relative gap between the k-th and (k+1)-th candidate over every indexer query and scored MoE token.

    Only valid for a one-shot prefill from position 0 (query s sits at position s).
    """

    def __init__(self, model: DeepseekV4ForCausalLM):
        self.config = model.config
        self.indexer_margin = math.inf
        self.indexer_truncated_queries = 0
        self.router_margin = math.inf
        self.handles = []
        for module in model.modules():
            if isinstance(module, hf_v4.DeepseekV4IndexerScorer):
                self.handles.append(module.register_forward_hook(self._on_indexer_scores))
            elif isinstance(module, hf_v4.DeepseekV4TopKRouter):
                self.handles.append(module.register_forward_hook(self._on_router))

    def close(self):
        for handle in self.handles:
            handle.remove()

    def _on_indexer_scores(self, module, inputs, scores):
        ratio = self.config.compress_rates[CSA]
        k = self.config.index_topk
        scores = scores[0].double()  # [S, T]
        for query in range(scores.shape[0]):
            visible = (query + 1) // ratio
            if visible <= k:
                continue
            ranked = torch.sort(scores[query, :visible], descending=True).values
            scale = ranked.abs().max().item()
            self.indexer_margin = min(self.indexer_margin, (ranked[k - 1] - ranked[k]).item() / scale)
            self.indexer_truncated_queries += 1

    def _on_router(self, module, inputs, output):
        flat = inputs[0].reshape(-1, module.hidden_dim)
        selection = (module.score_fn(F.linear(flat, module.weight)) + module.e_score_correction_bias).double()
        ranked = torch.sort(selection, dim=-1, descending=True).values
        gaps = (ranked[:, module.top_k - 1] - ranked[:, module.top_k]) / ranked.abs().max(dim=-1).values
        self.router_margin = min(self.router_margin, gaps.min().item())


def one_shot_logits(model, tokens: list[int], probe_margins: bool = False):
    probe = MarginProbe(model) if probe_margins else None
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    finally:
        if probe:
            probe.close()
    return logits, probe

