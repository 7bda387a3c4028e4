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
  add_library(${lib} STATIC ${srcs} ${L_SOURCES})
  target_include_directories(${lib} PUBLIC ${CMAKE_SOURCE_DIR}/core)
  target_compile_options(${lib} PRIVATE -Wall -Wextra -Werror)
  target_compile_definitions(${lib} PUBLIC _GNU_SOURCE TG_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
    TG_VERSION="${PROJECT_VERSION}")
  set(lower)
  foreach(l ${L_LAYERS})
    if(NOT TARGET tg_${l})
      message(FATAL_ERROR "layer ${name} names ${l}, which is not a layer below it")
    endif()
    list(APPEND lower tg_${l})
  endforeach()
  target_link_libraries(${lib} PUBLIC ${lower} ${L_LIBS})
  set_property(GLOBAL APPEND PROPERTY TG_LAYERS ${name})

  add_executable(${lib}_linkcheck ${TG_LINKCHECK_MAIN})
  target_link_libraries(${lib}_linkcheck PRIVATE
    "$<LINK_LIBRARY:WHOLE_ARCHIVE,${lib}>" ${lower} ${L_LIBS})
endfunction()
