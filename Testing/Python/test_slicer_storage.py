"""NRRD through MRML's own storage nodes: what Slicer saves from our nodes the engine reads back
unchanged, and what the engine writes Slicer reads into the geometry our bridge gives it."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_CT

from XctDiffCore.volume import Volume


def oblique_volume() -> Volume:
    a = np.deg2rad(20.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    array = np.random.default_rng(1).integers(-1024, 2000, size=(6, 7, 8)).astype(np.int16)
    return Volume(array, (0.8, 1.2, 2.5), (-40.0, 12.5, 100.0), direction)


def save_with_mrml(slicer, scene, node, path) -> None:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    assert storage.WriteData(node), f"MRML could not write {path}"


def read_with_mrml(slicer, scene, path):
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert storage.ReadData(node), f"MRML could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


@pytest.mark.parametrize("which", ["sample_ct", "oblique"])
def test_node_saved_by_mrml_reads_back_as_the_same_volume(slicer, bridge, scene, tmp_path, which):
    from XctDiffCore.io import read_ct

    volume = read_ct(SAMPLE_CT) if which == "sample_ct" else oblique_volume()
    node = bridge.volume_to_node(scene, volume)
    save_with_mrml(slicer, scene, node, tmp_path / "saved.nrrd")
    back = read_ct(tmp_path / "saved.nrrd")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)


def test_engine_file_read_by_mrml_matches_the_bridge(slicer, bridge, scene, tmp_path):
    from XctDiffCore.io import write_volume

    volume = oblique_volume()
    write_volume(volume, tmp_path / "engine.nrrd")
    by_mrml = read_with_mrml(slicer, scene, tmp_path / "engine.nrrd")
    by_bridge = bridge.read_volume_file(scene, tmp_path / "engine.nrrd")
    np.testing.assert_allclose(bridge.ijk_to_ras(by_mrml), volume.ijk_to_ras(), atol=1e-6)
    np.testing.assert_allclose(bridge.ijk_to_ras(by_bridge), bridge.ijk_to_ras(by_mrml), atol=1e-6)
    np.testing.assert_array_equal(bridge.node_array(by_mrml), volume.array)
    np.testing.assert_array_equal(bridge.node_array(by_bridge), volume.array)


def test_single_slice_radiograph_node_saved_by_slicer_reads_as_radiograph(slicer, bridge, scene, tmp_path):
    """A radiograph node saved from Slicer (a single-slice 3D NRRD) is a valid engine input, upright."""
    from XctDiffCore.io import read_radiograph

    image = (np.arange(48)[:, None] * 100 + np.arange(40)[None, :]).astype(np.float32)
    node = bridge.radiograph_to_node(scene, image, spacing=(0.4, 0.2))
    save_with_mrml(slicer, scene, node, tmp_path / "film.nrrd")
    radiograph = read_radiograph(tmp_path / "film.nrrd")
    np.testing.assert_array_equal(radiograph.image, image)
    np.testing.assert_allclose(radiograph.spacing, (0.4, 0.2), rtol=1e-6)
