// dsv4 inspect DIR: what a checkpoint holds and whether the engine can load it.
#include "command_registry.hpp"
#include "model/checkpoint_loader.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <string>

namespace dsv4::app {
namespace {

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024.0 && unit < 4) bytes /= 1024.0, ++unit;
  char buf[32];
  std::snprintf(buf, sizeof buf, unit ? "%.2f %s" : "%.0f %s", bytes, units[unit]);
  return buf;
}

std::string short_kind(LayerKind kind, int ratio) {
  switch (kind) {
    case LayerKind::SlidingWindow: return "SWA";
    case LayerKind::CompressedSparse: return "CSA/" + std::to_string(ratio);
    case LayerKind::HeavilyCompressed: return "HCA/" + std::to_string(ratio);
  }
  return "?";
}

// "0-1 SWA, 2 CSA/4, 3 HCA/128, ..." with runs of equal kinds folded.
std::string layer_summary(const ModelConfig& c) {
  std::string out;
  for (int i = 0; i < c.num_layers;) {
    int j = i;
    const std::string kind = short_kind(c.layer_kind(i), c.compress_ratio(i));
    while (j + 1 < c.num_layers && short_kind(c.layer_kind(j + 1), c.compress_ratio(j + 1)) == kind) ++j;
    if (!out.empty()) out += ", ";
    out += (i == j ? std::to_string(i) : std::to_string(i) + "-" + std::to_string(j)) + " " + kind;
    i = j + 1;
  }
  return out;
}

int run_inspect(const std::string& dir, bool as_json, bool verbose) {
  const LoadedCheckpoint ckpt = load_checkpoint(dir);
  const ModelConfig& c = ckpt.config;
  int counts[4] = {0, 0, 0, 0};
  for (const CheckpointIssue& issue : ckpt.issues) ++counts[int(issue.kind)];

  if (as_json) {
    nlohmann::json formats = nlohmann::json::object();
    for (const auto& [format, t] : ckpt.totals)
      formats[format] = {{"tensors", t.tensors}, {"parameters", t.parameters}, {"bytes", t.bytes}};
    nlohmann::json issues = nlohmann::json::array();
    for (const CheckpointIssue& issue : ckpt.issues)
      issues.push_back({{"kind", to_string(issue.kind)}, {"tensor", issue.tensor}, {"message", issue.message}});
    nlohmann::json out = {{"checkpoint", dir},
                          {"layout", ckpt.layout},
                          {"config_spelling", to_string(c.source_format)},
                          {"config", c.summary_json()},
                          {"formats", formats},
                          {"weight_bytes", ckpt.weight_bytes()},
                          {"file_bytes", ckpt.store.total_bytes()},
                          {"mtp_modules_loaded", ckpt.weights.mtp.size()},
                          {"ignored", ckpt.ignored},
                          {"issues", issues},
                          {"loadable", ckpt.loadable()}};
    std::printf("%s\n", out.dump(2).c_str());
    return ckpt.loadable() ? 0 : 1;
  }

  std::printf("checkpoint   %s\n", dir.c_str());
  std::printf("layout       %s tensors, %s config.json (%zu shards, %s on disk)\n", ckpt.layout.c_str(),
              std::string(to_string(c.source_format)).c_str(), ckpt.store.shards().size(),
              human_bytes(double(ckpt.store.total_bytes())).c_str());
  std::printf("model        hidden %d, %d layers, %d heads x %d (rope %d), vocab %d, window %d\n", c.hidden_size,
              c.num_layers, c.num_heads, c.head_dim, c.rope_head_dim, c.vocab_size, c.window_size);
  std::printf("attention    q_lora %d, o_groups %d x %d, indexer %d heads x %d top-%d\n", c.q_lora_rank, c.o_groups,
              c.o_lora_rank, c.indexer.num_heads, c.indexer.head_dim, c.indexer.topk);
  int hash_layers = 0;
  for (int i = 0; i < c.num_layers; ++i) hash_layers += c.is_hash_routed(i);
  std::printf("moe          %d experts, top-%d, %d shared, intermediate %d, %s, scale %.3g, %d hash-routed layers\n",
              c.moe.num_routed_experts, c.moe.experts_per_token, c.moe.num_shared_experts, c.moe.intermediate_size,
              std::string(to_string(c.moe.scoring)).c_str(), c.moe.routed_scaling_factor, hash_layers);
  std::printf("mHC          %d streams, %d Sinkhorn iterations\n", c.mhc.hc_mult, c.mhc.sinkhorn_iters);
  std::printf("layers       %s\n", layer_summary(c).c_str());
  std::printf("MTP          %d in config, %zu loaded\n", c.num_mtp_layers, ckpt.weights.mtp.size());
  std::printf("\n%-14s %8s %16s %12s\n", "format", "tensors", "parameters", "bytes");
  int64_t params = 0;
  for (const auto& [format, t] : ckpt.totals) {
    std::printf("%-14s %8lld %16lld %12s\n", format.c_str(), (long long)t.tensors, (long long)t.parameters,
                human_bytes(double(t.bytes)).c_str());
    params += t.parameters;
  }
  std::printf("%-14s %8s %16lld %12s   (memory to hold the weights)\n", "total", "", (long long)params,
              human_bytes(double(ckpt.weight_bytes())).c_str());
  if (!ckpt.ignored.empty()) std::printf("\nignored      %zu tensors (e.g. %s): unused by design\n",
                                         ckpt.ignored.size(), ckpt.ignored.front().c_str());

  if (!ckpt.issues.empty()) {
    std::printf("\nissues       %d missing, %d unexpected, %d bad shape, %d bad format\n", counts[0], counts[1],
                counts[2], counts[3]);
    const size_t limit = verbose ? ckpt.issues.size() : 40;
    for (size_t i = 0; i < ckpt.issues.size() && i < limit; ++i)
      std::printf("  %-10s %s: %s\n", std::string(to_string(ckpt.issues[i].kind)).c_str(),
                  ckpt.issues[i].tensor.c_str(), ckpt.issues[i].message.c_str());
    if (ckpt.issues.size() > limit) std::printf("  ... %zu more (--verbose lists all)\n", ckpt.issues.size() - limit);
  }
  std::printf("\n%s\n", ckpt.loadable() ? "loadable: yes" : "loadable: NO");
  return ckpt.loadable() ? 0 : 1;
}

const CommandRegistration registration{{
    "inspect",
    "Describe a checkpoint: config, layer kinds, formats, memory, missing/unexpected tensors",
    [](CLI::App& sub) -> std::function<int()> {
      auto dir = std::make_shared<std::string>();
      auto as_json = std::make_shared<bool>(false);
      auto verbose = std::make_shared<bool>(false);
      sub.add_option("dir", *dir, "Checkpoint directory (config.json + safetensors)")->required();
      sub.add_flag("--json", *as_json, "Machine-readable output");
      sub.add_flag("-v,--verbose", *verbose, "List every issue");
      return [=] { return run_inspect(*dir, *as_json, *verbose); };
    },
}};

}  // namespace
}  // namespace dsv4::app
