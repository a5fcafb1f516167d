"""calculator: arithmetic on an expression, by walking its syntax tree (never eval).

Only numbers, + - * / // % **, unary +/-, parentheses, a few math functions and the
constants pi and e are accepted; anything else (names, attributes, subscripts, strings,
lambdas...) is refused before a single operation runs.

Output: exact integers print as integers ("2**10" -> "1024", "10/2" -> "5"); other floats
print with 12 significant digits ("0.1+0.2" -> "0.3"), which hides binary rounding noise
and is more precision than a model can use.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from agents.skills.base import SkillContext, SkillError

MAX_EXPRESSION_CHARS = 500
# Integers stay under Python's 4300-digit int->str conversion limit; nobody asks a
# calculator tool for longer numbers, and the cap bounds the work a prompt can cause.
MAX_INT_DIGITS = 4_000
_MAX_INT_BITS = int(MAX_INT_DIGITS * math.log2(10))
SIGNIFICANT_DIGITS = 12

Number = int | float

_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise SkillError("round() takes an integer number of digits")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# name -> (function, minimum arguments, maximum arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *args: min(args), 1, 50),
    "max": (lambda *args: max(args), 1, 50),
    "log": (_log, 1, 2),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


def _check(value: Any) -> Number:
    """Refuse results that are not finite real numbers or are too big to be worth computing on."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SkillError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise SkillError(f"the result has more than {MAX_INT_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise SkillError("the result is too large (not a finite number)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    # Estimate the size first: 9**9**9 must be refused, not computed.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log10(abs(base)) > MAX_INT_DIGITS:
            raise SkillError(f"the result has more than {MAX_INT_DIGITS} digits")
    return base**exponent


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise SkillError(f"unsupported constant {node.value!r}: only real numbers")
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        return _check(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check(_UNARY_OPS[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise SkillError(f"unknown name {node.id!r}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise SkillError(f"unsupported function; use one of: {', '.join(sorted(_FUNCTIONS))}")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise SkillError("functions take plain positional arguments only")
        function, min_args, max_args = _FUNCTIONS[node.func.id]
        if not min_args <= len(node.args) <= max_args:
            raise SkillError(f"{node.func.id}() takes {min_args}-{max_args} arguments" if min_args != max_args
                             else f"{node.func.id}() takes {min_args} argument(s)")
        return _check(function(*(_evaluate(arg) for arg in node.args)))
    raise SkillError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; SkillError for anything else."""
    if not isinstance(expression, str) or not expression.strip():
        raise SkillError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise SkillError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    # "^" is what people (and models) write for powers; Python's XOR has no place here.
    expression = expression.replace("^", "**")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise SkillError(f"invalid expression: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        raise SkillError("expression is too deeply nested") from exc
    try:
        return _evaluate(tree)
    except ZeroDivisionError as exc:
        raise SkillError("division by zero") from exc
    except OverflowError as exc:
        raise SkillError("the result is too large") from exc
    except RecursionError as exc:
        raise SkillError("expression is too deeply nested") from exc
    except (ValueError, TypeError) as exc:
        # math domain errors (sqrt(-1), log(0)) and the like.
        raise SkillError(f"cannot compute: {exc}") from exc


def format_number(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"  # also turns -0.0 into 0
    if value.is_integer() and abs(value) < 10**SIGNIFICANT_DIGITS:
        return str(int(value))
    return format(value, f".{SIGNIFICANT_DIGITS}g")


class Calculator:
    name = "calculator"
    description = (
        "Evaluate an arithmetic expression exactly as written. Supports + - * / // % ** (or ^), "
        "parentheses, sqrt, abs, round, min, max, log (natural, or log(x, base)), exp, sin, cos, tan "
        "(radians) and the constants pi and e."
    )
    parameters = {
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "For example: (2 + 3) * sqrt(16) / 4",
                           "maxLength": MAX_EXPRESSION_CHARS},
        },
        "required": ["expression"],
        "additionalProperties": False,
    }

    async def run(self, arguments: dict, *, config: dict, context: SkillContext) -> str:
        # CPU-bound but bounded by the length and size limits above: microseconds, so no thread.
        return format_number(evaluate(arguments.get("expression")))
