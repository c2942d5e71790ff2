# Compiles every CUDA kernel instantiation (kernels/cuda/instances.py) into its own small fatbin,
# embeds them all in the extension and adds the CUDA dispatch (dispatch/cuda*.cpp), which loads
# them through the CUDA driver at run time.
find_program(NVCC_EXECUTABLE nvcc HINTS ENV CUDACXX ENV CUDA_HOME PATH_SUFFIXES bin REQUIRED)
# The toolkit's headers (cuda.h, cuda_runtime.h) for the dispatch, which includes MLX's CUDA
# backend headers; nothing from the toolkit is linked.
find_package(CUDAToolkit REQUIRED)
set(SPQT_CUDA_ARCH_FLAGS
  -gencode=arch=compute_90,code=sm_90
  CACHE STRING "nvcc machine-code targets of the kernels' fatbins")
# Plus PTX, so that GPUs without a listed target (sm_80 and newer) still run the kernels.
list(APPEND SPQT_CUDA_ARCH_FLAGS -gencode=arch=compute_80,code=compute_80)

execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda/instances.py"
  OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE SPQT_CUDA_INSTANCES COMMAND_ERROR_IS_FATAL ANY)

# The same list as a header for the dispatch, which finds each kernel's name there.
execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda/instances.py"
          --header "${CMAKE_CURRENT_BINARY_DIR}/cuda_kernels/kernel_names.h"
  COMMAND_ERROR_IS_FATAL ANY)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda/instances.py"
  "${CMAKE_CURRENT_SOURCE_DIR}/kernels/contract.h")

set(kernel_dir "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda")
set(fatbins "")
foreach(instance IN LISTS SPQT_CUDA_INSTANCES)
  string(REPLACE "," ";" fields "${instance}")
  list(GET fields 0 name)
  list(GET fields 1 source)
  list(GET fields 2 type)
  list(GET fields 3 bits)
  list(GET fields 4 group_size)
  list(GET fields 5 many_rows)
  if(source STREQUAL "collect_active.cu")
    set(defines -DSPQT_COLLECT_NAME=${name} -DSPQT_T=${type})
  else()
    set(defines -DSPQT_NAME=${name} -DSPQT_T=${type} -DSPQT_BITS=${bits} -DSPQT_GS=${group_size} -DSPQT_MANY_ROWS=${many_rows})
  endif()
  set(out "${CMAKE_CURRENT_BINARY_DIR}/cuda_kernels/${name}.fatbin")
  add_custom_command(
    OUTPUT "${out}"
    COMMAND "${NVCC_EXECUTABLE}" -std=c++17 -O3 -fatbin ${SPQT_CUDA_ARCH_FLAGS} ${defines}
            "${kernel_dir}/${source}" -o "${out}"
    DEPENDS "${kernel_dir}/${source}" "${kernel_dir}/zigzag.cuh" "${kernel_dir}/tensor_core.cuh"
            "${CMAKE_CURRENT_SOURCE_DIR}/kernels/contract.h"
    COMMENT "nvcc ${name}"
    VERBATIM)
  list(APPEND fatbins "${out}")
endforeach()

set(embedded "${CMAKE_CURRENT_BINARY_DIR}/cuda_kernels/embedded.cpp")
string(REPLACE ";" "|" fatbin_arg "${fatbins}")
add_custom_command(
  OUTPUT "${embedded}"
  COMMAND "${CMAKE_COMMAND}" -DOUT=${embedded} "-DFATBINS=${fatbin_arg}"
          -P "${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_binaries.cmake"
  DEPENDS ${fatbins} "${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_binaries.cmake"
  COMMENT "Embedding CUDA kernels"
  VERBATIM)
target_sources(_ext PRIVATE dispatch/cuda.cpp dispatch/cuda_driver.cpp "${embedded}")
target_include_directories(_ext PRIVATE ${CUDAToolkit_INCLUDE_DIRS}
  "${CMAKE_CURRENT_SOURCE_DIR}/dispatch/cuda_compat" "${CMAKE_CURRENT_BINARY_DIR}/cuda_kernels")
target_link_libraries(_ext PRIVATE ${CMAKE_DL_LIBS})
