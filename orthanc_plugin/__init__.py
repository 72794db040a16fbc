"""Readout, the application: CLI now; Orthanc plugin, rules, job store and runner later."""
