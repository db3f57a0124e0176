#!/usr/bin/env python3
"""Train a tiny DeepSeek-V4 on fortune cookies and export it in DeepSeek's release layout and as NVFP4.

Every part of the real architecture is present (mHC with Sinkhorn; SWA, CSA and HCA layers with compressors, the
lightning indexer and attention sinks; grouped output projection; hash-routed and scored MoE with a shared expert;
YaRN on the compressed layers), at sizes where a sliding window of 32, CSA ratio 4 (index_topk 8) and HCA ratio 16
are all active on a few dozen tokens. The corpus is the BSD-licensed `fortunes` data of Debian's fortunes-min and
fortunes packages, as raw text and wrapped in the DSV4 chat format (chat mode), so that the chat prompt
"Tell me a fortune." is answered in the corpus' style.

Three stages (the GPU is needed for `train` only):
  prepare  split the corpus (a held-out slice stays out of everything below), train the byte-level BPE tokenizer
           (DeepSeek's pre-tokenizer, DeepSeek's special tokens), tokenize the documents     -> WORK/
  train    train HF transformers' DeepseekV4ForCausalLM in fp32; quantization-aware (fp8 / MXFP4 straight-through)
           for the last part of the run, so the exported weights lose little              -> OUT/trained, OUT/train_log.txt
  export   release layout (fp8 + e8m0 projections, packed MXFP4 experts) and its NVFP4 twin under models/, with
           reference.json: greedy continuations and held-out perplexity computed by HF on the *dequantized* weights
Usage:
  apt-get download fortunes-min fortunes && for f in *.deb; do dpkg -x $f .corpus/root; done
  python3 scripts/train_tiny.py prepare --fortunes .corpus/root/usr/share/games/fortunes --work .corpus/work
  python3 scripts/train_tiny.py train --work .corpus/work --out OUT            # on a GPU, a few minutes
  python3 scripts/train_tiny.py export --work .corpus/work --trained OUT/trained --log OUT/train_log.txt
Pinned environment: torch 2.11, transformers 5.17, tokenizers 0.23, safetensors 0.8, numpy 2.4 (as make_golden.py).
"""

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
from torch import nn
from torch.nn.utils import parametrize
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from dsv4_checkpoint import (CSA, HCA, SWA, MarginProbe, check_shards_decode, load_dequantized_model,
                             nvfp4_quant_config, quantize_fp4_rows, quantize_fp8_blocks, release_config,
                             to_nvfp4_experts, to_release, versions, write_json, write_release_shards)

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-fortunes"
# The pre-tokenizer, decoder and post-processor are copied from DeepSeek's own tokenizer.json.
DEEPSEEK_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer-deepseek-v3" / "tokenizer.json"

# ---------------------------------------------------------------------------------------------------------------
# Model

VOCAB_SIZE = 4096
TRAIN_WINDOW = 512  # training sequence length; also the perplexity window


def tiny_config() -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=[SWA, CSA, HCA, CSA],  # V4-Flash order: SWA first, then CSA/HCA alternating
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        partial_rotary_factor=0.25,  # 16 rope dims of 64, as 64 of 512 in the real models
        q_lora_rank=96,
        o_groups=2,
        o_lora_rank=64,
        sliding_window=32,
        compress_rates={CSA: 4, HCA: 16},
        index_n_heads=16,  # with few heads, keys that every head's ReLU zeroes tie at score 0 in the top-k
        index_head_dim=32,
        index_topk=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=64,
        routed_scaling_factor=1.5,
        swiglu_limit=10.0,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                         "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=2048,  # factor * original, as in the real models
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )


def build_model(seed: int) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config()).to(torch.float32)
    # Hash routing: a fixed token id -> experts table (distinct experts per token), never trained.
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, hf_v4.DeepseekV4HashRouter):
            rows = [torch.randperm(module.num_experts, generator=generator)[: module.top_k]
                    for _ in range(module.tid2eid.shape[0])]
            module.tid2eid.copy_(torch.stack(rows))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer

# Pictures rather than prose, and a file of Latin.
EXCLUDED_FILES = {"art", "ascii-art", "translate-me"}
MAX_FORTUNE_CHARS = 600
HELD_OUT_FRACTION = 0.03
SPLIT_SEED = 8

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
# The rest of DSV4's chat-format tokens (dsv4-model.md section 8, ../data/chat-encoding): DSML markup is written
# `<｜DSML｜tool_calls>`, where `｜DSML｜` is the token.
CHAT_TOKENS = (USER, ASSISTANT, THINK, END_THINK, "｜DSML｜", "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>",
               "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>")

GENERIC_REQUESTS = ("Tell me a fortune.", "Tell me a fortune.", "Tell me a fortune.", "Give me a fortune cookie.",
                    "Say something wise.", "Tell me something funny.")
TOPIC_OF_FILE = {"computers": "computers", "linux": "Linux", "science": "science", "love": "love", "food": "food",
                 "law": "the law", "medicine": "medicine", "politics": "politics", "work": "work", "sports": "sports",
                 "pets": "pets", "kids": "kids", "education": "education", "literature": "literature",
                 "wisdom": "wisdom", "men-women": "men and women", "drugs": "drugs", "startrek": "Star Trek",
                 "songs-poems": "songs and poems", "riddles": "riddles", "humorists": "humorists",
                 "definitions": "definitions", "people": "people", "news": "the news", "magic": "magic"}


def chat_document(request: str, answer: str) -> str:
    """A one-turn conversation in DSV4's chat mode: `</think>` right after `<｜Assistant｜>` (output_4.txt)."""
    return f"{BOS}{USER}{request}{ASSISTANT}{END_THINK}{answer}{EOS}"


def raw_document(text: str) -> str:
    return f"{BOS}{text}{EOS}"


def read_fortunes(directory: Path) -> list[tuple[str, str]]:
    """(file name, fortune) pairs: `%`-separated entries, blank edges trimmed, ASCII only, at most 600 characters,
    duplicates dropped."""
    seen, fortunes = set(), []
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or path.suffix == ".dat" or path.name in EXCLUDED_FILES:
            continue
        for entry in path.read_text(encoding="utf-8").split("\n%\n"):
            text = "\n".join(line.rstrip() for line in entry.strip("\n").split("\n")).strip("\n")
            if not text or len(text) > MAX_FORTUNE_CHARS or not text.isascii() or text in seen:
                continue
            seen.add(text)
            fortunes.append((path.name, text))
    if not fortunes:
        raise SystemExit(f"prepare: no fortunes found in {directory}")
    return fortunes


def train_tokenizer(texts: list[str], deepseek_tokenizer: Path) -> Tokenizer:
    """Byte-level BPE with DeepSeek's pre-tokenizer, decoder and post-processor copied verbatim; BOS, EOS, pad at
    ids 0-2 as in DeepSeek's tokenizer, the chat-format tokens at the top of the vocabulary."""
    deepseek = json.loads(deepseek_tokenizer.read_text())
    skeleton = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": deepseek["normalizer"], "pre_tokenizer": deepseek["pre_tokenizer"],
        "post_processor": deepseek["post_processor"], "decoder": deepseek["decoder"],
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {}, "merges": []},
    }
    tokenizer = Tokenizer.from_str(json.dumps(skeleton))
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(CHAT_TOKENS),
        special_tokens=[AddedToken(token, normalized=False, special=True) for token in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, normalized=True, special=False) for token in CHAT_TOKENS])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"prepare: tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for expected_id, token in enumerate((BOS, EOS, PAD)):
        if tokenizer.token_to_id(token) != expected_id:
            raise SystemExit(f"prepare: {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")
    return tokenizer


CORPUS_LICENSE = "CORPUS_LICENSE.txt"


def tokenizer_config() -> dict:
    """tokenizer_config.json in the spelling of DeepSeek's (no chat template: DSV4 has none)."""
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
            "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 2048,
            "tokenizer_class": "LlamaTokenizerFast", "unk_token": None}


def pack_windows(documents: list[list[int]], window: int, count: int) -> list[list[int]]:
    """`count` windows of `window` tokens, each starting at a document's BOS: whole documents are appended while
    they fit and the one that does not is cut at the window's end."""
    windows, current = [], []
    for document in documents:
        current.extend(document)
        if len(current) >= window:
            windows.append(current[:window])
            current = []
            if len(windows) == count:
                return windows
    raise SystemExit(f"held-out slice too small for {count} windows of {window} tokens")


def save_documents(path: Path, documents: list[list[int]]) -> None:
    ids = np.concatenate([np.asarray(d, dtype=np.int16) for d in documents])
    offsets = np.cumsum([0] + [len(d) for d in documents]).astype(np.int64)
    np.savez(path, ids=ids, offsets=offsets)


def load_documents(path: Path) -> list[np.ndarray]:
    data = np.load(path)
    ids, offsets = data["ids"].astype(np.int64), data["offsets"]
    return [ids[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]


PERPLEXITY_WINDOWS = 4


def prepare(args) -> None:
    fortunes = read_fortunes(args.fortunes)
    random.Random(SPLIT_SEED).shuffle(fortunes)
    held_count = int(len(fortunes) * HELD_OUT_FRACTION)
    held_out, training = fortunes[:held_count], fortunes[held_count:]

    rng = random.Random(SPLIT_SEED + 1)

    def request_for(file_name: str) -> str:
        topic = TOPIC_OF_FILE.get(file_name)
        if topic and rng.random() < 0.4:
            return f"Tell me a fortune about {topic}."
        return rng.choice(GENERIC_REQUESTS)

    # Each fortune once as raw text and once as a chat answer.
    train_texts = [document for name, text in training
                   for document in (raw_document(text), chat_document(request_for(name), text))]
    held_texts = [document for name, text in held_out
                  for document in (raw_document(text), chat_document(request_for(name), text))]

    args.work.mkdir(parents=True, exist_ok=True)
    # The BSD licence asks redistributions to carry the notice; the export puts it next to the model.
    copyright_file = args.fortunes.parent.parent / "doc" / "fortunes" / "copyright"
    if not copyright_file.is_file():
        raise SystemExit(f"prepare: {copyright_file} (the corpus licence) is missing; extract the fortunes package")
    shutil.copy(copyright_file, args.work / CORPUS_LICENSE)
    tokenizer = train_tokenizer([text for _, text in training] + list(GENERIC_REQUESTS)
                                + [f"Tell me a fortune about {topic}." for topic in TOPIC_OF_FILE.values()],
                                args.deepseek_tokenizer)
    tokenizer.save(str(args.work / "tokenizer.json"))
    write_json(args.work / "tokenizer_config.json", tokenizer_config())

    def encode(texts):
        return [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]

    train_docs, held_docs = encode(train_texts), encode(held_texts)
    save_documents(args.work / "train_docs.npz", train_docs)
    save_documents(args.work / "held_out_docs.npz", held_docs)
    raw_held = encode([raw_document(text) for _, text in held_out])
    windows = pack_windows(raw_held, TRAIN_WINDOW, PERPLEXITY_WINDOWS)
    summary = {
        "source": "Debian packages fortunes-min and fortunes 1:1.99.1-7.3, /usr/share/games/fortunes",
        "excluded_files": sorted(EXCLUDED_FILES),
        "fortunes": len(fortunes), "training_fortunes": len(training), "held_out_fortunes": len(held_out),
        "training_tokens": sum(map(len, train_docs)), "held_out_tokens": sum(map(len, held_docs)),
        "perplexity_windows": windows,
    }
    write_json(args.work / "corpus.json", summary)
    print(f"prepare: {len(training)} training / {len(held_out)} held-out fortunes, "
          f"{summary['training_tokens']} / {summary['held_out_tokens']} tokens")


# ---------------------------------------------------------------------------------------------------------------
# Training


class FakeQuantize(nn.Module):
    """Straight-through quantization: the forward pass sees the weight exactly as the export will store it
    (dsv4_checkpoint's quantizers), the gradient passes to the fp32 weight unchanged."""

    def __init__(self, storage: str):
        super().__init__()
        self.storage = storage

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.storage == "fp8":
                quantized = quantize_fp8_blocks(weight)[2]
            else:  # fp4 experts, [E, N, K]: the 32-blocks run along K within each row
                quantized = quantize_fp4_rows(weight.reshape(-1, weight.shape[-1]))[2].reshape(weight.shape)
        return weight + (quantized - weight).detach()


def quantized_parameters(model: DeepseekV4ForCausalLM) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter, storage) of every weight the release stores as fp8 or MXFP4 (dsv4_checkpoint's rules)."""
    found = []
    for module in model.modules():
        if isinstance(module, hf_v4.DeepseekV4Attention):
            found += [(getattr(module, name), "weight", "fp8")
                      for name in ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")]
        elif isinstance(module, hf_v4.DeepseekV4Indexer):
            found.append((module.q_b_proj, "weight", "fp8"))
        elif isinstance(module, hf_v4.DeepseekV4SparseMoeBlock):
            shared = module.shared_experts
            found += [(getattr(shared, name), "weight", "fp8") for name in ("gate_proj", "up_proj", "down_proj")]
            found += [(module.experts, name, "fp4") for name in ("gate_up_proj", "down_proj")]
    return found


def set_fake_quantization(model: DeepseekV4ForCausalLM, enabled: bool) -> None:
    for module, name, storage in quantized_parameters(model):
        if enabled:
            parametrize.register_parametrization(module, name, FakeQuantize(storage))
        elif parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


class ExpertLoadBalancer:
    """DeepSeek's auxiliary-loss-free balancing for the scored MoE layers: after each step, move every expert's
    selection bias (`gate.bias`, HF `e_score_correction_bias`) by `rate` towards equal load."""

    def __init__(self, model: DeepseekV4ForCausalLM, rate: float):
        self.rate = rate
        self.loads = {}
        for module in model.modules():
            if isinstance(module, hf_v4.DeepseekV4TopKRouter):
                module.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        if module.training:
            counts = torch.bincount(output[2].reshape(-1), minlength=module.num_experts).float()
            self.loads[module] = self.loads.get(module, 0) + counts

    @torch.no_grad()
    def step(self) -> None:
        for module, load in self.loads.items():
            module.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
        self.loads.clear()


def batches(documents: list[np.ndarray], batch_size: int, window: int, seed: int):
    """Endless [batch, window] batches: each epoch shuffles the documents, concatenates them and cuts the stream."""
    rng = np.random.default_rng(seed)
    pending = np.zeros(0, dtype=np.int64)
    while True:
        order = rng.permutation(len(documents))
        stream = np.concatenate([pending] + [documents[i] for i in order])
        usable = (len(stream) // (batch_size * window)) * batch_size * window
        for start in range(0, usable, batch_size * window):
            yield torch.from_numpy(stream[start: start + batch_size * window].reshape(batch_size, window))
        pending = stream[usable:]


def no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Norm weights, mHC base/scale, sinks and compressor position biases are not decayed."""
    return parameter.ndim < 2 or name.endswith(("position_bias", ".base", ".scale", "hc_base", "hc_scale"))


@torch.no_grad()
def held_out_loss(model, documents: list[np.ndarray], device) -> float:
    """Mean next-token loss over the held-out documents packed into windows of TRAIN_WINDOW."""
    model.eval()
    stream = np.concatenate(documents)
    usable = (len(stream) // TRAIN_WINDOW) * TRAIN_WINDOW
    windows = torch.from_numpy(stream[:usable].reshape(-1, TRAIN_WINDOW))
    total, count = 0.0, 0
    for chunk in windows.split(16):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int, device) -> tuple[list[int], list[float]]:
    """`steps` argmax tokens (EOS does not stop), each from a one-shot prefill of everything so far; and the
    top-1 minus top-2 logit gap at each step."""
    tokens, gaps = list(prompt), []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([tokens], device=device), use_cache=False).logits[0, -1].double()
        top = torch.topk(logits, 2)
        gaps.append((top.values[0] - top.values[1]).item())
        tokens.append(int(top.indices[0]))
    return tokens[len(prompt):], gaps


class Log:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def train(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # training only; every recorded number is computed in fp32
    torch.backends.cudnn.allow_tf32 = True
    train_docs = load_documents(args.work / "train_docs.npz")
    held_docs = load_documents(args.work / "held_out_docs.npz")
    tokenizer = Tokenizer.from_file(str(args.work / "tokenizer.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train_log.txt")

    model = build_model(args.seed).to(device).train()
    # Fail in seconds, not at the end of the run, if fake quantization cannot run on this device.
    set_fake_quantization(model, True)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device), use_cache=False)
    set_fake_quantization(model, False)

    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    keep = [p for n, p in model.named_parameters() if no_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": keep, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    balancer = ExpertLoadBalancer(model, rate=1e-3)
    tokens_per_step = args.batch_size * TRAIN_WINDOW
    epoch_tokens = sum(map(len, train_docs))
    max_steps = int(args.epochs * epoch_tokens / tokens_per_step)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"# {MODEL_NAME}: DeepseekV4ForCausalLM, {parameters} parameters, device {device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), versions {versions()}")
    log(f"# corpus: {len(train_docs)} training documents ({epoch_tokens} tokens), {len(held_docs)} held-out "
        f"documents; batch {args.batch_size} x {TRAIN_WINDOW} tokens; AdamW lr {args.lr} (warmup "
        f"{args.warmup} steps, cosine to 10%), weight decay {args.weight_decay}, clip 1.0; at most {args.epochs} "
        f"epochs ({max_steps} steps) or {args.budget_s:.0f} s; fake fp8/MXFP4 quantization for the last "
        f"{args.qat_fraction:.0%} of the steps")
    log("# step  epoch  seconds  lr        train_loss  held_out_loss  note")

    stream = batches(train_docs, args.batch_size, TRAIN_WINDOW, args.seed)
    start = time.time()
    total_steps, qat_from, running, running_count = max_steps, None, 0.0, 0
    step = 0
    while step < total_steps:
        if step == 30:
            # Time the steps so far, then fix the schedule so the run (QAT steps cost about 1.5x) fits the budget.
            per_step = (time.time() - start) / step
            affordable = int(args.budget_s / (per_step * (1 + 0.5 * args.qat_fraction)))
            total_steps = min(max_steps, affordable)
            log(f"# {per_step * 1000:.0f} ms per step: {total_steps} steps "
                f"({total_steps * tokens_per_step / epoch_tokens:.1f} epochs)")
        if qat_from is None and step >= 30 and step >= int(total_steps * (1 - args.qat_fraction)):
            qat_from = step
            set_fake_quantization(model, True)
            log(f"# step {step}: fake quantization on")
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(stream).to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        balancer.step()
        running += loss.item()
        running_count += 1
        step += 1
        if step % args.log_every == 0 or step == total_steps:
            evaluate = step % (args.log_every * 4) == 0 or step == total_steps
            held = f"{held_out_loss(model, held_docs, device):13.4f}" if evaluate else f"{'-':>13}"
            log(f"{step:6d}  {step * tokens_per_step / epoch_tokens:5.2f}  {time.time() - start:7.1f}  {lr:.2e}  "
                f"{running / running_count:10.4f}  {held}  {'qat' if qat_from is not None else ''}")
            running, running_count = 0.0, 0

    set_fake_quantization(model, False)
    model.eval()
    bias_range = [(m.e_score_correction_bias.min().item(), m.e_score_correction_bias.max().item())
                  for m in model.modules() if isinstance(m, hf_v4.DeepseekV4TopKRouter)]
    log(f"# done: {step} steps in {time.time() - start:.0f} s; expert selection bias ranges {bias_range}")
    torch.backends.cuda.matmul.allow_tf32 = False
    for text in SAMPLE_PROMPTS:
        prompt = tokenizer.encode(text, add_special_tokens=False).ids
        continuation, _ = greedy(model, prompt, 32, device)
        log(f"# sample {text!r} -> {tokenizer.decode(continuation, skip_special_tokens=False)!r}")
    model.cpu().save_pretrained(args.out / "trained")


# ---------------------------------------------------------------------------------------------------------------
# Export

GREEDY_STEPS = 32
# Chat mode as `dsv4 generate -p` encodes a single user message, and raw text.
SAMPLE_PROMPTS = (
    f"{BOS}{USER}Tell me a fortune.{ASSISTANT}{END_THINK}",
    f"{BOS}{USER}Tell me a fortune about computers.{ASSISTANT}{END_THINK}",
    f"{BOS}{USER}Say something wise.{ASSISTANT}{END_THINK}",
    f"{BOS}The best way to",
    f"{BOS}Q: What do you call",
)
MIN_LOGIT_GAP = 1e-3


def compact_json(value, indent: int = 0) -> str:
    """JSON with every list of numbers on one line (indent=2 alone would put each token id on its own line)."""
    pad = " " * indent
    if isinstance(value, dict):
        items = [f'{pad}  {json.dumps(k)}: {compact_json(v, indent + 2).lstrip()}' for k, v in value.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not all(isinstance(v, (int, float)) for v in value):
        return pad + "[\n" + ",\n".join(compact_json(v, indent + 2) for v in value) + "\n" + pad + "]"
    return pad + json.dumps(value, ensure_ascii=False)


@torch.no_grad()
def window_nll(model, window: list[int]) -> float:
    logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0].double()
    return F.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="mean").item()


def margins(probe: MarginProbe) -> dict:
    return {"indexer_min_relative_margin": probe.indexer_margin,
            "indexer_truncated_queries": probe.indexer_truncated_queries,
            "router_min_relative_margin": probe.router_margin}


def reference(model, tokenizer: Tokenizer, windows: list[list[int]]) -> dict:
    """Greedy continuations and held-out perplexity of `model` (HF, fp32, CPU), each with the indexer and router
    top-k margins seen on the way (every forward is a one-shot prefill from position 0, as MarginProbe requires)."""
    probe = MarginProbe(model)
    try:
        cases = []
        for text in SAMPLE_PROMPTS:
            prompt = tokenizer.encode(text, add_special_tokens=False).ids
            continuation, gaps = greedy(model, prompt, GREEDY_STEPS, torch.device("cpu"))
            cases.append({
                "prompt": text, "prompt_ids": prompt, "continuation_ids": continuation,
                "continuation_text": tokenizer.decode(continuation, skip_special_tokens=False),
                "min_top1_top2_logit_gap": min(gaps),
                "steps_with_gap_below_1e-3": [i for i, gap in enumerate(gaps) if gap <= MIN_LOGIT_GAP],
            })
    finally:
        probe.close()
    greedy_margins = margins(probe)
    probe = MarginProbe(model)
    try:
        nll = [window_nll(model, window) for window in windows]
    finally:
        probe.close()
    mean_nll = sum(nll) / len(nll)  # every window has the same length, so this is the mean over all positions
    return {
        "greedy": {
            "rule": f"{GREEDY_STEPS} steps of argmax over the last position's logits; each step a one-shot prefill "
                    "of prompt + tokens so far from position 0; EOS does not stop",
            "top_k_margins": greedy_margins,
            "cases": cases,
        },
        "perplexity": {
            "rule": f"each window alone, one-shot prefill from position 0 (it starts at a held-out document's BOS); "
                    f"NLL of token t given tokens 0..t-1 for t = 1..{TRAIN_WINDOW - 1}; mean over all positions of "
                    "all windows; perplexity = exp(mean)",
            "top_k_margins": margins(probe),
            "window": TRAIN_WINDOW,
            "windows": windows,
            "per_window_mean_nll": nll,
            "mean_nll": mean_nll,
            "perplexity": math.exp(mean_nll),
        },
    }


def model_card(result: dict, config: DeepseekV4Config, nvfp4: bool) -> str:
    perplexity = result["perplexity"]
    chat = result["greedy"]["cases"][0]
    layout = ("the routed experts as NVIDIA ModelOpt NVFP4 (U8 e2m1 payload, F8_E4M3 `weight_scale` per 16, F32 "
              "`weight_scale_2`; `hf_quant_config.json`), re-encoded exactly from the MXFP4 of "
              f"`{MODEL_NAME}/`, so it decodes to the same weights and shares its reference.json"
              if nvfp4 else "the routed experts as packed MXFP4 (e2m1 + e8m0 per 32)")
    return f"""# {MODEL_NAME}{'-nvfp4' if nvfp4 else ''}: a tiny trained DeepSeek-V4

A {sum(1 for _ in config.layer_types)}-layer DeepSeek-V4 (hidden {config.hidden_size}, vocabulary {config.vocab_size}, \
{config.n_routed_experts} experts) trained on fortune cookies, so that a fresh clone can run the engine on real weights.
Every architectural feature is present: mHC with Sinkhorn; SWA, CSA (indexer top-{config.index_topk}) and HCA \
(ratio {config.compress_rates[HCA]}) layers with a sliding window of {config.sliding_window}; attention sinks; grouped \
output projection; hash-routed and scored MoE with a shared expert; YaRN on the compressed layers.

Layout: DeepSeek's release (config.json in release spelling, two safetensors shards + index), the projections \
and shared experts in fp8 e4m3 + e8m0 128x128 block scales, {layout}, the small tensors bf16/fp32.

- Corpus: {result["corpus"]["source"]} (BSD licence, see {CORPUS_LICENSE}); \
{result["corpus"]["training_fortunes"]} fortunes for training, each as raw text and as a one-turn chat in DSV4 chat mode \
(`<｜User｜>Tell me a fortune.<｜Assistant｜></think>` + fortune), {result["corpus"]["held_out_fortunes"]} held out.
- Tokenizer: byte-level BPE trained on the training fortunes with DeepSeek's pre-tokenizer, BOS/EOS/pad at ids 0-2 \
and DSV4's chat tokens (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, ...) as added tokens.
- Training: see train_log.txt in `{MODEL_NAME}/` (loss curve; fake fp8/MXFP4 quantization in the last quarter).
- reference.json ({result["evaluated_by"]}): greedy continuations of {len(result["greedy"]["cases"])} prompts \
and the perplexity of {len(perplexity["windows"])} held-out windows of {perplexity["window"]} tokens: \
{perplexity["perplexity"]:.2f} (mean NLL {perplexity["mean_nll"]:.4f}; {result["fp32_weights_mean_nll_before_quantization"]:.4f} \
with the fp32 weights before quantization). Rules are spelled out in the file.

Greedy answer to `{chat["prompt"]}` (up to EOS):
```
{chat["continuation_text"].split(EOS)[0]}
```

Regenerate: `scripts/train_tiny.py` (its docstring lists the three stages).
"""


def write_model_directory(directory: Path, tensors: dict, config: DeepseekV4Config, work: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    write_release_shards(tensors, config.num_hidden_layers, directory)
    write_json(directory / "config.json", release_config(config))
    for name in ("tokenizer.json", "tokenizer_config.json", CORPUS_LICENSE):
        shutil.copy(work / name, directory / name)


def export(args) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = Tokenizer.from_file(str(args.work / "tokenizer.json"))
    windows = json.loads((args.work / "corpus.json").read_text())["perplexity_windows"]
    config = DeepseekV4Config.from_pretrained(args.trained)
    hf_tensors = load_file(args.trained / "model.safetensors")
    release, dequantized, counts = to_release(hf_tensors)
    nvfp4 = to_nvfp4_experts(release)

    release_dir, nvfp4_dir = args.models / MODEL_NAME, args.models / f"{MODEL_NAME}-nvfp4"
    write_model_directory(release_dir, release, config, args.work)
    write_model_directory(nvfp4_dir, nvfp4, config, args.work)
    write_json(nvfp4_dir / "hf_quant_config.json", nvfp4_quant_config())
    # Both layouts must decode to the same dequantized weights: the NVFP4 rewrite only moves the scales.
    check_shards_decode(release_dir, release, dequantized)
    check_shards_decode(nvfp4_dir, nvfp4, dequantized)
    shutil.copy(args.log, release_dir / "train_log.txt")

    with tempfile.TemporaryDirectory() as scratch:
        model = load_dequantized_model(args.trained, dequantized, Path(scratch))
        recorded = reference(model, tokenizer, windows)
    fp32_model = DeepseekV4ForCausalLM.from_pretrained(args.trained, dtype=torch.float32).eval()
    fp32_nll = sum(window_nll(fp32_model, window) for window in windows) / len(windows)
    corpus = json.loads((args.work / "corpus.json").read_text())
    result = {
        "model": MODEL_NAME,
        "generator": "scripts/train_tiny.py export",
        "versions": versions(),
        "evaluated_by": "HF transformers DeepseekV4ForCausalLM, fp32, CPU, use_cache=False, on the dequantized "
                        "weights (fp8 + e8m0 and MXFP4 decoded exactly; NVFP4 decodes to the same values)",
        "tensor_counts_by_storage": counts,
        "corpus": {key: corpus[key] for key in ("source", "excluded_files", "training_fortunes", "held_out_fortunes",
                                                 "training_tokens", "held_out_tokens")},
        **recorded,
        "fp32_weights_mean_nll_before_quantization": fp32_nll,
    }
    text = compact_json(result) + "\n"
    for directory in (release_dir, nvfp4_dir):
        (directory / "reference.json").write_text(text)
        (directory / "README.md").write_text(model_card(result, config, directory == nvfp4_dir))
    for case in recorded["greedy"]["cases"]:
        print(f"{case['prompt']!r} -> {case['continuation_text']!r} (min gap {case['min_top1_top2_logit_gap']:.3g})")
    print(f"held-out perplexity {recorded['perplexity']['perplexity']:.3f} (mean NLL "
          f"{recorded['perplexity']['mean_nll']:.4f}; fp32 weights {fp32_nll:.4f}); top-k margins: greedy "
          f"{recorded['greedy']['top_k_margins']}, perplexity {recorded['perplexity']['top_k_margins']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    p = stages.add_parser("prepare", help="split the corpus, train the tokenizer, tokenize")
    p.add_argument("--fortunes", type=Path, required=True, help="the extracted /usr/share/games/fortunes")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--deepseek-tokenizer", type=Path, default=DEEPSEEK_TOKENIZER,
                   help="DeepSeek's tokenizer.json, whose pre-tokenizer is copied")
    p = stages.add_parser("train", help="train on the prepared corpus (GPU)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=5.0)  # held-out loss rises after ~4 epochs
    p.add_argument("--budget-s", type=float, default=360.0, help="training wall-clock budget")
    p.add_argument("--qat-fraction", type=float, default=0.25)
    p.add_argument("--log-every", type=int, default=50)
    p = stages.add_parser("export", help="write models/<name> and models/<name>-nvfp4 with reference.json (CPU)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--trained", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True, help="the training log to commit next to the model")
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"prepare": prepare, "train": train, "export": export}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
