# tg_layer(NAME [LAYERS lower...] [LIBS third-party...] [SOURCES extra...])
#
# Builds core/NAME/*.c as the static library tg_NAME, linked to the layers
# named (which must be below it) and to third-party libraries. Includes are
# rooted at core/ ("base/buf.h").
#
# It also links tg_NAME_linkcheck: every object of the layer (whole archive)
# against only the layers it declares. A call from this layer into a layer
# above it, or into one it does not declare, is an undefined reference there,
# so the build fails: the layering is checked by the linker, not by review.
set(TG_LINKCHECK_MAIN ${CMAKE_CURRENT_LIST_DIR}/linkcheck.c)

function(tg_layer name)
  cmake_parse_arguments(L "" "" "LAYERS;LIBS;SOURCES" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/core/${name}/*.c)
  set(lib tg_${name})
  set(lower)
  foreach(l ${L_LAYERS})
    if(NOT TARGET tg_${l})
      message(FATAL_ERROR "layer ${name} names ${l}, which is not a layer below it")
    endif()
    list(APPEND lower tg_${l})
  endforeach()
  set_property(GLOBAL APPEND PROPERTY TG_LAYERS ${name})
  # Includes follow the same rule: a header of a layer above (or of one not
  # declared) is a configure error, before any call could be written.
  file(GLOB files ${CMAKE_SOURCE_DIR}/core/${name}/*.[ch])
  foreach(f ${files})
    file(STRINGS ${f} incs REGEX "^#include \"[a-z]+/")
    foreach(inc ${incs})
      string(REGEX REPLACE "^#include \"([a-z]+)/.*" "\\1" dir "${inc}")
      if(NOT dir STREQUAL name AND NOT dir IN_LIST L_LAYERS AND IS_DIRECTORY ${CMAKE_SOURCE_DIR}/core/${dir})
        message(FATAL_ERROR "${f}: includes ${dir}/, which is not a layer below ${name}")
      endif()
    endforeach()
  endforeach()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${files})
  if(NOT srcs AND NOT L_SOURCES)
    # A layer whose folder is still empty (its README says what goes there):
    # it already has its place in the order, and passes its layers through.
    add_library(${lib} INTERFACE)
    target_link_libraries(${lib} INTERFACE ${lower})
    return()
  endif()
  add_library(${lib} STATIC ${srcs} ${L_SOURCES})
  target_include_directories(${lib} PUBLIC ${CMAKE_SOURCE_DIR}/core)
  target_compile_options(${lib} PRIVATE -Wall -Wextra -Werror)
  target_compile_definitions(${lib} PUBLIC _GNU_SOURCE TG_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
    TG_VERSION="${PROJECT_VERSION}")
  target_link_libraries(${lib} PUBLIC ${lower} ${L_LIBS})

  add_executable(${lib}_linkcheck ${TG_LINKCHECK_MAIN})
  target_link_libraries(${lib}_linkcheck PRIVATE
    "$<LINK_LIBRARY:WHOLE_ARCHIVE,${lib}>" ${lower} ${L_LIBS})
endfunction()
