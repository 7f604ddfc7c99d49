import torch
import torch.distributed as dist

from fftrainer_ds.testing import worker_init_process_group


def allreduce_rank():
    worker_init_process_group()
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()
