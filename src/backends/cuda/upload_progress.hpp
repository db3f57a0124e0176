// The progress bar of a long transfer (the weight upload) on stderr: one line rewritten in place on a terminal, a
// few plain lines (each quarter, then the end) when stderr is a file or a pipe, so logs stay short. Prints GB done of
// the total and the rate in GB/s (decimal units, as transfer rates are quoted).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <functional>
#include <string>

namespace dsv4::cuda {

class UploadProgressBar {
 public:
  // Writes to `out`, in place when `out` is a terminal.
  explicit UploadProgressBar(std::string label, std::FILE* out = stderr);
  // Explicit mode: `in_place` rewrites one line with '\r' at most every `min_interval`; otherwise a line is printed
  // when a quarter of the total is crossed.
  UploadProgressBar(std::string label, std::FILE* out, bool in_place, std::chrono::milliseconds min_interval);

  // `done` of `total` bytes. Always prints the final state once when done reaches total.
  void update(size_t done, size_t total);
  // A callback for an upload's progress option; this bar must outlive the upload.
  std::function<void(size_t done, size_t total)> callback() {
    return [this](size_t done, size_t total) { update(done, total); };
  }

 private:
  void print(size_t done, size_t total, bool final_line);

  std::string label_;
  std::FILE* out_;
  bool in_place_;
  std::chrono::milliseconds min_interval_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_print_;
  bool printed_any_ = false;
  bool finished_ = false;
  int quarters_printed_ = 0;
};

}  // namespace dsv4::cuda
