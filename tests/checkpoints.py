"""Test-side view of a Ray Train run's checkpoints."""
from __future__ import annotations

from deepfake_ray import storage


def registered(run_uri: str, name: str) -> bool:
    """Ray Train lists a checkpoint in its run snapshot once the controller has it."""
    try:
        return name in storage.read_text(storage.join(run_uri, "checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return False
