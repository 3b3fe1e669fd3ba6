"""Model folders (XctDiffCore/model_folder.py): create_random_model makes a valid one; load_model_folder
(and so XctDiffPipeline.from_pretrained and every command with --model) refuses a corrupted, incomplete
or mixed folder with one XctDiffError sentence, which the CLI prints as `error: ...` with exit status 2."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_RADIOGRAPH
from safetensors.torch import load_file

from XctDiffCore.commands.cli import main
from XctDiffCore.config import load_config
from XctDiffCore.errors import XctDiffError
from XctDiffCore.model_folder import MANIFEST_NAME, bundled_model_folder, create_random_model, file_sha256, load_model_folder
from XctDiffCore.pipeline import XctDiffPipeline

STAGE_FILES = [f"{stage}.{ext}" for stage in ("autoencoder", "diffusion", "encoder", "style") for ext in ("json", "safetensors")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", mean_ct=True)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A valid model of another latent size (4 channels instead of 8): its stages do not fit the tiny model's."""
    config = load_config("tiny")
    for section in (config.autoencoder, config.encoder, config.diffusion):
        section.model.latent_channels = 4
    return create_random_model(tmp_path_factory.mktemp("other") / "other", config)


@pytest.fixture
def folder(pristine, tmp_path):
    """A fresh copy of the valid model folder, to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


# ------------------------------------------------------------------------------------------ edits


def read_manifest_json(folder):
    return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))


def write_manifest_json(folder, manifest):
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def resign(folder):
    """Record the current checksums and stage settings, so that a deliberate edit reaches the checks after them."""
    manifest = read_manifest_json(folder)
    for record in manifest["stages"].values():
        record["settings"] = json.loads((folder / record["config"]).read_text(encoding="utf-8"))
    manifest["sha256"] = {name: file_sha256(folder / name) for name in manifest["sha256"]}
    write_manifest_json(folder, manifest)


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(change):
    def apply(folder, other):
        manifest = read_manifest_json(folder)
        change(manifest)
        write_manifest_json(folder, manifest)

    return apply


def edit_stage_json(name, change):
    def apply(folder, other):
        settings = json.loads((folder / name).read_text(encoding="utf-8"))
        change(settings)
        (folder / name).write_text(json.dumps(settings), encoding="utf-8")
        resign(folder)

    return apply


def transplant(stage):
    """The stage's files from the other model, re-signed: every checksum is right, the shapes are not."""

    def apply(folder, other):
        for ext in ("json", "safetensors"):
            shutil.copy(other / f"{stage}.{ext}", folder / f"{stage}.{ext}")
        resign(folder)

    return apply


def transplant_same_shape(stage):
    """The stage's files from a model of the same config and another seed, re-signed: every checksum and shape is
    right, but its autoencoder makes other latents than the encoder and diffusion learnt (garbage CTs, silently)."""

    def apply(folder, other):
        same_shape = create_random_model(folder.parent / "seed1", "tiny", seed=1, with_style=False)
        for ext in ("json", "safetensors"):
            shutil.copy(same_shape / f"{stage}.{ext}", folder / f"{stage}.{ext}")
        resign(folder)

    return apply


def replace_file(name, content: bytes):
    def apply(folder, other):
        (folder / name).write_bytes(content)
        resign(folder)

    return apply


def replace_mean_ct(folder, other):
    with open(folder / "mean_ct.npy", "wb") as f:
        np.save(f, np.zeros((16, 16, 16), np.float32))
    resign(folder)


def link_out(name, through_folder: bool):
    """``name`` moved out of the folder (beside it) and reached through a link: to the file itself, or
    to the outside folder as a sub-folder of the model (the manifest then names ``outside/<name>``)."""

    def apply(folder, other):
        outside = folder.parent / "outside"
        outside.mkdir(exist_ok=True)
        shutil.move(folder / name, outside / name)
        if through_folder:
            (folder / "outside").symlink_to(outside, target_is_directory=True)
            manifest = read_manifest_json(folder)
            manifest["sha256"][f"outside/{name}"] = manifest["sha256"].pop(name)
            for record in manifest["stages"].values():
                for role, file_name in record.items():
                    if file_name == name:
                        record[role] = f"outside/{name}"
            write_manifest_json(folder, manifest)
        else:
            (folder / name).symlink_to(outside / name)

    return apply


def set_path(keys, value):
    def change(document):
        for key in keys[:-1]:
            document = document.setdefault(key, {})
        document[keys[-1]] = value

    return change


# name -> (corrupt(folder, other_model), words the message must contain)
CORRUPTIONS = {
    "weights: one byte changed": (lambda f, o: flip_one_byte(f / "autoencoder.safetensors"),
                                  "autoencoder.safetensors does not match its SHA-256"),
    "config: one byte changed": (lambda f, o: flip_one_byte(f / "encoder.json"), "encoder.json does not match its SHA-256"),
    "style weights: one byte changed": (lambda f, o: flip_one_byte(f / "style.safetensors"), "style.safetensors does not match"),
    "mean CT: one byte changed": (lambda f, o: flip_one_byte(f / "mean_ct.npy"), "mean_ct.npy does not match"),
    "model card edited": (lambda f, o: (f / "MODEL_CARD.md").write_text("edited\n"), "MODEL_CARD.md does not match"),
    "weights missing": (lambda f, o: (f / "diffusion.safetensors").unlink(), "model file missing"),
    "stage config missing": (lambda f, o: (f / "encoder.json").unlink(), "model file missing"),
    "manifest missing": (lambda f, o: (f / MANIFEST_NAME).unlink(),
                         "holds a model folder's files (MODEL_CARD.md, autoencoder.json, ...) but no manifest.json"),
    "manifest not JSON": (lambda f, o: (f / MANIFEST_NAME).write_text("{ truncated"), "cannot read"),
    "manifest missing a stage": (edit_manifest(lambda m: m["stages"].pop("diffusion")), "lacks the diffusion stage"),
    "manifest without stages": (edit_manifest(lambda m: m.pop("stages")), "has no 'stages' section"),
    "manifest without checksums": (edit_manifest(lambda m: m.pop("sha256")), "refusing to load unverified weights"),
    "stage file without checksum": (edit_manifest(lambda m: m["sha256"].pop("encoder.safetensors")),
                                    "encoder.safetensors has no SHA-256"),
    "stage names no weights": (edit_manifest(lambda m: m["stages"]["encoder"].pop("weights")), "stage encoder names no weights"),
    "file outside the folder": (edit_manifest(set_path(["sha256", "../escape.bin"], "0" * 64)), "leaves the model folder"),
    "weights linked from outside": (link_out("diffusion.safetensors", through_folder=False), "leaves the model folder"),
    "weights in a linked folder": (link_out("encoder.safetensors", through_folder=True), "leaves the model folder"),
    "manifest linked from outside": (link_out(MANIFEST_NAME, through_folder=False), "leaves the model folder"),
    "manifest and stage file disagree": (edit_manifest(set_path(["stages", "encoder", "settings", "model", "depth"], 16)),
                                         "disagree on the encoder settings"),
    "mismatched stages: encoder": (transplant("encoder"), "the encoder's latent (4, 8, 8, 8) differs from the autoencoder's (8, 8, 8, 8)"),
    "mismatched stages: diffusion": (transplant("diffusion"), "the diffusion model has 4 latent channels, the autoencoder 8"),
    "mismatched stages: another model's autoencoder": (transplant_same_shape("autoencoder"),
                                                       "the encoder and diffusion in "),
    "mismatched stages: another model's encoder": (transplant_same_shape("encoder"),
                                                   "learnt the latents of another autoencoder than the folder's"),
    "mismatched stages: manifest volume size": (edit_manifest(set_path(["data", "volume_size"], 64)), "differs from the autoencoder's"),
    "mismatched stages: manifest image size": (edit_manifest(set_path(["data", "xray_size"], 64)),
                                               "the encoder takes 32 px radiographs, the manifest says 64"),
    "mismatched stages: style size": (edit_stage_json("style.json", set_path(["image_size"], 64)), "the style stage works on 64 px"),
    "weights do not fit the config": (edit_stage_json("encoder.json", set_path(["model", "channels_2d"], [8, 16, 64])),
                                      "do not match its configuration"),
    "config does not fit the network": (edit_stage_json("diffusion.json", set_path(["model", "wings"], 2)), "does not fit LatentUNet"),
    "weights not a safetensors file": (replace_file("encoder.safetensors", b"not safetensors at all"), "cannot read the encoder weights"),
    "unknown geometry": (edit_manifest(set_path(["data", "geometry"], "fan")), "unknown DRR geometry 'fan'"),
    "unknown sampler": (edit_stage_json("diffusion.json", set_path(["sampler"], "euler")), "unknown default sampler 'euler'"),
    "bad schedule": (edit_stage_json("diffusion.json", set_path(["schedule", "beta_end"], 2.0)), "diffusion schedule"),
    "unknown prediction": (edit_stage_json("diffusion.json", set_path(["schedule", "prediction"], "x0")),
                           "is invalid: prediction must be one of epsilon, v, got 'x0'"),
    "mean CT of another size": (replace_mean_ct, "has shape (16, 16, 16), expected (32, 32, 32)"),
    "consistency minimum out of range": (edit_manifest(set_path(["min_consistency"], 1.5)),
                                         "min_consistency must be a number from 0 to 1, got 1.5"),
    # hand edits of the manifest's unchecksummed parts: each was a traceback (AttributeError, ValueError,
    # ZeroDivisionError) or, for a newer format, a folder loaded as if this engine understood it
    "data section not an object": (edit_manifest(set_path(["data"], "128")), "'data' must be an object"),
    "volume size not a number": (edit_manifest(set_path(["data", "volume_size"], "big")),
                                 "data.volume_size must be a whole number of voxels or pixels, got 'big'"),
    "volume size zero": (edit_manifest(set_path(["data", "volume_size"], 0)), "data.volume_size must be a whole number"),
    "spacing not a number": (edit_manifest(set_path(["data", "spacing_mm"], "2.5 mm")),
                             "data.spacing_mm must be a positive number of millimetres, got '2.5 mm'"),
    "format newer than this engine": (edit_manifest(set_path(["format"], 2)),
                                      "is model format 2, made by a newer XctDiff than this one (it reads format 1): "
                                      "update XctDiff"),
    "format not a number": (edit_manifest(set_path(["format"], "2.0")), "format must be a whole number from 1, got '2.0'"),
    "newer format laid out otherwise": (edit_manifest(lambda m: m.update(format=3, networks=m.pop("stages"))),
                                        "is model format 3, made by a newer XctDiff"),
}


# ------------------------------------------------------------------------------------------ valid folders


def test_random_model_folder_is_complete_and_loads(pristine):
    names = {p.name for p in pristine.iterdir()}
    assert names == {MANIFEST_NAME, "MODEL_CARD.md", "mean_ct.npy", *STAGE_FILES}
    manifest = read_manifest_json(pristine)
    assert set(manifest["sha256"]) == names - {MANIFEST_NAME}  # every file but the manifest is checksummed
    assert all(manifest["sha256"][n] == file_sha256(pristine / n) for n in manifest["sha256"])
    assert manifest["data"] == {"volume_size": 32, "xray_size": 32, "spacing_mm": 10.0, "geometry": "cone"}
    assert manifest["format"] == 1  # what a later engine raises when a folder means more than this one reads
    loaded = load_model_folder(pristine)
    info = loaded.info
    assert (info.model_id, info.version, info.volume_size, info.xray_size) == ("random", "seed0", 32, 32)
    assert (info.spacing_mm, info.geometry, info.sampler, info.steps) == (10.0, "cone", "ddim", 5)
    assert info.folder == pristine.resolve()
    for network in (loaded.vqgan, loaded.encoder, loaded.unet, loaded.style):
        assert not network.training
        assert not any(p.requires_grad for p in network.parameters())
    assert (loaded.schedule.num_train_steps, loaded.schedule.prediction) == (1000, "epsilon")
    assert loaded.mean_ct.shape == (32, 32, 32) and loaded.mean_ct.dtype == np.float32
    assert -1000.0 <= loaded.mean_ct.min() and loaded.mean_ct.max() <= 400.0


def test_same_seed_same_weights(tmp_path):
    a = create_random_model(tmp_path / "a", "tiny", seed=3, with_style=False)
    b = create_random_model(tmp_path / "b", "tiny", seed=3, with_style=False)
    c = create_random_model(tmp_path / "c", "tiny", seed=4, with_style=False)
    for weights in (f"{s}.safetensors" for s in ("autoencoder", "encoder", "diffusion")):
        ta, tb, tc = (load_file(str(folder / weights)) for folder in (a, b, c))
        assert list(ta) == list(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), weights
        assert not all(torch.equal(ta[k], tc[k]) for k in ta), weights
        assert file_sha256(a / weights) == file_sha256(b / weights), f"{weights}: an export must be byte-reproducible"
    assert not (a / "style.safetensors").exists() and not (a / "mean_ct.npy").exists()
    loaded = load_model_folder(a)
    assert loaded.style is None and loaded.mean_ct is None
    assert "style" not in read_manifest_json(a)["stages"]


def test_a_folder_exported_before_the_latents_record_loads_as_before(folder, tmp_path):
    """encoder.json and diffusion.json record the autoencoder whose latents they learnt (the same for both); a folder
    exported before that record is not judged, even with another model's autoencoder, as before."""
    records = [json.loads((folder / f"{stage}.json").read_text(encoding="utf-8"))["latents"] for stage in ("encoder", "diffusion")]
    assert records[0] == records[1] and len(records[0]["fingerprint"]) == 16
    transplant_same_shape("autoencoder")(folder, None)
    with pytest.raises(XctDiffError, match="learnt the latents of another autoencoder"):
        load_model_folder(folder)
    for stage in ("encoder", "diffusion"):
        edit_stage_json(f"{stage}.json", lambda settings: settings.pop("latents"))(folder, None)
    assert load_model_folder(folder).info.model_id == "random"


def test_pipeline_gets_the_folder_contents(pristine):
    pipe = XctDiffPipeline.from_pretrained(pristine)
    assert pipe.style is not None and pipe.mean_ct.shape == (32, 32, 32)
    assert pipe.info.model_id == "random" and pipe.load_seconds > 0


def test_bundled_model_verifies_and_documents_itself():
    folder = bundled_model_folder()  # the repository ships one: a missing or corrupted one fails here
    loaded = load_model_folder(folder)  # every SHA-256 checked
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["sha256"]["MODEL_CARD.md"] and "not for diagnosis" in (folder / "MODEL_CARD.md").read_text(encoding="utf-8").lower()
    assert manifest["training"]["training_patients"] and manifest["training"]["validation_patients"]
    seen = set(manifest["training"]["training_patients"]) & set(manifest["training"]["validation_patients"])
    assert manifest["training"]["validation_seen_in_training"] == bool(seen)
    if seen:  # retrained on all patients after the recipe was chosen: the card must not sell fit as generalisation
        assert "training fit" in (folder / "MODEL_CARD.md").read_text(encoding="utf-8").lower()
    assert loaded.mean_ct is not None
    assert loaded.info.min_consistency is not None  # calibrated: see Testing/Scripts/consistency_survey.py
    assert loaded.info.retrain == ()  # every stage trained on the latents of the autoencoder it ships with
    if loaded.style is None:  # a model without the real -> DRR generator must say so to its users
        assert "no style stage" in (folder / "MODEL_CARD.md").read_text(encoding="utf-8").lower()
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 64 * 2**20


def test_the_bundled_models_name_points_to_it(tmp_path, monkeypatch, capsys):
    """from_pretrained("xctdiff-cpu"), as a model hub takes a name, was 'model folder not found: xctdiff-cpu'."""
    bundled = bundled_model_folder()
    monkeypatch.chdir(tmp_path)
    words = f"model folder not found: {bundled.name}; {bundled.name} is the bundled model: leave out the model"
    with pytest.raises(XctDiffError, match=re.escape(words) + ".*" + re.escape(str(bundled))):
        XctDiffPipeline.from_pretrained(bundled.name)
    shutil.copytree(bundled, tmp_path / bundled.name)  # a folder of that name here is what it names
    assert XctDiffPipeline.from_pretrained(bundled.name).info.folder == (tmp_path / bundled.name).resolve()


def test_no_bundled_model_is_a_clear_error(tmp_path, monkeypatch):
    import XctDiffCore.model_folder as model_folder

    monkeypatch.setattr(model_folder, "__file__", str(tmp_path / "XctDiffCore" / "model_folder.py"))
    with pytest.raises(XctDiffError, match=r"no bundled model found beside the engine .*not editable \(`pip install \.`\)"
                                           r".*`pip install -e \.` in the repository, or give --model DIR"):
        bundled_model_folder()


# ------------------------------------------------------------------------------------------ refused folders


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_folder_is_refused(folder, other_model, case):
    corrupt, words = CORRUPTIONS[case]
    corrupt(folder, other_model)
    with pytest.raises(XctDiffError) as info:
        load_model_folder(folder)
    message = str(info.value)
    assert words in message, message
    assert "\n" not in message
    with pytest.raises(XctDiffError, match="^" + re.escape(message) + "$"):
        XctDiffPipeline.from_pretrained(folder)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_cli_reconstruct_refuses_a_corrupted_folder(folder, other_model, tmp_path, capsys, case):
    corrupt, words = CORRUPTIONS[case]
    corrupt(folder, other_model)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    status = main(["reconstruct", str(SAMPLE_RADIOGRAPH), "--model", str(folder), "-o", str(out / "ct.nrrd"),
                   "--device", "cpu", "--steps", "1", "--progress-lines"])
    stdout, stderr = capsys.readouterr()
    assert status == 2
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: ") and words in stderr
    assert "RESULT" not in stdout
    assert list(out.iterdir()) == []


def test_a_manifest_saved_by_windows_notepad_loads(folder, capsys):
    """A colleague sets min_consistency in Notepad, which saves UTF-8 with a byte-order mark and CRLF lines: the
    folder was refused ('cannot read manifest.json: Unexpected UTF-8 BOM'); the panel reads it with the same function."""
    manifest = read_manifest_json(folder)
    manifest["min_consistency"] = 0.4
    text = json.dumps(manifest, indent=2).replace("\n", "\r\n")
    (folder / MANIFEST_NAME).write_bytes(text.encode("utf-8-sig"))
    assert load_model_folder(folder).info.min_consistency == 0.4
    assert inspected([str(folder)], capsys)[1]["reliability threshold"].startswith("0.4 ")


def test_a_folder_checked_out_with_windows_line_endings_loads(folder, capsys):
    """Git for Windows checks text files out with CRLF endings (core.autocrlf, its default): a model folder kept in a
    repository (the bundled one) reached a Windows user with every JSON and the model card 'not matching its
    SHA-256'. Line endings alone are not a change; a changed character still is."""
    for name in ("encoder.json", "diffusion.json", "MODEL_CARD.md"):
        (folder / name).write_bytes((folder / name).read_bytes().replace(b"\n", b"\r\n"))
    assert load_model_folder(folder).info.model_id == "random"
    assert inspected([str(folder)], capsys)[0] == 0
    (folder / "MODEL_CARD.md").write_bytes((folder / "MODEL_CARD.md").read_bytes().replace(b"random", b"Random"))
    with pytest.raises(XctDiffError, match="MODEL_CARD.md does not match its SHA-256"):
        load_model_folder(folder)


def test_the_bytes_that_are_checked_are_the_bytes_that_are_loaded(pristine, folder, tmp_path, monkeypatch):
    """A weights file replaced between the checksum and the loading (another process, a swapped disk)
    must not be what gets loaded: the file is read once, hashed, and those bytes deserialised."""
    import XctDiffCore.model_folder as model_folder

    swapped = create_random_model(tmp_path / "swapped", "tiny", seed=1) / "autoencoder.safetensors"
    settings = model_folder._stage_settings

    def swap_then_settings(*args, **kwargs):  # runs after the checksums, before the weights are read
        shutil.copy(swapped, folder / "autoencoder.safetensors")
        return settings(*args, **kwargs)

    monkeypatch.setattr(model_folder, "_stage_settings", swap_then_settings)
    loaded = load_model_folder(folder).vqgan.state_dict()
    assert file_sha256(folder / "autoencoder.safetensors") == file_sha256(swapped)  # the swap did happen
    expected = load_file(str(pristine / "autoencoder.safetensors"))
    assert all(torch.equal(loaded[k].to(expected[k].dtype), expected[k]) for k in expected)


def autoencoder_only(folder: Path) -> Path:
    """The folder as a partial one (Resources/Pretrained/xctdiff-cpu-autoencoder's kind): the later stages gone."""
    edit_manifest(lambda manifest: [manifest["stages"].pop(stage) for stage in ("encoder", "diffusion")])(folder, None)
    return folder


def zipped(folder: Path) -> Path:
    return Path(shutil.make_archive(str(folder.parent / "shared model"), "zip", folder.parent, folder.name))


@pytest.mark.parametrize(
    "make, words",
    [(lambda d, m: d / "absent", "model folder not found"),
     (lambda d, m: shutil.copy(SAMPLE_RADIOGRAPH, d / "model.png") and d / "model.png", "expected a model folder, got a file"),
     (lambda d, m: (d / "empty").mkdir() or d / "empty", "not a model folder (no manifest.json)"),
     (lambda d, m: m / MANIFEST_NAME, "expected a model folder, got one of its files: {m}/manifest.json; give the folder "
                                      "that holds it: {m}"),
     (lambda d, m: m / "encoder.safetensors", "got one of its files: {m}/encoder.safetensors; give the folder that holds it"),
     (lambda d, m: zipped(m), "expected a model folder, got an archive: {d}/shared model.zip; unpack it and give the folder "
                              "that holds manifest.json"),
     (lambda d, m: autoencoder_only(m), "lacks the encoder, diffusion stage(s) (a partial model folder, which cannot "
                                        "reconstruct: the later stages train on it with xctdiff train STAGE --init)"),
     (lambda d, m: d, "not a model folder (no manifest.json): {d}; the model folder in it: {m}"),
     (lambda d, m: " ", "the model folder given is an empty name: give a model folder, or none for the bundled model")],
    ids=["missing", "a file", "empty folder", "its manifest", "its weights", "a zip of it", "autoencoder only",
         "the folder above it", "an empty name"],
)
def test_not_a_model_folder(folder, tmp_path, make, words):
    """What a colleague may give instead of the model folder: each says what to give instead (the file's folder,
    the archive unpacked, the model folder inside the one given; before, 'expected a model folder, got a file' and
    'not a model folder' said neither)."""
    with pytest.raises(XctDiffError, match=re.escape(words.format(d=tmp_path, m=folder))):
        XctDiffPipeline.from_pretrained(make(tmp_path, folder))


def test_other_commands_refuse_a_corrupted_folder(folder, tmp_path, capsys):
    flip_one_byte(folder / "diffusion.safetensors")
    for argv in (["evaluate", "--model", str(folder), "--data", str(SAMPLE_RADIOGRAPH.parent / "LIDC-IDRI-0001_ct.nrrd"),
                  "--out", str(tmp_path / "eval"), "--device", "cpu"],
                 ["benchmark", "pipeline", "--model", str(folder), "--repeats", "1"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        stderr = capsys.readouterr().err
        assert stderr.strip().splitlines()[-1].startswith("error: ") and "diffusion.safetensors does not match" in stderr


def test_corrupted_folder_in_a_separate_process(folder, tmp_path):
    flip_one_byte(folder / "autoencoder.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "XctDiffCore", "reconstruct", str(SAMPLE_RADIOGRAPH), "--model", str(folder),
         "-o", str(tmp_path / "ct.nrrd"), "--device", "cpu", "--progress-lines"],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "SHA-256" in result.stderr
    assert not (tmp_path / "ct.nrrd").exists()


def test_a_model_chooses_its_default_method_and_a_call_overrides_it(capsys):
    pipe = XctDiffPipeline.from_pretrained()  # the bundled preview model defaults to the direct path
    assert pipe.info.method == "direct"
    default = pipe.reconstruct(SAMPLE_RADIOGRAPH, seed=0, device="cpu")
    assert (default.method, default.steps, default.ct.shape) == ("direct", None, (128, 128, 128))
    sampled = pipe.reconstruct(SAMPLE_RADIOGRAPH, seed=0, device="cpu", method="diffusion", steps=2)
    assert (sampled.method, sampled.steps) == ("diffusion", 2)
    assert not np.array_equal(default.ct.array, sampled.ct.array)
    several = pipe.reconstruct(SAMPLE_RADIOGRAPH, seed=0, device="cpu", samples=2, steps=2)  # samples ask for diffusion
    assert (several.method, several.samples) == ("diffusion", 2) and several.uncertainty is not None
    with pytest.raises(XctDiffError, match="method must be one of"):
        pipe.reconstruct(SAMPLE_RADIOGRAPH, method="guess")


def test_samples_on_the_bundled_direct_model_sample_the_diffusion(tmp_path):
    """What the Slicer panel sends for Samples >= 2 (no --method): the bundled model defaults to the
    direct path, so several samples choose the diffusion and the uncertainty map is written."""
    out = tmp_path / "ct.nrrd"
    assert main(["reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(out), "--samples", "2", "--steps", "2",
                 "--uncertainty", str(tmp_path / "u.nrrd"), "--device", "cpu"]) == 0
    assert out.is_file() and (tmp_path / "u.nrrd").is_file()


def test_direct_method_refuses_an_uncertainty_map_and_export_needs_a_run(tmp_path):
    from XctDiffCore.training import export_run

    with pytest.raises(XctDiffError, match="run folder not found"):
        export_run(tmp_path / "no-run", tmp_path / "model", method="direct")
    assert main(["reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(tmp_path / "ct.nrrd"), "--method", "direct",
                 "--uncertainty", str(tmp_path / "u.nrrd"), "--samples", "2"]) == 2
    assert not (tmp_path / "ct.nrrd").exists()


# ------------------------------------------------------------------------------- exporting over a folder


def folder_digest(folder: Path) -> dict:
    return {p.name: file_sha256(p) for p in folder.iterdir()}


def test_an_interrupted_export_leaves_the_earlier_model_valid(folder, monkeypatch):
    """Ctrl-C after the new model's first weights are written: the earlier folder is whole and loads."""
    import XctDiffCore.model_folder as model_folder

    before = folder_digest(folder)
    real, calls = model_folder.export_stage, []

    def export_then_interrupt(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(model_folder, "export_stage", export_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        create_random_model(folder, "tiny", seed=5)
    assert folder_digest(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # no hidden temporary folder
    load_model_folder(folder)


def test_an_export_replaces_the_whole_earlier_model_folder(folder):
    """The new model has no style stage and no mean CT: the earlier ones are gone, not left unlisted."""
    create_random_model(folder, "tiny", seed=5, with_style=False)
    assert {p.name for p in folder.iterdir()} == set(read_manifest_json(folder)["sha256"]) | {MANIFEST_NAME}
    assert not (folder / "style.safetensors").exists() and not (folder / "mean_ct.npy").exists()
    assert load_model_folder(folder).info.version == "seed5"


def test_an_export_into_a_folder_that_is_not_a_model_is_refused(tmp_path):
    """A folder of the user's (no manifest) is never replaced; an empty one is filled."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(XctDiffError, match="is not empty and not a model folder"):
        create_random_model(tmp_path / "mine", "tiny")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    load_model_folder(create_random_model(tmp_path / "empty", "tiny", with_style=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]


def test_a_model_folder_without_its_manifest_is_named_as_one_and_an_export_replaces_it(folder, capsys):
    """A model folder copied or written only in part (its manifest, written last, missing): `inspect` said 'no DICOM
    series found', loading it 'not a model folder', and an export into it was refused as a folder of the user's."""
    (folder / MANIFEST_NAME).unlink()
    status, _, err = inspected([str(folder)], capsys)
    assert status == 2 and err.startswith(f"error: {folder} holds a model folder's files (MODEL_CARD.md, autoencoder"
                                          ".json, ...) but no manifest.json, which an export writes last") and \
        err.count("\n") == 1, err
    with pytest.raises(XctDiffError, match="but no manifest.json.*; copy the whole model folder again, or export"):
        load_model_folder(folder)
    load_model_folder(create_random_model(folder, "tiny", seed=5, with_style=False))


# ------------------------------------------------------------------------------- describing a model folder


def inspected(argv, capsys) -> tuple:
    capsys.readouterr()
    status = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return status, dict(line.split(": ", 1) for line in out.splitlines()), err


def test_inspect_describes_a_model_folder(folder, capsys):
    """`xctdiff inspect MODEL_FOLDER` was 'error: no DICOM series found': a colleague handed a model had to read
    its manifest.json to learn what it is. It now says what it is, whether it reconstructs, what it was trained on
    and measured, and checks every file."""
    status, facts, _ = inspected([str(folder)], capsys)
    assert status == 0
    assert facts["model"] == "random seed0" and facts["folder"] == str(folder.resolve())
    assert facts["stages"].startswith("autoencoder (") and "diffusion (" in facts["stages"] and "float32" in facts["stages"]
    assert facts["grid"] == "32^3 voxels of 10 mm from 32 px radiographs (cone-beam DRRs)"
    assert facts["reconstructs"] == "yes; default: the diffusion path (diffusion: ddim, 5 steps)"
    assert facts["trained on"] == "not recorded" and facts["figures"].startswith("none recorded")
    assert facts["checksums"] == "all 10 files match the manifest's SHA-256"
    assert inspected([str(folder / MANIFEST_NAME)], capsys)[1] == facts  # its manifest names the folder too


def test_inspect_describes_the_bundled_and_the_partial_models(capsys):
    status, facts, _ = inspected([str(bundled_model_folder())], capsys)
    assert status == 0 and facts["reconstructs"].startswith("yes; default: the direct path")
    assert re.fullmatch(r"PSNR \d+\.\d\d dB, SSIM 0\.\d{3}, LPIPS 0\.\d{3} on \d+ cases( \(training fit\))?",
                        facts["figures, direct path"])
    assert facts["model card"].endswith("(xctdiff-cpu " + facts["model"].split()[1] + " — model card)")
    partial = REPO / "Resources" / "Pretrained" / "xctdiff-cpu-autoencoder"
    status, facts, _ = inspected([str(partial)], capsys)
    assert status == 0 and facts["reconstructs"].startswith("no: a partial model folder (no encoder, diffusion stage)")
    assert facts["validated on"] == "4 patients"  # kept apart from the 15 it trained on


def test_inspect_counts_one_patient_as_one(folder, capsys):
    """A model validated on one patient read 'validated on: 1 patients'."""
    manifest = read_manifest_json(folder)
    manifest["training"] = {"training_patients": ["p0", "p1"], "validation_patients": ["p4"]}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    facts = inspected([str(folder)], capsys)[1]
    assert (facts["trained on"], facts["validated on"]) == ("2 patients", "1 patient")


def test_inspect_describes_a_corrupted_folder_then_refuses_it(folder, capsys):
    flip_one_byte(folder / "encoder.safetensors")
    status, facts, err = inspected([str(folder)], capsys)
    assert status == 2 and facts["model"] == "random seed0" and "checksums" not in facts
    assert err.startswith("error: ") and "encoder.safetensors does not match its SHA-256" in err and err.count("\n") == 1
