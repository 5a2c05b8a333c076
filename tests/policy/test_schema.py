from pathlib import Path

import pytest

from policy_server.errors import PolicyLoadError
from policy_server.policy.schema import FieldType, load_schema, parse_schema
from tests.policies import SHARED_MODELS

PARAMETERS = {"discrete": True, "tuple": False, "api_key": "k"}


def test_parses_fields_in_order_with_every_type() -> None:
    schema = parse_schema(
        {
            "observations": {
                "b": {"type": "int", "minimum": 0, "maximum": 9, "description": "count"},
                "a": {"type": "float"},
                "flag": {"type": "bool"},
                "xs": {"type": "List[int]", "max_items": 3},
                "ys": {"type": "List[float]", "min_items": 1, "max_items": 2},
                "zs": {"type": "List[bool]", "max_items": 4},
            },
            "parameters": PARAMETERS | {"url_path": "api/v1/"},
        }
    )
    assert [f.name for f in schema.observations] == ["b", "a", "flag", "xs", "ys", "zs"]
    assert schema.observations[3].type is FieldType.LIST_INT
    assert schema.observations[0].maximum == 9
    assert schema.width == 1 + 1 + 1 + 3 + 2 + 4
    assert schema.parameters.url_path == "/api/v1"
    assert schema.parameters.api_key == "k"


def test_list_without_max_items_has_no_fixed_width() -> None:
    schema = parse_schema({"observations": {"xs": {"type": "List[float]"}}, "parameters": {}})
    assert schema.width is None


def test_parameters_only_schema_has_no_observations() -> None:
    schema = parse_schema({"parameters": PARAMETERS})
    assert not schema.has_observations


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([1, 2], "must be a mapping"),
        ({"observations": {"a": {"type": "float"}}}, "'parameters' is missing"),
        (
            {"observations": {"a": {"type": "str"}}, "parameters": {}},
            "observations.a.type: unknown type 'str'; valid types are int, float, bool",
        ),
        ({"observations": {"a": {}}, "parameters": {}}, "observations.a: needs a 'type'"),
        ({"observations": {"a": {"type": "int", "max_items": 2}}, "parameters": {}}, "List"),
        ({"observations": {"a": {"type": "float", "colour": 1}}, "parameters": {}}, "colour"),
        ({"parameters": {"discrete": "yes"}}, "parameters.discrete must be true or false"),
        ({"parameters": {"gpu": True}}, "unknown key(s) ['gpu'] in 'parameters'"),
        ({"parameters": {"url_path": "../x"}}, "url_path"),
        (
            {
                "observations": {"a": {"type": "float", "minimum": 2, "maximum": 1}},
                "parameters": {},
            },
            "minimum (2.0) > maximum",
        ),
    ],
)
def test_refuses_bad_schema_naming_the_field(document: object, expected: str) -> None:
    with pytest.raises(PolicyLoadError) as error:
        parse_schema(document)
    assert expected in str(error.value)


def test_not_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text("observations: [unclosed")
    with pytest.raises(PolicyLoadError, match="not valid YAML"):
        load_schema(path)


@pytest.mark.parametrize("name", ["mouse_and_cheese", "simple_scheduling", "stock", "lpoc"])
def test_reads_every_shipped_schema(name: str) -> None:
    path = SHARED_MODELS / name / "schema.yaml"
    if not path.is_file():
        pytest.skip(f"needs the real Pathmind policies: {path} is absent")
    schema = load_schema(path)
    assert schema.parameters.api_key == "1234567asdfgh"


LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
parameters: {api_key: *h}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LAUGHS, "uses a YAML alias (*name) at line 2; write the values out"),
        (
            "parameters: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
            "uses a YAML tag that is not plain data",
        ),
        (
            "parameters: !!python/object/new:builtins.dict {}\n",
            "uses a YAML tag that is not plain data",
        ),
        ("parameters: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests too deeply"),
        ("parameters: {}\n" + "# padding\n" * 120_000, "larger than 1048576 bytes"),
        (b"parameters: {api_key: \xff\xfe}\n", "not UTF-8 text"),
    ],
    ids=["aliases", "object tag", "constructor tag", "deep nesting", "oversized", "not utf-8"],
)
def test_yaml_tricks_are_refused_naming_the_file(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    path = tmp_path / "schema.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(PolicyLoadError) as error:
        load_schema(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
    assert not Path("/tmp/pwned").exists()
