"""tests/conftest.py: on a GPU machine the GPU-only matrix runs first (device time is short there)."""
import conftest


class _Item:
    def __init__(self, name, gpu):
        self.name, self.gpu = name, gpu

    def get_closest_marker(self, name):
        return object() if name == "gpu" and self.gpu else None


def test_gpu_tests_first_each_group_in_collected_order():
    items = [_Item("a", False), _Item("b", True), _Item("c", False), _Item("d", True)]
    assert [item.name for item in conftest.gpu_first(items)] == ["b", "d", "a", "c"]


def test_markers_registered(pytestconfig):
    names = [line.split(":")[0] for line in pytestconfig.getini("markers")]
    assert "slow" in names and "gpu" in names
