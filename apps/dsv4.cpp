// The dsv4 command-line program: a thin dispatcher over the self-registered subcommands.
#include "command_registry.hpp"
#include "core/error.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>

namespace dsv4::app {

std::vector<Command>& command_registry() {
  static std::vector<Command> commands;
  return commands;
}

}  // namespace dsv4::app

int main(int argc, char** argv) {
  using namespace dsv4::app;
  CLI::App app{"dsv4: DeepSeek-V4 inference engine (CPU reference backend; CUDA backend for Hopper)", "dsv4"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsv4 0.1.0");

  auto commands = command_registry();
  std::sort(commands.begin(), commands.end(), [](const Command& a, const Command& b) { return a.name < b.name; });

  CLI::App* help = app.add_subcommand("help", "List the subcommands, or show one subcommand's options");
  std::string help_topic;
  help->add_option("command", help_topic, "Subcommand to describe");

  std::map<std::string, std::function<int()>> runners;
  for (const Command& command : commands) {
    CLI::App* sub = app.add_subcommand(command.name, command.summary);
    runners[command.name] = command.setup(*sub);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  if (help->parsed()) {
    if (help_topic.empty()) {
      std::printf("%s", app.get_formatter()->make_help(&app, "dsv4", CLI::AppFormatMode::Normal).c_str());
      return 0;
    }
    try {
      CLI::App* topic = app.get_subcommand(help_topic);
      std::printf("%s", topic->get_formatter()->make_help(topic, help_topic, CLI::AppFormatMode::All).c_str());
      return 0;
    } catch (const CLI::OptionNotFound&) {
      std::fprintf(stderr, "dsv4 help: unknown command '%s'\n", help_topic.c_str());
      return 2;
    }
  }

  for (CLI::App* sub : app.get_subcommands()) {
    try {
      return runners.at(sub->get_name())();
    } catch (const dsv4::Error& e) {
      std::fprintf(stderr, "dsv4 %s: error: %s\n", sub->get_name().c_str(), e.what());
      return 1;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "dsv4 %s: error: out of memory\n", sub->get_name().c_str());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "dsv4 %s: internal error: %s\n", sub->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 0;
}
