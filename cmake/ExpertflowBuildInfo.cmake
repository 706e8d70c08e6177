# Records what this build was made against, for expertflow.build_info() and the import check.
# Inputs:  EXPERTFLOW_WITH_CUDA, EXPERTFLOW_CUDA_DISABLED_REASON (cmake/ExpertflowTorch.cmake)
# Outputs: EXPERTFLOW_GIT_REVISION, EXPERTFLOW_BUILT_CUDA_VERSION, EXPERTFLOW_BUILD_INFO_PY

find_package(Git QUIET)
set(EXPERTFLOW_GIT_REVISION "unknown")
if(GIT_FOUND)
  execute_process(
    COMMAND "${GIT_EXECUTABLE}" -C "${CMAKE_CURRENT_SOURCE_DIR}" rev-parse --short=12 HEAD
    OUTPUT_VARIABLE _rev RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_rc EQUAL 0 AND _rev)
    execute_process(
      COMMAND "${GIT_EXECUTABLE}" -C "${CMAKE_CURRENT_SOURCE_DIR}" status --porcelain
              --untracked-files=no
      OUTPUT_VARIABLE _dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    set(EXPERTFLOW_GIT_REVISION "${_rev}")
    if(_dirty)
      string(APPEND EXPERTFLOW_GIT_REVISION "-dirty")
    endif()
  endif()
endif()

set(EXPERTFLOW_BUILT_CUDA_VERSION "")
if(EXPERTFLOW_WITH_CUDA)
  set(EXPERTFLOW_BUILT_CUDA_VERSION "${CMAKE_CUDA_COMPILER_VERSION}")
endif()
if(EXPERTFLOW_WITH_CUDA)
  set(EXPERTFLOW_WITH_CUDA_PY True)
else()
  set(EXPERTFLOW_WITH_CUDA_PY False)
endif()
# A Python string literal: the reason may name paths or quote versions.
string(REPLACE "\\" "\\\\" EXPERTFLOW_CUDA_DISABLED_REASON_PY
       "${EXPERTFLOW_CUDA_DISABLED_REASON}")
string(REPLACE "\"" "\\\"" EXPERTFLOW_CUDA_DISABLED_REASON_PY
       "${EXPERTFLOW_CUDA_DISABLED_REASON_PY}")
set(EXPERTFLOW_BUILD_INFO_PY "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py")
configure_file("${CMAKE_CURRENT_LIST_DIR}/_build_info.py.in" "${EXPERTFLOW_BUILD_INFO_PY}" @ONLY)
