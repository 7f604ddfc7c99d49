"""A DeepSpeedDataLoader that knows its position, so a restored run sees the same batches."""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

import torch
from deepspeed.runtime.dataloader import DeepSpeedDataLoader

# Batches kept for a survivor's rollback (at most the abandoned step plus one completed step).
REPLAY_BATCHES = 16


class ResumableDataLoader(DeepSpeedDataLoader):
    """Counts passes (`__iter__` calls) and batches served in the current pass.

    `load_state_dict` moves the position: back to a batch still held in memory (a survivor rolling
    back a step or two: the same batch objects are served again, nothing is re-read), or, for any
    other position (a new process), by re-creating the pass and skipping the batches already
    consumed. Worker processes then get a new base seed, so random augmentation inside dataset
    workers is not replayed. Exact for samplers that are deterministic given their state
    (DeepSpeed's default DistributedSampler, with or without `set_epoch`); a RandomSampler draws its
    permutation from the global RNG at the start of a pass and cannot be replayed mid-pass.
    """

    @classmethod
    def adopt(cls, loader):
        """Turn DeepSpeed's own loader object into a ResumableDataLoader in place."""
        if isinstance(loader, DeepSpeedDataLoader) and not isinstance(loader, cls):
            loader.__class__ = cls
            loader._reset_position(passes=0)
        return loader

    def _reset_position(self, passes: int, consumed: int = 0) -> None:
        self.passes, self.consumed = passes, consumed
        self._live = consumed  # batches drawn from the underlying iterator in this pass
        self._recent: Deque[Tuple[int, Any]] = deque(maxlen=REPLAY_BATCHES)  # (index, batch)
        self._resume: Optional[Dict[str, Any]] = None

    def __iter__(self):
        if self._resume is not None:
            self._reposition()
            return self
        super().__iter__()
        self._reset_position(passes=self.passes + 1)
        return self

    def __next__(self):
        if self._resume is not None:
            self._reposition()
        if self.data is None and not self.curriculum_learning_enabled:
            self.__iter__()
        if self.consumed < self._live:  # replaying after a rollback
            batch = next(b for i, b in self._recent if i == self.consumed)
        else:
            batch = super().__next__()
            self._recent.append((self._live, batch))
            self._live += 1
        self.consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"passes": self.passes, "consumed": self.consumed,
                "sampler_epoch": getattr(self.data_sampler, "epoch", None)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        held = {i for i, _ in self._recent}
        same_pass = state["passes"] == self.passes and self.data is not None
        if same_pass and all(i in held for i in range(state["consumed"], self._live)) \
                and state["consumed"] <= self._live:
            self.consumed = state["consumed"]  # replay from memory: no new iterator, no RNG draw
        else:
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
        # Skipping draws the skipped batches from the loader; cheap next to a training step.
        for _ in range(state["consumed"]):
            super().__next__()
        self._reset_position(passes=max(state["passes"], 1), consumed=state["consumed"])
        torch.set_rng_state(rng)
