# moe_cc_library / moe_cc_test: the two helpers every folder uses to declare its targets.
#
#   moe_cc_library(NAME moe_common SRCS a.cc b.cc DEPS PUBLIC absl::status PRIVATE Threads::Threads)
#   moe_cc_test(NAME config_test SRCS config_test.cc DEPS moe_config LABELS unit)
#
# Every library gets the repository root as its include directory so that headers are
# included by their path in the repo ("common/status.h"). The build directory is not added
# (only moe_proto exports its generated headers), so compile lines are the same in every
# build tree and ccache can share objects between them.
include_guard(GLOBAL)

function(moe_cc_library)
  cmake_parse_arguments(ARG "" "NAME" "SRCS;PUBLIC;PRIVATE" ${ARGN})
  if(ARG_SRCS)
    add_library(${ARG_NAME} STATIC ${ARG_SRCS})
    target_include_directories(${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
    target_link_libraries(${ARG_NAME} PUBLIC ${ARG_PUBLIC} PRIVATE ${ARG_PRIVATE})
    target_compile_options(${ARG_NAME} PRIVATE ${MOE_WARNING_FLAGS})
  else()
    add_library(${ARG_NAME} INTERFACE)
    target_include_directories(${ARG_NAME} INTERFACE ${PROJECT_SOURCE_DIR})
    target_link_libraries(${ARG_NAME} INTERFACE ${ARG_PUBLIC})
  endif()
endfunction()

# Tests run from the build tree; LABELS lets `ctest -L unit` pick a subset. The working
# directory is the repository root so tests can find fixtures by their repo path.
function(moe_cc_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_compile_options(${ARG_NAME} PRIVATE ${MOE_WARNING_FLAGS})
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME} WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    LABELS "${ARG_LABELS}"
    ENVIRONMENT "MOE_SOURCE_DIR=${PROJECT_SOURCE_DIR};MOE_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()

# Python tests under tests/ run with the project's virtual environment.
function(moe_py_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "ARGS;LABELS" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  add_test(NAME ${ARG_NAME} COMMAND ${MOE_PYTHON} -m pytest -q -x ${ARG_ARGS}
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${ARG_LABELS}"
    ENVIRONMENT "MOE_SERVE_BIN=$<TARGET_FILE:moe-serve>;MOE_SOURCE_DIR=${PROJECT_SOURCE_DIR};MOE_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()
