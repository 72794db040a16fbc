"""engines.series: find the series of a study folder, choose one, load it with fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.series import SeriesInfo, find_series, load_study_volume, select_series
from engines.volume import VolumeError
from tests.volume_cases import place, write_series, write_study_series


def info(
    uid: str,
    *,
    number: int,
    thickness: float | None,
    slices: int = 10,
    orientation: str = "axial",
    modality: str = "CT",
    localizer: bool = False,
) -> SeriesInfo:
    return SeriesInfo(uid, number, modality, f"series {uid}", (), slices, orientation, thickness, localizer)


@pytest.fixture
def study(tmp_path) -> Path:
    """Thin and thick axial CT, a localizer and an MR series, nested, with a stray text file."""
    write_study_series(
        tmp_path / "a" / "thin", seed=11, number=3, description="Chest 1mm", n=8, thickness=1.0
    )
    write_study_series(tmp_path / "a" / "thick", seed=12, number=2, description="Chest 2.5mm", n=6)
    write_study_series(
        tmp_path / "scout",
        seed=13,
        number=1,
        description="Scout",
        n=2,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    write_study_series(tmp_path / "mr", seed=14, number=4, description="T1", n=5, modality="MR")
    (tmp_path / "README.txt").write_text("export notes")
    return tmp_path


def test_find_series_groups_files_by_series_and_describes_them(study):
    found = find_series(study)
    assert [(s.series_number, s.modality, s.description, s.slices, s.localizer) for s in found] == [
        (1, "CT", "Scout", 0, True),
        (2, "CT", "Chest 2.5mm", 6, False),
        (3, "CT", "Chest 1mm", 8, False),
        (4, "MR", "T1", 5, False),
    ]
    thin = found[2]
    assert thin.orientation == "axial"
    assert thin.slice_thickness_mm == 1.0
    assert len(thin.paths) == 8 and all(p.parent.name == "thin" for p in thin.paths)
    assert thin.warnings == ()
    assert found[0].orientation == "unknown"


def test_files_without_series_uid_are_grouped_by_number_modality_and_description(tmp_path):
    for seed, number in ((21, 5), (22, 6)):
        datasets = write_study_series(tmp_path / "in", seed=seed, number=number, description="Anon", n=3)
        for ds in datasets:
            ds.SeriesInstanceUID = ""
        write_series(datasets, tmp_path / "blank", prefix=f"B{number}_")
    found = find_series(tmp_path / "blank")
    assert [(s.series_instance_uid, s.series_number, s.slices) for s in found] == [("", 5, 3), ("", 6, 3)]
    assert found[0].warnings == (
        "3 file(s) have no SeriesInstanceUID; grouped them by SeriesNumber, Modality and SeriesDescription",
    )


def test_thickness_falls_back_to_position_spacing(tmp_path):
    datasets = write_study_series(
        tmp_path / "in", seed=23, number=1, description="No thickness", thickness=2.0
    )
    for ds in datasets:
        del ds.SliceThickness
    write_series(datasets, tmp_path / "out")
    assert find_series(tmp_path / "out")[0].slice_thickness_mm == pytest.approx(2.0)


def test_select_takes_the_thinnest_axial_ct_series(study):
    selection = select_series(find_series(study))
    assert selection.series.description == "Chest 1mm"
    assert selection.reason == "thinnest axial CT series (1 mm, 8 slices) of 4 series"
    assert selection.warnings == ()


def test_ties_go_to_more_slices_then_to_the_lower_series_number():
    assert (
        select_series(
            [info("a", number=1, thickness=1.0, slices=50), info("b", number=2, thickness=1.0, slices=80)]
        ).series.series_instance_uid
        == "b"
    )
    assert (
        select_series(
            [
                info("a", number=7, thickness=1.0),
                info("b", number=3, thickness=1.0),
                info("c", number=1, thickness=2.0),
            ]
        ).series.series_instance_uid
        == "b"
    )
    # Unknown thickness ranks after any known one; too few slices and localizers never count.
    assert (
        select_series(
            [
                info("a", number=1, thickness=None),
                info("b", number=2, thickness=5.0),
                info("c", number=3, thickness=0.5, slices=2),
                info("d", number=4, thickness=0.5, localizer=True),
            ]
        ).series.series_instance_uid
        == "b"
    )


def test_without_an_axial_series_the_thinnest_other_is_chosen_with_a_warning():
    selection = select_series(
        [
            info("a", number=1, thickness=2.0, orientation="sagittal"),
            info("b", number=2, thickness=1.0, orientation="coronal"),
            info("c", number=3, thickness=0.5, modality="MR"),
        ]
    )
    assert selection.series.series_instance_uid == "b"
    assert selection.reason == "thinnest CT series (coronal) (1 mm, 10 slices) of 3 series"
    assert selection.warnings == ("no axial CT series; reading series 2 (CT 'series b'), which is coronal",)


def test_no_candidate_is_refused_listing_what_was_found():
    with pytest.raises(VolumeError) as caught:
        select_series(
            [
                info("a", number=1, thickness=None, slices=0, localizer=True),
                info("b", number=2, thickness=1.0, modality="MR"),
            ]
        )
    assert str(caught.value) == (
        "no CT series with at least 3 slices that is not a localizer; found series 1 (CT 'series a'): "
        "0 slice(s), localizer; series 2 (MR 'series b'): 10 slice(s)"
    )


def test_load_study_volume_reads_the_selected_series(study):
    volume, selection = load_study_volume(study)
    assert selection.series.description == "Chest 1mm"
    assert volume.series_instance_uid == selection.series.series_instance_uid
    assert volume.shape == (8, 16, 16)


def test_load_study_volume_by_uid(study):
    thick = next(s for s in find_series(study) if s.description == "Chest 2.5mm")
    volume, selection = load_study_volume(study, thick.series_instance_uid)
    assert volume.series_instance_uid == thick.series_instance_uid
    assert selection.reason == f"series {thick.series_instance_uid} was requested"
    with pytest.raises(VolumeError, match=r"^series 1\.2\.3 is not in .* \(found: .*Chest 1mm"):
        load_study_volume(study, "1.2.3")


def test_a_series_that_fails_to_load_passes_to_the_next_candidate(tmp_path):
    thin = write_study_series(
        tmp_path / "in", seed=31, number=3, description="Tilted 1mm", n=6, thickness=1.0
    )
    place(thin, (1, 0, 0), (0, 1, 0), origin=(0, 0, 0), step=(0, 0.3, 1.0))
    write_series(thin, tmp_path / "study" / "thin")
    write_study_series(tmp_path / "study" / "thick", seed=32, number=2, description="Chest 2.5mm")
    volume, selection = load_study_volume(tmp_path / "study")
    assert selection.series.description == "Chest 2.5mm"
    assert selection.reason == "thinnest axial CT series that loads (2.5 mm, 6 slices) of 2 series"
    assert selection.warnings == (
        "series 3 (CT 'Tilted 1mm') could not be read: gantry tilt of 16.7 degrees: slices shift within "
        "the image plane as they advance, so they do not stack into a box; use a series reconstructed "
        "without tilt",
    )
    assert volume.shape[0] == 6


def test_when_every_candidate_fails_the_first_error_is_raised(tmp_path):
    thin = write_study_series(tmp_path / "in", seed=33, number=3, description="Tilted", n=6, thickness=1.0)
    place(thin, (1, 0, 0), (0, 1, 0), origin=(0, 0, 0), step=(0, 0.3, 1.0))
    write_series(thin, tmp_path / "study" / "thin")
    gappy = write_study_series(tmp_path / "in2", seed=34, number=2, description="Gappy", n=6)
    write_series([gappy[i] for i in (0, 1, 2, 4, 5)], tmp_path / "study" / "gappy")
    with pytest.raises(VolumeError, match=r"^gantry tilt of 16\.7 degrees"):
        load_study_volume(tmp_path / "study")


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM files found in"):
        load_study_volume(tmp_path)
