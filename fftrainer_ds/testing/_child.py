"""Entry point of a run_ranks child: import the target, call it, pickle its result."""
import importlib
import os
import pickle
import sys


def main() -> None:
    target, tmp = sys.argv[1], sys.argv[2]
    module, func = target.split(":")
    with open(os.path.join(tmp, "kwargs.pkl"), "rb") as f:
        kwargs = pickle.load(f)
    value = getattr(importlib.import_module(module), func)(**kwargs)
    rank = os.environ["RANK"]
    with open(os.path.join(tmp, f"result{rank}.pkl.tmp"), "wb") as f:
        pickle.dump(value, f)
    os.replace(os.path.join(tmp, f"result{rank}.pkl.tmp"), os.path.join(tmp, f"result{rank}.pkl"))


if __name__ == "__main__":
    main()
