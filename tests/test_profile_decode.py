"""scripts/profile_decode.py's grouping of a kernel's launches by their place in a layer (the profile runs on a GPU)."""
from scripts.profile_decode import launch_slots


def test_launch_slots_split_by_place_in_layer_and_head():
    # 2 steps of 3 layers with 4 launches each, then an LM head launch; times name their slot
    step = [10.0 * j for _ in range(3) for j in range(4)] + [99.0]
    slots = dict(launch_slots(step * 2, steps=2, n_layer=3))
    assert list(slots) == ["layer launch 0", "layer launch 1", "layer launch 2", "layer launch 3", "after the layers"]
    assert all(v == [10.0 * j] * 6 for j, v in enumerate(list(slots.values())[:4]))
    assert slots["after the layers"] == [99.0, 99.0]


def test_launch_slots_none_for_one_launch_per_layer_or_odd_counts():
    assert launch_slots([1.0] * 6, steps=2, n_layer=3) == []  # once per layer: nothing to split
    assert launch_slots([1.0] * 8, steps=1, n_layer=3) == []  # two per layer and two beyond: no single head
    assert launch_slots([1.0] * 9, steps=2, n_layer=2) == []  # steps of unequal counts
