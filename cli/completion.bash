# bash completion for treeflash. Commands and options are read from
# treeflash's own --help, so they follow the installed version; boards are
# the folders treeflash searches ($TREEFLASH_BOARD_PATH, a checkout's
# board/, share/treeflash/board beside the binary); devices are whole disks.

_treeflash_commands()
{
    "$1" --help 2>/dev/null | awk '/^Commands:/ { inside = 1; next } inside && /^  [a-z]/ { print $1; next } inside { exit }'
}

_treeflash_options()
{
    "$1" "$2" --help 2>/dev/null | grep -oE -- '--[a-z0-9][a-z0-9-]*' | sort -u
}

# Options followed by a value in the help ("--bmap FILE").
_treeflash_value_options()
{
    "$1" "$2" --help 2>/dev/null | grep -oE -- '--[a-z0-9][a-z0-9-]* [A-Z]' | cut -d' ' -f1 | sort -u
}

_treeflash_boards()
{
    local binary dir conf name dirs
    binary=$(readlink -f "$(command -v "$1")")
    dirs=${TREEFLASH_BOARD_PATH:-}
    # Run from a checkout's build tree (cli/treeflash under CMakeCache.txt):
    # the checkout's board/.
    local source
    source=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "${binary%/*}/../CMakeCache.txt" 2>/dev/null)
    [ -n "$source" ] && dirs+=":$source/board"
    dirs+=":${binary%/*}/../share/treeflash/board:/usr/share/treeflash/board"
    local IFS=:
    for dir in $dirs; do
        [ -d "$dir" ] || continue
        for conf in "$dir"/*/board.conf; do
            [ -f "$conf" ] || continue
            name=${conf%/board.conf}
            name=${name##*/}
            # compgen -W expands its words: only plain names are offered.
            [[ $name =~ ^[A-Za-z0-9._-]+$ ]] && printf '%s\n' "$name"
        done
    done
}

_treeflash_disks()
{
    lsblk -dpno NAME 2>/dev/null
    ls -d /dev/disk/by-path/* /dev/disk/by-id/* 2>/dev/null
}

_treeflash()
{
    local cur prev command
    COMPREPLY=()
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD - 1]}
    command=${COMP_WORDS[1]:-}
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "$(_treeflash_commands "${COMP_WORDS[0]}") --help --version" -- "$cur"))
        return
    fi
    case $prev in
        --board)
            COMPREPLY=($(compgen -W "$(_treeflash_boards "${COMP_WORDS[0]}" | sort -u)" -- "$cur"))
            compopt -o dirnames 2>/dev/null
            return ;;
        --slot|--device|--target)
            COMPREPLY=($(compgen -W "$(_treeflash_disks)" -- "$cur"))
            return ;;
        --repo|--rootfs|--userland|--modules)
            compopt -o dirnames 2>/dev/null
            return ;;
        --http|--ref|--branch|--os|--subject|--body|--version|--remote-url|--karg|--size|--cards|--compress|--db|--station)
            return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$(_treeflash_options "${COMP_WORDS[0]}" "$command")" -- "$cur"))
        return
    fi
    # The arguments given so far that are no option's value: write takes
    # IMAGE then disks, inspect and upgrade a card or an image.
    local takes_value positional=0 i
    takes_value=" $(_treeflash_value_options "${COMP_WORDS[0]}" "$command" | tr '\n' ' ') "
    for ((i = 2; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == -* ]] && continue
        [[ $takes_value == *" ${COMP_WORDS[i - 1]} "* ]] && continue
        positional=$((positional + 1))
    done
    case $command in
        write)
            if [ "$positional" -ge 1 ]; then
                COMPREPLY=($(compgen -W "$(_treeflash_disks)" -- "$cur"))
                return
            fi ;;
        inspect|upgrade)
            COMPREPLY=($(compgen -W "$(_treeflash_disks)" -- "$cur")) ;;
        line)
            if [ "$positional" -eq 0 ]; then
                COMPREPLY=($(compgen -W "import status export" -- "$cur"))
                return
            fi ;;
    esac
    compopt -o default 2>/dev/null
}
complete -F _treeflash treeflash
