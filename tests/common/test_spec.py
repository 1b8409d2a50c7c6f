"""JobSpec validation: every bad field is refused with a message naming it."""

import pytest

from common.spec import JobSpec, SpecError

GOOD = {
    "name": "tiny",
    "steps": 10,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "parallelism": {"dp": 2, "pp": 2, "zero_stage": 1},
    "resources": {"workers": 4},
}


def test_good_spec_round_trips():
    spec = JobSpec.from_dict(GOOD)
    assert spec.parallelism.dp == 2 and spec.model.layers == 4
    assert JobSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"steps": 0}, "steps"),
        ({"global_batch_size": -1}, "global_batch_size"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"parallelism": {"dp": 3, "pp": 2}}, "parallelism"),
        ({"parallelism": {"dp": 1, "pp": 8}, "resources": {"workers": 8}}, "parallelism.pp"),
        ({"parallelism": {"dp": 2, "pp": 2, "zero_stage": 3}}, "parallelism.zero_stage"),
        ({"global_batch_size": 1, "micro_batch_size": 1}, "global_batch_size"),
        ({"micro_batch_size": 5}, "micro_batch_size"),
        ({"model": {"flash": True}}, "model.flash"),
        ({"model": {"arch": "mamba"}}, "model.arch"),
        ({"model": {"heads": 3}}, "model.heads"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"name": "x" * 300}, "name"),
        ({"name": "Bad Name"}, "name"),
        ({"data": {"kind": "tokens"}}, "data.path"),
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"elastic": {"snapshot_every": "often"}}, "elastic.snapshot_every"),
        ({"resources": {"workers": 4, "device": "tpu"}}, "resources.device"),
        ({"bogus": 1}, "bogus"),
        ({"steps": "ten"}, "steps"),
    ],
)
def test_bad_field_is_named(patch, field):
    data = {**GOOD, **patch}
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict(data)
    assert str(err.value).startswith(field + ":"), str(err.value)
