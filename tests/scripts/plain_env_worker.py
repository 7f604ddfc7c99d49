"""A worker that knows nothing of fftrainer_ds: env:// init, one all-reduce, exit 0."""
import argparse
import json
import os

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()
dist.init_process_group("gloo")
t = torch.full((1,), float(dist.get_rank() + 1))
dist.all_reduce(t)
with open(os.path.join(args.out, f"rank{dist.get_rank()}.jsonl"), "w") as f:
    f.write(json.dumps({"ev": "plain", "value": t.item()}) + "\n")
dist.destroy_process_group()
