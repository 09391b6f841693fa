"""The package's shape in numbers: modules, lines, import cycles, function-local imports,
config error types and the places that branch on the reference mode.

  python scripts/structure.py [package_dir]

Reads the source with `ast` only (nothing is imported). An import inside a function counts
as function-local unless it names an optional dependency (OPTIONAL). Exits 1 (after printing
every count) when the package breaks a rule of ARCHITECTURE.md: a module over MAX_LINES lines,
an import cycle, or a function-local import.
"""
import ast
import os
import re
import sys

# Optional: extras in pyproject.toml (nemo, hf, test) or GPU-only packages.
OPTIONAL = ("torch", "transformers", "jax_triton", "triton", "matplotlib", "yaml", "safetensors",
            "wandb", "mlflow")
MAX_LINES = 450
# How a branch on the reference mode reads: the mode strings, or LoRA's presence (which
# decided the reference tree's layout before the mode was resolved once).
MODE_BRANCH = re.compile(
    r"""(reference|mode)\s*(==|!=|in|not in)\s*[("']|lora\s+is\s+(not\s+)?None"""
    r"""|["'](copy|lora_base|precomputed|none)["']\s*(==|!=|in)""")


def module_name(root, path):
  rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports(tree, name, modules):
  """(module-level targets, function-local targets) among `modules`."""
  top, local = set(), []
  package = name.rsplit(".", 1)[0]

  def targets(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
      base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                      + ([base] if base else []))
    out = [base]
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return out

  def walk(node, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        names = targets(child)
        if in_function:
          if not any(n.split(".")[0] in OPTIONAL for n in names):
            local.append((child.lineno, names))
        else:
          top.update(n for n in names if n in modules)
      walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

  walk(tree, False)
  local_internal = [n for _, names in local for n in names if n in modules]
  return top, local, local_internal


def cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def main(root="dpojax"):
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                 if f.endswith(".py"))
  modules = {module_name(root, f): f for f in files}
  graph, full_graph, lines, local_count, errors, branches = {}, {}, {}, {}, [], []
  for name, path in modules.items():
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    lines[name] = len(src.splitlines())
    top, local, local_internal = imports(tree, name, modules)
    # A package's __init__ is imported with its submodules: count no self edges.
    graph[name] = {t for t in top if t != name and not name.startswith(t + ".")}
    full_graph[name] = graph[name] | {t for t in local_internal if t != name}
    local_count[name] = len(local)
    errors += [f"{name}.{n.name}" for n in ast.walk(tree)
               if isinstance(n, ast.ClassDef) and n.name.endswith("ConfigError")]
    branches += [f"{path}:{i}" for i, line in enumerate(src.splitlines(), 1)
                 if MODE_BRANCH.search(line) and not line.lstrip().startswith("#")]
  big = {n: l for n, l in lines.items() if l > MAX_LINES}
  print(f"modules: {len(modules)}  lines: {sum(lines.values())}")
  print(f"modules over {MAX_LINES} lines: {len(big)} "
        + ", ".join(f"{n} ({l})" for n, l in sorted(big.items(), key=lambda x: -x[1])))
  found = cycles(full_graph)  # Module-level cycles are among these.
  print(f"import cycles (module-level): {cycles(graph) or 0}")
  print(f"import cycles (counting function-local imports): {found or 0}")
  print(f"function-local imports (not of {', '.join(OPTIONAL)}): {sum(local_count.values())} "
        + ", ".join(f"{n} {c}" for n, c in sorted(local_count.items(), key=lambda x: -x[1])
                    if c))
  print(f"config error types: {len(errors)} {', '.join(errors)}")
  print(f"lines that branch on the reference mode: {len(branches)}")
  importers_of_loop = sorted(n for n, t in full_graph.items() if "dpojax.train.loop" in t)
  print(f"modules importing dpojax.train.loop: {importers_of_loop}")
  broken = [what for what, bad in (("modules too long", big), ("import cycles", found),
                                   ("function-local imports", sum(local_count.values())))
            if bad]
  if broken:
    print(f"failed: {', '.join(broken)}")
  return 1 if broken else 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
