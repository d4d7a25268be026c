"""Sandbox for scoring model-written Python programs (the MBPP reward).

During GRPO the policy writes thousands of programs per step. Some loop forever, exhaust
memory, fork-bomb, delete files, read secrets, open sockets or try to kill the trainer; some
return objects whose ``__eq__`` always says True. This module contains all of that on Linux
without Docker and scores programs in a few milliseconds each.

Design
------
* ``Sandbox`` starts long-lived *worker* processes (``python -I -S code_sandbox.py --worker``)
  with an empty environment. A worker pre-imports the common stdlib modules, isolates itself
  once (network, mount and IPC namespaces, Landlock, no_new_privs, non-dumpable) and forks a
  *zygote* before it reads any job; every program runs in a fresh child of the zygote. The
  zygote never handles job data (it forks the next child ahead of time and hands the worker
  the write end of the pipe the child reads its job from), so no earlier job, reply or
  expected value is in a child's memory. As root, the worker becomes root of a user namespace
  that maps just two host uids of its own, one for itself and one for its children;
  unprivileged, it and its children share one uid. Each child starts a new session, switches
  to the children's uid (losing every capability), points stdio at /dev/null, closes every
  other fd, sets rlimits and installs a seccomp filter before it even reads its job. The
  filter refuses process creation, exec, ptrace, signals, sockets, file locks, memfds,
  mounts, namespaces and SysV/POSIX IPC.
* Every program gets a fresh, empty scratch directory in a base directory the child cannot
  change (as root: owned by the worker's uid, mode 0711). Afterwards the worker removes it
  whatever modes the child set; a worker that cannot restore an empty base retires and is
  replaced.
* The worker kills the child's process group at the deadline; the parent replaces a worker that
  stops answering, and retries once, on a fresh worker, a program whose worker died under it.
* Results travel as bounded JSON over pipes, never pickle. The parent's dispatch loop only
  moves and frames bytes; reports are decoded and scored after every job of the batch is done,
  so no report can make another program miss its deadline. A report is capped at
  ``_MAX_REPORT`` bytes and ``_MAX_ELEMENTS`` decoded values, and set elements and dict keys
  that share a hash more than ``_MAX_SAME_HASH`` times (n**2 work to insert) are refused.
* The child never judges itself (see "Trust" below).

Trust
-----
Model code runs first inside the child, so everything in that process (the encoder, the
report pipe, builtins, the test's globals) is under its control: it can write anything to the
report pipe. The protocol is built so that this buys nothing beyond hard-coding answers:

* Each test is split with ``ast`` (``_Planner``): only the solution's own calls (calls of
  names that neither the setup, the builtins nor the stdlib provide, or of values a test
  statement bound to them) run in the child, after the solution ran; each is replaced by a slot
  ``__probe__[k]`` in the rest of the test. A forged record is therefore just a claim "CALL
  returned X", which the model could equally produce by returning X; it cannot say "passed".
* Values are encoded only if their type is exactly int/float/complex/str/bytes/bool/None/
  list/tuple/dict/set/frozenset/Fraction/Decimal (recursively); an int subclass or an
  always-equal object cannot be encoded, so the test fails.
* The rest of each test is judged on the decoded plain values, whose ``__eq__`` the model does
  not control: ``CALL op VALUE`` (and ``assert CALL``) in the parent, with VALUE a literal or a
  solution-free expression a *clean* child computed (cached); anything else (``abs(f(x) - y)``,
  ``math.isclose``, ``all(...)``, nested comparisons, ``len``) by a *judge*: a clean child that
  runs the stdlib imports and setup code, then the test's statements with ``__probe__`` bound
  to the decoded values. ``==`` is Python's ``==`` (floats too).
* Shapes that cannot be split (compound statements, ``:=``, a solution call on a
  comprehension or lambda variable, assignment into a solution object) fail closed: the test
  scores 0 and is counted in ``UNSPLITTABLE``. A builtin or stdlib name the solution defines
  counts as the solution's only in a test that calls nothing else of it ("write max()").
* Duplicate, malformed or unknown records void the whole program (status "error").
* ``Result.detail`` is built by the parent from fixed strings and a whitelist of builtin
  exception names, so nothing the child writes (say, a secret it found) reaches logs.
"""

from __future__ import annotations

import _thread
import ast
import builtins
import json
import math
import os
import select
import signal
import struct
import sys
import time
import weakref
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Program", "Result", "Sandbox", "SandboxUnavailable"]


@dataclass(frozen=True)
class Program:
    code: str
    tests: list[str]
    setup: str = ""


@dataclass(frozen=True)
class Result:
    passed: int
    total: int
    status: str  # "passed" | "failed" | "timeout" | "error"
    detail: str = ""


class SandboxUnavailable(RuntimeError):
    """Isolation on this machine is below the minimum and ``unsafe`` was not requested."""


# Limits on what crosses process boundaries; generous for MBPP, small enough for the trainer.
_MAX_CODE = 256 * 1024
# MBPP's largest expected values, all tests of one task together, encode to under 1 KB and
# 250 elements: 64 KiB and 10,000 elements leave room, and any report decodes in milliseconds.
_MAX_REPORT = 64 * 1024
_MAX_ELEMENTS = 10_000  # decoded values (containers and scalars) in one report
_MAX_REPLY = 1024 * 1024
_MAX_DEPTH = 100
_MAX_SAME_HASH = 8  # set elements / dict keys from the child that may share one hash
_DETAIL_LEN = 200
_SCRATCH_MB, _SCRATCH_INODES = 64, 2048  # the private /tmp (scratch dirs live there)
_SHM_MB, _SHM_INODES = 16, 256
_WORKER_GRACE = 3.0  # seconds a worker gets beyond the program timeout before it is replaced
_REQUIRED = ("rlimits", "clean-env", "deadline")
_NETWORK = ("netns", "seccomp", "landlock-net")
_LAYER_ORDER = (
    "rlimits",
    "clean-env",
    "deadline",
    "seccomp",
    "landlock",
    "landlock-net",
    "netns",
    "mntns",
    "ipcns",
    "uid",
)
_DICT_TYPES = (Counter, OrderedDict, defaultdict)
_EXC_NAMES = frozenset(
    n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
)

# --------------------------------------------------------------------------------------------
# Value encoding. JSON scalars (null/bool/number/string) stand for themselves; every JSON
# array is tagged with its Python type in the first slot.
# --------------------------------------------------------------------------------------------


class _Unencodable(Exception):
    pass


def _encode(v: object, depth: int = 0) -> object:
    # Containers are always read through the base type's own methods, so a subclass cannot
    # lie about its contents; it can only be encoded as what it really holds.
    if depth > _MAX_DEPTH:
        raise _Unencodable
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -(2**63) <= v < 2**63 else ["I", hex(v)]
    if t is float:
        return v
    if t is list or t is set or t is frozenset:
        tag = "l" if t is list else "s" if t is set else "S"
        return [tag, *[_encode(x, depth + 1) for x in t.__iter__(v)]]
    if t is tuple or (issubclass(t, tuple) and hasattr(t, "_fields")):  # namedtuple == tuple
        return ["t", *[_encode(x, depth + 1) for x in tuple.__iter__(v)]]  # type: ignore[arg-type]
    if t is dict or t in _DICT_TYPES:  # Counter/OrderedDict/defaultdict compare as dicts
        out: list[object] = ["d"]
        for k, x in dict.items(v):  # type: ignore[arg-type]
            out.append(_encode(k, depth + 1))
            out.append(_encode(x, depth + 1))
        return out
    if t is deque:
        return ["q", *[_encode(x, depth + 1) for x in deque.__iter__(v)]]  # type: ignore[arg-type]
    if t is complex:
        return ["c", v.real, v.imag]  # type: ignore[attr-defined]
    if t is bytes:
        return ["y", bytes.hex(v)]  # type: ignore[arg-type]
    if t is range:
        return ["R", _encode(v.start), _encode(v.stop), _encode(v.step)]  # type: ignore[attr-defined]
    if t is _Iter or (t.__module__ in ("builtins", "itertools") and hasattr(t, "__next__")):
        # A generator, map, zip...: only a wrapper in the test (list(), sorted()) reads it, and
        # that wrapper no longer runs here. Its items travel; it stays equal only to itself.
        items = []
        for x in v.items if t is _Iter else v:  # type: ignore[attr-defined]
            if len(items) >= _MAX_ELEMENTS:
                raise _Unencodable
            items.append(_encode(x, depth + 1))
        return ["i", *items]
    # Exact numbers some tasks return; a test's expected value of these types would otherwise
    # be unencodable, and its test could not be judged outside the child.
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and t is fractions.Fraction:
        return ["F", _encode(v.numerator), _encode(v.denominator)]  # type: ignore[attr-defined]
    if decimal is not None and t is decimal.Decimal:
        return ["D", str(v)]
    raise _Unencodable


class _Iter:
    """A decoded iterator (generator, map, zip...): iterable, and like the original equal only
    to itself, so `list(f(x)) == [...]` holds where `f(x) == [...]` does not."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):  # noqa: ANN204
        return iter(self.items)


def _decode(v: object, depth: int = 0, budget: list[int] | None = None) -> object:
    if depth > _MAX_DEPTH:
        raise ValueError("too deep")
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("too many elements")
    t = type(v)
    if v is None or t in (bool, str, int, float):
        return v
    if t is not list or not v or type(v[0]) is not str:
        raise ValueError("bad value")
    tag, rest = v[0], v[1:]
    if tag == "I":
        return int(rest[0], 16)
    if tag == "c":
        return complex(float(rest[0]), float(rest[1]))
    if tag == "y":
        return bytes.fromhex(rest[0])
    if tag == "R":
        start, stop, step = (_decode(x, depth + 1, budget) for x in rest[:3])
        return range(start, stop, step)  # type: ignore[arg-type]  # TypeError unless ints
    if tag == "F":
        num, den = (_decode(x, depth + 1, budget) for x in rest[:2])
        if type(num) is not int or type(den) is not int or max(abs(num), den) >> 4096:
            raise ValueError("bad fraction")  # big ones would make gcd() slow
        from fractions import Fraction

        return Fraction(num, den)
    if tag == "D":
        if type(rest[0]) is not str or len(rest[0]) > 256:
            raise ValueError("bad decimal")
        from decimal import Decimal

        return Decimal(rest[0])
    items = [_decode(x, depth + 1, budget) for x in rest]
    if tag == "l":
        return items
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(_unclustered(items))
    if tag == "S":
        return frozenset(_unclustered(items))
    if tag == "q":
        return deque(items)
    if tag == "i":
        return _Iter(items)
    if tag == "d" and len(items) % 2 == 0:
        return dict(zip(_unclustered(items[::2]), items[1::2], strict=True))
    raise ValueError("bad tag")


def _unclustered(keys: list[object]) -> list[object]:
    """Refuse would-be set elements or dict keys that share a hash more than a few times.

    The child chooses them: n ints that are multiples of 2**61 - 1 all hash alike, and putting
    them in a set costs n**2 / 2 comparisons (a 1 MB report took 15 s). Honest values almost
    never share a full hash; with this cap every insertion compares at most a few keys, so
    decoding stays linear in the report's size. The counts live in a dict keyed by the hash
    values themselves, which are small ints that hash to themselves: no collisions there.
    """
    counts: dict[int, int] = {}
    for k in keys:
        h = hash(k)  # TypeError for an unhashable forged element: the value is refused
        n = counts.get(h, 0) + 1
        if n > _MAX_SAME_HASH:
            raise ValueError("colliding hashes")
        counts[h] = n
    return keys


# --------------------------------------------------------------------------------------------
# Test planning (parent side): split each test into values the solution computes (probes the
# child evaluates after the solution ran), values that do not depend on the solution (computed
# in the parent, or in a clean child that never ran model code) and a check that the parent
# applies to the decoded values.
# --------------------------------------------------------------------------------------------


class _NotConst(Exception):
    pass


_FAIL = object()  # a probe that raised, was not encodable, or never reported
_OK = object()  # an exec probe that completed
_PENDING = object()  # a clean value that has not been computed yet
_SAFE_CALLS = {
    "set": set,
    "frozenset": frozenset,
    "list": list,
    "tuple": tuple,
    "dict": dict,
    "sorted": sorted,
    "float": float,
    "int": int,
    "str": str,
    "complex": complex,
    "bool": bool,
    "abs": abs,
    "range": range,
}
_SAFE_CONSTS = {"math.pi": math.pi, "math.e": math.e, "math.inf": math.inf, "math.tau": math.tau}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}
_BUILTIN_NAMES = frozenset(vars(builtins))
_STDLIB = frozenset(sys.stdlib_module_names)


def _const(node: ast.AST) -> object:
    """Evaluate a dataset-side expression in the parent if it is made of literals only."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_const(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotConst
        return {_const(k): _const(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        x = _const(node.operand)
        if isinstance(node.op, ast.Not):
            return not x
        if type(x) not in (int, float, complex):
            raise _NotConst
        return -x if isinstance(node.op, ast.USub) else +x
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _const(node.left), _const(node.right)
        # Keep parent-side work tiny: no huge powers or repetitions from odd datasets.
        if isinstance(node.op, ast.Pow) and (type(b) is not int or abs(b) > 256):
            if not (type(b) is float and abs(b) < 64):
                raise _NotConst
        if isinstance(node.op, ast.Mult) and any(isinstance(x, (str, list, tuple)) for x in (a, b)):
            if max(x for x in (a, b) if type(x) is int) * 64 > 10**6:
                raise _NotConst
        try:
            return _BINOPS[type(node.op)](a, b)
        except Exception as e:
            raise _NotConst from e
    if isinstance(node, ast.Attribute) and ast.unparse(node) in _SAFE_CONSTS:
        return _SAFE_CONSTS[ast.unparse(node)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _SAFE_CALLS
        and not node.keywords
        and not any(isinstance(a, ast.Starred) for a in node.args)
    ):
        args = [_const(a) for a in node.args]
        if node.func.id == "range" and len(range(*args)) > 10**5:
            raise _NotConst
        try:
            return _SAFE_CALLS[node.func.id](*args)
        except Exception as e:
            raise _NotConst from e
    raise _NotConst


def _eq(got: object, exp: object) -> bool:
    """``==`` on decoded plain values, exactly as the test's own assert would do it (so
    ``1 == True``, ``3.0 == 3`` and ``0.1 + 0.2 != 0.3``); a tolerance applies only where the
    test states one (``math.isclose``, ``round``, ``abs(a - b) < eps``)."""
    try:
        return bool(got == exp)
    except Exception:
        return False


def _free_names(node: ast.AST) -> set[str] | None:
    """Global names an expression reads (comprehension and lambda variables are its own);
    None when it binds names in the test's namespace (``:=``)."""
    loads: set[str] = set()
    local: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.NamedExpr):
            return None
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else local).add(n.id)
        elif isinstance(n, ast.arg):
            local.add(n.arg)
    return loads - local


def _bound_names(tree: ast.AST, keep_stdlib_imports: bool = False) -> set[str]:
    """Names a piece of code binds anywhere in it (an over-approximation)."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                name = (a.asname or a.name).split(".")[0]
                plain = isinstance(n, ast.Import) and a.asname is None and name in _STDLIB
                if not (keep_stdlib_imports and plain):
                    out.add(name)
    return out


_SETUP_NAMES: dict[str, frozenset[str]] = {}


def _setup_names(setup: str) -> frozenset[str]:
    hit = _SETUP_NAMES.get(setup)
    if hit is None:
        try:
            hit = frozenset(_bound_names(ast.parse(setup)))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            hit = frozenset()
        if len(_SETUP_NAMES) > 4096:
            _SETUP_NAMES.clear()
        _SETUP_NAMES[setup] = hit
    return hit


_Check = Callable[[list[object]], "bool | None"]
_Clean = Callable[[str, tuple[str, ...]], object]
_PROBE = "__probe__"  # the name under which child and judge see the solution's values
# Shapes a test may not have; each is failed (never trusted to the child) and counted here.
UNSPLITTABLE: Counter[str] = Counter()


class _Unsplittable(Exception):
    pass


@dataclass(frozen=True)
class _TestPlan:
    """One test, split. The child runs `steps`: ("n", "") starts the test, ("v", CALL) is a
    solution call whose value it reports (and keeps as __probe__[k] for later steps), ("x",
    STMT) a statement of the test with the solution's calls replaced by __probe__[k] (so that
    later calls see the names it binds). The verdict comes from `fast` (the parent, on the
    decoded values) or else from a judge: a clean child that runs the setup, then `judge`
    (("x", STMT) statements and ("a", EXPR) asserts, solution calls replaced) with __probe__
    bound to the decoded plain values. `why` names a shape that cannot be split: failed."""

    steps: tuple[tuple[str, str], ...] = ()
    fast: _Check | None = None
    judge: tuple[tuple[str, str], ...] = ()
    mods: tuple[str, ...] = ()
    why: str = ""

    @property
    def calls(self) -> int:
        return sum(k == "v" for k, _ in self.steps)


class _Planner:
    """Splits one test: every call of a solution name (a name the setup, the builtins and the
    stdlib do not provide, or a name a test statement bound to a solution value) is evaluated
    in the child, after the solution ran; the rest of the expression, wrappers included
    (abs, subtraction, math.isclose, all(...), nested comparisons), never runs there."""

    def __init__(
        self, setup_names: frozenset[str], clean: _Clean, shadow: frozenset[str] = frozenset()
    ) -> None:
        self.setup_names = setup_names - shadow
        self.clean = clean
        self.shadow = shadow  # builtin/stdlib names the solution itself defines ("write max()")
        self.steps: list[tuple[str, str]] = [("n", "")]
        self.judge: list[tuple[str, str]] = []
        self.ncalls = 0
        self.tainted: set[str] = set()  # names a test statement bound to a solution value
        self.plain: set[str] = set()  # names a test statement bound to anything else
        self.checks: list[_Check | None] = []

    def is_solution(self, name: str) -> bool:
        if name in self.tainted:
            return True
        if name in self.plain or name == _PROBE:
            return False
        if name in self.shadow:
            return True
        return name not in _BUILTIN_NAMES and name not in self.setup_names | _STDLIB

    def refs_solution(self, node: ast.AST, local: frozenset[str]) -> bool:
        free = _free_names(node)
        if free is None:
            raise _Unsplittable("assignment expression")
        return any(self.is_solution(n) for n in free - local)

    def call(self, node: ast.expr, local: frozenset[str]) -> ast.expr:
        free = _free_names(node)
        if free is None:
            raise _Unsplittable("assignment expression")
        if free & local:
            raise _Unsplittable("solution call on a comprehension or lambda variable")
        self.steps.append(("v", ast.unparse(node)))
        self.ncalls += 1
        ref = ast.Subscript(ast.Name(_PROBE, ast.Load()), ast.Constant(self.ncalls - 1), ast.Load())
        return ast.copy_location(ref, node)

    def rewrite(self, node: ast.AST, local: frozenset[str] = frozenset()) -> ast.AST:
        """`node` with each solution call (or solution name) replaced by its __probe__ slot."""
        if isinstance(node, ast.expr) and not self.refs_solution(node, local):
            return node
        if isinstance(node, ast.Name):
            return self.call(node, local)
        if isinstance(node, ast.Call) and self.refs_solution(node.func, local):
            return self.call(node, local)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return self.call(node, local)  # obj.attr of a solution object
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            local = local | {
                n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)
            }
        elif isinstance(node, ast.Lambda):
            local = local | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.AST):
                setattr(node, field, self.rewrite(value, local))
            elif isinstance(value, list):
                value[:] = [self.rewrite(v, local) if isinstance(v, ast.AST) else v for v in value]
        return node

    def known(self, node: ast.expr) -> object:
        """The value of a test operand that involves no solution value, else _FAIL."""
        try:
            return _const(node)
        except (_NotConst, ArithmeticError, RecursionError, ValueError, TypeError, MemoryError):
            pass
        free = _free_names(node)
        if free is None or free & (self.plain | self.tainted | {_PROBE}):
            return _FAIL
        if not free <= _BUILTIN_NAMES | self.setup_names | _STDLIB:
            return _FAIL
        mods = tuple(sorted(free & _STDLIB - self.setup_names - _BUILTIN_NAMES))
        return self.clean(ast.unparse(node), mods)

    def fast(self, node: ast.expr) -> _Check | None:
        """A parent-side verdict for `CALL op KNOWN ...` and `assert CALL`, else None."""

        def slot(n: ast.expr) -> int | None:
            if (
                isinstance(n, ast.Subscript)
                and isinstance(n.value, ast.Name)
                and n.value.id == _PROBE
                and isinstance(n.slice, ast.Constant)
            ):
                return n.slice.value
            return None

        if slot(node) is not None:
            k = slot(node)
            return lambda vals: None if vals[k] is _FAIL else bool(vals[k])
        if not isinstance(node, ast.Compare):
            return None
        operands: list[tuple[bool, object]] = []
        for n in [node.left, *node.comparators]:
            k = slot(n)
            if k is not None:
                operands.append((True, k))
                continue
            if any(slot(m) is not None for m in ast.walk(n)):
                return None
            value = self.known(n)
            if value is _FAIL or value is _PENDING:
                return None
            operands.append((False, value))
        return _compare_check(list(node.ops), operands)

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Pass):
            return
        if isinstance(stmt, ast.Assert):
            test = self.rewrite(stmt.test)
            self.checks.append(self.fast(test))
            self.judge.append(("a", ast.unparse(test)))
            return
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self.steps.append(("x", ast.unparse(stmt)))
            self.judge.append(("x", ast.unparse(stmt)))
            self.plain |= _bound_names(stmt)
            return
        if not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)):
            raise _Unsplittable("compound statement")
        before = self.ncalls
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if any(t is not None and self.refs_solution(t, frozenset()) for t in targets):
            if isinstance(stmt, ast.Assign) or not all(isinstance(t, ast.Name) for t in targets):
                raise _Unsplittable("assignment into a solution object")
        if stmt.value is not None:
            stmt.value = self.rewrite(stmt.value)
        src = ast.unparse(stmt)
        self.steps.append(("x", src))
        self.judge.append(("x", src))
        bound = _bound_names(stmt)
        if self.ncalls > before or bound & self.tainted:
            self.tainted |= bound  # a solution value: later calls on it run in the child
            self.plain -= bound
        else:
            self.plain |= bound
            self.tainted -= bound

    def plan(self, test: str) -> _TestPlan:
        body = ast.parse(test).body
        for stmt in body:
            self.statement(stmt)
        if not self.checks:
            raise _Unsplittable("no assert")
        mods: set[str] = set()
        for _, src in self.judge:
            free = _free_names(ast.parse(src)) or set()
            mods |= free & _STDLIB - _BUILTIN_NAMES - self.setup_names - self.plain
        fast = None
        if all(c is not None for c in self.checks):
            checks = list(self.checks)

            def fast(vals: list[object]) -> bool | None:
                rs = [c(vals) for c in checks]  # type: ignore[misc]
                return None if any(r is None for r in rs) else all(rs)

        return _TestPlan(tuple(self.steps), fast, tuple(self.judge), tuple(sorted(mods)))


def _compare_check(ops: list[ast.cmpop], operands: list[tuple[bool, object]]) -> _Check:
    def check(vals: list[object]) -> bool | None:
        xs = [vals[x] if child else x for child, x in operands]  # type: ignore[index]
        if any(x is _FAIL for x in xs):
            return None
        for op, a, b in zip(ops, xs, xs[1:], strict=False):
            try:
                if isinstance(op, ast.Eq):
                    ok = _eq(a, b)
                elif isinstance(op, ast.NotEq):
                    ok = not _eq(a, b)
                elif isinstance(op, ast.Is):
                    ok = a is b
                elif isinstance(op, ast.IsNot):
                    ok = a is not b
                elif isinstance(op, ast.In):
                    ok = a in b  # type: ignore[operator]
                elif isinstance(op, ast.NotIn):
                    ok = a not in b  # type: ignore[operator]
                elif isinstance(op, ast.Lt):
                    ok = a < b  # type: ignore[operator]
                elif isinstance(op, ast.LtE):
                    ok = a <= b  # type: ignore[operator]
                elif isinstance(op, ast.Gt):
                    ok = a > b  # type: ignore[operator]
                else:
                    ok = a >= b  # type: ignore[operator]
            except Exception:
                return None
            if not ok:
                return False
        return True

    return check


def _plan_test(test: str, setup: str, clean: _Clean, shadow: frozenset[str]) -> _TestPlan:
    try:
        plan = _Planner(_setup_names(setup), clean, shadow).plan(test)
    except _Unsplittable as e:
        return _TestPlan(why=str(e))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return _TestPlan(why="unparsable test")
    return plan


_PLAN_CACHE: dict[tuple[str, str, frozenset[str]], _TestPlan] = {}
_CLEAN_CACHE: dict[tuple[str, str], object] = {}  # (setup, expression) -> value or _FAIL
_SHADOW_CACHE: dict[str, frozenset[str]] = {}
_PLAN_LOCK = _thread.allocate_lock()  # not threading: keeps at-fork hooks out of workers


def _shadow(test: str, setup: str, code: str) -> frozenset[str]:
    """Builtin or stdlib names the test calls and the solution defines. They count as the
    solution's only when the test calls nothing else of the solution (a task "write max()");
    otherwise `len(f(x))` is judged with the real len whatever the solution bound to it."""
    try:
        names = {n.id for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Name)}
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    candidates = names & (_BUILTIN_NAMES | _STDLIB) - _setup_names(setup)
    if not candidates:
        return frozenset()
    with _PLAN_LOCK:
        bound = _SHADOW_CACHE.get(code)
    if bound is None:
        try:
            bound = frozenset(_bound_names(ast.parse(code), keep_stdlib_imports=True))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            bound = frozenset()
        with _PLAN_LOCK:
            if len(_SHADOW_CACHE) > 4096:
                _SHADOW_CACHE.clear()
            _SHADOW_CACHE[code] = bound
    return frozenset(candidates & bound)


def _planned(test: str, setup: str, code: str, clean: _Clean) -> tuple[_TestPlan, bool]:
    plan = _plan_test(test, setup, clean, frozenset())
    if not plan.why and plan.calls == 0:
        shadow = _shadow(test, setup, code)
        if shadow:
            return _plan_test(test, setup, clean, shadow), True
    return plan, False


def _clean_requests(test: str, setup: str, code: str) -> list[tuple[str, tuple[str, ...]]]:
    """Non-solution operands of a test whose value is not known yet."""
    out: list[tuple[str, tuple[str, ...]]] = []

    def clean(src: str, mods: tuple[str, ...]) -> object:
        v = _CLEAN_CACHE.get((setup, src), _PENDING)
        if v is _PENDING:
            out.append((src, mods))
        return v

    with _PLAN_LOCK:
        if (test, setup, frozenset()) in _PLAN_CACHE:
            return []
    _planned(test, setup, code, clean)
    return out


def _plan(test: str, setup: str, code: str) -> _TestPlan:
    """The plan for one test. Clean values missing from the cache (their clean run failed to
    report) leave the verdict to the judge, uncached."""
    with _PLAN_LOCK:
        hit = _PLAN_CACHE.get((test, setup, frozenset()))
    if hit is not None and (hit.why or hit.calls):
        return hit
    missing = False

    def clean(src: str, mods: tuple[str, ...]) -> object:
        nonlocal missing
        v = _CLEAN_CACHE.get((setup, src), _PENDING)
        if v is _PENDING:
            missing = True
            return _FAIL
        return v

    plan, shadowed = _planned(test, setup, code, clean)
    if not missing and not shadowed:
        with _PLAN_LOCK:
            if len(_PLAN_CACHE) > 65536:
                _PLAN_CACHE.clear()
            _PLAN_CACHE[(test, setup, frozenset())] = plan
    return plan


def _clean_job(setup: str, wanted: dict[str, tuple[str, ...]], timeout: float) -> dict:
    """A job with no model code in it: the stdlib imports the expressions need, the dataset's
    setup code, then the expressions."""
    mods = sorted({m for ms in wanted.values() for m in ms})
    code = "".join(f"import {m}\n" for m in mods)
    probes = [["n", ""]] + [["v", s] for s in wanted]
    return {"code": code, "setup": setup, "probes": probes, "timeout": timeout}


def _store_clean(setup: str, srcs: list[str], reply: dict) -> None:
    try:
        vals, seen, phase_err, _ = _parse_report(reply.get("out", ""), len(srcs) + 1)
        vals = vals[1:]
    except (ValueError, TypeError, RecursionError):
        vals, phase_err = [_FAIL] * len(srcs), ("code", "")
    if phase_err is not None or "setup" not in seen:
        vals = [_FAIL] * len(srcs)
    with _PLAN_LOCK:
        if len(_CLEAN_CACHE) > 65536:
            _CLEAN_CACHE.clear()
        for src, v in zip(srcs, vals, strict=True):
            _CLEAN_CACHE[(setup, src)] = v


def _judge_job(setup: str, plans: list[_TestPlan], values: list[list], timeout: float) -> dict:
    """A clean child that never ran model code judges the tests whose verdict the parent cannot
    read off the values: `values[t]` holds test t's decoded solution values ([1, v] or [0])."""
    mods = sorted({m for p in plans for m in p.mods})
    probes: list[list[str]] = []
    for t, p in enumerate(plans):
        probes.append(["n", str(t)])
        probes += [list(s) for s in p.judge]
    code = "".join(f"import {m}\n" for m in mods)
    return {"code": code, "setup": setup, "probes": probes, "values": values, "timeout": timeout}


# --------------------------------------------------------------------------------------------
# Scoring a child's report (parent side).
# --------------------------------------------------------------------------------------------


def _exc_name(x: object) -> str:
    return x if isinstance(x, str) and x in _EXC_NAMES else "Exception"


def _parse_report(text: object, nprobes: int) -> tuple[list, set, tuple | None, bool]:
    """Probe values, phases seen, the first failed phase and whether the report ended.
    Raises ValueError (or TypeError) on anything an honest child never writes."""
    vals: list[object] = [_FAIL] * nprobes
    seen: set[object] = set()
    phase_err: tuple[str, str] | None = None
    ended = False
    budget = [_MAX_ELEMENTS]
    if not isinstance(text, str) or len(text) > _MAX_REPORT:
        raise ValueError
    for line in text.split("\n"):
        if not line:
            continue
        rec = json.loads(line)
        if type(rec) is not list or not rec:
            raise ValueError
        key = rec[0]
        if type(key) is not int and key not in ("code", "setup", "end"):
            raise ValueError
        if key in seen or ended:
            raise ValueError  # duplicates or records after the end: forged
        seen.add(key)
        if key == "end":
            ended = True
        elif key in ("code", "setup"):
            if rec[1:2] != ["ok"]:
                phase_err = (key, _exc_name(rec[2] if len(rec) > 2 else None))
        else:
            if not 0 <= key < nprobes or len(rec) < 2:
                raise ValueError
            if rec[1] == "v" and len(rec) == 3:
                try:
                    vals[key] = _decode(rec[2], 0, budget)
                except (ValueError, TypeError, IndexError, RecursionError):
                    if budget[0] < 0:
                        raise ValueError("too many elements") from None
                    vals[key] = _FAIL
            elif rec[1] == "ok" and len(rec) == 2:
                vals[key] = _OK
            elif rec[1] != "e":
                raise ValueError
    return vals, seen, phase_err, ended


def _verdicts(plans: list[_TestPlan], spans: list[list[int]], vals: list, ran: bool) -> list:
    """True/False per test where the parent can tell, None where a judge must."""
    out: list[bool | None] = []
    for plan, span in zip(plans, spans, strict=True):
        if plan.why:
            _unsplittable(plan.why)
            out.append(False)
        elif not ran:
            out.append(False)
        elif plan.fast is None:
            out.append(None)
        else:
            try:
                out.append(plan.fast([vals[x] for x in span]) is True)
            except Exception:
                out.append(False)
    return out


_LOGGED: set[str] = set()


def _unsplittable(why: str) -> None:
    UNSPLITTABLE[why] += 1
    if why not in _LOGGED:
        _LOGGED.add(why)
        import logging

        logging.getLogger(__name__).warning(
            "sandbox: a test shape cannot be judged outside the sandboxed program (%s); "
            "such tests are failed (counts in code_sandbox.UNSPLITTABLE)",
            why,
        )


def _judged(job: dict, reply: tuple) -> list[bool]:
    """Per judged test: did every assert hold in the judge? Anything else fails."""
    probes = job["probes"]
    if reply[0] != "reply":
        return [False] * sum(k == "n" for k, _ in probes)
    try:
        vals, seen, phase_err, ended = _parse_report(reply[1].get("out", ""), len(probes))
    except (ValueError, TypeError, RecursionError):
        vals, phase_err = [_FAIL] * len(probes), ("code", "")
    ok = phase_err is None and "setup" in seen
    out: list[bool] = []
    for (kind, _), v in zip(probes, vals, strict=True):
        if kind == "n":
            out.append(ok)
        elif kind == "a" and v is not True:
            out[-1] = False
    return out


def _score(
    verdicts: list, reply: dict, timeout: float, phase_err: tuple | None, ended: bool
) -> Result:
    total = len(verdicts)
    passed = sum(v is True for v in verdicts)
    first_fail = next((i for i, v in enumerate(verdicts) if v is not True), None)
    if reply.get("timed_out"):
        return Result(passed, total, "timeout", f"timed out after {timeout:g}s")
    if phase_err is not None:
        what = "solution" if phase_err[0] == "code" else "test setup"
        return Result(passed, total, "error", f"{what} raised {phase_err[1]}")
    if reply.get("overflow"):
        return Result(0, total, "error", "report too large")
    if not ended:
        sig = reply.get("signal")
        if isinstance(sig, int) and sig:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            why = {"SIGXCPU": "CPU limit", "SIGXFSZ": "file size limit"}.get(name, name)
            return Result(passed, total, "error", f"killed by {why}")
        code = reply.get("exit")
        if code == 70:
            return Result(0, total, "error", "sandbox setup failed in the child")
        return Result(passed, total, "error", f"exited before the tests finished ({code!s:.8})")
    if passed == total:
        return Result(passed, total, "passed", "")
    return Result(passed, total, "failed", f"test {first_fail} failed")


# --------------------------------------------------------------------------------------------
# Parent side: worker pool.
# --------------------------------------------------------------------------------------------


def _send(fd: int, obj: object) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    data = struct.pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Worker:
    def __init__(self, config: dict) -> None:
        import subprocess

        self.cleanup: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--worker", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd="/",
            close_fds=True,
            start_new_session=True,  # keep terminal signals (Ctrl-C) away from the workers
        )
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        self.buf = bytearray()
        self.job: int | None = None
        self.deadline = 0.0
        try:
            hello = self.read_message(time.monotonic() + 60.0)
        except Exception as e:
            err = b""
            self.kill()
            try:
                err = self.proc.stderr.read()[-2000:]
            except Exception:
                pass
            raise RuntimeError(
                f"sandbox worker failed to start: {e}: {err.decode(errors='replace')}"
            ) from e
        self.proc.stderr.close()
        self.layers: dict[str, bool] = hello["layers"]
        self.info: dict = hello
        self.cleanup = hello.get("cleanup")

    def read_message(self, deadline: float) -> dict:
        while True:
            msg = self.take()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer")
            if not select.select([self.rfd], [], [], left)[0]:
                continue
            self.feed()

    def poll_reply(self) -> dict | None:
        """The reply, if all of it has arrived; reads only what is there, never blocks."""
        while True:
            msg = self.take()
            if msg is not None:
                return msg
            if not select.select([self.rfd], [], [], 0)[0]:
                return None
            self.feed()  # EOFError once the worker is gone

    def feed(self) -> None:
        chunk = os.read(self.rfd, 1 << 20)
        if not chunk:
            raise EOFError("worker exited")
        self.buf += chunk
        if len(self.buf) > _MAX_REPLY + 4:
            raise ValueError("worker reply too large")

    def take(self) -> dict | None:
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack(">I", self.buf[:4])
        if n > _MAX_REPLY:
            raise ValueError("worker reply too large")
        if len(self.buf) < 4 + n:
            return None
        data = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        msg = json.loads(data)
        if type(msg) is not dict:
            raise ValueError("bad worker reply")
        return msg

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except Exception:
                pass
        if self.cleanup:
            import shutil

            shutil.rmtree(self.cleanup, ignore_errors=True)

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]  # EOF makes the worker exit
            self.proc.wait(timeout=2)
        except Exception:
            pass
        self.kill()


class Sandbox:
    """Runs batches of untrusted programs with the strongest isolation the machine allows."""

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 5.0,
        memory_mb: int = 1024,
        unsafe: bool = False,
        *,
        _seccomp_backend: str = "auto",
        _user_namespace: bool = True,
    ) -> None:
        if workers is None:
            try:
                workers = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                workers = os.cpu_count() or 1
        self.workers = max(1, int(workers))
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.unsafe = bool(unsafe)
        self._backend = _seccomp_backend
        self._userns = _user_namespace  # False: test the fallback where root has none
        self._lock = _thread.allocate_lock()
        self._serial = 0
        self._pool: list[_Worker] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, Sandbox._shutdown, self._pool)
        try:
            self._pool.append(self._spawn())
            self.layers: dict[str, bool] = dict(self._pool[0].layers)
            self._info = self._pool[0].info
            missing = [k for k in _REQUIRED if not self.layers.get(k)]
            if not any(self.layers.get(k) for k in _NETWORK):
                missing.append("no-network (netns, seccomp or landlock-net)")
            if missing and not self.unsafe:
                raise SandboxUnavailable(
                    f"code sandbox unavailable on this machine (missing: {', '.join(missing)}); "
                    "pass --unsafe-code-exec to run model code without these protections"
                )
            while len(self._pool) < self.workers:
                self._pool.append(self._spawn())
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> _Worker:
        self._serial += 1
        return _Worker(
            {
                "memory_mb": self.memory_mb,
                "serial": self._serial,
                "parent": os.getpid(),
                "seccomp": self._backend,
                "userns": self._userns,
            }
        )

    def describe(self) -> str:
        """One line naming the active isolation layers."""
        parts = []
        for k in _LAYER_ORDER:
            if not self.layers.get(k):
                continue
            if k == "seccomp":
                parts.append(f"seccomp({self._info.get('seccomp_backend')})")
            elif k == "landlock":
                parts.append(f"landlock(abi {self._info.get('landlock_abi')})")
            elif k == "uid":
                parts.append(f"uid {self._info.get('uid')}")
            else:
                parts.append(k)
        off = [k for k in _LAYER_ORDER if not self.layers.get(k)]
        line = f"sandbox: {', '.join(parts) or 'none'}"
        if off:
            line += f" (unavailable: {', '.join(off)})"
        line += f"; {self.workers} workers, timeout {self.timeout:g}s, memory {self.memory_mb} MiB"
        if self.unsafe:
            line += ", unsafe mode allowed"
        return line

    def run(self, programs: list[Program]) -> list[Result]:
        """Score a batch concurrently; results come back in input order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("Sandbox is closed")
            return self._run(list(programs))

    def _run(self, programs: list[Program]) -> list[Result]:
        results: list[Result | None] = [None] * len(programs)
        todo: list[tuple[int, Program, list[str]]] = []
        for i, prog in enumerate(programs):
            tests = [str(t) for t in prog.tests]
            if not tests:
                results[i] = Result(0, 0, "error", "no tests")
            elif len(prog.code) + len(prog.setup) + sum(map(len, tests)) > _MAX_CODE:
                results[i] = Result(0, len(tests), "error", "program too long")
            else:
                todo.append((i, prog, tests))
        # First the values no solution computes, in clean children (cached across batches).
        wanted: dict[str, dict[str, tuple[str, ...]]] = {}
        for _, prog, tests in todo:
            for t in tests:
                for src, mods in _clean_requests(t, prog.setup, prog.code):
                    wanted.setdefault(prog.setup, {})[src] = mods
        if wanted:
            setups = list(wanted)
            jobs = [_clean_job(s, wanted[s], self.timeout) for s in setups]
            for setup, got in zip(setups, self._dispatch(jobs), strict=True):
                if got[0] == "reply":
                    _store_clean(setup, list(wanted[setup]), got[1])
        # Then the programs; the parent scores them only after every deadline was handled.
        jobs, specs = [], []
        for i, prog, tests in todo:
            plans = [_plan(t, prog.setup, prog.code) for t in tests]
            probes: list[list[str]] = []
            spans: list[list[int]] = []
            for plan in plans:
                start = len(probes)
                probes += [list(step) for step in plan.steps]
                spans.append([start + j for j, (k, _) in enumerate(plan.steps) if k == "v"])
            job = {"code": prog.code, "setup": prog.setup, "probes": probes}
            job["timeout"] = self.timeout
            jobs.append(job)
            specs.append((i, prog, plans, spans, len(probes)))
        scored = []
        judge_jobs, judge_for = [], []
        for (i, prog, plans, spans, nprobes), got in zip(specs, self._dispatch(jobs), strict=True):
            if got[0] == "timeout":
                results[i] = Result(0, len(plans), "timeout", f"timed out after {self.timeout:g}s")
                continue
            if got[0] != "reply":
                results[i] = Result(0, len(plans), "error", "sandbox worker died")
                continue
            reply = got[1]
            try:
                vals, seen, phase_err, ended = _parse_report(reply.get("out", ""), nprobes)
            except (ValueError, TypeError, RecursionError):
                why = "malformed report from the sandboxed program"
                results[i] = Result(0, len(plans), "error", why)
                continue
            # Tests count only once the solution and the setup ran (this also keeps constant
            # tests such as `assert True` from passing on their own).
            ran = "setup" in seen and phase_err is None
            verdicts = _verdicts(plans, spans, vals, ran)
            need = [t for t, v in enumerate(verdicts) if v is None]
            if need:
                values = []
                for t in need:
                    row = []
                    for x in spans[t]:
                        try:
                            row.append([0] if vals[x] is _FAIL else [1, _encode(vals[x])])
                        except (_Unencodable, RecursionError):
                            row.append([0])
                    values.append(row)
                judge = _judge_job(prog.setup, [plans[t] for t in need], values, self.timeout)
                judge_jobs.append(judge)
                judge_for.append((verdicts, need))
            scored.append((i, verdicts, reply, phase_err, ended))
        for job, (verdicts, need), got in zip(
            judge_jobs, judge_for, self._dispatch(judge_jobs) if judge_jobs else [], strict=True
        ):
            for t, ok in zip(need, _judged(job, got), strict=True):
                verdicts[t] = ok
        for i, verdicts, reply, phase_err, ended in scored:
            results[i] = _score(verdicts, reply, self.timeout, phase_err, ended)
        return [r if r is not None else Result(0, 0, "error", "not run") for r in results]

    def _dispatch(self, jobs: list[dict]) -> list[tuple]:
        """Run jobs on the pool: ("reply", msg), ("timeout",) or ("died",) per job.

        The loop only moves bytes and parses the workers' framed JSON (linear); nothing here
        looks inside a report, so no report can make another job miss its deadline. A job
        whose worker died under it is retried once on a fresh worker: the death may not be
        the job's fault, and a job that kills workers only gets two tries.
        """
        out: list[tuple | None] = [None] * len(jobs)
        tries = [0] * len(jobs)
        pending = deque(range(len(jobs)))
        idle = list(self._pool)
        busy: dict[int, _Worker] = {}

        def lost(w: _Worker, why: str) -> None:
            i = w.job
            w.job = None
            if i is not None:
                tries[i] += 1
                if why == "died" and tries[i] < 2:
                    pending.appendleft(i)
                else:
                    out[i] = (why,)
            fresh = self._replace(w)
            if fresh is not None:
                idle.append(fresh)
            if not self._pool:
                raise RuntimeError("no sandbox workers left")

        def collect(w: _Worker) -> bool:
            try:
                msg = w.poll_reply()
            except Exception:
                del busy[w.rfd]
                lost(w, "died")
                return True
            if msg is None:
                return False
            del busy[w.rfd]
            out[w.job] = ("reply", msg)  # type: ignore[index]
            w.job = None
            if msg.get("retire"):  # it could not restore its scratch space: start afresh
                fresh = self._replace(w)
                if fresh is not None:
                    idle.append(fresh)
            else:
                idle.append(w)
            return True

        while pending or busy:
            while pending and idle:
                i = pending.popleft()
                w = idle.pop()
                try:
                    if w.proc.poll() is not None:
                        raise OSError("worker exited")
                    _send(w.wfd, jobs[i])
                except OSError:
                    pending.appendleft(i)  # never reached a worker: costs no try
                    lost(w, "died")
                    continue
                w.job = i
                w.deadline = time.monotonic() + self.timeout + _WORKER_GRACE
                busy[w.rfd] = w
            if not busy:
                break
            wait = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            ready, _, _ = select.select(list(busy), [], [], wait)
            for fd in ready:
                w = busy.get(fd)  # type: ignore[assignment]
                if w is None:  # replaced earlier in this loop (its fd number may be reused)
                    continue
                before = len(w.buf)
                if not collect(w) and len(w.buf) > before:
                    w.deadline = max(w.deadline, time.monotonic() + _WORKER_GRACE)
            now = time.monotonic()
            for w in [w for w in busy.values() if now >= w.deadline]:
                # A reply may be waiting that this loop has not read yet: that is no timeout.
                if not collect(w):
                    del busy[w.rfd]
                    lost(w, "timeout")
        return out  # type: ignore[return-value]

    def _replace(self, w: _Worker) -> _Worker | None:
        """Kill a worker that died or stopped answering and start a new one."""
        w.kill()
        self._pool.remove(w)
        try:
            fresh = self._spawn()
        except RuntimeError:
            return None
        self._pool.append(fresh)
        return fresh

    def close(self) -> None:
        """Stop all workers and remove their scratch directories."""
        with self._lock:  # waits for a run() in another thread (bounded by its deadlines)
            self._closed = True
            self._finalizer()

    @staticmethod
    def _shutdown(pool: list[_Worker]) -> None:
        while pool:
            pool.pop().close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Worker side (runs in `python -I -S code_sandbox.py --worker CONFIG`). Linux-specific pieces
# go through ctypes and degrade to "layer unavailable" elsewhere.
# --------------------------------------------------------------------------------------------

_PREIMPORT = (
    # What MBPP-style solutions import most, so that children need not import it again.
    # Deliberately not threading/queue/random/multiprocessing: they register at-fork hooks
    # that would slow down every fork (a program that wants them imports them itself).
    "array bisect calendar cmath collections collections.abc copy datetime decimal fractions "
    "functools heapq itertools json math numbers operator re string struct textwrap typing "
    "unicodedata _strptime resource gc"
).split()

# x86_64 and aarch64 syscall numbers (None: the call does not exist on that arch).
# fmt: off
_SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "execve": (59, 221), "execveat": (322, 281), "ptrace": (101, 117), "kill": (62, 129),
    "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "socket": (41, 198), "setsid": (112, 157), "setpgid": (109, 154), "mount": (165, 40),
    "umount2": (166, 39), "unshare": (272, 97), "setns": (308, 268), "chroot": (161, 51),
    "pivot_root": (155, 41), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "move_mount": (429, 429), "open_tree": (428, 428),
    "mount_setattr": (442, 442), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225), "setuid": (105, 146),
    "setgid": (106, 144), "setreuid": (113, 145), "setregid": (114, 143), "setresuid": (117, 147),
    "setresgid": (119, 149), "setgroups": (116, 159), "setfsuid": (122, 151),
    "setfsgid": (123, 152), "capset": (126, 91), "sethostname": (170, 161),
    "setdomainname": (171, 162), "kcmp": (312, 272), "acct": (163, 89), "quotactl": (179, 60),
    "syslog": (103, 116), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "adjtimex": (159, 171), "clock_adjtime": (305, 266), "iopl": (172, None),
    "ioperm": (173, None), "fanotify_init": (300, 262), "vhangup": (153, 58),
    # SysV and POSIX IPC: objects outlive the process (and pin memory) and reach other programs.
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "mq_unlink": (241, 181), "mq_timedsend": (242, 182),
    "mq_timedreceive": (243, 183), "mq_notify": (244, 184), "mq_getsetattr": (245, 185),
    # Anonymous files are memory that RLIMIT_AS does not count (tmpfs files are capped by size).
    "memfd_create": (319, 279), "memfd_secret": (447, 447),
    # No program needs a socket: none of any family, so no pathname or abstract Unix socket is
    # reachable. File locks on files every program can read would signal between programs.
    "socketpair": (53, 199), "flock": (73, 32), "fcntl": (72, 25),
}
# fmt: on
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
# fcntl commands refused: F_GETLK, F_SETLK, F_SETLKW and their OFD forms (locks on files every
# program can open would signal between programs), F_SETPIPE_SZ (pipe buffers are memory that
# RLIMIT_AS does not count; at the default size 64 fds pin at most 4 MiB).
_FCNTL_REFUSED = (5, 6, 7, 36, 37, 38, 1031)
# clone3 answers ENOSYS so that glibc falls back to clone(), where the flags can be inspected;
# clone and fcntl get argument checks; everything else in the table is simply refused.
_SPECIAL = {"clone3": _ENOSYS, "clone": None, "fcntl": None}

_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def _libc():  # noqa: ANN202 - ctypes handle
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    import ctypes

    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _arch() -> str:
    return os.uname().machine


def _hand_bpf() -> bytes:
    """Classic BPF seccomp program, assembled by hand for x86_64/aarch64."""
    arch = _arch()
    if arch not in _AUDIT_ARCH:
        raise OSError("no syscall table for " + arch)
    col = 0 if arch == "x86_64" else 1
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog: list[tuple[int, int, int, int]] = [
        (ld, 0, 0, 4),  # A = seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH[arch]),
        (ret, 0, 0, _RET_KILL),  # foreign ABI (e.g. int 0x80 on x86_64): kill
        (ld, 0, 0, 0),  # A = seccomp_data.nr
    ]
    if arch == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, _RET_KILL)]  # x32 syscalls
    for name, nrs in _SYSCALLS.items():
        nr = nrs[col]
        if nr is None:
            continue
        if name == "clone":
            prog += [
                (jeq, 0, 4, nr),
                (ld, 0, 0, 16),  # low 32 bits of args[0] (flags)
                (jset, 1, 0, _CLONE_THREAD),  # a thread: allow
                (ret, 0, 0, _RET_ERRNO | _EPERM),
                (ret, 0, 0, _RET_ALLOW),
            ]
        elif name == "fcntl":
            n = len(_FCNTL_REFUSED)
            prog += [(jeq, 0, n + 3, nr), (ld, 0, 0, 24)]  # args[1]: the command
            prog += [(jeq, n - i, 0, cmd) for i, cmd in enumerate(_FCNTL_REFUSED)]
            prog += [(ret, 0, 0, _RET_ALLOW), (ret, 0, 0, _RET_ERRNO | _EPERM)]
        else:
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, _RET_ERRNO | _SPECIAL.get(name, _EPERM))]
    prog.append((ret, 0, 0, _RET_ALLOW))
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _libseccomp_bpf() -> bytes:
    """The same policy compiled by libseccomp (when installed), exported as raw BPF."""
    import ctypes

    lib = ctypes.CDLL("libseccomp.so.2")

    class ArgCmp(ctypes.Structure):
        _fields_ = [
            ("arg", ctypes.c_uint),
            ("op", ctypes.c_int),
            ("datum_a", ctypes.c_uint64),
            ("datum_b", ctypes.c_uint64),
        ]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_RET_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    eq, masked_eq = 4, 7
    try:
        col = 0 if _arch() == "x86_64" else 1
        for name, nrs in _SYSCALLS.items():
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                if nrs[col] is not None or _arch() not in _AUDIT_ARCH:
                    raise OSError(f"libseccomp does not know {name}")
                continue
            action = _RET_ERRNO | _EPERM
            rules: list[tuple[ArgCmp, ...]] = [()]
            if name == "clone":
                rules = [(ArgCmp(0, masked_eq, _CLONE_THREAD, 0),)]  # refuse unless a thread
            elif name == "fcntl":
                rules = [(ArgCmp(1, eq, cmd, 0),) for cmd in _FCNTL_REFUSED]
            elif name == "clone3":
                action = _RET_ERRNO | _ENOSYS
            for rule in rules:
                args = (ArgCmp * max(1, len(rule)))(*rule)
                ok = lib.seccomp_rule_add_array(ctx, action, nr, len(rule), args)
                _check(ok, "seccomp rule")
        fd = os.memfd_create("seccomp")
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _bpf_installer(bpf: bytes) -> Callable[[], None]:
    """Prepare the ctypes objects once in the worker; each child then pays one prctl()."""
    import ctypes

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = Prog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = _libc().prctl
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    ref = ctypes.byref(prog)

    def install() -> None:
        _check(prctl(pr_set_seccomp, seccomp_mode_filter, ref, 0, 0), "seccomp")
        keep = (buf, prog)  # noqa: F841 - the filter must stay alive until installed

    return install


# Landlock (syscalls 444-446 on every arch that has them).
_LL_CREATE, _LL_ADD, _LL_RESTRICT = 444, 445, 446
_LL_FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
_LL_FS_FILE = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)


def _landlock_abi() -> int:
    import ctypes

    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(ctypes.c_long(_LL_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, r)


def _landlock(abi: int, read: list[str], write: list[str], devices: list[str]) -> bool:
    """Read-only access to `read`, full access beneath `write`, no TCP bind/connect (ABI 4+),
    no signals or abstract-socket connections out of the domain (ABI 6+)."""
    import ctypes

    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= 1 << 13  # refer
    if abi >= 3:
        handled |= 1 << 14  # truncate
    if abi >= 5:
        handled |= 1 << 15  # ioctl_dev
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals
    attr = struct.pack("=QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    abuf = ctypes.create_string_buffer(attr, len(attr))
    rs = _check(libc.syscall(ctypes.c_long(_LL_CREATE), abuf, ctypes.c_size_t(len(attr)), 0), "ll")
    try:

        def allow(path: str, access: int) -> None:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path):
                    access &= _LL_FS_FILE
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd), 12)
                _check(libc.syscall(ctypes.c_long(_LL_ADD), rs, 1, rule, 0), "landlock rule")
            finally:
                os.close(fd)

        for p in read:
            allow(p, _LL_FS_READ)
        for p in devices:
            allow(p, (1 << 1) | (1 << 2))
        no_devices = (1 << 6) | (1 << 11) | (1 << 15)  # make_char, make_block, ioctl_dev
        for p in write:
            allow(p, handled & ~no_devices)
        _check(libc.syscall(ctypes.c_long(_LL_RESTRICT), rs, 0), "landlock_restrict_self")
    finally:
        os.close(rs)
    return True


def _write_file(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _drop_caps() -> None:
    import ctypes

    libc = _libc()
    pr_cap_ambient, clear_all = 47, 4
    libc.prctl(pr_cap_ambient, clear_all, 0, 0, 0)
    hdr = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(24)
    _check(libc.capset(ctypes.create_string_buffer(hdr, 8), data), "capset")


class _WorkerState:
    def __init__(self, config: dict) -> None:
        self.memory_mb = int(config["memory_mb"])
        self.layers = {k: False for k in _LAYER_ORDER}
        self.info: dict = {}
        self.base = ""
        self.base_mode = 0o700
        self.cleanup: str | None = None
        self.bpf: bytes | None = None
        self.null_fd = -1
        self.serial = 0
        self.child_ids: tuple[int, int] | None = None  # (uid, gid) a child switches to
        self.shared_tmp: list[str] = []  # private tmpfs dirs the child may write to as well
        self.setup(config)

    def setup(self, config: dict) -> None:
        linux = sys.platform.startswith("linux")
        libc = _libc() if linux else None
        import fcntl  # the worker's own needs, while the interpreter is surely readable
        import shutil
        import socket
        import stat

        self.shutil, self.stat, self.socket, self.fcntl = shutil, stat, socket, fcntl
        for name in _PREIMPORT:
            try:
                __import__(name)
            except Exception:
                pass
        root = os.geteuid() == 0
        # Two host uids per worker: its own and its children's.
        uid = (
            0x7E000000
            + ((int(config["parent"]) & 0xFFFF) << 7)
            + ((int(config["serial"]) & 63) << 1)
        )
        newns, newnet, newuser, newipc = 0x00020000, 0x40000000, 0x10000000, 0x08000000
        helper = self.id_map_helper(uid) if linux and root and config.get("userns") else None
        if linux:
            # Unprivileged, a user namespace makes the other namespaces possible.
            first = newnet | newns if root else newuser | newnet | newns
            outer_uid, outer_gid = os.getuid(), os.getgid()
            for flags in (first | newipc, first):  # a kernel may lack IPC namespaces
                if libc.unshare(flags) == 0:
                    break
            else:
                flags = 0
            if flags and not root:
                try:
                    _write_file("/proc/self/setgroups", "deny")
                    _write_file("/proc/self/uid_map", f"0 {outer_uid} 1")
                    _write_file("/proc/self/gid_map", f"0 {outer_gid} 1")
                except OSError:
                    flags = 0
            self.layers["netns"] = self.mntns = bool(flags)
            self.layers["ipcns"] = bool(flags & newipc)
        if getattr(self, "mntns", False):
            self.layers["mntns"] = self.private_mounts(libc, uid if root else None)
        if self.layers["mntns"]:
            self.base = "/tmp/sandbox"
            os.mkdir(self.base, 0o700)
            if not root:  # mode 1777 there: emptied after every program like the scratch dir
                self.shared_tmp = ["/tmp", "/dev/shm"]
        else:
            import tempfile

            self.base = tempfile.mkdtemp(prefix="code-sandbox-")
            self.cleanup = self.base  # the parent removes it; Landlock keeps us from doing so
        self.null_fd = os.open(os.devnull, os.O_RDWR)
        if root and linux:
            os.chown(self.base, uid, uid)
        if linux:
            pr_set_no_new_privs = 38
            libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
            backend = config.get("seccomp", "auto")
            for name, build in (("libseccomp", _libseccomp_bpf), ("bpf", _hand_bpf)):
                if backend not in ("auto", name):
                    continue
                try:
                    self.bpf = build()
                    self.info["seccomp_backend"] = name
                    break
                except (OSError, AttributeError):
                    continue
            if self.bpf is not None:
                self.install_seccomp = _bpf_installer(self.bpf)
                # Prove that the filter loads before promising it to the parent.
                pid = os.fork()
                if pid == 0:
                    try:
                        self.install_seccomp()
                        os._exit(0)
                    except BaseException:
                        os._exit(1)
                self.layers["seccomp"] = os.waitpid(pid, 0)[1] == 0
            if root:
                if helper is not None and self.enter_userns(libc, *helper):
                    # Root of a user namespace that maps just our two host uids: the caps it
                    # keeps there reach only those uids' processes and files (its network,
                    # mount and IPC namespaces belong to the host's root).
                    self.child_ids = (1, 1)
                    self.base_mode = 0o711  # the child may traverse it, never change it
                    self.info["uid"] = uid + 1
                    self.layers["uid"] = True
                else:  # no user namespace: worker and children share one unprivileged uid
                    try:
                        os.setgroups([])
                        os.setresgid(uid, uid, uid)
                        os.setresuid(uid, uid, uid)
                    except OSError:
                        sys.exit("cannot drop privileges")
                    self.info["uid"] = uid
                    self.layers["uid"] = os.getuid() == uid and os.geteuid() == uid
                self.info["worker_uid"] = uid
                os.chmod(self.base, self.base_mode)
            else:
                try:
                    _drop_caps()
                except OSError:
                    pass
            pr_set_dumpable = 4
            libc.prctl(pr_set_dumpable, 0, 0, 0, 0)  # keeps same-uid children out of /proc/<us>
            abi = _landlock_abi()
            if abi > 0:
                read = [p for p in sys.path if p and os.path.isdir(p)]
                read += ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime"]
                read += [sys.base_prefix, sys.prefix]
                devices = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
                try:
                    self.layers["landlock"] = _landlock(abi, read, [self.base], devices)
                    self.layers["landlock-net"] = abi >= 4
                    self.info["landlock_abi"] = abi
                    # Children can then write nowhere but the base; listing /tmp would fail
                    # (we may not read it either) and retire the worker after every program.
                    self.shared_tmp = []
                except OSError:
                    pass
        self.layers["rlimits"] = True
        self.layers["clean-env"] = True
        self.layers["deadline"] = True
        self.info.update(layers=self.layers, cleanup=self.cleanup, pid=os.getpid())

    @staticmethod
    def id_map_helper(first: int) -> tuple[int, int] | None:
        """Fork, while still root in the host's namespaces, a helper that will map host uids
        `first` (as 0) and `first + 1` (as 1) into our user namespace once we made it: only a
        process privileged outside it may map more than its own uid."""
        worker = os.getpid()
        try:
            r, w = os.pipe()
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:  # pragma: no cover - helper
            try:
                os.close(w)
                if os.read(r, 1) == b"m":
                    for name in ("uid_map", "gid_map"):
                        _write_file(f"/proc/{worker}/{name}", f"0 {first} 1\n1 {first + 1} 1\n")
                    os._exit(0)
            except BaseException:
                pass
            os._exit(1)
        os.close(r)
        return pid, w

    @staticmethod
    def enter_userns(libc, helper: int, go: int) -> bool:  # noqa: ANN001
        newuser = 0x10000000
        ok = libc.unshare(newuser) == 0
        try:
            os.write(go, b"m" if ok else b"x")
        except OSError:
            ok = False
        os.close(go)
        ok = os.waitpid(helper, 0)[1] == 0 and ok
        if not ok:
            return False
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        return os.getuid() == 0

    def private_mounts(self, libc, uid: int | None) -> bool:  # noqa: ANN001
        """Fresh tmpfs on /tmp and /dev/shm, /proc hidden, stdlib re-exposed read-only."""
        ms_rdonly, ms_nosuid, ms_nodev, ms_remount = 1, 2, 4, 32
        ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18
        if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
            return False
        # As root, children run under a uid of their own that may not write here (POSIX shared
        # memory and semaphores are files in /dev/shm); only the scratch dir is theirs.
        mode = b"1777" if uid is None else b"755"
        # The inode caps bound what empty files cost (kernel memory, and cleanup time that
        # would otherwise fall outside the program's deadline).
        opts = b"size=%dm,nr_inodes=%d,mode=" % (_SCRATCH_MB, _SCRATCH_INODES) + mode
        if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ms_nosuid | ms_nodev, opts) != 0:
            return False
        opts = b"size=%dm,nr_inodes=%d,mode=" % (_SHM_MB, _SHM_INODES) + mode
        libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", ms_nosuid | ms_nodev, opts)
        if uid is not None:
            # The sandbox uid may not be able to traverse to the interpreter (e.g. a pyenv under
            # /root, mode 0700); bind the import path somewhere it can read.
            os.makedirs("/tmp/.python", 0o755, exist_ok=True)
            moved: list[tuple[str, str]] = []
            for i, p in enumerate(list(sys.path)):
                if not p or not os.path.isdir(p):
                    continue
                target = f"/tmp/.python/{i}"
                os.mkdir(target, 0o755)
                src, dst = p.encode(), target.encode()
                if libc.mount(src, dst, None, ms_bind | ms_rec, None) == 0:
                    libc.mount(None, dst, None, ms_remount | ms_bind | ms_rdonly, None)
                    sys.path[i] = target
                    moved.append((p.rstrip("/") + "/", target + "/"))
            # Already-imported packages find their submodules through __path__, not sys.path.
            moved.sort(key=lambda m: -len(m[0]))
            for mod in list(sys.modules.values()):
                paths = getattr(mod, "__path__", None)
                if not isinstance(paths, list):
                    continue
                for j, entry in enumerate(paths):
                    for old, new in moved:
                        if (entry + "/").startswith(old):
                            paths[j] = new + entry[len(old) :]
                            break
            sys.path_importer_cache.clear()
        # An empty, read-only tmpfs over /proc hides other processes' environ and cmdline.
        libc.mount(b"tmpfs", b"/proc", b"tmpfs", ms_nosuid | ms_nodev, b"size=4k,mode=555")
        self.hide_host(libc, moved=uid is not None)
        return True

    @staticmethod
    def hide_host(libc, moved: bool) -> None:  # noqa: ANN001
        """Landlock keeps children from reading the host's files but not from stat()ing them:
        cover every top-level directory children do not need with an empty tmpfs, and /etc
        with one that holds only the two files they read."""
        ms_rdonly, ms_nosuid, ms_nodev, ms_remount = 1, 2, 4, 32
        keep = {"usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "dev", "proc", "tmp"}
        if not moved:  # imports still come from the interpreter's own tree
            for p in [*sys.path, sys.prefix, sys.base_prefix, sys.executable]:
                parts = os.path.abspath(p or "/").split("/")
                if len(parts) > 1 and parts[1]:
                    keep.add(parts[1])
        etc: dict[str, bytes] = {}
        for name in ("localtime", "ld.so.cache"):
            try:
                with open(f"/etc/{name}", "rb") as f:
                    etc[name] = f.read(1 << 22)
            except OSError:
                pass
        flags = ms_nosuid | ms_nodev
        with os.scandir("/") as entries:
            tops = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for name in tops:
            if name in keep or name == "etc":
                continue
            path = b"/" + os.fsencode(name)
            libc.mount(b"tmpfs", path, b"tmpfs", flags | ms_rdonly, b"size=4k,nr_inodes=4,mode=555")
        if "etc" in keep or libc.mount(b"tmpfs", b"/etc", b"tmpfs", flags, b"size=8m,mode=755"):
            return
        for name, data in etc.items():
            fd = os.open(f"/etc/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        libc.mount(None, b"/etc", None, ms_remount | ms_rdonly | flags, None)

    def hello(self) -> dict:
        return self.info

    def remove(self, path: str) -> None:
        """Remove what a child left, whatever modes it set: the worker owns it (same uid) or
        may override its modes (root of the user namespace the child's uid lives in)."""
        if not self.stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
        stack = [path]
        while stack:  # make every directory listable and writable first, without recursion
            d = stack.pop()
            os.chmod(d, 0o700)
            with os.scandir(d) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        self.shutil.rmtree(path)

    def fresh_scratch(self) -> str:
        """A new, empty directory for the next program, whatever the last one did."""
        os.chmod(self.base, self.base_mode)
        for entry in os.scandir(self.base):
            self.remove(entry.path)
        self.serial += 1
        scratch = os.path.join(self.base, str(self.serial))
        os.mkdir(scratch, 0o700)
        if self.child_ids is not None:
            os.chown(scratch, *self.child_ids)
        return scratch

    def start_zygote(self) -> None:
        """Fork the zygote that every child is forked from, before this worker sees any job.

        A child forked from the worker itself would inherit the previous job's reply (still
        referenced by the worker's locals), the values clean children computed and, in freed
        but not overwritten heap memory, earlier programs' source text. The zygote never
        handles job data: it forks the next child ahead of time, the child confines itself and
        waits on a pipe, and the zygote passes the pipe ends to the worker over a Unix socket;
        job bytes reach the child only through the kernel."""
        socket = self.socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - zygote
            try:
                ours.close()
                for fd in (0, 1):  # hold none of the parent's pipes
                    os.dup2(self.null_fd, fd)
                self.zygote(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.zsock = ours

    def zygote(self, sock) -> None:  # noqa: ANN001 - socket.socket
        """Fork one child at a time; hand the worker its job pipe, report pipe and pidfd, then
        its exit status once it exited, and fork the next one."""
        _libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the worker
        while True:
            jr, jw = os.pipe()
            rr, rw = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    sock.close()
                    os.close(jw)
                    os.close(rr)
                    self.child(jr, rw)
                finally:
                    os._exit(70)
            os.close(jr)
            os.close(rw)
            pidfd = os.pidfd_open(pid)
            try:
                self.socket.send_fds(sock, [b"P" + struct.pack("=i", pid)], [jw, rr, pidfd])
            except OSError:
                os.kill(pid, signal.SIGKILL)  # the worker is gone
                os.waitpid(pid, 0)
                return
            for fd in (jw, rr):
                os.close(fd)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(sock.fileno(), select.POLLIN)
            while True:
                events = dict(poller.poll())
                if pidfd in events:
                    break
                if events.get(sock.fileno(), 0) & (select.POLLHUP | select.POLLERR):
                    os.kill(pid, signal.SIGKILL)  # the worker died: take its child along
                    os.waitpid(pid, 0)
                    return
                if sock.fileno() in events:
                    sock.recv(16)  # nothing is expected from the worker: drop it
            os.close(pidfd)
            got = os.waitid(os.P_PID, pid, os.WEXITED)
            killed = got.si_code != os.CLD_EXITED
            try:
                sock.send(b"S" + struct.pack("=ii", got.si_status if killed else 0, got.si_status))
            except OSError:
                return

    def run_job(self, body: bytes) -> dict:
        job = json.loads(body)
        timeout = float(job.get("timeout", 5.0))
        start = time.monotonic()
        deadline = start + timeout
        scratch = self.fresh_scratch()  # raises if it cannot: the worker dies, the job is retried
        job["scratch"] = scratch
        data = json.dumps(job, separators=(",", ":")).encode()
        del job, body
        msg, fds, _, _ = self.socket.recv_fds(self.zsock, 16, 3)
        if msg[:1] != b"P" or len(fds) != 3:
            raise RuntimeError("zygote failed")
        (pid,) = struct.unpack("=i", msg[1:5])
        jw, r, pidfd = fds
        if len(data) > 1 << 16:  # room for all of it, so that writing cannot wait for the child
            try:
                self.fcntl.fcntl(jw, 1031, len(data))  # F_SETPIPE_SZ
            except OSError:
                pass
        try:
            # The child reads all of its job before it runs anything: this cannot stall.
            view = memoryview(data)
            while view:
                view = view[os.write(jw, view) :]
        except OSError:
            pass  # the child died early; its status says how
        os.close(jw)
        del data
        out = bytearray()
        timed_out = overflow = False
        exited = False
        poller = select.poll()
        poller.register(r, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        pipe_open = True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            events = poller.poll(max(1, int(left * 1000)))
            for fd, _ in events:
                if fd == r:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        poller.unregister(r)
                        pipe_open = False
                    out += chunk
                    if len(out) > _MAX_REPORT:
                        overflow = True
            if overflow:
                break
            if any(fd == pidfd for fd, _ in events):
                exited = True
                break
        if not exited:
            if not self.layers["seccomp"]:  # it may have forked: its whole process group
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # no pid-reuse race
            except OSError:
                pass
            select.select([pidfd], [], [])  # gone before its scratch dir is removed
        elif pipe_open and not overflow:
            # Child is gone, so nobody can hold the write end any more: drain what is left.
            while len(out) <= _MAX_REPORT:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                out += chunk
            overflow = len(out) > _MAX_REPORT
        os.close(r)
        os.close(pidfd)
        try:
            self.remove(scratch)
            for d in self.shared_tmp:
                for entry in os.scandir(d):
                    if entry.path != self.base:
                        self.remove(entry.path)
            retire = bool(os.listdir(self.base))
        except Exception:  # e.g. a tree too deep to remove: a fresh worker gets a fresh base
            retire = True
        status = self.zsock.recv(16)  # sent when the child exited: there by now, or soon
        if status[:1] != b"S":
            raise RuntimeError("zygote failed")
        sig, code = struct.unpack("=ii", status[1:9])
        if sig == signal.SIGXCPU:
            timed_out = True
        if not timed_out and time.monotonic() > deadline:
            # Cleaning up after the program counts against its deadline: a program that
            # finished in time but left that much behind gets nothing for its report.
            timed_out, out = True, bytearray()
        return {
            "out": "" if overflow else out.decode("utf-8", errors="replace"),
            "timed_out": timed_out and not overflow,
            "overflow": overflow,
            "signal": sig,
            "exit": None if sig else code,
            "retire": retire,
        }

    def child(self, job_fd: int, report: int) -> None:  # pragma: no cover - child
        """Runs in the forked child: confine itself while no job is known yet (this is off the
        critical path), then read the job, and run solution, setup and probes."""
        import resource

        try:
            os.setsid()
            for fd in (0, 1, 2):
                os.dup2(self.null_fd, fd)
            os.dup2(report, 3)
            os.dup2(job_fd, 4)
            os.closerange(5, 1 << 20)
            mem = self.memory_mb << 20
            limits = [
                (resource.RLIMIT_AS, mem),
                (resource.RLIMIT_FSIZE, 16 << 20),
                (resource.RLIMIT_NOFILE, 64),
                (resource.RLIMIT_CORE, 0),
            ]
            if self.layers["uid"]:
                limits.append((resource.RLIMIT_NPROC, 64))  # per-worker uid: counts only us
            for what, value in limits:
                resource.setrlimit(what, (value, value))
            if self.child_ids is not None:
                uid, gid = self.child_ids
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)  # leaves every capability behind
            os.environ.clear()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self.layers["seccomp"]:
                self.install_seccomp()
            data = bytearray()
            while chunk := os.read(4, 1 << 16):
                data += chunk
            os.close(4)
            if not data:
                os._exit(0)  # the worker is gone
            job = json.loads(data)
            del data
            os.chdir(job["scratch"])
            cpu = int(math.ceil(float(job["timeout"]))) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        except BaseException:
            os._exit(70)
        try:
            _child_run(job)
        except BaseException:
            os._exit(71)  # the solution broke the harness itself (e.g. patched builtins)
        os._exit(0)


def _child_emit(rec: list) -> None:
    data = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(3, view) :]


def _child_run(job: dict) -> None:
    g: dict = {"__name__": "__solution__", "__builtins__": builtins}
    for phase in ("code", "setup"):
        src = job.get(phase) or ""
        try:
            exec(compile(src, f"<{phase}>", "exec"), g)
        except BaseException as e:  # SystemExit and KeyboardInterrupt included
            _child_emit([phase, "e", type(e).__name__])
            return
        _child_emit([phase, "ok"])
    values = job.get("values")  # a judge's job: the solution's values, decoded plain data
    slots: dict = {}
    n = 0
    for i, (kind, src) in enumerate(job["probes"]):
        try:
            if kind == "n":  # a new test: its own slots
                slots, n = {}, 0
                if values is not None:
                    for k, v in enumerate(values[int(src)]):
                        if v[0]:
                            slots[k] = _decode(v[1])
                g[_PROBE] = slots
                rec = [i, "ok"]
            elif kind == "v":
                k, n = n, n + 1
                value = eval(compile(src, "<test>", "eval"), g)
                slots[k] = value
                try:
                    rec = [i, "v", _encode(value)]
                    line = json.dumps(rec, separators=(",", ":"))
                except (_Unencodable, ValueError, RecursionError, TypeError):
                    rec, line = [i, "e", "TypeError"], None
                if line is not None and len(line) > _MAX_REPORT // 4:
                    rec = [i, "e", "MemoryError"]
            elif kind == "a":
                rec = [i, "v", bool(eval(compile(src, "<test>", "eval"), g))]
            else:
                exec(compile(src, "<test>", "exec"), g)
                rec = [i, "ok"]
        except BaseException as e:
            rec = [i, "e", type(e).__name__]
        _child_emit(rec)
    _child_emit(["end"])


def _worker_main(config_json: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        state = _WorkerState(json.loads(config_json))
    except BaseException as e:
        sys.stderr.write(f"sandbox worker setup failed: {e!r}\n")
        sys.exit(1)
    import gc

    _send(1, state.hello())
    os.dup2(state.null_fd, 2)
    gc.collect()
    gc.freeze()  # children then do not touch (copy) the pre-imported objects' pages
    state.start_zygote()
    while True:
        header = _read_exact(0, 4)
        if header is None:
            return
        (n,) = struct.unpack(">I", header)
        body = _read_exact(0, n)
        if body is None:
            return
        reply = state.run_job(body)
        del body
        _send(1, reply)
        if reply["retire"]:
            return


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(sys.argv[2])
