# Toolchain file: the client-only build for ARM64 (Linux/Android-class aarch64) with Debian's cross compilers
# (g++-aarch64-linux-gnu) against an arm64 Debian tree made by scripts/cross-arm64.sh (mmdebstrap). Libraries,
# headers and CMake packages (LibTorch's TorchConfig, absl, spdlog, ...) come from the tree; programs that run
# during the build come from the host: protoc (host protobuf-compiler, the same 3.21 as the tree's
# libprotobuf), pkg-config, ccache. Tests run under qemu-user (CMAKE_CROSSCOMPILING_EMULATOR).
#   cmake -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DSEEDLING_ARM64_SYSROOT=<tree> ...

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

# The tree: -DSEEDLING_ARM64_SYSROOT, else $SEEDLING_ARM64_SYSROOT, else build-arm64/sysroot in the repository.
if(NOT SEEDLING_ARM64_SYSROOT)
  if(DEFINED ENV{SEEDLING_ARM64_SYSROOT})
    set(SEEDLING_ARM64_SYSROOT "$ENV{SEEDLING_ARM64_SYSROOT}")
  else()
    get_filename_component(SEEDLING_ARM64_SYSROOT "${CMAKE_CURRENT_LIST_DIR}/../build-arm64/sysroot" ABSOLUTE)
  endif()
endif()
if(NOT EXISTS "${SEEDLING_ARM64_SYSROOT}/usr/lib/aarch64-linux-gnu")
  message(FATAL_ERROR "Seedling: no arm64 tree at ${SEEDLING_ARM64_SYSROOT} (scripts/cross-arm64.sh sysroot makes one)")
endif()
# try_compile projects re-read this file: hand them the tree.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES SEEDLING_ARM64_SYSROOT)

set(CMAKE_SYSROOT "${SEEDLING_ARM64_SYSROOT}")
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

# Headers, libraries and packages only from the tree; programs only from the host.
set(CMAKE_FIND_ROOT_PATH "${SEEDLING_ARM64_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# FindProtobuf makes protobuf::protoc from this path (comms/ runs it at build time): the host's compiler.
set(Protobuf_PROTOC_EXECUTABLE /usr/bin/protoc CACHE FILEPATH "protoc from the host (protobuf-compiler)")

# The host's pkg-config reads only the tree's .pc files and prefixes their paths with it.
set(ENV{PKG_CONFIG_DIR} "")
set(ENV{PKG_CONFIG_LIBDIR}
    "${SEEDLING_ARM64_SYSROOT}/usr/lib/aarch64-linux-gnu/pkgconfig:${SEEDLING_ARM64_SYSROOT}/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_SYSROOT_DIR} "${SEEDLING_ARM64_SYSROOT}")

# ctest and catch_discover_tests run ARM64 executables through qemu, which loads them with the tree's
# ld-linux-aarch64.so.1 and libraries.
find_program(SEEDLING_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64)
if(SEEDLING_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${SEEDLING_QEMU_AARCH64};-L;${SEEDLING_ARM64_SYSROOT}")
endif()
