"""The kubelet's ``$(VAR)`` expansion as the pod tier applies it (``testkit.expansion``), and our pods' escape from it.

The cases are Kubernetes' own: the table of ``third_party/forked/golang/expansion/expand_test.go``
(the rules the kubelet applies to ``command``, ``args`` and ``env``), and the examples of the
documentation pages "Define Dependent Environment Variables" and "Define a Command and Arguments
for a Container".
"""

from __future__ import annotations

import pytest

from testkit.expansion import CreateContainerConfigError, command_and_args, environment, expand

CONTEXT = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}

# (input, expected) with CONTEXT defined: expand_test.go's doExpansionTest
CASES = [
    ("$(VAR_A)", "A"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)-1", "A-1"),
    ("___$(VAR_B)___", "___B___"),
    ("___$(VAR_C)", "___C"),
    ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
    ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
    ("$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"),
    ("f000-$$VAR_A", "f000-$VAR_A"),
    ("foo\\$(VAR_C)bar", "foo\\Cbar"),
    ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
    ("foo\\\\\\\\$(VAR_A)bar", "foo\\\\\\\\Abar"),
    ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
    ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),
    ("$(VAR_REF)", "$(VAR_A)"),  # a value is never expanded twice
    ("%%$(VAR_REF)--$(VAR_REF)%%", "%%$(VAR_A)--$(VAR_A)%%"),
    ("foo$(VAR_EMPTY)bar", "foobar"),
    ("foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"),
    ("f00__(VAR_A)__", "f00__(VAR_A)__"),
    ("$?_boo_$!", "$?_boo_$!"),
    ("$VAR_A", "$VAR_A"),
    ("$(VAR_DNE)", "$(VAR_DNE)"),
    ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
    ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
    ("$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"),
    ("$$$$$$$(VAR_A)", "$$$A"),
    ("$VAR_A)", "$VAR_A)"),
    ("${VAR_A}", "${VAR_A}"),
    ("$(VAR_B)_______$(A", "B_______$(A"),
    ("$(VAR_C)_______$(", "C_______$("),
    ("$(VAR_A)foobarzab$", "Afoobarzab$"),
    ("foo-\\$(VAR_A", "foo-\\$(VAR_A"),
    ("--$($($($($--", "--$($($($($--"),
    ("$($($($($--foo$(", "$($($($($--foo$("),
    ("foo0--$($($($(", "foo0--$($($($("),
    ("$(foo$$var)", "$(foo$$var)"),
    ("\n", "\n"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_expansion_follows_kubernetes_own_cases(text: str, expected: str) -> None:
    assert expand(text, CONTEXT.get) == expected


def test_references_resolve_in_declaration_order() -> None:
    """expand_test.go's TestMapReference, and the documentation's dependent variables."""
    chained = {
        "env": [{"name": "FOO", "value": "bar"}, {"name": "ZOO", "value": "$(FOO)-1"}, {"name": "BLU", "value": "$(ZOO)-2"}]
    }
    assert environment(chained, {}) == {"FOO": "bar", "ZOO": "bar-1", "BLU": "bar-1-2"}

    docs = {
        "env": [
            {"name": "SERVICE_PORT", "value": "80"},
            {"name": "SERVICE_IP", "value": "172.17.0.1"},
            {"name": "UNCHANGED_REFERENCE", "value": "$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
            {"name": "PROTOCOL", "value": "https"},
            {"name": "SERVICE_ADDRESS", "value": "$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
            {"name": "ESCAPED_REFERENCE", "value": "$$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
        ]
    }
    env = environment(docs, {})
    assert env["UNCHANGED_REFERENCE"] == "$(PROTOCOL)://172.17.0.1:80"  # PROTOCOL is defined later
    assert env["SERVICE_ADDRESS"] == "https://172.17.0.1:80"
    assert env["ESCAPED_REFERENCE"] == "$(PROTOCOL)://172.17.0.1:80"


def test_command_and_args_expand_against_the_whole_environment() -> None:
    """The documentation's ``args: ["$(MESSAGE)"]``, and a reference to a variable defined after the one that uses it."""
    container = {
        "command": ["/bin/echo"],
        "args": ["$(MESSAGE)", "$(LATER)", "$$(MESSAGE)", "$(NOPE)"],
        "env": [{"name": "MESSAGE", "value": "hello world"}, {"name": "LATER", "value": "x"}],
    }
    assert command_and_args(container, environment(container, {})) == (
        ["/bin/echo"],
        ["hello world", "x", "$(MESSAGE)", "$(NOPE)"],
    )


def test_secrets_come_first_are_never_expanded_and_are_what_a_reference_reaches() -> None:
    secrets = {
        "vqa-s3": {"AWS_SECRET_ACCESS_KEY": "s3-secret", "LOOKS_LIKE": "$(AWS_SECRET_ACCESS_KEY)"},
        "vqa-vlm": {"api-key": "sk-1"},
    }
    container = {
        "envFrom": [
            {"secretRef": {"name": "vqa-s3"}},
            {"secretRef": {"name": "other"}, "prefix": "X_"},
            {"secretRef": {"name": "gone", "optional": True}},
        ],
        "env": [
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "literal wins"},
            {"name": "VQA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vqa-vlm", "key": "api-key"}}},
            {"name": "COPY", "value": "$(VQA_API_KEY)"},
            {"name": "SVC", "value": "$(VLLM_SERVICE_HOST)"},
        ],
        "args": ["--tag", "$(VQA_API_KEY)", "--tag", "$$(VQA_API_KEY)"],
    }
    env = environment(
        {**container, "envFrom": container["envFrom"][::2]},
        secrets,
        services={"VLLM_SERVICE_HOST": "10.0.0.7", "VLLM_PORT": "tcp://10.0.0.7:8000"},
    )
    assert env["LOOKS_LIKE"] == "$(AWS_SECRET_ACCESS_KEY)"  # a Secret's value is taken as it is
    assert env["AWS_SECRET_ACCESS_KEY"] == "literal wins" and env["COPY"] == "sk-1" and env["SVC"] == "10.0.0.7"
    assert env["VLLM_PORT"] == "tcp://10.0.0.7:8000"  # service links are added where nothing else defined the name
    assert command_and_args(container, env)[1] == ["--tag", "sk-1", "--tag", "$(VQA_API_KEY)"]
    with pytest.raises(CreateContainerConfigError, match='secret "other" not found'):
        environment(container, secrets)


def test_a_missing_secret_or_key_stops_the_container_with_the_kubelets_message() -> None:
    ref = {"name": "K", "valueFrom": {"secretKeyRef": {"name": "vqa-vlm", "key": "api-key"}}}
    with pytest.raises(CreateContainerConfigError, match='^secret "vqa-vlm" not found$'):
        environment({"env": [ref]}, {}, namespace="vqa")
    with pytest.raises(CreateContainerConfigError, match="^couldn't find key api-key in Secret vqa/vqa-vlm$"):
        environment({"env": [ref]}, {"vqa-vlm": {"other": "x"}}, namespace="vqa")
    optional = {"name": "K", "valueFrom": {"secretKeyRef": {"name": "vqa-vlm", "key": "api-key", "optional": True}}}
    assert environment({"env": [optional]}, {}) == {}
