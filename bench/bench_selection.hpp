// A benchmark's --only list: the items of one argument that pick the cases (or rows) to run, each matched against a
// case name as the bench documents (a prefix, the whole name or a part of it). After the run, require_all_used() fails
// naming every item that selected nothing, so a mistyped name is an error, not an empty run with exit status 0.
// Host code only (no CUDA), so that a CPU unit test includes it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.hpp"

namespace dsv4 {

enum class OnlyMatch { Prefix, Exact, Substring };

class OnlySelection {
 public:
  OnlySelection() = default;  // no --only: every case

  // `list`'s items separated by `separator` (benches whose names hold commas use '|'); an empty item is an error.
  OnlySelection(std::string_view list, char separator, OnlyMatch match) : match_(match) {
    for (size_t begin = 0;;) {
      const size_t end = list.find(separator, begin);
      const std::string_view item = list.substr(begin, end == std::string_view::npos ? end : end - begin);
      check(!item.empty(), "--only '", list, "': an empty item");
      items_.emplace_back(item);
      if (end == std::string_view::npos) break;
      begin = end + 1;
    }
    used_.assign(items_.size(), false);
  }

  bool all() const { return items_.empty(); }

  // Whether `name` is selected; every item that matches it is marked used (so one name can use several items).
  bool selects(std::string_view name) {
    if (items_.empty()) return true;
    bool any = false;
    for (size_t i = 0; i < items_.size(); ++i)
      if (matches(items_[i], name)) {
        used_[i] = true;
        any = true;
      }
    return any;
  }

  // Throws naming each item that selected no case (call after the run).
  void require_all_used() const {
    std::string unused;
    for (size_t i = 0; i < items_.size(); ++i)
      if (!used_[i]) unused += (unused.empty() ? "'" : ", '") + items_[i] + "'";
    check(unused.empty(), "--only: ", unused, " selected no case");
  }

 private:
  bool matches(std::string_view item, std::string_view name) const {
    switch (match_) {
      case OnlyMatch::Prefix:
        return name.substr(0, item.size()) == item;
      case OnlyMatch::Exact:
        return name == item;
      case OnlyMatch::Substring:
        return name.find(item) != std::string_view::npos;
    }
    return false;
  }

  std::vector<std::string> items_;
  OnlyMatch match_ = OnlyMatch::Exact;
  std::vector<bool> used_;  // marked by selects(), read by require_all_used()
};

}  // namespace dsv4
