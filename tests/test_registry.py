"""One lookup for every registry: an unknown name is the same ValueError everywhere."""

import pytest

from pyrovae.registry import lookup


def test_lookup_returns_the_entry_of_a_mapping_and_the_name_of_a_sequence():
    assert lookup("prior", "b", {"a": 1, "b": 2}) == 2
    assert lookup("encoder", "top-down", ("top-down", "bottom-up")) == "top-down"


def test_an_unknown_name_says_what_it_is_for_and_lists_the_choices():
    with pytest.raises(ValueError, match=r"^unknown prior 'c'; expected one of a, b$"):
        lookup("prior", "c", {"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"^unknown guide 'c'; expected one of a or an nn.Module$"):
        lookup("guide", "c", {"a": 1}, "an nn.Module")
    with pytest.raises(ValueError, match=r"^unknown net 'c' \(denoiser\); expected one of mlp, unet$"):
        lookup("net", "c", ("mlp", "unet"), note="denoiser")


def test_no_module_writes_the_message_by_hand_but_the_lookup():
    """Every "expected one of" of the package is the lookup's."""
    import pathlib

    import pyrovae

    root = pathlib.Path(pyrovae.__file__).parent
    written = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "expected one of" in path.read_text() and path.name != "registry.py"
    ]
    assert written == []
