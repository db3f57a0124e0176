#!/usr/bin/env python3
"""Golden DeepSeek-V4 logits from HuggingFace transformers, for the engine's end-to-end tests.

Builds tiny random `DeepseekV4ForCausalLM` models in fp32 (every parameter and persistent buffer randomised,
including the ones transformers initialises to 0 or 1), and writes per fixture tests/golden/<name>/:
  config.json, model.safetensors   exactly as `save_pretrained` writes them (HF spelling and tensor names)
  tokens.json                      input ids of each case and which positions its logits file holds
  logits_<case>.npy                float32 [positions, vocab], one-shot prefill from position 0
  meta.json                        seed, versions, coverage, indexer/router margins, HF cached-path differences
With --release-layout also tests/golden/<name>-release/: the same weights in DeepSeek's release layout (fp8 e4m3 +
e8m0 128x128 block scales, packed e2m1 + e8m0/32 experts, bf16/fp32 elsewhere, two shards + index) and logits that
HF computes on the *dequantized* weights, so an engine loading the quantized files must match them exactly.

Pinned environment (CPU only; other versions may change the last bits):
  pip install torch==2.11.0 transformers==5.17.0 safetensors==0.8.0 numpy==2.4.6
Usage:
  python3 scripts/make_golden.py --release-layout            # (re)write tests/golden/
  python3 scripts/make_golden.py --release-layout --check    # regenerate in a temp dir, compare bytes, write nothing
Options: --out DIR (default tests/golden), --only NAME (repeatable).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "golden"

# A top-k whose k-th and (k+1)-th candidates are closer than this (relative to the largest |score| of that query)
# is ambiguous: another fp32 implementation may legitimately pick the other one. Seeds that produce such a query
# in the indexer or in a scored MoE router are rejected.
MIN_RELATIVE_MARGIN = 1e-4
MAX_SEED_ATTEMPTS = 400

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
RATIO_OF_KIND = {SWA: 0, CSA: 4}  # HCA's ratio comes from the fixture's compress_rates


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    name: str
    seed_base: int
    covers: tuple[str, ...]
    config: dict
    lengths: tuple[int, ...]  # one-shot prefill cases, all prefixes of one random token sequence
    release_lengths: tuple[int, ...]  # the subset recorded again for the release layout
    prefill_before_decode: int  # HF cached path: prefill this many tokens, then decode one by one
    chunk_sizes: tuple[int, ...]  # HF cached path: chunked prefill, sizes cycled


def common_config(**overrides) -> dict:
    config = dict(
        vocab_size=512,
        hidden_size=64,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        partial_rotary_factor=0.25,  # 16 rope dims of 64, as 64 of 512 in the real models
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        index_n_heads=8,
        index_head_dim=32,
        num_nextn_predict_layers=0,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    # As in the real models (65536 * 16 = 1M): the YaRN factor is the ratio of the two context lengths.
    yarn = config["rope_parameters"]
    config["max_position_embeddings"] = int(yarn["factor"] * yarn["original_max_position_embeddings"])
    return config


FIXTURES = (
    FixtureSpec(
        name="flash_like",
        seed_base=1000,
        covers=(
            "V4-Flash layer order: SWA first, then CSA/HCA alternating",
            "hash MoE (layers 0-1) and scored MoE with gate bias (layers 2-3)",
            "sliding window 16 wrapped (sequences up to 300)",
            "CSA compressor (ratio 4, overlapping) and HCA compressor with non-default ratio 16",
            "compressor boundaries: lengths 4, 5, 16, 17",
            "indexer top-k truncation: index_topk 8 of up to 75 visible entries, 16 indexer heads",
            "YaRN on compressed layers (factor 8, original 512, compress_rope_theta 40000)",
        ),
        config=common_config(
            num_hidden_layers=4,
            index_n_heads=16,
            layer_types=[SWA, CSA, HCA, CSA],
            mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
            compress_rates={CSA: 4, HCA: 16},
            sliding_window=16,
            index_topk=8,
            compress_rope_theta=40000.0,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 512,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        ),
        lengths=(1, 4, 5, 16, 17, 64, 300),
        release_lengths=(1, 17, 300),
        prefill_before_decode=21,
        chunk_sizes=(7, 1, 13, 4, 32),
    ),
    FixtureSpec(
        name="pro_like",
        seed_base=2000,
        covers=(
            "V4-Pro layer order: HCA first, CSA in between",
            "3 hash MoE layers, 1 scored; 6 experts, top-3; routed_scaling_factor 2.5",
            "swiglu_limit 1.0 (clamps active), hc_sinkhorn_iters 7",
            "8 heads in 4 output groups: wo_a has 2 fp8 column blocks, wq_b 4 row blocks",
            "sliding window 8 wrapped; HCA ratio 8; compressor boundaries: lengths 8, 9",
            "indexer top-k truncation: index_topk 4 of up to 65 visible entries, 12 indexer heads",
            "YaRN on compressed layers (factor 4, original 256, beta 16/2, compress_rope_theta 160000)",
        ),
        config=common_config(
            num_hidden_layers=4,
            num_attention_heads=8,
            o_groups=4,
            n_routed_experts=6,
            num_experts_per_tok=3,
            routed_scaling_factor=2.5,
            swiglu_limit=1.0,
            hc_sinkhorn_iters=7,
            index_n_heads=12,
            layer_types=[HCA, HCA, CSA, HCA],
            mlp_layer_types=["hash_moe", "hash_moe", "hash_moe", "moe"],
            compress_rates={CSA: 4, HCA: 8},
            sliding_window=8,
            index_topk=4,
            compress_rope_theta=160000.0,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 16,
                "beta_slow": 2,
            },
        ),
        lengths=(1, 3, 8, 9, 33, 260),
        release_lengths=(1, 9, 260),
        prefill_before_decode=10,
        chunk_sizes=(5, 16, 1, 3),
    ),
    FixtureSpec(
        name="odd_sizes",
        seed_base=3000,
        covers=(
            "hidden 96, 3 heads in 1 output group, q_lora 48: fp8 blocks partial in both dimensions",
            "SWA, HCA (non-default ratio 32), CSA; hash MoE then scored MoE",
            "swiglu_limit 2.5, routed_scaling_factor 1.0",
            "sliding window 8 wrapped; compressor boundaries: lengths 31, 32, 33",
            "indexer top-k truncation: index_topk 6 of up to 50 visible entries, 16 indexer heads",
            "YaRN on compressed layers (factor 16, original 1024, compress_rope_theta 20000)",
        ),
        config=common_config(
            num_hidden_layers=3,
            hidden_size=96,
            num_attention_heads=3,
            o_groups=1,
            o_lora_rank=24,
            q_lora_rank=48,
            routed_scaling_factor=1.0,
            swiglu_limit=2.5,
            index_n_heads=16,
            layer_types=[SWA, HCA, CSA],
            mlp_layer_types=["hash_moe", "moe", "moe"],
            compress_rates={CSA: 4, HCA: 32},
            sliding_window=8,
            index_topk=6,
            compress_rope_theta=20000.0,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        ),
        lengths=(2, 31, 32, 33, 200),
        release_lengths=(2, 33, 200),
        prefill_before_decode=30,
        chunk_sizes=(3, 29, 1, 8),
    ),
)


def positions_to_record(length: int) -> list[int]:
    """Every position for short cases; for long ones every 7th (a stride coprime with every compress ratio, so all
    window phases are sampled) plus the last 32, to keep the files small."""
    if length <= 64:
        return list(range(length))
    return sorted(set(range(0, length, 7)) | set(range(length - 32, length)))


# ---------------------------------------------------------------------------------------------------------------
# Random model


def randomize(model: DeepseekV4ForCausalLM, generator: torch.Generator) -> None:
    """Give every checkpoint tensor random values whose scales keep activations O(1).

    Transformers initialises norm weights, sinks, compressor position biases, mHC base/scale, the gate bias and
    tid2eid to ones or zeros, which would hide bugs, so nothing keeps its library value. Linear weights get std
    1/sqrt(fan_in). A tensor without a rule is an error, so new checkpoint tensors cannot slip through unrandomised.
    """
    config = model.config

    def normal(shape, std):
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    def uniform(shape, low, high):
        return torch.rand(shape, generator=generator, dtype=torch.float32) * (high - low) + low

    state = model.state_dict()
    values = {}
    for name, tensor in state.items():
        shape = tuple(tensor.shape)
        if name == "model.embed_tokens.weight":
            values[name] = normal(shape, 1.0)
        elif name.endswith("mlp.gate.tid2eid"):
            rows = [torch.randperm(config.n_routed_experts, generator=generator)[: shape[1]] for _ in range(shape[0])]
            values[name] = torch.stack(rows).to(torch.int64)
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            values[name] = normal(shape, 0.3)
        elif name.endswith("mlp.gate.weight"):
            values[name] = normal(shape, 2.0 / math.sqrt(shape[1]))  # spread the routing scores
        elif name.endswith("experts.gate_up_proj"):
            values[name] = normal(shape, 1.0 / math.sqrt(shape[2]))
        elif name.endswith("experts.down_proj"):
            values[name] = normal(shape, 1.0 / math.sqrt(shape[2]))
        elif name.endswith("self_attn.sinks"):
            values[name] = normal(shape, 1.0)
        elif name.endswith("position_bias"):
            values[name] = normal(shape, 1.0)
        elif name.endswith(("_hc.fn", "hc_head.hc_fn")):
            values[name] = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif name.endswith(("_hc.base", "hc_head.hc_base")):
            values[name] = normal(shape, 1.0)
        elif name.endswith(("_hc.scale", "hc_head.hc_scale")):
            values[name] = uniform(shape, 0.3, 1.5)
        elif name.endswith(".weight") and len(shape) == 1:  # every RMSNorm weight
            values[name] = uniform(shape, 0.6, 1.4)
        elif name.endswith(".weight") and len(shape) == 2:  # every other linear layer, lm_head included
            values[name] = normal(shape, 1.0 / math.sqrt(shape[1]))
        else:
            raise SystemExit(f"randomize: no rule for checkpoint tensor {name} {shape}")
    model.load_state_dict(values, strict=True)


def build_model(spec: FixtureSpec, seed: int) -> DeepseekV4ForCausalLM:
    generator = torch.Generator().manual_seed(seed)
    config = DeepseekV4Config(**spec.config)
    torch.manual_seed(seed)  # transformers' own init runs first; every value is overwritten below
    model = DeepseekV4ForCausalLM(config).to(torch.float32).eval()
    randomize(model, generator)
    return model


def master_tokens(spec: FixtureSpec, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    longest = max(spec.lengths)
    return torch.randint(0, spec.config["vocab_size"], (longest,), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Top-k margins: read the indexer scores and the router scores through forward hooks


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


# ---------------------------------------------------------------------------------------------------------------
# HF's cached path against its one-shot path


def cached_logits(model, tokens: list[int], chunk_sizes: list[int]):
    """Feed `tokens` through HF's DynamicCache in consecutive chunks; return the logits of every position."""
    outputs, cache, start, index = [], None, 0, 0
    with torch.no_grad():
        while start < len(tokens):
            size = min(chunk_sizes[index % len(chunk_sizes)], len(tokens) - start)
            result = model(input_ids=torch.tensor([tokens[start : start + size]]), past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            outputs.append(result.logits[0])
            start += size
            index += 1
    return torch.cat(outputs)


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
    padded = torch.zeros(block_rows * FP8_BLOCK, block_cols * FP8_BLOCK)
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
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ties_round_up = torch.tensor([False, True, False, True, False, True, False])
    above = magnitude.unsqueeze(-1) > midpoints
    tie_up = (magnitude.unsqueeze(-1) == midpoints) & ties_round_up
    code = (above | tie_up).sum(dim=-1).to(torch.uint8)
    code = code | (scaled < 0).to(torch.uint8) << 3
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    table = torch.tensor(E2M1_VALUES)
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
    """Independent decoder working on raw bytes (numpy), to check the packing written by to_release."""
    tensor = release[name]
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


# ---------------------------------------------------------------------------------------------------------------
# Fixture generation


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_cases(path: Path, cases: list[dict]) -> None:
    """tokens.json with one case per line (indent=2 would put every token id on its own line)."""
    path.write_text('{"cases": [\n' + ",\n".join(json.dumps(case) for case in cases) + "\n]}\n")


def load_dequantized_model(config_dir: Path, dequantized: dict[str, torch.Tensor], scratch: Path):
    """Load the dequantized weights through HF's own loader (same path as the fp32 fixture)."""
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", scratch / "config.json")
    save_file({name: tensor.contiguous() for name, tensor in dequantized.items()}, scratch / "model.safetensors",
              metadata={"format": "pt"})
    return DeepseekV4ForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()


def smallest_margin(model, tokens: list[int], lengths) -> float:
    """Smallest indexer or router margin over the one-shot prefills of every case length."""
    margin = math.inf
    for length in lengths:
        _, probe = one_shot_logits(model, tokens[:length], probe_margins=True)
        margin = min(margin, probe.indexer_margin, probe.router_margin)
    return margin


def choose_seed(spec: FixtureSpec, scratch: Path):
    """First seed whose indexer and router top-k are unambiguous in every case, for the fp32 weights and for the
    dequantized release weights (checked even without --release-layout, so the flag never changes the seed)."""
    for attempt in range(MAX_SEED_ATTEMPTS):
        seed = spec.seed_base + attempt
        model = build_model(spec, seed)
        tokens = master_tokens(spec, seed)
        margins = [smallest_margin(model, tokens, spec.lengths)]
        if margins[-1] >= MIN_RELATIVE_MARGIN:
            # The quantizer works on save_pretrained names: go through a save to get them exactly.
            model.save_pretrained(scratch / "probe")
            _, dequantized, _ = to_release(load_file(scratch / "probe" / "model.safetensors"))
            dequantized_model = load_dequantized_model(scratch / "probe", dequantized, scratch / "probe_dequantized")
            margins.append(smallest_margin(dequantized_model, tokens, spec.release_lengths))
            if margins[-1] >= MIN_RELATIVE_MARGIN:
                return seed, attempt + 1
        print(f"  {spec.name}: seed {seed} rejected, margins {margins}", file=sys.stderr)
    raise SystemExit(f"{spec.name}: no seed in {MAX_SEED_ATTEMPTS} attempts has top-k margins >= {MIN_RELATIVE_MARGIN}")


def record_cases(model, tokens: list[int], lengths, directory: Path):
    """Write logits_<case>.npy for each length; return the tokens.json cases and the smallest margins seen."""
    cases, indexer_margin, router_margin, truncated = [], math.inf, math.inf, 0
    for length in lengths:
        logits, probe = one_shot_logits(model, tokens[:length], probe_margins=True)
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{directory.name}: non-finite logits for length {length}")
        indexer_margin = min(indexer_margin, probe.indexer_margin)
        router_margin = min(router_margin, probe.router_margin)
        truncated += probe.indexer_truncated_queries
        positions = positions_to_record(length)
        case = f"t{length}"
        np.save(directory / f"logits_{case}.npy", logits[positions].numpy().astype(np.float32))
        cases.append({"name": case, "tokens": tokens[:length], "positions": positions, "logits": f"logits_{case}.npy"})
    if min(indexer_margin, router_margin) < MIN_RELATIVE_MARGIN:
        raise SystemExit(f"{directory.name}: top-k margin fell below {MIN_RELATIVE_MARGIN} in a recorded case")
    return cases, {"indexer_min_relative_margin": indexer_margin, "router_min_relative_margin": router_margin,
                   "indexer_truncated_queries_over_all_cases": truncated}


def describe_layers(config) -> list[str]:
    names = {SWA: "SWA", CSA: "CSA", HCA: "HCA"}
    return [f"{names[kind]}+{mlp}" for kind, mlp in zip(config.layer_types, config.mlp_layer_types)]


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__}


def generate_fixture(spec: FixtureSpec, out: Path, release_layout: bool, scratch: Path) -> None:
    print(f"{spec.name}: choosing a seed", file=sys.stderr)
    seed, attempts = choose_seed(spec, scratch / spec.name)
    directory = out / spec.name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)

    build_model(spec, seed).save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    # Every golden comes from the files as written, loaded back through HF's loader.
    model = DeepseekV4ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = master_tokens(spec, seed)
    cases, margins = record_cases(model, tokens, spec.lengths, directory)
    write_cases(directory / "tokens.json", cases)

    one_shot, _ = one_shot_logits(model, tokens)
    decode = cached_logits(model, tokens, [spec.prefill_before_decode] + [1] * len(tokens))
    chunked = cached_logits(model, tokens, list(spec.chunk_sizes))
    logits_rms = one_shot.pow(2).mean().sqrt().item()
    meta = {
        "generator": "scripts/make_golden.py",
        "seed": seed,
        "seeds_tried": attempts,
        "versions": versions(),
        "covers": list(spec.covers),
        "layers": describe_layers(model.config),
        "cases": {case["name"]: len(case["tokens"]) for case in cases},
        "min_relative_margin_required": MIN_RELATIVE_MARGIN,
        **margins,
        "logits_rms_longest_case": logits_rms,
        "hf_cached_path": {
            "compared_on": f"t{len(tokens)}, all positions",
            "prefill_then_decode": f"prefill {spec.prefill_before_decode} tokens, then 1 token per step",
            "prefill_then_decode_max_abs_diff": (decode - one_shot).abs().max().item(),
            "chunked_prefill_sizes_cycled": list(spec.chunk_sizes),
            "chunked_prefill_max_abs_diff": (chunked - one_shot).abs().max().item(),
        },
    }
    write_json(directory / "meta.json", meta)
    print(f"{spec.name}: seed {seed}, margins {margins}, cached-path diffs "
          f"{meta['hf_cached_path']['prefill_then_decode_max_abs_diff']:.3g} / "
          f"{meta['hf_cached_path']['chunked_prefill_max_abs_diff']:.3g}", file=sys.stderr)

    if release_layout:
        generate_release(spec, directory, seed, tokens, scratch / spec.name)


def generate_release(spec: FixtureSpec, hf_directory: Path, seed: int, tokens: list[int], scratch: Path) -> None:
    directory = hf_directory.parent / f"{spec.name}-release"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    config = DeepseekV4Config.from_pretrained(hf_directory)
    hf_tensors = load_file(hf_directory / "model.safetensors")
    release, dequantized, counts = to_release(hf_tensors)
    write_release_shards(release, config.num_hidden_layers, directory)
    write_json(directory / "config.json", release_config(config))

    # Read the shards back and decode them independently: the result must be the dequantized weights, bit for bit.
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    reread = {}
    for file_name in sorted(set(index["weight_map"].values())):
        reread.update(load_file(directory / file_name))
    if set(reread) != set(release):
        raise SystemExit(f"{directory.name}: shards hold {sorted(set(reread) ^ set(release))} unexpectedly")
    for hf_name, expected in dequantized.items():
        decoded = decode_release_tensor(reread, release_name(hf_name))
        if not np.array_equal(decoded, expected.numpy().astype(np.float64)):
            raise SystemExit(f"{directory.name}: {release_name(hf_name)} does not decode to its dequantized value")

    model = load_dequantized_model(hf_directory, dequantized, scratch / "dequantized")
    cases, margins = record_cases(model, tokens, spec.release_lengths, directory)
    write_cases(directory / "tokens.json", cases)
    worst = {}
    for hf_name, original in hf_tensors.items():
        storage = storage_of(release_name(hf_name))
        error = (dequantized[hf_name] - original.to(torch.float32)).abs().max().item()
        worst[storage] = max(worst.get(storage, 0.0), error)
    fp32_logits, _ = one_shot_logits(DeepseekV4ForCausalLM.from_pretrained(hf_directory, dtype=torch.float32).eval(),
                                     tokens)
    release_logits, _ = one_shot_logits(model, tokens)
    meta = {
        "generator": "scripts/make_golden.py --release-layout",
        "source_fixture": spec.name,
        "seed": seed,
        "versions": versions(),
        "layout": "DeepSeek release names (dsv4-model.md 6.1), two shards + model.safetensors.index.json",
        "storage": {
            "fp8": "float8_e4m3fn weight + float8_e8m0fnu .scale [ceil(N/128), ceil(K/128)], "
                   "s = 2^ceil(log2(max(amax, 1e-4) / 448)), value = clamp(w / s, +-448) rounded to nearest even",
            "fp4": "int8 [N, K/2], two e2m1 codes per byte, low nibble = even element along K; float8_e8m0fnu .scale "
                   "[N, K/32], s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)), value rounded to nearest, ties to even",
            "bf16": "round to nearest even from the fp32 fixture",
            "fp32": "unchanged", "int64": "unchanged",
        },
        "tensor_counts": counts,
        "max_abs_weight_change_by_storage": worst,
        "logits": "HF transformers on the dequantized weights, fp32",
        "cases": {case["name"]: len(case["tokens"]) for case in cases},
        "min_relative_margin_required": MIN_RELATIVE_MARGIN,
        **margins,
        "max_abs_logit_change_vs_fp32_fixture": (release_logits - fp32_logits).abs().max().item(),
    }
    write_json(directory / "meta.json", meta)
    print(f"{directory.name}: margins {margins}", file=sys.stderr)


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (default tests/golden)")
    parser.add_argument("--release-layout", action="store_true", help="also write <name>-release/ directories")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="generate only this fixture")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare bytes with --out; write nothing")
    args = parser.parse_args()

    specs = [spec for spec in FIXTURES if not args.only or spec.name in args.only]
    unknown = set(args.only) - {spec.name for spec in FIXTURES}
    if unknown:
        parser.error(f"unknown fixture(s) {sorted(unknown)}; known: {[spec.name for spec in FIXTURES]}")

    # One thread and deterministic kernels: the same bytes on every run of the same versions.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        out = temporary / "out" if args.check else args.out
        for spec in specs:
            generate_fixture(spec, out, args.release_layout, temporary / "scratch")
        if args.check:
            mismatched = []
            for spec in specs:
                for suffix in ("", "-release") if args.release_layout else ("",):
                    fresh, committed = out / (spec.name + suffix), args.out / (spec.name + suffix)
                    if not committed.is_dir() or tree_digest(fresh) != tree_digest(committed):
                        mismatched.append(spec.name + suffix)
            if mismatched:
                print(f"check: regenerated fixtures differ from {args.out}: {mismatched}", file=sys.stderr)
                return 1
            print(f"check: {len(specs)} fixture(s) regenerate byte for byte", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
