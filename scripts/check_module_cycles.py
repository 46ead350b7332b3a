#!/usr/bin/env python3
"""Fail on import cycles between the modules of the library crate (`src/`).

Each file is a module of its own (`src/cuda/driver.rs` is `cuda::driver`,
`src/sink/mod.rs` is `sink`). Every path into the crate is mapped to the module that defines
what it names:

- `use` items (nested trees, `self`, `as`, globs) and paths in expressions, types and
  `impl ... for` headers, starting with `crate::`, `super::`, `self::` or a child module's name;
- a name that a module only re-exports (`pub use`, or any `use`) is followed to the module that
  defines it, so `crate::format::Dtype` from `format::index` is an edge to `format::dtype`, not to
  `format`, and re-exports do not invent cycles. The re-export itself is an edge from the
  re-exporting module to the defining one (`format` -> `format::index` for `pub use index::...`).

Both directions between a parent and a child count like any other edge: a child that uses its
parent's own items while the parent calls into the child is a cycle.

Left out: `src/bin` (not part of the library's module tree), `#[cfg(test)]` items (inline
`mod tests { ... }` blocks, `#[cfg(test)] mod x;` files, and any other item under a bare
`#[cfg(test)]`), comments and string literals. Other `cfg`s (features) are all taken as on.

A cycle is a strongly connected component of more than one module; each is printed as cycle
paths `a -> b -> a` that cover its modules, followed by one source location per edge inside it.

Also an error: a module that names one of the crate root's re-exports (`use crate::{Dtype,
Error}`, `crate::CancelToken` in an expression) instead of the module that defines it.

Exit status: 0 without cycles or root re-export uses, 1 with any, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

Mod = tuple[str, ...]
ROOT: Mod = ()

IDENT = r"(?:r#)?[A-Za-z_][A-Za-z0-9_]*"


def show(m: Mod) -> str:
    return "::".join(m) if m else "crate"


# ---------------------------------------------------------------------------------------------
# Lexing: blank comments and literals, keeping offsets and newlines.


def _blank(s: str) -> str:
    return re.sub(r"[^\n]", " ", s)


_CHAR = re.compile(r"b?'(?:\\(?:u\{[0-9A-Fa-f]*\}|x[0-9A-Fa-f]{2}|.)|[^'\\\n])'")
_RAW = re.compile(r'b?r(#*)"')


def strip_comments_and_literals(src: str) -> str:
    """`src` with comments, strings and char literals blanked (same length, same newlines)."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(_blank(src[i:j]))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(_blank(src[i:j]))
            i = j
        elif (m := _RAW.match(src, i)) and (i == 0 or not re.match(r"\w", src[i - 1])):
            end = '"' + m.group(1)
            j = src.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + _blank(src[i + 2 : j]))
            i = j
        elif c == '"' or (c == "b" and src.startswith('b"', i) and (i == 0 or not re.match(r"\w", src[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            out.append('""' + _blank(src[i + 2 : j]))
            i = j
        elif c == "'" or (c == "b" and src.startswith("b'", i)):
            m = _CHAR.match(src, i)
            if m and (c == "'" or i == 0 or not re.match(r"\w", src[i - 1])):
                out.append(_blank(m.group(0)))
                i = m.end()
            else:  # a lifetime or a label
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _matching(text: str, i: int, open_: str = "{", close: str = "}") -> int:
    """Index just past the bracket closing the one at `i`."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


_CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_INNER_CFG_TEST = re.compile(r"#!\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_ATTR = re.compile(r"\s*#\s*\[")
_MOD_DECL = re.compile(rf"(?:pub\s*(?:\([^)]*\))?\s*)?mod\s+({IDENT})\s*;")


def drop_cfg_test(text: str) -> tuple[str, set[str]]:
    """Blank every item under a bare `#[cfg(test)]`; returns the text and the names of the
    `#[cfg(test)] mod x;` declarations (test-only child files)."""
    test_children: set[str] = set()
    while m := _CFG_TEST.search(text):
        j = m.end()
        while a := _ATTR.match(text, j):  # further attributes of the same item
            j = _matching(text, a.end() - 1, "[", "]")
        j = re.compile(r"\s*").match(text, j).end()
        if d := _MOD_DECL.match(text, j):
            test_children.add(d.group(1).removeprefix("r#"))
        # The item ends at the first `;` or the `}` closing the first `{`, outside () and [].
        k, depth = j, 0
        while k < len(text):
            ch = text[k]
            if ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
            elif depth == 0 and ch == ";":
                k += 1
                break
            elif depth == 0 and ch == "{":
                k = _matching(text, k)
                break
            k += 1
        text = text[: m.start()] + _blank(text[m.start() : k]) + text[k:]
    return text, test_children


# ---------------------------------------------------------------------------------------------
# Parsing: module declarations, use trees, definitions, paths.

_TOKEN = re.compile(rf"::|[{{}},*]|{IDENT}")
_USE = re.compile(rf"(?<![\w$])(pub\s*(?:\([^)]*\))?\s*)?use\s+([^;]*);")
_DEF = re.compile(rf"\b(?:fn|struct|enum|trait|type|const|static|union|mod)\s+({IDENT})|\bmacro_rules!\s*({IDENT})")
_PATH = re.compile(rf"(?<![\w:$])({IDENT}(?:\s*::\s*{IDENT})+)")
_PUB_IN = re.compile(r"\bpub\s*\(\s*in\s+[^)]*\)")


@dataclass
class UseItem:
    path: list[str]  # as written; `crate`, `super`, `self`, or a name in scope first
    name: str  # the name it binds, or "*" for a glob
    line: int
    public: bool


def parse_use_tree(tree: str) -> list[tuple[list[str], str]]:
    """`a::{b, c::d as e, f::*}` -> [([a, b], b), ([a, c, d], e), ([a, f], *)]. `self` in braces
    binds the prefix's last name. A leading `::` (an extern crate) gives []."""
    toks = _TOKEN.findall(tree)
    out: list[tuple[list[str], str]] = []
    pos = 0

    def parse(prefix: list[str]) -> None:
        nonlocal pos
        segs = list(prefix)
        while pos < len(toks):
            t = toks[pos]
            if t == "{":
                pos += 1
                while pos < len(toks) and toks[pos] != "}":
                    if toks[pos] == ",":
                        pos += 1
                        continue
                    parse(segs)
                pos += 1
                return
            if t == "*":
                pos += 1
                out.append((segs, "*"))
                return
            if t in (",", "}"):
                return
            if t == "::":
                pos += 1
                continue
            pos += 1
            alias = None
            if pos + 1 < len(toks) and toks[pos] == "as":
                alias = toks[pos + 1]
                pos += 2
            if pos < len(toks) and toks[pos] == "::":
                segs.append(t)
                continue
            if t == "self":
                if segs:
                    out.append((segs, alias or segs[-1]))
            else:
                out.append((segs + [t], alias or t))
            return

    if toks and toks[0] == "::":
        return []
    parse([])
    return [(p, n.removeprefix("r#")) for p, n in out if n != "_"]


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


@dataclass
class Module:
    path: Mod
    file: Path
    text: str  # comments, literals and cfg(test) items blanked
    children: set[str] = field(default_factory=set)
    uses: dict[str, UseItem] = field(default_factory=dict)
    globs: list[UseItem] = field(default_factory=list)
    defs: set[str] = field(default_factory=set)
    refs: list[tuple[list[str], int, str]] = field(default_factory=list)  # (path, line, as written)


def module_file(src: Path, m: Mod) -> Path | None:
    if not m:
        p = src / "lib.rs"
        return p if p.is_file() else None
    base = src.joinpath(*m[:-1])
    for p in (base / f"{m[-1]}.rs", base / m[-1] / "mod.rs"):
        if p.is_file():
            return p
    return None


def load_tree(src: Path) -> dict[Mod, Module]:
    """The modules reachable from `src/lib.rs` through `mod` declarations (not `#[cfg(test)]`)."""
    mods: dict[Mod, Module] = {}
    todo: list[Mod] = [ROOT]
    while todo:
        mp = todo.pop()
        f = module_file(src, mp)
        if f is None:
            if mp:
                print(f"warning: no file for module {show(mp)}", file=sys.stderr)
            continue
        raw = strip_comments_and_literals(f.read_text(encoding="utf-8"))
        if _INNER_CFG_TEST.search(raw):
            continue
        text, test_children = drop_cfg_test(raw)
        mod = Module(mp, f, text)
        for d in _MOD_DECL.finditer(text):
            name = d.group(1).removeprefix("r#")
            if name not in test_children:
                mod.children.add(name)
                todo.append(mp + (name,))
        mods[mp] = mod
    for mod in mods.values():
        parse_module(mod)
    return mods


def parse_module(mod: Module) -> None:
    text = mod.text
    for m in _DEF.finditer(text):
        mod.defs.add((m.group(1) or m.group(2)).removeprefix("r#"))
    rest = list(text)
    for m in _USE.finditer(text):
        line = line_of(text, m.start())
        for path, name in parse_use_tree(m.group(2)):
            path = [s.removeprefix("r#") for s in path]
            item = UseItem(path, name, line, bool(m.group(1)))
            if name == "*":
                mod.globs.append(item)
            else:
                mod.uses.setdefault(name, item)
            mod.refs.append((path, line, "::".join(path) + ("::*" if name == "*" else "")))
        rest[m.start() : m.end()] = _blank(m.group(0))
    body = _PUB_IN.sub(lambda m: _blank(m.group(0)), "".join(rest))
    for m in _PATH.finditer(body):
        segs = [s.strip().removeprefix("r#") for s in m.group(1).split("::")]
        mod.refs.append((segs, line_of(body, m.start()), "::".join(segs)))


# ---------------------------------------------------------------------------------------------
# Resolution: a path to the module that defines what it names.


def within(m: Mod, ancestor: Mod) -> bool:
    """`m` is `ancestor` or inside it."""
    return m[: len(ancestor)] == ancestor


@dataclass
class Target:
    module: Mod  # the module that defines what the path names
    is_module: bool  # the path names that module itself
    via: list[Mod]  # modules whose re-export of a foreign item the path goes through


class Resolver:
    def __init__(self, mods: dict[Mod, Module]):
        self.mods = mods

    def start(self, at: Mod, path: list[str]) -> tuple[Mod, list[str]] | None:
        """Where a path written in `at` starts; None for an extern crate, a type or a local name."""
        if not path:
            return None
        head = path[0]
        if head == "crate":
            return ROOT, path[1:]
        if head == "self":
            return at, path[1:]
        if head == "super":
            base, k = at, 0
            while k < len(path) and path[k] == "super":
                if not base:
                    return None
                base, k = base[:-1], k + 1
            return base, path[k:]
        mod = self.mods.get(at)
        if mod and (head in mod.children or head in mod.uses):
            return at, path
        return None  # std::..., serde::..., Self::..., a local variable's method path

    def resolve(self, at: Mod, path: list[str], importer: Mod | None = None, depth: int = 0) -> Target | None:
        """What a path written in module `at` names, for code in `importer` (default `at`); None
        when the path leaves the crate."""
        importer = at if importer is None else importer
        s = self.start(at, path)
        if s is None or depth > 32:
            return None
        cur, segs = s
        via: list[Mod] = []
        for i, seg in enumerate(segs):
            mod = self.mods.get(cur)
            if mod is None:
                return Target(cur, True, via)
            if seg in mod.children:
                cur = cur + (seg,)
                continue
            found = self.lookup(mod, seg, importer, depth)
            if found is None:
                return None
            via += found.via
            if found.is_module and i + 1 < len(segs):  # `use x::driver as r;` then `r::f`
                cur = found.module
                continue
            return Target(found.module, found.is_module and i + 1 == len(segs), via)
        return Target(cur, True, via)

    def lookup(self, mod: Module, name: str, importer: Mod, depth: int) -> Target | None:
        """The module defining item `name` as seen inside `mod` (an item of `mod` itself when
        nothing else claims it: an enum's variants, a method, a macro-made item).

        A name that `mod` imports from outside itself (`pub use crate::cancel::CancelToken` in
        `loader`) and that code outside `mod` reaches through `mod` (`crate::loader::CancelToken`)
        is a dependency on both: the defining module and `mod`'s re-export (`via`). A re-export
        of `mod`'s own descendants (`pub use index::ShardIndex` in `format`) is a facade: the
        path goes to the defining module only."""
        if name in mod.uses:
            t = self.resolve(mod.path, mod.uses[name].path, importer, depth + 1)
            if t is not None and not within(importer, mod.path) and not within(t.module, mod.path):
                t.via.append(mod.path)
            return t
        if name in mod.defs:
            return Target(mod.path, False, [])
        for g in mod.globs:
            r = self.resolve(mod.path, g.path, importer, depth + 1)
            if r is None or not r.is_module:
                continue  # a glob over an extern crate or an enum's variants
            src = self.mods.get(r.module)
            if src and (name in src.defs or name in src.uses or name in src.children):
                return self.resolve(r.module, ["self", name], importer, depth + 1)
        return Target(mod.path, False, [])


# ---------------------------------------------------------------------------------------------
# The graph and its cycles.


@dataclass
class Edge:
    file: Path
    line: int
    text: str


Graph = dict[Mod, dict[Mod, Edge]]


def build_graph(mods: dict[Mod, Module]) -> Graph:
    """Module -> module edges at file granularity, with the first place that makes each."""
    res = Resolver(mods)
    graph: Graph = {m: {} for m in mods}
    for mod in mods.values():
        for path, line, text in mod.refs:
            t = res.resolve(mod.path, path)
            if t is None:
                continue
            for target, note in [(t.module, "")] + [(v, f" (re-exported by {show(v)})") for v in t.via]:
                if target != mod.path and target in mods:
                    graph[mod.path].setdefault(target, Edge(mod.file, line, text + note))
    return graph


def root_reexport_uses(mods: dict[Mod, Module]) -> list[tuple[Module, int, str, str]]:
    """Paths outside the crate root that name one of its re-exports (`crate::Dtype`,
    `use crate::{Error, Result}`, `super::Loader` from a top-level module): (module, line, path
    as written, the path to write instead: the root's own `use` path)."""
    root = mods.get(ROOT)
    if root is None:
        return []
    res = Resolver(mods)
    found = []
    for mod in mods.values():
        if mod.path == ROOT:
            continue
        for path, line, text in mod.refs:
            s = res.start(mod.path, path)
            if s is None or s[0] != ROOT or not s[1]:
                continue
            name = s[1][0]
            if name in root.children or name not in root.uses:
                continue
            instead = canonical(res, ROOT, root.uses[name].path) + s[1][1:]
            found.append((mod, line, text, "::".join(["crate"] + instead)))
    return found


def canonical(res: Resolver, at: Mod, path: list[str], depth: int = 0) -> list[str]:
    """The path from the crate root through modules (and their facades) to what `path`, written
    in `at`, names: a re-export of an item from outside the re-exporting module is followed."""
    s = res.start(at, path)
    if s is None:
        return path
    cur, segs = s
    while segs and segs[0] in res.mods[cur].children:
        cur, segs = cur + (segs[0],), segs[1:]
    if segs and depth < 32 and (u := res.mods[cur].uses.get(segs[0])):
        t = res.resolve(cur, u.path)
        if t is not None and not within(t.module, cur):
            return canonical(res, cur, u.path, depth + 1) + segs[1:]
    return list(cur) + segs


def lift(graph: Graph) -> dict[Mod, dict[Mod, list[tuple[Mod, Mod, Edge]]]]:
    """The edges between sibling subtrees: `a -> b` becomes `a' -> b'`, the children of their
    lowest common ancestor that hold `a` and `b`. An edge between a module and its own ancestor
    or descendant (a folder's `mod.rs` and the files inside the folder) is the folder's inside
    and is left out."""
    lifted: dict[Mod, dict[Mod, list[tuple[Mod, Mod, Edge]]]] = {}
    for a, outs in graph.items():
        for b, e in outs.items():
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            if k == len(a) or k == len(b):
                continue
            la, lb = a[: k + 1], b[: k + 1]
            lifted.setdefault(la, {}).setdefault(lb, []).append((a, b, e))
            lifted.setdefault(lb, {})
    return lifted


def sccs(graph: dict[Mod, dict]) -> list[list[Mod]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[Mod, int] = {}
    low: dict[Mod, int] = {}
    on: set[Mod] = set()
    stack: list[Mod] = []
    out: list[list[Mod]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def shortest_cycle(graph: dict[Mod, dict], comp: set[Mod], start: Mod) -> list[Mod]:
    prev: dict[Mod, Mod] = {}
    q = deque([start])
    seen = {start}
    while q:
        v = q.popleft()
        for w in sorted(graph[v]):
            if w not in comp:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in seen:
                seen.add(w)
                prev[w] = v
                q.append(w)
    return [start]


Lifted = dict[Mod, dict[Mod, list[tuple[Mod, Mod, Edge]]]]


def find_cycles(graph: Graph) -> tuple[Lifted, list[tuple[list[Mod], list[list[Mod]]]]]:
    """The lifted graph, and each group of sibling modules in a cycle (a strongly connected
    component of more than one): its modules, and cycle paths through them: every pair that
    imports each other, then the shortest cycle through each module not on one yet."""
    lifted = lift(graph)
    found = []
    for comp in sorted(c for c in sccs(lifted) if len(c) > 1):
        members = set(comp)
        paths = [[a, b, a] for a in comp for b in sorted(lifted[a]) if a < b and a in lifted.get(b, {})]
        covered = {m for p in paths for m in p}
        for m in comp:
            if m not in covered:
                cyc = shortest_cycle(lifted, members, m)
                covered.update(cyc)
                paths.append(cyc)
        found.append((comp, paths))
    return lifted, found


def cycles_report(graph: Graph, repo: Path) -> list[str]:
    def where(e: Edge) -> str:
        try:
            return f"{e.file.relative_to(repo)}:{e.line}"
        except ValueError:
            return f"{e.file}:{e.line}"

    lines: list[str] = []
    lifted, found = find_cycles(graph)
    for n, (comp, paths) in enumerate(found, 1):
        lines.append(f"cycle group {n}: {len(comp)} modules ({', '.join(show(m) for m in comp)})")
        for p in paths:
            lines.append("  " + " -> ".join(show(x) for x in p))
            for a, b in zip(p, p[1:]):
                edges = lifted[a][b]
                # one place per step; the count says how many more import the same way
                fa, fb, e = edges[0]
                more = f" (+{len(edges) - 1} more)" if len(edges) > 1 else ""
                lines.append(f"    {show(fa)} -> {show(fb)}: {where(e)} `{e.text}`{more}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", type=Path, help="the crate's src/ (default: this repository's)")
    ap.add_argument("--edges", action="store_true", help="print every module -> module edge")
    args = ap.parse_args(argv)
    src: Path = args.src or Path(__file__).resolve().parent.parent / "src"
    if not (src / "lib.rs").is_file():
        print(f"error: no lib.rs in {src}", file=sys.stderr)
        return 2
    mods = load_tree(src)
    graph = build_graph(mods)
    if args.edges:
        for a in sorted(graph):
            for b, e in sorted(graph[a].items()):
                print(f"{show(a)} -> {show(b)}  ({e.file.name}:{e.line} `{e.text}`)")
    repo = src.resolve().parent
    report = cycles_report(graph, repo)
    n_edges = sum(len(v) for v in graph.values())
    if report:
        print(f"module cycles in {src} ({len(mods)} modules, {n_edges} edges):")
        print("\n".join(report))
    else:
        print(f"no module cycles in {src} ({len(mods)} modules, {n_edges} edges)")
    root_uses = root_reexport_uses(mods)
    if root_uses:
        print(f"crate root re-exports used inside the crate ({len(root_uses)}; name the defining module instead):")
        for mod, line, text, instead in sorted(root_uses, key=lambda x: (str(x[0].file), x[1])):
            try:
                where = mod.file.relative_to(repo)
            except ValueError:
                where = mod.file
            print(f"  {where}:{line} `{text}`: write `{instead}`")
    return 1 if report or root_uses else 0


if __name__ == "__main__":
    sys.exit(main())
