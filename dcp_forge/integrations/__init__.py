"""Adapters that give training loops users already run dcp_forge's checkpoints.

Each adapter translates a framework's checkpoint calls into ``CheckpointCoordinator`` calls, and is
imported on its own so that only the framework in use needs to be installed (docs/INTEGRATIONS.md):

- ``dcp_forge.integrations.lightning``: PyTorch Lightning (``ForgeCheckpointIO`` + a strategy hook);
- ``dcp_forge.integrations.hf``: Hugging Face ``transformers.Trainer`` (``ForgeTrainerMixin``);
- ``dcp_forge.integrations.legacy``: objects with the legacy ``get_statefuls_for_save()`` /
  ``get_statefuls_for_load()`` provider API.

Loops written directly against DCP (torchtitan's pattern) need no adapter: they pass
``dcp_forge.planners.ForgeSavePlanner`` and ``dcp_forge.storage.open_writer`` to ``dcp.save``.
"""
