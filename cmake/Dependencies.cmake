# Every dependency is a Debian package (or the CUDA toolkit). PCRE2 and cpp-httplib are missing on the GPU machine:
# their consumers (tokenizer, server) say so at configure time instead of silently disappearing.
find_package(Threads REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(PkgConfig)

if(PkgConfig_FOUND)
  pkg_check_modules(PCRE2 IMPORTED_TARGET libpcre2-8)
endif()
if(NOT PCRE2_FOUND)
  # Fallback for machines with the runtime library and carried headers (DSV4_PCRE2_ROOT/include/pcre2.h).
  find_path(PCRE2_INCLUDE_DIR pcre2.h HINTS ${DSV4_PCRE2_ROOT}/include)
  find_library(PCRE2_LIBRARY NAMES pcre2-8 libpcre2-8.so.0 HINTS ${DSV4_PCRE2_ROOT}/lib)
  if(PCRE2_INCLUDE_DIR AND PCRE2_LIBRARY)
    add_library(PkgConfig::PCRE2 INTERFACE IMPORTED)
    set_target_properties(PkgConfig::PCRE2 PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES ${PCRE2_INCLUDE_DIR} INTERFACE_LINK_LIBRARIES ${PCRE2_LIBRARY})
    set(PCRE2_FOUND TRUE)
  endif()
endif()
if(NOT PCRE2_FOUND)
  message(FATAL_ERROR "PCRE2 (libpcre2-dev) not found: the tokenizer needs it. Install libpcre2-dev or set "
                      "DSV4_PCRE2_ROOT to a folder with include/pcre2.h and lib/libpcre2-8.so*.")
endif()

if(DSV4_BUILD_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
