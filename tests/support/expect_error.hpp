// Expects an action to throw a dsv4::Error whose message names the problem: the tests check error wording because
// the project promises messages that name the file, field or op at fault.
#pragma once

#include "core/error.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>

namespace dsv4::testing {

inline void expect_error(const std::function<void()>& action, std::initializer_list<std::string_view> fragments) {
  try {
    action();
    ADD_FAILURE() << "no error; expected a dsv4::Error mentioning '" << *fragments.begin() << "'";
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string_view fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos) << "message '" << message << "' lacks '" << fragment << "'";
  }
}

inline void expect_error(const std::function<void()>& action, std::string_view fragment) {
  expect_error(action, {fragment});
}

}  // namespace dsv4::testing
