"""The MRML bridge on the real ``slicer-core`` wheel: volume nodes with the right geometry, radiograph
nodes read in display orientation, and the sample CT lying anatomically right in RAS."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_CT, SAMPLE_RADIOGRAPH

from XctDiffCore.errors import XctDiffError
from XctDiffCore.volume import Volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return r


# --- CT volumes ---------------------------------------------------------------------------------


def test_canonical_ct_node_points_left_posterior_superior(bridge, scene):
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (2.5, 2.5, 2.5), (10.0, -20.0, 30.0))
    node = bridge.volume_to_node(scene, volume, name="ct")
    m = bridge.ijk_to_ras(node)
    np.testing.assert_allclose(m, volume.ijk_to_ras())
    # LPS identity in RAS: i to the patient's left (-R), j to the posterior (-A), k to the head (+S).
    np.testing.assert_allclose(m[:3, :3], np.diag([-2.5, -2.5, 2.5]))
    np.testing.assert_allclose(m[:3, 3], [-10.0, 20.0, 30.0])
    assert node.GetImageData().GetDimensions() == (6, 5, 4)
    np.testing.assert_array_equal(bridge.node_array(node), volume.array)
    assert node.GetName() == "ct" and node.GetDisplayNode() is not None


def test_oblique_volume_round_trips_through_a_node(bridge, scene):
    direction = rotation(2, 30) @ rotation(0, -15)
    volume = Volume(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32), (0.7, 1.1, 2.0), (5, 6, 7), direction)
    back = bridge.node_to_volume(bridge.volume_to_node(scene, volume))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-12)


def test_volume_into_an_existing_node_replaces_voxels_and_geometry(bridge, scene):
    node = bridge.volume_to_node(scene, Volume(np.zeros((2, 2, 2), np.float32)))
    same = bridge.volume_to_node(scene, Volume(np.ones((3, 4, 5), np.float32), (2.5, 2.5, 2.5)), node)
    assert same is node and node.GetImageData().GetDimensions() == (5, 4, 3)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_sample_ct_lies_anatomically_right_in_ras(bridge, scene):
    """Anterior, left and superior where they belong, judged by anatomy rather than by our own matrices."""
    from XctDiffCore.io import read_ct

    node = bridge.volume_to_node(scene, read_ct(SAMPLE_CT))
    hu = bridge.node_array(node).astype(np.float32)
    k, j, i = np.indices(hu.shape)
    ras = (bridge.ijk_to_ras(node) @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3]
    r, a, s = (axis.reshape(hu.shape) for axis in ras)
    body, bone = hu > -300, hu > 300
    lung = (hu > -950) & (hu < -600)
    soft = (hu > 0) & (hu < 100)
    midline = np.abs(r - r[body].mean()) < 15
    spine_r = r[bone & midline].mean()
    # The spine is posterior to the body's centre (RAS A smaller).
    assert a[bone & midline].mean() < a[body].mean() - 5
    # The lungs lie above the abdomen's soft tissue (RAS S larger).
    assert s[lung].mean() > s[soft].mean() + 20
    # The heart takes room from the left lung: the right lung (RAS R larger than the spine's) is bigger.
    assert (lung & (r > spine_r)).sum() > 1.03 * (lung & (r < spine_r)).sum()


def test_a_film_too_large_is_refused_before_its_voxels_are_copied(bridge, scene, monkeypatch):
    """A 12000 x 12000 node was copied out (0.5 GiB, 1.4 s on the GUI's thread) and written for the engine, which then
    refused it; the node's dimensions alone say so."""
    film = bridge.radiograph_to_node(scene, np.zeros((40, 40), np.float32), name="huge")
    film.GetImageData().SetDimensions(10_001, 40, 1)  # as its header would say; no voxels needed to refuse it
    copied = []
    monkeypatch.setattr(bridge, "node_array", lambda *a, **k: copied.append(1))
    with pytest.raises(XctDiffError, match=r"^radiograph 'huge' is 10001x40 pixels, larger than the maximum 10000"):
        bridge.radiograph_from_node(film)
    assert not copied


def test_a_synthetic_ct_is_refused_for_the_ap_diameter(bridge, scene, tmp_path):
    """"AP diameter from CT" took a CT XctDiff had reconstructed as readily as a scan: its depth is the model's own
    guess, so the patient's would never reach the model. A node the reconstruction marked, or one read from a file
    whose header says XctDiff made it, is refused in one sentence; the same CT as a plain scan file is measured."""
    from XctDiffCore.io import read_ct, write_volume

    ct = read_ct(SAMPLE_CT)
    marked = bridge.volume_to_node(scene, ct, name="RG1 synthetic CT (XctDiff)")
    marked.SetAttribute(bridge.ATTRIBUTE_SYNTHETIC, "1")
    with pytest.raises(XctDiffError, match=r"^RG1 synthetic CT \(XctDiff\) is a CT XctDiff reconstructed, not a scan: "
                                           r"its AP diameter is the model's guess"):
        bridge.ap_diameter_of_node(marked)
    for notes, refused in (({"note": "synthetic CT reconstructed by XctDiff"}, True), (None, False)):
        path = write_volume(ct, tmp_path / f"ct_{refused}.nrrd", notes=notes)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.stem)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        node.SetAndObserveStorageNodeID(storage.GetID())
        if refused:
            with pytest.raises(XctDiffError, match="is a CT XctDiff reconstructed, not a scan"):
                bridge.ap_diameter_of_node(node)
        else:
            assert bridge.ap_diameter_of_node(node) == 232.0


def test_an_earlier_ct_node_gives_the_ap_diameter_or_one_sentence(bridge, scene):
    """The panel's "AP diameter from CT": the sample CT's node measures as `xctdiff inspect` does (232 mm); air,
    a body too thin to be a chest, or the radiograph itself, is one sentence naming the node."""
    from XctDiffCore.io import read_ct

    assert bridge.ap_diameter_of_node(bridge.volume_to_node(scene, read_ct(SAMPLE_CT), name="earlier CT")) == 232.0
    with pytest.raises(XctDiffError, match="no body found"):
        bridge.ap_diameter_of_node(bridge.volume_to_node(scene, Volume(np.full((40, 40, 40), -1000, np.int16), (2.5,) * 3)))
    tube = np.full((60, 60, 60), -1000, np.int16)
    tube[:, 25:35, 10:50] = 40  # 25 mm front to back
    with pytest.raises(XctDiffError, match="^tube: the AP diameter measures 25 mm, outside a chest's 100-300 mm$"):
        bridge.ap_diameter_of_node(bridge.volume_to_node(scene, Volume(tube, (2.5,) * 3), name="tube"))
    with pytest.raises(XctDiffError, match="choose a CT"):
        bridge.ap_diameter_of_node(None)
    film = bridge.load_radiograph(scene, SAMPLE_RADIOGRAPH)
    with pytest.raises(XctDiffError, match="a single-slice image .* not a CT volume"):
        bridge.ap_diameter_of_node(film)
    for wrong in ("CT", scene.AddNewNodeByClass("vtkMRMLModelNode", "model")):  # a name typed, a model: AttributeError
        with pytest.raises(XctDiffError, match="choose a CT volume to measure the AP diameter on"):
            bridge.ap_diameter_of_node(wrong)


def test_load_radiograph_without_a_path_is_one_sentence(bridge, scene):
    with pytest.raises(XctDiffError, match="load_radiograph takes a film file's path, got None"):
        bridge.load_radiograph(scene, None)  # was a TypeError from deep in the reader
    assert scene.GetNumberOfNodes() == 0


# --- radiographs ----------------------------------------------------------------------------------


def display_image(rows: int = 40, cols: int = 30) -> np.ndarray:
    """An image whose every pixel tells its place: no flip or transpose goes unnoticed."""
    return (np.arange(rows)[:, None] * 1000 + np.arange(cols)[None, :]).astype(np.float32)


def test_screen_table_matches_slicer_slice_presets(slicer, bridge, scene):
    """The display rule uses Slicer's own default views: check the table against the real presets."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    for orientation, normal_axis in (("Sagittal", 0), ("Coronal", 1), ("Axial", 2)):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # made from the scene's default: has the presets
        assert node.SetOrientation(orientation)
        slice_to_ras = bridge.matrix_to_numpy(node.GetSliceToRAS())
        right, down = bridge.SCREEN_RIGHT_DOWN[normal_axis]
        np.testing.assert_allclose(slice_to_ras[:3, 0], right, atol=1e-12)
        np.testing.assert_allclose(-slice_to_ras[:3, 1], down, atol=1e-12)


def test_radiograph_node_round_trip_shows_upright_in_the_coronal_plane(bridge, scene):
    image = display_image()
    node = bridge.radiograph_to_node(scene, image, spacing=(0.5, 0.25), name="film")
    m = bridge.ijk_to_ras(node)
    np.testing.assert_allclose(m[:3, 0], [-0.25, 0, 0])  # columns towards the patient's left
    np.testing.assert_allclose(m[:3, 1], [0, 0, -0.5])  # rows towards the feet
    np.testing.assert_allclose(m @ [14.5, 19.5, 0, 1], [0, 0, 0, 1])  # centred on the origin
    back, spacing = bridge.radiograph_from_node(node)
    np.testing.assert_array_equal(back, image)
    assert spacing == (0.5, 0.25)


@pytest.mark.parametrize(
    "case",
    ["png_as_loaded_by_slicer", "coronal_mirrored", "coronal_transposed", "sagittal", "axial_flipped_rows"],
)
def test_radiograph_read_from_any_single_slice_geometry(bridge, scene, case):
    """The same displayed image stored five ways; each must come back as the displayed image."""
    image = display_image()  # [row, col] as it must be displayed
    m = np.eye(4)
    if case == "png_as_loaded_by_slicer":  # ITK: LPS identity, so i -> -R (screen right), j -> -A (screen down)
        m[:3, :3] = np.diag([-1.0, -1.0, 1.0])
        voxels = image
    elif case == "coronal_mirrored":  # i runs to the patient's right: the columns are stored reversed
        m[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
        voxels = image[:, ::-1]
    elif case == "coronal_transposed":  # i runs down the film, j across it
        m[:3, :3] = [[0, -1, 0], [0, 0, 1], [-1, 0, 0]]
        voxels = image.T
    elif case == "sagittal":  # screen right is posterior, down is inferior
        m[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
        voxels = image
    else:  # axial with j towards anterior: rows stored bottom-up
        m[:3, :3] = [[-1, 0, 0], [0, 1, 0], [0, 0, 1]]
        voxels = image[::-1, :]
    m[:3, :3] = m[:3, :3] @ np.diag([0.3, 0.6, 1.0])  # spacing of i and j
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case)
    bridge._set_node_voxels(node, np.ascontiguousarray(voxels)[np.newaxis], m)
    back, spacing = bridge.radiograph_from_node(node)
    np.testing.assert_array_equal(back, image)
    expected = (0.3, 0.6) if case == "coronal_transposed" else (0.6, 0.3)
    np.testing.assert_allclose(spacing, expected)


def test_a_3d_volume_is_not_a_radiograph(bridge, scene):
    node = bridge.volume_to_node(scene, Volume(np.zeros((3, 4, 5), np.float32)), name="ct")
    with pytest.raises(XctDiffError, match="single-slice"):
        bridge.radiograph_from_node(node)


def test_png_loaded_in_slicer_convention_reads_as_its_pixels(slicer, bridge, scene, tmp_path):
    """Slicer loads a PNG with ITK's LPS identity; a single-slice NRRD with that geometry, read by
    MRML's own storage node, must come back as the PNG's rows and columns."""
    import SimpleITK as sitk
    from PIL import Image

    pixels = np.asarray(Image.open(SAMPLE_RADIOGRAPH).convert("L"), dtype=np.float32)[::8, ::8]
    itk = sitk.GetImageFromArray(pixels[np.newaxis])  # as ITK's PNG reader: origin 0, spacing 1, identity
    sitk.WriteImage(itk, str(tmp_path / "png_like.nrrd"))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "png_like.nrrd"))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert storage.ReadData(node)
    np.testing.assert_allclose(bridge.ijk_to_ras(node)[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    back, _ = bridge.radiograph_from_node(node)
    np.testing.assert_array_equal(back, pixels)


@pytest.mark.parametrize("file_name, known", [("film.jpg", False), ("FILM.TIFF", False), ("film.png", False),
                                              ("film.nrrd", True), ("film.dcm", True)])
def test_a_film_slicer_read_from_a_picture_file_has_no_known_spacing(slicer, bridge, scene, file_name, known):
    """Slicer gives a JPEG or TIFF it reads ITK's spacing, the file's print resolution (96 dpi: 0.26 mm, a 1024-pixel
    chest 271 mm: "smaller than an adult chest film, a child's film"), and a PNG 1 mm; the engine reads no spacing
    from such a file, so the panel sends none either. A NRRD or DICOM node's spacing is the film's."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dropped film")
    bridge._set_node_voxels(node, display_image(64, 48)[np.newaxis], np.diag([-0.2646, -0.2646, 1.0, 1.0]))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(f"/films/{file_name}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    _, spacing = bridge.radiograph_from_node(node)
    assert spacing == ((0.2646, 0.2646) if known else None)


def test_radiograph_file_for_the_engine_reads_back_unchanged(bridge, scene, tmp_path):
    from XctDiffCore.io import read_radiograph

    image = display_image(64, 48)
    node = bridge.radiograph_to_node(scene, image, spacing=(0.7, 0.35), is_drr=True)
    radiograph = read_radiograph(bridge.write_radiograph_file(node, tmp_path / "in.nrrd"))
    np.testing.assert_array_equal(radiograph.image, image)
    np.testing.assert_allclose(radiograph.spacing, (0.7, 0.35))
    assert radiograph.is_drr
    film = bridge.radiograph_to_node(scene, image, spacing=(0.7, 0.35))
    assert not read_radiograph(bridge.write_radiograph_file(film, tmp_path / "film.nrrd")).is_drr


def test_load_radiograph_from_file_keeps_display_orientation(bridge, scene):
    from XctDiffCore.io import read_radiograph

    node = bridge.load_radiograph(scene, SAMPLE_RADIOGRAPH)
    image, spacing = bridge.radiograph_from_node(node)
    np.testing.assert_array_equal(image, read_radiograph(SAMPLE_RADIOGRAPH).image)
    assert spacing is None  # the sample records PixelSpacing 0\0: no spacing
    assert node.GetAttribute(bridge.ATTRIBUTE_SPACING_KNOWN) == "0"
    assert node.GetName() == "RG1_UNCR_chest_PA"


def test_unreadable_radiograph_file_is_one_sentence(bridge, scene, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(XctDiffError, match="broken.png"):
        bridge.load_radiograph(scene, bad)


def test_a_colour_film_node_is_read_grey(slicer, bridge, scene):
    """A colour JPEG dropped into Slicer is a vector volume: read grey, as the engine reads the file."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData

    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8)
    image = vtkImageData()
    image.SetDimensions(30, 40, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour film")
    node.SetAndObserveImageData(image)
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(bridge.node_array(node, grey=True)[0], grey, rtol=1e-6)
    with pytest.raises(XctDiffError, match="not a scalar"):
        bridge.node_array(node)


def test_the_first_node_offered_is_a_film(slicer, bridge, scene):
    assert bridge.first_film_node(scene) is None
    ct = bridge.volume_to_node(scene, Volume(np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 1.0)), name="CT")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert bridge.first_film_node(scene) is ct  # no film: the plain volume (the click says it is no film)
    film = bridge.radiograph_to_node(scene, display_image(), (0.5, 0.5), name="film")
    assert bridge.first_film_node(scene) is film


def test_an_edited_copy_of_a_loaded_film_is_sent_as_shown(bridge, scene, tmp_path):
    """A node carries "Load radiograph"'s record of its file into a copy; edited voxels are sent, not the file."""
    from XctDiffCore.io import write_image_png
    from vtkmodules.util.numpy_support import vtk_to_numpy

    path = write_image_png(display_image(64, 48) / display_image(64, 48).max(), tmp_path / "film.png")
    node = bridge.load_radiograph(scene, path)
    assert bridge.source_file(node) == path.resolve()
    vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())[:10] = 0  # a crop, a paint stroke
    node.GetImageData().Modified()
    assert bridge.source_file(node) is None


def test_a_film_under_a_transform_is_read_as_the_views_show_it(bridge, scene, tmp_path):
    """A film turned in the Transforms module shows turned, and reached the engine as it was filed (its file, or
    its own voxels); a non-linear transform is refused, a zero spacing is one sentence."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    from vtkmodules.vtkCommonTransforms import vtkThinPlateSplineTransform

    from XctDiffCore.io import write_image_png

    image = display_image()
    node = bridge.radiograph_to_node(scene, image, spacing=(0.5, 0.25), name="film")
    turn = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "turn")
    quarter = vtkMatrix4x4()  # the patient's right turned to the head: a quarter turn clockwise in the Green view
    for (r, c), value in {(0, 0): 0, (0, 2): -1, (2, 0): 1, (2, 2): 0}.items():
        quarter.SetElement(r, c, value)
    turn.SetMatrixTransformToParent(quarter)
    node.SetAndObserveTransformNodeID(turn.GetID())
    back, spacing = bridge.radiograph_from_node(node)
    np.testing.assert_array_equal(back, np.rot90(image, -1))
    assert spacing == (0.25, 0.5)

    path = write_image_png(display_image(64, 48) / display_image(64, 48).max(), tmp_path / "film.png")
    loaded = bridge.load_radiograph(scene, path)
    assert bridge.source_file(loaded) == path.resolve()
    loaded.SetAndObserveTransformNodeID(turn.GetID())
    assert bridge.source_file(loaded) is None  # its file is not what the views show

    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(vtkThinPlateSplineTransform())
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(XctDiffError, match="'film' is under a non-linear transform .'warp'.: harden it first"):
        bridge.radiograph_from_node(node)
    node.SetAndObserveTransformNodeID(None)
    node.SetSpacing(0.0, 0.0, 1.0)
    with pytest.raises(XctDiffError, match="'film' has no usable geometry"):
        bridge.radiograph_from_node(node)


def test_a_dicom_database_that_cannot_answer_sends_the_voxels(bridge, scene):
    node = bridge.radiograph_to_node(scene, display_image(), spacing=(0.5, 0.5))
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3")

    def locked(uid):
        raise RuntimeError("database is locked")

    assert bridge.source_file(node, locked) is None  # was the RuntimeError, at the click
    assert bridge.source_file(node, lambda uid: None) is None
