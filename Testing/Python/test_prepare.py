"""`xctdiff prepare` and the CT augmentation: files, formats, the patient-level split, consistency of pairs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import check_refused_while_held, synthetic_chest
from test_io import file_size_limit  # noqa: F401 - a fixture

from XctDiffCore.augment import RandomChestAugment
from XctDiffCore.commands.cli import main
from XctDiffCore.drr import drr_of_volume
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_ct, read_radiograph, write_volume
from XctDiffCore.ct_search import find_ct_inputs
from XctDiffCore.prepare import fixed_split, prepare_dataset, read_split, split_cases, split_patients
from XctDiffCore.volume import Volume

SIZE = 32  # small volumes keep the whole file fast on two cores


def _write_phantoms(folder, seeds=(0, 1, 2)):
    """Three phantom patients at 2.5 mm: two NRRD files and one shared-format .npz."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        ct = np.rint(synthetic_chest((40, 40, 40), seed=seed)).astype(np.int16)
        volume = Volume(ct, spacing=(2.5, 2.5, 2.5), origin=(-50.0 + seed, -50.0, 100.0 * seed))
        if seed % 3 == 2:
            path = folder / f"phantom{seed}.npz"
            np.savez(path, ct=ct, axes="zyx", spacing=volume.spacing, origin=volume.origin, direction=np.eye(3))
        else:
            path = write_volume(volume, folder / f"phantom{seed}.nrrd")
        paths.append(path)
    return paths


def _check_datalist(out, n_patients: int, augment: int, size: int) -> dict:
    datalist = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    sides = {side: {e["patient"] for e in datalist[side]} for side in ("training", "validation")}
    assert not sides["training"] & sides["validation"], "a patient is on both sides of the split"
    assert len(sides["training"] | sides["validation"]) == n_patients
    assert sides["training"] and sides["validation"]
    for side in ("training", "validation"):
        for patient in sides[side]:
            assert sorted(e["aug"] for e in datalist[side] if e["patient"] == patient) == list(range(augment + 1))
    for entry in datalist["training"] + datalist["validation"]:
        assert not entry["image"].startswith("/") and (out / entry["image"]).is_file()
        with np.load(out / entry["image"], allow_pickle=False) as data:  # numpy alone reads it
            assert data["ct"].dtype == np.int16 and data["ct"].shape == (size,) * 3
            assert str(data["axes"]) == "zyx" and tuple(data["spacing"]) == (2.5, 2.5, 2.5)
        xray = np.load(out / entry["xray"])
        assert xray.dtype == np.float32 and xray.shape == (size, size) and 0.0 <= xray.min() < xray.max() <= 1.0
        assert read_radiograph((out / entry["xray"]).with_suffix(".png")).is_drr
    return datalist


def test_prepare_phantoms_split_by_patient_and_pairs_consistent(tmp_path, capsys):
    paths = _write_phantoms(tmp_path / "in")
    out = tmp_path / "out" / "nested"  # created when missing
    argv = ["prepare", *map(str, paths), "--out", str(out), "--augment", "1", "--val-fraction", "0.34",
            "--seed", "3", "--size", str(SIZE)]
    assert main(argv) == 0
    assert "training 4 pairs / 2 patients, validation 2 pairs / 1 patient" in capsys.readouterr().out
    datalist = _check_datalist(out, n_patients=3, augment=1, size=SIZE)

    entry = datalist["training"][0]
    # The stored DRR is the DRR of the stored CT (the augmentation happened before rendering).
    for aug in (0, 1):
        name = entry["image"].replace("_aug0", f"_aug{aug}")
        xray = np.load(out / name.replace("images/", "xrays/").replace(".npz", ".npy"))
        np.testing.assert_allclose(drr_of_volume(read_ct(out / name), "cone", SIZE), xray, atol=1e-5)
    original, variant = (read_ct(out / entry["image"].replace("_aug0", f"_aug{k}")).array for k in (0, 1))
    assert not np.array_equal(original, variant)
    # No temporary files left behind.
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_prepare_scans_a_folder_and_reports_bad_input(tmp_path, capsys):
    _write_phantoms(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not a CT")
    assert [c.patient for c in find_ct_inputs([tmp_path / "in"])] == ["phantom0", "phantom1", "phantom2"]

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in ([str(empty)], [str(tmp_path / "absent.nrrd")], [str(tmp_path / "in" / "notes.txt")]):
        out = tmp_path / "out_bad"
        assert main(["prepare", *bad, "--out", str(out), "--size", str(SIZE)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("error: ")  # after the progress bar, on its own line
        assert not (out / "datalist.json").exists()


def test_two_files_of_one_name_in_one_folder_are_named_in_the_error(tmp_path):
    """CT.nii.gz beside CT.nrrd (one converted from the other): 'several inputs would share the patient id
    'home_me_data_in_CT'' (every folder above put in front) did not say which files."""
    volume = Volume(synthetic_chest((20, 20, 20)).astype(np.int16), spacing=(2.5,) * 3)
    (tmp_path / "in").mkdir()
    paths = [write_volume(volume, tmp_path / "in" / name) for name in ("CT.nii.gz", "CT.nrrd")]
    with pytest.raises(XctDiffError, match=f"several inputs would share the patient id '[^']*_in_CT' \\({paths[0]}, "
                       f"{paths[1]}\\): rename or move one"):
        find_ct_inputs([tmp_path / "in"])


def test_patient_ids_that_collide_take_their_folder_name(tmp_path):
    a, b = _write_phantoms(tmp_path / "a", seeds=(0,))[0], _write_phantoms(tmp_path / "b", seeds=(0,))[0]
    assert sorted(c.patient for c in find_ct_inputs([a, b])) == ["a_phantom0", "b_phantom0"]


@pytest.mark.parametrize("n", [2, 3, 7, 14])
@pytest.mark.parametrize("fraction", [0.1, 0.34, 0.5])
def test_split_is_a_partition_with_both_sides(n, fraction):
    patients = [f"p{i:02d}" for i in range(n)]
    for seed in range(5):
        training, validation = split_patients(patients, fraction, seed)
        assert sorted(training + validation) == patients and not set(training) & set(validation)
        assert 1 <= len(validation) <= n - 1
        assert split_patients(patients, fraction, seed) == (training, validation)  # seeded
    with pytest.raises(XctDiffError):
        split_patients(patients, 1.0, 0)


def test_the_shared_split_holds_four_whole_chests_and_says_why():
    ids = read_split("shared_whole_chest")
    assert len(ids) >= 4 and "lidc_idri_0001" not in ids  # the bundled sample stays in training
    patients = ids + ["lidc_idri_0001", "other"]
    training, validation = fixed_split(patients, ids)
    assert validation == sorted(ids) and training == ["lidc_idri_0001", "other"]


def test_the_second_fold_holds_out_five_other_whole_chests():
    first, second = read_split("shared_whole_chest"), read_split("shared_whole_chest_fold2")
    assert len(second) == 5 and not set(first) & set(second) and "lidc_idri_0001" in second


def test_split_files_and_their_errors(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"validation": ["b"], "description": "why"}))
    assert read_split(path) == ["b"]
    assert fixed_split(["a", "b", "c"], read_split(path)) == (["a", "c"], ["b"])
    with pytest.raises(XctDiffError, match="not among the inputs: z"):
        fixed_split(["a", "b"], ["b", "z"])
    with pytest.raises(XctDiffError, match="split file not found: nosuchsplit"):
        read_split("nosuchsplit")
    path.write_text(json.dumps({"validation": "b"}))
    with pytest.raises(XctDiffError, match="must be a list"):
        read_split(path)


def test_prepare_with_a_split_file(tmp_path, capsys):
    paths = _write_phantoms(tmp_path / "in")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation": [paths[0].name.split(".")[0]]}))
    out = tmp_path / "out"
    assert main(["prepare", *map(str, paths), "--out", str(out), "--split", str(split), "--size", str(SIZE)]) == 0
    datalist = json.loads((out / "datalist.json").read_text())
    assert {e["patient"] for e in datalist["validation"]} == {paths[0].name.split(".")[0]}
    assert datalist["settings"]["split"] == str(split)
    assert main(["prepare", *map(str, paths), "--out", str(tmp_path / "o2"), "--split", "nosuchsplit"]) == 2
    assert "error: split file not found" in capsys.readouterr().err


def test_a_validation_patient_that_is_no_whole_chest_is_said_when_the_split_is_made(tmp_path, capsys):
    """The protocol validates on whole chests; a split that held out a crop or a slab said nothing until a model was
    scored on it (or ever, before evaluate learnt to say it)."""
    hu = np.full((128, 128, 128), -1000, dtype=np.int16)
    hu[10:118, 10:118, 10:118] = 40  # a body 270 mm each way
    hu[30:100, 30:100, 20:60] = hu[30:100, 30:100, 68:108] = -800  # two lungs
    slab = np.full_like(hu, -1000)
    slab[50:80] = hu[50:80]  # 75 mm of the same chest, head to foot
    folder = tmp_path / "in"
    folder.mkdir()
    for name, ct in (("whole", hu), ("slab", slab)):
        write_volume(Volume(ct, spacing=(2.5, 2.5, 2.5), origin=(0.0, 0.0, 0.0)), folder / f"{name}.nrrd")
    for held_out, said in (("slab", True), ("whole", False)):
        split = tmp_path / f"{held_out}.json"
        split.write_text(json.dumps({"validation": [held_out]}))
        capsys.readouterr()
        assert main(["prepare", str(folder), "--out", str(tmp_path / held_out), "--split", str(split)]) == 0
        err = capsys.readouterr().err
        assert ("warning: 1 of the 1 validation patients is no whole chest (slab: its body spans only 75 mm head to "
                "foot" in err) is said, err
        assert ("no whole chest" in err) is said, err

def test_a_validation_scan_of_thick_slices_is_said_and_its_spacing_kept_for_evaluate(tmp_path, capsys):
    """5 mm slices resampled to 2.5 mm look whole but are blurred head to foot; prepare kept no voxel size, so it
    could not say so, and `xctdiff evaluate` of the datalist could not mark the case low resolution either."""
    from XctDiffCore.evaluation.reconstructions import case_notes, datalist_cases

    folder = tmp_path / "in"
    folder.mkdir()
    for name, z_mm in (("thin", 2.5), ("thick", 5.0)):
        ct = np.rint(synthetic_chest((int(100 / z_mm), 40, 40))).astype(np.int16)
        write_volume(Volume(ct, spacing=(2.5, 2.5, z_mm)), folder / f"{name}.nrrd")
    for held_out, said in (("thick", True), ("thin", False)):
        split = tmp_path / f"{held_out}.json"
        split.write_text(json.dumps({"validation": [held_out]}))
        capsys.readouterr()
        out = tmp_path / held_out
        assert main(["prepare", str(folder), "--out", str(out), "--split", str(split), "--size", str(SIZE)]) == 0
        err = capsys.readouterr().err
        line = ("warning: 1 of the 1 validation patients is a scan of low resolution (thick: 5.0 mm voxels (coarser "
                "than 3 mm))")
        assert (line in err) is said and ("low resolution" in err) is said, err
        datalist = json.loads((out / "datalist.json").read_text())
        spacing = {e["patient"]: e["source_spacing"] for side in ("training", "validation") for e in datalist[side]}
        assert spacing == {"thin": [2.5, 2.5, 2.5], "thick": [2.5, 2.5, 5.0]}
        with pytest.warns(UserWarning, match="scored brought to 128"):  # a --size 32 list: said, and beside the point
            cases = datalist_cases(out / "datalist.json", SIZE)
        assert bool(case_notes(cases, None)[cases[0].name]) is said  # evaluate reads the same spacing, one rule


def test_the_shared_datas_native_spacing_is_the_source_spacing_of_its_npz(tmp_path):
    """The shared CTs are .npz files already at 2.5 mm: their own spacing said nothing of the 4-7 mm scans of class
    B; the manifest.csv beside them keeps each scan's native spacing, which prepare now records."""
    paths = _write_phantoms(tmp_path / "in", seeds=(2, 5))  # two .npz files at 2.5 mm
    (tmp_path / "in" / "manifest.csv").write_text(
        "id,class,native_shape,native_spacing,note\n"
        f"{paths[0].stem},B,64x64x79,4.17x4.17x3.99,\"a note, with a comma\"\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation": [paths[0].stem]}))
    with pytest.warns(UserWarning, match=f"is a scan of low resolution \\({paths[0].stem}: 4.2 mm voxels"):
        prepare_dataset([tmp_path / "in"], tmp_path / "out", split=split, size=SIZE, progress=False)
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    spacing = {e["patient"]: e["source_spacing"] for side in ("training", "validation") for e in datalist[side]}
    assert spacing == {paths[0].stem: [4.17, 4.17, 3.99], paths[1].stem: [2.5, 2.5, 2.5]}  # not listed: its own


def test_a_scan_of_thick_slices_at_fine_spacing_is_said_from_its_dicom_thickness_or_the_manifest(tmp_path, capsys,
                                                                                                 monkeypatch):
    """A scan reconstructed at 2.5 mm spacing from 5 mm thick slices (DICOM Slice Thickness 0018,0050; the shared
    manifest's '0.977x0.977x2.5 (5 mm thick)': tcga_thca_de_a4ma) is blurred head to foot like a 5 mm scan; the
    rule looked at the spacing alone and said nothing. The thickness is kept beside source_spacing."""
    import pydicom

    from XctDiffCore.dicom_series import write_dicom_series
    from XctDiffCore.metrics import low_resolution_problem

    folder = tmp_path / "in"
    folder.mkdir()
    for name, thickness in (("thick", "5"), ("thin", "2.5")):
        write_dicom_series(Volume(np.rint(synthetic_chest((40, 40, 40))).astype(np.int16), spacing=(2.5,) * 3),
                           folder / name)
        for path in (folder / name).iterdir():
            ds = pydicom.dcmread(path)
            ds.SliceThickness = thickness
            ds.save_as(path)
    npz = _write_phantoms(folder, seeds=(2,))[0]
    (folder / "manifest.csv").write_text(f"id,native_spacing\n{npz.stem},0.977x0.977x2.5 (5 mm thick)\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation": ["thick", "thin", npz.stem]}))
    argv = ["prepare", str(folder), "--out", str(tmp_path / "out"), "--split", str(split), "--size", str(SIZE)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("warning: 2 of the 3 validation patients are scans of low resolution (phantom2: 5.0 mm thick slices, 2.5 "
            "mm apart (coarser than 3 mm); thick: 5.0 mm thick slices, 2.5 mm apart (coarser than 3 mm)): ") in err, err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    kept = {e["patient"]: (e["source_spacing"], e.get("source_slice_thickness")) for e in datalist["validation"]}
    assert kept == {"thick": ([2.5] * 3, 5.0), "thin": ([2.5] * 3, 2.5), npz.stem: ([0.977, 0.977, 2.5], 5.0)}
    from XctDiffCore.evaluation.reconstructions import case_notes, datalist_cases

    with pytest.warns(UserWarning, match="scored brought to 128"):  # a --size 32 list: said, and beside the point
        notes = case_notes(datalist_cases(tmp_path / "out" / "datalist.json", SIZE), None)
    coarse = {name: [w for w in words if w.startswith("low resolution")] for name, words in notes.items()}
    assert coarse == {"thick_aug0": ["low resolution: 5.0 mm thick slices, 2.5 mm apart (coarser than 3 mm)"],
                      "thin_aug0": [], f"{npz.stem}_aug0": ["low resolution: 5.0 mm thick slices, 2.5 mm apart "
                                                            "(coarser than 3 mm)"]}  # evaluate: the same rule

    from XctDiffCore import preprocess  # --resume on pairs recorded before the thickness was kept: made again, once

    record = tmp_path / "out" / "images" / "thick.pairs.json"
    old = json.loads(record.read_text())
    record.write_text(json.dumps({**old, "entries": [
        {k: v for k, v in e.items() if k != "source_slice_thickness"} for e in old["entries"]]}))
    prepared, real = [], preprocess.preprocess_ct
    monkeypatch.setattr(preprocess, "preprocess_ct", lambda ct, **kw: prepared.append(ct) or real(ct, **kw))
    assert main([*argv, "--resume"]) == 0
    assert len(prepared) == 1 and "thick: 5.0 mm thick slices" in capsys.readouterr().err
    assert json.loads(record.read_text()) == old
    assert low_resolution_problem([0.6, 0.6, 0.625], 1.25) is None  # overlapping thin slices: fine
    assert low_resolution_problem([0.8, 0.8, 5.0], 1.0) == "5.0 mm voxels (coarser than 3 mm)"  # gaps: the spacing
    assert low_resolution_problem([0.8, 0.8, 2.0], 3.0) is None  # 3 mm itself is not coarser than 3 mm

    # a split whose description names them held them out knowingly (the built-in shared_whole_chest keeps
    # tcga_thca_de_a4ma's 5 mm slices): the line says so, and asks for no other split
    advice = "name finer scans for validation (--split FILE)"
    assert advice in err and "held out knowingly" not in err
    split.write_text(json.dumps({"validation": ["thick", "thin", npz.stem],
                                 "description": f"thick and {npz.stem} have 5 mm slices, kept for their anatomy"}))
    assert main(["prepare", str(folder), "--out", str(tmp_path / "out2"), "--split", str(split), "--size", str(SIZE)]) == 0
    err = capsys.readouterr().err
    assert ("are scans of low resolution (phantom2: 5.0 mm thick slices, 2.5 mm apart (coarser than 3 mm); thick: 5.0 "
            "mm thick slices, 2.5 mm apart (coarser than 3 mm)): the evaluation protocol scores scans of 3 mm or finer, "
            "and a blurred truth scores a model's bone against bone it does not show; the split's description names "
            "them: held out knowingly, so read their scores with that in mind") in err, err
    assert advice not in err


def test_a_ct_stored_as_0_to_4095_without_its_rescale_is_refused_naming_the_file(tmp_path, capsys):
    """A CT saved in raw scanner units (0..4095, air 0: a DICOM without Rescale Intercept, a NIfTI converted so) was
    prepared without a word: every voxel 1024 HU too high, air read as tissue, a chest-sized block of body."""
    folder = tmp_path / "in"
    folder.mkdir()
    raw = write_volume(Volume((synthetic_chest((40, 40, 40)) + 1024).astype(np.uint16), spacing=(2.5,) * 3),
                       folder / "raw.nrrd")
    write_volume(Volume(synthetic_chest((40, 40, 40)).astype(np.int16), spacing=(2.5,) * 3), folder / "hu.nrrd")
    argv = ["prepare", str(folder), "--out", str(tmp_path / "out"), "--val-fraction", "0", "--size", str(SIZE)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("left out", "error"))]
    assert len(err) == 2 and err[0].startswith("left out raw: ") and err[0].endswith(f"({raw})"), err
    assert "not in Hounsfield units" in err[0] and "-1024" in err[0], err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert [e["patient"] for e in datalist["training"]] == ["hu"]


def test_augmentation_is_seeded_small_and_keeps_air():
    ct = synthetic_chest((48, 48, 48))
    augment = RandomChestAugment()
    a = augment(ct, np.random.default_rng(7))
    b = augment(ct, np.random.default_rng(7))
    c = augment(ct, np.random.default_rng(8))
    assert a.shape == ct.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1024.0 and a.max() <= 3071.0
    # Small: the body (lungs included) mostly overlaps its old place, yet it did move.
    body, moved = ct > -950, a > -950
    dice = 2 * (body & moved).sum() / (body.sum() + moved.sum())
    assert 0.85 < dice < 0.99
    # Air stays air: an empty volume comes back empty, whatever the intensity jitter.
    air = np.full((24, 24, 24), -1024.0, dtype=np.float32)
    np.testing.assert_array_equal(augment(air, np.random.default_rng(1)), air)


def test_prepare_on_shared_data(shared_data, tmp_path, capsys):
    paths = sorted((shared_data / "ct").glob("*.npz"))[:3]
    out = tmp_path / "shared"
    assert main(["prepare", *map(str, paths), "--out", str(out), "--augment", "1", "--val-fraction", "0.34"]) == 0
    _check_datalist(out, n_patients=3, augment=1, size=128)


def test_prepare_on_a_full_disk_is_one_error_line(tmp_path, capsys, file_size_limit):
    paths = _write_phantoms(tmp_path / "in", seeds=(0, 1))
    out = tmp_path / "out"
    file_size_limit(4096)  # smaller than any CT the run writes
    assert main(["prepare", *map(str, paths), "--out", str(out), "--size", str(SIZE)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "File too large" in err[0], err
    assert not (out / "datalist.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file()]  # no file, whole or partial


def _tcia_download(root):
    """A TCIA-style download (LIDC-IDRI's layout): <patient>/<study>/<series>/ with DICOM CT series, a CR film
    and a CT localizer beside them, annotation files in the series folders; patient P2 has two CTs."""
    import pydicom

    from XctDiffCore.dicom_series import write_dicom_series

    def series(patient, study, name, seed, image_type=None, slices=20):
        ct = np.rint(synthetic_chest((slices, 24, 24), seed=seed)).astype(np.int16)
        folder = root / patient / study / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_dicom_series(Volume(ct, spacing=(12.0, 12.0, 8.0)), folder)
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path)
            ds.PatientID = patient
            if image_type:
                ds.ImageType = image_type
            ds.save_as(path)
        (folder / "069.xml").write_text("<LidcReadMessage/>")
        return folder

    series("P1", "study-a", "ct-1", 0)
    series("P2", "study-a", "ct-1", 1)
    series("P2", "study-b", "ct-2", 2)
    series("P3", "study-a", "ct-1", 3)
    series("P3", "study-a", "scout", 4, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], slices=3)
    film = series("P4", "study-a", "ct-1", 5)
    film_folder = root / "P1" / "study-c" / "cr-1"
    film_folder.mkdir(parents=True)
    ds = pydicom.dcmread(sorted(film.glob("IM*.dcm"))[0])
    ds.Modality = "CR"
    ds.save_as(film_folder / "1-1.dcm")


def test_prepare_reads_a_tcia_download_and_keeps_each_patient_on_one_side(tmp_path, capsys):
    _tcia_download(tmp_path / "LIDC")
    ignored = []
    cts = find_ct_inputs([tmp_path / "LIDC"], ignored)
    assert [(c.patient, c.subject) for c in cts] == [("P1", "P1"), ("P2", "P2"), ("P2_2", "P2"), ("P3", "P3"),
                                                      ("P4", "P4")]
    assert sorted(i.reason for i in ignored) == ["CT localizer", "modality CR"]
    for seed in range(6):  # P2's two CTs are never split apart
        training, validation = split_cases(cts, None, 0.5, seed)
        assert ("P2" in training) == ("P2_2" in training) and ("P2" in validation) == ("P2_2" in validation)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation": ["P2_2"]}))  # naming one CT holds out its patient
    assert split_cases(cts, split, 0.2, 0) == (["P1", "P3", "P4"], ["P2", "P2_2"])
    by_folder = find_ct_inputs([tmp_path / "LIDC"], naming="folder")  # the folders above, as many as it takes
    assert [c.patient for c in by_folder] == ["P1_study-a_ct-1", "P2_study-a_ct-1", "ct-2", "P3_study-a_ct-1",
                                              "P4_study-a_ct-1"]
    assert [c.subject for c in by_folder] == [c.patient for c in by_folder]

    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "LIDC"), "--out", str(out), "--size", str(SIZE), "--split",
                 str(split)]) == 0
    captured = capsys.readouterr()
    assert "ignored 2 DICOM series that are not a CT volume (CT localizer: 1, modality CR: 1)" in captured.err
    assert "training 3 pairs / 3 patients, validation 2 pairs / 1 patient" in captured.out
    datalist = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert [(e["patient"], e.get("subject")) for e in datalist["validation"]] == [("P2", None), ("P2_2", "P2")]


def test_two_reconstructions_of_one_scan_are_named_in_one_warning(tmp_path, capsys):
    """A soft-tissue and a lung-kernel series of one scan in one folder (one study, one frame of reference), or two
    NIfTI/NRRD files of one field of view, became two training CTs without a word: that scan weighed twice (and two
    files, each a subject of its own, could land on both sides of the split). Now one warning line names them."""
    import pydicom

    from XctDiffCore.dicom_series import write_dicom_series

    folder = tmp_path / "in" / "P7"
    for name, kernel, thickness, study in (("soft", "B30f", "5", "1.2.3"), ("lung", "B70f", "1", "1.2.3"),
                                           ("later", "B30f", "5", "1.2.4")):
        write_dicom_series(Volume(np.rint(synthetic_chest((12, 24, 24))).astype(np.int16), spacing=(12.0, 12.0, 8.0)),
                           tmp_path / name)
        for path in sorted((tmp_path / name).iterdir()):
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "P7", study, study + ".9"
            ds.ConvolutionKernel, ds.SliceThickness = kernel, thickness
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{name}-{path.name}")
    files = tmp_path / "in" / "files"
    files.mkdir()
    chest = np.rint(synthetic_chest((40, 40, 40))).astype(np.int16)
    write_volume(Volume(chest, spacing=(2.5, 2.5, 2.5), origin=(-50.0, -50.0, -300.0)), files / "a_thin.nrrd")
    write_volume(Volume(chest[::2], spacing=(2.5, 2.5, 5.0), origin=(-50.0, -50.0, -298.0)), files / "a_thick.nii.gz")
    write_volume(Volume(chest, spacing=(2.5, 2.5, 2.5), origin=(-50.0, -50.0, -100.0)), files / "b.nrrd")  # elsewhere
    write_volume(Volume(chest, spacing=(2.5, 2.5, 2.5)), files / "c.nrrd")  # no position: not told apart, passed over
    write_volume(Volume(chest, spacing=(2.5, 2.5, 2.5)), files / "d.nrrd")
    with pytest.warns(UserWarning) as caught:
        cts = find_ct_inputs([tmp_path / "in"])
    assert sorted(c.patient for c in cts) == ["P7", "P7_2", "P7_3", "a_thick", "a_thin", "b", "c", "d"]
    said = [str(w.message) for w in caught if "reconstructions" in str(w.message)]
    assert said == [f"4 CTs look like reconstructions of 2 scans (P7_2 (B70f, 1 mm) and P7_3 (B30f, 5 mm): one DICOM "
                    f"study and frame of reference; a_thick and a_thin: one field of view in {files}): each is taken "
                    "as a CT of its own, so that scan weighs twice in training and in a score, and may be trained on "
                    "and validated on at once; keep one (the thinnest slices and the softest kernel, as a rule) and "
                    "move the others out"], said
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", str(SIZE),
                 "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: 4 CTs look like reconstructions of 2 scans (P7_2 (B70f, 1 mm) and P7_3") == 1, err


def test_the_search_bar_counts_each_folder_with_its_series(tmp_path, monkeypatch):
    """The bar's "N CT series" was set before each folder was looked into: one folder late, and the last folder's
    series were never counted on it."""
    pytest.importorskip("SimpleITK")
    import tqdm

    from XctDiffCore.dicom_series import write_dicom_series

    (tmp_path / "in").mkdir()
    write_dicom_series(Volume(np.rint(synthetic_chest((4, 16, 16))).astype(np.int16), spacing=(8.0, 8.0, 8.0)),
                       tmp_path / "in" / "series")
    shown = []

    class Bar(tqdm.tqdm):
        def update(self, n=1):
            super().update(n)
            shown.append((self.n, self.postfix))

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr("XctDiffCore.progress.is_terminal", lambda stream: True)  # the bar is for a terminal
    assert len(find_ct_inputs([tmp_path / "in"], progress=True)) == 1
    assert shown == [(1, "0 CT series"), (2, "1 CT series")]  # the folder searched, then its series folder


def test_a_log_file_gets_progress_lines_with_the_time_left_not_redrawn_bars(tmp_path, capsys):
    """`xctdiff prepare ... 2> log` (a cluster job, nohup) filled the log with one very long line of bars redrawn
    with carriage returns; the search's bar too. Without a terminal each now writes plain lines: done of total and
    the time left, as the training stages do."""
    import re

    from XctDiffCore.progress import ProgressLines

    _write_phantoms(tmp_path / "in")
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", str(SIZE)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err
    assert re.search(r"^prepare: 1 of 3 pairs, (\d+ min \d\d s|\d+ s) left \(phantom\d\)$", err, re.M), err
    assert re.search(r"^prepare: 3 of 3 pairs \(phantom\d\)$", err, re.M), err
    lines = ProgressLines(40, "search", "folder")
    lines.started -= 100  # 100 s for the first 10 folders: 5 min for the 30 left
    lines.update(10)
    assert lines.line() == "search: 10 of 40 folders, 5 min 00 s left"
    assert "search: 10 of 40 folders, 5 min 00 s left" in capsys.readouterr().err


def test_prepare_leaves_out_a_broken_ct_and_ends_with_one_error(tmp_path, capsys):
    _tcia_download(tmp_path / "LIDC")
    sorted((tmp_path / "LIDC" / "P3" / "study-a" / "ct-1").glob("IM*.dcm"))[10].unlink()  # a missing slice
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "LIDC"), "--out", str(out), "--size", str(SIZE), "--val-fraction",
                 "0"]) == 2
    captured = capsys.readouterr()
    assert "left out P3: the DICOM series in" in captured.err and "missing or unevenly spaced slices" in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "1 CT could not be read and was left out" in errors[0]
    assert "training 4 pairs / 3 patients" in captured.out and "left out: 1 CT" in captured.out
    datalist = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert [e["patient"] for e in datalist["training"]] == ["P1", "P2", "P2_2", "P4"]
    assert [e["patient"] for e in datalist["left_out"]] == ["P3"]


def test_one_patient_id_for_every_ct_is_refused_unless_named_by_folder(tmp_path, capsys):
    _tcia_download(tmp_path / "LIDC")
    one_patient = tmp_path / "LIDC" / "P2"
    assert main(["prepare", str(one_patient), "--out", str(tmp_path / "a"), "--size", str(SIZE)]) == 2
    assert "all carry the DICOM PatientID 'P2'" in capsys.readouterr().err
    assert main(["prepare", str(one_patient), "--out", str(tmp_path / "b"), "--size", str(SIZE), "--ids",
                 "folder"]) == 0
    assert "training 1 pair / 1 patient, validation 1 pair / 1 patient" in capsys.readouterr().out


def test_a_patient_folder_given_as_one_ct_names_the_series_below_it(tmp_path, capsys):
    _tcia_download(tmp_path / "LIDC")
    assert main(["inspect", str(tmp_path / "LIDC" / "P2")]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "no DICOM series found in" in error and "below it: 2 DICOM CT series, e.g." in error
    assert str(tmp_path / "LIDC" / "P2" / "study-") in error and "`xctdiff prepare` takes the whole folder" in error


def test_workers_write_the_same_data_set(tmp_path, capsys):
    _write_phantoms(tmp_path / "in")
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert main(["prepare", str(tmp_path / "in"), "--out", str(out), "--size", str(SIZE), "--augment", "1",
                     "--workers", workers]) == 0
        outputs.append(out)
    one, two = outputs
    assert (one / "datalist.json").read_bytes() == (two / "datalist.json").read_bytes()
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * (2 * 3 + 1)  # the datalist; 3 patients x (2 pairs x (CT, DRR, preview), record)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "bad"), "--workers", "-1"]) == 2
    assert "--workers must be 0 (one per core) or more" in capsys.readouterr().err


def test_a_data_set_written_inside_the_input_folder_is_not_read_as_ct(tmp_path, capsys):
    """Another data set in the folder searched is passed over with a warning; the job's own --out, silently."""
    _write_phantoms(tmp_path / "in")
    out, other = tmp_path / "in" / "prepared", tmp_path / "in" / "other"  # their pairs are .npz CTs by suffix
    for folder in (out, out, other):
        assert main(["prepare", str(tmp_path / "in"), "--out", str(folder), "--size", str(SIZE), "--augment", "1"]) == 0
        captured = capsys.readouterr()
        assert "training 4 pairs / 2 patients, validation 2 pairs / 1 patient" in captured.out.splitlines()[-1]
        assert ("passed over" in captured.err) == (folder == other)
    assert f"warning: passed over {out}: a data set written by `xctdiff prepare`" in captured.err


def test_resume_inside_the_input_folder_does_not_read_its_own_pairs(tmp_path, capsys):
    """An interrupted prepare into a folder inside the one searched leaves pairs and no datalist (which marks a
    data set): --resume, the --out named directly or through a link, read them back as patients of their own
    (phantom0_aug0, ...). The folder searched inside --out, or --out itself, is refused in one line."""
    _write_phantoms(tmp_path / "in")
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    out = tmp_path / "in" / "ds"
    for named in (out, tmp_path / "alias" / "ds"):
        argv = ["prepare", str(tmp_path / "in"), "--out", str(named), "--size", str(SIZE)]
        assert main(argv) == 0
        (out / "datalist.json").unlink()  # interrupted before its datalist
        assert main([*argv, "--resume"]) == 0
        datalist = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
        assert sorted(e["patient"] for e in datalist["training"] + datalist["validation"]) == [
            "phantom0", "phantom1", "phantom2"]
        assert "passed over" not in capsys.readouterr().err
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for searched, named in ((tmp_path / "in", tmp_path / "in"), (out / "images", out), (out, tmp_path / "alias")):
        assert main(["prepare", str(searched), "--out", str(named), "--size", str(SIZE)]) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert error == (f"error: {searched} is in the output folder {named}: a job does not read its own outputs "
                         "back as inputs; write the output to a folder outside it")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing made, nothing left


def test_a_data_set_being_prepared_is_refused_to_a_second_prepare(tmp_path, capsys):
    """A job submitted twice, or a --resume while the first still runs: the two wrote the same pairs and datalist
    in turns. The second is refused in one line before it searches, the folder (here an interrupted run's pairs)
    left as it was; once the first has ended, --resume finishes the data set and no lock file is left in it."""
    _write_phantoms(tmp_path / "in")
    out = tmp_path / "ds"
    argv = ["prepare", str(tmp_path / "in"), "--out", str(out), "--size", str(SIZE)]
    assert main(argv) == 0
    (out / "datalist.json").unlink()
    for extra in ([], ["--resume"]):
        check_refused_while_held(argv + extra, out, "xctdiff prepare", capsys)
    assert main(argv + ["--resume"]) == 0
    assert (out / "datalist.json").is_file() and not list(out.rglob(".lock"))


def test_resume_prepares_only_the_cts_not_done_and_writes_the_same_data_set(tmp_path, monkeypatch):
    """An interrupted prepare (here: one CT's pairs and the datalist never written) continued with --resume
    prepares that CT alone and writes the data set of an uninterrupted run, mixes included; a CT whose file
    changed, or other settings, are prepared again."""
    import os

    from XctDiffCore import preprocess

    paths = _write_phantoms(tmp_path / "in")
    argv = ["prepare", str(tmp_path / "in"), "--size", str(SIZE), "--augment", "1", "--mix", "1"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "resumed"
    assert main([*argv, "--out", str(out)]) == 0
    (out / "datalist.json").unlink()
    for name in ("phantom1.pairs.json", "phantom1_aug1.npz"):
        (out / "images" / name).unlink()
    prepared, real = [], preprocess.preprocess_ct
    monkeypatch.setattr(preprocess, "preprocess_ct", lambda ct, **kw: prepared.append(ct) or real(ct, **kw))

    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert len(prepared) == 1
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes() for f in files if f.suffix != ".json"
               or f.name == "datalist.json")

    os.utime(paths[0], ns=(1, 1))  # a source that changed since
    prepared.clear()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert len(prepared) == 1
    prepared.clear()
    assert main([*argv[:-4], "--augment", "0", "--mix", "1", "--out", str(out), "--resume"]) == 0  # other settings
    assert len(prepared) == 3


def test_an_interrupted_prepare_says_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C while preparing ended on a bare `error: interrupted`: that the CTs done are kept and --resume goes on
    was in the README alone. Its last lines say so now, and --resume then prepares only the rest."""
    from XctDiffCore import preprocess

    _write_phantoms(tmp_path / "in")
    argv = ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", str(SIZE), "--workers", "1"]
    prepared, real = [], preprocess.preprocess_ct

    def stopped_at_the_second(ct, **kw):
        prepared.append(ct)
        if len(prepared) == 2:
            raise KeyboardInterrupt
        return real(ct, **kw)

    monkeypatch.setattr(preprocess, "preprocess_ct", stopped_at_the_second)
    capsys.readouterr()
    assert main(argv) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2:] == [f"prepare: stopped with 1 of 3 CTs prepared in {tmp_path / 'out'}; the same command with "
                          "--resume keeps them and prepares the rest", "error: interrupted"], lines
    prepared.clear()
    monkeypatch.setattr(preprocess, "preprocess_ct", lambda ct, **kw: prepared.append(ct) or real(ct, **kw))
    assert main([*argv, "--resume"]) == 0
    assert len(prepared) == 2


def test_a_reconstruction_among_the_cts_is_named_in_a_warning(tmp_path, capsys):
    """A CT that XctDiff wrote (its header says so) is no scan: training on it would teach the model its own output."""
    _write_phantoms(tmp_path / "in", seeds=(0, 1))
    ct = np.rint(synthetic_chest((40, 40, 40), seed=5)).astype(np.int16)
    write_volume(Volume(ct, spacing=(2.5, 2.5, 2.5)), tmp_path / "in" / "film_ct.nrrd",
                 notes={"summary": "XctDiff synthetic CT, research use only: test"})
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", str(SIZE)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of the CTs is XctDiff's own reconstruction, not a scan (film_ct.nrrd)" in err
    # DICOM series (--format dicom) are named by their folders, not by their first files' common name
    from XctDiffCore.dicom_series import write_dicom_series

    for name in ("first_ct", "second_ct"):
        write_dicom_series(Volume(ct, spacing=(2.5, 2.5, 2.5)), tmp_path / "in" / name,
                           derivation="reconstructed from one radiograph by XctDiff")
    main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--size", str(SIZE), "--ids", "folder"])
    err = capsys.readouterr().err
    assert "3 of the CTs are XctDiff's own reconstructions, not scans (" in err
    assert "first_ct" in err and "second_ct" in err and "IM0001.dcm" not in err, err


def test_resume_sees_a_changed_slice_of_a_dicom_series(tmp_path, monkeypatch):
    """A DICOM CT is found as one of its files, and read whole: a change to any of its slices prepares it again."""
    import os

    from XctDiffCore import preprocess

    _tcia_download(tmp_path / "LIDC")
    argv = ["prepare", str(tmp_path / "LIDC"), "--out", str(tmp_path / "out"), "--size", str(SIZE)]
    assert main(argv) == 0
    prepared, real = [], preprocess.preprocess_ct
    monkeypatch.setattr(preprocess, "preprocess_ct", lambda ct, **kw: prepared.append(ct) or real(ct, **kw))
    assert main([*argv, "--resume"]) == 0 and prepared == []
    last = sorted((tmp_path / "LIDC" / "P3" / "study-a" / "ct-1").glob("*.dcm"))[-1]
    os.utime(last, ns=(last.stat().st_mtime_ns + 10**9,) * 2)
    assert main([*argv, "--resume"]) == 0 and len(prepared) == 1
