import pytest

from labelassist.labels import LabelSet, load_label_file, parse_label_text
from labelassist.errors import ConfigError


def test_members_and_templates_are_parsed_in_order():
    labels = parse_label_text('templates = ["a photo of a {}.", "a {} in the wild"]\n'
                              '[classes]\ncat = ["cat"]\nwild = ["lion", "tiger"]\n')
    assert labels.class_names == ["cat", "wild"]
    assert labels.descriptions() == [("cat", "cat"), ("wild", "lion"), ("wild", "tiger")]
    assert labels.prompts_for("lion") == ["a photo of a lion.", "a lion in the wild"]


def test_default_template_and_plain_descriptions():
    assert parse_label_text('[classes]\na = ["x"]\nb = ["y"]').templates == ("a photo of a {}.",)
    plain = parse_label_text('templates = ["{}"]\n[classes]\na = ["a red {curly} thing"]\n'
                             'b = ["blue"]')
    assert plain.prompts_for("a red {curly} thing") == ["a red {curly} thing"]


@pytest.mark.parametrize("text, message", [
    ("[classes]\n", "no classes"),
    ("model = 'x'\n", "no classes"),
    ('[classes]\ncat = []\n', "line 2: class 'cat' has no description"),
    ('[classes]\ncat = ["cat"]\ndog = [""]\n', "line 3: class 'dog' has an empty"),
    ('templates = ["a photo of a"]\n[classes]\ncat = ["cat"]\n', "line 1: template 'a photo"),
    ('[classes]\ncat = ["cat"]\ncat = ["kitten"]\n', "line 3"),
    ('[classes]\ncat = ["cat"]\nCat = ["kitten"]\n', "line 3: class 'Cat' duplicates class"),
    ('[classes]\ncat = ["cat", "lynx"]\nwild = ["lion", "lynx"]\n',
     "line 3: description 'lynx' is used by both 'cat' and 'wild'"),
    ('colour = 1\n[classes]\ncat = ["cat"]\n', "line 1: unknown key 'colour'"),
])
def test_bad_label_files_name_the_offending_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_label_text(text, source="labels.toml")


def test_missing_label_file_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--labels"):
        load_label_file(tmp_path / "nope.toml")


def test_fingerprint_changes_with_prompts_not_with_formatting():
    a = parse_label_text('[classes]\ncat = ["cat"]\ndog = ["dog"]')
    b = parse_label_text('# comment\n[classes]\ncat   = ["cat"]\n\ndog = [ "dog" ]')
    c = parse_label_text('[classes]\ncat = ["cat", "kitten"]\ndog = ["dog"]')
    assert a.fingerprint("m", "r") == b.fingerprint("m", "r")
    assert a.fingerprint("m", "r") != c.fingerprint("m", "r")
    assert a.fingerprint("m", "r") != a.fingerprint("m", "r2")
    assert LabelSet.from_json(c.to_json()) == c


def test_example_label_file_describes_wild_by_its_members():
    labels = load_label_file("examples/animals/labels.toml")
    assert labels.classes["wild"] == ("lion", "tiger", "wolf", "fox")


@pytest.mark.parametrize("text, line", [('[classes]\ncat = ["cat", "kitten"]\n', 2),
                                        ('templates = ["{}"]\n[classes]\nonly = "x"\n', 3)])
def test_a_label_file_with_one_class_is_refused_saying_why_and_what_to_do(tmp_path, text,
                                                                          line):
    """Before: accepted, and every image got confidence 1.0 (a softmax over one class)."""
    path = tmp_path / "labels.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as refused:
        load_label_file(path)

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, line {line}: only one class")
    assert "always 1.0" in message and '"other"' in message
