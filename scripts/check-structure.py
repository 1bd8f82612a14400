#!/usr/bin/env python3
"""Structure checks the architecture keeps (docs/design.md, "Rooms"):

- no source file over 800 lines outside tests/benches;
- no function over 100 lines outside tests (a `#[cfg(test)]` module counts as tests);
- no import cycle between the modules of one crate (`crate::a` used in `b` and `crate::b` in `a`,
  or longer cycles).

Prints each violation and exits 1 when there is one. Usage: scripts/check-structure.py [ROOT]
"""
import os
import re
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
MAX_FILE, MAX_FN = 800, 100
CRATES = [d for d in sorted(os.listdir(ROOT)) if d.startswith("spiderpool-") and os.path.isdir(os.path.join(ROOT, d, "src"))]

FN_RE = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def strip_strings(line):
    # Good enough for brace counting: drop char literals, strings and line comments.
    line = re.sub(r"'(\\.|[^\\'])'", "''", line)
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    return line.split("//", 1)[0]


def non_test_lines(lines):
    """Yields (index, line) outside `#[cfg(test)] mod ... { }` blocks."""
    skip_depth = None
    depth = 0
    pending_cfg_test = False
    for i, raw in enumerate(lines):
        line = strip_strings(raw)
        if skip_depth is None and re.match(r"^\s*#\[cfg\(test\)\]", raw):
            pending_cfg_test = True
        opens, closes = line.count("{"), line.count("}")
        if skip_depth is None and pending_cfg_test and re.match(r"^\s*(pub\s+)?mod\s+\w+\s*\{", raw):
            skip_depth = depth
            pending_cfg_test = False
            depth += opens - closes
            continue
        if pending_cfg_test and not raw.strip().startswith("#"):
            pending_cfg_test = False
        depth += opens - closes
        if skip_depth is not None:
            if depth <= skip_depth:
                skip_depth = None
            continue
        yield i, raw


def long_functions(path, lines):
    out = []
    body = dict(non_test_lines(lines))
    i = 0
    n = len(lines)
    while i < n:
        if i in body and FN_RE.match(lines[i]):
            name = FN_RE.match(lines[i]).group(6)
            depth, started, j = 0, False, i
            while j < n:
                l = strip_strings(lines[j])
                if not started and ";" in l and "{" not in l:
                    break  # a declaration (trait method without body)
                depth += l.count("{") - l.count("}")
                if "{" in l:
                    started = True
                if started and depth <= 0:
                    break
                j += 1
            length = j - i + 1
            if started and length > MAX_FN:
                out.append(f"{path}:{i + 1}: fn {name} is {length} lines (max {MAX_FN})")
            i += 1
            continue
        i += 1
    return out


def module_of(crate_src, path):
    rel = os.path.relpath(path, crate_src)[:-3]
    parts = rel.split(os.sep)
    if parts[0] == "bin":
        return None
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts[0] if parts else ""


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                found.append(stack[stack.index(w):] + [w])
            elif state.get(w) is None:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if state.get(v) is None:
            visit(v)
    return found


def main():
    problems = []
    for crate in CRATES:
        src = os.path.join(ROOT, crate, "src")
        graph = {}
        for dirpath, _, files in os.walk(src):
            for f in files:
                if not f.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().split("\n")
                shown = os.path.relpath(path, ROOT)
                if len(lines) - 1 > MAX_FILE:
                    problems.append(f"{shown}: {len(lines) - 1} lines (max {MAX_FILE})")
                problems.extend(long_functions(shown, lines))
                m = module_of(src, path)
                if not m:
                    continue
                text = "\n".join(strip_strings(l) for _, l in non_test_lines(lines))
                deps = set(re.findall(r"\bcrate::(\w+)", text))
                # `use crate::{a, b::c}` groups
                for grp in re.findall(r"\bcrate::\{([^}]*)\}", text):
                    deps.update(re.findall(r"(?:^|,)\s*(\w+)", grp))
                deps.discard(m)
                graph.setdefault(m, set()).update(deps)
        for cyc in cycles(graph):
            problems.append(f"{crate}: import cycle {' -> '.join(cyc)}")
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} structure problem(s)", file=sys.stderr)
        return 1
    print("structure: no file over 800 lines, no function over 100 lines, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
