"""Strict conversion of plain dicts (from YAML / omegaconf / config.json) into dataclasses.

Every config object in the project is a plain ``@dataclass``. ``from_dict`` builds one from a mapping and
refuses, with a message naming the full key path and the closest valid key, anything a user can get wrong:
an unknown or misspelled key, a missing required key, or a value of the wrong type.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration mistake. The message names the key and the fix; ``problems`` holds each mistake
    of a config on its own (one, unless ``from_dict`` found several)."""

    def __init__(self, message: str = "", problems: list[str] | None = None):
        self.problems = list(problems) if problems else [message]
        if len(self.problems) > 1:
            message = f"{len(self.problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


def closest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert nested dataclasses/containers."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{path}' must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{path}' = {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{path}' = {value!r} must be one of {list(allowed)}"
                              f"{closest(str(value), [str(a) for a in allowed])}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{path}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            one = f" (a list of one: [{value}])" if isinstance(value, (int, float, str)) else ""
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}{one}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be a string, got the number {value!r}; a time takes its "
                              f"unit, e.g. '{value}ba' (batches), '{value}ep' (epochs) or '{value}tok' (tokens)")
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly. ``path`` prefixes key names in error messages."""
    data = dict(data or {})
    try:  # omegaconf containers: resolve interpolations into plain python first
        from omegaconf import DictConfig, OmegaConf
        if isinstance(data, DictConfig):
            data = OmegaConf.to_container(data, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    # every problem of this mapping and the ones inside it is collected, then reported in one ConfigError
    problems: list[str] = []
    where = f"in '{path}'" if path else "at the top level"
    for k in data:
        if k not in fields:
            hint = closest(str(k), fields)  # the list of valid keys only where no key is close
            problems.append(f"unknown config key '{prefix}{k}' {where}" +
                            (hint if hint else f"; valid keys: {', '.join(sorted(fields))}"))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
            except ConfigError as e:
                problems += e.problems
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"missing required config key '{prefix}{name}'")
    if problems:
        raise ConfigError(problems[0], problems)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:  # __post_init__ checks, and arithmetic they did not expect
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts/lists, for logging and saving."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------ YAML + command-line overrides
def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _yaml_position(e: BaseException) -> str:
    """' at line L, column C' of a YAML syntax error (1-based, as editors count), else ''."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _split_key(key: str) -> list[str]:
    """``'a.b.0.c'`` / ``'a.b[0].c'`` -> ``['a', 'b', '0', 'c']`` (omegaconf's own key syntax)."""
    try:
        from omegaconf._utils import split_key
        return list(split_key(key))
    except ImportError:  # pragma: no cover - older/newer omegaconf without the helper
        import re
        return re.sub(r"\[([^\]]*)\]", r".\1", key).split(".")


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit()


def apply_overrides(cfg: Any, overrides: list[str]) -> None:
    """Apply command-line ``key=value`` overrides, one by one and in order, onto the omegaconf ``DictConfig`` ``cfg``.

    ``value`` is parsed as omegaconf's ``from_dotlist`` parses it (YAML: ``1e-4`` is a float, ``null`` is None,
    ``[1, 2]`` a list, ``{a: 1}`` a mapping, ``${x.y}`` an interpolation resolved later). ``key`` is a dotted path
    (``a.b.0.c`` or ``a.b[0].c``):

    - through mappings, as a merge of the dotlist would: a missing or null/scalar intermediate key becomes a new
      mapping (so misspelled or unknown keys reach the strict dataclass conversion and its "did you mean" error);
    - a number indexes an existing list (``icl_tasks.0.path=x``, ``optimizer.betas.1=0.9``); an index past the end,
      a non-number on a list, or a number on a scalar is a ``ConfigError`` naming the key;
    - a mapping value is merged into an existing mapping; anything else (lists included) replaces the old value;
    - an intermediate ``${...}`` interpolation of a mapping/list is replaced by a copy of its target first, so
      ``model.d_model=64`` with ``model: ${variables.model}`` changes ``model`` only (as a dotlist merge does).

    Every failure is a one-line ``ConfigError`` naming the override.
    """
    for item in overrides:
        try:
            _apply_override(cfg, item)
        except ConfigError:
            raise
        except Exception as e:  # whatever omegaconf raises while setting a key (TypeError, ValidationError, ...)
            raise ConfigError(f"command-line override {item!r}: {_first_line(e)}") from None


def _apply_override(cfg: Any, item: str) -> None:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def is_container(x: Any) -> bool:
        return isinstance(x, (DictConfig, ListConfig)) and not x._is_none()

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command-line override {item!r} must look like key=value")
    try:  # the value exactly as OmegaConf.from_dotlist parses it
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
    except Exception as e:
        raise ConfigError(f"command-line override {item!r}: cannot parse the value {text!r} "
                          f"({_first_line(e)})") from None
    parts = _split_key(key)
    if any(p == "" for p in parts):
        raise ConfigError(f"command-line override {item!r}: '{key}' is not a key path like optimizer.lr "
                          "or icl_tasks.0.path")

    def child(node: Any, k: Any) -> Any:
        """``node[k]`` (None when absent/null/???/unresolvable); an interpolated container is replaced by a copy."""
        if isinstance(node, DictConfig) and k not in list(node.keys()):
            return None
        if OmegaConf.is_missing(node, k):
            return None
        if OmegaConf.is_interpolation(node, k):
            try:
                target = node[k]
            except Exception:  # an interpolation that cannot resolve: the override replaces it
                return None
            if not is_container(target):
                return target
            node[k] = OmegaConf.to_container(target, resolve=False)
        return node[k]

    def put(node: Any, k: Any, v: Any) -> None:
        """``node[k] = v``, except that a mapping is merged key by key into an existing mapping."""
        old = child(node, k) if isinstance(v, dict) else None
        if isinstance(old, DictConfig) and is_container(old):
            for kk, vv in v.items():
                put(old, kk, vv)
        else:
            node[k] = v

    node = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[:i + 1])
        if isinstance(node, ListConfig):
            parent, n = ".".join(parts[:i]), len(node)
            if not _is_index(part):
                raise ConfigError(f"config key '{key}': '{parent}' is a list; index it with a number "
                                  + (f"0..{n - 1}" if n else "(it is empty)") + f", not '{part}'")
            k: Any = int(part)
            if k >= n:
                has = f"the list has {n} item{'s' * (n != 1)} (0..{n - 1})" if n else f"the list '{parent}' is empty"
                raise ConfigError(f"config key '{key}': {has}; to change its length set the whole list, "
                                  f"e.g. '{parent}=[...]'")
        else:
            k = part
        if i == len(parts) - 1:
            put(node, k, value)
            return
        nxt = child(node, k)
        if is_container(nxt):
            node = nxt
            continue
        if nxt is not None and _is_index(parts[i + 1]):
            raise ConfigError(f"config key '{key}': '{path}' is {nxt!r}, not a list; it cannot be indexed "
                              f"with '{parts[i + 1]}'")
        node[k] = {}  # a missing, null or scalar key becomes a mapping (the strict conversion judges it)
        node = node[k]


def load_yaml_with_overrides(yaml_path: Any, overrides: list[str] | None = None, *,
                             example: str = "optimizer.lr=1e-4") -> dict:
    """Read ``yaml_path`` (None: start empty) with omegaconf, apply ``key=value`` ``overrides`` with
    ``apply_overrides``, resolve ``${...}`` and return plain python containers.

    Every failure (missing/unreadable file, YAML syntax, a bad override, an interpolation that cannot be
    resolved) is a one-line ``ConfigError``; nothing omegaconf raises escapes.
    """
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"command-line override {item!r} must look like key=value, e.g. {example}")
    name = str(yaml_path) if yaml_path is not None else None
    try:
        cfg = OmegaConf.load(yaml_path) if yaml_path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file {name!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name!r} is a directory; pass a YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {name!r}: {e.strerror or e}") from None
    except Exception as e:  # YAML syntax errors, omegaconf errors
        raise ConfigError(f"cannot parse config file {name!r}{_yaml_position(e)}: {_first_line(e)}") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"config file {name!r} must be a mapping of keys at the top level")
    apply_overrides(cfg, overrides)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as e:  # interpolation errors name the key
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key '{key}': {_first_line(e)}" if key else f"invalid config: {_first_line(e)}") \
            from None
    return data
