"""The MRML bridge: engine objects (``Volume``, radiograph arrays) in, volume nodes out, and back.

Every function takes the scene (or the nodes, or the slice logics) as an argument and touches no
``slicer.app`` global, so the same code runs inside Slicer and on the PyPI ``slicer-core`` wheel.

Geometry is handled in one place each way:

* a CT :class:`~XctDiffCore.volume.Volume` (LPS) becomes a node whose IJKToRAS is
  ``Volume.ijk_to_ras()`` -- LPS to RAS happens there and nowhere else;
* a radiograph node (a single-slice scalar volume) becomes a ``[row, col]`` image in display
  orientation (row 0 superior, column 0 the patient's right) by reading it *as Slicer's slice view of
  its plane shows it* (Slicer's default presets put the patient's right on the screen's left). A PNG
  loaded in Slicer (ITK gives it LPS identity: i to the left, j to the posterior in the axial plane) is
  therefore read exactly as its pixel rows and columns, and a radiograph node made here (coronal
  plane, i to the patient's left, j to the feet) round-trips unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from XctDiffCore.errors import XctDiffError
from XctDiffCore.volume import LPS_TO_RAS, Volume

# Slicer's "CT-Lung" window/level preset: lungs, mediastinum and bone all readable at once.
CT_WINDOW = 1400.0
CT_LEVEL = -500.0
SLICE_VIEW_NAMES = ("Red", "Yellow", "Green")
# Node attributes written by this bridge (MRML attributes survive scene save/load).
ATTRIBUTE_IS_DRR = "XctDiff.IsDRR"  # "1": rendered from a CT, needs no real-to-DRR style transfer
ATTRIBUTE_SPACING_KNOWN = "XctDiff.PixelSpacingKnown"  # "0": the file had no pixel spacing
ATTRIBUTE_DICOM_INSTANCES = "DICOM.instanceUIDs"  # set by Slicer's DICOM loader: the SOP instances of the node
ATTRIBUTE_SOURCE_FILE = "XctDiff.SourceFile"  # "path|size:mtime|voxels" of the file "Load radiograph" read
#: On every node a reconstruction wrote: the name it was made under ("<film> synthetic CT (XctDiff)").
ATTRIBUTE_MADE_FOR = "XctDiff.MadeFor"
#: ... and "1": the node holds no scan. Its name says so too, and so would a series Slicer exports from it.
ATTRIBUTE_SYNTHETIC = "XctDiff.Synthetic"
UNCERTAINTY_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"  # built in: black, red, yellow, white

# What a slice view of each plane shows to the right of and below the screen centre (RAS unit
# vectors), keyed by the RAS axis normal to the plane: Slicer's default orientation presets with the
# patient's right on the screen's left (vtkMRMLSliceNode::AddDefaultSliceOrientationPresets).
SCREEN_RIGHT_DOWN = {
    0: (np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, -1.0])),  # sagittal: posterior, inferior
    1: (np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),  # coronal: patient's left, inferior
    2: (np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])),  # axial: patient's left, posterior
}


# --------------------------------------------------------------------------------------------------
# matrices and voxels


def matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(node) -> np.ndarray:
    """The node's own 4x4 IJKToRAS (parent transforms are not applied: harden them first)."""
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def world_ijk_to_ras(node) -> np.ndarray:
    """The IJKToRAS the views show: the node's own with its parent transforms applied (a non-linear one refused)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return ijk_to_ras(node)
    if not transform.IsTransformToWorldLinear():
        raise XctDiffError(f"'{node.GetName()}' is under a non-linear transform ('{transform.GetName()}'): "
                           "harden it first (Data module: right-click, Harden transform)")
    to_world = vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world) @ ijk_to_ras(node)


def node_array(node, grey: bool = False) -> np.ndarray:
    """A copy of the node's voxels as ``array[k, j, i]`` (scalar volumes; with ``grey``, an RGB(A) one made grey
    as the engine reads a colour film file)."""
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        raise XctDiffError(f"volume node '{node.GetName() if node else None}' has no image data")
    components = image.GetNumberOfScalarComponents()
    ni, nj, nk = image.GetDimensions()
    scalars = vtk_to_numpy(image.GetPointData().GetScalars())
    if components == 1:
        return scalars.reshape(nk, nj, ni).copy()
    if grey and components in (3, 4):  # a colour JPEG or PNG dropped into Slicer
        from XctDiffCore.io import to_grey

        return to_grey(scalars.reshape(nk, nj, ni, components))
    raise XctDiffError(f"volume node '{node.GetName()}' is not a scalar (single-component) volume")


def _set_node_voxels(node, array: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> None:
    """Voxels and geometry of a volume node; the image data itself carries no geometry (Slicer's rule)."""
    array = np.ascontiguousarray(array)  # [k, j, i]: i fastest, as vtkImageData stores it
    image = vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    node.StorableModified()
    node.Modified()


def _new_or_given(scene, node, name: str):
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    return node


# --------------------------------------------------------------------------------------------------
# CT volumes


def volume_to_node(scene, volume: Volume, node=None, name: str = "XctDiff CT"):
    """Put a :class:`Volume` into ``node`` (a new scalar volume node when None); geometry from ``ijk_to_ras()``."""
    node = _new_or_given(scene, node, name)
    _set_node_voxels(node, volume.array, volume.ijk_to_ras())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def node_to_volume(node) -> Volume:
    """The inverse of :func:`volume_to_node`: the node's voxels and geometry as an LPS :class:`Volume`."""
    m = ijk_to_ras(node)
    lps = LPS_TO_RAS @ m[:3, :]  # LPS_TO_RAS is its own inverse
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return Volume(node_array(node), spacing, lps[:, 3], lps[:, :3] / spacing)


def ap_diameter_of_node(node) -> float:
    """The chest's AP diameter (mm) of a CT node, as ``--ap-diameter`` takes it (an earlier CT of the patient
    whose depth the reconstruction should have); a one-sentence :class:`XctDiffError` when it cannot be
    measured or is not a chest's (outside 100-300 mm)."""
    from XctDiffCore.ap_diameter import ct_ap_diameter

    if not callable(getattr(node, "GetImageData", None)) or node.GetImageData() is None:  # None, a name, a model
        raise XctDiffError("choose a CT volume to measure the AP diameter on")
    if _is_synthetic(node):  # its depth is the model's own guess: fed back, it would only confirm it
        raise XctDiffError(f"{node.GetName()} is a CT XctDiff reconstructed, not a scan: its AP diameter is the model's "
                           "guess, not the patient's; choose a scan of the patient")
    try:
        return ct_ap_diameter(node_to_volume(node))
    except XctDiffError as error:
        raise XctDiffError(f"{node.GetName()}: {error}") from None


def _is_synthetic(node) -> bool:
    """A CT node XctDiff made: marked so by the reconstruction, or read from a file whose header says so."""
    if node.GetAttribute(ATTRIBUTE_SYNTHETIC) == "1":
        return True
    from XctDiffCore.io import volume_notes

    file_name = storage_file_name(node)
    return bool(file_name) and bool({"note", "summary"} & set(volume_notes(file_name)))


def storage_file_name(node) -> str:
    """The file Slicer read the node from (or will save it to), "" where it has none."""
    storage = node.GetStorageNode() if callable(getattr(node, "GetStorageNode", None)) else None
    return (storage.GetFileName() or "") if storage is not None else ""


def read_volume_file(scene, path, node=None, name: str = "XctDiff CT"):
    """Read an engine output file (NRRD, NIfTI...) with SimpleITK into a node, through :class:`Volume`."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise XctDiffError(f"expected output file is missing: {path}")
    return volume_to_node(scene, Volume.from_sitk(sitk.ReadImage(str(path))), node, name)


# --------------------------------------------------------------------------------------------------
# radiographs


def radiograph_from_node(node) -> tuple:
    """``(image[row, col] float32, spacing (row_mm, col_mm) or None)`` in display orientation.

    The node must be a single-slice scalar volume. Its plane, moved by its parent transforms, is viewed as Slicer's
    slice view of the nearest anatomical plane shows it: columns follow the screen's right, rows the screen's down.
    """
    from XctDiffCore.io import MAX_RADIOGRAPH_SIDE, check_radiograph_size

    data = node.GetImageData() if callable(getattr(node, "GetImageData", None)) else None
    sides = [side for side in (data.GetDimensions() if data is not None else ()) if side > 1]
    if len(sides) == 2 and max(sides) > MAX_RADIOGRAPH_SIDE:  # refused before its voxels are copied (0.5 GiB or more)
        check_radiograph_size(*sides, f"'{node.GetName()}'")
    array = node_array(node, grey=True)  # [k, j, i]
    sizes = array.shape[::-1]  # (i, j, k)
    plane = [axis for axis in range(3) if sizes[axis] > 1]
    if len(plane) != 2:
        raise XctDiffError(
            f"'{node.GetName()}' is not a radiograph: expected a single-slice image, "
            f"got {sizes[0]} x {sizes[1]} x {sizes[2]} voxels"
        )
    m = world_ijk_to_ras(node)[:3, :3]  # as the slice views show it
    spacing = np.linalg.norm(m, axis=0)
    if not (np.all(np.isfinite(m)) and np.all(spacing > 0)):
        raise XctDiffError(f"'{node.GetName()}' has no usable geometry (a zero or non-finite spacing): "
                           "set its spacing in the Volumes module")
    directions = m / spacing
    normal = np.cross(directions[:, plane[0]], directions[:, plane[1]])
    right, down = SCREEN_RIGHT_DOWN[int(np.argmax(np.abs(normal)))]
    col_axis = max(plane, key=lambda axis: abs(directions[:, axis] @ right))
    row_axis = plane[0] if col_axis == plane[1] else plane[1]

    flat = [axis for axis in range(3) if axis not in plane][0]
    image = np.take(array, 0, axis=2 - flat)  # the two remaining numpy axes, slower first
    kept = [axis for axis in (2, 1, 0) if axis != flat]  # IJK axis of each remaining numpy axis
    if kept.index(row_axis) != 0:
        image = image.T
    if directions[:, col_axis] @ right < 0:
        image = image[:, ::-1]
    if directions[:, row_axis] @ down < 0:
        image = image[::-1, :]
    known = node.GetAttribute(ATTRIBUTE_SPACING_KNOWN) != "0" and not _read_from_a_picture_file(node)
    pixel_spacing = (float(spacing[row_axis]), float(spacing[col_axis])) if known else None
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which the engine's check refuses
        return np.ascontiguousarray(image, dtype=np.float32), pixel_spacing


def _read_from_a_picture_file(node) -> bool:
    """Whether Slicer read the node from a PNG, JPEG, TIFF or BMP: ITK's spacing for such a file is 1 mm or its print
    resolution (96 dpi: 0.26 mm), not the film's pixel size, and the engine reads no spacing from it either."""
    from XctDiffCore.io import PIL_SUFFIXES

    return storage_file_name(node).lower().endswith(PIL_SUFFIXES)


def radiograph_to_node(scene, image: np.ndarray, spacing: Optional[Sequence[float]] = None, node=None,
                       name: str = "Radiograph", is_drr: bool = False):
    """A radiograph ``[row, col]`` as a single-slice node in the coronal plane, centred on the RAS origin.

    i runs to the patient's left (columns), j to the feet (rows), k to the posterior, so the film
    faces the CT's coronal plane and shows upright in the Green view. ``spacing`` is (row, col) mm;
    None records "unknown" (1 mm is used for display).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise XctDiffError(f"expected a 2D radiograph, got an array of shape {image.shape}")
    row_mm, col_mm = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    m = np.eye(4)
    m[:3, 0] = [-col_mm, 0.0, 0.0]  # i: columns, towards the patient's left (-R)
    m[:3, 1] = [0.0, 0.0, -row_mm]  # j: rows, towards the feet (-S)
    m[:3, 2] = [0.0, -1.0, 0.0]  # k: the single slice's normal, posterior (-A)
    rows, cols = image.shape
    m[:3, 3] = -(m[:3, 0] * (cols - 1) + m[:3, 1] * (rows - 1)) / 2.0
    node = _new_or_given(scene, node, name)
    _set_node_voxels(node, image[np.newaxis], m)
    node.SetAttribute(ATTRIBUTE_SPACING_KNOWN, "0" if spacing is None else "1")
    node.SetAttribute(ATTRIBUTE_IS_DRR, "1" if is_drr else "0")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def load_radiograph(scene, path, node=None):
    """"Load radiograph from file...": any file ``XctDiffCore.io.read_radiograph`` reads, as a node."""
    from XctDiffCore.io import read_radiograph

    if not isinstance(path, (str, os.PathLike)):
        raise XctDiffError(f"load_radiograph takes a film file's path, got {path!r}")
    radiograph = read_radiograph(path)
    name = Path(path).name.split(".")[0] or "Radiograph"
    node = radiograph_to_node(scene, radiograph.image, radiograph.spacing, node, name, radiograph.is_drr)
    path = Path(path).resolve()
    # the engine reads the file itself, as long as neither the file nor the node's voxels have changed since
    node.SetAttribute(ATTRIBUTE_SOURCE_FILE, f"{path}|{_file_stamp(path)}|{_voxel_stamp(node)}")
    return node


def source_file(node, dicom_file_for: Optional[Callable[[str], str]] = None) -> Optional[Path]:
    """The file a film node was read from, for the engine to read again, or None (then the voxels are sent).

    Why: the node's voxels lose what the file's header says (the patient's age, the view, no spacing where the
    file has none), and a node from Slicer's DICOM module holds what its reader made of the file (no VOI LUT;
    MONOCHROME1 inverted or not, by the reader's version; 1 mm for an unknown spacing); the engine's reader
    applies all of it, so the panel reads a film as the command line does. Two sources: the DICOM database
    (``dicom_file_for`` maps a SOP instance UID to its file: ``slicer.dicomDatabase.fileForInstance``; a node
    of several instances is not one film), and "Load radiograph" (:func:`load_radiograph` records the file, its
    size and time: a file changed since is not used).
    """
    if node.GetParentTransformNode() is not None:  # moved or turned in the views: sent as shown, not as filed
        return None
    uids = (node.GetAttribute(ATTRIBUTE_DICOM_INSTANCES) or "").split()
    if dicom_file_for is not None and len(uids) == 1:
        try:
            path = str(dicom_file_for(uids[0]) or "")
        except Exception:  # noqa: BLE001 - a database that cannot answer (locked, closed): send the voxels
            path = ""
        if path and Path(path).is_file() and _same_size_as_dicom(node, Path(path)):
            return Path(path)
    recorded = node.GetAttribute(ATTRIBUTE_SOURCE_FILE) or ""
    if recorded.count("|") >= 2:
        path, file_stamp, voxel_stamp = recorded.rsplit("|", 2)
        if Path(path).is_file() and _file_stamp(Path(path)) == file_stamp and _voxel_stamp(node) == voxel_stamp:
            return Path(path)
    return None


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _voxel_stamp(node) -> str:
    """A checksum of the node's voxels and geometry: an edited, cropped or moved copy of a loaded film (which
    carries its attributes along) differs, and is then sent as it is shown, not as its file was."""
    import zlib

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        return ""
    crc = zlib.crc32(np.ascontiguousarray(vtk_to_numpy(image.GetPointData().GetScalars())).tobytes())
    crc = zlib.crc32(str(image.GetDimensions()).encode(), crc)
    return f"{zlib.crc32(np.round(ijk_to_ras(node), 6).tobytes(), crc):08x}"


def _same_size_as_dicom(node, path: Path) -> bool:
    """A node from the DICOM database still the size of its instance (not a cropped or resampled copy)."""
    import pydicom

    image = node.GetImageData()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = int(header.Rows), int(header.Columns)
    except Exception:  # noqa: BLE001 - an unreadable header: send the voxels, which the engine can check
        return False
    return image is not None and sorted(image.GetDimensions()[:2]) == sorted((rows, cols))


def write_radiograph_file(node, path, film: Optional[tuple] = None) -> Path:
    """The node as the engine's INPUT: a raw 2D NRRD in display orientation (see PROTOCOL.md). ``film``: the
    node's ``radiograph_from_node`` when already made. Not compressed: it is written in Slicer's own thread,
    read once and deleted."""
    from XctDiffCore.io import drr_tag_metadata, write_radiograph_nrrd

    image, spacing = film if film is not None else radiograph_from_node(node)
    metadata = drr_tag_metadata() if node.GetAttribute(ATTRIBUTE_IS_DRR) == "1" else None
    return write_radiograph_nrrd(image, path, spacing=spacing, metadata=metadata, compress=False)


def first_film_node(scene):
    """The node the panel offers first: a plain single-slice volume (a film), else a plain volume, else None;
    never a label map, which the input selector does not list (a colour film, a vector volume, is chosen by hand)."""
    plain = [node for node in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
             if node.GetClassName() == "vtkMRMLScalarVolumeNode"]
    films = [node for node in plain if node.GetImageData() is not None and 1 in node.GetImageData().GetDimensions()]
    return (films or plain or [None])[0]


# --------------------------------------------------------------------------------------------------
# display


def file_beside(scene, node, reference) -> bool:
    """Put ``node`` in ``reference``'s subject hierarchy folder; True when it moved.

    Why: a film loaded from DICOM sits in its patient's study (Data module), so the CT made from it goes
    there too, and Slicer's "Export to DICOM" then writes the CT into the film's patient and study. A
    reference outside any folder (a PNG, a film made in the console) puts ``node`` at the top level: a CT
    node reused from an earlier patient's film must not stay in that patient's study.
    """
    hierarchy = scene.GetSubjectHierarchyNode()
    if hierarchy is None or reference is None:
        return False
    reference_item = hierarchy.GetItemByDataNode(reference)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else 0
    if not parent or parent == hierarchy.GetSceneItemID():
        item = hierarchy.GetItemByDataNode(node)
        if item and hierarchy.GetItemParent(item) not in (0, hierarchy.GetSceneItemID()):
            hierarchy.SetItemParent(item, hierarchy.GetSceneItemID())
            return True
        return False
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # the scene has no subject hierarchy logic (slicer-core): the item is made here
        hierarchy.CreateItem(parent, node)
    return True


def _display_node(node):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


def set_ct_window(node, window: float = CT_WINDOW, level: float = CT_LEVEL) -> None:
    """A fixed CT window (HU), so every reconstruction is shown alike."""
    display = _display_node(node)
    display.AutoWindowLevelOff()
    display.SetWindowLevel(window, level)


def set_uncertainty_display(node) -> None:
    """A perceptual colour map (when the scene has Slicer's colour tables) over the full range of the map."""
    display = _display_node(node)
    scene = node.GetScene()
    if scene is not None and scene.GetNodeByID(UNCERTAINTY_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(UNCERTAINTY_COLOR_NODE_ID)
    display.AutoWindowLevelOn()


def slice_logics_by_name(slice_logics, names: Sequence[str] = SLICE_VIEW_NAMES) -> list:
    """Pick the slice logics of the named views, in order, from an iterable or a ``vtkCollection``
    (``applicationLogic.GetSliceLogics()``)."""
    if hasattr(slice_logics, "GetNumberOfItems"):
        slice_logics = [slice_logics.GetItemAsObject(i) for i in range(slice_logics.GetNumberOfItems())]
    by_name = {}
    for logic in slice_logics:
        node = logic.GetSliceNode()
        if node is not None:
            by_name[node.GetLayoutName()] = logic
    missing = [name for name in names if name not in by_name]
    if missing:
        raise XctDiffError(f"slice views not found: {', '.join(missing)}")
    return [by_name[name] for name in names]


def show_in_slice_views(slice_logics: Iterable, background, foreground=None, foreground_opacity: float = 0.5) -> None:
    """``background`` in every given slice view, ``foreground`` (or nothing) over it; fit each view to it."""
    for logic in slice_logics:
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(foreground_opacity))
        logic.FitSliceToAll()
        logic.SnapSliceOffsetToIJK()


def set_foreground_opacity(slice_logics: Iterable, opacity: float) -> None:
    for logic in slice_logics:
        logic.GetSliceCompositeNode().SetForegroundOpacity(float(opacity))
