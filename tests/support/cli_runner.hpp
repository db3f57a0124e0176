// Runs the built dsv4 binary (DSV4_BINARY) through the shell for the app tests: stdin from a string, stdout and
// stderr captured apart so tests can check which stream a message went to.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#if DSV4_HAVE_CUDA
#include "backends/cuda/device.hpp"
#endif

namespace dsv4::testing {

struct CliResult {
  int exit_code;  // -1 when the process did not exit normally or could not be started
  std::string out;
  std::string err;
  // Both streams, for tests that only look for a message somewhere in the output.
  std::string text() const { return out + err; }
};

// `args` is appended to the binary's path as shell text, so tests may quote and use $(...).
inline CliResult run_cli(const std::string& args, const std::string& stdin_text = "") {
  namespace fs = std::filesystem;
  // Unique per process and per call: ctest may run several app tests at once.
  static int calls = 0;
  const std::string tag = std::to_string(::getpid()) + "-" + std::to_string(calls++);
  const fs::path in = fs::temp_directory_path() / ("dsv4-cli-in-" + tag);
  const fs::path err = fs::temp_directory_path() / ("dsv4-cli-err-" + tag);
  std::ofstream(in, std::ios::binary) << stdin_text;
  const std::string command = std::string(DSV4_BINARY) + " " + args + " <" + in.string() + " 2>" + err.string();
  CliResult result{-1, "", ""};
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[4096];
    while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) result.out.append(buffer, n);
    const int status = pclose(pipe);
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::ifstream err_file(err, std::ios::binary);
    result.err.assign(std::istreambuf_iterator<char>(err_file), std::istreambuf_iterator<char>());
  } else {
    result.err = "popen failed for: " + command;
  }
  fs::remove(in);
  fs::remove(err);
  return result;
}

// Whether a CUDA device is there for the GPU cases (never in a build without CUDA).
inline bool gpu_present() {
#if DSV4_HAVE_CUDA
  return !dsv4::cuda::list_devices().empty();
#else
  return false;
#endif
}

}  // namespace dsv4::testing
