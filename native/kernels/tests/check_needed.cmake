# ctest helper: LIB's dynamic section must not list libcuda (the driver is dlopen'ed at run time, so the library
# loads on machines without an NVIDIA driver).
if(NOT OBJDUMP)
  find_program(OBJDUMP objdump)
endif()
execute_process(COMMAND "${OBJDUMP}" -p "${LIB}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${OBJDUMP} -p ${LIB} failed (${rc})")
endif()
string(REGEX MATCHALL "NEEDED[ \t]+[^\n]+" needed "${out}")
message(STATUS "${LIB}: ${needed}")
if(needed MATCHES "libcuda|libcudart|libnvinfer")
  message(FATAL_ERROR "${LIB} links a CUDA/TensorRT library: ${needed}")
endif()
