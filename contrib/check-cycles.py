#!/usr/bin/env python3
"""Fail when a crate of the workspace has an import cycle between its module units.

    contrib/check-cycles.py [--root DIR] [--list] [--with-tests]

Crates: directories with a Cargo.toml and a src/ (vendor/, target/, dot-dirs skipped); src/lib.rs,
src/main.rs, src/bin/NAME.rs and src/bin/NAME/main.rs each root their own module tree, and paths
into another crate are not followed. tests/, benches/, examples/ targets are not scanned.
Modules: `mod x;` is x.rs or x/mod.rs beside a crate root or mod.rs, under foo/ for foo.rs
(`#[path]` ignored). Inline `mod x { }` blocks belong to their file, but `super`/`self` inside
them resolve from the inline module.

References: with comments (doc links included), strings, chars and raw strings blanked (lines
kept), each `use` tree is expanded to its leaves (groups, nesting, `self`, `*`, `as`), and any
other `crate::`, `super::` or `self::` path in code counts too. foo/mod.rs is module `foo` (its
super is foo's parent), foo/bar.rs is foo::bar. The target is the deepest known module that
prefixes the resolved path. Other paths (extern crates, bare names) are not followed: a bare
name can only reach a child, and parent-child edges are ignored anyway.

Units: an edge P -> Q, once the common prefix is stripped, joins the first differing components
at that level (crate::upload::intake -> crate::store::x is upload -> store at `crate`); if P or
Q is a prefix of the other it is ignored. So a folder module with its descendants is one unit
from outside. At each level every strongly connected component (Tarjan) of two units or more is
a cycle, printed as its ring when it is one simple cycle, else as its units and every arrow
inside it with the shortest way back. Each arrow shows one file:line creating it.

Test code: edges from a module named `tests` (tests.rs, inline `mod tests`) or below it are left
out (a test reaching into a sibling is no layering problem); --with-tests counts them.
Exit 1 on a cycle, else 0 with "N crates, M units, no cycle" (N crate roots, M other modules).
"""
import argparse
import bisect
import os
import re
import sys
import tomllib
from collections import defaultdict, deque

LITERAL = re.compile(r"""//[^\n]*|/\*|(?<!\w)[bc]?r(\#*)".*?"\1|"(?:\\.|[^"\\])*"
    |'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F_]{1,6}\}|.)|[^\\'\n])'""", re.S | re.X)
COMMENT_EDGE = re.compile(r"/\*|\*/")
TOKEN = re.compile(r"""
    (?P<mod>\bmod\s+(?:r\#)?(?P<name>\w+)\s*(?P<kind>[;{]))
  | (?P<use>\buse\s+(?P<tree>[\w:{][^;]*);)
  | (?P<path>(?<!\w)(?:crate|super|self)(?:\s*::\s*(?:r\#)?\w+)+)
  | (?P<open>\{) | (?P<close>\})""", re.X)
USE_TOKEN = re.compile(r"::|[{},*]|(?:r#)?\w+")


def strip(text):
    """The text with comments and string/char literals blanked out, same length and lines."""
    out, i = [], 0
    while m := LITERAL.search(text, i):
        end = m.end()
        if m.group() == "/*":  # block comments nest
            depth = 1
            while depth and (c := COMMENT_EDGE.search(text, end)):
                depth, end = depth + (1 if c.group() == "/*" else -1), c.end()
            end = len(text) if depth else end
        out += [text[i:m.start()], re.sub(r"[^\n]", " ", text[m.start():end])]
        i = end
    return "".join(out) + text[i:]


def use_leaves(tree):
    """(path components, offset of its last token) for each leaf of a `use` tree."""
    stack, cur, out, pending, alias, pos = [[]], [], [], False, False, 0
    for m in USE_TOKEN.finditer(tree):
        t = m.group().removeprefix("r#")
        if alias:
            alias = False
        elif t == "as":
            alias = True
        elif t == "{":
            stack.append(cur)
            cur, pending = list(cur), False
        elif t in ",}":
            if pending:
                out.append((cur, pos))
            if t == "}" and len(stack) > 1:
                stack.pop()
            cur, pending = list(stack[-1]), False
        elif t == "*":
            out.append((cur + ["*"], m.start()))
            pending = False
        elif t != "::":
            if t != "self" or not cur:
                cur.append(t)
            pending, pos = True, m.start()
    if pending:
        out.append((cur, pos))
    return out


def scan(path, modpath, moddir):
    """Child modules declared in a file, and its references (components, base, line, text, test)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = strip(f.read())
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    line = lambda off: bisect.bisect_left(newlines, off) + 1
    children, refs, inline, depth = [], [], [], 0
    for m in TOKEN.finditer(text):
        base = modpath + tuple(name for name, _ in inline)
        test = "tests" in base
        if m["mod"] and m["kind"] == ";":
            children.append((base + (m["name"],), os.path.join(moddir, *base[len(modpath):])))
        elif m["mod"] or m["open"]:
            depth += 1
            inline += [(m["name"], depth)] if m["mod"] else []
        elif m["close"]:
            if inline and inline[-1][1] == depth:
                inline.pop()
            depth -= 1
        elif m["use"]:
            for comps, off in use_leaves(m["tree"]):
                if comps and comps[0] in ("crate", "super", "self"):
                    at = m.start("tree") + off
                    refs.append((comps, base, line(at), "use " + "::".join(comps), test))
        else:
            comps = [c.removeprefix("r#") for c in re.split(r"\s*::\s*", m["path"])]
            refs.append((comps, base, line(m.start()), "::".join(comps), test))
    return children, refs


def resolve(comps, base, known):
    """The deepest known module that the path names, or None."""
    if comps[0] == "crate":
        mod, rest = [], comps[1:]
    else:
        mod, i = list(base), 1 if comps[0] == "self" else 0
        while i < len(comps) and comps[i] == "super":
            if not mod:
                return None
            mod.pop()
            i += 1
        rest = comps[i:]
    full = tuple(mod) + tuple(c for c in rest if c != "*")
    return next(full[:k] for k in range(len(full), -1, -1) if full[:k] in known)


def crate_roots(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("vendor", "target") and d[0] != ".")
        src = os.path.join(dirpath, "src")
        if "Cargo.toml" not in filenames or not os.path.isdir(src):
            continue
        with open(os.path.join(dirpath, "Cargo.toml"), "rb") as f:
            name = tomllib.load(f).get("package", {}).get("name", os.path.basename(dirpath))
        has_lib = os.path.isfile(os.path.join(src, "lib.rs"))
        roots = [(name, "lib.rs"), (f"{name} (bin)" if has_lib else name, "main.rs")]
        bindir = os.path.join(src, "bin")
        for entry in sorted(os.listdir(bindir)) if os.path.isdir(bindir) else []:
            bin_root = entry if entry.endswith(".rs") else os.path.join(entry, "main.rs")
            roots.append((f"{name} (bin {entry.removesuffix('.rs')})", os.path.join("bin", bin_root)))
        yield from ((label, os.path.join(src, f)) for label, f in roots if os.path.isfile(os.path.join(src, f)))


def crate_edges(rootfile, with_tests, root):
    """Module count and {(level, a, b): [(file, line, text), ...]} for one crate root."""
    modules, refs, todo = {(): rootfile}, [], deque([((), rootfile, os.path.dirname(rootfile))])
    while todo:
        modpath, path, moddir = todo.popleft()
        children, found = scan(path, modpath, moddir)
        refs += [(modpath, path, *r) for r in found]
        for child, cdir in children:
            cands = [os.path.join(cdir, child[-1] + ".rs"), os.path.join(cdir, child[-1], "mod.rs")]
            found = next((c for c in cands if os.path.isfile(c)), None)
            if found and child not in modules:
                modules[child] = found
                todo.append((child, found, os.path.join(cdir, child[-1])))
            elif not found:
                print(f"warning: {os.path.relpath(path, root)}: no file for mod {child[-1]}", file=sys.stderr)
    edges = defaultdict(list)
    for source, path, comps, base, line, text, test in refs:
        target = resolve(comps, base, modules)
        if target is None or (test and not with_tests):
            continue
        k = next((i for i, (p, q) in enumerate(zip(source, target)) if p != q), min(len(source), len(target)))
        if k < len(source) and k < len(target):
            edges[(source[:k], source[k], target[k])].append((os.path.relpath(path, root), line, text))
    return len(modules) - 1, {key: sorted(where) for key, where in edges.items()}


def tarjan(graph):
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while not scc or w != v:
                w = stack.pop()
                on.discard(w)
                scc.add(w)
            sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [s for s in sccs if len(s) > 1]


def shortest(graph, scc, src, dst):
    """A shortest path src -> ... -> dst inside the SCC (BFS, neighbours in name order)."""
    prev, todo = {src: None}, deque([src])
    while dst not in prev:
        x = todo.popleft()
        for y in sorted(graph[x] & scc):
            if y not in prev:
                prev[y] = x
                todo.append(y)
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    return path[::-1]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(here), help="workspace root (default: parent of contrib/)")
    ap.add_argument("--list", action="store_true", help="print every unit-level edge")
    ap.add_argument("--with-tests", action="store_true", help="include edges from `tests` modules")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    ncrates = nunits = ncycles = 0
    for name, rootfile in crate_roots(root):
        units, edges = crate_edges(rootfile, args.with_tests, root)
        ncrates, nunits = ncrates + 1, nunits + units
        levels = defaultdict(lambda: defaultdict(set))
        for (level, a, b), where in sorted(edges.items()):
            levels[level][a].add(b)
            levels[level][b]  # every unit a node, even with no edge out
            if args.list:
                print(f"{name} at {'::'.join(('crate',) + level)}: {a} -> {b}  "
                      f"({len(where)} refs, first %s:%s %s)" % where[0])
        for level, graph in sorted(levels.items()):
            at = "::".join(("crate",) + level)
            for scc in tarjan(graph):
                ncycles += 1
                arrows = sorted((a, b) for a in scc for b in graph[a] & scc)
                ring = len(arrows) == len(scc)  # then it is one simple cycle: print it in order
                if ring:
                    walk = [arrows[0][0]] + shortest(graph, scc, arrows[0][1], arrows[0][0])
                    arrows = list(zip(walk, walk[1:]))
                    print(f"cycle in {name} at {at}: {' -> '.join(walk)}")
                else:
                    print(f"cycle in {name} at {at}: {', '.join(sorted(scc))} "
                          f"({len(scc)} units, {len(arrows)} arrows, each with its way back)")
                for a, b in arrows:
                    where = edges[(level, a, b)]
                    more = f" (+{len(where) - 1} more)" if len(where) > 1 else ""
                    back = "" if ring else f"  [back: {' -> '.join(shortest(graph, scc, b, a))}]"
                    print(f"  {a} -> {b}: %s:%s %s{more}{back}" % where[0])
    if ncycles:
        print(f"{ncycles} cycle(s) in {ncrates} crates, {nunits} units")
        return 1
    print(f"{ncrates} crates, {nunits} units, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
