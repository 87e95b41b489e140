"""Loading what the user gives: architectures (--arch), checkpoints, calibration and labelled data; atomic output files."""
