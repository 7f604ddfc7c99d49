"""A DeepSpeedDataLoader that knows its position, so a restored run sees the same batches."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from deepspeed.runtime.dataloader import DeepSpeedDataLoader


class ResumableDataLoader(DeepSpeedDataLoader):
    """Counts passes (`__iter__` calls) and batches served in the current pass.

    On `load_state_dict` the next batch request re-creates the pass and skips the batches already
    consumed. Worker processes get a different base seed than in the original pass, so random
    augmentation inside dataset workers is not replayed. Exact for samplers that are deterministic given their state (DeepSpeed's default
    DistributedSampler, with or without `set_epoch`); a RandomSampler draws its permutation from
    the global RNG at the start of a pass and cannot be replayed mid-pass.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = 0
        self.consumed = 0
        self._resume: Optional[Dict[str, Any]] = None

    @classmethod
    def adopt(cls, loader):
        """Turn DeepSpeed's own loader object into a ResumableDataLoader in place."""
        if isinstance(loader, DeepSpeedDataLoader) and not isinstance(loader, cls):
            loader.__class__ = cls
            loader.passes, loader.consumed, loader._resume = 0, 0, None
        return loader

    def __iter__(self):
        if self._resume is not None:
            self._reposition()
            return self
        super().__iter__()
        self.passes += 1
        self.consumed = 0
        return self

    def __next__(self):
        if self._resume is not None:
            self._reposition()
        if self.data is None and not self.curriculum_learning_enabled:
            self.__iter__()
        batch = super().__next__()
        self.consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"passes": self.passes, "consumed": self.consumed,
                "sampler_epoch": getattr(self.data_sampler, "epoch", None)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resume = dict(state)

    def _reposition(self) -> None:
        state, self._resume = self._resume, None
        if state["sampler_epoch"] is not None and hasattr(self.data_sampler, "set_epoch"):
            self.data_sampler.set_epoch(state["sampler_epoch"])
        # Creating a DataLoader iterator draws a worker base seed from the global torch RNG. The
        # original run drew it at the start of the pass, before the snapshot; drawing it again
        # here would shift every later dropout mask, so the restored RNG state is put back.
        rng = torch.get_rng_state()
        super().__iter__()
        self.passes = max(state["passes"], 1)
        # Skipping draws the skipped batches from the loader; cheap next to a training step.
        for _ in range(state["consumed"]):
            super().__next__()
        self.consumed = state["consumed"]
        torch.set_rng_state(rng)
