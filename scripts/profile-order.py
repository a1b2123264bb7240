#!/usr/bin/env python3
"""Helpers for scripts/profile-order.

  profile-order.py drive PID QMP_SOCKET LOG_FILE CONSOLE_SOCKET
      waits until the guest says "holding" (on stdout, captured in LOG_FILE, or on the console
      socket when the VMM serves one), then sends a few QMP commands and quits the VM; returns
      at once if the VMM exits first.
  profile-order.py order SYMBOLS CALLGRIND...
      prints the executed functions (callgrind's fn= and cfn= names), in first-seen order,
      with every CPU-specific variant of the glibc functions among them.
  profile-order.py faults SYMBOLS ORDER PERF_SCRIPT...
      prints the functions, not yet in ORDER, whose code took a page fault (`perf script -F
      addr` of page-faults recorded with -d).
"""
import bisect
import json
import os
import re
import socket
import sys
import time


def drive(pid, qmp_path, log_path, console_path):
    def alive():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    seen, console = b"", None
    while alive() and b"flotilla-guest: holding" not in seen:
        time.sleep(0.2)
        if console is None and os.path.exists(console_path):
            console = socket.socket(socket.AF_UNIX)
            console.connect(console_path)
            console.settimeout(0.2)
        if console is not None:
            try:
                seen += console.recv(65536)
            except TimeoutError:
                pass
        elif os.path.exists(log_path):
            with open(log_path, "rb") as log:
                seen = log.read()
    if not alive():
        return
    qmp = socket.socket(socket.AF_UNIX)
    qmp.connect(qmp_path)
    stream = qmp.makefile("rwb")
    stream.readline()  # greeting
    for command in ["qmp_capabilities", "query-status", "stop", "cont", "query-status", "no-such-command", "quit"]:
        stream.write((json.dumps({"execute": command, "id": command}) + "\n").encode())
        stream.flush()
        while b'"id"' not in stream.readline():
            pass


def code_symbols(symbols_path):
    """(addresses, names) of the functions in `nm -n` output, sorted by address."""
    names, addresses = [], []
    with open(symbols_path) as symbols:
        for line in symbols:
            fields = line.split(None, 2)
            if len(fields) == 3 and fields[1] in "tTwW":
                addresses.append(int(fields[0], 16))
                names.append(fields[2].strip())
    return addresses, names


def containing(addresses, names, address):
    index = bisect.bisect_right(addresses, address) - 1
    return names[index] if index >= 0 else None


def order(symbols_path, profiles):
    addresses, names = code_symbols(symbols_path)
    result, seen = [], set()

    def add(name):
        if name not in seen:
            seen.add(name)
            result.append(name)

    # glibc chooses __memchr_avx2, __memchr_evex, __sin_fma, ... by CPU; valgrind's CPU is not
    # the host's.
    variant = re.compile(r"^(__\w+?)_(sse2|ssse3|sse4_1|sse4_2|sse41|sse42|avx|avx2|evex|avx512|erms|fma|fma4)\w*$")
    for path in profiles:
        with open(path) as profile:
            for line in profile:
                match = re.match(r"c?fn=\(\d+\) (.*)", line)
                if not match:
                    continue
                name = re.sub(r"'\d+$", "", match.group(1))  # recursion depth suffix
                if name.startswith("(below"):
                    continue
                if name.startswith("0x"):  # no symbol of its own: the function containing it
                    name = containing(addresses, names, int(name, 16))
                    if name is None:
                        continue
                add(name)
                if (glibc := variant.match(name)):
                    for other in names:
                        if other.startswith(glibc.group(1) + "_"):
                            add(other)
    for name in result:
        print(name)


def faults(symbols_path, order_path, scripts):
    addresses, names = code_symbols(symbols_path)
    with open(order_path) as listed:
        known = set(line.strip() for line in listed)
    found = []
    for path in scripts:
        with open(path) as script:
            for line in script:
                fields = line.split()
                if not fields:
                    continue
                address = int(fields[0], 16)
                if not addresses or not addresses[0] <= address < addresses[-1] + 4096:
                    continue  # not code of the executable (data, stack, heap, kernel)
                name = containing(addresses, names, address)
                if name is not None and name not in known:
                    known.add(name)
                    found.append(name)
    for name in found:
        print(name)


if __name__ == "__main__":
    if sys.argv[1] == "drive":
        drive(int(sys.argv[2]), *sys.argv[3:6])
    elif sys.argv[1] == "order":
        order(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "faults":
        faults(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(f"usage: {sys.argv[0]} drive|order|faults ...")
