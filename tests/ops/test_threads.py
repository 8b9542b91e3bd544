"""The ops change no thread setting. ``torch.set_num_threads`` is not scoped: it sets the calling thread's
OpenMP count and also the count every thread that has not yet run a parallel op starts with, so an op that
lowered it for its duration left other threads (one starting meanwhile, or a second caller of the op) on one
thread for good. Two Python threads call the RoI ops (forward and backward) and NMS at once, while fresh
threads start and read their count: every thread must see the count the process was given."""

import threading

import torch

from fasterrcnn.ops import batched_nms, nms, roi_align, roi_pool


def test_ops_on_two_threads_leave_every_threads_count_as_the_process_set_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # more than one, or a lowered count could not be told from it
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 50, 64, generator=g)
        xy = torch.rand(200, 2, generator=g) * torch.tensor([240.0, 190.0])
        boxes = [torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 60 + 4], 1)]
        scores, groups = torch.rand(200, generator=g), torch.randint(0, 5, (200,), generator=g)
        counts_after, counts_fresh, errors = [], [], []

        def work():
            try:
                for _ in range(6):
                    xi = x.clone().requires_grad_()
                    loss = (
                        roi_align(xi, boxes, 7, 0.25, 2).sum()
                        + roi_align(xi, boxes, 7, 0.25, 0).sum()
                        + roi_pool(xi, boxes, 7, 0.25).sum()
                    )
                    loss.backward()
                    nms(boxes[0], scores, 0.5)
                    batched_nms(boxes[0], scores, groups, 0.5)
                counts_after.append(torch.get_num_threads())
            except Exception as e:  # a failure in a thread must fail the test
                errors.append(e)

        workers = [threading.Thread(target=work) for _ in range(2)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):  # threads starting while the ops run
            fresh = threading.Thread(target=lambda: counts_fresh.append(torch.get_num_threads()))
            fresh.start()
            fresh.join()
        for w in workers:
            w.join()
        assert not errors, errors
        late = threading.Thread(target=lambda: counts_fresh.append(torch.get_num_threads()))
        late.start()
        late.join()
        assert counts_after == [2, 2]
        assert len(counts_fresh) > 1 and set(counts_fresh) == {2}, sorted(set(counts_fresh))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
