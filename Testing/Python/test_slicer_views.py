"""The result in the Red, Yellow and Green slice views: layers, CT window, overlay opacity, fit, and an
offscreen render of the three views (trame-slicer's VTK views, no display needed) saved as a PNG."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, SAMPLE_CT

from XctDiffCore.errors import XctDiffError
from XctDiffCore.volume import Volume

THREE_VIEWS_PNG = REPO / "Testing" / "Temporary" / "XctDiffSlicer_three_views.png"
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


@pytest.fixture(scope="module")
def sample_ct():
    from XctDiffCore.io import read_ct

    return read_ct(SAMPLE_CT)


def uncertainty_of(ct: Volume) -> Volume:
    """A stand-in spread map with structure (edges), so the overlay visibly differs from the CT."""
    gradient = np.linalg.norm(np.gradient(ct.array.astype(np.float32)), axis=0)
    return ct.with_array(gradient.astype(np.float32))


@pytest.fixture
def app(slicer):
    """A scene with the three slice views as Slicer makes them: application logic, presets, slice logics."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    logics = []
    for name, orientation in VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        node = logic.AddSliceNode(name)
        node.SetOrientation(orientation)
        node.SetDimensions(300, 200, 1)
        logics.append(logic)
    # The slice logics keep plain pointers to the application logic: hold it, and detach them first.
    yield scene, logics
    for logic in logics:
        logic.SetMRMLScene(None)
        logic.SetMRMLApplicationLogic(None)
    logics.clear()
    app_logic.SetMRMLScene(None)
    color_logic.SetMRMLScene(None)


def test_output_becomes_background_of_red_yellow_green_fitted(bridge, app, sample_ct):
    scene, logics = app
    ct = bridge.volume_to_node(scene, sample_ct)
    bridge.set_ct_window(ct)
    bridge.show_in_slice_views(logics, ct)
    bounds = np.zeros(6)
    ct.GetRASBounds(bounds)
    centre = bounds.reshape(3, 2).mean(axis=1)
    for (name, orientation), logic in zip(VIEWS, logics):
        composite = logic.GetSliceCompositeNode()
        assert composite.GetBackgroundVolumeID() == ct.GetID(), name
        assert composite.GetForegroundVolumeID() is None
        node = logic.GetSliceNode()
        assert node.GetOrientation() == orientation
        # Fitted: the field of view holds the volume's extent in the view's plane, and the slice
        # passes through the volume (near its centre along the view's normal).
        slice_to_ras = bridge.matrix_to_numpy(node.GetSliceToRAS())
        normal_axis = int(np.argmax(np.abs(slice_to_ras[:3, 2])))
        extent = bounds[1::2] - bounds[0::2]
        in_plane = [extent[int(np.argmax(np.abs(slice_to_ras[:3, c])))] for c in (0, 1)]
        fov = node.GetFieldOfView()
        assert fov[0] >= in_plane[0] - 1e-3 and fov[1] >= in_plane[1] - 1e-3, name
        assert min(fov[0] / in_plane[0], fov[1] / in_plane[1]) < 1.01, f"{name} not fitted tightly"
        assert abs(slice_to_ras[normal_axis, 3] - centre[normal_axis]) <= 2.5, name


def test_ct_window_and_uncertainty_overlay(bridge, app, sample_ct):
    scene, logics = app
    ct = bridge.volume_to_node(scene, sample_ct)
    spread = bridge.volume_to_node(scene, uncertainty_of(sample_ct), name="uncertainty")
    bridge.set_ct_window(ct)
    bridge.set_uncertainty_display(spread)
    bridge.show_in_slice_views(logics, ct, spread, foreground_opacity=0.3)
    display = ct.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == (bridge.CT_WINDOW, bridge.CT_LEVEL)
    assert spread.GetDisplayNode().GetColorNodeID() == bridge.UNCERTAINTY_COLOR_NODE_ID
    for logic in logics:
        composite = logic.GetSliceCompositeNode()
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == spread.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.3)
    bridge.set_foreground_opacity(logics, 0.8)
    assert all(logic.GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.8) for logic in logics)


def test_slice_logics_are_found_by_view_name(bridge, app):
    from vtkmodules.vtkCommonCore import vtkCollection  # what applicationLogic.GetSliceLogics() returns

    _, logics = app
    collection = vtkCollection()
    for logic in reversed(logics):
        collection.AddItem(logic)
    assert bridge.slice_logics_by_name(collection) == logics
    with pytest.raises(XctDiffError, match="Blue"):
        bridge.slice_logics_by_name(logics, ("Red", "Blue"))


def test_offscreen_render_of_the_three_views_shows_the_volume(bridge, sample_ct):
    """Render Red, Yellow and Green offscreen (VTK's EGL/OSMesa, no display) and save them side by side."""
    from PIL import Image
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = [
        app.view_manager.create_view(definition)
        for definition in (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(),
                           ViewLayoutDefinition.coronal_view())
    ]
    size = 256
    for view in views:
        view.render_window().SetSize(size, size)
        view.interactor().UpdateSize(size, size)
    ct = bridge.volume_to_node(app.scene, sample_ct)
    spread = bridge.volume_to_node(app.scene, uncertainty_of(sample_ct), name="uncertainty")
    bridge.set_ct_window(ct)
    bridge.set_uncertainty_display(spread)
    logics = bridge.slice_logics_by_name(app.app_logic.GetSliceLogics())
    for logic in logics:
        logic.ResizeSliceNode(size, size)
    bridge.show_in_slice_views(logics, ct, spread, foreground_opacity=0.35)

    tiles = []
    for view in views:
        view.render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
        tiles.append(np.ascontiguousarray(rgb))
    for (name, _), tile in zip(VIEWS, tiles):
        grey = tile.astype(np.float32).mean(axis=2)
        assert tile.shape == (size, size, 3), name
        assert grey.std() > 20, f"{name} view shows no structure (std {grey.std():.1f})"
        assert (grey > 10).mean() > 0.3, f"{name} view is mostly empty"
        assert (tile[..., 0].astype(int) - tile[..., 2]).mean() > 2, f"{name}: the heat overlay is missing"
    THREE_VIEWS_PNG.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(THREE_VIEWS_PNG)
    assert THREE_VIEWS_PNG.stat().st_size > 10_000
    for view in views:
        view.finalize()
