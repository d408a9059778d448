"""model_parallel_mesh: the ("dp", model-parallel) mesh DPTPTrainer and DPPPTrainer lay their ranks on."""

from __future__ import annotations

import pytest

from dcp_forge._torch_compat import simulated_device_mesh
from dcp_forge.trainers.data_parallel import model_parallel_mesh


def test_without_a_mesh_the_model_parallel_size_is_needed():
    with pytest.raises(ValueError, match=r"DPTPTrainer needs tensor_parallel_size or a \('dp', 'tp'\) mesh"):
        model_parallel_mesh(None, None, ("dp", "tp"), owner="DPTPTrainer", size_name="tensor_parallel_size")


def test_a_given_mesh_must_have_the_two_named_dimensions():
    mesh = simulated_device_mesh((2, 2), 0)
    with pytest.raises(ValueError, match=r"DPPPTrainer needs a 2-D mesh named \('dp', 'pp'\) \(got None\)"):
        model_parallel_mesh(mesh, 2, ("dp", "pp"), owner="DPPPTrainer",
                            size_name="TrainingArguments.pipeline_parallel_size")
