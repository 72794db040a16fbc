"""Readout's DICOM writers: TID 1500 Comprehensive 3D SR and SEG from a StudyResult."""
