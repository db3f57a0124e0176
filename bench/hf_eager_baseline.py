#!/usr/bin/env python3
"""Same-run baseline for `dsv4 bench`: HuggingFace's eager DeepseekV4ForCausalLM at DSV4 widths, bf16.

Builds the model from a HuggingFace-layout config.json with random bf16 weights created directly on the device
(no checkpoint, no host copy), keeps the first N decoder layers (same layer-kind pattern as the full model) and
measures, llama-bench style:
  ppP  prefill of P random tokens at batch 1 into a fresh KV cache            -> prompt tokens / s
  tgN  N greedy decode steps from an empty cache at each batch size B          -> generated tokens / s (B x N / time)
Each test runs once untimed (warm-up), then -r timed repetitions (mean +- sample stddev).

Only torch, transformers and the standard library are used. Example (GPU):
  python3 bench/hf_eager_baseline.py --config flash -p 512,4096 -n 128 -b 1,8 -r 3 --json flash_hf.json
CPU smoke run at tiny widths:
  python3 bench/hf_eager_baseline.py --config tests/unit/io/configs/tiny_huggingface_custom_rates.json \
      --device cpu -p 64 -n 8 -b 1,4 -r 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

GIB = 1024**3
# Kept free beyond the estimated eager activations (allocator fragmentation, cuBLAS workspaces, the KV cache).
ACTIVATION_MARGIN_BYTES = 2 * GIB
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILT_IN_CONFIGS = {
    "flash": REPO_ROOT / "tests/unit/io/configs/flash_huggingface_config.json",
    "pro": REPO_ROOT / "tests/unit/io/configs/pro_huggingface_config.json",
}
# Per-layer lists in a HuggingFace DSV4 config (current and legacy names); all are cut to the first N layers.
PER_LAYER_LIST_FIELDS = ("layer_types", "mlp_layer_types", "compress_ratios")
# Fields that describe the stored checkpoint format, not the architecture: this baseline is plain bf16.
STORAGE_FORMAT_FIELDS = ("quantization_config", "expert_dtype")


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} expects comma-separated integers, got '{text}'")
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{option} expects positive integers, got '{text}'")
    return values


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (VALUE as JSON), got '{text}'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as --set scoring_func=sigmoid


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="HuggingFace eager DeepseekV4ForCausalLM baseline (random bf16 weights, first N layers).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True,
                        help="HuggingFace-layout config.json, or 'flash' / 'pro' for the repository's copies")
    parser.add_argument("--layers", type=int, default=None,
                        help="first N decoder layers (default: as many as fit with the headroom)")
    parser.add_argument("-p", "--prompt", default="512", help="prefill lengths at batch 1, e.g. 512,4096")
    parser.add_argument("-n", "--gen", type=int, default=128, help="decode steps per decode test (0: none)")
    parser.add_argument("-b", "--batch", default="1,8", help="decode batch sizes, e.g. 1,8")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="timed repetitions per test")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: smoke runs at tiny widths)")
    parser.add_argument("--headroom-gib", type=float, default=10.0,
                        help="memory kept free beyond the weights for activations and the KV cache (GiB)")
    parser.add_argument("--experts-implementation", default="default",
                        choices=("default", "eager", "grouped_mm", "batched_mm"),
                        help="routed-experts kernel; 'default' keeps transformers' own choice")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="KEY=VALUE", help="override a config field (VALUE parsed as JSON); repeatable")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    try:
        args.prompt_lengths = parse_int_list(args.prompt, "-p")
        args.batch_sizes = parse_int_list(args.batch, "-b")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.gen < 0:
        parser.error(f"-n must be >= 0, got {args.gen}")
    if args.repetitions < 1:
        parser.error(f"-r must be >= 1, got {args.repetitions}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.headroom_gib < 0:
        parser.error(f"--headroom-gib must be >= 0, got {args.headroom_gib}")
    return args


def load_config_dict(spec: str, overrides: list[tuple[str, object]], notes: list[str]) -> tuple[dict, Path]:
    path = BUILT_IN_CONFIGS.get(spec, Path(spec))
    if not path.is_file():
        sys.exit(f"error: config '{spec}' is neither 'flash', 'pro' nor a readable file ({path})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not valid JSON: {error}")
    if config.get("model_type") != "deepseek_v4":
        sys.exit(f"error: {path}: model_type is {config.get('model_type')!r}, expected 'deepseek_v4'")
    for key, value in overrides:
        config[key] = value
        notes.append(f"config override: {key} = {json.dumps(value)}")
    dropped = [field for field in STORAGE_FORMAT_FIELDS if field in config]
    for field in dropped:
        del config[field]
    if dropped:
        notes.append(f"dropped storage-format fields {dropped}: every weight is plain bf16 (no fp8/fp4 quantizer)")
    # The config's own dtype would otherwise decide parameter dtypes; the baseline is bf16 by definition.
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    return config, path


def truncate_layers(config: dict, layers: int) -> dict:
    cut = dict(config)
    cut["num_hidden_layers"] = layers
    for field in PER_LAYER_LIST_FIELDS:
        if isinstance(cut.get(field), list):
            cut[field] = cut[field][:layers]
    return cut


def build_config(config_dict: dict):
    from transformers import AutoConfig

    fields = dict(config_dict)
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as error:
        sys.exit(f"error: transformers rejected the config: {type(error).__name__}: {error}")


def module_bytes(module) -> int:
    """Bytes of every parameter and buffer (the bf16 weights plus e.g. the int64 hash-routing table)."""
    tensors = list(module.parameters(recurse=True)) + list(module.buffers(recurse=True))
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def meta_model_sizes(config) -> tuple[int, list[int]]:
    """(bytes outside the decoder layers, bytes of each decoder layer), from a model built without storage."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        sys.exit(f"error: transformers cannot build DeepseekV4ForCausalLM from this config: "
                 f"{type(error).__name__}: {error}")
    layer_bytes = [module_bytes(layer) for layer in model.model.layers]
    return module_bytes(model) - sum(layer_bytes), layer_bytes


def prefill_activation_bytes(config, length: int) -> int:
    """Rough peak of one eager prefill: HF's eager attention materialises full [H, P, P_kv] bf16 score tensors
    (CSA layers add P / rate compressed keys), about 3 alive at once, and the CSA indexer about 2 fp32
    [P, index_heads, P / rate] score tensors. Sizes the headroom only (V4-Flash pp4096 on an H200: estimate
    9.4 GiB, measured 8.1 GiB above the weights); the measured peaks are in the JSON."""
    rates = getattr(config, "compress_rates", None) or {}
    csa_rate = max(1, int(rates.get("compressed_sparse_attention", 4)))
    scores = 3 * config.num_attention_heads * length * (length + length // csa_rate) * 2
    indexer = 2 * length * config.index_n_heads * (length // csa_rate) * 4
    return scores + indexer


def decode_activation_bytes(config, batch: int, gen: int) -> int:
    """Decode attends over at most the sliding window plus the compressed entries: small next to prefill."""
    kv_length = config.sliding_window + gen
    return 5 * batch * config.num_attention_heads * kv_length * 2 + batch * config.vocab_size * 4


def free_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_layers(requested: int | None, max_layers: int, base_bytes: int, layer_bytes: list[int],
                  headroom_bytes: int, free_bytes: int, device_name: str) -> int:
    def needed(layers: int) -> int:
        return base_bytes + sum(layer_bytes[:layers]) + headroom_bytes

    fitting = 0
    while fitting < max_layers and needed(fitting + 1) <= free_bytes:
        fitting += 1
    if requested is not None:
        if requested > max_layers:
            sys.exit(f"error: --layers {requested} exceeds the config's num_hidden_layers ({max_layers})")
        if needed(requested) > free_bytes:
            sys.exit(
                f"error: --layers {requested} does not fit on {device_name}: weights "
                f"{(base_bytes + sum(layer_bytes[:requested])) / GIB:.1f} GiB + headroom {headroom_bytes / GIB:.1f} GiB"
                f" = {needed(requested) / GIB:.1f} GiB, but only {free_bytes / GIB:.1f} GiB are free "
                f"(short by {(needed(requested) - free_bytes) / GIB:.1f} GiB); "
                + (f"at most {fitting} layer(s) fit" if fitting else "not even one layer fits"))
        return requested
    if fitting == 0:
        sys.exit(
            f"error: not even one layer fits on {device_name}: embeddings + lm_head {base_bytes / GIB:.1f} GiB + "
            f"layer 0 {layer_bytes[0] / GIB:.1f} GiB + headroom {headroom_bytes / GIB:.1f} GiB > "
            f"{free_bytes / GIB:.1f} GiB free")
    return fitting


def randomise_hash_routing(model, generator, device, notes: list[str]) -> None:
    """HF initialises the hash-routing table tid2eid to zeros (real values come from the checkpoint), which would
    send every token of a hash layer to expert 0 k times; give each token id k distinct random experts instead so
    hash layers touch as many experts as a real checkpoint does."""
    import torch

    tables = [layer.mlp.gate.tid2eid for layer in model.model.layers if getattr(layer.mlp, "is_hash", False)]
    for table in tables:
        vocab, top_k = table.shape
        experts = model.config.num_local_experts
        keys = torch.rand(vocab, experts, generator=generator, device=device)
        table.copy_(keys.topk(top_k, dim=-1).indices.to(table.dtype))
    if tables:
        notes.append(f"hash_moe layers: tid2eid filled with {tables[0].shape[1]} distinct random experts per token id "
                     "(HF initialises it to zeros, which would route every token to expert 0)")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_prefill(model, tokens) -> None:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # logits_to_keep=1: generation only needs the last position's logits (what generate() asks for too).
    model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)


def decode_steps(model, cache, tokens, steps: int):
    for _ in range(steps):
        logits = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)  # greedy, stays on the device: no host sync here
    return tokens


def run_decode(model, first_tokens, steps: int) -> None:
    from transformers import DynamicCache

    decode_steps(model, DynamicCache(config=model.config), first_tokens, steps)


def count_decode_kernels(model, first_tokens, device, warm_steps: int, counted_steps: int) -> float:
    """Device activities (kernels, memcpy, memset) per decode step, averaged over `counted_steps` steps taken
    after `warm_steps`: one CSA compression window, since a step that closes a window does more work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens = decode_steps(model, cache, first_tokens, warm_steps)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        decode_steps(model, cache, tokens, counted_steps)
        synchronize(device)
    device_events = sum(1 for event in profiler.events() if event.device_type == DeviceType.CUDA)
    return device_events / counted_steps


def measure(name: str, kind: str, batch: int, tokens: int, repetitions: int, device, body) -> dict:
    """Warm-up once, then time `repetitions` runs of body() between device synchronisations."""
    import torch

    result = {"test": name, "kind": kind, "batch": batch, "tokens_per_run": tokens}
    try:
        reset_peak(device)
        body()
        seconds = []
        for _ in range(repetitions):
            synchronize(device)
            start = time.perf_counter()
            body()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as error:
        result["error"] = f"out of memory: {str(error).splitlines()[0]}"
        torch.cuda.empty_cache()
        return result
    rates = [tokens / value for value in seconds]
    result.update(
        seconds=seconds,
        tokens_per_second=rates,
        mean_tokens_per_second=statistics.fmean(rates),
        stddev_tokens_per_second=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        peak_memory_bytes=peak_bytes(device),
    )
    if kind == "decode":
        result["mean_ms_per_step"] = 1000.0 * statistics.fmean(seconds) / (tokens // batch)
    return result


def describe(result: dict) -> str:
    """One progress line: rate, spread and peak memory, or why the test did not run."""
    head = f"{result['test']} batch {result['batch']}: "
    if "error" in result:
        return head + result["error"]
    line = head + f"{result['mean_tokens_per_second']:.2f} ± {result['stddev_tokens_per_second']:.2f} t/s"
    if result.get("mean_ms_per_step") is not None:
        line += f", {result['mean_ms_per_step']:.2f} ms/step"
    if result.get("peak_memory_bytes") is not None:
        line += f", peak {result['peak_memory_bytes'] / GIB:.2f} GiB"
    return line


def format_count(value: float) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return str(int(value))


def print_table(report: dict) -> None:
    summary = report["config_summary"]
    model = f"deepseek_v4 d{summary['hidden_size']} E{summary['n_routed_experts']}"
    size = f"{report['weight_bytes'] / GIB:.2f} GiB"
    params = format_count(report["parameters"])
    backend = f"HF eager bf16 ({report['device_name']})"
    header = ("model", "layers", "size", "params", "backend", "batch", "test", "t/s")
    rows = []
    for result in report["results"]:
        if "error" in result:
            rate = result["error"].split(":")[0]
        else:
            rate = f"{result['mean_tokens_per_second']:.2f} ± {result['stddev_tokens_per_second']:.2f}"
        rows.append((model, str(report["layers"]), size, params, backend, str(result["batch"]), result["test"], rate))
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    numeric = {1, 2, 3, 5, 7}

    def line(cells):
        padded = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("| " + " | ".join("-" * (w - 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + " |")
    for row in rows:
        print(line(row))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    config_dict, config_path = load_config_dict(args.config, args.overrides, notes)

    import torch
    import transformers

    try:
        from transformers import AutoModelForCausalLM
        from transformers.models.deepseek_v4 import modeling_deepseek_v4  # noqa: F401 (fails early if absent)
    except ImportError as error:
        sys.exit(f"error: transformers {transformers.__version__} has no DeepSeek-V4 model: {error}")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but torch sees no CUDA device (use --device cpu for a smoke run)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        device_name = platform.processor() or platform.machine()
        notes.append("CPU smoke run: numbers are not a GPU baseline")
    else:
        sys.exit(f"error: --device {args.device}: only cuda[:N] and cpu are supported")

    full_config = build_config(config_dict)
    max_layers = full_config.num_hidden_layers
    base_bytes, layer_bytes = meta_model_sizes(full_config)
    free_bytes = free_memory_bytes(device)
    planned = [(f"pp{length}", "prefill", 1, prefill_activation_bytes(full_config, length))
               for length in args.prompt_lengths]
    if args.gen > 0:
        planned += [(f"tg{args.gen}", "decode", batch, decode_activation_bytes(full_config, batch, args.gen))
                    for batch in args.batch_sizes]
    # A test whose eager activations cannot fit even next to a single layer is skipped (and recorded), so that
    # e.g. pp32768 does not shrink the model for every other test to nothing.
    smallest_model_bytes = base_bytes + layer_bytes[0]
    runnable = [test for test in planned if smallest_model_bytes + test[3] + ACTIVATION_MARGIN_BYTES <= free_bytes]
    activation_bytes = max((test[3] for test in runnable), default=0)
    headroom_bytes = max(int(args.headroom_gib * GIB), activation_bytes + ACTIVATION_MARGIN_BYTES)
    if args.layers is not None:
        headroom_bytes = int(args.headroom_gib * GIB)  # an explicit depth is refused only against --headroom-gib
    layers = choose_layers(args.layers, max_layers, base_bytes, layer_bytes, headroom_bytes, free_bytes, device_name)
    model_bytes = base_bytes + sum(layer_bytes[:layers])
    skipped = {}
    for name, kind, batch, need in planned:
        if model_bytes + need + ACTIVATION_MARGIN_BYTES > free_bytes:
            skipped[(name, batch)] = (f"skipped: eager activations need ~{need / GIB:.1f} GiB, only "
                                      f"{(free_bytes - model_bytes) / GIB:.1f} GiB free next to the weights")

    config = build_config(truncate_layers(config_dict, layers))
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, device {device_name}")
    print(f"# config {config_path} -> first {layers} of {max_layers} layers: weights {model_bytes / GIB:.1f} GiB, "
          f"free {free_bytes / GIB:.1f} GiB, headroom {headroom_bytes / GIB:.1f} GiB "
          f"(largest eager activation estimate {activation_bytes / GIB:.1f} GiB)")
    print("# built config: " + json.dumps(config.to_diff_dict(), sort_keys=True, default=str))

    build_start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    build_kwargs = {"dtype": torch.bfloat16, "attn_implementation": "eager"}
    if args.experts_implementation != "default":
        build_kwargs["experts_implementation"] = args.experts_implementation
    # Parameters are created and randomly initialised on the device itself: no host copy of the weights.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **build_kwargs)
    model.eval()
    with torch.inference_mode():
        randomise_hash_routing(model, generator, device, notes)
    synchronize(device)
    build_seconds = time.perf_counter() - build_start
    notes.append("weights: transformers' own random init (normal, std = initializer_range) run on the device; "
                 "_keep_in_fp32_modules_strict (norms, sinks, mHC mixers) is not applied: from_config builds every "
                 "parameter in bf16 (casting those to fp32 by hand breaks the eager forward with a dtype mismatch)")
    notes.append("tg tests start from an empty KV cache with one random token per sequence (llama-bench tgN); "
                 "each step feeds back the greedy argmax without a host sync")

    weight_bytes = module_bytes(model)
    # Guards against a transformers version that leaves from_config weights uninitialised (all-equal router
    # scores would send every token to the same experts and flatter the MoE timings). One expert: no big copy.
    routed_experts_std = float(model.model.layers[0].mlp.experts.gate_up_proj[-1].detach().float().std())
    if not routed_experts_std > 0.0:
        sys.exit(f"error: the routed experts were not randomly initialised (std {routed_experts_std})")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    attn_implementation = model.config._attn_implementation
    experts_implementation = model.config._experts_implementation
    print(f"# built {format_count(parameters)} parameters ({weight_bytes / GIB:.2f} GiB) in {build_seconds:.1f} s; "
          f"routed-expert weight std {routed_experts_std:.4f}; attention {attn_implementation}, experts "
          f"{experts_implementation}; layer kinds "
          f"{list(zip(config.layer_types, config.mlp_layer_types))}")

    results = []
    with torch.inference_mode():
        for length in args.prompt_lengths:
            name = f"pp{length}"
            if (name, 1) in skipped:
                result = {"test": name, "kind": "prefill", "batch": 1, "error": skipped[(name, 1)]}
            else:
                tokens = torch.randint(0, config.vocab_size, (1, length), generator=generator, device=device)
                result = measure(name, "prefill", 1, length, args.repetitions, device,
                                 lambda tokens=tokens: run_prefill(model, tokens))
            results.append(result)
            print(f"# {describe(result)}", flush=True)
        if args.gen > 0:
            for batch in args.batch_sizes:
                name = f"tg{args.gen}"
                if (name, batch) in skipped:
                    result = {"test": name, "kind": "decode", "batch": batch, "error": skipped[(name, batch)]}
                else:
                    first = torch.randint(0, config.vocab_size, (batch, 1), generator=generator, device=device)
                    result = measure(name, "decode", batch, batch * args.gen, args.repetitions, device,
                                     lambda first=first: run_decode(model, first, args.gen))
                results.append(result)
                print(f"# {describe(result)}", flush=True)
        kernels_per_step = None
        if device.type == "cuda":
            rates = getattr(config, "compress_rates", None) or {}
            window = max(1, int(rates.get("compressed_sparse_attention", 4)))
            first = torch.randint(0, config.vocab_size, (1, 1), generator=generator, device=device)
            try:
                kernels_per_step = count_decode_kernels(model, first, device, warm_steps=2 * window,
                                                        counted_steps=window)
            except RuntimeError as error:  # e.g. no CUPTI: the timings above stand without the count
                notes.append(f"kernel count unavailable: torch.profiler failed: {error}")
            else:
                print(f"# batch-1 decode: {kernels_per_step:.0f} device activities (kernels, memcpy, memset) per "
                      f"step, {kernels_per_step / layers:.0f} per layer (embedding, final norm, lm_head included)")

    report = {
        "benchmark": "hf_eager_baseline",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "device_name": device_name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "config_file": str(config_path),
        "config_summary": {
            key: getattr(config, key, None)
            for key in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "q_lora_rank",
                        "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                        "moe_intermediate_size", "index_n_heads", "index_head_dim", "index_topk", "sliding_window",
                        "compress_rates", "hc_mult", "scoring_func")
        },
        "layers": layers,
        "full_depth_layers": max_layers,
        "layer_types": list(config.layer_types),
        "mlp_layer_types": list(config.mlp_layer_types),
        "dtype": "bfloat16",
        "attn_implementation": attn_implementation,
        "experts_implementation": experts_implementation,
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "build_seconds": build_seconds,
        "repetitions": args.repetitions,
        "results": results,
        # Batch-1 decode, from torch.profiler; per layer = per step / layers (embedding, head and sampling included).
        "device_activities_per_decode_step": kernels_per_step,
        "device_activities_per_decode_step_per_layer": None if kernels_per_step is None else kernels_per_step / layers,
        # Each test's peak includes the resident weights; the largest is the run's peak (None on the CPU).
        "peak_memory_bytes": max((result["peak_memory_bytes"] for result in results
                                  if result.get("peak_memory_bytes") is not None), default=None),
        "notes": notes,
    }
    print_table(report)
    for note in notes:
        print(f"# note: {note}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
