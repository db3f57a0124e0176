#include "model/weight_slots.hpp"

namespace dsv4 {

namespace {

class SlotList {
 public:
  explicit SlotList(bool optional) : optional_(optional) {}
  void matrix(std::string name, int64_t rows, int64_t cols, ReleaseStorage storage) {
    slots.push_back({std::move(name), SlotKind::Matrix, {rows, cols}, storage, optional_});
  }
  void vector(std::string name, std::vector<int64_t> shape, ReleaseStorage storage) {
    slots.push_back({std::move(name), SlotKind::Vector, std::move(shape), storage, optional_});
  }
  void table(std::string name, int64_t rows, int64_t cols) {
    slots.push_back({std::move(name), SlotKind::ExpertTable, {rows, cols}, ReleaseStorage::I64, optional_});
  }
  std::vector<WeightSlot> slots;

 private:
  bool optional_;
};

void hyper_connection(SlotList& s, const ModelConfig& c, const std::string& prefix, int64_t outputs, int64_t scales) {
  s.matrix(prefix + "fn", outputs, c.hc_dim(), ReleaseStorage::F32);
  s.vector(prefix + "base", {outputs}, ReleaseStorage::F32);
  s.vector(prefix + "scale", {scales}, ReleaseStorage::F32);
}

void compressor(SlotList& s, const std::string& p, int64_t width, int64_t overlap, int64_t ratio, int64_t hidden) {
  s.matrix(p + "wkv.weight", overlap * width, hidden, ReleaseStorage::BF16);
  s.matrix(p + "wgate.weight", overlap * width, hidden, ReleaseStorage::BF16);
  s.vector(p + "ape", {ratio, overlap * width}, ReleaseStorage::F32);
  s.vector(p + "norm.weight", {width}, ReleaseStorage::BF16);
}

void expert(SlotList& s, const std::string& p, int64_t inter, int64_t hidden, ReleaseStorage storage) {
  s.matrix(p + "w1.weight", inter, hidden, storage);
  s.matrix(p + "w2.weight", hidden, inter, storage);
  s.matrix(p + "w3.weight", inter, hidden, storage);
}

void block(SlotList& s, const ModelConfig& c, const std::string& p, LayerKind kind, int ratio, bool hash) {
  const int64_t d = c.hidden_size, n = c.mhc.hc_mult;
  s.vector(p + "attn_norm.weight", {d}, ReleaseStorage::BF16);
  s.vector(p + "ffn_norm.weight", {d}, ReleaseStorage::BF16);
  hyper_connection(s, c, p + "hc_attn_", (2 + n) * n, 3);
  hyper_connection(s, c, p + "hc_ffn_", (2 + n) * n, 3);

  const std::string a = p + "attn.";
  s.matrix(a + "wq_a.weight", c.q_lora_rank, d, ReleaseStorage::FP8_BLOCK128);
  s.vector(a + "q_norm.weight", {c.q_lora_rank}, ReleaseStorage::BF16);
  s.matrix(a + "wq_b.weight", c.q_dim(), c.q_lora_rank, ReleaseStorage::FP8_BLOCK128);
  s.matrix(a + "wkv.weight", c.head_dim, d, ReleaseStorage::FP8_BLOCK128);
  s.vector(a + "kv_norm.weight", {c.head_dim}, ReleaseStorage::BF16);
  s.matrix(a + "wo_a.weight", c.o_proj_dim(), c.o_group_input_dim(), ReleaseStorage::FP8_BLOCK128);
  s.matrix(a + "wo_b.weight", d, c.o_proj_dim(), ReleaseStorage::FP8_BLOCK128);
  s.vector(a + "attn_sink", {c.num_heads}, ReleaseStorage::F32);
  // CSA pools overlapping windows, so its compressor projections carry two series.
  if (kind != LayerKind::SlidingWindow)
    compressor(s, a + "compressor.", c.head_dim, kind == LayerKind::CompressedSparse ? 2 : 1, ratio, d);
  if (kind == LayerKind::CompressedSparse) {
    s.matrix(a + "indexer.wq_b.weight", int64_t{c.indexer.num_heads} * c.indexer.head_dim, c.q_lora_rank,
             ReleaseStorage::FP8_BLOCK128);
    s.matrix(a + "indexer.weights_proj.weight", c.indexer.num_heads, d, ReleaseStorage::BF16);
    compressor(s, a + "indexer.compressor.", c.indexer.head_dim, 2, ratio, d);
  }

  const std::string m = p + "ffn.";
  const int64_t experts = c.moe.num_routed_experts, inter = c.moe.intermediate_size;
  s.matrix(m + "gate.weight", experts, d, ReleaseStorage::BF16);
  if (hash)
    s.table(m + "gate.tid2eid", c.vocab_size, c.moe.experts_per_token);
  else
    s.vector(m + "gate.bias", {experts}, ReleaseStorage::F32);
  for (int64_t e = 0; e < experts; ++e)
    expert(s, m + "experts." + std::to_string(e) + ".", inter, d, ReleaseStorage::MXFP4);
  expert(s, m + "shared_experts.", inter * c.moe.num_shared_experts, d, ReleaseStorage::FP8_BLOCK128);
}

}  // namespace

std::vector<WeightSlot> weight_slots(const ModelConfig& c) {
  const int64_t d = c.hidden_size, n = c.mhc.hc_mult;
  SlotList s(false);
  s.matrix("embed.weight", c.vocab_size, d, ReleaseStorage::BF16);
  s.matrix("head.weight", c.vocab_size, d, ReleaseStorage::BF16);
  s.vector("norm.weight", {d}, ReleaseStorage::BF16);
  hyper_connection(s, c, "hc_head_", n, 1);
  for (int i = 0; i < c.num_layers; ++i)
    block(s, c, "layers." + std::to_string(i) + ".", c.layer_kind(i), c.compress_ratio(i), c.is_hash_routed(i));

  SlotList mtp(true);
  for (int i = 0; i < c.num_mtp_layers; ++i) {
    const std::string p = "mtp." + std::to_string(i) + ".";
    block(mtp, c, p, LayerKind::SlidingWindow, 0, false);
    mtp.matrix(p + "e_proj.weight", d, d, ReleaseStorage::FP8_BLOCK128);
    mtp.matrix(p + "h_proj.weight", d, d, ReleaseStorage::FP8_BLOCK128);
    for (const char* norm : {"enorm.weight", "hnorm.weight", "norm.weight"})
      mtp.vector(p + norm, {d}, ReleaseStorage::BF16);
    hyper_connection(mtp, c, p + "hc_head_", n, 1);
  }
  s.slots.insert(s.slots.end(), mtp.slots.begin(), mtp.slots.end());
  return std::move(s.slots);
}

}  // namespace dsv4
