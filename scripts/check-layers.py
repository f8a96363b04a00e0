#!/usr/bin/env python3
"""The layering check run by scripts/test.sh: fails on a forbidden dependency between berth's
crates, or on an import cycle or a forbidden import between the modules of one crate.

Crates (agent/*), along the data flow; each may depend only on the ones listed:

    berth-proto      generated gRPC code                   -
    berth-core       image refs, hosts, metrics, retries   -
    berth-runtime    containerd and the OCI runtime spec   -   (and never secrecy/zeroize)
    berth-unpack     the layer applier                     -   (and never secrecy/zeroize)
    berth-secrets    pull-secret stores, providers         core
    berth-registry   auth and pull                         core, runtime, secrets, unpack
    berth            the daemon, the CLI, the API, orders  every crate above

So no crate that builds a container spec or writes into containerd can name a credential type:
`use berth_secrets::...` or `use secrecy::...` in berth-runtime does not compile.

Modules: an edge is a `crate::a::b` (or `super::...`) path from one module file to another.
Edges between a module and its own ancestors (a child using its parent's error type, a parent
using its children) are how Rust modules are built and are not counted; any other cycle is
an error. Rules below list imports that go from a lower stage back up.

Usage: scripts/check-layers.py [--graph]
"""

import json
import os
import re
import subprocess
import sys

ALLOWED_CRATES = {
    "berth-proto": set(),
    "berth-core": set(),
    "berth-runtime": set(),
    "berth-unpack": set(),
    "berth-secrets": {"berth-core"},
    "berth-registry": {"berth-core", "berth-runtime", "berth-secrets", "berth-unpack"},
    "berth": {
        "berth-proto",
        "berth-core",
        "berth-runtime",
        "berth-unpack",
        "berth-secrets",
        "berth-registry",
    },
    # The integration tests drive the binaries and speak the protos.
    "berth-tests": {"berth"},
}

# Crates that may not depend, even for tests, on what holds or wipes credentials.
NO_CREDENTIAL_DEPS = {
    "berth-runtime": {"secrecy", "zeroize", "berth-secrets", "berth-registry"},
    "berth-unpack": {"secrecy", "zeroize", "berth-secrets", "berth-registry"},
    "berth-core": {"secrecy", "berth-secrets", "berth-registry"},
}

# (crate, importing module prefix, imported module prefix): forbidden module imports inside a
# crate, lower stage -> higher stage.
FORBIDDEN_MODULE_IMPORTS = [
    ("berth", "run", "api"),
    ("berth", "run", "daemon"),
    ("berth", "run", "cmd"),
    ("berth", "audit", "api"),
    ("berth", "audit", "run"),
    ("berth", "config", "api"),
    ("berth", "config", "daemon"),
    ("berth", "api", "cmd"),
    ("berth", "api", "daemon"),
    ("berth", "cmd", "daemon"),
    ("berth", "cmd", "run"),
    ("berth-registry", "auth", "pull"),
]

# (crate, module prefix, crate name): a module that may not use another crate at all. The
# puller carries an order's secret only as auth's sealed `OrderCredential`.
FORBIDDEN_CRATE_USES = [
    ("berth-registry", "pull", "berth_secrets"),
]

PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def metadata():
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def check_crates(meta, errors):
    ours = {package["name"] for package in meta["packages"]}
    for package in meta["packages"]:
        name = package["name"]
        if name not in ALLOWED_CRATES:
            errors.append(f"crate {name}: not in the layer table of scripts/check-layers.py")
            continue
        for dep in package["dependencies"]:
            dep_name = dep["name"]
            if dep_name in ours and dep_name not in ALLOWED_CRATES[name]:
                errors.append(f"crate {name} depends on {dep_name}: not allowed by the layers")
            if dep_name in NO_CREDENTIAL_DEPS.get(name, set()):
                errors.append(
                    f"crate {name} depends on {dep_name}: this crate must not be able to "
                    "name or hold a credential"
                )


def module_files(src_dir):
    """Maps module paths (tuples) to files, for one crate's src/."""
    modules = {}
    for root, _dirs, files in os.walk(src_dir):
        for file in files:
            if not file.endswith(".rs"):
                continue
            path = os.path.join(root, file)
            rel = os.path.relpath(path, src_dir)[: -len(".rs")].split(os.sep)
            if rel[0] == "bin":
                continue
            if rel[-1] in ("lib", "main") and len(rel) == 1:
                rel = []
            elif rel[-1] == "mod":
                rel = rel[:-1]
            modules[tuple(rel)] = path
    return modules


def strip_tests(text):
    """Drops `#[cfg(test)] mod tests { ... }` bodies (test helpers may reach anywhere)."""
    out = []
    index = 0
    for match in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{", text):
        if match.start() < index:
            continue
        out.append(text[index : match.start()])
        depth = 1
        position = match.end()
        while depth and position < len(text):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
            position += 1
        index = position
    out.append(text[index:])
    return "".join(out)


def is_test_module(module, path):
    return module and module[-1] in ("tests", "test_support") or path.endswith("/tests.rs")


def resolve(modules, current, kind, segments):
    if kind == "crate":
        base = []
    else:
        base = list(current)
        # `super` inside a module file names the parent module.
        while segments and segments[0] == "super":
            segments = segments[1:]
            base = base[:-1]
        base = base[:-1]
    full = base + segments
    for length in range(len(full), -1, -1):
        candidate = tuple(full[:length])
        if candidate in modules:
            return candidate
    return None


uses = {}


def edges_of(modules):
    edges = {}
    for module, path in modules.items():
        if is_test_module(module, path):
            continue
        with open(path, encoding="utf-8") as handle:
            text = strip_tests(handle.read())
        # Comments (doc links included) are not imports.
        text = re.sub(r"//[^\n]*", "", text)
        targets = set()
        paths = []
        for match in GROUP_RE.finditer(text):
            prefix = [part for part in match.group(2).split("::") if part]
            for item in match.group(3).split(","):
                item = item.strip().split(" as ")[0].strip()
                if item and item != "self":
                    paths.append((match.group(1), prefix + [p for p in item.split("::") if p]))
                elif item == "self":
                    paths.append((match.group(1), prefix))
        for match in PATH_RE.finditer(text):
            paths.append((match.group(1), [part for part in match.group(2).split("::") if part]))
        for kind, segments in paths:
            target = resolve(modules, module, kind, segments)
            if target is None or target == module:
                continue
            # A module and its ancestors: how Rust modules are built, not a cycle.
            if module[: len(target)] == target or target[: len(module)] == module:
                continue
            targets.add(target)
        edges[module] = targets
        uses[module] = set(re.findall(r"\b(berth_[a-z]+)::", text))
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index = {}
    low = {}
    stack = []
    on_stack = set()
    found = []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def name(module):
    return "::".join(module) or "(root)"


def check_modules(meta, errors, show_graph):
    for package in meta["packages"]:
        crate = package["name"]
        src_dir = os.path.join(os.path.dirname(package["manifest_path"]), "src")
        if crate == "berth-tests" or not os.path.isdir(src_dir):
            continue
        modules = module_files(src_dir)
        edges = edges_of(modules)
        # Edges between top-level modules (after collapsing children into their top module),
        # the granularity of the stage rules.
        for component in cycles(edges):
            errors.append(
                f"crate {crate}: import cycle between modules: "
                + " -> ".join(name(member) for member in component)
            )
        for source, targets in sorted(edges.items()):
            for target in sorted(targets):
                for rule_crate, low, high in FORBIDDEN_MODULE_IMPORTS:
                    if (
                        rule_crate == crate
                        and source[:1] == (low,)
                        and target[:1] == (high,)
                    ):
                        errors.append(
                            f"crate {crate}: module {name(source)} imports {name(target)} "
                            f"({low} is a lower stage than {high})"
                        )
        for module, crates in sorted(uses.items()):
            if modules.get(module, "").startswith(src_dir):
                for rule_crate, prefix, used in FORBIDDEN_CRATE_USES:
                    if rule_crate == crate and module[:1] == (prefix,) and used in crates:
                        errors.append(f"crate {crate}: module {name(module)} uses {used}")
        uses.clear()
        if show_graph:
            for source, targets in sorted(edges.items()):
                if targets:
                    print(f"{crate}: {name(source)} -> {', '.join(name(t) for t in sorted(targets))}")


def main():
    show_graph = "--graph" in sys.argv[1:]
    meta = metadata()
    errors = []
    check_crates(meta, errors)
    check_modules(meta, errors, show_graph)
    if errors:
        for error in errors:
            print(f"check-layers: {error}", file=sys.stderr)
        return 1
    crates = sorted(package["name"] for package in meta["packages"])
    print(f"check-layers: {len(crates)} crates, layers and module imports OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
