// Subcommands register themselves: each apps/commands/<name>.cpp defines one static CommandRegistration, which
// adds a CLI11 subcommand and the function that runs it. dsv4.cpp knows none of them by name.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace dsv4::app {

struct Command {
  std::string name;
  std::string summary;
  // Declares the subcommand's options on `sub` and returns the function to run once they are parsed.
  // The function returns the process exit code.
  std::function<std::function<int()>(CLI::App& sub)> setup;
};

std::vector<Command>& command_registry();

struct CommandRegistration {
  explicit CommandRegistration(Command command) { command_registry().push_back(std::move(command)); }
};

}  // namespace dsv4::app
