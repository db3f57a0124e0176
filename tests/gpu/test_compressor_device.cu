// The compressor on the GPU against cpu::compressor_pool: CSA (ratio 4, overlapping; main c = 512 and indexer
// c = 128) and HCA (ratio 128). Three sequences of different lengths, each in its own state slot (odd slots of a
// larger state), are fed together, one launch per step: one token each (a batched decode), chunks cycling 2/3 (runs
// that cross a CSA window yet stay within one window's worth of tokens: the per-slice state update), chunks cycling
// 3/7/13 at different phases (runs of different lengths in one launch), or each whole sequence in one launch; every GPU
// chunking is compared with the CPU's one pass per sequence. Exact numerics (fp32 entries by run, with their entry
// numbers and slots) and reference numerics (bf16 before the norm, fp8 KV or Hadamard + fp4 indexer rounding of
// the stored entries; bf16 output keyed by slot and entry number; fp8 codes + scale per entry, the indexer's fp8
// keys, against the reference's fp8 rule on the CPU's entry); and the main compressor's entries stored
// straight into a paged KV cache (bf16, fp8 layout) at their rows, decoded back. Outputs are poisoned and every
// element checked, as are the entry numbers known from positions. kv and gate also as slices of one wider projection
// output (then with the runs read before the kernel's wait, runs_ready_at_launch). Two compressors in one launch
// (run_compressors), also with the indexer's query preparation, and every split of an entry over CTAs, forced; every
// case again with the slot loads forced to shared-memory staging and to registers (CompressorParams::slot_loads; the
// other tests run the default, Auto: lean or staged prefill chunks, register decode steps), alone and in pairs, and
// the lean slot loads forced on every case that takes them (one-pass softmax: the CPU's tolerance).
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backends/cpu/compressor.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/compressor.cuh"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/kv_entry_decode.hpp"

namespace dsv4::cuda {
namespace {

struct CompressorCase {
  const char* name;
  int64_t head_dim, ratio;
  bool overlapping;
  int64_t rope_dim;
  int64_t tokens;  // sequence length
  CompressorStoredRounding rounding;
  bool round_pooled;
  bool bf16_output;
  bool fp8_output = false;  // slot_entries_fp8: e4m3 codes and a scale per entry (the indexer's fp8 keys)
};

constexpr int kSequences = 3;

// Chunk sizes that cover a sequence: 1 at a time, cycling 2/3 or 3/7/13 from phase `phase`, or one pass.
std::vector<int64_t> chunking(const std::string& kind, int64_t tokens, int phase) {
  std::vector<int64_t> sizes;
  if (kind == "one pass") return {tokens};
  const std::vector<int64_t> cycle = kind == "single tokens"    ? std::vector<int64_t>{1}
                                     : kind == "chunks of 2/3" ? std::vector<int64_t>{2, 3}
                                                               : std::vector<int64_t>{3, 7, 13};
  for (int64_t done = 0, i = phase; done < tokens; ++i) {
    const int64_t n = std::min(cycle[size_t(i) % cycle.size()], tokens - done);
    sizes.push_back(n);
    done += n;
  }
  return sizes;
}

struct Sequence {
  int slot;
  int64_t tokens;
  std::vector<float> kv, gate;  // [tokens, width]
  std::vector<float> expected;  // [total, c]
  int64_t total = 0;
  std::vector<float> got;       // fp32 output, in entry order
  std::vector<int64_t> chunks;
  size_t next_chunk = 0;
  int64_t position = 0;
};

// One case's GPU run against the CPU's one pass per sequence, step by step, so that several cases can share launches
// (run_compressors). to_cache: the entries go straight into a paged KV cache (bf16, or the fp8 layout for the KvFp8
// cases) instead of the case's own output. stacked: kv and gate are slices of one wider projection output ([kv | gate
// | NaN gap] per token, row_stride apart), as the model's stacked compressor projections give them.
class CaseCheck {
 public:
  CaseCheck(const CompressorCase& c, const std::string& chunks, uint32_t seed, bool to_cache = false,
            bool stacked = false)
      : c_(c),
        chunks_(chunks),
        to_cache_(to_cache),
        stacked_(stacked),
        reference_(c.rounding != CompressorStoredRounding::None || c.round_pooled || c.bf16_output ||
                   c.fp8_output || to_cache),
        width_(c.overlapping ? 2 * c.head_dim : c.head_dim),
        stride_(2 * width_ + 6),
        rope_(160000.0, c.rope_dim, cpu::YarnScaling{}) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> ape(size_t(c.ratio * width_)), norm(size_t(c.head_dim));
    for (float& v : ape) v = normal(rng);
    for (float& v : norm) v = 1.0f + 0.25f * normal(rng);

    // Sequences of different lengths in slots 1, 3, 5 of a 7-slot state; the CPU's one pass of each.
    sequences_.resize(kSequences);
    int64_t longest = 0;
    for (int q = 0; q < kSequences; ++q) {
      Sequence& sq = sequences_[size_t(q)];
      sq.slot = 2 * q + 1;
      sq.tokens = std::max<int64_t>(1, c.tokens - q * (c.tokens / 3 + 1));
      longest = std::max(longest, sq.tokens);
      sq.kv.resize(size_t(sq.tokens * width_));
      sq.gate.resize(sq.kv.size());
      for (float& v : sq.kv) v = normal(rng);
      for (float& v : sq.gate) v = 2.0f * normal(rng);
      cpu::CompressorParams cpu_params{1, c.head_dim, c.ratio, c.overlapping, 1e-6f, c.round_pooled};
      cpu::CompressorState cpu_state(c.ratio, c.head_dim, c.overlapping);
      sq.total = cpu::compressor_pool(cpu_params, {nullptr, nullptr, ape.data(), norm.data()}, rope_, cpu_state,
                                      sq.kv.data(), sq.gate.data(), sq.tokens, sq.expected);
      if (c.rounding == CompressorStoredRounding::KvFp8)
        cpu::round_kv_reference(sq.expected.data(), sq.total, c.head_dim, c.rope_dim);
      if (c.rounding == CompressorStoredRounding::IndexerFp4)
        cpu::round_indexer_reference(sq.expected.data(), sq.total, c.head_dim);
      if (c.bf16_output || c.fp8_output || (to_cache && c.rounding == CompressorStoredRounding::None))
        for (float& v : sq.expected) v = round_to_bf16(v);
      // fp8 keys: the bf16 entry as one fp8 block of head_dim (DeepSeek's rule; lossless after the fp4 rounding).
      if (c.fp8_output) cpu::round_fp8_blocks_ue8m0(sq.expected.data(), sq.total * c.head_dim, c.head_dim);
      sq.chunks = chunking(chunks, sq.tokens, q);
    }

    d_ape_ = to_device(ape, "ape"), d_norm_ = to_device(norm, "norm");
    d_freq_ = to_device(rope_.frequencies(), "rope frequencies");
    state_.emplace(c.ratio, c.head_dim, c.overlapping, kSlots);
    capacity_ = longest / c.ratio + 1;  // bf16 output: entries per slot
    longest_ = longest;
    d_keys_ = DeviceBuffer(size_t(kSlots * capacity_ * c.head_dim) * 2, "slot entries");
    d_keys_.fill_bytes(0xFF);
    d_scales_ = DeviceBuffer(size_t(kSlots * scale_stride()) * 4, "slot entry scales");
    d_scales_.fill_bytes(0xFF);
    d_kv_ = DeviceBuffer(size_t(kSequences * longest * width_) * 4, "step kv");
    d_gate_ = DeviceBuffer(d_kv_.bytes(), "step gate");
    d_stacked_ = DeviceBuffer(size_t(kSequences * longest * stride_) * 4, "step stacked projections");
    if (to_cache) make_cache();
  }

  const std::string& name() const { return name_; }
  // Every launch splits an entry over `ctas` CTAs (CompressorParams::cluster_ctas) instead of the launcher's choice.
  void force_cluster(int ctas) {
    cluster_ctas_ = ctas;
    name_ += ", " + std::to_string(ctas) + " CTAs per entry";
  }
  // Every launch reads its RoPE factors from a table of every window start (CompressorParams::rope_table, built from
  // the CPU's angles) instead of the frequencies (then null).
  void use_rope_table() {
    const int64_t pairs = c_.rope_dim / 2;
    std::vector<float> table(static_cast<size_t>(2 * (longest_ + 1) * pairs));
    std::vector<float> cos_values(static_cast<size_t>(pairs)), sin_values(static_cast<size_t>(pairs));
    for (int64_t position = 0; position <= longest_; ++position) {
      rope_.angles(position, cos_values.data(), sin_values.data());
      for (int64_t i = 0; i < pairs; ++i) {
        table[size_t(2 * (position * pairs + i))] = cos_values[size_t(i)];
        table[size_t(2 * (position * pairs + i) + 1)] = sin_values[size_t(i)];
      }
    }
    d_rope_table_ = to_device(table, "rope table");
    name_ += ", RoPE table";
  }
  // Every launch loads its slots the given way (CompressorParams::slot_loads) instead of the launcher's choice.
  void force_slot_loads(CompressorSlotLoads loads) {
    slot_loads_ = loads;
    name_ += loads == CompressorSlotLoads::Staged ? ", staged slot loads"
             : loads == CompressorSlotLoads::Lean ? ", lean slot loads"
                                                  : ", register slot loads";
  }

  // The next step's launch parameters (its runs and projections uploaded, its outputs poisoned): the next chunk of
  // every sequence that has one. False when every sequence is done.
  bool next_step(CompressorParams& p) {
    runs_.clear(), in_step_.clear();
    std::vector<float> kv, gate;
    int64_t max_run = 0;
    for (Sequence& sq : sequences_) {
      if (sq.next_chunk == sq.chunks.size()) continue;
      const int64_t n = sq.chunks[sq.next_chunk++];
      runs_.push_back({.start_position = sq.position, .slot = sq.slot,
                       .first_token = int32_t(kv.size() / size_t(width_)), .tokens = int32_t(n)});
      kv.insert(kv.end(), sq.kv.begin() + sq.position * width_, sq.kv.begin() + (sq.position + n) * width_);
      gate.insert(gate.end(), sq.gate.begin() + sq.position * width_, sq.gate.begin() + (sq.position + n) * width_);
      in_step_.push_back(&sq);
      max_run = std::max(max_run, n);
    }
    if (runs_.empty()) return false;
    if (stacked_) {
      const size_t tokens = kv.size() / size_t(width_);
      std::vector<float> rows(tokens * size_t(stride_), std::nanf(""));
      for (size_t t = 0; t < tokens; ++t) {
        const auto from = std::ptrdiff_t(t * size_t(width_)), to = std::ptrdiff_t(t * size_t(stride_));
        std::copy_n(kv.begin() + from, width_, rows.begin() + to);
        std::copy_n(gate.begin() + from, width_, rows.begin() + to + width_);
      }
      d_stacked_.upload(rows.data(), rows.size() * 4);
    } else {
      d_kv_.upload(kv.data(), kv.size() * 4);
      d_gate_.upload(gate.data(), gate.size() * 4);
    }
    d_runs_ = to_device(runs_, "runs");
    per_run_ = compressor_max_entries(max_run, c_.ratio);
    rows_ = runs_.size() * size_t(per_run_);
    d_entries_ = poisoned(rows_ * size_t(c_.head_dim), "entries");
    d_rows_ = poisoned(rows_, "entry rows"), d_slots_ = poisoned(rows_, "entry slots");
    p = CompressorParams{.head_dim = c_.head_dim,
                         .ratio = c_.ratio,
                         .overlapping = c_.overlapping,
                         .norm_eps = 1e-6f,
                         .round_pooled_to_bf16 = c_.round_pooled,
                         .stored_rounding = c_.rounding,
                         .kv = d_kv_.as<float>(),
                         .gate = d_gate_.as<float>(),
                         .runs = d_runs_.as<CompressorRun>(),
                         .run_count = int(runs_.size()),
                         .max_run_tokens = max_run,
                         .ape = d_ape_.as<float>(),
                         .norm_weight = d_norm_.as<float>(),
                         .rope_frequencies = d_rope_table_.data() == nullptr ? d_freq_.as<float>() : nullptr,
                         .rope_table = d_rope_table_.data() == nullptr ? nullptr : d_rope_table_.as<float2>(),
                         .rope_dim = c_.rope_dim,
                         .state = state_->view(),
                         .cluster_ctas = cluster_ctas_,
                         .slot_loads = slot_loads_};
    if (stacked_) {
      // As the model's step runs it: stacked projections, and the runs copied before the chain began (loaded before
      // the kernel's wait).
      p.kv = d_stacked_.as<float>(), p.gate = d_stacked_.as<float>() + width_, p.row_stride = stride_;
      p.runs_ready_at_launch = true;
    }
    if (to_cache_) {
      p.stored_rounding = CompressorStoredRounding::None, p.cache = cache_->view(), p.cache_layer = kCacheLayer;
    } else if (c_.bf16_output) {
      p.slot_entries_bf16 = d_keys_.as<__nv_bfloat16>(), p.slot_entry_stride = capacity_ * c_.head_dim;
      p.slot_entry_capacity = capacity_;
    } else if (c_.fp8_output) {
      p.slot_entries_fp8 = d_keys_.as<uint8_t>(), p.slot_entry_stride = capacity_ * c_.head_dim;
      p.slot_entry_capacity = capacity_;
      p.slot_entry_scales = d_scales_.as<float>(), p.slot_scale_stride = scale_stride();
    } else {
      p.entries = d_entries_.as<float>(), p.entry_rows = d_rows_.as<int32_t>(), p.entry_slots = d_slots_.as<int32_t>();
    }
    ++step_;
    return true;
  }

  // After the step's launch has completed: its fp32 entries, entry numbers and slots; then the positions move on.
  void check_step() {
    SCOPED_TRACE(name_);
    if (!c_.bf16_output && !c_.fp8_output && !to_cache_) {
      const std::vector<float> entries = download(d_entries_, rows_ * size_t(c_.head_dim));
      std::vector<int32_t> entry_rows(rows_), entry_slots(rows_);
      const std::vector<float> raw_rows = download(d_rows_, rows_), raw_slots = download(d_slots_, rows_);
      std::memcpy(entry_rows.data(), raw_rows.data(), rows_ * 4);
      std::memcpy(entry_slots.data(), raw_slots.data(), rows_ * 4);
      for (size_t r = 0; r < runs_.size(); ++r) {
        Sequence& sq = *in_step_[r];
        const int64_t emitted = compressor_entries_emitted(sq.position, runs_[r].tokens, c_.ratio);
        for (int64_t e = 0; e < per_run_; ++e) {
          const size_t row = r * size_t(per_run_) + size_t(e);
          ASSERT_EQ(entry_slots[row], sq.slot) << "step " << step_ << " run " << r << " row " << e;
          if (e >= emitted) {
            ASSERT_EQ(entry_rows[row], -1) << "step " << step_ << " run " << r << " row " << e;
            uint32_t bits;
            std::memcpy(&bits, &entries[row * size_t(c_.head_dim)], 4);
            ASSERT_EQ(bits, 0xFFFFFFFFu) << "step " << step_ << ": an entry row with no entry was written";
            continue;
          }
          ASSERT_EQ(entry_rows[row], compressor_first_entry(sq.position, c_.ratio) + e)
              << "step " << step_ << " run " << r;
          ASSERT_EQ(int64_t(sq.got.size()) / c_.head_dim, entry_rows[row]);
          sq.got.insert(sq.got.end(), entries.begin() + std::ptrdiff_t(row * size_t(c_.head_dim)),
                        entries.begin() + std::ptrdiff_t((row + 1) * size_t(c_.head_dim)));
        }
      }
    }
    for (size_t r = 0; r < runs_.size(); ++r) in_step_[r]->position += runs_[r].tokens;
  }

  // After the last step: the cache's or the bf16 output's entries, then every sequence against the CPU.
  void finish() {
    SCOPED_TRACE(name_);
    if (to_cache_) {
      // Every sequence's entries from its rows; nothing else in the pool touched.
      const KvCacheView view = cache_->view();
      std::vector<uint8_t> pool(size_t(cache_->config().pages * kPageRows) * size_t(view.layout.entry_bytes));
      ASSERT_EQ(cudaMemcpy(pool.data(), view.pool, pool.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      std::vector<int32_t> table(size_t(kSlots * 2 * 2 * view.max_pages_per_array));
      ASSERT_EQ(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      std::vector<bool> written(pool.size() / size_t(view.layout.entry_bytes), false);
      for (Sequence& sq : sequences_) {
        const int32_t* pages = &table[size_t(((sq.slot * 2 + kCacheLayer) * 2 + 1) * view.max_pages_per_array)];
        for (int64_t w = 0; w < sq.total; ++w) {
          const int64_t physical = int64_t(pages[w / kPageRows]) * kPageRows + w % kPageRows;
          written[size_t(physical)] = true;
          const std::vector<float> v =
              decode_kv_entry(view.layout, &pool[size_t(physical) * view.layout.entry_bytes]);
          sq.got.insert(sq.got.end(), v.begin(), v.end());
          if (view.layout.format == KvEntryFormat::Fp8Reference)
            for (int b = view.layout.scale_offset + view.layout.scale_blocks; b < view.layout.entry_bytes; ++b)
              ASSERT_EQ(pool[size_t(physical) * view.layout.entry_bytes + size_t(b)], 0) << "pad byte " << b;
        }
      }
      for (size_t e = 0; e < written.size(); ++e) {
        if (written[e]) continue;
        const uint8_t* entry = &pool[e * size_t(view.layout.entry_bytes)];
        ASSERT_TRUE(std::all_of(entry, entry + view.layout.entry_bytes, [](uint8_t b) { return b == 0xFF; }))
            << "physical entry " << e << " was written";
      }
    }
    if (c_.bf16_output) {
      std::vector<uint16_t> keys(size_t(kSlots * capacity_ * c_.head_dim));
      d_keys_.download(keys.data(), keys.size() * 2);
      for (int slot = 0; slot < kSlots; ++slot) {
        const int64_t written = entries_in_slot(slot);
        for (int64_t i = written * c_.head_dim; i < capacity_ * c_.head_dim; ++i)
          ASSERT_EQ(keys[size_t(slot * capacity_ * c_.head_dim + i)], 0xFFFF)
              << "slot " << slot << " element " << i << " written past its entries";
      }
      for (Sequence& sq : sequences_)
        for (int64_t i = 0; i < sq.total * c_.head_dim; ++i)
          sq.got.push_back(bf16_to_float(keys[size_t(sq.slot * capacity_ * c_.head_dim + i)]));
    }
    if (c_.fp8_output) {
      // Codes · scale per entry; nothing written past a slot's entries (codes and scales stay poisoned).
      std::vector<uint8_t> codes(size_t(kSlots * capacity_ * c_.head_dim));
      std::vector<uint32_t> scales(size_t(kSlots * scale_stride()));
      d_keys_.download(codes.data(), codes.size());
      d_scales_.download(scales.data(), scales.size() * 4);
      for (int slot = 0; slot < kSlots; ++slot) {
        const int64_t written = entries_in_slot(slot);
        for (int64_t i = written * c_.head_dim; i < capacity_ * c_.head_dim; ++i)
          ASSERT_EQ(codes[size_t(slot * capacity_ * c_.head_dim + i)], 0xFF)
              << "slot " << slot << " code " << i << " written past its entries";
        for (int64_t w = written; w < scale_stride(); ++w)
          ASSERT_EQ(scales[size_t(slot * scale_stride() + w)], 0xFFFFFFFFu)
              << "slot " << slot << " scale " << w << " written past its entries";
      }
      for (Sequence& sq : sequences_)
        for (int64_t w = 0; w < sq.total; ++w) {
          float scale;
          std::memcpy(&scale, &scales[size_t(sq.slot * scale_stride() + w)], 4);
          // A power of two (e8m0), as the score kernel's factoring out of the ReLU assumes.
          int exponent = 0;
          ASSERT_EQ(std::frexp(scale, &exponent), 0.5f) << "slot " << sq.slot << " entry " << w << " scale " << scale;
          for (int64_t i = 0; i < c_.head_dim; ++i)
            sq.got.push_back(e4m3_to_float(codes[size_t((sq.slot * capacity_ + w) * c_.head_dim + i)]) * scale);
        }
    }

    // Exact numerics: fp32 in another summation order (online softmax, tree reductions) → a few ulps of O(1) values.
    // Reference numerics: the same, then roundings (bf16, fp8, fp4) that a last-bit difference may tip to the
    // neighbouring code; such flips must stay rare and within one code step of their block.
    for (const Sequence& sq : sequences_) {
      SCOPED_TRACE("slot " + std::to_string(sq.slot) + " of " + std::to_string(sq.tokens) + " tokens");
      ASSERT_EQ(int64_t(sq.got.size()), sq.total * c_.head_dim);
      int64_t flips = 0, failures = 0;
      double max_error = 0.0;
      for (int64_t e = 0; e < sq.total && failures < 10; ++e) {
        const float* want = sq.expected.data() + e * c_.head_dim;
        const float* have = sq.got.data() + e * c_.head_dim;
        float amax = 0.0f;
        for (int64_t i = 0; i < c_.head_dim; ++i) amax = std::max(amax, std::fabs(want[i]));
        for (int64_t i = 0; i < c_.head_dim && failures < 10; ++i) {
          const double error = std::fabs(double(have[i]) - want[i]);
          const bool close = std::isfinite(have[i]) && error <= 3e-5 * (1.0 + std::fabs(want[i]));
          max_error = std::max(max_error, std::isfinite(have[i]) ? error : INFINITY);
          if (close) continue;
          const bool one_step = reference_ && std::isfinite(have[i]) && error <= 0.7 * amax;
          if (one_step) {
            ++flips;
            continue;
          }
          ++failures;
          ADD_FAILURE() << "entry " << e << " channel " << i << ": got " << have[i] << ", want " << want[i];
        }
      }
      EXPECT_LE(double(flips), 0.02 * double(sq.got.size()) + 2) << flips << " rounding flips of " << sq.got.size();
      std::printf("%s: slot %d: %lld entries, max error %.3g, %lld rounding flips\n", name_.c_str(), sq.slot,
                  (long long)sq.total, max_error, (long long)flips);
    }
  }

 private:
  // The cache: layer 1 of 2, rows of 8 entries, every slot's compressed rows backed (interleaved page order).
  void make_cache() {
    const int64_t pages_per_slot = (capacity_ + kPageRows - 1) / kPageRows;
    cache_.emplace(KvCacheConfig{
        .format = c_.rounding == CompressorStoredRounding::KvFp8 ? KvEntryFormat::Fp8Reference : KvEntryFormat::Bf16,
        .head_dim = int(c_.head_dim), .rope_dim = int(c_.rope_dim), .layers = 2, .max_sequences = kSlots,
        .window_capacity = 8, .max_compressed_rows = capacity_, .page_rows = kPageRows,
        .pages = pages_per_slot * kSlots});
    for (int slot = 0; slot < kSlots; ++slot) ASSERT_EQ(cache_->add_sequence(), slot);
    for (int slot = kSlots - 1; slot >= 0; --slot)
      cache_->ensure_rows(slot, kCacheLayer, KvArray::Compressed, capacity_);
    cache_->upload_page_table(nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemset(cache_->view().pool, 0xFF, size_t(cache_->config().pages * kPageRows) *
                                                        size_t(cache_->layout().entry_bytes)),
              cudaSuccess);
  }

  static constexpr int kSlots = 2 * kSequences + 1;
  // fp8 scales per slot: one more than the capacity, so the stride differs from the entries'.
  int64_t scale_stride() const { return capacity_ + 1; }
  // Entries the run wrote into `slot`: its sequence's total, none where no sequence owns it.
  int64_t entries_in_slot(int slot) const {
    for (const Sequence& sq : sequences_)
      if (sq.slot == slot) return sq.total;
    return 0;
  }
  static constexpr int kCacheLayer = 1, kPageRows = 8;

  CompressorCase c_;
  std::string chunks_;
  bool to_cache_, stacked_, reference_;
  int64_t width_, stride_;
  std::string name_ = std::string(c_.name) + ", " + chunks_ + (to_cache_ ? ", into the KV cache" : "") +
                      (stacked_ ? ", stacked projections" : "");
  cpu::RopeTable rope_;
  int cluster_ctas_ = 0;
  CompressorSlotLoads slot_loads_ = CompressorSlotLoads::Auto;
  std::vector<Sequence> sequences_;
  DeviceBuffer d_ape_, d_norm_, d_freq_, d_keys_, d_scales_, d_kv_, d_gate_, d_stacked_, d_rope_table_;
  int64_t longest_ = 0;
  std::optional<DeviceCompressorState> state_;
  int64_t capacity_ = 0;
  std::optional<KvCache> cache_;
  // The current step.
  int step_ = -1;
  std::vector<CompressorRun> runs_;
  std::vector<Sequence*> in_step_;
  int64_t per_run_ = 0;
  size_t rows_ = 0;
  DeviceBuffer d_runs_, d_entries_, d_rows_, d_slots_;
};

// One case alone, one launch per step (cluster_ctas: CompressorParams::cluster_ctas, 0 = the launcher's choice;
// slot_loads: CompressorParams::slot_loads, Auto = the launcher's choice).
void check_case(const CompressorCase& c, const std::string& chunks, uint32_t seed, bool to_cache = false,
                bool stacked = false, int cluster_ctas = 0,
                CompressorSlotLoads slot_loads = CompressorSlotLoads::Auto) {
  CaseCheck check(c, chunks, seed, to_cache, stacked);
  if (cluster_ctas != 0) check.force_cluster(cluster_ctas);
  if (slot_loads != CompressorSlotLoads::Auto) check.force_slot_loads(slot_loads);
  SCOPED_TRACE(check.name());
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  CompressorParams p;
  while (check.next_step(p)) {
    run_compressor(p);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    check.check_step();
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
  }
  check.finish();
}

// Two cases stepped together: run_both launches the steps both take (after_both() then checks what it added), the
// longer one's remaining steps run alone.
void step_pair(CaseCheck& first, CaseCheck& second, const std::function<void(std::span<CompressorParams>)>& run_both,
               const std::function<void()>& after_both = {}) {
  SCOPED_TRACE(first.name() + " + " + second.name());
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  for (;;) {
    CompressorParams p[2];
    const bool has_first = first.next_step(p[0]), has_second = second.next_step(p[1]);
    if (!has_first && !has_second) break;
    if (has_first && has_second)
      run_both(p);
    else
      run_compressor(has_first ? p[0] : p[1]);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    if (has_first) first.check_step();
    if (has_second) second.check_step();
    if (has_first && has_second && after_both) after_both();
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
  }
  first.finish();
  second.finish();
}

// Two cases sharing every launch (run_compressors) while both have steps left, then the longer one alone. With
// `prepare`, every shared launch also runs that indexer preparation, and check_prepare() follows each step.
void check_pair(CaseCheck& first, CaseCheck& second, const IndexerPrepareParams* prepare = nullptr,
                const std::function<void()>& check_prepare = {}) {
  step_pair(
      first, second,
      [&](std::span<CompressorParams> p) {
        if (prepare != nullptr)
          run_compressors(p, *prepare);
        else
          run_compressors(p);
      },
      check_prepare);
}

// An indexer query preparation's device inputs (3 tokens × 64 heads × 128 normal random values, RoPE on 64 dims of
// three positions) and its params for them, outputs left to the caller.
struct PrepareInputs {
  static constexpr int64_t kTokens = 3, kHeads = 64, kHeadDim = 128, kRopeDim = 64;
  static constexpr size_t kValues = size_t(kTokens * kHeads * kHeadDim);
  DeviceBuffer q, frequencies, positions;

  explicit PrepareInputs(uint32_t seed)
      : q(to_device(random_queries(seed), "q")),
        frequencies(
            to_device(cpu::RopeTable(160000.0, kRopeDim, cpu::YarnScaling{}).frequencies(), "rope frequencies")),
        positions(to_device(std::vector<int64_t>{5, 130, 4097}, "positions")) {}

  IndexerPrepareParams params(bool reference_rounding) const {
    return {.input = q.as<float>(),
            .tokens = kTokens,
            .heads = kHeads,
            .head_dim = kHeadDim,
            .positions = positions.as<int64_t>(),
            .rope_frequencies = frequencies.as<float>(),
            .rope_dim = kRopeDim,
            .reference_rounding = reference_rounding};
  }

  static std::vector<float> random_queries(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(kValues);
    for (float& v : q) v = normal(rng);
    return q;
  }
};

const CompressorCase kCases[] = {
    {"CSA main c=512 exact", 512, 4, true, 64, 57, CompressorStoredRounding::None, false, false},
    {"CSA main c=512 reference fp8", 512, 4, true, 64, 57, CompressorStoredRounding::KvFp8, true, false},
    {"CSA indexer c=128 exact", 128, 4, true, 64, 61, CompressorStoredRounding::None, false, false},
    {"CSA indexer c=128 reference fp4 bf16 out", 128, 4, true, 64, 61, CompressorStoredRounding::IndexerFp4, true,
     true},
    {"HCA c=512 exact", 512, 128, false, 64, 389, CompressorStoredRounding::None, false, false},
    {"HCA c=512 reference fp8", 512, 128, false, 64, 389, CompressorStoredRounding::KvFp8, true, false},
    {"CSA odd c=96 rope 32", 96, 4, true, 32, 30, CompressorStoredRounding::None, false, false},
    {"HCA c=64 ratio 8 fp4", 64, 8, false, 16, 43, CompressorStoredRounding::IndexerFp4, false, false},
    // The golden fixtures' shapes: head_dim 64 with rope 16 (an fp8 block of 48 channels), indexer c = 32.
    {"CSA golden c=64 rope 16 reference fp8", 64, 4, true, 16, 37, CompressorStoredRounding::KvFp8, true, false},
    {"CSA golden indexer c=32 reference fp4", 32, 4, true, 16, 37, CompressorStoredRounding::IndexerFp4, true, true},
    {"HCA golden c=64 ratio 16 exact", 64, 16, false, 16, 70, CompressorStoredRounding::None, false, false},
    // Prefill chunks of ≥ 256 entries (narrow CTAs, no cluster) in one pass.
    {"CSA main c=512 long exact", 512, 4, true, 64, 1100, CompressorStoredRounding::None, false, false},
    {"CSA indexer c=128 long reference fp4", 128, 4, true, 64, 1030, CompressorStoredRounding::IndexerFp4, true, true},
    // A cluster of two CTAs per entry (128 channels = two fp8 blocks).
    {"HCA c=128 ratio 128 reference fp8", 128, 128, false, 64, 300, CompressorStoredRounding::KvFp8, true, false},
    // The indexer's fp8 keys (slot_entries_fp8): reference (fp4-rounded first, then lossless) and exact numerics.
    {"CSA indexer c=128 reference fp4 fp8 out", 128, 4, true, 64, 61, CompressorStoredRounding::IndexerFp4, true,
     false, true},
    {"CSA indexer c=128 exact fp8 out", 128, 4, true, 64, 61, CompressorStoredRounding::None, false, false, true},
    {"CSA golden indexer c=32 reference fp4 fp8 out", 32, 4, true, 16, 37, CompressorStoredRounding::IndexerFp4, true,
     false, true},
    {"HCA c=64 ratio 8 exact fp8 out", 64, 8, false, 16, 43, CompressorStoredRounding::None, false, false, true},
    {"CSA indexer c=128 long reference fp4 fp8 out", 128, 4, true, 64, 1030, CompressorStoredRounding::IndexerFp4,
     true, false, true},
};

TEST(Compressor, EveryChunkingMatchesTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const CompressorCase& c : kCases)
    for (const char* chunks : {"one pass", "single tokens", "chunks of 2/3", "chunks of 3/7/13"}) {
      check_case(c, chunks, seed++);
      // Straight into the KV cache: the main compressor's stores (no indexer rounding, no bf16 side output).
      if (c.rounding != CompressorStoredRounding::IndexerFp4 && !c.bf16_output && !c.fp8_output)
        check_case(c, chunks, seed++, true);
    }
}

// The model's stacked compressor projections: kv and gate read row_stride apart, the gap (NaN) never read, the
// state updated from the same slices, for decode steps and chunks of several runs.
TEST(Compressor, StackedProjectionsMatchTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 500;
  for (const CompressorCase& c : kCases)
    for (const char* chunks : {"single tokens", "chunks of 2/3", "chunks of 3/7/13"})
      check_case(c, chunks, seed++, false, true);
}

// Two compressors in one launch (run_compressors): a CSA layer's main compressor into the KV cache with its indexer
// compressor's bf16 or fp8 keys (the model's reference step) or both exact, and pairs that differ in ratio and in their
// split over CTAs (clusters of 8 next to single CTAs, padded clusters), prefill-length runs; each checked as alone.
TEST(Compressor, TwoCompressorsInOneLaunchMatchTheCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  struct Pair {
    int first, second;  // kCases indices
    bool first_to_cache, stacked;
  };
  const Pair pairs[] = {{1, 3, true, true}, {0, 2, false, false}, {4, 6, false, true}, {5, 9, true, false},
                        {11, 12, false, true}, {7, 13, false, false}, {1, 14, true, true}, {0, 15, false, false}};
  uint32_t seed = 900;
  for (const Pair& pair : pairs)
    for (const char* chunks : {"one pass", "single tokens", "chunks of 2/3", "chunks of 3/7/13"}) {
      CaseCheck first(kCases[pair.first], chunks, seed++, pair.first_to_cache, pair.stacked);
      CaseCheck second(kCases[pair.second], chunks, seed++, false, pair.stacked);
      check_pair(first, second);
      ASSERT_FALSE(HasFatalFailure());
    }
}

// A CSA layer's compressors with its indexer's query preparation in the same launch (as the model's decode step: the
// main compressor into the KV cache, the indexer's keys bf16 or fp8, stacked projections): the compressors checked as
// alone, the prepared queries (3 tokens × 64 heads × 128, RoPE on 64 dims, plain or reference rounding, bf16 or fp8)
// equal bit for bit to run_indexer_prepare's after every step (its output poisoned before each launch).
TEST(Compressor, IndexerPrepareInTheCompressorsLaunch) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t kTokens = PrepareInputs::kTokens, kHeads = PrepareInputs::kHeads;
  constexpr int64_t kHeadDim = PrepareInputs::kHeadDim;
  const PrepareInputs inputs(77);
  const size_t bytes = PrepareInputs::kValues * 2, scale_bytes = size_t(kTokens * kHeads) * 4;
  DeviceBuffer fused(bytes, "fused prepared q"), alone(bytes, "prepared q"), fused_scales(scale_bytes, "fused scales"),
      alone_scales(scale_bytes, "scales");
  uint32_t seed = 1500;
  for (const bool fp8 : {false, true})
    for (const bool reference : {false, true}) {
      SCOPED_TRACE(std::string(fp8 ? "fp8" : "bf16") + (reference ? " reference" : " exact") + " prepared q");
      IndexerPrepareParams prepare = inputs.params(reference);
      IndexerPrepareParams separate = prepare;
      if (fp8) {
        prepare.output_fp8 = fused.as<uint8_t>(), prepare.output_scales = fused_scales.as<float>();
        separate.output_fp8 = alone.as<uint8_t>(), separate.output_scales = alone_scales.as<float>();
      } else {
        prepare.output = fused.as<__nv_bfloat16>(), separate.output = alone.as<__nv_bfloat16>();
      }
      fused.fill_bytes(0xFF), fused_scales.fill_bytes(0xFF);
      const auto check_prepare = [&] {
        run_indexer_prepare(separate);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const size_t n = fp8 ? bytes / 2 : bytes;
        std::vector<uint8_t> got(n), want(n);
        fused.download(got.data(), n), alone.download(want.data(), n);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], want[i]) << "prepared q byte " << i;
        if (fp8) {
          std::vector<uint32_t> got_scales(size_t(kTokens * kHeads)), want_scales(got_scales.size());
          fused_scales.download(got_scales.data(), scale_bytes), alone_scales.download(want_scales.data(), scale_bytes);
          for (size_t i = 0; i < got_scales.size(); ++i) ASSERT_EQ(got_scales[i], want_scales[i]) << "scale " << i;
        }
        fused.fill_bytes(0xFF), fused_scales.fill_bytes(0xFF);
      };
      CaseCheck main(kCases[1], "chunks of 2/3", seed++, true, true);
      CaseCheck index(kCases[fp8 ? 14 : 3], "chunks of 2/3", seed++, false, true);
      check_pair(main, index, &prepare, check_prepare);
      ASSERT_FALSE(HasFatalFailure());
    }
  // The preparation alone in the launch (no compressor has runs this step) and its stream rule.
  DeviceCompressorState state(4, kHeadDim, true);
  const CompressorParams none{.head_dim = kHeadDim, .ratio = 4, .overlapping = true, .state = state.view()};
  IndexerPrepareParams prepare{.input = inputs.q.as<float>(),
                               .output = fused.as<__nv_bfloat16>(),
                               .tokens = kTokens,
                               .heads = kHeads,
                               .head_dim = kHeadDim};
  IndexerPrepareParams separate = prepare;
  separate.output = alone.as<__nv_bfloat16>();
  fused.fill_bytes(0xFF);
  run_compressors({&none, 1}, prepare);
  run_indexer_prepare(separate);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> got(bytes), want(bytes);
  fused.download(got.data(), bytes), alone.download(want.data(), bytes);
  EXPECT_EQ(got, want);
  cudaStream_t other = nullptr;
  ASSERT_EQ(cudaStreamCreate(&other), cudaSuccess);
  prepare.stream = other;
  testing::expect_error([&] { run_compressors({&none, 1}, prepare); }, "needs their stream");
  ASSERT_EQ(cudaStreamDestroy(other), cudaSuccess);
}

// Every split of an entry over CTAs, forced (the launcher picks one per shape): CSA windows split up to 8 ways, HCA
// windows in one CTA, into the fp32 output and the KV cache.
TEST(Compressor, ForcedClusterSplitsMatchTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1300;
  for (const int c : {0, 1, 4, 5})
    for (const int ctas : {1, 2, 8})
      for (const char* chunks : {"single tokens", "chunks of 2/3", "chunks of 3/7/13"}) {
        check_case(kCases[c], chunks, seed++, false, false, ctas);
        check_case(kCases[c], chunks, seed++, true, false, ctas);
        ASSERT_FALSE(HasFatalFailure());
      }
}

// The slot loads forced the way Auto does not take them (the other tests cover Auto's choice): staged through shared
// memory (cp.async into a per-thread ring, 256-thread CTAs) for decode steps, into registers for prefill chunks and
// runs of different lengths; every case, stacked projections, the KV cache output, forced splits, and pairs in one
// launch (which must agree on the mode).
TEST(Compressor, ForcedSlotLoadsMatchTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 2100;
  for (const CompressorSlotLoads loads : {CompressorSlotLoads::Staged, CompressorSlotLoads::Registers}) {
    const bool staged = loads == CompressorSlotLoads::Staged;
    const std::vector<const char*> chunkings =
        staged ? std::vector<const char*>{"single tokens", "chunks of 2/3"}
               : std::vector<const char*>{"one pass", "chunks of 3/7/13"};
    for (const CompressorCase& c : kCases)
      for (const char* chunks : chunkings) {
        check_case(c, chunks, seed++, false, false, 0, loads);
        if (c.rounding != CompressorStoredRounding::IndexerFp4 && !c.bf16_output && !c.fp8_output)
          check_case(c, chunks, seed++, true, true, 0, loads);
        ASSERT_FALSE(HasFatalFailure());
      }
    for (const int c : {1, 5})
      for (const int ctas : {1, 8})
        check_case(kCases[c], "chunks of 2/3", seed++, false, false, ctas, loads);
    for (const auto& [first, second] : {std::pair{1, 3}, std::pair{11, 12}, std::pair{5, 9}, std::pair{7, 13}})
      for (const char* chunks : chunkings) {
        CaseCheck a(kCases[first], chunks, seed++, false, true), b(kCases[second], chunks, seed++, false, true);
        a.force_slot_loads(loads), b.force_slot_loads(loads);
        check_pair(a, b);
        ASSERT_FALSE(HasFatalFailure());
      }
  }
}

// The cases the lean slot loads take: head_dim 128, 256 or 512, windows of at most 8 slots (CSA ratio 4).
// Not with the stacked projections here: their rows are 2·width + 6 floats apart, off 16-byte alignment.
bool lean_case(const CompressorCase& c) {
  return (c.head_dim == 128 || c.head_dim == 256 || c.head_dim == 512) && (c.overlapping ? 2 : 1) * c.ratio <= 8;
}

// The lean slot loads forced on every case that takes them: decode steps and runs of different lengths (the state's
// tickets and entries that read it), one pass; into the KV cache (bf16, fp8); pairs in one launch; with RoPE tables.
TEST(Compressor, LeanSlotLoadsMatchTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 3100;
  for (const CompressorCase& c : kCases) {
    if (!lean_case(c)) continue;
    for (const char* chunks : {"one pass", "single tokens", "chunks of 3/7/13"}) {
      check_case(c, chunks, seed++, false, false, 0, CompressorSlotLoads::Lean);
      if (c.rounding != CompressorStoredRounding::IndexerFp4 && !c.bf16_output && !c.fp8_output)
        check_case(c, chunks, seed++, true, false, 0, CompressorSlotLoads::Lean);
      ASSERT_FALSE(HasFatalFailure());
    }
  }
  for (const auto& [first, second] : {std::pair{1, 3}, std::pair{11, 12}, std::pair{0, 18}})
    for (const char* chunks : {"one pass", "chunks of 2/3"}) {
      CaseCheck a(kCases[first], chunks, seed++, first == 1), b(kCases[second], chunks, seed++);
      a.force_slot_loads(CompressorSlotLoads::Lean), b.force_slot_loads(CompressorSlotLoads::Lean);
      a.use_rope_table(), b.use_rope_table();
      check_pair(a, b);
      ASSERT_FALSE(HasFatalFailure());
    }
}

// Lean slot loads refused where a pool cannot take them (no silent fallback).
TEST(Compressor, LeanSlotLoadsRefuseWhatTheyCannotPool) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  for (const int index : {4, 6, 9}) {  // HCA 128 slots, c = 96, c = 32
    CaseCheck check(kCases[index], "one pass", 3500);
    check.force_slot_loads(CompressorSlotLoads::Lean);
    CompressorParams p;
    ASSERT_TRUE(check.next_step(p));
    testing::expect_error([&] { run_compressor(p); }, "lean slot loads refused");
  }
}

// Traced prefill launches (CompressorParams::trace, bench_cuda_compressor --trace-prefill): lean chunks (CSA main into
// fp32 entries, a long indexer chunk with bf16 keys) and a staged one (HCA in clusters of 8) give the CPU's entries and
// state, and the launch's CTAs (a prefix of the trace) each record a start and an end no earlier.
TEST(Compressor, TracedPrefillLaunchesMatchTheCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t kRoom = 1 << 12;  // CTAs
  DeviceBuffer trace(size_t(kRoom) * kCompressorTracePoints * 8, "trace");
  std::vector<uint64_t> host(size_t(kRoom) * kCompressorTracePoints);
  uint32_t seed = 3700;
  for (const auto& [index, loads] : {std::pair{1, CompressorSlotLoads::Lean}, std::pair{12, CompressorSlotLoads::Lean},
                                     std::pair{5, CompressorSlotLoads::Staged}}) {
    CaseCheck check(kCases[index], "one pass", seed++);
    check.force_slot_loads(loads);
    SCOPED_TRACE(check.name());
    CompressorParams p;
    while (check.next_step(p)) {
      trace.fill_bytes(0);
      p.trace = trace.as<uint64_t>(), p.trace_ctas = kRoom;
      // The launcher's plan: every CTA of it records a start and an end, none past it.
      const CompressorLaunchShape shape = compressor_launch_shape({&p, 1});
      ASSERT_GT(shape.ctas, 0);
      ASSERT_LE(shape.ctas, kRoom);
      EXPECT_EQ(shape.pools[0].first_cta, 0);
      EXPECT_EQ(shape.pools[0].ctas, shape.ctas);  // one pool: its CTAs are the grid
      run_compressor(p);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      check.check_step();
      ASSERT_FALSE(HasFatalFailure());
      trace.download(host.data(), trace.bytes());
      for (int64_t c = 0; c < kRoom; ++c) {
        const uint64_t* r = host.data() + size_t(c) * kCompressorTracePoints;
        if (c < shape.ctas) {
          ASSERT_NE(r[COMPRESSOR_TRACE_START], 0u) << "planned CTA " << c << " of " << shape.ctas << " did not start";
          ASSERT_GE(r[COMPRESSOR_TRACE_END], r[COMPRESSOR_TRACE_START]) << "CTA " << c;
        } else {
          ASSERT_EQ(r[COMPRESSOR_TRACE_START], 0u) << "CTA " << c << " past the plan's " << shape.ctas << " started";
        }
      }
    }
    check.finish();
  }
}

// compressor_launch_shape's ranges for launches of two pools with the indexer's query preparation, each traced: the
// pools' and the preparation's ranges lie in the grid in launch order without overlap (each planned CTA in exactly one
// range), every CTA of a range records a start and an end no earlier, none at or past the plan's grid starts, and the
// CTAs between ranges are only the padding of a pool's last hardware cluster. Cases: a CSA layer's pair (main into the
// KV cache, indexer fp8 keys) in one prefill chunk (lean) and in decode steps (registers), an HCA pool split in
// clusters of 8 beside a CSA indexer pool of one CTA per entry (padded clusters), and the preparation alone (pools
// without runs: empty ranges). The compressors' outputs are checked against the CPU, the prepared queries against
// run_indexer_prepare's.
TEST(Compressor, TracedLaunchesRunEveryPlannedRange) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t kRoom = 1 << 12;  // CTAs
  constexpr int64_t kHeadDim = PrepareInputs::kHeadDim;
  DeviceBuffer trace(size_t(kRoom) * kCompressorTracePoints * 8, "trace");
  std::vector<uint64_t> host(size_t(kRoom) * kCompressorTracePoints);
  const PrepareInputs inputs(79);
  const size_t bytes = PrepareInputs::kValues * 2;
  DeviceBuffer fused(bytes, "fused prepared q"), alone(bytes, "prepared q");
  IndexerPrepareParams prepare = inputs.params(true);
  prepare.output = fused.as<__nv_bfloat16>();
  IndexerPrepareParams separate = prepare;
  separate.output = alone.as<__nv_bfloat16>();

  // One traced launch of `pools` (1 or 2) with the preparation, its ranges checked against its trace.
  const auto traced_launch = [&](std::span<CompressorParams> pools) {
    fused.fill_bytes(0xFF), trace.fill_bytes(0);
    for (CompressorParams& p : pools) p.trace = trace.as<uint64_t>(), p.trace_ctas = kRoom;
    const CompressorLaunchShape shape = compressor_launch_shape(pools, &prepare);
    ASSERT_GT(shape.ctas, 0);
    ASSERT_LE(shape.ctas, kRoom);
    ASSERT_GT(shape.prepare.ctas, 0);
    run_compressors(pools, prepare);
    run_indexer_prepare(separate);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint8_t> got(bytes), want(bytes);
    fused.download(got.data(), bytes), alone.download(want.data(), bytes);
    ASSERT_EQ(got, want) << "prepared q";
    // The ranges (the pools', empty ones skipped, then the preparation's) in the planned grid order, inside the grid,
    // disjoint: a lean pair's second pool (a CSA layer's indexer compressor) first, otherwise the params' order.
    for (size_t i = pools.size(); i < 2; ++i) EXPECT_EQ(shape.pools[i].ctas, 0) << "pool " << i << " not launched";
    const bool reversed = pools.size() == 2 && compressor_slot_loads(pools) == CompressorSlotLoads::Lean;
    std::vector<CompressorCtaRange> ranges;
    for (size_t k = 0; k < pools.size(); ++k) {
      const size_t i = reversed ? pools.size() - 1 - k : k;
      if (shape.pools[i].ctas > 0) ranges.push_back(shape.pools[i]);
    }
    ranges.push_back(shape.prepare);
    EXPECT_EQ(ranges.front().first_cta, 0);
    for (size_t i = 0; i + 1 < ranges.size(); ++i)
      EXPECT_GE(ranges[i + 1].first_cta, ranges[i].first_cta + ranges[i].ctas) << "range " << i + 1 << " overlaps";
    // The preparation's CTAs end the grid (then at most the padding of its last hardware cluster).
    EXPECT_LE(shape.prepare.first_cta + shape.prepare.ctas, shape.ctas);
    EXPECT_LT(shape.ctas - (shape.prepare.first_cta + shape.prepare.ctas), compressor::kMaxClusterCtas)
        << "padding after the preparation";
    trace.download(host.data(), trace.bytes());
    for (int64_t c = 0; c < kRoom; ++c) {
      const uint64_t* r = host.data() + size_t(c) * kCompressorTracePoints;
      int planned = 0;
      for (const CompressorCtaRange& range : ranges)
        planned += c >= range.first_cta && c < range.first_cta + range.ctas;
      ASSERT_LE(planned, 1) << "CTA " << c << " in two ranges";
      if (c >= shape.ctas) {
        ASSERT_EQ(r[COMPRESSOR_TRACE_START], 0u) << "CTA " << c << " past the plan's " << shape.ctas << " started";
      } else if (planned == 1) {
        ASSERT_NE(r[COMPRESSOR_TRACE_START], 0u) << "planned CTA " << c << " of " << shape.ctas << " did not start";
        ASSERT_GE(r[COMPRESSOR_TRACE_END], r[COMPRESSOR_TRACE_START]) << "CTA " << c;
      }
    }
    // CTAs of the grid outside every range: only the padding that completes a pool's last cluster.
    for (size_t i = 0; i + 1 < ranges.size(); ++i)
      EXPECT_LT(ranges[i + 1].first_cta - (ranges[i].first_cta + ranges[i].ctas), compressor::kMaxClusterCtas)
          << "gap after range " << i;
  };

  struct Pair {
    int first, second;  // kCases indices
    bool first_to_cache;
    const char* chunks;
  };
  // CSA main into the cache + indexer fp8 keys (prefill chunk: lean; decode steps: registers); HCA split in clusters of
  // 8 + CSA golden indexer c = 32 (one CTA per entry, its pool's CTAs padded to whole clusters).
  const Pair pairs[] = {{1, 14, true, "one pass"}, {1, 14, true, "single tokens"}, {5, 16, false, "one pass"}};
  uint32_t seed = 3900;
  for (const Pair& pair : pairs) {
    CaseCheck first(kCases[pair.first], pair.chunks, seed++, pair.first_to_cache);
    CaseCheck second(kCases[pair.second], pair.chunks, seed++);
    // Every step that both take traced with the preparation, then the longer one's alone (untraced).
    step_pair(first, second, traced_launch);
    ASSERT_FALSE(HasFatalFailure());
  }
  // The preparation alone (no pool has runs): both pool ranges empty, the preparation's from CTA 0.
  DeviceCompressorState state(4, kHeadDim, true);
  CompressorParams none[2] = {{.head_dim = kHeadDim, .ratio = 4, .overlapping = true, .state = state.view()},
                              {.head_dim = kHeadDim, .ratio = 4, .overlapping = true, .state = state.view()}};
  DeviceCompressorState other(4, kHeadDim, true);
  none[1].state = other.view();
  traced_launch(none);
}

// The RoPE factors from a per-position table (CompressorParams::rope_table) instead of the frequencies: every case,
// a prefill chunk (staged slot loads) and decode steps (register loads), into the KV cache too.
TEST(Compressor, RopeTableMatchesTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 2600;
  for (const CompressorCase& c : kCases)
    for (const char* chunks : {"one pass", "single tokens"})
      for (const bool to_cache : {false, true}) {
        if (to_cache && (c.rounding == CompressorStoredRounding::IndexerFp4 || c.bf16_output || c.fp8_output)) continue;
        CaseCheck check(c, chunks, seed++, to_cache, false);
        check.use_rope_table();
        SCOPED_TRACE(check.name());
        CompressorParams p;
        while (check.next_step(p)) {
          run_compressor(p);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          check.check_step();
          ASSERT_FALSE(HasFatalFailure());
        }
        check.finish();
      }
}

// The kernel's multiply-shift division (compressor::FastDivisor, host path of the same arithmetic) against / and %:
// every divisor to 1100 and around every power of two, dividends exhaustively to 5000, near 2^31 and random below it.
TEST(Compressor, FastDivisorMatchesIntegerDivision) {
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 1100; ++d) divisors.push_back(d);
  for (int k = 11; k <= 30; ++k)
    for (const int64_t delta : {-1, 0, 1}) divisors.push_back(uint32_t((int64_t(1) << k) + delta));
  std::vector<uint32_t> dividends;
  for (uint32_t x = 0; x <= 5000; ++x) dividends.push_back(x);
  for (uint32_t j = 0; j < 100; ++j) dividends.push_back(0x7FFFFFFFu - j);
  std::mt19937 rng(5);
  for (int i = 0; i < 2000; ++i) dividends.push_back(uint32_t(rng()) & 0x7FFFFFFFu);
  for (const uint32_t d : divisors) {
    const compressor::FastDivisor divisor = compressor::FastDivisor::of(d);
    for (const uint32_t x : dividends) {
      ASSERT_EQ(divisor.div(x), x / d) << x << " / " << d;
      ASSERT_EQ(divisor.mod(x), x % d) << x << " % " << d;
    }
  }
}

TEST(Compressor, EntriesKnownFromPositions) {
  EXPECT_EQ(compressor_entries_emitted(0, 3, 4), 0);
  EXPECT_EQ(compressor_entries_emitted(0, 4, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(3, 1, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(4, 1, 4), 0);
  EXPECT_EQ(compressor_entries_emitted(5, 13, 4), 3);  // windows 1..3 end at 7, 11, 15; 19 is past the chunk
  EXPECT_EQ(compressor_first_entry(5, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(127, 1, 128), 1);
  EXPECT_EQ(compressor_entries_emitted(0, 4096, 128), 32);
  // The per-run bound sizes a launch's grid: no start gives more.
  for (int64_t ratio : {4, 128})
    for (int64_t tokens : {1, 2, 3, 4, 5, 127, 128, 129, 512})
      for (int64_t start = 0; start < 2 * ratio; ++start)
        EXPECT_LE(compressor_entries_emitted(start, tokens, ratio), compressor_max_entries(tokens, ratio));
  EXPECT_EQ(compressor_max_entries(1, 4), 1);
  EXPECT_EQ(compressor_max_entries(5, 4), 2);
}

TEST(Compressor, RefusesMismatchedState) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer staged_operands(8192, "operands");
  DeviceCompressorState state(4, 128, true);
  CompressorParams p{.head_dim = 512, .ratio = 4, .overlapping = true, .state = state.view()};
  testing::expect_error([&] { run_compressor(p); }, "state was made for ratio 4 head_dim 128");
  // More runs than the state has slots (runs have distinct slots).
  CompressorParams more{.head_dim = 128, .ratio = 4, .overlapping = true, .run_count = 2, .state = state.view()};
  testing::expect_error([&] { run_compressor(more); }, "2 runs but the state has 1 slots");
  // One launch: at most two compressors, with distinct states, on one stream.
  CompressorParams three[3] = {more, more, more};
  testing::expect_error([&] { run_compressors(three); }, "3 compressors in one launch");
  const CompressorParams one{.head_dim = 128, .ratio = 4, .overlapping = true, .state = state.view()};
  CompressorParams same[2] = {one, one};
  testing::expect_error([&] { run_compressors(same); }, "need distinct states");
  same[1].slot_loads = CompressorSlotLoads::Staged;
  testing::expect_error([&] { run_compressors(same); }, "need the same slot_loads");
  // Staged CTAs pool at most 512 channels: a 1024-wide entry needs a split (Auto then loads into registers).
  DeviceCompressorState widest(4, 1024, false);
  CompressorParams staged{.head_dim = 1024, .ratio = 4, .run_count = 1, .max_run_tokens = 1, .state = widest.view(),
                          .cluster_ctas = 1, .slot_loads = CompressorSlotLoads::Staged};
  staged.kv = staged.gate = staged.ape = staged.norm_weight = staged_operands.as<float>();
  staged.runs = reinterpret_cast<const CompressorRun*>(staged_operands.data());
  staged.entries = staged_operands.as<float>();
  testing::expect_error([&] { run_compressor(staged); }, "staged slot loads pool at most 512 channels");
  // A split that is not a whole number of 64-channel blocks, or of an fp4-rounded indexer key.
  CompressorParams split{.head_dim = 128, .ratio = 4, .overlapping = true, .state = state.view(), .cluster_ctas = 4};
  testing::expect_error([&] { run_compressor(split); }, "cluster_ctas 4 must be");
  split.cluster_ctas = 2, split.stored_rounding = CompressorStoredRounding::IndexerFp4;
  testing::expect_error([&] { run_compressor(split); }, "cluster_ctas 2 must be");
  // fp8 keys: whole vectors of 32, 64 or 128 in one CTA, with scales and aligned strides.
  DeviceBuffer keys(4096, "keys"), scales(256, "scales");
  DeviceCompressorState wide_state(4, 256, true);
  CompressorParams fp8{.head_dim = 128, .ratio = 4, .overlapping = true, .run_count = 1, .max_run_tokens = 1,
                       .state = state.view()};
  fp8.kv = fp8.gate = fp8.ape = fp8.norm_weight = scales.as<float>();
  fp8.runs = reinterpret_cast<const CompressorRun*>(keys.data());
  fp8.slot_entries_fp8 = keys.as<uint8_t>(), fp8.slot_entry_stride = 1024, fp8.slot_entry_capacity = 8;
  testing::expect_error([&] { run_compressor(fp8); }, "slot_entries_fp8 needs slot_entry_scales");
  fp8.slot_entry_scales = scales.as<float>(), fp8.slot_scale_stride = 8, fp8.slot_entry_stride = 1032;
  testing::expect_error([&] { run_compressor(fp8); }, "must keep 16-byte alignment");
  fp8.slot_entry_stride = 1024, fp8.stored_rounding = CompressorStoredRounding::KvFp8;
  testing::expect_error([&] { run_compressor(fp8); }, "KvFp8 with slot_entries_fp8");
  fp8.stored_rounding = CompressorStoredRounding::None, fp8.cluster_ctas = 2;
  testing::expect_error([&] { run_compressor(fp8); }, "cluster_ctas 2 must be");
  fp8.cluster_ctas = 0, fp8.slot_entries_bf16 = keys.as<__nv_bfloat16>();
  testing::expect_error([&] { run_compressor(fp8); }, "exactly one of entries");
  fp8.slot_entries_bf16 = nullptr, fp8.head_dim = 256, fp8.state = wide_state.view(), fp8.slot_entry_stride = 2048;
  testing::expect_error([&] { run_compressor(fp8); }, "with slot_entries_fp8 needs head_dim 32, 64 or 128");
}

}  // namespace
}  // namespace dsv4::cuda
