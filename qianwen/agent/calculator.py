"""Arithmetic a model asks for, read with `ast` and computed node by node: numbers, operators, parentheses and a
few math functions, nothing else (no names, attributes, calls of other things; never eval). Integers stay
exact; results too large to compute quickly are refused instead of hanging the agent."""

from __future__ import annotations

import ast
import math
import operator

MAX_BITS = 10_000  # ~3,000 decimal digits: quick to compute and below Python's int-to-str limit (4,300 digits)
MAX_CHARS = 1000

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError, in one sentence, for anything else."""
    text = expression.strip().rstrip("=").strip()
    if len(text) > MAX_CHARS:
        raise ValueError(f"the expression is longer than {MAX_CHARS} characters; split it into parts.")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"{text!r} is not an arithmetic expression.") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero.") from None
    except OverflowError:
        raise ValueError("the result is too large for a floating-point number.") from None
    except RecursionError:
        raise ValueError("the expression is nested too deeply.") from None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        _check_size(node.op, left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ValueError("^ is not a power here; write ** (2 ** 10).")
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ValueError(f"{node.func.id}() takes no keyword arguments here.")
        args = [_value(a) for a in node.args]
        if node.func.id == "round" and len(args) == 2 and abs(args[1]) > 100:
            raise ValueError("round() keeps at most 100 digits.")
        try:
            return _FUNCTIONS[node.func.id](*args)
        except TypeError as exc:
            raise ValueError(f"{node.func.id}(): {exc}.") from None
        except ValueError:
            raise ValueError(f"{node.func.id}() is undefined for {', '.join(map(str, args))}.") from None
    raise ValueError(f"{_what(node)} is not allowed; use numbers, + - * / // % ** and parentheses.")


def _check_size(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse integer products and powers past MAX_BITS before computing them (9 ** 9 ** 9 would take hours)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    else:
        return
    if bits > MAX_BITS:
        raise ValueError(f"the result would have over {MAX_BITS * 3 // 10:,} digits; that is too large to compute.")


def _what(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return "attribute access"
    if isinstance(node, ast.Call):
        return f"the function {node.func.id!r}" if isinstance(node.func, ast.Name) else _what(node.func)
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"
    return f"{type(node).__name__.lower()} syntax"
