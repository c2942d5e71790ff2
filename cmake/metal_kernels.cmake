# Metal kernels (kernels/metal) compiled into spqt_mlx.metallib and installed next to the _ext module,
# where dispatch/metal.cpp loads it. Included from CMakeLists.txt only when MLX has its Metal backend
# (macOS, with the Metal toolchain that `xcrun metal` finds).

file(GLOB SPQT_METAL_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/kernels/metal/*.metal")
file(GLOB SPQT_METAL_HEADERS CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/kernels/metal/*.h")

# bfloat needs Metal 3.1, i.e. macOS 14, the oldest macOS that MLX supports.
mlx_build_metallib(
  TARGET spqt_metallib
  TITLE spqt_mlx
  SOURCES ${SPQT_METAL_SOURCES}
  INCLUDE_DIRS "${PROJECT_SOURCE_DIR}/kernels/metal"
  DEPS ${SPQT_METAL_HEADERS}
  COMPILE_OPTIONS -std=metal3.1
  DEPLOYMENT_TARGET 14.0
  OUTPUT_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}")

add_dependencies(_ext spqt_metallib)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/spqt_mlx.metallib" DESTINATION spqt_mlx)

# dispatch/metal.cpp includes MLX's Metal device header, which needs metal-cpp (in MLX_INCLUDE_DIRS
# of the macOS wheel) and _METAL_ (also set by the mlx target's compile options).
target_include_directories(_ext PRIVATE ${MLX_INCLUDE_DIRS})
target_compile_definitions(_ext PRIVATE _METAL_)
