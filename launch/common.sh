# Shell helpers shared by launch/gpu.sh and launch/tpu.sh (sourced; the caller sets PROG and DRY_RUN).
# shellcheck shell=bash

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

# Print an argument so that a shell reads it back unchanged (readable: quotes only when needed).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {
  local out="" arg
  for arg in "$@"; do out+="$(quote "$arg") "; done
  printf '%s\n' "${out% }"
}

# Run a command, or print it under --dry-run (the caller sets DRY_RUN).
run() {
  if ((DRY_RUN)); then show "$@"; else "$@"; fi
}
