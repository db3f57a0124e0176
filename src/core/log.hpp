// Warnings for the cases a user must know about (a slower path taken, a conversion made at load): one line on stderr,
// "dsv4: warning: ...", whole lines even from several threads.
#pragma once

#include <sstream>
#include <string>
#include <utility>

namespace dsv4 {

void write_warning_line(const std::string& message);

template <typename... Parts>
void log_warning(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  write_warning_line(os.str());
}

}  // namespace dsv4
