# Writes the man pages, from the help treeflash prints, so they cannot
# drift from it: treeflash.1 from `treeflash --help`, and treeflash-CMD.1
# from `treeflash CMD --help` for each command its help lists, named with
# the line it gives the command there. Each is gzipped (-9n) into OUTPUT_DIR.
#   cmake -DTREEFLASH=... -DHELP2MAN=... -DVERSION=... -DOUTPUT_DIR=... -P manpages.cmake
# help2man runs the program through the shell: a path it would split or
# interpret is refused rather than quoted.
if(NOT TREEFLASH MATCHES "^[A-Za-z0-9/._+-]+$")
  message(FATAL_ERROR "man pages: the build folder's path ${TREEFLASH} holds characters help2man cannot pass; build in another folder")
endif()
execute_process(COMMAND ${TREEFLASH} --help OUTPUT_VARIABLE help RESULT_VARIABLE failed)
if(failed)
  message(FATAL_ERROR "treeflash --help failed")
endif()
file(MAKE_DIRECTORY ${OUTPUT_DIR})

# The "Commands:" block: "  NAME   what it does".
string(REGEX MATCH "Commands:\n(  [^\n]+\n)+" commands "${help}")
string(REGEX MATCHALL "  [a-z]+ +[^\n]+" lines "${commands}")
if(NOT lines)
  message(FATAL_ERROR "treeflash --help lists no commands")
endif()

function(page name help_option description)
  string(TOUPPER "${name}" title)
  execute_process(COMMAND ${HELP2MAN} --no-info --no-discard-stderr --version-string=${VERSION}
                          --help-option=${help_option} --name=${description} --section=1
                          --source=treeflash --manual=treeflash ${TREEFLASH}
                  OUTPUT_VARIABLE text RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "help2man failed for ${name}")
  endif()
  # help2man names every page after the binary: name it after the command.
  string(REPLACE "\n.TH TREEFLASH " "\n.TH ${title} " text "${text}")
  string(REPLACE "-" "\\-" name_text "${name}")
  string(REPLACE "\n.SH NAME\ntreeflash " "\n.SH NAME\n${name_text} " text "${text}")
  file(WRITE ${OUTPUT_DIR}/${name}.1 "${text}")
  execute_process(COMMAND gzip -9nf ${OUTPUT_DIR}/${name}.1 RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "gzip failed for ${name}.1")
  endif()
endfunction()

page(treeflash --help "build OSTree commits from busybox root filesystems and put them on SD cards")
foreach(line IN LISTS lines)
  string(REGEX MATCH "^  ([a-z]+) +(.+)$" ignored "${line}")
  set(command "${CMAKE_MATCH_1}")
  set(description "${CMAKE_MATCH_2}")
  # A description is one line of words: no troff escape, no list separator.
  if(description MATCHES "[\\;]")
    message(FATAL_ERROR "man pages: the description of ${command} holds a backslash or semicolon")
  endif()
  page(treeflash-${command} "${command} --help" "${description}")
endforeach()
