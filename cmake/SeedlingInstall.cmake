# `cmake --install <build> [--prefix P]`: headers under include/seedling (include paths start there, as they
# start at the repository root in the tree), the module libraries, the `seedling` program, the SentencePiece
# shim, and a CMake package: find_package(Seedling) gives Seedling::client (the SDK: C interface and C++ API),
# Seedling::model, ... and, in a SEEDLING_CLIENT_ONLY build, Seedling::client_shared (libseedling_client.so).
include(CMakePackageConfigHelpers)

set(SEEDLING_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/Seedling")
set(_seedling_modules base model lora optim comms privacy client)
if(TARGET seedling_server)
  list(APPEND _seedling_modules server)
endif()
if(TARGET seedling_simulator)
  list(APPEND _seedling_modules simulator)
endif()

set(_seedling_targets seedling_torch)
foreach(module ${_seedling_modules})
  set_target_properties(seedling_${module} PROPERTIES EXPORT_NAME ${module})
  list(APPEND _seedling_targets seedling_${module})
  install(DIRECTORY "${PROJECT_SOURCE_DIR}/${module}/" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/seedling/${module}"
          FILES_MATCHING PATTERN "*.h")
endforeach()
set_target_properties(seedling_torch PROPERTIES EXPORT_NAME torch)
if(TARGET seedling_client_shared)
  list(APPEND _seedling_targets seedling_client_shared)
endif()
install(TARGETS ${_seedling_targets} EXPORT SeedlingTargets
        ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}" LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
        RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
# Generated headers: base/version.h, comms/proto/seedling.pb.h.
install(DIRECTORY "${CMAKE_BINARY_DIR}/generated/" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/seedling"
        FILES_MATCHING PATTERN "*.h")
# model/internal/spm_library.cpp finds the shim at the installed path when nothing closer has it.
install(TARGETS seedling_spm_shim LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}")
if(TARGET seedling)
  install(TARGETS seedling RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
endif()

install(EXPORT SeedlingTargets NAMESPACE Seedling:: DESTINATION "${SEEDLING_CMAKE_DIR}")
set(SEEDLING_PACKAGE_MODULES ${_seedling_modules})
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/SeedlingConfig.cmake.in"
                              "${CMAKE_BINARY_DIR}/SeedlingConfig.cmake" INSTALL_DESTINATION "${SEEDLING_CMAKE_DIR}")
# 0.x: a minor version may change the API.
write_basic_package_version_file("${CMAKE_BINARY_DIR}/SeedlingConfigVersion.cmake" VERSION ${PROJECT_VERSION}
                                 COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_BINARY_DIR}/SeedlingConfig.cmake" "${CMAKE_BINARY_DIR}/SeedlingConfigVersion.cmake"
        DESTINATION "${SEEDLING_CMAKE_DIR}")
