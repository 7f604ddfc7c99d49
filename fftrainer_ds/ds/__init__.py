"""Everything that knows DeepSpeed's internals, and the only package that imports `deepspeed`.

adapter (engine construction and the few DeepSpeed attributes we read or write), state (a rank's
training state captured from an engine and applied back), data (the resumable data loader), sync
(keeping DeepSpeed's device-wide synchronizes off the snapshot stream). Supported: DeepSpeed 0.19.x.
Modules are imported on use: importing deepspeed costs seconds.
"""
