# Third-party dependencies, all from Debian bookworm packages (scripts/deps.sh installs them).

find_package(Threads REQUIRED)
find_package(absl REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
# ICU gives the Unicode normalizers (NFC, NFKC, ...) that some tokenizer.json files ask for (Qwen2 uses NFC).
find_package(ICU REQUIRED COMPONENTS uc)

# LibTorch's CMake package prints a lot and adds its own flags; keep them on its imported targets.
find_package(Torch REQUIRED)
if(NOT TARGET seedling_torch)
  add_library(seedling_torch INTERFACE)
  target_link_libraries(seedling_torch INTERFACE ${TORCH_LIBRARIES})
  separate_arguments(_seedling_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(seedling_torch INTERFACE ${_seedling_torch_flags})
endif()

find_package(OpenSSL REQUIRED)
find_package(Boost 1.81 REQUIRED)
find_package(Protobuf REQUIRED)
find_package(tomlplusplus REQUIRED)  # base/toml.h: the client's config and the operators' files
if(NOT SEEDLING_CLIENT_ONLY)
  find_package(CLI11 REQUIRED)
  find_package(SQLite3 REQUIRED)
  # The simulator's scale-out (`mpirun -np R seedling simulate`); OpenMPI from Debian.
  find_package(MPI REQUIRED COMPONENTS C)
endif()
# The command-line programs allocate through tcmalloc (Debian's libgoogle-perftools-dev): a training step's
# short-lived tensors leave holes between its long-lived ones that glibc's heap keeps resident (about 130 MB
# at SmolLM2-135M's lora-bp peak, docs/memory.md); tcmalloc's size classes reuse them, at the same speed. The
# SDK libraries never force an allocator on the app that embeds them, and sanitizer builds keep the system one.
# The memory planner reads which allocator it runs under (base/memory.h) and sizes its slack to match.
if(SEEDLING_TCMALLOC AND CMAKE_CXX_FLAGS MATCHES "-fsanitize")
  message(STATUS "Seedling: sanitizer build, programs use the system allocator")
  set(SEEDLING_TCMALLOC OFF)
endif()
if(SEEDLING_TCMALLOC)
  find_library(SEEDLING_TCMALLOC_LIBRARY NAMES tcmalloc_minimal)
  if(NOT SEEDLING_TCMALLOC_LIBRARY)
    message(WARNING "Seedling: libtcmalloc_minimal not found (apt-get install libgoogle-perftools-dev); programs "
                    "use the system allocator and keep about 15% more memory during training")
  endif()
endif()
# seedling_use_program_allocator(<executable>): links tcmalloc into a program (not into a library). The
# program references none of its symbols, so keep it from being dropped as not needed.
function(seedling_use_program_allocator target)
  if(SEEDLING_TCMALLOC AND SEEDLING_TCMALLOC_LIBRARY)
    # One item: CMake de-duplicates repeated separate flags such as -Wl,--pop-state.
    target_link_libraries(${target} PRIVATE "-Wl,--push-state,--no-as-needed,${SEEDLING_TCMALLOC_LIBRARY},--pop-state")
  endif()
endfunction()

if(SEEDLING_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
  include(Catch)
endif()

# Precompiled LibTorch headers: one PCH, built once by seedling_torch_pch and reused by every target that
# includes LibTorch (compile options must match, so reuse goes through seedling_add_torch_pch).
function(seedling_add_torch_pch target)
  if(NOT SEEDLING_USE_PCH)
    return()
  endif()
  if(NOT TARGET seedling_torch_pch)
    add_library(seedling_torch_pch OBJECT "${PROJECT_SOURCE_DIR}/cmake/torch_pch.cpp")
    target_link_libraries(seedling_torch_pch PRIVATE seedling_torch)
    target_precompile_headers(seedling_torch_pch PRIVATE
      <ATen/ATen.h>
      <torch/csrc/autograd/autograd.h>
      <torch/csrc/autograd/custom_function.h>
      <torch/csrc/autograd/function.h>
      <torch/csrc/autograd/generated/variable_factories.h>
      <vector> <string> <memory> <optional>)
  endif()
  target_precompile_headers(${target} REUSE_FROM seedling_torch_pch)
endfunction()
