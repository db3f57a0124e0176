// Errors: one exception type with a message that names what went wrong (file, tensor, field, op).
// Library code throws dsv4::Error; the CLI and the server catch it at their boundary and report it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dsv4 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// fail("tensor ", name, ": shape ", shape) builds the message from streamable parts and throws.
template <typename... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(os.str());
}

// check(cond, parts...) throws with the message when cond is false.
template <typename... Parts>
void check(bool condition, Parts&&... parts) {
  if (!condition) fail(std::forward<Parts>(parts)...);
}

}  // namespace dsv4
