#!/usr/bin/env bash
# What one uprobe hit costs on this machine, by the kind of instruction it sits on.
#
# The kernel runs some probed instructions itself (it emulates branches, calls, pushes and nops;
# a 5-byte nop is even turned into a call to a trampoline), and executes every other one out of
# line, single-stepped, which takes a second trap. Where that single step is expensive (in a
# Firecracker VM it costs about 15 us), a probe on `sub $0x18,%rsp` (OpenSSL's SSL_read entry,
# where a return probe must sit) costs some 40 times one on a jump. This measures both kinds
# side by side, so that cost claims about TLS and Go probes rest on this machine's figures.
#
# Usage: sudo bash bench/uprobe_cost.sh [calls]
# Needs root, gcc and tracefs; it probes only its own throw-away binary and removes its probes
# on the way out (the probes never touch another program).
set -euo pipefail
calls=${1:-100000}
tracefs=/sys/kernel/tracing
[ -w "$tracefs/uprobe_events" ] || tracefs=/sys/kernel/debug/tracing
[ -w "$tracefs/uprobe_events" ] || { echo "uprobe_cost: tracefs uprobe_events not writable (run as root)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "uprobe_cost: gcc is missing" >&2; exit 1; }

dir=$(mktemp -d)
group="beholder_ubench_$$"
# The probes' events are enabled in a tracing instance of our own whose buffer is off: the
# figures are the traps, not trace-buffer writes, and the host's own trace is left alone.
inst="$tracefs/instances/$group"
cleanup() {
  echo 0 > "$inst/events/$group/enable" 2>/dev/null || true
  rmdir "$inst" 2>/dev/null || true
  grep "^[pr]:$group/" "$tracefs/uprobe_events" 2>/dev/null | awk '{print $1}' | sed 's/^[pr]:/-:/' |
    while read -r ev; do echo "$ev" >> "$tracefs/uprobe_events"; done
  rm -rf "$dir"
}
trap cleanup EXIT

# One tiny function per instruction kind, each probed on that instruction.
cat > "$dir/u.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
extern int k_jcc(int), k_call(int), k_nop5(int), k_sub(int), k_endbr(int), k_mov(int), k_ret(int), k_push(int);
asm(".text\n"
    ".globl k_jcc\nk_jcc: test %edi,%edi\n js 1f\n1: lea 1(%rdi),%eax\n ret\n"
    ".globl k_call\nk_call: call 2f\n lea 1(%rdi),%eax\n ret\n2: ret\n"
    ".globl k_nop5\nk_nop5: .byte 0x0f,0x1f,0x44,0x00,0x00\n lea 1(%rdi),%eax\n ret\n"
    ".globl k_sub\nk_sub: sub $0x18,%rsp\n add $0x18,%rsp\n lea 1(%rdi),%eax\n ret\n"
    ".globl k_endbr\nk_endbr: endbr64\n lea 1(%rdi),%eax\n ret\n"
    ".globl k_mov\nk_mov: mov %rdi,%rax\n lea 1(%rdi),%eax\n ret\n"
    ".globl k_ret\nk_ret: lea 1(%rdi),%eax\n ret\n"
    ".globl k_push\nk_push: push %rbx\n lea 1(%rdi),%eax\n pop %rbx\n ret\n");
int main(int argc, char **argv) {
  int (*fs[])(int) = {k_jcc, k_call, k_nop5, k_sub, k_endbr, k_mov, k_ret, k_push, k_push, k_sub};
  int (*f)(int) = fs[atoi(argv[1])];
  long n = atol(argv[2]), s = 0;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) s += f((int)i);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1000.0);
  return s == 42;
}
EOF
gcc -O2 -o "$dir/u" "$dir/u.c"
mkdir "$inst"
echo 0 > "$inst/tracing_on"

offset() { # symbol [bytes to skip]
  printf '0x%x' $((0x$(nm "$dir/u" | awk -v s="$1" '$3 == s {print $1}') + ${2:-0}))
}
# push+ret and sub+ret: a return probe (uretprobe) on the function, which also traps at its
# first instruction; what OpenSSL's internal read and write (first instruction a push) and
# its exported wrappers (a sub) each cost with an entry and a return probe.
kinds=(jcc call nop5 sub endbr mov ret push push+ret sub+ret)
how=(emulated emulated optimized single-stepped single-stepped single-stepped single-stepped emulated emulated+return single-stepped+return)
printf '%-9s %-22s %12s %12s %12s\n' kind "kernel runs it" "bare us" "probed us" "added us"
for i in "${!kinds[@]}"; do
  k=${kinds[$i]}
  skip=0
  [ "$k" = jcc ] && skip=2 # the js after the test
  [ "$k" = ret ] && skip=3
  fn=${k%+ret}
  ev=${k/+/_}
  if [ "$fn" != "$k" ]; then
    echo "p:$group/${ev}_in $dir/u:$(offset "k_$fn")" >> "$tracefs/uprobe_events"
    echo "r:$group/$ev $dir/u:$(offset "k_$fn")" >> "$tracefs/uprobe_events"
  else
    echo "p:$group/$ev $dir/u:$(offset "k_$fn" $skip)" >> "$tracefs/uprobe_events"
  fi
  bare=$("$dir/u" "$i" "$calls")
  for e in "$ev" "${ev}_in"; do [ -e "$inst/events/$group/$e" ] && echo 1 > "$inst/events/$group/$e/enable"; done
  probed=$("$dir/u" "$i" "$calls")
  for e in "$ev" "${ev}_in"; do [ -e "$inst/events/$group/$e" ] && echo 0 > "$inst/events/$group/$e/enable"; done
  awk -v k="$k" -v h="${how[$i]}" -v b="$bare" -v p="$probed" \
    'BEGIN { printf "%-9s %-22s %12s %12s %12.3f\n", k, h, b, p, p - b }'
done
