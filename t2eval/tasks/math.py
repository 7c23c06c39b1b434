"""MATH (Hendrycks competition math), PROTOCOL §5.

Prediction (release): the text after the last "The answer is: " (cut at the first ".\\n", trailing
"." dropped), else the content of the last \\boxed{...}/\\fbox{...} (brace-matched; an \\fbox yields
nothing, as in the release). Gold: the last \\boxed{} of the reference solution.
equivalence="code" (default) re-implements the release's comparison: Hendrycks-style LaTeX
normalisation, then numeric equality (rel. tol 1e-4, also x/100 and x*100), bracket-insensitive
string equality, element-wise tuples, and symbolic equality with sympy (parse_latex / parse_expr,
simplify, or numeric value within rel. tol 1e-3). Unlike the release, parse_expr only sees strings
made of math characters (it evaluates Python) and sympy gets a time limit.
equivalence="math_verify" uses the math-verify package on the whole completion instead.
"""

from __future__ import annotations

import contextlib
import functools
import math as _m
import re
import signal
import threading

from .base import Task, check_option
from .registry import register_task

SYSTEM = ("Solve the question below by reasoning step by step,and put the final answer within "
          "\\boxed{}.")


# ----------------------------------------------------------------------------- extraction
def last_boxed(text: str) -> str | None:
    """The last "\\boxed{...}" (or "\\fbox{...}") substring, braces matched; None if absent/unclosed."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx:i + 1]
    return None


def unbox(s: str | None) -> str | None:
    """"\\boxed{x}" -> "x"; anything else -> None."""
    if s is None or not s.startswith("\\boxed{") or not s.endswith("}"):
        return None
    return s[len("\\boxed{"):-1]


def extract_answer(completion: str) -> str | None:
    parts = completion.split("The answer is: ")
    if len(parts) > 1:
        ans = parts[-1].split(".\n")[0].strip()
        if ans.endswith("."):
            ans = ans[:-1]
        return ans.strip()
    return unbox(last_boxed(completion))


def gold_answer(solution: str) -> str | None:
    return unbox(last_boxed(solution))


# -------------------------------------------------------------------------- normalisation
def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    pieces = s.split("\\frac")
    out = pieces[0]
    for p in pieces[1:]:
        out += "\\frac"
        if p.startswith("{"):
            out += p
            continue
        if len(p) < 2:
            return s
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s: str) -> str:
    """"3/4" -> \\frac{3}{4} (integers only)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("ambiguous units")
        return parts[0]
    return s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    if "\\sqrt" not in s:
        return s
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for p in pieces[1:]:
        out += "\\sqrt" + (p if p.startswith("{") else "{" + p[:1] + "}" + p[1:])
    return out


def normalize(s: str) -> str:
    """Hendrycks-style LaTeX normalisation used by the release."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\\\%", "").replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


# ---------------------------------------------------------------------------- equivalence
def _is_number(x) -> bool:
    try:
        float(str(x).replace(",", ""))
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM limit in the main thread; no limit elsewhere."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError("sympy took too long")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_SAFE_EXPR = re.compile(r"^[0-9a-zA-Z\s+\-*/^().,]{1,200}$")


def _parse(s: str):
    from sympy.parsing.latex import parse_latex
    from sympy.parsing.sympy_parser import parse_expr

    try:
        return parse_latex(s)
    except Exception:
        pass
    if _SAFE_EXPR.match(s) and "__" not in s:
        try:
            return parse_expr(s)
        except Exception:
            pass
    return s


@functools.cache
def _warm_up_parsers() -> None:
    """Import sympy's parsers and run the LaTeX one once (it loads its ANTLR grammar on first use):
    seconds on a busy machine, which must not count against the time limit of a comparison."""
    from sympy.parsing.latex import parse_latex
    from sympy.parsing.sympy_parser import parse_expr  # noqa: F401

    try:
        parse_latex("1")
    except Exception:
        pass


def symbolic_equal(a: str, b: str, timeout: float = 5.0) -> bool:
    from sympy import N, simplify

    _warm_up_parsers()
    try:
        with _time_limit(timeout):
            pa, pb = _parse(a), _parse(b)
            try:
                if simplify(pa - pb) == 0:
                    return True
            except Exception:
                pass
            try:
                if _m.isclose(N(pa), N(pb), rel_tol=1e-3):
                    return True
            except Exception:
                pass
    except TimeoutError:
        return False
    return False


def math_equal(prediction, reference) -> bool:
    """The release's `math_equal` (numeric with percentages, bracket-insensitive, tuples, sympy)."""
    if _is_number(prediction) and _is_number(reference):
        p = float(str(prediction).replace(",", ""))
        r = float(str(reference).replace(",", ""))
        return any(_m.isclose(x, p, rel_tol=1e-4) for x in (r / 100, r, r * 100))
    if not prediction and prediction not in (0, False):
        return False
    reference, prediction = str(reference).strip(), str(prediction).strip()
    p_s, r_s = prediction, reference
    if ((prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("("))
            or (prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("["))):
        p_s, r_s = p_s.strip("[]()"), r_s.strip("[]()")
    for ch in "{}()":
        p_s, r_s = p_s.replace(ch, ""), r_s.replace(ch, "")
    if p_s == r_s:
        return True
    if ((prediction[:1] == "[" and prediction[-1:] == "]" and reference[:1] == "[" and reference[-1:] == "]")
            or (prediction[:1] == "(" and prediction[-1:] == ")" and reference[:1] == "(" and reference[-1:] == ")")):
        pp, rp = prediction[1:-1].split(","), reference[1:-1].split(",")
        if len(pp) == len(rp) and all(math_equal(x, y) for x, y in zip(pp, rp)):
            return True
    return symbolic_equal(prediction, reference)


def is_equiv(gold: str | None, pred: str | None) -> bool:
    """The release's `is_equiv(answer, prediction)` (note: gold is passed as math_equal's prediction)."""
    if gold is None and pred is None:
        return True
    if gold is None or pred is None:
        return False
    try:
        g, p = normalize(gold), normalize(pred)
        return math_equal(g, p) or g == p
    except (AssertionError, TypeError, ValueError):
        return math_equal(gold, pred) or gold == pred


@register_task("math")
class MATH(Task):
    system = SYSTEM
    max_new_tokens = 1024

    def __init__(self, equivalence: str = "code") -> None:
        self.equivalence = check_option(self.key, "equivalence", equivalence, ("code", "math_verify"))
        self.options = {"equivalence": equivalence}

    def user_message(self, doc: dict) -> str:
        return doc["problem"]

    def reference(self, doc: dict) -> str:
        return doc["solution"]

    def score_one(self, doc: dict, completion: str) -> bool:
        gold = gold_answer(doc["solution"])
        if self.equivalence == "math_verify":
            from math_verify import parse, verify

            if gold is None:
                return False
            try:
                return bool(verify(parse("$\\boxed{" + gold + "}$"), parse(completion)))
            except Exception:
                return False
        pred = extract_answer(completion)
        if gold is None:  # the release would count None == None as correct; no gold means no credit
            return False
        return is_equiv(gold, pred)
