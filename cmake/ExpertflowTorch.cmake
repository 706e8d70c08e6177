# Finds the installed torch without find_package(Torch) and decides whether CUDA kernels are built.
#
# Why not find_package(Torch): with a CUDA torch it stops fatally when nvcc is unusable, and its
# targets name an nvrtc library the minimal local toolkit lacks (DESIGN.md section 5). We take
# torch's own include/library paths instead, and decide CUDA on/off first.
#
# Inputs:  EXPERTFLOW_CUDA = AUTO | ON | OFF (cache variable, defaults to $ENV{EXPERTFLOW_CUDA})
#          TORCH_CUDA_ARCH_LIST (environment or cache), e.g. "9.0" or "8.0;9.0+PTX"
# Outputs: expertflow::torch_cpp and expertflow::torch (interface targets), EXPERTFLOW_WITH_CUDA,
#          EXPERTFLOW_TORCH_VERSION, EXPERTFLOW_TORCH_CUDA, EXPERTFLOW_CUDA_ARCH_LIST,
#          CMAKE_CUDA_ARCHITECTURES, EXPERTFLOW_CUDA_DISABLED_REASON ("" with CUDA kernels, else
#          why they are absent)

set(_ef_cuda_default "$ENV{EXPERTFLOW_CUDA}")
if(NOT _ef_cuda_default)
  set(_ef_cuda_default AUTO)
endif()
set(EXPERTFLOW_CUDA "${_ef_cuda_default}" CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
string(TOUPPER "${EXPERTFLOW_CUDA}" EXPERTFLOW_CUDA)
if(NOT EXPERTFLOW_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "EXPERTFLOW_CUDA must be AUTO, ON or OFF, got '${EXPERTFLOW_CUDA}'")
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_env.py"
  OUTPUT_VARIABLE _ef_torch_env ERROR_VARIABLE _ef_torch_err RESULT_VARIABLE _ef_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _ef_torch_rc EQUAL 0)
  message(FATAL_ERROR "expertflow needs torch installed in ${Python_EXECUTABLE} "
                      "(build with --no-build-isolation):\n${_ef_torch_err}")
endif()
string(REPLACE "\n" ";" _ef_torch_lines "${_ef_torch_env}")
foreach(_line IN LISTS _ef_torch_lines)
  if(_line MATCHES "^([a-z0-9_]+)=(.*)$")
    set(_ef_torch_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endif()
endforeach()
string(REPLACE "," ";" _ef_torch_include_dirs "${_ef_torch_include_dirs}")
set(EXPERTFLOW_TORCH_VERSION "${_ef_torch_version}")
set(EXPERTFLOW_TORCH_CUDA "${_ef_torch_cuda}")
message(STATUS "expertflow: torch ${EXPERTFLOW_TORCH_VERSION} (CUDA '${EXPERTFLOW_TORCH_CUDA}')")

# Locates a real nvcc (not the /usr/local/bin wrapper, with which CMake cannot find the toolkit)
# and checks that its major version matches torch's CUDA. Sets _ef_nvcc or _ef_nvcc_problem.
function(_ef_find_nvcc)
  set(_candidates "${CMAKE_CUDA_COMPILER}")
  foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" "$ENV{CUDAToolkit_ROOT}" "/usr/local/cuda")
    if(_root)
      list(APPEND _candidates "${_root}/bin/nvcc")
    endif()
  endforeach()
  set(_nvcc "")
  foreach(_c IN LISTS _candidates)
    if(_c AND EXISTS "${_c}")
      set(_nvcc "${_c}")
      break()
    endif()
  endforeach()
  if(NOT _nvcc)
    set(_ef_nvcc_problem "no nvcc found (set CUDA_HOME)" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${_nvcc}" --version OUTPUT_VARIABLE _out RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT _out MATCHES "release ([0-9]+)\\.([0-9]+)")
    set(_ef_nvcc_problem "${_nvcc} --version failed" PARENT_SCOPE)
    return()
  endif()
  set(_nvcc_major "${CMAKE_MATCH_1}")
  set(_nvcc_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  string(REGEX MATCH "^[0-9]+" _torch_major "${EXPERTFLOW_TORCH_CUDA}")
  if(NOT _nvcc_major STREQUAL _torch_major)
    set(_ef_nvcc_problem
        "nvcc ${_nvcc_version} (${_nvcc}) does not match torch's CUDA ${EXPERTFLOW_TORCH_CUDA}"
        PARENT_SCOPE)
    return()
  endif()
  get_filename_component(_bin "${_nvcc}" DIRECTORY)
  get_filename_component(_root "${_bin}" DIRECTORY)
  set(_ef_nvcc "${_nvcc}" PARENT_SCOPE)
  set(_ef_cuda_root "${_root}" PARENT_SCOPE)
endfunction()

set(EXPERTFLOW_WITH_CUDA OFF)
set(EXPERTFLOW_CUDA_DISABLED_REASON "EXPERTFLOW_CUDA=OFF")
if(NOT EXPERTFLOW_CUDA STREQUAL "OFF")
  if(NOT EXPERTFLOW_TORCH_CUDA)
    set(_ef_nvcc_problem "torch ${EXPERTFLOW_TORCH_VERSION} is a CPU-only build")
  else()
    _ef_find_nvcc()
  endif()
  if(_ef_nvcc)
    set(EXPERTFLOW_WITH_CUDA ON)
    set(EXPERTFLOW_CUDA_DISABLED_REASON "")
  elseif(EXPERTFLOW_CUDA STREQUAL "ON")
    message(FATAL_ERROR "EXPERTFLOW_CUDA=ON but CUDA kernels cannot be built: ${_ef_nvcc_problem}")
  else()
    set(EXPERTFLOW_CUDA_DISABLED_REASON "${_ef_nvcc_problem}")
    if(EXPERTFLOW_TORCH_CUDA)
      # A CUDA torch was surely meant to run on a GPU: say loudly that this build cannot, on one
      # summary line (scripts/dev shows those) and as a CMake warning (CMake wraps its text).
      string(CONCAT _ef_why "torch is a CUDA ${EXPERTFLOW_TORCH_CUDA} build but "
                    "${_ef_nvcc_problem}. Install the matching CUDA toolkit and set CUDA_HOME "
                    "(EXPERTFLOW_CUDA=ON makes this an error, OFF silences it)")
      message(STATUS "expertflow: WARNING: building WITHOUT CUDA kernels: ${_ef_why}")
      message(WARNING "No CUDA kernels in this expertflow build: ${_ef_why}")
    else()
      message(STATUS "expertflow: building without CUDA kernels: ${_ef_nvcc_problem}")
    endif()
  endif()
endif()

# TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX", spaces or semicolons) -> CMAKE_CUDA_ARCHITECTURES.
# A fixed default: the build never probes a GPU (scripts/dev does, and passes what it finds).
# The default is the SASS of torch 2.14's own CUDA 13 wheels (Turing to Blackwell: a GPU torch
# runs on, these kernels run on; 8.6 covers 8.9, 10.0 covers 10.3, 12.0 covers 12.1), plus PTX of
# the newest so that later GPUs JIT-compile it. scripts/dev reads this line: keep it one line.
set(EXPERTFLOW_DEFAULT_ARCH_LIST "7.5;8.0;8.6;9.0;10.0;12.0+PTX")
function(_ef_cuda_architectures arch_list out_var)
  string(REPLACE " " ";" _entries "${arch_list}")
  set(_archs "")
  foreach(_e IN LISTS _entries)
    if(NOT _e)
      continue()
    endif()
    if(NOT _e MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
      message(FATAL_ERROR "TORCH_CUDA_ARCH_LIST entry '${_e}' is not like '9.0' or '9.0a+PTX'")
    endif()
    set(_sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    list(APPEND _archs "${_sm}-real")
    if(CMAKE_MATCH_4)
      list(APPEND _archs "${_sm}-virtual")
    endif()
  endforeach()
  set(${out_var} "${_archs}" PARENT_SCOPE)
endfunction()

set(EXPERTFLOW_CUDA_ARCH_LIST "")
if(EXPERTFLOW_WITH_CUDA)
  set(_ef_arch_source "TORCH_CUDA_ARCH_LIST")
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(EXPERTFLOW_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
  elseif(TORCH_CUDA_ARCH_LIST)
    set(EXPERTFLOW_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
  else()
    set(EXPERTFLOW_CUDA_ARCH_LIST "${EXPERTFLOW_DEFAULT_ARCH_LIST}")
    set(_ef_arch_source "the default, TORCH_CUDA_ARCH_LIST unset")
  endif()
  _ef_cuda_architectures("${EXPERTFLOW_CUDA_ARCH_LIST}" CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_COMPILER "${_ef_nvcc}")
  set(CUDAToolkit_ROOT "${_ef_cuda_root}")
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "expertflow: CUDA kernels for ${EXPERTFLOW_CUDA_ARCH_LIST} (${_ef_arch_source}: "
                 "${CMAKE_CUDA_ARCHITECTURES}) with ${_ef_nvcc}")
endif()

# The libraries C++ code on tensors links (expertflow::torch_cpp: c10 and torch_cpu, with CUDA
# kernels also the CUDA ones), and what the Python extension adds (expertflow::torch: torch and
# torch_python). A test executable must not link torch_python: it needs libpython's symbols.
set(_ef_torch_cpp_libs c10 torch_cpu)
if(EXPERTFLOW_WITH_CUDA)
  list(APPEND _ef_torch_cpp_libs c10_cuda torch_cuda)
endif()
function(_ef_torch_target name)
  add_library(${name} INTERFACE)
  foreach(_lib IN LISTS ARGN)
    find_library(_ef_lib_${_lib} NAMES ${_lib} PATHS ${_ef_torch_library_dirs} NO_DEFAULT_PATH)
    if(NOT _ef_lib_${_lib})
      message(FATAL_ERROR "torch library '${_lib}' not found in ${_ef_torch_library_dirs}")
    endif()
    target_link_libraries(${name} INTERFACE "${_ef_lib_${_lib}}")
  endforeach()
endfunction()
_ef_torch_target(expertflow_torch_cpp ${_ef_torch_cpp_libs})
add_library(expertflow::torch_cpp ALIAS expertflow_torch_cpp)
target_include_directories(expertflow_torch_cpp SYSTEM INTERFACE ${_ef_torch_include_dirs})
target_compile_definitions(expertflow_torch_cpp INTERFACE
  _GLIBCXX_USE_CXX11_ABI=${_ef_torch_cxx11_abi})
if(EXPERTFLOW_WITH_CUDA)
  target_link_libraries(expertflow_torch_cpp INTERFACE CUDA::cudart)
endif()
_ef_torch_target(expertflow_torch torch torch_python)
add_library(expertflow::torch ALIAS expertflow_torch)
target_link_libraries(expertflow_torch INTERFACE expertflow_torch_cpp)
set(EXPERTFLOW_TORCH_LIBRARY_DIRS "${_ef_torch_library_dirs}")
