"""Measuring a model's editing settings on the model itself (`kedit calibrate`), and the held-out split
that keeps the benchmark off the records calibration read."""
