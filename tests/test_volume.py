"""engines.volume.load_series: messy CT series in, one regular HU volume (or a clear refusal) out."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from engines.volume import PADDING_HU, VolumeError, load_series
from tests.volume_cases import (
    assert_volume_matches,
    axial_series,
    enhanced_ct,
    hu_block,
    place,
    set_stored,
    transcode,
    write_series,
)

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "dcmqi-ct-3slice"


def refusal(paths) -> str:
    with pytest.raises(VolumeError) as caught:
        load_series(paths)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- Geometry ---------------------------------------------------------------------------------


def test_axial_series_round_trips_hu_affine_and_uids(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    volume = load_series(write_series(datasets, tmp_path))

    assert volume.hu.dtype == np.int16
    assert volume.shape == (8, 24, 32)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine[:3, 3], [-10, -20, 30])
    np.testing.assert_allclose(volume.spacing_mm, (2.5, 0.7, 0.8))
    assert volume.orientation == "axial"
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    assert volume.frame_numbers == (None,) * 8
    assert volume.series_instance_uid == datasets[0].SeriesInstanceUID
    assert volume.study_instance_uid == datasets[0].StudyInstanceUID
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert volume.warnings == ()


def test_sorts_by_position_not_instance_number_or_file_order(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    for ds, number in zip(datasets, random.Random(3).sample(range(1, 9), 8), strict=True):
        ds.InstanceNumber = number
    paths = write_series(datasets, tmp_path)
    volume = load_series(list(reversed(paths)))
    np.testing.assert_array_equal(volume.hu, hu)


def test_non_square_pixels_map_rows_and_columns_to_their_own_spacing(tmp_path):
    hu = hu_block(rows=20, columns=30)
    datasets = axial_series(hu, pixel_spacing=(0.5, 0.9))
    volume = load_series(write_series(datasets, tmp_path))
    np.testing.assert_allclose(volume.affine[:3, 1], [0, 0.5, 0])  # rows advance along +y
    np.testing.assert_allclose(volume.affine[:3, 2], [0.9, 0, 0])  # columns along +x
    assert_volume_matches(volume, datasets, hu)


def test_feet_first_series_with_descending_positions(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    # Feet-first supine: rows run patient right-to-left reversed, and the normal points to the feet.
    place(datasets, (-1, 0, 0), (0, 1, 0), origin=(40, -20, 100), step=(0, 0, 2.5))
    volume = load_series(write_series(datasets, tmp_path))
    np.testing.assert_array_equal(volume.hu, hu[::-1])
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, -2.5])
    np.testing.assert_allclose(volume.affine[:3, 3], [40, -20, 100 + 7 * 2.5])
    assert_volume_matches(volume, datasets, hu)


def test_sagittal_series(tmp_path):
    hu = hu_block(n=6)
    datasets = axial_series(hu)
    place(datasets, (0, 1, 0), (0, 0, -1), origin=(-30, -50, 80), step=(3.0, 0, 0))
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.orientation == "sagittal"
    np.testing.assert_allclose(volume.affine[:3, 0], [-3.0, 0, 0])  # normal = row x col = -x
    np.testing.assert_allclose(volume.affine[:3, 1], [0, 0, -0.7])
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0.8, 0])
    assert_volume_matches(volume, datasets, hu)


def test_coronal_series(tmp_path):
    hu = hu_block(n=6)
    datasets = axial_series(hu)
    place(datasets, (1, 0, 0), (0, 0, -1), origin=(-30, -50, 80), step=(0, 2.0, 0))
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.orientation == "coronal"
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 2.0, 0])
    assert_volume_matches(volume, datasets, hu)


def test_gantry_tilt_is_refused_with_its_angle(tmp_path):
    datasets = axial_series(hu_block())
    shift = 2.5 * np.tan(np.radians(15))
    place(datasets, (1, 0, 0), (0, 1, 0), origin=(-10, -20, 30), step=(0, shift, 2.5))
    message = refusal(write_series(datasets, tmp_path))
    assert message.startswith("gantry tilt of 15.0 degrees")


def test_a_slice_off_the_stack_line_is_refused_naming_it(tmp_path):
    datasets = axial_series(hu_block())
    datasets[4].ImagePositionPatient = [-7.0, -20.0, 40.0]  # 3 mm sideways, still 10 mm up
    message = refusal(write_series(datasets, tmp_path))
    assert "not stacked in a line: IMG004.dcm" in message


def test_spacing_jitter_within_one_percent_is_silent_and_k_step_spans_first_to_last(tmp_path):
    datasets = axial_series(hu_block())
    for i, ds in enumerate(datasets):
        ds.ImagePositionPatient = [-10, -20, 30 + 2.5 * i + (0.01 if i % 2 else 0)]
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.warnings == ()
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, (2.5 * 7 + 0.01) / 7])


def test_spacing_variation_up_to_ten_percent_is_accepted_with_a_warning(tmp_path):
    datasets = axial_series(hu_block())
    datasets[5].ImagePositionPatient = [-10, -20, 30 + 2.5 * 5 + 0.2]
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.warnings == (
        "slice spacing varies from 2.30 to 2.70 mm; the volume assumes an even 2.500 mm",
    )


def test_missing_slices_are_refused_with_where_they_are(tmp_path):
    datasets = axial_series(hu_block(n=10))
    paths = write_series([ds for i, ds in enumerate(datasets) if i not in (4, 5)], tmp_path)
    message = refusal(paths)
    assert message.startswith("missing slices: expected one every 2.50 mm but none at z = 40.00, 42.50 mm")
    assert "between IMG003.dcm and IMG004.dcm" in message


def test_irregular_spacing_is_refused(tmp_path):
    datasets = axial_series(hu_block())
    datasets[5].ImagePositionPatient = [-10, -20, 30 + 2.5 * 5 + 1.0]
    assert refusal(write_series(datasets, tmp_path)).startswith("irregular slice spacing: gaps")


# --- What belongs in the volume ---------------------------------------------------------------


def test_repeated_sop_instance_is_kept_once(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    paths = write_series(datasets, tmp_path)
    copy = tmp_path / "copy_of_3.dcm"
    shutil.copy(paths[3], copy)
    volume = load_series([*paths, copy])
    np.testing.assert_array_equal(volume.hu, hu)
    assert len(volume.warnings) == 1
    assert "repeating another file's SOP Instance UID" in volume.warnings[0]
    assert "copy_of_3.dcm repeats IMG003.dcm" in volume.warnings[0]


def test_two_instances_at_one_position_keep_the_lower_uid_whatever_the_file_names(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    twin = axial_series(hu_block(seed=9), seed=2)[2]  # other UIDs, other pixels
    twin.ImagePositionPatient = datasets[2].ImagePositionPatient
    twin_wins = twin.SOPInstanceUID < datasets[2].SOPInstanceUID
    for twin_name in ("a_twin.dcm", "z_twin.dcm"):  # sorts before, then after the others
        folder = tmp_path / twin_name
        paths = write_series(datasets, folder)
        twin.save_as(folder / twin_name, enforce_file_format=True)
        volume = load_series([*paths, folder / twin_name])
        assert volume.shape[0] == 8
        assert volume.sop_instance_uids[2] == min(twin.SOPInstanceUID, datasets[2].SOPInstanceUID)
        kept, dropped = (twin_name, "IMG002.dcm") if twin_wins else ("IMG002.dcm", twin_name)
        assert volume.warnings == (
            "dropped 1 image(s) at a position another image already holds, keeping the lower "
            f"SOP Instance UID: {dropped} (kept {kept})",
        )


def test_localizer_derived_and_secondary_capture_images_are_excluded(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    extras = axial_series(hu_block(n=3, seed=5), seed=7)
    extras[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    extras[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    extras[1].ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
    extras[1].ImagePositionPatient = [-10, -20, 31.0]
    extras[2].SOPClassUID = SecondaryCaptureImageStorage
    extras[2].ImagePositionPatient = [-10, -20, 36.0]
    volume = load_series(write_series(datasets, tmp_path) + write_series(extras, tmp_path, "X"))
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.warnings == (
        "excluded 1 localizer image(s): X000.dcm",
        "excluded 2 derived or secondary image(s) mixed into the original series: X001.dcm, X002.dcm",
    )


def test_an_all_derived_series_is_a_volume(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    for ds in datasets:
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    volume = load_series(write_series(datasets, tmp_path))
    np.testing.assert_array_equal(volume.hu, hu)


def test_images_of_another_orientation_or_size_are_excluded(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    odd_size = axial_series(hu_block(n=1, rows=16), seed=3)[0]
    odd_size.ImagePositionPatient = [-10, -20, 31.0]
    odd_orientation = axial_series(hu_block(n=1), seed=4)[0]
    odd_orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    paths = write_series(datasets, tmp_path) + write_series([odd_size, odd_orientation], tmp_path, "X")
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.warnings == (
        "excluded 2 image(s) whose orientation, size or pixel spacing differs from the other 8: "
        "X000.dcm, X001.dcm",
    )


def test_unreadable_non_dicom_and_truncated_header_files_are_skipped_by_name(tmp_path):
    hu = hu_block()
    paths = write_series(axial_series(hu), tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "meta_only.dcm").write_bytes(paths[0].read_bytes()[:200])
    other = write_series(axial_series(hu_block(n=1), seed=6), tmp_path / "other")[0]
    (tmp_path / "half.dcm").write_bytes(other.read_bytes()[:700])
    volume = load_series([*paths, *(tmp_path / name for name in ("notes.txt", "meta_only.dcm", "half.dcm"))])
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.warnings[0].startswith(
        "skipped 2 unreadable file(s): meta_only.dcm (nothing after the file meta information; "
        "truncated?), notes.txt (File is missing DICOM File Meta Information"
    )
    # Cut inside the header: readable, but the geometry it needs is gone.
    assert (
        volume.warnings[1]
        == "skipped 1 file(s) without a usable image: half.dcm (no Rows/Columns, not an image)"
    )


def test_only_unreadable_files_are_refused_naming_them(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    message = refusal([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert message.startswith("none of the 2 file(s) is readable DICOM: a.txt (")
    assert "b.txt (" in message


def test_a_file_without_position_is_skipped(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    extra = axial_series(hu_block(n=1), seed=8)[0]
    del extra.ImagePositionPatient
    volume = load_series(write_series(datasets, tmp_path) + write_series([extra], tmp_path, "X"))
    assert volume.shape[0] == 8
    assert volume.warnings == (
        "skipped 1 file(s) without a usable image: X000.dcm (no valid ImagePositionPatient)",
    )


def test_fewer_than_three_slices_is_not_a_volume(tmp_path):
    paths = write_series(axial_series(hu_block(n=2)), tmp_path)
    assert refusal(paths) == "not a volume: 2 usable slice(s), at least 3 are needed"


def test_only_localizers_is_not_a_volume(tmp_path):
    datasets = axial_series(hu_block(n=3))
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert (
        refusal(write_series(datasets, tmp_path))
        == "not a volume: the series holds only localizer images (3)"
    )


def test_mr_series_is_refused_naming_the_modality(tmp_path):
    datasets = axial_series(hu_block(n=4))
    for ds in datasets:
        ds.Modality = "MR"
    assert refusal(write_series(datasets, tmp_path)) == "not a CT series (modality MR)"


def test_blank_uids_are_generated_deterministically_with_a_warning(tmp_path):
    hu = hu_block()
    datasets = axial_series(hu)
    for ds in datasets:
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
    paths = write_series(datasets, tmp_path)
    first, second = load_series(paths), load_series(paths)
    np.testing.assert_array_equal(first.hu, hu)
    assert len(set(first.sop_instance_uids)) == 8 and "" not in first.sop_instance_uids
    assert first.sop_instance_uids == second.sop_instance_uids
    assert first.series_instance_uid == second.series_instance_uid != ""
    assert first.source_of_slice(3)[0].SOPInstanceUID == first.sop_instance_uids[3]
    assert any("have no SOPInstanceUID" in w for w in first.warnings)
    assert any("have no SeriesInstanceUID" in w for w in first.warnings)


# --- Pixel values -----------------------------------------------------------------------------


def test_rescale_may_differ_per_slice_and_stays_int16_when_integral(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    for i, (slope, intercept) in enumerate([(1, -1024), (2, -1000), (1, 0), (3, -3000)]):
        stored = (hu[i].astype(np.int32) - intercept) // slope
        set_stored(datasets[i], stored, signed=True)
        datasets[i].RescaleSlope, datasets[i].RescaleIntercept = slope, intercept
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.hu.dtype == np.int16
    for i, (slope, intercept) in enumerate([(1, -1024), (2, -1000), (1, 0), (3, -3000)]):
        expected = (hu[i].astype(np.int32) - intercept) // slope * slope + intercept
        np.testing.assert_array_equal(volume.hu[i], expected)


def test_fractional_slope_gives_float32(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    datasets[1].RescaleSlope = 0.5
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu[1], (hu[1] + 1024) * 0.5 - 1024)
    np.testing.assert_array_equal(volume.hu[2], hu[2])


def test_hu_beyond_int16_switch_to_float32_without_wrapping(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    stored = np.full(hu.shape[1:], 30000)
    set_stored(datasets[2], stored, signed=True)
    datasets[2].RescaleSlope, datasets[2].RescaleIntercept = 2, 0
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.hu.dtype == np.float32
    assert np.all(volume.hu[2] == 60000)
    np.testing.assert_array_equal(volume.hu[[0, 1, 3]], hu[[0, 1, 3]])


def test_unsigned_pixels(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    for ds, plane in zip(datasets, hu, strict=True):
        set_stored(ds, plane.astype(np.int32) + 1024, signed=False)
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)


def test_twelve_bit_pixels_ignore_bits_above_bits_stored(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    for ds, plane in zip(datasets[:2], hu[:2], strict=True):  # unsigned 12 bit with overlay bits set on top
        set_stored(ds, (plane.astype(np.int32) + 1024) | 0xF000, signed=False, bits_stored=12)
    for ds, plane in zip(datasets[2:], hu[2:], strict=True):  # signed 12 bit, written without sign extension
        set_stored(ds, (plane.astype(np.int32) + 24) & 0x0FFF, signed=False, bits_stored=12)
        ds.PixelRepresentation, ds.RescaleIntercept = 1, -24
    volume = load_series(write_series(datasets, tmp_path))
    np.testing.assert_array_equal(volume.hu, hu)


def test_padding_value_and_range_become_air_matched_on_stored_values(tmp_path):
    hu = hu_block(n=4)
    datasets = axial_series(hu)
    stored = hu.astype(np.int32) + 1024
    stored[:, 0, :] = -2000  # padding written in stored units
    stored[:, 1, :] = -1990  # inside the padding range
    for ds, plane in zip(datasets, stored, strict=True):
        set_stored(ds, plane, signed=True)
        ds.PixelPaddingValue = -2000
    for ds in datasets[2:]:
        ds.PixelPaddingRangeLimit = -1980
    volume = load_series(write_series(datasets, tmp_path))
    assert np.all(volume.hu[:, 0, :] == PADDING_HU)
    np.testing.assert_array_equal(volume.hu[:2, 1, :], np.full((2, 32), -1990 - 1024))
    assert np.all(volume.hu[2:, 1, :] == PADDING_HU)
    np.testing.assert_array_equal(volume.hu[:, 2:, :], hu[:, 2:, :])


# --- Encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "syntax"),
    [
        (LegacyConvertedEnhancedCTImageStorage, ExplicitVRLittleEndian),
        (EnhancedCTImageStorage, ExplicitVRLittleEndian),
        (EnhancedCTImageStorage, RLELossless),
    ],
    ids=["legacy", "enhanced", "enhanced-rle"],
)
def test_enhanced_multi_frame_frames_become_slices(tmp_path, sop_class, syntax):
    hu = hu_block(n=6)
    datasets = axial_series(hu, pixel_spacing=(0.6, 0.9))
    datasets[3].RescaleSlope, datasets[3].RescaleIntercept = 2, -2048  # per-frame transformation
    hu[3] = (hu[3].astype(np.int32) + 1024) * 2 - 2048
    random.Random(1).shuffle(datasets)
    image = enhanced_ct(datasets, sop_class, syntax)
    path = tmp_path / "enhanced.dcm"
    image.save_as(path, enforce_file_format=True)

    volume = load_series([path])
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.sop_instance_uids == (image.SOPInstanceUID,) * 6
    assert len(volume.sources) == 1 and "PixelData" not in volume.sources[0]
    # highdicom orders frames by instance number, which runs head to feet: frame 1 is k = 5.
    assert volume.frame_numbers == (6, 5, 4, 3, 2, 1)
    np.testing.assert_allclose(volume.affine[:3, :], [[0, 0, 0.9, -10], [0, 0.6, 0, -20], [2.5, 0, 0, 30]])


def _jpeg2000(paths, folder):
    folder.mkdir()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


ENCODINGS = {
    "jpeg2000-lossless": _jpeg2000,
    "jpeg-ls-lossless": lambda paths, folder: transcode(paths, folder, ["dcmcjpls"]),
    "jpeg-lossless-sv1": lambda paths, folder: transcode(paths, folder, ["dcmcjpeg", "+e1"]),
    "rle-lossless": lambda paths, folder: transcode(paths, folder, ["dcmcrle"]),
    "deflated": lambda paths, folder: transcode(paths, folder, ["dcmconv", "+td"]),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_transfer_syntaxes_decode_to_the_same_hu(tmp_path, encoding):
    hu = hu_block(n=4, rows=32, columns=40)
    datasets = axial_series(hu)
    for ds in datasets[2:]:  # unsigned pixels too: JPEG codecs handle them differently
        set_stored(ds, hu[datasets.index(ds)].astype(np.int32) + 1024, signed=False)
    original = load_series(write_series(datasets, tmp_path / "plain"))
    paths = ENCODINGS[encoding](sorted((tmp_path / "plain").iterdir()), tmp_path / encoding)
    syntax = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax != original.sources[0].file_meta.TransferSyntaxUID

    volume = load_series(paths)
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, original.hu)
    np.testing.assert_array_equal(volume.affine, original.affine)
    assert volume.warnings == ()


def test_empty_character_set_and_utf8_names_load(tmp_path):
    hu = hu_block(n=3)
    utf8 = axial_series(hu, patient_name="Müller^Jürgen")
    empty = axial_series(hu, seed=2)
    for ds in empty:
        ds.SpecificCharacterSet = ""
    assert load_series(write_series(utf8, tmp_path / "utf8")).sources[0].PatientName == "Müller^Jürgen"
    np.testing.assert_array_equal(load_series(write_series(empty, tmp_path / "empty")).hu, hu)


# --- Pass 2 -------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_truncated_end_slice_is_dropped_and_the_rest_loads(tmp_path):
    hu = hu_block()
    paths = write_series(axial_series(hu), tmp_path)
    _truncate(paths[7])
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.hu, hu[:7])
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 2.5])
    assert volume.warnings == (
        "dropped 1 slice(s) whose pixels could not be decoded: IMG007.dcm (pixel data truncated: "
        "1436 of 1536 bytes)",
    )


def test_truncated_interior_slice_is_refused_naming_the_file(tmp_path):
    paths = write_series(axial_series(hu_block()), tmp_path)
    _truncate(paths[3])
    message = refusal(paths)
    assert message.startswith("IMG003.dcm (pixel data truncated")
    assert "could not be decoded, and without it: missing slices" in message


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_compressed_slice_is_dropped(tmp_path):
    hu = hu_block(n=5)
    plain = write_series(axial_series(hu), tmp_path / "plain")
    paths = transcode(plain, tmp_path / "rle", ["dcmcrle"])
    _truncate(paths[0])
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.hu, hu[1:])
    assert volume.warnings[0].startswith("dropped 1 slice(s) whose pixels could not be decoded: IMG000.dcm (")


def test_sources_are_headers_in_k_order_and_progress_counts_slices(tmp_path):
    datasets = axial_series(hu_block(n=5))
    calls = []
    volume = load_series(
        list(reversed(write_series(datasets, tmp_path))), progress=lambda *a: calls.append(a)
    )
    assert [ds.SOPInstanceUID for ds in volume.sources] == [ds.SOPInstanceUID for ds in datasets]
    assert all("PixelData" not in ds for ds in volume.sources)
    assert volume.source_of_slice(4) == (volume.sources[4], None)
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


# --- Real data ----------------------------------------------------------------------------------


def test_real_three_slice_ct():
    paths = sorted(REAL_CT.glob("*.dcm"))
    assert len(paths) == 3, f"real test data missing in {REAL_CT}"
    volume = load_series(paths)

    assert volume.shape == (3, 512, 512)
    assert volume.hu.dtype == np.int16
    # Files 01..03 run down the table; k ascends along +z, so file 03 is k = 0.
    assert [ds.InstanceNumber for ds in volume.sources] == [3, 2, 1]
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 1.0], atol=1e-5)
    np.testing.assert_allclose(volume.affine[:3, 3], [-235.199997, -226.800003, -128.690002])
    np.testing.assert_allclose(volume.spacing_mm[1:], (0.810547, 0.810547))
    for k, ds in enumerate(volume.sources):
        full = pydicom.dcmread(ds.filename)
        stored = full.pixel_array
        expected = np.where(stored == -2000, PADDING_HU, stored.astype(np.int32) - 1024)
        np.testing.assert_array_equal(volume.hu[k], expected)
    assert (volume.hu == PADDING_HU).sum() > 0
    assert volume.warnings == ()
