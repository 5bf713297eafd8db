# Writes OUTPUT, a C++ source exposing every file below DIR as
# treeflash::templates::get("relative/name"). Run at build time
# (cmake -DDIR=... -DOUTPUT=... -P embed-templates.cmake), so an edited
# template is compiled in by the next build.
file(GLOB_RECURSE files RELATIVE ${DIR} ${DIR}/*)
list(SORT files)
set(body "")
foreach(f IN LISTS files)
  file(READ ${DIR}/${f} content HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," content "${content}")
  string(MAKE_C_IDENTIFIER "t_${f}" id)
  string(APPEND arrays "const char ${id}[] = {${content} 0};\n")
  string(APPEND body "        {\"${f}\", std::string_view(${id}, sizeof ${id} - 1)},\n")
endforeach()
file(WRITE ${OUTPUT} "// Generated from templates/ by common/embed-templates.cmake.
#include \"common/templates.hpp\"
#include <map>
#include <stdexcept>
#include <string>

namespace treeflash::templates {

namespace {
${arrays}} // namespace

std::string_view get(std::string_view name)
{
    static const std::map<std::string, std::string_view, std::less<>> all = {
${body}    };
    auto it = all.find(name);
    if (it == all.end())
        throw std::out_of_range(\"no template named \" + std::string(name));
    return it->second;
}

} // namespace treeflash::templates
")
