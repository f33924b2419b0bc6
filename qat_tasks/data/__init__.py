"""From logged traffic to versioned data sets: reading and writing the traffic store, scrubbing personal data,
the seeded hash that assigns splits and sampling order, the calibration refresh and the calibration versions it
writes, the public data sets that ship in PyPI packages, and each model's own splits. It imports only `core`."""
