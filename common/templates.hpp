// Text files from templates/, compiled into the binary.
#pragma once

#include <string_view>

namespace treeflash::templates {

// The template at NAME (a path relative to templates/); throws std::out_of_range.
std::string_view get(std::string_view name);

} // namespace treeflash::templates
