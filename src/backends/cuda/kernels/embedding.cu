#include "backends/cuda/kernels/embedding.hpp"

#include "backends/cuda/kernels/embedding.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

template <embed::TableFormat F>
void launch(const embed::EmbeddingArgs& args, unsigned blocks, cudaStream_t stream) {
  launch_chained(embed::embedding_kernel<F>, dim3(blocks), dim3(embed::kThreads), 0, stream, args, "embedding");
}

}  // namespace

void check_embedding_ids(const int32_t* host_ids, int64_t tokens, int64_t vocab) {
  check(tokens == 0 || host_ids != nullptr, "embedding: null ids for ", tokens, " tokens");
  for (int64_t t = 0; t < tokens; ++t)
    check(host_ids[t] >= 0 && host_ids[t] < vocab, "embedding: token id ", host_ids[t], " at position ", t,
          " is outside the vocabulary [0, ", vocab, ")");
}

void check_embedding_params(const EmbeddingParams& p) {
  const DeviceMatrixView& table = p.table;
  const WeightFormat f = table.format;
  check(f == WeightFormat::F32 || f == WeightFormat::BF16 || f == WeightFormat::FP8_BLOCK128, "embedding: table format ",
        to_string(f), " is not supported (F32, BF16, FP8_BLOCK128)");
  check(f != WeightFormat::FP8_BLOCK128 || table.scale_type == ScaleType::E8M0 || table.scale_type == ScaleType::F32,
        "embedding: FP8_BLOCK128 table with ", to_string(table.scale_type), " scales (E8M0 or F32 expected)");
  check(table.rows > 0 && table.cols > 0, "embedding: table [", table.rows, ", ", table.cols, "] is empty");
  check(table.data != nullptr && (f != WeightFormat::FP8_BLOCK128 || table.scales != nullptr),
        "embedding: table has no device ", table.data == nullptr ? "data" : "scales");
  check(p.tokens >= 0, "embedding: negative token count ", p.tokens);
  check(p.streams >= 1, "embedding: ", p.streams, " streams; at least one is needed");
  check(p.tokens == 0 || (p.ids != nullptr && p.X != nullptr), "embedding: null ", p.ids == nullptr ? "ids" : "X");
}

void run_embedding(const EmbeddingParams& p) {
  check_embedding_params(p);
  if (p.tokens == 0) return;
  const DeviceMatrixView& table = p.table;
  embed::EmbeddingArgs args{.data = table.data,
                                  .scales = table.scales,
                                  .vocab = table.rows,
                                  .hidden = table.cols,
                                  .data_row_bytes = int64_t(table.data_row_bytes),
                                  .scales_per_row = table.scales_per_row,
                                  .ids = p.ids,
                                  .tokens = p.tokens,
                                  .streams = p.streams,
                                  .round_to_bf16 = p.round_to_bf16,
                                  .X = p.X,
                                  .embedding_ctas = (p.tokens * table.cols + embed::kThreads - 1) / embed::kThreads,
                                  .lists = {},
                                  .list_x_blocks = 1};
  int64_t blocks = args.embedding_ctas;
  if (p.attention_lists != nullptr) {
    const attention_lists::ListsGrid lists = attention_lists::lists_grid(*p.attention_lists);
    args.lists = *p.attention_lists;
    args.list_x_blocks = lists.x_blocks;
    blocks += lists.ctas() * p.attention_lists->tokens;
  }
  check(blocks <= 0x7FFFFFFF, "embedding: ", p.tokens, " tokens × ", table.cols, " exceed the launch limit");
  using embed::TableFormat;
  switch (table.format) {
    case WeightFormat::F32: launch<TableFormat::F32>(args, unsigned(blocks), p.stream); break;
    case WeightFormat::BF16: launch<TableFormat::BF16>(args, unsigned(blocks), p.stream); break;
    case WeightFormat::FP8_BLOCK128:
      if (table.scale_type == ScaleType::E8M0)
        launch<TableFormat::FP8_E8M0>(args, unsigned(blocks), p.stream);
      else
        launch<TableFormat::FP8_F32>(args, unsigned(blocks), p.stream);
      break;
    default: fail("embedding: table format ", to_string(table.format), " is not supported");
  }
}

}  // namespace dsv4::cuda
