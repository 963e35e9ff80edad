"""The private torch internals batchfit relies on (batchfit/internals.py): each torch CI runs has them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_every_private_internal_is_where_batchfit_expects_it():
    from batchfit import internals

    internals.check()


def test_local_shard_and_fsdp_modules_on_plain_tensors_and_modules():
    from batchfit.internals import fsdp_modules, local_shard

    tensor = torch.ones(3)
    assert local_shard(tensor) is tensor
    assert fsdp_modules(torch.nn.Linear(2, 2)) == []


def test_resizes_are_followed_only_while_inside():
    from batchfit.internals import resizes_followed

    seen: list[int] = []
    storage = torch.ones(4).untyped_storage()
    with resizes_followed(lambda s: seen.append(s.nbytes())):
        storage.resize_(0)
    storage.resize_(8)
    assert seen == [0]
