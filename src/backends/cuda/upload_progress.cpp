#include "backends/cuda/upload_progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <utility>

namespace dsv4::cuda {

namespace {

constexpr int kBarWidth = 30;
constexpr std::chrono::milliseconds kTerminalInterval{100};

double gigabytes(size_t bytes) { return double(bytes) / 1e9; }

}  // namespace

UploadProgressBar::UploadProgressBar(std::string label, std::FILE* out)
    : UploadProgressBar(std::move(label), out, out != nullptr && isatty(fileno(out)) == 1, kTerminalInterval) {}

UploadProgressBar::UploadProgressBar(std::string label, std::FILE* out, bool in_place,
                                     std::chrono::milliseconds min_interval)
    : label_(std::move(label)), out_(out), in_place_(in_place), min_interval_(min_interval),
      start_(std::chrono::steady_clock::now()), last_print_(start_) {}

void UploadProgressBar::update(size_t done, size_t total) {
  if (out_ == nullptr || finished_) return;
  done = std::min(done, total);
  if (done == total) {
    print(done, total, true);
    finished_ = true;
    return;
  }
  if (in_place_) {
    const auto now = std::chrono::steady_clock::now();
    if (printed_any_ && now - last_print_ < min_interval_) return;
    last_print_ = now;
    print(done, total, false);
  } else {
    const int quarter = total > 0 ? int(4.0 * double(done) / double(total)) : 0;
    if (quarter <= quarters_printed_) return;
    quarters_printed_ = quarter;
    print(done, total, false);
  }
}

void UploadProgressBar::print(size_t done, size_t total, bool final_line) {
  printed_any_ = true;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = seconds > 0 ? gigabytes(done) / seconds : 0.0;
  const double fraction = total > 0 ? double(done) / double(total) : 1.0;
  if (in_place_) {
    const int filled = int(fraction * kBarWidth);
    const std::string bar = std::string(size_t(filled), '#') + std::string(size_t(kBarWidth - filled), '-');
    std::fprintf(out_, "\r%s [%s] %.2f / %.2f GB %5.1f%% %6.2f GB/s", label_.c_str(), bar.c_str(), gigabytes(done),
                 gigabytes(total), 100.0 * fraction, rate);
    if (final_line) std::fprintf(out_, " in %.1f s\n", seconds);
  } else if (final_line) {
    std::fprintf(out_, "%s: %.2f GB in %.1f s (%.2f GB/s)\n", label_.c_str(), gigabytes(total), seconds, rate);
  } else {
    std::fprintf(out_, "%s: %.2f / %.2f GB (%.0f%%), %.2f GB/s\n", label_.c_str(), gigabytes(done), gigabytes(total),
                 100.0 * fraction, rate);
  }
  std::fflush(out_);
}

}  // namespace dsv4::cuda
