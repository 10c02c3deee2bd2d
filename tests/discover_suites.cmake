# Run at build time (POST_BUILD of each test executable): lists the executable's test suites and
# writes one CTest test per suite, "PREFIX.Suite", running `EXE --gtest_filter=Suite.*`.
# One process per suite, not per test: a suite's tests share its fixtures (a calibrated model, a
# sweep, a trained checkpoint built once in a function-local static), which one process per test
# rebuilt for every test. A failing test names itself in the suite's output.
#   cmake -D EXE=... -D PREFIX=... -D LABEL=... -D OUT=... -P discover_suites.cmake
execute_process(COMMAND "${EXE}" --gtest_list_tests OUTPUT_VARIABLE listing ERROR_VARIABLE err
                RESULT_VARIABLE rc TIMEOUT 120)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${EXE} --gtest_list_tests failed (${rc}): ${err}")
endif()
string(REPLACE "\n" ";" lines "${listing}")
set(script "")
set(count 0)
foreach(line IN LISTS lines)
  # Suite lines start in column 0 and end their name with '.' (typed/parameterized suites carry a
  # "Prefix/" and a "# TypeParam" comment); test lines are indented.
  if(line MATCHES "^([^ #]+)\\.")
    set(suite "${CMAKE_MATCH_1}")
    string(APPEND script
           "add_test([=[${PREFIX}${suite}]=] [=[${EXE}]=] [=[--gtest_filter=${suite}.*]=] --gtest_brief=1)\n"
           "set_tests_properties([=[${PREFIX}${suite}]=] PROPERTIES LABELS [=[${LABEL}]=])\n")
    math(EXPR count "${count} + 1")
  endif()
endforeach()
if(count EQUAL 0)
  message(FATAL_ERROR "${EXE} lists no test suites")
endif()
file(WRITE "${OUT}.tmp" "${script}")
file(RENAME "${OUT}.tmp" "${OUT}")
