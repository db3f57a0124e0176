#include "core/log.hpp"

#include <cstdio>
#include <mutex>

namespace dsv4 {

void write_warning_line(const std::string& message) {
  static std::mutex mutex;
  const std::lock_guard lock(mutex);
  std::fprintf(stderr, "dsv4: warning: %s\n", message.c_str());
  std::fflush(stderr);
}

}  // namespace dsv4
