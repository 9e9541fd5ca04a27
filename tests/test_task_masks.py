"""The keys a toy task's batch marks for its detectors, checked by hand."""

import torch

from data.tasks import make_task


def test_ioi_marks_the_indirect_object_once_and_the_subject_twice():
    batch = make_task("ioi").batch(64, seed=3)
    ids, io, s = batch["input_ids"], batch["io_mask"], batch["s_mask"]
    answer = batch["targets"][:, -1]
    assert (io.sum(1) == 1).all() and (s.sum(1) == 2).all() and not (io & s).any()
    assert torch.equal(ids[io], answer)  # the marked IO token is the answer
    subject = ids[s].view(-1, 2)
    assert (subject[:, 0] == subject[:, 1]).all() and (subject[:, 0] != answer).all()
    assert not io[:, -1].any() and not s[:, -1].any()  # the final position is END, never a name
