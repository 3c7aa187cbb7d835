"""What the kubelet makes of a container's ``env``, ``command`` and ``args`` before the process starts.

A container runtime (podman, runc) passes these through as written; a kubelet does not. It
resolves the environment in a fixed order and expands ``$(NAME)`` references, so a pod tier that
skips this step would miss what a cluster does with a spec (a ``$(VQA_API_KEY)`` in an argument
becomes the Secret's value). These are Kubernetes' rules, as the kubelet applies them
(``makeEnvironmentVariables`` and ``ExpandContainerCommandAndArgs``, over the expansion of
``third_party/forked/golang/expansion``):

- the environment: each ``envFrom`` source first (a Secret's keys, under its ``prefix``), then each
  ``env`` entry in order. A literal ``value`` is expanded against what is defined so far (``envFrom``
  and the earlier ``env`` entries) and the service-link variables; a ``valueFrom`` is taken as it is,
  never expanded. Service-link variables not otherwise defined are added last;
- ``command`` and ``args``: each word expanded against the whole resulting environment;
- expansion: ``$$`` is ``$``; ``$(NAME)`` is NAME's value when NAME is defined, else left as
  written; any other ``$`` (``$NAME``, ``${NAME}``, ``$(`` without a closing ``)``, a trailing ``$``)
  is left as written.

A Secret or key that does not exist stops the container from being created
(``CreateContainerConfigError``, with the kubelet's message), unless the reference is optional.
The image's own ``ENV`` is not part of any of this: the kubelet does not know it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

OPERATOR, OPENER, CLOSER = "$", "(", ")"


class CreateContainerConfigError(Exception):
    """The container cannot be created as specified (a missing Secret or key): the kubelet's waiting reason, with its message."""


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """``text`` with ``$(NAME)`` replaced by ``lookup(NAME)`` where that is not None, and ``$$`` by ``$``."""
    out: list[str] = []
    checkpoint = cursor = 0
    while cursor < len(text):
        if text[cursor] == OPERATOR and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == OPERATOR:  # an escaped operator
                out.append(OPERATOR)
                advance = 1
            elif rest[0] == OPENER and (end := rest.find(CLOSER, 1)) != -1:  # a reference
                name = rest[1:end]
                value = lookup(name)
                out.append(value if value is not None else f"{OPERATOR}{OPENER}{name}{CLOSER}")
                advance = end + 1
            else:  # not an expression: the operator and the next character stay as written
                out.append(OPERATOR + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def environment(
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
    *,
    namespace: str = "default",
    services: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet makes it: ``envFrom``, then ``env`` in order (literals expanded), then the service links."""
    services = dict(services or {})
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef")
        if ref is None:
            raise NotImplementedError(f"envFrom {source}: only secretRef is modelled here")
        secret = secrets.get(ref["name"])
        if secret is None:
            if ref.get("optional"):
                continue
            raise CreateContainerConfigError(f'secret "{ref["name"]}" not found')
        prefix = source.get("prefix") or ""
        env.update({prefix + key: value for key, value in secret.items()})

    def lookup(name: str) -> str | None:
        return env[name] if name in env else services.get(name)

    for var in container.get("env") or []:
        if var.get("value"):
            env[var["name"]] = expand(var["value"], lookup)
            continue
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            if var.get("valueFrom"):
                raise NotImplementedError(f"env {var['name']}: only literal values and secretKeyRef are modelled here")
            env[var["name"]] = ""
            continue
        secret = secrets.get(ref["name"])
        if secret is None or ref["key"] not in secret:
            if ref.get("optional"):
                continue
            if secret is None:
                raise CreateContainerConfigError(f'secret "{ref["name"]}" not found')
            raise CreateContainerConfigError(f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
        env[var["name"]] = secret[ref["key"]]
    for name, value in services.items():
        env.setdefault(name, value)
    return env


def command_and_args(container: Mapping[str, Any], env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The container's ``command`` and ``args``, each word expanded against its whole environment."""
    return (
        [expand(word, env.get) for word in container.get("command") or []],
        [expand(word, env.get) for word in container.get("args") or []],
    )
