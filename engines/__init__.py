"""Readout engines: CT series to volume, the findings model, phantoms and (later) the models."""
